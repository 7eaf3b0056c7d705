//! The supervisor's thread: one loop taking operators' commands, the watcher's changes and
//! a tick, one at a time; the watchdog is pinged from here.

use std::thread::JoinHandle;

use crossbeam_channel::select;

use super::{Supervisor, SupervisorCommand, TICK, desired::Found, reload::Trigger};
use crate::quarantine::SETTLE_AFTER;
use crate::{events::EventKind, watch::FileChange};

impl Supervisor {
    /// Runs on its own thread until stopped.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || self.run())
    }

    pub(super) fn run(mut self) {
        let mut changes = self
            .deps
            .watch
            .as_ref()
            .map_or_else(crossbeam_channel::never, |(_, r)| r.clone());
        let receiver = self.receiver.clone();
        loop {
            select! {
                recv(receiver) -> command => match command {
                    Ok(SupervisorCommand::Stop { reply }) => {
                        self.deps.watch = None;
                        self.deps.quarantine.disarm_all();
                        let _ = reply.send(std::mem::take(&mut self.retiring));
                        return;
                    }
                    Ok(command) => self.command(command),
                    Err(_) => return,
                },
                recv(changes) -> change => match change {
                    Ok(change) => {
                        // One reconcile for everything that changed together.
                        let mut all = vec![change];
                        all.extend(changes.try_iter());
                        self.files(all);
                    }
                    Err(_) => changes = crossbeam_channel::never(),
                },
                default(TICK) => {}
            }
            self.tick();
            self.publish_view();
            self.ping_watchdog();
        }
    }

    pub(super) fn command(&mut self, command: SupervisorCommand) {
        match command {
            SupervisorCommand::Reload {
                trigger,
                expected,
                instance,
                reply,
            } => {
                let result = self.reload(expected, instance, trigger);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            SupervisorCommand::Pause {
                name,
                paused,
                reply,
            } => {
                let _ = reply.send(self.pause(&name, paused));
            }
            SupervisorCommand::Forget { name, how, reply } => {
                let _ = reply.send(self.forget(&name, how));
            }
            SupervisorCommand::FirstCall { name, generation } => {
                if let Some(running) = self
                    .instances
                    .get_mut(&name)
                    .and_then(|i| i.running.as_mut())
                    .filter(|g| g.number == generation && g.armed.is_some())
                {
                    running.armed = None;
                    let sha256 = running.key.sha256;
                    self.deps.quarantine.disarm(&sha256, &name);
                }
            }
            SupervisorCommand::Retired {
                name,
                generation,
                how,
            } => {
                if let Some(inst) = self.instances.get_mut(&name) {
                    inst.draining.retain(|g| *g != generation);
                }
                self.deps.events.emit(EventKind::Retired {
                    instance: name,
                    generation,
                    how,
                });
            }
            SupervisorCommand::Stop { .. } => unreachable!("handled by the loop"),
        }
        self.retiring.retain(|t| !t.is_finished());
    }

    /// `WATCHDOG=1` at half the interval the service manager asked for: sent from this loop,
    /// so a supervisor stuck anywhere stops the pings.
    pub(super) fn ping_watchdog(&mut self) {
        if let Some(notifier) = &self.deps.notifier
            && let Some(interval) = notifier.watchdog()
            && self.pinged.elapsed() >= interval / 2
        {
            notifier.watchdog_ping();
            self.pinged = std::time::Instant::now();
        }
    }

    /// Disarms the quarantine markers of generations that ran long enough without a first
    /// call.
    pub(super) fn tick(&mut self) {
        for (name, inst) in &mut self.instances {
            if let Some(generation) = &mut inst.running
                && generation.ran_for(SETTLE_AFTER)
            {
                generation.armed = None;
                self.deps.quarantine.disarm(&generation.key.sha256, name);
            }
        }
    }

    /// The watcher reported files (a batch of them): each library is checked again (its
    /// bytes the same as the ones held: nothing to do), then the config file, if it is one
    /// of them, is reloaded (`Trigger::Watcher`: the same bytes are nothing to do); one
    /// reconcile for everything.
    pub(super) fn files(&mut self, changes: Vec<FileChange>) {
        let mut config = false;
        let mut libraries = false;
        let policy = self.policy();
        for change in changes {
            match change {
                FileChange::Config { .. } => config = true,
                FileChange::Library { path, .. } => {
                    let (found, refusal) = self.deps.libraries.update(&path, &policy);
                    if let Some(refusal) = refusal {
                        self.deps.events.emit(EventKind::Failed {
                            instance: None,
                            path: Some(refusal.path),
                            error: refusal.error,
                        });
                    }
                    if found == Found::Changed
                        && let Some(error) = self.deps.libraries.is_newcomer(&path)
                    {
                        self.deps.events.emit(EventKind::Failed {
                            instance: None,
                            path: Some(path.clone()),
                            error,
                        });
                    }
                    libraries |= matches!(found, Found::Changed | Found::Gone);
                }
            }
        }
        let reconciles = self.reconciles;
        if config {
            let _ = self.reload(None, None, Trigger::Watcher);
        }
        if libraries && self.reconciles == reconciles {
            // The libraries taken in above count even when the config's bytes were refused
            // or equal what runs (then the reload reconciled nothing).
            self.reconcile();
        }
    }
}
