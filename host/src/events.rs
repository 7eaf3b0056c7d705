//! What happened to the daemon's instances and configuration, as events: each is logged,
//! numbered, kept in a bounded history, and sent to every subscriber (the control plane's
//! `Watch` stream).
//!
//! Subscribers get a bounded buffer each and are never waited for: one whose buffer is full
//! is dropped and marked [`EventSubscription::lagged`] (the control plane ends its stream with
//! RESOURCE_EXHAUSTED) — an event is never silently skipped for a subscriber that stays.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde::Serialize;

use crate::{
    circuit::CircuitState,
    clock::{Clock, Timestamp},
};

/// How many events the history keeps.
pub const HISTORY: usize = 1024;

/// How a generation left the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Retirement {
    /// Its library was unmapped.
    Unloaded,
    /// Its library stays mapped (a thread-local destructor or a thread of the plugin pins
    /// it); counted.
    Retained,
    /// Its call in hand or its `shutdown` outlived the deadline: thread and library retained.
    Abandoned,
}

/// Why an instance stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `enabled = false` in the configuration.
    Disabled,
    /// Its entry left the configuration.
    Removed,
    /// Its library left `plugin_dir` (or no longer provides it).
    LibraryGone,
    /// An autoloaded instance, while `autoload` is off or a table claims its plugin (it stays
    /// subscribed until forgotten).
    Autoload,
}

/// How a subscription ended (always an operator's act).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unsubscribed {
    /// Its table was removed from `plugins.toml` (its waiting deliveries stay until
    /// forgotten).
    Removed,
    /// `ctl forget`.
    Forgotten,
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A generation was loaded, instantiated and started.
    Loaded {
        instance: String,
        plugin: String,
        version: String,
        generation: u32,
        sha256: String,
        path: PathBuf,
    },
    /// A new generation took over between two messages.
    Swapped {
        instance: String,
        from: u32,
        to: u32,
        version: String,
    },
    /// A generation stopped taking messages and finishes its call in hand.
    Draining { instance: String, generation: u32 },
    /// A generation is gone.
    Retired {
        instance: String,
        generation: u32,
        how: Retirement,
    },
    /// Loading, instantiating or starting failed; what ran before keeps running.
    Failed {
        instance: Option<String>,
        path: Option<PathBuf>,
        error: String,
    },
    /// A library crashed the daemon while it was being instantiated, twice: it is not loaded
    /// until its bytes change or an operator reloads it.
    Quarantined {
        instance: String,
        path: PathBuf,
        sha256: String,
        unclean_exits: u32,
    },
    /// An instance stopped; its deliveries wait in the ledger.
    Stopped {
        instance: String,
        reason: StopReason,
    },
    /// An instance's subscription ended: nothing more is routed to it.
    Unsubscribed {
        instance: String,
        reason: Unsubscribed,
    },
    /// Waiting deliveries older than the instance's `max_age` were dead-lettered (reason
    /// `expired`).
    Expired { instance: String, count: u64 },
    /// Publishes that matched no instance (accepted and not stored, or refused with
    /// `unrouted = "refuse"`), at most one event a second: the last topic and how many.
    Unrouted { topic: String, count: u64 },
    /// An instance's routing or delivery settings changed in place.
    Updated {
        instance: String,
        topics: bool,
        settings: bool,
    },
    /// A new configuration was applied.
    ConfigApplied {
        path: PathBuf,
        sha256: String,
        /// `[host]` keys that changed but take effect at the next start.
        restart_required: Vec<String>,
    },
    /// A configuration was refused whole; the last good one keeps running.
    ConfigRefused { path: PathBuf, error: String },
    /// A delivery ended as a dead letter.
    DeadLettered {
        instance: String,
        id: u64,
        reason: String,
    },
    /// An operator ended an instance's waiting deliveries for good.
    Forgotten {
        instance: String,
        count: u64,
        purged: bool,
    },
    /// An instance's circuit changed: `closed`, `open` (tripped) or `paused` (by hand).
    Circuit {
        instance: String,
        state: CircuitState,
    },
    /// At start, the ledger no longer held messages that were answered OK (ids `first` to
    /// `last`): its write-ahead log was damaged or cut short.
    LedgerLost { first: u64, last: u64 },
}

impl EventKind {
    /// A one-line summary for the log.
    fn describe(&self) -> &'static str {
        match self {
            Self::Loaded { .. } => "instance loaded",
            Self::Swapped { .. } => "instance swapped to a new generation",
            Self::Draining { .. } => "generation draining",
            Self::Retired { .. } => "generation retired",
            Self::Failed { .. } => "load failed; what ran before keeps running",
            Self::Quarantined { .. } => {
                "library quarantined: it crashed the daemon while loading twice"
            }
            Self::Stopped { .. } => "instance stopped; its deliveries wait",
            Self::Updated { .. } => "instance updated",
            Self::ConfigApplied { .. } => "configuration applied",
            Self::ConfigRefused { .. } => "configuration refused; the last good one keeps running",
            Self::DeadLettered { .. } => "delivery dead-lettered",
            Self::Forgotten { .. } => "waiting deliveries forgotten",
            Self::Unsubscribed { .. } => "subscription ended: nothing more is routed to it",
            Self::Expired { .. } => "waiting deliveries older than max_age dead-lettered",
            Self::Unrouted { .. } => "published to a topic no instance subscribes to",
            Self::Circuit { .. } => "circuit changed",
            Self::LedgerLost { .. } => {
                "the ledger lost messages answered OK (damaged or cut short); see the ids"
            }
        }
    }

    /// The instance it concerns, if one.
    pub fn instance(&self) -> Option<&str> {
        match self {
            Self::Loaded { instance, .. }
            | Self::Swapped { instance, .. }
            | Self::Draining { instance, .. }
            | Self::Retired { instance, .. }
            | Self::Quarantined { instance, .. }
            | Self::Stopped { instance, .. }
            | Self::Updated { instance, .. }
            | Self::DeadLettered { instance, .. }
            | Self::Forgotten { instance, .. }
            | Self::Unsubscribed { instance, .. }
            | Self::Expired { instance, .. }
            | Self::Circuit { instance, .. } => Some(instance),
            Self::Failed { instance, .. } => instance.as_deref(),
            Self::ConfigApplied { .. }
            | Self::ConfigRefused { .. }
            | Self::Unrouted { .. }
            | Self::LedgerLost { .. } => None,
        }
    }

    /// Its kind, as serialized (`loaded`, `dead_lettered`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Loaded { .. } => "loaded",
            Self::Swapped { .. } => "swapped",
            Self::Draining { .. } => "draining",
            Self::Retired { .. } => "retired",
            Self::Failed { .. } => "failed",
            Self::Quarantined { .. } => "quarantined",
            Self::Stopped { .. } => "stopped",
            Self::Updated { .. } => "updated",
            Self::ConfigApplied { .. } => "config_applied",
            Self::ConfigRefused { .. } => "config_refused",
            Self::DeadLettered { .. } => "dead_lettered",
            Self::Forgotten { .. } => "forgotten",
            Self::Unsubscribed { .. } => "unsubscribed",
            Self::Expired { .. } => "expired",
            Self::Unrouted { .. } => "unrouted",
            Self::Circuit { .. } => "circuit",
            Self::LedgerLost { .. } => "ledger_lost",
        }
    }

    fn is_problem(&self) -> bool {
        matches!(
            self,
            Self::Failed { .. }
                | Self::Quarantined { .. }
                | Self::ConfigRefused { .. }
                | Self::Unrouted { .. }
                | Self::LedgerLost { .. }
                | Self::Retired {
                    how: Retirement::Abandoned | Retirement::Retained,
                    ..
                }
        )
    }
}

/// One numbered, timestamped event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// 1, 2, 3 … within this process.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    #[serde(flatten)]
    pub kind: EventKind,
    /// `kind` as JSON, serialized once for the log and every subscriber.
    #[serde(skip)]
    pub json: Arc<str>,
}

/// A subscriber's end.
#[derive(Debug)]
pub struct EventSubscription {
    /// The events kept when it subscribed, oldest first (the newest has `seq` just below
    /// the first one `events` delivers).
    pub history: Vec<Event>,
    pub events: Receiver<Event>,
    lagged: Arc<AtomicBool>,
}

impl EventSubscription {
    /// Whether it was dropped for falling behind (its receiver then disconnects).
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }
}

struct Subscriber {
    sender: Sender<Event>,
    lagged: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    history: VecDeque<Event>,
    subscribers: Vec<Subscriber>,
    closed: bool,
    /// Events emitted since the start, by kind.
    counts: std::collections::BTreeMap<&'static str, u64>,
}

/// The event hub.
pub struct Events {
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    pub fn new(clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            clock,
            inner: Mutex::new(Inner {
                next: 1,
                ..Inner::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs, numbers, keeps and sends one event; returns its number.
    pub fn emit(&self, kind: EventKind) -> u64 {
        let fields: Arc<str> = serde_json::to_string(&kind).unwrap_or_default().into();
        if kind.is_problem() {
            tracing::warn!(event = %fields, "{}", kind.describe());
        } else {
            tracing::info!(event = %fields, "{}", kind.describe());
        }
        let mut inner = self.lock();
        let event = Event {
            seq: inner.next,
            at: self.clock.now().0,
            kind,
            json: fields,
        };
        inner.next += 1;
        *inner.counts.entry(event.kind.kind()).or_default() += 1;
        if inner.history.len() == HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(event.clone());
        inner
            .subscribers
            .retain(|s| match s.sender.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lagged.store(true, Ordering::Release);
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        event.seq
    }

    /// Events emitted since the start, by kind (`loaded`, `swapped`, …).
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.lock().counts.iter().map(|(k, n)| (*k, *n)).collect()
    }

    /// The events kept, oldest first.
    pub fn history(&self) -> Vec<Event> {
        self.lock().history.iter().cloned().collect()
    }

    /// Subscribes with a buffer of `buffer` events. After [`Events::close`] the receiver is
    /// disconnected at once.
    pub fn subscribe(&self, buffer: usize) -> EventSubscription {
        let (sender, events) = bounded(buffer.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        let history = inner.history.iter().cloned().collect();
        if !inner.closed {
            inner.subscribers.push(Subscriber {
                sender,
                lagged: lagged.clone(),
            });
        }
        EventSubscription {
            history,
            events,
            lagged,
        }
    }

    /// Shutdown: every subscriber's receiver disconnects (after the events it holds).
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
    }

    /// The time events are stamped with.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn stopped(name: &str) -> EventKind {
        EventKind::Stopped {
            instance: name.into(),
            reason: StopReason::Disabled,
        }
    }

    #[test]
    fn subscribers_get_history_then_every_event_in_order() {
        let events = Events::new(Arc::new(SystemClock));
        events.emit(stopped("a"));
        let sub = events.subscribe(8);
        assert_eq!(sub.history.len(), 1);
        assert_eq!(sub.history[0].seq, 1);
        events.emit(stopped("b"));
        events.emit(stopped("c"));
        let got: Vec<u64> = sub.events.try_iter().map(|e| e.seq).collect();
        assert_eq!(got, [2, 3]);
        assert!(!sub.lagged());
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_dropped_and_marked() {
        let events = Events::new(Arc::new(SystemClock));
        let slow = events.subscribe(2);
        let fast = events.subscribe(16);
        for name in ["a", "b", "c", "d"] {
            events.emit(stopped(name));
        }
        assert!(slow.lagged(), "the third event did not fit");
        // What it holds it still gets, then it is disconnected: nothing skipped silently.
        let held: Vec<u64> = slow.events.iter().map(|e| e.seq).collect();
        assert_eq!(held, [1, 2]);
        assert!(!fast.lagged());
        assert_eq!(fast.events.try_iter().count(), 4);
    }

    #[test]
    fn close_disconnects_subscribers_and_history_is_bounded() {
        let events = Events::new(Arc::new(SystemClock));
        let sub = events.subscribe(4);
        events.close();
        assert!(sub.events.recv().is_err(), "disconnected at shutdown");
        assert!(!sub.lagged());
        for _ in 0..HISTORY + 5 {
            events.emit(stopped("x"));
        }
        let history = events.history();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history[0].seq, 6);
    }

    #[test]
    fn the_kind_is_the_serialized_tag() {
        let kinds = [
            stopped("a"),
            EventKind::Circuit {
                instance: "a".into(),
                state: CircuitState::Open,
            },
            EventKind::ConfigRefused {
                path: "p".into(),
                error: "e".into(),
            },
            EventKind::DeadLettered {
                instance: "a".into(),
                id: 1,
                reason: "r".into(),
            },
        ];
        for kind in kinds {
            assert_eq!(
                serde_json::to_value(&kind).unwrap()["event"],
                kind.kind(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn events_serialize_with_their_kind_and_fields() {
        let json = serde_json::to_value(Event {
            seq: 7,
            at: 1,
            kind: EventKind::Retired {
                instance: "a".into(),
                generation: 2,
                how: Retirement::Retained,
            },
            json: Arc::from(""),
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"seq": 7, "at": 1, "event": "retired", "instance": "a",
                "generation": 2, "how": "retained"})
        );
    }
}
