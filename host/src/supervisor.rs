//! The supervisor: the desired state (`plugins.toml` and the libraries in `plugin_dir`)
//! against the running state, reconciled one change at a time on one thread.
//!
//! It is fed by the directory watcher, SIGHUP and [`SupervisorHandle::reload`]; it loads,
//! swaps, stops, retires and quarantines generations, keeps the routing snapshot in step,
//! and emits an [event](crate::events) for every transition. Plugin code never runs on its
//! loop: `new` runs on a thread of its own (with `init_timeout`), a replaced generation is
//! drained and shut down on a retire thread.
//!
//! This file is its interface and its state; the work is split by job: the thread's loop
//! (`event_loop`), the reload protocol (`reload`), reconcile (`reconcile`), an operator's
//! acts on one instance (`acts`), beside the desired state (`desired`), one generation
//! (`generation`) and the published view (`view`).
//!
//! Invariants:
//! - An instance name gets one id for the life of the process (dispatcher slot, backlog
//!   entry, ledger key); a stopped instance keeps its slot, and its deliveries wait there.
//! - A failed load changes nothing that runs: the previous generation (if any) keeps
//!   serving. The same bytes with the same config are not tried again until an operator
//!   reloads (or they change).
//! - The routing snapshot names every instance that should run, loaded or not (docs/design.md §7:
//!   the target set is fixed at acceptance); a dispatcher slot exists before a route to it.
//! - The supervisor alone decides that bytes are the same ones, nothing to do (a library:
//!   its sha256 against the one checked; the config: against what runs and what was refused
//!   last): the watcher reports that a file changed, never what it holds.
//! - A library file is read only at the first scan, when the watcher reports it, and when
//!   `plugin_dir` is rescanned (an operator's reload, SIGHUP, or a config change of
//!   `plugin_dir` or `trusted_owner_uids`); a change of `plugins.toml` alone reads none.

mod acts;
pub mod desired;
mod event_loop;
pub mod generation;
mod reconcile;
mod reload;
mod view;

pub use view::{InstanceState, InstanceView, SupervisorView};

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, thread::JoinHandle, time::Duration};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde::Serialize;

use crate::{
    actor,
    backlog::Backlog,
    clock::Clock,
    config::{self, Config, Settings},
    dispatch::Dispatcher,
    events::{Events, Retirement},
    ingress::Ingress,
    ledger::{FailStop, Forget, Ledger, LedgerError, Origin, Remembered},
    loader::{LoadError, Policy, ProbeCommand},
    notify::Notifier,
    quarantine::Quarantine,
    quote::quote,
    routing::{InstanceId, Registry},
    topic::Pattern,
    watch::{FileChange, Watcher},
};

use desired::{Libraries, NoProvider, Want};
use generation::{Generation, Key};
use reload::Trigger;

/// How often the loop wakes without a command (quarantine markers).
const TICK: Duration = Duration::from_millis(100);

/// An instance that did not start, and why.
#[derive(Debug, Clone, Serialize)]
pub struct StartFailure {
    pub instance: String,
    #[serde(serialize_with = "as_text")]
    pub error: StartError,
}

/// Why a generation of an instance did not start (what ran before, if anything, keeps
/// serving). Its text is what operators see: the event, the status's last error, the
/// reload's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    /// No usable library in `plugin_dir` provides its plugin.
    #[error(transparent)]
    NoLibrary(#[from] NoProvider),
    /// The daemon exited uncleanly while loading these bytes too often.
    #[error(
        "{} is quarantined: the daemon exited uncleanly {unclean_exits} times while loading \
         it; replace the file or reload the instance to try again",
        path.display()
    )]
    Quarantined { path: PathBuf, unclean_exits: u32 },
    /// The library's bytes are not the ones its `sha256` pin names.
    #[error(transparent)]
    Pin(Arc<LoadError>),
    /// The library could not be loaded (probe, `dlopen`, layout, version, manifest).
    #[error(transparent)]
    Load(Arc<LoadError>),
    /// The plugin's `new` failed or panicked.
    #[error(transparent)]
    New(Arc<LoadError>),
    /// The plugin refuses the instance's `config` table (plugind-api 1.1 checks it before
    /// `new`): where in `plugins.toml`, and why.
    #[error("{}:{problem}", file.display())]
    Config {
        file: PathBuf,
        problem: crate::config::Problem,
    },
    /// The plugin's `new` did not return within `init_timeout`.
    #[error(
        "`new` did not finish within init_timeout ({}); its thread is abandoned",
        humantime::format_duration(*.0)
    )]
    InitTimeout(Duration),
    /// No thread could be started for `new`.
    #[error("cannot start a thread for `new`: {0}")]
    NewThread(Arc<std::io::Error>),
    /// No thread could be started for its actor.
    #[error("cannot start its thread: {0}")]
    ActorThread(Arc<std::io::Error>),
}

/// A [`StartError`] serialized as its text.
fn as_text<S: serde::Serializer>(error: &StartError, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(error)
}

/// What a reload applied.
#[derive(Debug, Clone, Serialize)]
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
pub enum ReloadRefused {
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
enum SupervisorCommand {
    /// Read the configuration (and `plugin_dir`, as `trigger` says) again and apply them.
    /// `expected`: refuse unless the file has this sha256. `instance`: also release its quarantine and
    /// re-instantiate it. Without `reply` (SIGHUP) the result is only logged and evented.
    Reload {
        trigger: Trigger,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        reply: Option<Sender<Result<Applied, ReloadRefused>>>,
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
    commands: Sender<SupervisorCommand>,
    view: view::View,
}

impl std::fmt::Debug for SupervisorCommand {
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
    /// [`ReloadRefused`] when the configuration is invalid, is not the expected one, or names no
    /// such instance; the last good one keeps running.
    pub fn reload(
        &self,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
    ) -> Result<Applied, ReloadRefused> {
        let (reply, answer) = bounded(1);
        self.commands
            .send(SupervisorCommand::Reload {
                trigger: Trigger::Operator,
                expected,
                instance,
                reply: Some(reply),
            })
            .map_err(|_| ReloadRefused::Stopping)?;
        answer.recv().map_err(|_| ReloadRefused::Stopping)?
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
            .send(SupervisorCommand::Pause {
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
            .send(SupervisorCommand::Forget {
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
        let _ = self.commands.send(SupervisorCommand::Reload {
            trigger: Trigger::Signal,
            expected: None,
            instance: None,
            reply: None,
        });
    }

    /// Stops the supervisor; returns the retire threads still running.
    pub fn stop(&self) -> Vec<JoinHandle<()>> {
        let (reply, answer) = bounded(1);
        if self
            .commands
            .send(SupervisorCommand::Stop { reply })
            .is_err()
        {
            return Vec::new();
        }
        answer.recv().unwrap_or_default()
    }
}

/// What the supervisor holds and drives: its desired state as first read (the
/// configuration, the libraries of `plugin_dir`, the quarantine), the engine's parts it keeps
/// in step (registry, dispatcher inputs, ingress, ledger, backlog, events), the clock, the
/// probe command, the watch of `plugin_dir` and the config file, and the service manager.
pub struct SupervisorDeps {
    pub config: Config,
    pub libraries: Libraries,
    pub quarantine: Quarantine,
    pub registry: Arc<Registry>,
    pub dispatcher: Dispatcher,
    /// Where a storage failure the supervisor cannot go on from goes (the daemon's one hook).
    pub fail_stop: FailStop,
    pub actor_events: Sender<actor::ActorEvent>,
    pub ingress: Arc<Ingress>,
    pub ledger: Arc<dyn Ledger>,
    pub backlog: Arc<Backlog>,
    pub clock: Arc<dyn Clock>,
    pub probe: Option<ProbeCommand>,
    pub events: Arc<Events>,
    pub watch: Option<(Watcher, Receiver<FileChange>)>,
    /// The service manager, when one started the daemon.
    pub notifier: Option<Arc<Notifier>>,
}

impl std::fmt::Debug for SupervisorDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorDeps")
            .field("config", &self.config.source)
            .field("libraries", &self.libraries)
            .finish_non_exhaustive()
    }
}

/// One instance as the supervisor holds it: its id, the generation running and draining,
/// its last failure, its subscription (`dispatch` keeps its own per-instance state).
#[derive(Debug)]
struct Supervised {
    id: InstanceId,
    running: Option<Generation>,
    settings: Settings,
    topics: Vec<Pattern>,
    /// The last load that failed (not tried again until what it is made of changes, or an
    /// operator reloads), and the error reported last (reported once).
    failed: Option<(Key, StartError)>,
    reported: Option<String>,
    /// The last failure is a quarantine.
    quarantined: bool,
    /// An operator asked for a new generation (`reload NAME`).
    renew: bool,
    generations: u32,
    /// Its deferred attempts, shared by all its generations (tokens outlive a swap).
    deferrals: Arc<crate::deferred::Deferrals>,
    /// Generations replaced or stopped and not yet retired.
    draining: Vec<u32>,
    /// Its subscription now (`None`: ended; its waiting deliveries stay until forgotten).
    subscribed: Option<Origin>,
    /// Whether a generation of it should run.
    run: bool,
    /// Whether its topics are known (see [`Want::topics_known`]).
    topics_known: bool,
}

impl Supervised {
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
            deferrals: crate::deferred::Deferrals::new(
                settings.max_in_flight as usize,
                settings.ack_timeout,
            ),
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
    deps: SupervisorDeps,
    instances: BTreeMap<String, Supervised>,
    retiring: Vec<JoinHandle<()>>,
    commands: Sender<SupervisorCommand>,
    receiver: Receiver<SupervisorCommand>,
    /// What the control plane reads, republished after every change.
    view: view::View,
    /// The configuration bytes refused last (a watcher event for them is not news).
    refused: Option<[u8; 32]>,
    /// The bytes applied last and what applying them changed: the answer to an operator's
    /// reload of exactly those bytes when the watcher applied them first (`ctl enable`
    /// writes the file, and the watcher may read it before the reload arrives).
    last_change: Option<([u8; 32], config::Plan)>,
    /// How many reconciles ran (one for a batch of watcher changes is enough).
    reconciles: u64,
    /// What the ledger remembers of each instance (subscriptions, pauses), as last written.
    remembered: BTreeMap<String, Remembered>,
    /// The last `STATUS=` sent, when, and the last watchdog ping.
    status: String,
    status_at: std::time::Instant,
    pinged: std::time::Instant,
}

impl Supervisor {
    /// The supervisor of `deps`, whose instances (the ones recovered) already have ids and
    /// dispatcher slots, running nothing yet; `remembered` is what the ledger keeps of
    /// instances (their subscriptions and pauses).
    pub fn new(
        deps: SupervisorDeps,
        recovered: &BTreeMap<String, Want>,
        remembered: BTreeMap<String, Remembered>,
    ) -> Self {
        let (commands, receiver) = crossbeam_channel::unbounded();
        let instances = recovered
            .iter()
            .map(|(name, want)| {
                let id = deps
                    .registry
                    .id(name)
                    .expect("recovered instances are registered");
                if remembered.get(name).is_some_and(|r| r.paused) {
                    // An operator's pause outlives a restart.
                    deps.dispatcher.pause(id);
                }
                (name.clone(), Supervised::new(id, &want.settings))
            })
            .collect();
        Self {
            deps,
            instances,
            retiring: Vec::new(),
            commands,
            receiver,
            view: view::View::default(),
            refused: None,
            last_change: None,
            reconciles: 0,
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
            trusted_owners: self.deps.config.host.trusted_owner_uids.clone(),
            sha256: None,
            probe: self.deps.probe.clone(),
        }
    }
}
