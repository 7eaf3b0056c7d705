//! Reconcile: make what runs what the configuration, `plugin_dir` and the remembered
//! subscriptions say — register, route, start, swap, stop and retire generations.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use super::{
    StartError, StartFailure, Supervised, Supervisor, SupervisorCommand,
    desired::{self, Want},
    generation::{self, Generation, GenerationDeps, Key},
};
use crate::{
    actor::{self, Deadlines},
    config::Settings,
    dispatch::Slot,
    events::{EventKind, StopReason, Unsubscribed},
    ledger::Remembered,
    routing::{InstanceId, Routing},
    services::PublishLimits,
    topic::Pattern,
};

impl Supervisor {
    /// Registers instances whose subscriptions ended while deliveries still wait for them
    /// (found at recovery): they show as `removed`, with their backlog, until forgotten.
    pub fn adopt(&mut self, names: &std::collections::BTreeSet<String>) {
        let defaults = self.deps.config.defaults.clone();
        for name in names {
            self.register(name, &defaults);
        }
    }

    /// Makes the running state what the configuration, `plugin_dir` and the remembered
    /// subscriptions say; returns the instances that should run and do not.
    pub fn reconcile(&mut self) -> Vec<StartFailure> {
        self.reconciles += 1;
        let wants = desired::wants(&self.deps.config, &self.deps.libraries, &self.remembered);
        let stopping: Vec<String> = self
            .instances
            .iter()
            .filter(|(name, inst)| {
                inst.running.is_some() && !wants.get(*name).is_some_and(|w| w.run)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopping {
            let reason = match self.deps.config.instances.get(&name) {
                Some(i) if !i.enabled => StopReason::Disabled,
                Some(_) => StopReason::LibraryGone,
                None if wants.contains_key(&name) => StopReason::Autoload,
                None if self.deps.libraries.provider(&name).is_err() => StopReason::LibraryGone,
                None => StopReason::Removed,
            };
            self.stop(&name, reason);
        }
        // Routes before generations: a generation may publish from its first call, and a
        // child routed by an older (at start: empty) table would find no target. Every
        // subscribed instance is routed, running or not: its deliveries wait for it.
        for (name, want) in &wants {
            self.register(name, &want.settings);
        }
        self.route(&wants);
        let mut failures = Vec::new();
        for (name, want) in wants.iter().filter(|(_, w)| w.run) {
            if let Err(error) = self.converge(name, want) {
                failures.push(StartFailure {
                    instance: name.clone(),
                    error,
                });
            }
        }
        self.remember(&wants);
        self.deps.quarantine.retain(&self.deps.libraries.digests());
        self.publish_view();
        failures
    }

    /// Keeps every subscription in the ledger (it outlives a missing library and a restart);
    /// a subscription that ended is evented. A write that fails is logged and tried again at
    /// the next reconcile.
    pub(super) fn remember(&mut self, wants: &BTreeMap<String, Want>) {
        let mut changes = Vec::new();
        for (name, want) in wants {
            let old = self.remembered.get(name).cloned().unwrap_or_default();
            let new = Remembered {
                subscription: Some(want.subscription.clone()),
                ..old.clone()
            };
            if new != old {
                changes.push((name.clone(), new));
            }
        }
        let ended: Vec<String> = self
            .instances
            .iter()
            .filter(|(name, inst)| inst.subscribed.is_some() && !wants.contains_key(*name))
            .map(|(name, _)| name.clone())
            .chain(
                self.remembered
                    .iter()
                    .filter(|(name, r)| r.subscription.is_some() && !wants.contains_key(*name))
                    .map(|(name, _)| name.clone()),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for name in &ended {
            if let Some(old) = self
                .remembered
                .get(name)
                .filter(|r| r.subscription.is_some())
            {
                changes.push((
                    name.clone(),
                    Remembered {
                        subscription: None,
                        ..old.clone()
                    },
                ));
            }
            if let Some(inst) = self.instances.get_mut(name) {
                inst.subscribed = None;
                self.deps.events.emit(EventKind::Unsubscribed {
                    instance: name.clone(),
                    reason: Unsubscribed::Removed,
                });
            }
        }
        for (name, want) in wants {
            if let Some(inst) = self.instances.get_mut(name) {
                inst.subscribed = Some(want.subscription.origin);
                inst.run = want.run;
                inst.topics_known = want.topics_known;
            }
        }
        for (name, remembered) in changes {
            match self.deps.ledger.remember(&name, &remembered) {
                Ok(()) => {
                    self.remembered.insert(name, remembered);
                }
                Err(e) => tracing::error!(
                    instance = %name,
                    error = %e,
                    "cannot record the instance's subscription in the ledger; trying again at \
                     the next reload"
                ),
            }
        }
    }

    /// Brings one instance that should run to what `want` says.
    pub(super) fn converge(&mut self, name: &str, want: &Want) -> Result<(), StartError> {
        let id = self.register(name, &want.settings);
        let inst = self.instances.get_mut(name).expect("registered above");
        if inst.settings != want.settings {
            inst.settings = want.settings.clone();
            self.deps.backlog.set_limit(id, want.settings.max_backlog);
            self.deps.dispatcher.configure(id, want.settings.clone());
            self.deps.events.emit(EventKind::Updated {
                instance: name.to_owned(),
                topics: false,
                settings: true,
            });
        }
        let checked = match self.deps.libraries.provider(&want.plugin) {
            Ok(checked) => checked.clone(),
            Err(error) => {
                if inst.running.is_some() {
                    // Its library is gone: it stops; its deliveries wait.
                    self.stop(name, StopReason::LibraryGone);
                }
                return Err(self.report(name, None, error.into()));
            }
        };
        let key = Key {
            sha256: checked.sha256(),
            config: want.config.clone(),
        };
        if !inst.renew && inst.running.as_ref().is_some_and(|g| g.key == key) {
            return Ok(());
        }
        if let Some((_, error)) = inst.failed.as_ref().filter(|(failed, _)| *failed == key) {
            return Err(error.clone());
        }
        if let Some(unclean_exits) = self.deps.quarantine.quarantined(&key.sha256) {
            let error = StartError::Quarantined {
                path: checked.path().to_owned(),
                unclean_exits,
            };
            inst.failed = Some((key.clone(), error.clone()));
            inst.quarantined = true;
            let text = error.to_string();
            if inst.reported.as_deref() != Some(&text) {
                inst.reported = Some(text);
                self.deps.events.emit(EventKind::Quarantined {
                    instance: name.to_owned(),
                    path: checked.path().to_owned(),
                    sha256: hex::encode(key.sha256),
                    unclean_exits,
                });
            }
            return Err(error);
        }
        if inst.running.is_some()
            && let Err(mismatch) = checked.check_pin(want.pin)
        {
            // A pin change never stops a running generation (docs/design.md §4).
            let error = StartError::Pin(Arc::new(mismatch));
            inst.failed = Some((key, error.clone()));
            return Err(self.report(name, Some(checked.path().to_owned()), error));
        }
        self.start_generation(name, id, want, &checked, key)
    }

    /// Reports a failure of instance `name` once (until it changes or succeeds).
    pub(super) fn report(
        &mut self,
        name: &str,
        path: Option<PathBuf>,
        error: StartError,
    ) -> StartError {
        let inst = self
            .instances
            .get_mut(name)
            .expect("reported instances exist");
        let text = error.to_string();
        if inst.reported.as_deref() != Some(&text) {
            inst.reported = Some(text.clone());
            self.deps.events.emit(EventKind::Failed {
                instance: Some(name.to_owned()),
                path,
                error: text,
            });
        }
        error
    }

    /// The id of instance `name`, registering it (id, backlog entry, ledger key, dispatcher
    /// slot with what the ledger holds for it) if it has none.
    pub(super) fn register(&mut self, name: &str, settings: &Settings) -> InstanceId {
        if let Some(inst) = self.instances.get(name) {
            return inst.id;
        }
        let id = self.deps.registry.push(name);
        let backlog_id = self.deps.backlog.push(name, settings.max_backlog);
        assert_eq!(id, backlog_id, "ids are given in one order");
        let pending = self
            .deps
            .ledger
            .attach(id, name)
            .unwrap_or_else(|e| self.deps.fail_stop.halt(&e));
        if !pending.is_empty() {
            tracing::info!(
                instance = name,
                pending = pending.len(),
                "deliveries waiting in the ledger resume"
            );
        }
        self.deps.dispatcher.add(Slot::new(name, settings), pending);
        if self.remembered.get(name).is_some_and(|r| r.paused) {
            // An operator's pause outlives a restart.
            self.deps.dispatcher.pause(id);
        }
        self.instances
            .insert(name.to_owned(), Supervised::new(id, settings));
        id
    }

    /// Loads and starts a new generation of `name`; on success it takes over from the one
    /// running (which drains and retires), on failure that one keeps serving.
    pub(super) fn start_generation(
        &mut self,
        name: &str,
        id: InstanceId,
        want: &Want,
        checked: &crate::loader::Checked,
        key: Key,
    ) -> Result<(), StartError> {
        let deferrals = self.instances[name].deferrals.clone();
        let wiring = GenerationDeps {
            ingress: &self.deps.ingress,
            events: &self.deps.actor_events,
            ledger: &self.deps.ledger,
            clock: &self.deps.clock,
            policy: self.policy(),
            limits: PublishLimits {
                max_message_size: self.deps.config.host.max_message_size,
                hop_limit: self.deps.config.host.hop_limit,
            },
            deferrals: &deferrals,
            config_file: &self.deps.config.source,
        };
        let inst = self.instances.get_mut(name).expect("registered");
        let number = inst.generations + 1;
        let (commands, instance) = (self.commands.clone(), name.to_owned());
        let first_call: actor::FirstCall = Box::new(move || {
            let _ = commands.send(SupervisorCommand::FirstCall {
                name: instance,
                generation: number,
            });
        });
        let started = generation::start(
            id,
            name,
            number,
            want,
            checked,
            &wiring,
            &mut self.deps.quarantine,
            Some(first_call),
        );
        let (generation, actor) = match started {
            Ok(started) => started,
            Err(error) => {
                inst.failed = Some((key, error.clone()));
                return Err(self.report(name, Some(checked.path().to_owned()), error));
            }
        };
        inst.generations = number;
        inst.renew = false;
        inst.failed = None;
        inst.reported = None;
        inst.quarantined = false;
        let event = match &inst.running {
            Some(old) => EventKind::Swapped {
                instance: name.to_owned(),
                from: old.number,
                to: number,
                version: generation.version.clone(),
            },
            None => EventKind::Loaded {
                instance: name.to_owned(),
                plugin: want.plugin.clone(),
                version: generation.version.clone(),
                generation: number,
                sha256: hex::encode(generation.key.sha256),
                path: generation.path.clone(),
            },
        };
        let old = inst.running.replace(generation);
        let old_actor = self.run_actor(id, Some(actor));
        self.deps.events.emit(event);
        if let (Some(old), Some(old_actor)) = (old, old_actor) {
            self.retire(name, old, old_actor);
        }
        Ok(())
    }

    /// Hands `actor` to the dispatcher for `id`; returns the one it replaces.
    pub(super) fn run_actor(
        &self,
        id: InstanceId,
        actor: Option<actor::Actor>,
    ) -> Option<actor::Actor> {
        self.deps.dispatcher.run(id, actor)
    }

    /// Stops instance `name`: its actor finishes the call in hand; its deliveries wait.
    pub(super) fn stop(&mut self, name: &str, reason: StopReason) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let Some(old) = inst.running.take() else {
            return;
        };
        let id = inst.id;
        let old_actor = self.run_actor(id, None);
        self.deps.events.emit(EventKind::Stopped {
            instance: name.to_owned(),
            reason,
        });
        if let Some(old_actor) = old_actor {
            self.retire(name, old, old_actor);
        }
    }

    /// Drains and retires a generation on a thread of its own.
    pub(super) fn retire(&mut self, name: &str, old: Generation, actor: actor::Actor) {
        if old.armed.is_some() {
            self.deps.quarantine.disarm(&old.key.sha256, name);
        }
        let settings = &self.instances[name].settings;
        let deadlines = Deadlines {
            total: settings.ack_timeout + settings.hang_grace + settings.shutdown_timeout,
            shutdown: settings.shutdown_timeout,
        };
        self.deps.events.emit(EventKind::Draining {
            instance: name.to_owned(),
            generation: old.number,
        });
        if let Some(inst) = self.instances.get_mut(name) {
            inst.draining.push(old.number);
        }
        let commands = self.commands.clone();
        let (name, number) = (name.to_owned(), old.number);
        match generation::retire(actor, old, deadlines, self.deps.clock.clone(), move |how| {
            let _ = commands.send(SupervisorCommand::Retired {
                name,
                generation: number,
                how,
            });
        }) {
            Ok(thread) => self.retiring.push(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a retire thread; the generation is left running its call")
            }
        }
    }

    /// The routing snapshot for `wants`; an instance whose topics changed is evented.
    pub(super) fn route(&mut self, wants: &BTreeMap<String, Want>) {
        let mut patterns: BTreeMap<InstanceId, Vec<Pattern>> = BTreeMap::new();
        for (name, inst) in &mut self.instances {
            let topics = wants
                .get(name)
                .map(|w| w.topics.clone())
                .unwrap_or_default();
            if inst.topics != topics {
                if inst.running.is_some() && !inst.topics.is_empty() && !topics.is_empty() {
                    self.deps.events.emit(EventKind::Updated {
                        instance: name.clone(),
                        topics: true,
                        settings: false,
                    });
                }
                inst.topics = topics.clone();
            }
            if wants.contains_key(name) {
                patterns.insert(inst.id, topics);
            }
        }
        self.deps.ingress.set_routing(Routing::new(&patterns));
    }
}
