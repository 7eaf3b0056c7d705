//! The supervisor: the desired state (`plugins.toml` and the libraries in `plugin_dir`)
//! against the running state, reconciled one change at a time on one thread.
//!
//! It is fed by the directory watcher, SIGHUP and [`SupervisorHandle::reload`]; it loads,
//! swaps, stops, retires and quarantines generations, keeps the routing snapshot in step,
//! and emits an [event](crate::events) for every transition. Plugin code never runs on its
//! loop: `new` runs on a thread of its own (with `init_timeout`), a replaced generation is
//! drained and shut down on a retire thread.
//!
//! Invariants:
//! - An instance name gets one id for the life of the process (dispatcher slot, backlog
//!   entry, ledger key); a stopped instance keeps its slot, and its deliveries wait there.
//! - A failed load changes nothing that runs: the previous generation (if any) keeps
//!   serving. The same bytes with the same config are not tried again until an operator
//!   reloads (or they change).
//! - The routing snapshot names every instance that should run, loaded or not (DESIGN.md §7:
//!   the target set is fixed at acceptance); a dispatcher slot exists before a route to it.

pub mod desired;
pub mod generation;
mod view;

pub use view::{InstanceView, SupervisorView};

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, thread::JoinHandle, time::Duration};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use serde::Serialize;
use sha2::Digest as _;

use crate::{
    actor::{self, Deadlines},
    clock::Clock,
    config::{self, Config, ConfigError, Settings},
    dispatch::{self, Input, Slot},
    events::{EventKind, Events, Retirement, StopReason, Unsubscribed},
    ingress::{Backlog, Ingress},
    ledger::{Forget, Ledger, LedgerError, Origin, Remembered},
    loader::{Policy, ProbeCommand},
    notify::Notifier,
    quarantine::Quarantine,
    quote::quote,
    routing::{InstanceId, Registry, Routing},
    services::Limits,
    topic::Pattern,
    watch::{Change, Watcher},
};

use desired::{Found, Libraries, Want};
use generation::{Generation, Key, Wiring};

/// A quarantine marker is disarmed at the latest this long after its instance started.
pub const SETTLE_AFTER: Duration = Duration::from_secs(30);

/// How often the loop wakes without a command (quarantine markers).
const TICK: Duration = Duration::from_millis(100);

/// An instance that did not start, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartFailure {
    pub instance: String,
    pub error: String,
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The configuration running now.
    pub sha256: String,
    /// What changed, per instance.
    pub plan: config::Plan,
    /// Instances that should run and do not.
    pub failures: Vec<StartFailure>,
}

/// Why a reload was refused (the last good configuration keeps running).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path}: the file changed since it was read: expected sha256 {expected}, found {found}"
    )]
    Changed {
        path: String,
        expected: String,
        found: String,
    },
    #[error("no instance {} is configured or loaded", quote(.0))]
    UnknownInstance(String),
    #[error("the daemon is stopping")]
    Stopping,
}

/// Why an operator's act on an instance (forget, pause, resume) was refused (nothing
/// changed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActRefused {
    #[error(
        "instance `{instance}` is configured by [plugins.{instance}] in {}: remove that table \
         to end its subscription (its waiting deliveries stay), then forget it to drop them",
        config.display()
    )]
    Configured { instance: String, config: PathBuf },
    #[error(
        "instance `{instance}` is autoloaded from {}, which is still in plugin_dir: remove the \
         file first (it would be loaded and subscribed again at once), then forget it",
        library.display()
    )]
    LibraryPresent { instance: String, library: PathBuf },
    #[error("no instance {} is subscribed, running or waiting", quote(.0))]
    Unknown(String),
    #[error("{0}")]
    Ledger(LedgerError),
    #[error("the daemon is stopping")]
    Stopping,
}

/// What the supervisor is told.
enum Command {
    /// Read the configuration and `plugin_dir` again and apply them. `expected`: refuse
    /// unless the file has this sha256. `instance`: also release its quarantine and
    /// re-instantiate it. Without `reply` (SIGHUP) the result is only logged and evented.
    Reload {
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        reply: Option<Sender<Result<Applied, Refused>>>,
    },
    /// An operator pauses (or resumes) an instance; the pause is kept across restarts.
    Pause {
        name: String,
        paused: bool,
        reply: Sender<Result<(), ActRefused>>,
    },
    /// An operator ends an instance's subscription and its waiting deliveries.
    Forget {
        name: String,
        how: Forget,
        reply: Sender<Result<u64, ActRefused>>,
    },
    /// A generation's first call came back: its quarantine marker goes.
    FirstCall { name: String, generation: u32 },
    /// A retire thread finished.
    Retired {
        name: String,
        generation: u32,
        how: Retirement,
    },
    /// Shutdown: stop watching; the reply holds the retire threads still running.
    Stop { reply: Sender<Vec<JoinHandle<()>>> },
}

/// Talks to the supervisor's thread.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    commands: Sender<Command>,
    view: view::View,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reload { .. } => "Reload",
            Self::Pause { .. } => "Pause",
            Self::Forget { .. } => "Forget",
            Self::FirstCall { .. } => "FirstCall",
            Self::Retired { .. } => "Retired",
            Self::Stop { .. } => "Stop",
        })
    }
}

impl SupervisorHandle {
    /// Reloads and waits for the result: applied, or refused with why.
    ///
    /// # Errors
    /// [`Refused`] when the configuration is invalid, is not the expected one, or names no
    /// such instance; the last good one keeps running.
    pub fn reload(
        &self,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
    ) -> Result<Applied, Refused> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Reload {
                expected,
                instance,
                reply: Some(reply),
            })
            .map_err(|_| Refused::Stopping)?;
        answer.recv().map_err(|_| Refused::Stopping)?
    }

    /// Pauses (`paused`) or resumes an instance: nothing more is handed to it until it is
    /// resumed, across restarts too.
    ///
    /// # Errors
    /// [`ActRefused::Unknown`] for an instance that is not registered,
    /// [`ActRefused::Ledger`] when the pause cannot be recorded.
    pub fn pause(&self, name: &str, paused: bool) -> Result<(), ActRefused> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Pause {
                name: name.to_owned(),
                paused,
                reply,
            })
            .map_err(|_| ActRefused::Stopping)?;
        answer.recv().map_err(|_| ActRefused::Stopping)?
    }

    /// Ends instance `name`'s subscription and its waiting deliveries (dead-lettered or
    /// purged, per `how`); returns how many. Refused for an instance that `plugins.toml`
    /// configures or whose autoloaded library is still in `plugin_dir`.
    ///
    /// # Errors
    /// [`ActRefused`] with why; nothing changed.
    pub fn forget(&self, name: &str, how: Forget) -> Result<u64, ActRefused> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(Command::Forget {
                name: name.to_owned(),
                how,
                reply,
            })
            .map_err(|_| ActRefused::Stopping)?;
        answer.recv().map_err(|_| ActRefused::Stopping)?
    }

    /// What runs, as the supervisor last published it (never waits for a reload in
    /// progress).
    pub fn view(&self) -> Arc<SupervisorView> {
        self.view.load_full()
    }

    /// Asks for a reload without waiting (SIGHUP).
    pub fn request_reload(&self) {
        let _ = self.commands.send(Command::Reload {
            expected: None,
            instance: None,
            reply: None,
        });
    }

    /// Stops the supervisor; returns the retire threads still running.
    pub fn stop(&self) -> Vec<JoinHandle<()>> {
        let (reply, answer) = bounded(1);
        if self.commands.send(Command::Stop { reply }).is_err() {
            return Vec::new();
        }
        answer.recv().unwrap_or_default()
    }
}

/// What the supervisor is connected to.
pub struct Parts {
    pub config: Config,
    pub libraries: Libraries,
    pub quarantine: Quarantine,
    pub registry: Arc<Registry>,
    pub inputs: Sender<Input>,
    pub actor_events: Sender<actor::Event>,
    pub ingress: Arc<Ingress>,
    pub ledger: Arc<dyn Ledger>,
    pub backlog: Arc<Backlog>,
    pub clock: Arc<dyn Clock>,
    pub probe: Option<ProbeCommand>,
    pub events: Arc<Events>,
    pub watch: Option<(Watcher, Receiver<Change>)>,
    /// The service manager, when one started the daemon.
    pub notifier: Option<Arc<Notifier>>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("config", &self.config.source)
            .field("libraries", &self.libraries)
            .finish_non_exhaustive()
    }
}

/// One instance with an id.
#[derive(Debug)]
struct Inst {
    id: InstanceId,
    running: Option<Generation>,
    settings: Settings,
    topics: Vec<Pattern>,
    /// The last load that failed (not tried again until what it is made of changes, or an
    /// operator reloads), and the error reported last (reported once).
    failed: Option<Key>,
    reported: Option<String>,
    /// The last failure is a quarantine.
    quarantined: bool,
    /// An operator asked for a new generation (`reload NAME`).
    renew: bool,
    generations: u32,
    /// Generations replaced or stopped and not yet retired.
    draining: Vec<u32>,
    /// Its subscription now (`None`: ended; its waiting deliveries stay until forgotten).
    subscribed: Option<Origin>,
    /// Whether a generation of it should run.
    run: bool,
    /// Whether its topics are known (see [`Want::topics_known`]).
    topics_known: bool,
}

impl Inst {
    /// An instance just given id `id`, running nothing yet.
    fn new(id: InstanceId, settings: &Settings) -> Self {
        Self {
            id,
            running: None,
            settings: settings.clone(),
            topics: Vec::new(),
            failed: None,
            reported: None,
            quarantined: false,
            renew: false,
            generations: 0,
            draining: Vec::new(),
            subscribed: None,
            run: false,
            topics_known: true,
        }
    }
}

/// The supervisor's state, on its thread.
#[derive(Debug)]
pub struct Supervisor {
    parts: Parts,
    instances: BTreeMap<String, Inst>,
    retiring: Vec<JoinHandle<()>>,
    commands: Sender<Command>,
    receiver: Receiver<Command>,
    /// What the control plane reads, republished after every change.
    view: view::View,
    /// The configuration bytes refused last (a watcher event for them is not news).
    refused: Option<[u8; 32]>,
    /// The bytes applied last and what applying them changed: the answer to an operator's
    /// reload of exactly those bytes when the watcher applied them first (`ctl enable`
    /// writes the file, and the watcher may read it before the reload arrives).
    last_change: Option<([u8; 32], config::Plan)>,
    /// What the ledger remembers of each instance (subscriptions, pauses), as last written.
    remembered: BTreeMap<String, Remembered>,
    /// The last `STATUS=` sent, when, and the last watchdog ping.
    status: String,
    status_at: std::time::Instant,
    pinged: std::time::Instant,
}

impl Supervisor {
    /// The supervisor of `parts`, whose instances (the ones recovered) already have ids and
    /// dispatcher slots, running nothing yet; `remembered` is what the ledger keeps of
    /// instances (their subscriptions and pauses).
    pub fn new(
        parts: Parts,
        recovered: &BTreeMap<String, Want>,
        remembered: BTreeMap<String, Remembered>,
    ) -> Self {
        let (commands, receiver) = crossbeam_channel::unbounded();
        let instances = recovered
            .iter()
            .map(|(name, want)| {
                let id = parts
                    .registry
                    .id(name)
                    .expect("recovered instances are registered");
                if remembered.get(name).is_some_and(|r| r.paused) {
                    // An operator's pause outlives a restart.
                    let _ = parts.inputs.send(Input::Pause(id));
                }
                (name.clone(), Inst::new(id, &want.settings))
            })
            .collect();
        Self {
            parts,
            instances,
            retiring: Vec::new(),
            commands,
            receiver,
            view: view::View::default(),
            refused: None,
            last_change: None,
            remembered,
            status: String::new(),
            status_at: std::time::Instant::now(),
            pinged: std::time::Instant::now(),
        }
    }

    pub fn handle(&self) -> SupervisorHandle {
        SupervisorHandle {
            commands: self.commands.clone(),
            view: self.view.clone(),
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            trusted_owners: self.parts.config.host.trusted_owner_uids.clone(),
            sha256: None,
            probe: self.parts.probe.clone(),
        }
    }

    /// Runs on its own thread until stopped.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let mut changes = self
            .parts
            .watch
            .as_ref()
            .map_or_else(crossbeam_channel::never, |(_, r)| r.clone());
        let receiver = self.receiver.clone();
        loop {
            select! {
                recv(receiver) -> command => match command {
                    Ok(Command::Stop { reply }) => {
                        self.parts.watch = None;
                        self.parts.quarantine.disarm_all();
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

    fn command(&mut self, command: Command) {
        match command {
            Command::Reload {
                expected,
                instance,
                reply,
            } => {
                let result = self.reload(expected, instance, false);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Pause {
                name,
                paused,
                reply,
            } => {
                let _ = reply.send(self.pause(&name, paused));
            }
            Command::Forget { name, how, reply } => {
                let _ = reply.send(self.forget(&name, how));
            }
            Command::FirstCall { name, generation } => {
                if let Some(running) = self
                    .instances
                    .get_mut(&name)
                    .and_then(|i| i.running.as_mut())
                    .filter(|g| g.number == generation && g.armed.is_some())
                {
                    running.armed = None;
                    let sha256 = running.key.sha256;
                    self.parts.quarantine.disarm(&sha256, &name);
                }
            }
            Command::Retired {
                name,
                generation,
                how,
            } => {
                if let Some(inst) = self.instances.get_mut(&name) {
                    inst.draining.retain(|g| *g != generation);
                }
                self.parts.events.emit(EventKind::Retired {
                    instance: name,
                    generation,
                    how,
                });
            }
            Command::Stop { .. } => unreachable!("handled by the loop"),
        }
        self.retiring.retain(|t| !t.is_finished());
    }

    /// `WATCHDOG=1` at half the interval the service manager asked for: sent from this loop,
    /// so a supervisor stuck anywhere stops the pings.
    fn ping_watchdog(&mut self) {
        if let Some(notifier) = &self.parts.notifier
            && let Some(interval) = notifier.watchdog()
            && self.pinged.elapsed() >= interval / 2
        {
            notifier.watchdog_ping();
            self.pinged = std::time::Instant::now();
        }
    }

    /// Disarms the quarantine markers of generations that ran long enough without a first
    /// call.
    fn tick(&mut self) {
        for (name, inst) in &mut self.instances {
            if let Some(generation) = &mut inst.running
                && generation.ran_for(SETTLE_AFTER)
            {
                generation.armed = None;
                self.parts.quarantine.disarm(&generation.key.sha256, name);
            }
        }
    }

    /// Library files changed, or the config file did.
    fn files(&mut self, changes: Vec<Change>) {
        let mut config = false;
        let mut libraries = false;
        let policy = self.policy();
        for change in changes {
            match change {
                Change::Config { .. } => config = true,
                Change::Library { path, .. } => {
                    let (found, refusal) = self.parts.libraries.update(&path, &policy);
                    if let Some(refusal) = refusal {
                        self.parts.events.emit(EventKind::Failed {
                            instance: None,
                            path: Some(refusal.path),
                            error: refusal.error,
                        });
                    }
                    if found == Found::Changed
                        && let Some(error) = self.parts.libraries.is_newcomer(&path)
                    {
                        self.parts.events.emit(EventKind::Failed {
                            instance: None,
                            path: Some(path.clone()),
                            error,
                        });
                    }
                    libraries |= matches!(found, Found::Changed | Found::Gone);
                }
            }
        }
        if config {
            // It rescans `plugin_dir` and reconciles too.
            let _ = self.reload(None, None, true);
        } else if libraries {
            self.reconcile();
        }
    }

    /// A reload, as the service manager sees it: `RELOADING=1`, the reload, `READY=1`.
    fn reload(
        &mut self,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        quiet: bool,
    ) -> Result<Applied, Refused> {
        if !quiet && let Some((watcher, _)) = &self.parts.watch {
            // An operator's reload also looks at the watched directories again: one deleted
            // and made anew (or a symlink chain swapped) is watched from now on.
            watcher.refresh();
        }
        // Read once: what is compared, refused or applied is these bytes (never blocking: a
        // FIFO in the config's place is refused, not waited on).
        let text = config::read_text(&self.parts.config.source);
        let hash = text
            .as_ref()
            .ok()
            .map(|t| <[u8; 32]>::from(sha2::Sha256::digest(t.as_bytes())));
        // A watcher event whose bytes equal what runs (or what was just refused) is no
        // reload at all.
        if quiet && hash.is_some_and(|h| h == self.parts.config.hash || Some(h) == self.refused) {
            let plan = config::plan(&self.parts.config, &self.parts.config);
            return Ok(self.applied(plan, Vec::new()));
        }
        if let Some(notifier) = &self.parts.notifier {
            notifier.reloading();
        }
        let result = self.apply_config(text, expected, instance, quiet);
        self.refused = match &result {
            Err(Refused::Invalid(_)) => hash,
            _ => None,
        };
        if let Some(notifier) = &self.parts.notifier {
            // Always READY again, after a refused reload too (the old configuration runs).
            let summary = self.view.load().summary();
            match &result {
                Ok(_) => notifier.ready(&format!("reloaded; {summary}")),
                Err(e) => notifier.ready(&format!(
                    "reload refused ({}); {summary}",
                    e.to_string().lines().next().unwrap_or_default()
                )),
            }
        }
        result
    }

    /// Applies the configuration file's `text` (and reads `plugin_dir` again). `quiet`: a
    /// watcher event, not an operator's reload.
    fn apply_config(
        &mut self,
        text: std::io::Result<String>,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        quiet: bool,
    ) -> Result<Applied, Refused> {
        let path = self.parts.config.source.clone();
        let refuse = |events: &Events, error: String| {
            events.emit(EventKind::ConfigRefused {
                path: path.clone(),
                error: error.clone(),
            });
            Err(Refused::Invalid(error))
        };
        let text = match text {
            Ok(text) => text,
            Err(source) => {
                let error = ConfigError::Read {
                    path: path.clone(),
                    source,
                };
                return refuse(&self.parts.events, error.to_string());
            }
        };
        if text.trim().is_empty() {
            // What a truncation, or a write cut short, leaves behind: applying it would stop
            // every instance. A configuration with no instances says so (a `[host]` table, a
            // comment) and is applied as any other.
            let what = if text.is_empty() {
                "is empty (0 bytes)"
            } else {
                "holds only whitespace"
            };
            return refuse(
                &self.parts.events,
                format!(
                    "{}: the file {what}: refused, the last good configuration keeps running \
                     (a configuration with no instances says so with a [host] table or a \
                     comment)",
                    path.display()
                ),
            );
        }
        let mut new = match config::parse(&path, &text) {
            Ok(new) => new,
            Err(invalid) => return refuse(&self.parts.events, invalid.render()),
        };
        if let Some(expected) = expected
            && expected != new.hash
        {
            let refused = Refused::Changed {
                path: path.display().to_string(),
                expected: hex::encode(expected),
                found: hex::encode(new.hash),
            };
            self.parts.events.emit(EventKind::ConfigRefused {
                path,
                error: refused.to_string(),
            });
            return Err(refused);
        }
        let unchanged = new.hash == self.parts.config.hash;
        if let Some(name) = &instance {
            let Some(inst) = self.instances.get_mut(name) else {
                return Err(Refused::UnknownInstance(name.clone()));
            };
            // An operator's reload of one instance: released from quarantine, tried again,
            // re-instantiated if it runs.
            inst.failed = None;
            inst.reported = None;
            if let Some(running) = &inst.running {
                self.parts.quarantine.release(&running.key.sha256);
            }
            let plugin = new
                .instances
                .get(name)
                .map_or_else(|| name.clone(), |i| i.plugin.clone());
            if let Ok(checked) = self.parts.libraries.provider(&plugin) {
                self.parts.quarantine.release(&checked.sha256());
            }
        } else if !quiet {
            // An operator's reload: every failed or quarantined load is tried again.
            self.parts.quarantine.release_all();
            for inst in self.instances.values_mut() {
                inst.failed = None;
                inst.reported = None;
            }
        }
        let mut plan = config::plan(&self.parts.config, &new);
        if unchanged
            && instance.is_none()
            && let (Some(expected), Some((hash, applied))) = (expected, &self.last_change)
            && expected == *hash
        {
            // The operator expects these bytes and they run already: the watcher applied
            // them first. The answer is what applying them changed, not "unchanged".
            plan = applied.clone();
        } else if !unchanged {
            self.last_change = Some((new.hash, plan.clone()));
        }
        for key in plan.restart_required.iter().filter(|_| !unchanged) {
            tracing::warn!(
                key,
                "a [host] setting changed; it takes effect at the next start"
            );
        }
        let restart_required = plan
            .restart_required
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        self.parts.ingress.set_unrouted(new.host.unrouted);
        // What needs a restart keeps running as it was until then.
        config::keep_restart_only(&self.parts.config.host, &mut new.host);
        self.parts.config = new;
        let (libraries, refusals) =
            Libraries::rescan(&self.parts.libraries, &self.parts.config, &self.policy());
        self.parts.libraries = libraries;
        for refusal in refusals {
            self.parts.events.emit(EventKind::Failed {
                instance: None,
                path: Some(refusal.path),
                error: refusal.error,
            });
        }
        if let Some(inst) = instance.as_ref().and_then(|n| self.instances.get_mut(n)) {
            // Instantiated anew at the reconcile below, even from the same bytes and config.
            inst.renew = true;
        }
        let failures = self.reconcile();
        if let Some(name) = &instance
            && !failures.iter().any(|f| f.instance == *name)
            && self
                .instances
                .get(name)
                .is_some_and(|i| i.running.is_some())
        {
            // Instantiated anew on the operator's word, whatever else the plan says.
            plan.instances.insert(
                name.clone(),
                config::Change::Reinstantiate {
                    reasons: vec![config::Reason::Operator],
                },
            );
        }
        if !unchanged {
            self.parts.events.emit(EventKind::ConfigApplied {
                path: self.parts.config.source.clone(),
                sha256: hex::encode(self.parts.config.hash),
                restart_required,
            });
        }
        Ok(self.applied(plan, failures))
    }

    fn applied(&self, plan: config::Plan, failures: Vec<StartFailure>) -> Applied {
        Applied {
            sha256: hex::encode(self.parts.config.hash),
            plan,
            failures,
        }
    }

    /// Registers instances whose subscriptions ended while deliveries still wait for them
    /// (found at recovery): they show as `removed`, with their backlog, until forgotten.
    pub fn adopt(&mut self, names: &std::collections::BTreeSet<String>) {
        let defaults = self.parts.config.defaults.clone();
        for name in names {
            self.register(name, &defaults);
        }
    }

    /// Makes the running state what the configuration, `plugin_dir` and the remembered
    /// subscriptions say; returns the instances that should run and do not.
    pub fn reconcile(&mut self) -> Vec<StartFailure> {
        let wants = desired::wants(&self.parts.config, &self.parts.libraries, &self.remembered);
        let stopping: Vec<String> = self
            .instances
            .iter()
            .filter(|(name, inst)| {
                inst.running.is_some() && !wants.get(*name).is_some_and(|w| w.run)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stopping {
            let reason = match self.parts.config.instances.get(&name) {
                Some(i) if !i.enabled => StopReason::Disabled,
                Some(_) => StopReason::LibraryGone,
                None if wants.contains_key(&name) => StopReason::Autoload,
                None if self.parts.libraries.provider(&name).is_err() => StopReason::LibraryGone,
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
        self.parts
            .quarantine
            .retain(&self.parts.libraries.digests());
        self.publish_view();
        failures
    }

    /// Keeps every subscription in the ledger (it outlives a missing library and a restart);
    /// a subscription that ended is evented. A write that fails is logged and tried again at
    /// the next reconcile.
    fn remember(&mut self, wants: &BTreeMap<String, Want>) {
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
                self.parts.events.emit(EventKind::Unsubscribed {
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
            match self.parts.ledger.remember(&name, &remembered) {
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

    /// An operator's pause or resume: recorded in the ledger (kept across restarts), then
    /// applied by the dispatcher.
    fn pause(&mut self, name: &str, paused: bool) -> Result<(), ActRefused> {
        let Some(id) = self.instances.get(name).map(|i| i.id) else {
            return Err(ActRefused::Unknown(name.to_owned()));
        };
        let mut remembered = self.remembered.get(name).cloned().unwrap_or_default();
        remembered.paused = paused;
        self.parts
            .ledger
            .remember(name, &remembered)
            .map_err(ActRefused::Ledger)?;
        self.remembered.insert(name.to_owned(), remembered);
        let _ = self.parts.inputs.send(if paused {
            Input::Pause(id)
        } else {
            Input::Resume(id)
        });
        Ok(())
    }

    /// An operator forgets an instance: its subscription ends (durably, routes first) and
    /// its waiting deliveries are dead-lettered or purged.
    fn forget(&mut self, name: &str, how: Forget) -> Result<u64, ActRefused> {
        if self.parts.config.instances.contains_key(name) {
            return Err(ActRefused::Configured {
                instance: name.to_owned(),
                config: self.parts.config.source.clone(),
            });
        }
        let wants = desired::wants(&self.parts.config, &self.parts.libraries, &self.remembered);
        if let Some(want) = wants.get(name)
            && let Ok(library) = self.parts.libraries.provider(&want.plugin)
        {
            return Err(ActRefused::LibraryPresent {
                instance: name.to_owned(),
                library: library.path().to_owned(),
            });
        }
        let registered = self.instances.get(name).map(|i| i.id);
        let known = registered.is_some()
            || self.remembered.contains_key(name)
            || self
                .parts
                .ledger
                .backlog()
                .is_ok_and(|b| b.iter().any(|e| e.instance == name));
        if !known {
            return Err(ActRefused::Unknown(name.to_owned()));
        }
        // The subscription ends first, durably: nothing new is routed to it from here on.
        self.parts
            .ledger
            .remember(name, &Remembered::default())
            .map_err(ActRefused::Ledger)?;
        let was = self.remembered.remove(name).unwrap_or_default();
        let was_subscribed = was.subscription.is_some();
        if let (true, Some(id)) = (was.paused, registered) {
            // The pause went with it: should it come back, it starts afresh.
            let _ = self.parts.inputs.send(Input::Resume(id));
        }
        if let Some(inst) = self.instances.get_mut(name) {
            let subscribed = inst.subscribed.take().is_some();
            if subscribed || was_subscribed {
                self.parts.events.emit(EventKind::Unsubscribed {
                    instance: name.to_owned(),
                    reason: Unsubscribed::Forgotten,
                });
            }
        }
        self.reconcile();
        let count = match registered {
            Some(instance) => {
                let (reply, answer) = bounded(1);
                self.parts
                    .inputs
                    .send(Input::Forget {
                        instance,
                        how,
                        reply,
                    })
                    .map_err(|_| ActRefused::Stopping)?;
                answer.recv().map_err(|_| ActRefused::Stopping)?
            }
            None => self
                .parts
                .ledger
                .forget(name, how, self.parts.clock.now())
                .map_err(ActRefused::Ledger)?,
        };
        self.publish_view();
        Ok(count)
    }

    /// Brings one instance that should run to what `want` says.
    fn converge(&mut self, name: &str, want: &Want) -> Result<(), String> {
        let id = self.register(name, &want.settings);
        let inst = self.instances.get_mut(name).expect("registered above");
        if inst.settings != want.settings {
            inst.settings = want.settings.clone();
            self.parts.backlog.set_limit(id, want.settings.max_backlog);
            let _ = self.parts.inputs.send(Input::Configure {
                instance: id,
                settings: Box::new(want.settings.clone()),
            });
            self.parts.events.emit(EventKind::Updated {
                instance: name.to_owned(),
                topics: false,
                settings: true,
            });
        }
        let checked = match self.parts.libraries.provider(&want.plugin) {
            Ok(checked) => checked.clone(),
            Err(error) => {
                if inst.running.is_some() {
                    // Its library is gone: it stops; its deliveries wait.
                    self.stop(name, StopReason::LibraryGone);
                }
                return Err(self.report(name, None, error));
            }
        };
        let key = Key {
            sha256: checked.sha256(),
            config: want.config.clone(),
        };
        if !inst.renew && inst.running.as_ref().is_some_and(|g| g.key == key) {
            return Ok(());
        }
        if inst.failed.as_ref() == Some(&key) {
            return Err(inst.reported.clone().unwrap_or_default());
        }
        if let Some(unclean_exits) = self.parts.quarantine.quarantined(&key.sha256) {
            inst.failed = Some(key.clone());
            inst.quarantined = true;
            let error = format!(
                "{} is quarantined: the daemon exited uncleanly {unclean_exits} times while \
                 loading it; replace the file or reload the instance to try again",
                checked.path().display()
            );
            if inst.reported.as_deref() != Some(&error) {
                inst.reported = Some(error.clone());
                self.parts.events.emit(EventKind::Quarantined {
                    instance: name.to_owned(),
                    path: checked.path().to_owned(),
                    sha256: hex::encode(key.sha256),
                    unclean_exits,
                });
            }
            return Err(error);
        }
        if want.pin.is_some_and(|pin| pin != key.sha256) && inst.running.is_some() {
            // A pin change never stops a running generation (DESIGN.md §4).
            let error = checked
                .check_pin(want.pin)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            inst.failed = Some(key);
            return Err(self.report(name, Some(checked.path().to_owned()), error));
        }
        self.start_generation(name, id, want, &checked, key)
    }

    /// Reports a failure of instance `name` once (until it changes or succeeds).
    fn report(&mut self, name: &str, path: Option<PathBuf>, error: String) -> String {
        let inst = self
            .instances
            .get_mut(name)
            .expect("reported instances exist");
        if inst.reported.as_deref() != Some(&error) {
            inst.reported = Some(error.clone());
            self.parts.events.emit(EventKind::Failed {
                instance: Some(name.to_owned()),
                path,
                error: error.clone(),
            });
        }
        error
    }

    /// The id of instance `name`, registering it (id, backlog entry, ledger key, dispatcher
    /// slot with what the ledger holds for it) if it has none.
    fn register(&mut self, name: &str, settings: &Settings) -> InstanceId {
        if let Some(inst) = self.instances.get(name) {
            return inst.id;
        }
        let id = self.parts.registry.push(name);
        let backlog_id = self.parts.backlog.push(name, settings.max_backlog);
        assert_eq!(id, backlog_id, "ids are given in one order");
        let pending = self
            .parts
            .ledger
            .attach(id, name)
            .unwrap_or_else(|e| dispatch::fail_stop(&e));
        if !pending.is_empty() {
            tracing::info!(
                instance = name,
                pending = pending.len(),
                "deliveries waiting in the ledger resume"
            );
        }
        let _ = self.parts.inputs.send(Input::Add {
            slot: Box::new(Slot::new(name, settings)),
            pending,
        });
        if self.remembered.get(name).is_some_and(|r| r.paused) {
            // An operator's pause outlives a restart.
            let _ = self.parts.inputs.send(Input::Pause(id));
        }
        self.instances
            .insert(name.to_owned(), Inst::new(id, settings));
        id
    }

    /// Loads and starts a new generation of `name`; on success it takes over from the one
    /// running (which drains and retires), on failure that one keeps serving.
    fn start_generation(
        &mut self,
        name: &str,
        id: InstanceId,
        want: &Want,
        checked: &crate::loader::Checked,
        key: Key,
    ) -> Result<(), String> {
        let wiring = Wiring {
            ingress: &self.parts.ingress,
            events: &self.parts.actor_events,
            ledger: &self.parts.ledger,
            clock: &self.parts.clock,
            policy: self.policy(),
            limits: Limits {
                max_message_size: self.parts.config.host.max_message_size,
                hop_limit: self.parts.config.host.hop_limit,
            },
        };
        let inst = self.instances.get_mut(name).expect("registered");
        let number = inst.generations + 1;
        let (commands, instance) = (self.commands.clone(), name.to_owned());
        let first_call: actor::FirstCall = Box::new(move || {
            let _ = commands.send(Command::FirstCall {
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
            &mut self.parts.quarantine,
            Some(first_call),
        );
        let (generation, actor) = match started {
            Ok(started) => started,
            Err(error) => {
                inst.failed = Some(key);
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
        self.parts.events.emit(event);
        if let (Some(old), Some(old_actor)) = (old, old_actor) {
            self.retire(name, old, old_actor);
        }
        Ok(())
    }

    /// Hands `actor` to the dispatcher for `id`; returns the one it replaces.
    fn run_actor(&self, id: InstanceId, actor: Option<actor::Actor>) -> Option<actor::Actor> {
        let (reply, answer) = bounded(1);
        self.parts
            .inputs
            .send(Input::Run {
                instance: id,
                actor,
                reply,
            })
            .ok()?;
        answer.recv().ok().flatten()
    }

    /// Stops instance `name`: its actor finishes the call in hand; its deliveries wait.
    fn stop(&mut self, name: &str, reason: StopReason) {
        let Some(inst) = self.instances.get_mut(name) else {
            return;
        };
        let Some(old) = inst.running.take() else {
            return;
        };
        let id = inst.id;
        let old_actor = self.run_actor(id, None);
        self.parts.events.emit(EventKind::Stopped {
            instance: name.to_owned(),
            reason,
        });
        if let Some(old_actor) = old_actor {
            self.retire(name, old, old_actor);
        }
    }

    /// Drains and retires a generation on a thread of its own.
    fn retire(&mut self, name: &str, old: Generation, actor: actor::Actor) {
        if old.armed.is_some() {
            self.parts.quarantine.disarm(&old.key.sha256, name);
        }
        let settings = &self.instances[name].settings;
        let deadlines = Deadlines {
            total: settings.ack_timeout + settings.hang_grace + settings.shutdown_timeout,
            shutdown: settings.shutdown_timeout,
        };
        self.parts.events.emit(EventKind::Draining {
            instance: name.to_owned(),
            generation: old.number,
        });
        if let Some(inst) = self.instances.get_mut(name) {
            inst.draining.push(old.number);
        }
        let commands = self.commands.clone();
        let (name, number) = (name.to_owned(), old.number);
        match generation::retire(
            actor,
            old,
            deadlines,
            self.parts.clock.clone(),
            move |how| {
                let _ = commands.send(Command::Retired {
                    name,
                    generation: number,
                    how,
                });
            },
        ) {
            Ok(thread) => self.retiring.push(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a retire thread; the generation is left running its call")
            }
        }
    }

    /// The routing snapshot for `wants`; an instance whose topics changed is evented.
    fn route(&mut self, wants: &BTreeMap<String, Want>) {
        let mut patterns: BTreeMap<InstanceId, Vec<Pattern>> = BTreeMap::new();
        for (name, inst) in &mut self.instances {
            let topics = wants
                .get(name)
                .map(|w| w.topics.clone())
                .unwrap_or_default();
            if inst.topics != topics {
                if inst.running.is_some() && !inst.topics.is_empty() && !topics.is_empty() {
                    self.parts.events.emit(EventKind::Updated {
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
        self.parts.ingress.set_routing(Routing::new(&patterns));
    }
}
