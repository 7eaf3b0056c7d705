//! The front: the product's use cases as plain typed Rust, shaped by no transport. Publish
//! (one message or a batch, idempotency keys), the daemon's and every instance's status (one
//! joined [`InstanceStatus`]), a message's history, dead letters a page at a time, replay,
//! purge and forget, reload, pause and resume, the log level, and a watch of the events.
//!
//! Every API is an adapter on top of it: `control/` maps these calls and their typed results
//! and errors to protobuf and gRPC status codes and back, and decides who may call what;
//! another API (metrics, GraphQL) would map the same calls. Nothing here knows protobuf,
//! tonic or a peer.
//!
//! The calls that ask the engine's threads or the ledger block: async callers run them on
//! blocking threads. [`Front::publish`] does not: its [`Submitted`] is finished with
//! `done().await` or `wait()`.

mod messages;
mod status;
mod watch;

use std::sync::Arc;

use crate::{
    config::Durability,
    engine::Engine,
    ledger::LedgerError,
    loader, metrics,
    quote::quote,
    supervisor::{ActRefused, ReloadRefused},
};

pub use crate::{
    config::{Change, Plan},
    ingress::{NewMessage, PublishRefused, Published, Submitted},
    ledger::{DeadLetter, Forget, Origin},
    outcomes::{OutcomeKind, Outcomes},
    supervisor::{Applied, StartFailure},
};
pub use messages::{
    AttemptHistory, AttemptOutcome, Cursor, DEFAULT_PAGE, DeadLetterPage, DeliveryHistory,
    DeliveryStage, MAX_PAGE, MessageHistory, PREVIEW, PageRequest, Pick,
};
pub use status::{
    CircuitState, DaemonStatus, InstanceState, InstanceStatus, Instances, LedgerStatus,
    Observation, UnknownState,
};
pub use watch::{WATCH_BUFFER, Watch, WatchEnd, WatchStep};

/// Sets the daemon's log filter; returns the filter now in force, or why the one given is
/// refused.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Why an operator's call was refused (nothing changed). Each variant says, by itself,
/// whether the caller asked for something wrong, something missing, or the daemon could not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OperateError {
    /// A replay or purge that names nothing (it must not mean everything).
    #[error("name an instance or message ids, or ask for all of them")]
    NothingPicked,
    /// A forget that names no instance.
    #[error("name the instance to forget")]
    NoInstanceNamed,
    /// A replay or purge naming an instance this daemon does not know: neither registered
    /// in this run nor holding dead letters (a mistyped name must not read as "nothing to
    /// do").
    #[error("no instance {} is subscribed, running or has dead letters", quote(.0))]
    UnknownInstance(String),
    /// A message id not given out yet.
    #[error("no message {id} has been accepted yet (the next id is {next})")]
    NotYetAccepted { id: u64, next: u64 },
    /// A message accepted once and no longer held.
    #[error(
        "message {0} was accepted and is no longer in the ledger: every delivery of it ended \
         (acked, or purged by an operator) and its record was removed — or it matched no \
         instance and was never stored"
    )]
    MessageGone(u64),
    /// A log filter that does not parse.
    #[error("{0}")]
    LogLevel(String),
    /// A reload refused (the last good configuration keeps running).
    #[error(transparent)]
    Reload(#[from] ReloadRefused),
    /// An act on an instance (pause, resume, forget) refused.
    #[error(transparent)]
    Act(#[from] ActRefused),
    /// The ledger could not do it.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Dead letters back in the queues of configured instances (they go out at once).
    pub queued: u64,
    /// Dead letters moved back for instances not configured now (they wait in the ledger).
    pub waiting: u64,
}

/// The daemon's use cases, on one running engine.
#[derive(Clone)]
pub struct Front {
    engine: Arc<Engine>,
    durability: Durability,
    log_level: SetLogLevel,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Front {
    /// The front of `engine`, which runs with `durability` (said in the status) and whose
    /// log filter `log_level` sets.
    pub fn new(engine: Arc<Engine>, durability: Durability, log_level: SetLogLevel) -> Self {
        Self {
            engine,
            durability,
            log_level,
        }
    }

    /// Publishes a batch as one submission, keyed or not (the ingress validates, checks the
    /// limits, deduplicates the keys within `dedupe_window`, routes and records it). Every
    /// message is answered once the ledger recorded the batch: finish the [`Submitted`] with
    /// `done().await` or `wait()`, one `Result<Published, PublishRefused>` per message, in order.
    pub fn publish(&self, batch: Vec<NewMessage>) -> Submitted {
        self.engine.ingress().submit(batch)
    }

    /// The largest message the ingress takes (payload, headers and key), in bytes: a
    /// transport sizes its own limits from it.
    pub fn max_message_size(&self) -> u64 {
        self.engine.ingress().max_message_size()
    }

    /// The daemon at a glance, every instance joined (without dead letters: a status never
    /// asks the ledger, so it answers whatever the ledger's state).
    pub fn status(&self) -> DaemonStatus {
        let engine = &self.engine;
        let view = engine.supervisor().view();
        let snapshot = engine.snapshot();
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            uptime: engine.uptime(),
            config_path: view.config.clone(),
            config_sha256: view.config_sha256.clone(),
            durability: self.durability,
            unrouted: engine.ingress().unrouted(),
            ledger: LedgerStatus {
                counts: engine.ledger().counts(),
                commits: engine.ledger().stats(),
                lost: engine.lost(),
            },
            instances: self.join(&view, &snapshot, None),
        }
    }

    /// Everything the metrics show, read at once: the status (the same numbers `ctl status`
    /// and `ctl plugins` show), the libraries retained, the events counted by kind, the
    /// watchers, and each instance's histograms.
    pub fn observe(&self) -> Observation {
        let engine = &self.engine;
        let status = self.status();
        let histograms = status
            .instances
            .iter()
            .filter_map(|i| {
                let id = engine.instance(&i.name)?;
                Some((i.name.clone(), metrics::instance_histograms(id)))
            })
            .collect();
        Observation {
            status,
            retained: loader::retained(),
            events: engine.events().counts(),
            watchers: metrics::watchers(),
            histograms,
        }
    }

    /// Every instance the supervisor shows, joined with the dispatcher's counters and what
    /// the engine learnt at start.
    fn join(
        &self,
        view: &crate::supervisor::SupervisorView,
        snapshot: &crate::dispatch::Snapshot,
        dead_letters: Option<&std::collections::BTreeMap<String, u64>>,
    ) -> Vec<InstanceStatus> {
        let engine = &self.engine;
        let max_backlog = |name: &str| engine.max_backlog(name);
        let start = status::StartFacts {
            crashed: engine.crashed(),
            max_backlog: &max_backlog,
        };
        status::join(view, snapshot, dead_letters, &start)
    }

    /// Every instance in full (with its dead letters), and the libraries still mapped after
    /// they were unloaded.
    ///
    /// # Errors
    /// [`OperateError::Ledger`] when the ledger cannot count the dead letters.
    pub fn instances(&self) -> Result<Instances, OperateError> {
        let view = self.engine.supervisor().view();
        let snapshot = self.engine.snapshot();
        let dead_letters = self.engine.ledger().dead_letter_counts()?;
        Ok(Instances {
            instances: self.join(&view, &snapshot, Some(&dead_letters)),
            retained: loader::retained(),
        })
    }

    /// Message `id` and every delivery of it, as the ledger holds them.
    ///
    /// # Errors
    /// [`OperateError::NotYetAccepted`] or [`OperateError::MessageGone`] when the ledger does
    /// not hold it; [`OperateError::Ledger`] when it cannot read it.
    pub fn show_message(&self, id: u64) -> Result<MessageHistory, OperateError> {
        let ledger = self.engine.ledger();
        let message = ledger.load(id)?;
        let deliveries = ledger.history(id)?;
        let Some(message) = message else {
            let next = self.engine.ingress().next_id();
            return Err(if id >= next {
                OperateError::NotYetAccepted { id, next }
            } else {
                OperateError::MessageGone(id)
            });
        };
        Ok(messages::history(id, &message, deliveries))
    }

    /// One page of dead letters, in (message, instance) order.
    ///
    /// # Errors
    /// [`OperateError::Ledger`] when the ledger cannot list them.
    pub fn dead_letters(&self, request: PageRequest) -> Result<DeadLetterPage, OperateError> {
        let (limit, filter) = request.filter();
        let listed = self.engine.ledger().dead_letters(&filter)?;
        Ok(messages::page(listed, limit))
    }

    /// Replays dead letters: failures reset, history kept; the ones of configured instances
    /// go out again at once.
    ///
    /// # Errors
    /// [`OperateError::NothingPicked`], [`OperateError::UnknownInstance`], or
    /// [`OperateError::Ledger`] when the ledger cannot do it.
    pub fn replay(&self, pick: Pick) -> Result<Replay, OperateError> {
        let selection = pick.selection()?;
        self.known(selection.instance.as_deref())?;
        let (queued, waiting) = self.engine.replay(&selection)?;
        Ok(Replay { queued, waiting })
    }

    /// Removes dead letters for good; returns how many.
    ///
    /// # Errors
    /// As [`Front::replay`].
    pub fn purge(&self, pick: Pick) -> Result<u64, OperateError> {
        let selection = pick.selection()?;
        self.known(selection.instance.as_deref())?;
        Ok(self.engine.ledger().purge(&selection)?)
    }

    /// Ends instance `name`'s subscription and its waiting deliveries for good (dead letters
    /// or gone, as `how` says); the ones in flight finish. Returns how many.
    ///
    /// # Errors
    /// [`OperateError::NoInstanceNamed`] for an empty name; [`OperateError::Act`] when
    /// `plugins.toml` configures it, its autoloaded library is still in `plugin_dir`, it is
    /// unknown, or the ledger cannot do it.
    pub fn forget(&self, name: &str, how: Forget) -> Result<u64, OperateError> {
        if name.is_empty() {
            return Err(OperateError::NoInstanceNamed);
        }
        Ok(self.engine.forget(name, how)?)
    }

    /// Pauses (`true`) or resumes an instance: nothing more is handed to it until resumed,
    /// across restarts too.
    ///
    /// # Errors
    /// [`OperateError::Act`] for an unknown instance or when the ledger cannot record it.
    pub fn pause(&self, name: &str, paused: bool) -> Result<(), OperateError> {
        Ok(self.engine.pause(name, paused)?)
    }

    /// Reads the configuration and `plugin_dir` again and applies them, waiting for the
    /// result. `expected`: refuse unless the file has this SHA-256 (an editor's guard against
    /// a concurrent change). `instance`: also release its quarantine and create it anew.
    ///
    /// # Errors
    /// [`OperateError::Reload`] when the configuration is invalid, changed, names no such
    /// instance, or the daemon is stopping (the last good configuration keeps running).
    pub fn reload(
        &self,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
    ) -> Result<Applied, OperateError> {
        Ok(self.engine.supervisor().reload(expected, instance)?)
    }

    /// Sets the daemon's log filter (`info`, `plugind=debug,warn`, …); returns the filter
    /// now in force.
    ///
    /// # Errors
    /// [`OperateError::LogLevel`] when the filter does not parse.
    ///
    /// A directive naming an instance (`enricher=debug`) applies to that instance's plugin
    /// events (target `plugin::enricher`), which reach the plugin's own level checks.
    pub fn set_log_level(&self, level: &str) -> Result<String, OperateError> {
        let level = self.instance_directives(level);
        let now = (self.log_level)(&level).map_err(OperateError::LogLevel)?;
        tracing::info!(level = %now, "log level changed");
        Ok(now)
    }

    /// `level` with each directive whose target is an instance's name aimed at that
    /// instance's plugin events (`plugin::NAME`).
    fn instance_directives(&self, level: &str) -> String {
        level
            .split(',')
            .map(|directive| match directive.trim().split_once('=') {
                Some((target, level))
                    if !target.contains("::") && self.engine.instance(target).is_some() =>
                {
                    format!("plugin::{target}={level}")
                }
                _ => directive.trim().to_owned(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A watch of the events: the ones kept now first, then each new one; ended when it
    /// falls more than [`WATCH_BUFFER`] behind or the daemon stops.
    pub fn watch(&self) -> Watch {
        Watch::new(self.engine.events().subscribe(WATCH_BUFFER))
    }

    /// Refuses an instance this daemon does not know: neither registered in this run nor
    /// holding dead letters. Replaying or purging it would answer 0, as if a mistyped name
    /// were an instance with nothing to do.
    fn known(&self, instance: Option<&str>) -> Result<(), OperateError> {
        let Some(name) = instance else {
            return Ok(());
        };
        if self.engine.instance(name).is_some()
            || self
                .engine
                .ledger()
                .dead_letter_counts()?
                .contains_key(name)
        {
            return Ok(());
        }
        Err(OperateError::UnknownInstance(name.to_owned()))
    }
}
