//! The delivery engine, assembled: the ledger recovered for the instances the configuration
//! and `plugin_dir` ask for, the ingress, the dispatcher on its thread, and the
//! [supervisor](crate::supervisor) that loads and starts each instance (and later swaps,
//! stops and retires them as files and configuration change). An instance that fails to
//! start is reported and its deliveries wait in the ledger; the rest runs. `plugind run`
//! puts gRPC in front of [`Engine::ingress`].

use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::unbounded;

use crate::{
    backlog::Backlog,
    clock::{Clock, SystemClock},
    config::{Config, WatchMode},
    delivery::Rules,
    dispatch::{Collaborators, Dispatcher, Slot, Snapshot, StopReport},
    events::{EventKind, Events},
    ingress::Ingress,
    ledger::{FailStop, Forget, Ledger, LedgerError, Selection},
    loader::{Policy, ProbeCommand},
    notify::Notifier,
    quarantine::Quarantine,
    routing::{InstanceId, Registry, Routing},
    supervisor::{ActRefused, Supervisor, SupervisorDeps, SupervisorHandle, desired},
    watch::{self, Watcher},
};

pub use crate::supervisor::StartFailure;

/// How long a library written in place must stay unchanged before it is loaded.
const SETTLE: Duration = Duration::from_millis(100);

/// How the engine runs beyond its configuration.
#[derive(Clone)]
pub struct EngineOptions {
    pub clock: Arc<dyn Clock>,
    /// How unpinned libraries are probed before loading (`None`: not probed).
    pub probe: Option<ProbeCommand>,
    /// Watch `plugin_dir` and the config file (hot plug) as `[host] watch` says.
    pub watch: bool,
    /// The service manager to notify (reloads, status, watchdog).
    pub notifier: Option<Arc<Notifier>>,
    /// Where a storage failure the engine cannot go on from goes (the daemon's assembly
    /// gives the one its ledger has: the binary exits 1). `None`: the failing thread ends.
    pub fail_stop: Option<FailStop>,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("probe", &self.probe)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl EngineOptions {
    /// The daemon's: the real clock, probing with its own executable, watching.
    pub fn daemon() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            probe: ProbeCommand::current_exe(),
            watch: true,
            notifier: Notifier::from_env().map(Arc::new),
            fail_stop: None,
        }
    }
}

/// Why the engine could not start at all (a single instance failing is no such reason).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot use {}: {source}", path.display())]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A running engine.
#[derive(Debug)]
pub struct Engine {
    ingress: Arc<Ingress>,
    dispatcher: Dispatcher,
    ledger: Arc<dyn Ledger>,
    registry: Arc<Registry>,
    events: Arc<Events>,
    supervisor: SupervisorHandle,
    /// The dispatcher's and the supervisor's threads, until [`Engine::stop`] joins them.
    threads: Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
    started: std::time::Instant,
    /// What the ledger found lost at start (messages answered OK it no longer holds).
    lost: Option<crate::ledger::Lost>,
    /// Attempts a previous run left in flight, charged `crash` at start, by instance.
    crashed: std::collections::BTreeMap<String, u64>,
    backlog: Arc<Backlog>,
}

impl Engine {
    /// Starts the engine for `config`.
    ///
    /// # Errors
    /// [`EngineError`] when the ledger or the state dir cannot be used or a thread cannot
    /// start.
    pub fn start(
        config: &Config,
        ledger: Arc<dyn Ledger>,
        options: EngineOptions,
    ) -> Result<(Self, Vec<StartFailure>), EngineError> {
        let events = Events::new(options.clock.clone());
        // Watching starts before the first scan: nothing written in between is missed.
        let watch = if options.watch {
            start_watching(config, &events)
        } else {
            None
        };
        let policy = Policy {
            trusted_owners: config.host.trusted_owner_uids.clone(),
            sha256: None,
            probe: options.probe.clone(),
        };
        let (libraries, refusals) = desired::Libraries::scan(&config.host.plugin_dir, &policy);
        for refusal in refusals {
            events.emit(EventKind::Failed {
                instance: None,
                path: Some(refusal.path),
                error: refusal.error,
            });
        }
        // Subscriptions outlive a missing library and a restart: the ledger remembers them.
        let remembered = ledger.remembered()?;
        let wants = desired::wants(config, &libraries, &remembered);
        let rules: Vec<(String, Rules)> = wants
            .iter()
            .map(|(name, want)| (name.clone(), Rules::from(&want.settings)))
            .collect();
        let mut recovered = ledger.recover(&rules, options.clock.now())?;
        if recovered.unclean || !recovered.pending.is_empty() || recovered.orphaned > 0 {
            tracing::info!(
                pending = recovered.pending.len(),
                crashed = recovered.crashed,
                orphaned = recovered.orphaned,
                unclean = recovered.unclean,
                "ledger recovered"
            );
        }
        // Said loudly (the ledger logged it as an error): an event, and the status.
        let recovered_lost = recovered.lost;
        let recovered_crashed = std::mem::take(&mut recovered.crashed_by);
        if let Some(lost) = recovered.lost {
            events.emit(EventKind::LedgerLost {
                first: lost.first,
                last: lost.last,
            });
        }
        // A library that crashed the previous run while loading counts towards quarantine.
        let quarantine_dir = config.host.state_dir.join(crate::quarantine::DIR);
        let quarantine = Quarantine::open(&config.host.state_dir)
            .and_then(|mut q| {
                q.count(&recovered.crashed_in)?;
                Ok(q)
            })
            .map_err(|source| EngineError::State {
                path: quarantine_dir,
                source,
            })?;
        let registry = Arc::new(Registry::new(wants.keys().cloned().collect()));
        let backlog = Arc::new(Backlog::new(
            &wants
                .iter()
                .map(|(name, want)| (name.clone(), want.settings.max_backlog))
                .collect::<Vec<_>>(),
        ));
        let engine_backlog = backlog.clone();
        let (dispatcher, inbox) = Dispatcher::new();
        let (actor_events, actor_events_rx) = unbounded();
        // Idempotency keys still within `dedupe_window` by the engine's clock: a key survives
        // a restart, whichever way it came in.
        let window = config.host.dedupe_window;
        let known_keys = ledger.keys(crate::clock::Timestamp(
            options
                .clock
                .now()
                .0
                .saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        ));
        let ingress = Arc::new(Ingress::new(
            Routing::default(),
            recovered.next_id.max(1),
            ledger.clone(),
            Arc::new(dispatcher.clone()),
            backlog.clone(),
            config.host.max_message_size,
            options.clock.clone(),
            events.clone(),
            window,
            known_keys,
        ));
        ingress.set_unrouted(config.host.unrouted);
        let slots = wants
            .iter()
            .map(|(name, want)| Slot::new(name, &want.settings))
            .collect();
        let thread = inbox.spawn(
            Collaborators {
                clock: options.clock.clone(),
                ledger: ledger.clone(),
                backlog: backlog.clone(),
                ingress: ingress.clone(),
                events: events.clone(),
                fail_stop: options.fail_stop.clone().unwrap_or_default(),
            },
            slots,
            recovered.pending,
            actor_events_rx,
        )?;
        let mut supervisor = Supervisor::new(
            SupervisorDeps {
                config: config.clone(),
                libraries,
                quarantine,
                registry: registry.clone(),
                dispatcher: dispatcher.clone(),
                fail_stop: options.fail_stop.clone().unwrap_or_default(),
                actor_events,
                ingress: ingress.clone(),
                ledger: ledger.clone(),
                backlog,
                clock: options.clock.clone(),
                probe: options.probe.clone(),
                events: events.clone(),
                watch,
                notifier: options.notifier.clone(),
            },
            &wants,
            remembered,
        );
        // What waits for instances whose subscriptions ended is shown (`removed`), not hidden.
        supervisor.adopt(&recovered.orphaned_in);
        // The first reconcile runs here: the caller learns which instances did not start.
        let failures = supervisor.reconcile();
        let handle = supervisor.handle();
        let supervisor_thread = supervisor.spawn()?;
        Ok((
            Self {
                ingress,
                dispatcher,
                ledger,
                registry,
                events,
                supervisor: handle,
                threads: Mutex::new(Some((thread, supervisor_thread))),
                started: std::time::Instant::now(),
                lost: recovered_lost,
                crashed: recovered_crashed,
                backlog: engine_backlog,
            },
            failures,
        ))
    }

    /// Where messages come in.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The id of instance `name`.
    pub fn instance(&self, name: &str) -> Option<InstanceId> {
        self.registry.id(name)
    }

    /// The events of hot plug (history and subscriptions).
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// How long it has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Messages answered OK that the ledger no longer held at start, if any.
    pub fn lost(&self) -> Option<crate::ledger::Lost> {
        self.lost
    }

    /// Attempts the previous run left in flight, charged `crash` at start, by instance.
    pub fn crashed(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.crashed
    }

    /// The `max_backlog` of instance `name`, in bytes (`None`: not registered).
    pub fn max_backlog(&self, name: &str) -> Option<u64> {
        self.registry.id(name).map(|id| self.backlog.limit(id))
    }

    /// Reloads, waits and returns the result (the `Reload` entry point).
    pub fn supervisor(&self) -> &SupervisorHandle {
        &self.supervisor
    }

    /// The current counters and states.
    pub fn snapshot(&self) -> Snapshot {
        self.dispatcher.snapshot()
    }

    /// Replays dead letters: failures reset, history kept; the ones of configured instances
    /// go out again at once. Returns (back in a queue, waiting for an instance not
    /// configured).
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot do it.
    pub fn replay(&self, selection: &Selection) -> Result<(u64, u64), LedgerError> {
        let replayed = self.ledger.replay(selection, self.ingress.clock().now())?;
        let queued = replayed.pending.len() as u64;
        if queued > 0 {
            self.dispatcher.restore(replayed.pending);
        }
        Ok((queued, replayed.waiting))
    }

    /// Ends instance `name`'s subscription and its waiting deliveries for good (dead
    /// letters or gone); the ones in flight finish. Returns how many.
    ///
    /// # Errors
    /// [`ActRefused`] when `plugins.toml` configures it, its autoloaded library is still in
    /// `plugin_dir`, it is unknown, or the ledger cannot do it.
    pub fn forget(&self, name: &str, how: Forget) -> Result<u64, ActRefused> {
        self.supervisor.forget(name, how)
    }

    /// An operator pauses (`true`) or resumes an instance: nothing more is handed to it
    /// until resumed, across restarts too.
    ///
    /// # Errors
    /// [`ActRefused`] for an unknown instance or when the ledger cannot record it.
    pub fn pause(&self, name: &str, paused: bool) -> Result<(), ActRefused> {
        self.supervisor.pause(name, paused)
    }

    /// Graceful stop: stop accepting, let every actor finish its call in hand, release the
    /// rest as `shutdown` (no failure), shut the instances down; after `grace`, abandon the
    /// ones still busy and name them.
    ///
    /// Once: later calls (or calls while one runs) return an empty report.
    pub fn stop(&self, grace: Duration) -> StopReport {
        let started = std::time::Instant::now();
        let Some((dispatcher, supervisor)) = self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        else {
            return StopReport::default();
        };
        // Nothing more is accepted from here on, whatever else the stop waits for.
        self.ingress.close();
        // No more swaps: what is draining finishes below, with everything else. (The
        // supervisor never waits for the file watcher: dropping it returns at once.)
        let retiring = self.supervisor.stop();
        let _ = supervisor.join();
        let report = self.dispatcher.stop(grace);
        let _ = dispatcher.join();
        for thread in retiring {
            while !thread.is_finished() && started.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.events.close();
        // Everything is recorded: the next start charges nothing.
        self.ledger.close();
        report
    }
}

/// The watcher of `plugin_dir` and the config file, as `[host] watch` says (`auto` falls
/// back to polling where change events cannot be had); `None`, reported, if neither works.
fn start_watching(
    config: &Config,
    events: &Events,
) -> Option<(Watcher, crossbeam_channel::Receiver<watch::FileChange>)> {
    let start = |mode| Watcher::start(&config.host.plugin_dir, &config.source, mode, SETTLE);
    let started = match start(watch::Detection::from(config.host.watch)) {
        Err(e) if config.host.watch == WatchMode::Auto => {
            tracing::warn!(error = %e, "no change events here; polling plugin_dir and the config instead");
            start(watch::Detection::Poll)
        }
        started => started,
    };
    started
        .map_err(|e| {
            events.emit(EventKind::Failed {
                instance: None,
                path: Some(config.host.plugin_dir.clone()),
                error: format!(
                    "not watching for changes (hot plug is off; SIGHUP still reloads): {e}"
                ),
            });
        })
        .ok()
}
