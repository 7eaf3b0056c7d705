//! The ledger: the only writer of delivery state. Callers hand it batches of [`Record`]s —
//! what happened, in order — and each batch is applied atomically and is durable (per the
//! configured durability and the caller's [`Wait`]) when [`Ledger::commit`] returns.
//!
//! The dispatcher keeps the live state (which delivery is due, which is in flight) in memory
//! and writes every change here *before* acting on it: an attempt is recorded before plugin
//! code is called, a parent's ack is committed in the same batch as its children. At start
//! the ledger hands back what is pending ([`Ledger::recover`]), charging a `crash` failure
//! to every attempt a previous run left in flight.
//!
//! Two implementations: [`MemoryLedger`] (`durability = "memory"`: counts and dead letters,
//! nothing survives a restart) and [`durable::DurableLedger`] (SQLite under `state_dir`,
//! one group-commit writer thread; see ARCHITECTURE.md for the format and its rules).

pub mod backup;
pub mod durable;
mod fail_stop;
mod mark;
mod markers;
mod store;
mod syncer;
#[cfg(test)]
mod tests;
mod writer;

pub use fail_stop::FailStop;
pub use markers::InFlightMarker;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

use crate::{
    clock::Timestamp,
    delivery::{Delivery, Rules},
    message::StoredMessage,
    routing::{InstanceId, Targets},
};

/// One change, in the order it happened.
#[derive(Debug, Clone)]
pub enum Record {
    /// A message and its target set; each target's delivery starts ready.
    Accepted {
        message: Arc<StoredMessage>,
        targets: Targets,
    },
    /// An idempotency key and the message id it got (kept for `dedupe_window`).
    Key {
        key: String,
        message: u64,
        at: Timestamp,
    },
    /// An attempt was handed to its actor (counted; the actor's [`InFlightMarker`] records
    /// the moment plugin code is called).
    Attempt {
        message: u64,
        instance: InstanceId,
        attempt: u32,
        lease_until: Timestamp,
    },
    /// A delivery changed without ending (a failure that waits, a release, an excuse).
    Updated {
        message: u64,
        instance: InstanceId,
        delivery: Delivery,
    },
    /// A delivery ended in an ack.
    Acked { message: u64, instance: InstanceId },
    /// An operator purged the delivery (`forget`): it ends without a dead letter.
    Purged { message: u64, instance: InstanceId },
    /// A delivery ended as a dead letter. `stored` is the message when the caller holds it
    /// (a ledger that keeps no payloads needs it).
    DeadLettered {
        message: u64,
        instance: InstanceId,
        delivery: Delivery,
        at: Timestamp,
        stored: Option<Arc<StoredMessage>>,
    },
}

/// How long [`Ledger::commit`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Until the batch is as durable as `durability` promises (a `Publish` answer).
    Durable,
    /// Until the batch survives a crash of the process (written to the OS): settlements,
    /// in-flight markers and the children of an acked attempt. A later durable commit
    /// covers them.
    Written,
}

/// What a caller of [`Ledger::submit_then`] runs once its records are recorded.
pub type Then = Box<dyn FnOnce() + Send>;

/// Where the answer to a submitted batch comes from: at once, or from the ledger's threads
/// once the batch is as durable as asked. Wait for it on a plain thread
/// ([`Receipt::wait`]) or in async code ([`Receipt::done`]).
#[derive(Debug)]
pub enum Receipt {
    Ready(Result<(), LedgerError>),
    Pending(tokio::sync::oneshot::Receiver<Result<(), LedgerError>>),
}

fn gone() -> LedgerError {
    LedgerError::Fatal("the ledger writer is gone".into())
}

impl Receipt {
    /// Blocks until the answer (never call it inside async code).
    ///
    /// # Errors
    /// The ledger's answer.
    pub fn wait(self) -> Result<(), LedgerError> {
        match self {
            Self::Ready(result) => result,
            Self::Pending(answer) => answer.blocking_recv().map_err(|_| gone())?,
        }
    }

    /// The answer if it came, without waiting (once: a receipt answers one time).
    pub fn try_answer(&mut self) -> Option<Result<(), LedgerError>> {
        match self {
            Self::Ready(result) => Some(std::mem::replace(result, Err(gone()))),
            Self::Pending(answer) => match answer.try_recv() {
                Ok(result) => Some(result),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Err(gone())),
            },
        }
    }

    /// Awaits the answer.
    ///
    /// # Errors
    /// The ledger's answer.
    pub async fn done(self) -> Result<(), LedgerError> {
        match self {
            Self::Ready(result) => result,
            Self::Pending(answer) => answer.await.map_err(|_| gone())?,
        }
    }
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub message: u64,
    pub topic: String,
    pub instance: String,
    /// When it was dead-lettered (ms since the Unix epoch).
    pub at: u64,
    pub delivery: Delivery,
}

/// Which dead letters to list: one instance or all, after a cursor, at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub instance: Option<String>,
    /// Only those after this (message, instance), in (message, instance) order.
    pub after: Option<(u64, String)>,
    /// 0: no limit.
    pub limit: usize,
}

impl DeadLetterFilter {
    fn admits(&self, message: u64, instance: &str) -> bool {
        self.instance.as_deref().is_none_or(|i| i == instance)
            && self
                .after
                .as_ref()
                .is_none_or(|(m, i)| (message, instance) > (*m, i.as_str()))
    }
}

/// Dead letters an operator acts on: of one instance or all, some messages or all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub instance: Option<String>,
    /// Empty: every message.
    pub messages: Vec<u64>,
}

impl Selection {
    /// Whether a dead letter is selected: `messages` sorted (see [`Selection::sorted`]).
    fn admits_sorted(&self, messages: &[u64], message: u64, instance: &str) -> bool {
        self.instance.as_deref().is_none_or(|i| i == instance)
            && (messages.is_empty() || messages.binary_search(&message).is_ok())
    }

    /// The selected messages, sorted: a selection of 100,000 ids is searched, not scanned.
    fn sorted(&self) -> Vec<u64> {
        let mut messages = self.messages.clone();
        messages.sort_unstable();
        messages
    }
}

/// How `forget` ends an instance's backlog for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Forget {
    /// Each waiting delivery becomes a dead letter (reason `forgotten`).
    DeadLetter,
    /// Each waiting delivery is removed.
    Purge,
}

/// How an instance's subscription came to be; it ends only by an operator's act (its table
/// removed from `plugins.toml`, or `ctl forget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A `[plugins.NAME]` table in `plugins.toml`.
    Configured,
    /// Autoloaded from a library in `plugin_dir` that no table names.
    Autoloaded,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Configured => "configured",
            Self::Autoloaded => "autoloaded",
        })
    }
}

/// An instance's subscription, as kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    pub origin: Origin,
    /// The manifest name of the plugin it runs.
    pub plugin: String,
    /// That plugin's own topics as last seen in its library (`None`: never loaded). They
    /// route its messages while the library is missing or refused.
    pub topics: Option<Vec<String>>,
}

/// What the ledger keeps of one instance besides its deliveries (ledger format 2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Remembered {
    /// `None`: not subscribed (its subscription ended, or it never had one).
    pub subscription: Option<Subscription>,
    /// An operator paused it (`ctl pause`); it stays paused across restarts until resumed.
    pub paused: bool,
}

/// What waits for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BacklogEntry {
    pub instance: String,
    pub deliveries: u64,
    pub bytes: u64,
}

/// One delivery of a message, as its history shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub instance: String,
    pub dead_letter: bool,
    pub delivery: Delivery,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Back in the queues of configured instances (the dispatcher takes them).
    pub pending: Vec<Pending>,
    /// Moved back for instances that are not configured now (they wait in the ledger).
    pub waiting: u64,
}

/// Why the ledger could not record something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// Out of space (ENOSPC/EDQUOT or `max_ledger_bytes`): publishing stops, deliveries go
    /// on.
    #[error("the ledger is full: {0}")]
    Full(String),
    /// A storage failure: the daemon must stop (an fsync is never retried).
    #[error("ledger storage failed: {0}")]
    Fatal(String),
    /// One stored message cannot be read (its checksum does not match its bytes): the
    /// rest of the ledger is usable.
    #[error("{0}")]
    Corrupt(String),
    /// The state directory holds what this build cannot use (a newer format, another file, a
    /// damaged or lost ledger) or is in use: nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The state directory cannot be created or written: the configuration (or the service
    /// manager's sandbox) must change, a restart cannot fix it.
    #[error("{0}")]
    Unusable(String),
    /// The operation needs a durable ledger.
    #[error("{0} needs a durable ledger (durability = \"fsync\" or \"buffered\")")]
    Unsupported(&'static str),
}

/// One delivery waiting at start. Its message is not loaded: the dispatcher reads it back
/// from the ledger ([`Ledger::load`]) when the delivery is handed out.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub message: u64,
    pub instance: InstanceId,
    /// Its message's size (payload and headers as stored), for the backlog.
    pub size: u64,
    pub delivery: Delivery,
    /// Since when it waits (its message's acceptance; a replay's time): `max_age` counts
    /// from here.
    pub since: Timestamp,
    /// The message, when the ledger holds it in memory anyway.
    pub stored: Option<Arc<StoredMessage>>,
}

/// What a ledger holds at start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Deliveries to the given instances not yet settled, in acceptance order.
    pub pending: Vec<Pending>,
    /// The first message id to use from now on.
    pub next_id: u64,
    /// Attempts a previous run left in flight, charged a `crash` failure.
    pub crashed: u64,
    /// The instances those attempts were made to (plugin code of theirs was running when
    /// the process died).
    pub crashed_in: std::collections::BTreeSet<String>,
    /// How many of those attempts each instance was charged.
    pub crashed_by: std::collections::BTreeMap<String, u64>,
    /// Deliveries waiting for instances that are not configured now (kept, not handed out).
    pub orphaned: u64,
    /// The instances those wait for (their subscriptions ended; an operator forgets them).
    pub orphaned_in: std::collections::BTreeSet<String>,
    /// Whether the previous run ended without a graceful stop.
    pub unclean: bool,
    /// Messages answered OK that the ledger no longer holds (its log damaged or cut short).
    pub lost: Option<Lost>,
}

/// Messages answered OK that the ledger lost, found at start by comparing the last id it holds
/// with the last id answered (kept beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Lost {
    /// The first id that may be missing (ids in between that were never answered OK, a refused
    /// publish's say, are among them).
    pub first: u64,
    /// The last id answered OK.
    pub last: u64,
}

/// Counts of what the ledger recorded since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub accepted: u64,
    pub attempts: u64,
    pub acked: u64,
    pub dead_lettered: u64,
}

/// How the group commit goes (metric-ready: monotonic counters and a latency histogram).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: u64,
    /// Commits that fsynced.
    pub fsyncs: u64,
    /// Messages accepted in those commits (their sum; divide by `commits`).
    pub messages: u64,
    /// Records in those commits.
    pub records: u64,
    /// Commit latency (build + commit, written to the OS) in µs: p50, p99, max.
    pub latency_us: [u64; 3],
    /// Latency of the log fsyncs that make publishes durable, in µs: p50, p99, max.
    pub fsync_us: [u64; 3],
    /// Latency of the checkpoints that copy the log into the database, in µs: p50, p99, max.
    pub checkpoint_us: [u64; 3],
    /// Checkpoints the writer ran itself because the write-ahead log was full (each lets the
    /// log restart, unless a reader still uses it).
    pub log_restarts: u64,
    /// Bytes the store takes on disk (database and its write-ahead log).
    pub bytes: u64,
    /// Passive checkpoints the syncer ran.
    pub checkpoints: u64,
    /// Bytes kept free for settlements on a full disk (the `reserve` file in `state_dir`): 0
    /// once a full disk took it, until a purge frees space again.
    pub reserve_bytes: u64,
    /// Commit latency (build + commit, written to the OS), in µs, as metric buckets.
    pub commit_latency: crate::metrics::Distribution,
    /// Log fsync latency, in µs, as metric buckets.
    pub fsync_latency: crate::metrics::Distribution,
    /// Records per commit (the group commit's batch size), as metric buckets.
    pub batch_records: crate::metrics::Distribution,
}

/// The ledger interface.
pub trait Ledger: Send + Sync + 'static {
    /// Hands `records` over to be applied atomically; the receipt answers per `wait`.
    /// Batches are applied in the order they were submitted.
    fn submit(&self, records: Vec<Record>, wait: Wait) -> Receipt {
        self.submit_then(records, wait, None)
    }

    /// [`Ledger::submit`], and `then` runs once the records are recorded as `wait` asks,
    /// before the receipt answers, on the thread that answers it (not if they fail). It must
    /// be quick and must not block: the ingress hands durable messages to the dispatcher
    /// there, without waiting for the publishing task to be scheduled.
    fn submit_then(&self, records: Vec<Record>, wait: Wait, then: Option<Then>) -> Receipt;

    /// Applies `records` atomically, returning per `wait` (blocks: not for async code).
    ///
    /// # Errors
    /// [`LedgerError::Full`] or [`LedgerError::Fatal`]; nothing of the batch was applied.
    fn commit(&self, records: Vec<Record>, wait: Wait) -> Result<(), LedgerError> {
        self.submit(records, wait).wait()
    }

    /// At start: the pending deliveries of `instances` (name and rules, in instance-id
    /// order) and the next id. Attempts left in flight by an unclean exit are charged a
    /// `crash` failure (and dead-lettered when that was the last one allowed).
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the stored state cannot be read.
    fn recover(
        &self,
        instances: &[(String, Rules)],
        now: Timestamp,
    ) -> Result<Recovered, LedgerError>;

    /// An instance added while the engine runs gets id `id` (the next one after those
    /// recovered or attached before) for `name`; returns the deliveries stored for it (left
    /// by an earlier run, waiting since), in acceptance order.
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the store cannot be read or `id` is not the next one.
    fn attach(&self, id: InstanceId, name: &str) -> Result<Vec<Pending>, LedgerError>;

    /// What is remembered of every instance with a subscription or a pause, by name (read
    /// at start, before [`Ledger::recover`]).
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the store cannot be read.
    fn remembered(&self) -> Result<std::collections::BTreeMap<String, Remembered>, LedgerError> {
        Ok(std::collections::BTreeMap::new())
    }

    /// Records what is remembered of instance `name`, durably before it returns (a ledger
    /// that keeps nothing across restarts keeps nothing).
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails.
    fn remember(&self, name: &str, remembered: &Remembered) -> Result<(), LedgerError> {
        let _ = (name, remembered);
        Ok(())
    }

    /// Whether payloads may leave memory: [`Ledger::load`] reads them back.
    fn reloads(&self) -> bool {
        false
    }

    /// Reads message `id` back from the store.
    ///
    /// # Errors
    /// [`LedgerError::Corrupt`] when its bytes fail their checksum; [`LedgerError::Fatal`]
    /// when the store cannot be read.
    fn load(&self, id: u64) -> Result<Option<Arc<StoredMessage>>, LedgerError> {
        let _ = id;
        Ok(None)
    }

    /// The in-flight marker for one actor of `instance` (`None`: this ledger keeps none,
    /// nothing survives a crash anyway).
    fn marker(&self, instance: InstanceId) -> Option<InFlightMarker> {
        let _ = instance;
        None
    }

    /// Reads several messages back at once (one read transaction); one that is missing or
    /// corrupt is `None` here (read it alone to learn why).
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] when the store cannot be read.
    fn load_many(&self, ids: &[u64]) -> Result<Vec<Option<Arc<StoredMessage>>>, LedgerError> {
        ids.iter().map(|id| self.load(*id)).collect()
    }

    /// Idempotency keys recorded at or after `since`: (key, message id, time).
    fn keys(&self, since: Timestamp) -> Vec<(String, u64, Timestamp)> {
        let _ = since;
        Vec::new()
    }

    /// Dead letters, in (message, instance) order.
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the store cannot be read.
    fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, LedgerError>;

    /// How many dead letters each instance has now (instances with none are left out).
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the store cannot be read.
    fn dead_letter_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, LedgerError>;

    /// Moves dead letters back to pending: failures reset, history kept.
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails.
    fn replay(&self, selection: &Selection, now: Timestamp) -> Result<Replayed, LedgerError>;

    /// Removes dead letters (and their messages once nothing refers to them). Returns how
    /// many.
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails.
    fn purge(&self, selection: &Selection) -> Result<u64, LedgerError>;

    /// Ends the waiting deliveries of `instance`, an instance the dispatcher does not run
    /// (not configured or disabled): dead letters or gone. Returns how many.
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails or this ledger keeps no backlog.
    fn forget(&self, instance: &str, how: Forget, now: Timestamp) -> Result<u64, LedgerError> {
        let _ = (instance, how, now);
        Err(LedgerError::Unsupported(
            "forgetting an instance that is not running",
        ))
    }

    /// Every delivery of `message` the ledger holds (pending or dead-lettered).
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails or this ledger keeps no deliveries.
    fn history(&self, message: u64) -> Result<Vec<HistoryEntry>, LedgerError> {
        let _ = message;
        Err(LedgerError::Unsupported("the attempt history"))
    }

    /// What waits per instance, as stored (every instance ever configured).
    ///
    /// # Errors
    /// [`LedgerError`] when the store fails or this ledger keeps no backlog.
    fn backlog(&self) -> Result<Vec<BacklogEntry>, LedgerError> {
        Err(LedgerError::Unsupported("the stored backlog"))
    }

    fn counts(&self) -> Counts;

    fn stats(&self) -> CommitStats {
        CommitStats::default()
    }

    /// A graceful stop: nothing will be committed any more; the next start charges nothing.
    fn close(&self) {}
}

impl std::fmt::Debug for dyn Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ledger({:?})", self.counts())
    }
}

/// The in-memory ledger: nothing survives a restart (`durability = "memory"`, and the
/// engine's tests).
#[derive(Debug, Default)]
pub struct MemoryLedger {
    accepted: AtomicU64,
    attempts: AtomicU64,
    acked: AtomicU64,
    names: Mutex<Vec<String>>,
    /// Dead letters with their messages (replay hands them back).
    dead: Mutex<Vec<(DeadLetter, Option<Arc<StoredMessage>>)>>,
}

impl MemoryLedger {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn record(&self, records: Vec<Record>) {
        let mut dead = Vec::new();
        for record in records {
            match record {
                Record::Accepted { .. } => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Record::Attempt { .. } => {
                    self.attempts.fetch_add(1, Ordering::Relaxed);
                }
                Record::Key { .. } | Record::Updated { .. } | Record::Purged { .. } => {}
                Record::Acked { .. } => {
                    self.acked.fetch_add(1, Ordering::Relaxed);
                }
                Record::DeadLettered {
                    message,
                    instance,
                    delivery,
                    at,
                    stored,
                } => dead.push((
                    DeadLetter {
                        message,
                        topic: stored.as_ref().map(|m| m.topic.clone()).unwrap_or_default(),
                        instance: lock(&self.names)
                            .get(instance as usize)
                            .cloned()
                            .unwrap_or_else(|| format!("#{instance}")),
                        at: at.0,
                        delivery,
                    },
                    stored,
                )),
            }
        }
        if !dead.is_empty() {
            lock(&self.dead).extend(dead);
        }
    }
}

/// Locks, shrugging off a poisoned lock (the data is counters and lists: always usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A ledger for unit tests that only takes commits: `submit_then` answers with `commit`
/// (given the batch's `then`); it holds nothing, so every read is empty.
#[cfg(test)]
pub(crate) struct CommitOnly<F>(pub F);

#[cfg(test)]
impl<F: Fn(Option<Then>) -> Receipt + Send + Sync + 'static> Ledger for CommitOnly<F> {
    fn submit_then(&self, _: Vec<Record>, _: Wait, then: Option<Then>) -> Receipt {
        (self.0)(then)
    }
    fn recover(
        &self,
        _: &[(String, crate::delivery::Rules)],
        _: Timestamp,
    ) -> Result<Recovered, LedgerError> {
        Ok(Recovered::default())
    }
    fn attach(&self, _: InstanceId, _: &str) -> Result<Vec<Pending>, LedgerError> {
        Ok(Vec::new())
    }
    fn dead_letters(&self, _: &DeadLetterFilter) -> Result<Vec<DeadLetter>, LedgerError> {
        Ok(Vec::new())
    }
    fn dead_letter_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, LedgerError> {
        Ok(std::collections::BTreeMap::new())
    }
    fn replay(&self, _: &Selection, _: Timestamp) -> Result<Replayed, LedgerError> {
        Ok(Replayed::default())
    }
    fn purge(&self, _: &Selection) -> Result<u64, LedgerError> {
        Ok(0)
    }
    fn counts(&self) -> Counts {
        Counts::default()
    }
}

impl Ledger for MemoryLedger {
    fn submit_then(&self, records: Vec<Record>, _wait: Wait, then: Option<Then>) -> Receipt {
        self.record(records);
        if let Some(then) = then {
            then();
        }
        Receipt::Ready(Ok(()))
    }

    fn recover(
        &self,
        instances: &[(String, Rules)],
        _now: Timestamp,
    ) -> Result<Recovered, LedgerError> {
        *lock(&self.names) = instances.iter().map(|(n, _)| n.clone()).collect();
        Ok(Recovered {
            next_id: 1,
            ..Recovered::default()
        })
    }
    fn attach(&self, id: InstanceId, name: &str) -> Result<Vec<Pending>, LedgerError> {
        let mut names = lock(&self.names);
        if names.len() != id as usize {
            return Err(LedgerError::Fatal(format!(
                "instance `{name}` attached as #{id}, but the next id is #{}",
                names.len()
            )));
        }
        names.push(name.to_owned());
        Ok(Vec::new())
    }

    fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, LedgerError> {
        let mut list: Vec<DeadLetter> = lock(&self.dead)
            .iter()
            .filter(|(d, _)| filter.admits(d.message, &d.instance))
            .map(|(d, _)| d.clone())
            .collect();
        list.sort_by(|a, b| (a.message, &a.instance).cmp(&(b.message, &b.instance)));
        if filter.limit > 0 {
            list.truncate(filter.limit);
        }
        Ok(list)
    }

    fn dead_letter_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, LedgerError> {
        let mut counts = std::collections::BTreeMap::new();
        for (d, _) in lock(&self.dead).iter() {
            *counts.entry(d.instance.clone()).or_default() += 1;
        }
        Ok(counts)
    }

    fn replay(&self, selection: &Selection, now: Timestamp) -> Result<Replayed, LedgerError> {
        let names = lock(&self.names).clone();
        let mut replayed = Replayed::default();
        let messages = selection.sorted();
        lock(&self.dead).retain(|(d, stored)| {
            if !selection.admits_sorted(&messages, d.message, &d.instance) {
                return true;
            }
            let mut delivery = d.delivery.clone();
            delivery.replay(now);
            match names.iter().position(|n| *n == d.instance) {
                Some(instance) => replayed.pending.push(Pending {
                    message: d.message,
                    instance: instance as InstanceId,
                    size: stored.as_ref().map_or(0, |m| m.size()),
                    delivery,
                    since: now,
                    stored: stored.clone(),
                }),
                None => replayed.waiting += 1,
            }
            false
        });
        Ok(replayed)
    }

    fn purge(&self, selection: &Selection) -> Result<u64, LedgerError> {
        let mut dead = lock(&self.dead);
        let before = dead.len();
        let messages = selection.sorted();
        dead.retain(|(d, _)| !selection.admits_sorted(&messages, d.message, &d.instance));
        Ok((before - dead.len()) as u64)
    }

    fn counts(&self) -> Counts {
        let dead = lock(&self.dead).len() as u64;
        Counts {
            accepted: self.accepted.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            dead_lettered: dead,
        }
    }
}
