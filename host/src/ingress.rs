//! The ingress API: what `Publish` does inside the daemon. It validates a message (topic,
//! header and key bounds), deduplicates idempotency keys within `dedupe_window`, routes it
//! from the current routing snapshot (fixing its target set for good), enforces
//! `max_message_size` and `max_backlog` (headers and key count in both), assigns ids, records
//! the batch in the ledger — answering only once it is durable — and hands it to its
//! [`AcceptedSink`] (the dispatcher). The gRPC service sits on top of it; plugins publishing
//! outside `handle` come through it too, and the children of acked attempts are admitted by
//! the same step (`Ingress::admit_children`). The keys table is `ingress/keys.rs`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use plugind_api::{MessageId, PublishError, PublishErrorKind};
use tokio::sync::oneshot;

mod keys;

use crate::{
    backlog::{Backlog, BacklogFull},
    clock::{Clock, Timestamp},
    config::Unrouted,
    events::{EventKind, Events},
    ledger::{Ledger, LedgerError, Receipt, Record, Wait},
    message::{self, StoredMessage},
    quote::quote,
    routing::{Routing, Targets},
    services::{Child, Publisher},
};
use keys::{Decider, Decision, Keys, Lookup};

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub topic: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// An idempotency key: a key seen within `dedupe_window` gets the first publish's id
    /// (recorded with the message: keys survive a restart).
    pub key: Option<String>,
}

impl From<Child> for NewMessage {
    fn from(child: Child) -> Self {
        Self {
            topic: child.topic,
            payload: child.payload,
            headers: child.headers,
            key: None,
        }
    }
}

/// A message accepted: its id, and how many instances it goes to (0: no instance subscribes
/// to its topic, and it was not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: u64,
    pub instances: u32,
    /// Its idempotency key was seen within `dedupe_window`: `id` is the first publish's, and
    /// `instances` what that one reached when this process accepted it (0 if an earlier run
    /// did). Nothing was published this time.
    pub duplicate: bool,
}

/// Who publishes a message: the unrouted policy differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A producer (the API) or a plugin outside `handle`: `max_backlog` and `unrouted =
    /// "refuse"` apply.
    Producer,
    /// The child of an acked attempt, committed with its parent's ack (its parent was
    /// already accepted): counted when unrouted, never refused.
    Child,
}

/// A message accepted, with the instances it goes to.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message: Arc<StoredMessage>,
    pub targets: Targets,
    /// What it counts for in each target's backlog: payload, headers and key
    /// ([`message::check`]).
    pub size: u64,
}

/// Where the ingress hands the messages it accepted once the ledger recorded them (the
/// dispatcher). Called on the ledger's thread, in the order the batches were recorded: it
/// must not block.
pub trait AcceptedSink: Send + Sync {
    /// `batch` is recorded: its deliveries start.
    fn accepted(&self, batch: Vec<Accepted>);
}

/// A batch handed to the ledger, waiting for its receipt: finish it with
/// [`Submitted::wait`] or [`Submitted::done`].
#[derive(Debug)]
pub struct Submitted {
    results: Vec<Result<Published, PublishRefused>>,
    receipt: Receipt,
    /// Duplicates of keys whose first publish was not yet recorded when this batch came: (the
    /// position in the batch, whether that publish was recorded).
    following: Vec<(usize, oneshot::Receiver<bool>)>,
}

impl Submitted {
    /// Waits until the ledger answered; each message gets its id or its refusal. Blocks: for
    /// plain threads.
    pub fn wait(self) -> Vec<Result<Published, PublishRefused>> {
        let Self {
            results,
            receipt,
            following,
        } = self;
        let recorded = receipt.wait();
        let decided = following
            .into_iter()
            .map(|(i, first)| (i, first.blocking_recv().unwrap_or(false)))
            .collect();
        finish(results, recorded, decided)
    }

    /// [`Submitted::wait`] for async code.
    pub async fn done(self) -> Vec<Result<Published, PublishRefused>> {
        let Self {
            results,
            receipt,
            following,
        } = self;
        let recorded = receipt.done().await;
        let mut decided = Vec::with_capacity(following.len());
        for (i, first) in following {
            decided.push((i, first.await.unwrap_or(false)));
        }
        finish(results, recorded, decided)
    }
}

/// A batch's answers once the ledger answered (`recorded`) and the first publishes of the
/// keys it repeats were decided (`decided`: position, recorded).
fn finish(
    mut results: Vec<Result<Published, PublishRefused>>,
    recorded: Result<(), LedgerError>,
    decided: Vec<(usize, bool)>,
) -> Vec<Result<Published, PublishRefused>> {
    if let Err(e) = recorded {
        let refused = match e {
            LedgerError::Full(m) => PublishRefused::LedgerFull(m),
            other => PublishRefused::LedgerFailed(other.to_string()),
        };
        for result in &mut results {
            if result.is_ok() {
                *result = Err(refused.clone());
            }
        }
    }
    for (i, first_recorded) in decided {
        if let Ok(published) = results[i]
            && !first_recorded
        {
            results[i] = Err(PublishRefused::LedgerFailed(format!(
                "the first publish with this idempotency key (message {}) was not recorded; \
                 publish it again",
                published.id
            )));
        }
    }
    results
}

/// Why a publish was refused. Retryable or not is in the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefused {
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error(transparent)]
    Backlog(#[from] BacklogFull),
    #[error("the ledger is full: {0}")]
    LedgerFull(String),
    #[error(
        "no instance subscribes to topic {}, and unrouted = \"refuse\" (check the topics in \
         plugins.toml, or `plugind ctl plugins`)",
        quote(.0)
    )]
    Unrouted(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the ledger failed: {0}")]
    LedgerFailed(String),
}

impl From<&PublishRefused> for PublishError {
    fn from(refused: &PublishRefused) -> Self {
        let kind = match refused {
            PublishRefused::Invalid(_) | PublishRefused::Unrouted(_) => PublishErrorKind::Invalid,
            PublishRefused::Backlog(_) | PublishRefused::LedgerFull(_) => {
                PublishErrorKind::ResourceExhausted
            }
            PublishRefused::ShuttingDown => PublishErrorKind::ShuttingDown,
            PublishRefused::LedgerFailed(_) => PublishErrorKind::Unavailable,
        };
        PublishError {
            kind,
            message: refused.to_string(),
        }
    }
}

/// A message that goes somewhere (it has targets) is recorded and handed on: the one step of
/// admission a producer's publish and an acked attempt's child share.
fn admit(accepted: Accepted, records: &mut Vec<Record>, admitted: &mut Vec<Accepted>) {
    if !accepted.targets.is_empty() {
        records.push(Record::Accepted {
            message: accepted.message.clone(),
            targets: accepted.targets.clone(),
        });
        admitted.push(accepted);
    }
}

/// Locks, shrugging off a poisoned lock (the tables stay consistent at every step).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ingress of one engine.
pub struct Ingress {
    routing: ArcSwap<Routing>,
    next_id: AtomicU64,
    ledger: Arc<dyn Ledger>,
    sink: Arc<dyn AcceptedSink>,
    backlog: Arc<Backlog>,
    max_message_size: u64,
    clock: Arc<dyn Clock>,
    open: AtomicBool,
    /// Refuse publishes that match no instance (`unrouted = "refuse"`).
    refuse_unrouted: AtomicBool,
    /// Publishes that matched no instance (accepted and not stored, or refused).
    unrouted: AtomicU64,
    /// Of those, the ones already reported in an event, and the second of the last one.
    unrouted_reported: AtomicU64,
    unrouted_second: AtomicU64,
    events: Arc<Events>,
    keys: Mutex<Keys>,
    /// When the oldest key held expires (ms since the epoch; `u64::MAX`: none held): checked
    /// without the lock.
    keys_expire: AtomicU64,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("next_id", &self.next_id)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl Ingress {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        routing: Routing,
        next_id: u64,
        ledger: Arc<dyn Ledger>,
        sink: Arc<dyn AcceptedSink>,
        backlog: Arc<Backlog>,
        max_message_size: u64,
        clock: Arc<dyn Clock>,
        events: Arc<Events>,
        dedupe_window: Duration,
        known_keys: Vec<(String, u64, Timestamp)>,
    ) -> Self {
        let mut keys = Keys::new(dedupe_window, known_keys);
        let keys_expire = keys.expire(clock.now());
        Self {
            routing: ArcSwap::from_pointee(routing),
            next_id: AtomicU64::new(next_id),
            ledger,
            sink,
            backlog,
            max_message_size,
            clock,
            open: AtomicBool::new(true),
            refuse_unrouted: AtomicBool::new(false),
            unrouted: AtomicU64::new(0),
            unrouted_reported: AtomicU64::new(0),
            unrouted_second: AtomicU64::new(0),
            events,
            keys: Mutex::new(keys),
            keys_expire: AtomicU64::new(keys_expire),
        }
    }

    /// Drops the idempotency keys older than `dedupe_window`. Cheap when none is due (one
    /// atomic load): the dispatcher calls it every round, so keys expire within a second of
    /// their window whether or not anything is published.
    pub fn expire_keys(&self, now: Timestamp) {
        if now.0 < self.keys_expire.load(Ordering::Relaxed) {
            return;
        }
        let mut keys = lock(&self.keys);
        self.keys_expire.store(keys.expire(now), Ordering::Relaxed);
    }

    /// The largest message it accepts (payload, headers and key).
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Idempotency keys held now (each within `dedupe_window`).
    pub fn keys_held(&self) -> usize {
        lock(&self.keys).held()
    }

    /// What a publish that matches no instance gets from now on.
    pub fn set_unrouted(&self, policy: Unrouted) {
        self.refuse_unrouted
            .store(policy == Unrouted::Refuse, Ordering::Relaxed);
    }

    /// Whether a publish to `topic` now would reach an instance, or would be accepted all
    /// the same (`unrouted = "accept"`).
    pub fn admits(&self, topic: &str) -> bool {
        !self.refuse_unrouted.load(Ordering::Relaxed)
            || !self.routing.load().targets(topic).is_empty()
    }

    /// Counts a publish that matched no instance, and reports it at most once a second (an
    /// event, logged: the topic and how many since the last report).
    fn unrouted_publish(&self, topic: &str, now: Timestamp) {
        let total = self.unrouted.fetch_add(1, Ordering::Relaxed) + 1;
        let second = now.0 / 1000;
        let last = self.unrouted_second.load(Ordering::Relaxed);
        if second != last
            && self
                .unrouted_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let count = total - self.unrouted_reported.swap(total, Ordering::Relaxed);
            self.events.emit(EventKind::Unrouted {
                topic: topic.to_owned(),
                count,
            });
        }
    }

    /// Replaces the routing snapshot; messages accepted from now on use it.
    pub fn set_routing(&self, routing: Routing) {
        self.routing.store(Arc::new(routing));
    }

    /// Refuses every publish from now on.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// The clock messages are accepted by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The id the next accepted message gets (every id below it was given out).
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Publishes since start that matched no instance (accepted and not stored, or refused).
    pub fn unrouted(&self) -> u64 {
        self.unrouted.load(Ordering::Relaxed)
    }

    /// The children a plugin published inside `handle`, admitted with their parent's ack
    /// (`records` is the batch that carries it): each validated and routed like any publish
    /// but never refused for a backlog or as unrouted (its parent was accepted), numbered,
    /// recorded in `records` and counted in its targets' backlogs. A child that fails the
    /// checks (the services checked it before staging it, but a reload may have lowered
    /// `max_message_size` since) is logged and dropped. Returns the ones that go somewhere,
    /// for the dispatcher.
    pub(crate) fn admit_children(
        &self,
        children: Vec<Child>,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) -> Vec<Accepted> {
        let mut admitted = Vec::new();
        for child in children {
            match self.prepare(child.into(), Source::Child, now) {
                Ok((accepted, _)) => admit(accepted, records, &mut admitted),
                Err(e) => tracing::warn!(error = %e, "a child message was refused"),
            }
        }
        for child in &admitted {
            for target in &child.targets {
                self.backlog.add(*target, child.size);
            }
        }
        admitted
    }

    /// Validates and routes one message and gives it an id (none when it matches no
    /// instance and is refused).
    fn prepare(
        &self,
        message: NewMessage,
        source: Source,
        now: Timestamp,
    ) -> Result<(Accepted, Option<String>), PublishRefused> {
        let size = message::validate(
            &message.topic,
            message.payload.len(),
            &message.headers,
            message.key.as_deref(),
            self.max_message_size,
        )
        .map_err(PublishRefused::Invalid)?;
        let targets = self.routing.load().targets(&message.topic);
        if targets.is_empty() {
            self.unrouted_publish(&message.topic, now);
            if source == Source::Producer && self.refuse_unrouted.load(Ordering::Relaxed) {
                return Err(PublishRefused::Unrouted(message.topic));
            }
        }
        if source == Source::Producer {
            for target in &targets {
                self.backlog.check(*target, size)?;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let accepted = Accepted {
            message: Arc::new(StoredMessage {
                id,
                topic: message.topic,
                headers: message.headers,
                payload: message.payload,
                publish_time: now,
            }),
            targets,
            size,
        };
        Ok((accepted, message.key))
    }

    /// Validates, deduplicates, routes and numbers a batch and hands its records to the
    /// ledger, in one submission whatever its keys. Ids follow the order of the calls; finish
    /// with [`Submitted::wait`] or [`Submitted::done`] (or use [`Ingress::publish`] /
    /// [`Ingress::publish_async`]).
    pub fn submit(&self, batch: Vec<NewMessage>) -> Submitted {
        if !self.open.load(Ordering::Acquire) {
            return Submitted {
                results: batch
                    .iter()
                    .map(|_| Err(PublishRefused::ShuttingDown))
                    .collect(),
                receipt: Receipt::Ready(Ok(())),
                following: Vec::new(),
            };
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut following = Vec::new();
        // One clock read per batch: the batch is accepted at one time.
        let now = self.clock.now();
        self.expire_keys(now);
        // Held over the batch when it carries a key (checking a key and recording it is one
        // step: two publishes of one key cannot both pass); a batch without keys never
        // takes it.
        let mut keys = batch
            .iter()
            .any(|m| m.key.is_some())
            .then(|| lock(&self.keys));
        // The batch's keys are decided (recorded or not) when the ledger answers it.
        let mut decision: Option<Arc<Decision>> = None;
        for message in batch {
            if let (Some(keys), Some(key)) = (keys.as_mut(), message.key.as_deref())
                // An oversized key is refused below, and never hashed.
                && key.len() <= message::MAX_KEY
            {
                match keys.lookup(key, now) {
                    Some(Lookup::Recorded(published)) => {
                        results.push(Ok(published));
                        continue;
                    }
                    Some(Lookup::Pending(published, answer)) => {
                        following.push((results.len(), answer));
                        results.push(Ok(published));
                        continue;
                    }
                    None => {}
                }
            }
            match self.prepare(message, Source::Producer, now) {
                Ok((a, key)) => {
                    let published = Published {
                        id: a.message.id,
                        instances: a.targets.len() as u32,
                        duplicate: false,
                    };
                    results.push(Ok(published));
                    if let (Some(keys), Some(key)) = (keys.as_mut(), key) {
                        let decision = decision.get_or_insert_with(Arc::default).clone();
                        keys.insert(&key, published, now, Some(decision));
                        records.push(Record::Key {
                            key,
                            message: a.message.id,
                            at: now,
                        });
                    }
                    admit(a, &mut records, &mut accepted);
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if let Some(keys) = &keys {
            self.keys_expire
                .fetch_min(keys.next_expiry(), Ordering::Relaxed);
        }
        drop(keys);
        let mut decider = decision.map(|decision| Decider {
            decision,
            recorded: false,
        });
        let receipt = if records.is_empty() {
            Receipt::Ready(Ok(()))
        } else {
            // Once durable, the messages go to the dispatcher straight from the ledger's
            // thread (before the publisher hears of it): the publishing task's turn on the
            // runtime is not on their way to the plugins.
            let (backlog, sink) = (self.backlog.clone(), self.sink.clone());
            let then = move || {
                if !accepted.is_empty() {
                    for a in &accepted {
                        for target in &a.targets {
                            backlog.add(*target, a.size);
                        }
                    }
                    sink.accepted(accepted);
                }
                if let Some(decider) = &mut decider {
                    decider.recorded = true;
                }
            };
            self.ledger
                .submit_then(records, Wait::Durable, Some(Box::new(then)))
        };
        Submitted {
            results,
            receipt,
            following,
        }
    }

    /// Publishes a batch: each message gets its id or its refusal; the accepted ones are
    /// durable in the ledger when this returns. Blocks: for plain threads.
    pub fn publish(&self, batch: Vec<NewMessage>) -> Vec<Result<Published, PublishRefused>> {
        self.submit(batch).wait()
    }

    /// [`Ingress::publish`] for async code: waits for the ledger without blocking a thread.
    pub async fn publish_async(
        &self,
        batch: Vec<NewMessage>,
    ) -> Vec<Result<Published, PublishRefused>> {
        self.submit(batch).done().await
    }

    /// Publishes one message.
    ///
    /// # Errors
    /// [`PublishRefused`] with the reason.
    pub fn publish_one(&self, message: NewMessage) -> Result<Published, PublishRefused> {
        self.publish(vec![message])
            .pop()
            .expect("one result per message")
    }
}

impl Publisher for Ingress {
    fn publish(&self, child: Child) -> Result<MessageId, PublishError> {
        self.publish_one(child.into())
            .map(|p| MessageId(p.id))
            .map_err(|e| PublishError::from(&e))
    }

    fn admits(&self, topic: &str) -> Result<(), PublishError> {
        if Ingress::admits(self, topic) {
            return Ok(());
        }
        Err(PublishError::from(&PublishRefused::Unrouted(
            topic.to_owned(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        clock::ManualClock,
        ledger::{MemoryLedger, Then},
        topic::Pattern,
    };

    const T0: Timestamp = Timestamp(1_700_000_000_000);

    /// The accepted batches, as the dispatcher would get them.
    impl AcceptedSink for crossbeam_channel::Sender<Vec<Accepted>> {
        fn accepted(&self, batch: Vec<Accepted>) {
            let _ = self.send(batch);
        }
    }
    const WINDOW: Duration = Duration::from_secs(60);

    /// An ingress routing `t.>` to instance 0, on `ledger`, with the clock it returns.
    fn ingress_on(
        ledger: Arc<dyn Ledger>,
        known: Vec<(String, u64, Timestamp)>,
    ) -> (
        Ingress,
        Arc<ManualClock>,
        crossbeam_channel::Receiver<Vec<Accepted>>,
    ) {
        let clock = Arc::new(ManualClock::at(T0));
        let (tx, rx) = crossbeam_channel::unbounded();
        let routing = Routing::new(&BTreeMap::from([(0, vec![Pattern::parse("t.>").unwrap()])]));
        let ingress = Ingress::new(
            routing,
            1,
            ledger,
            Arc::new(tx),
            Arc::new(Backlog::new(&[("sink".to_owned(), 1 << 20)])),
            1 << 20,
            clock.clone(),
            Events::new(clock.clone()),
            WINDOW,
            known,
        );
        (ingress, clock, rx)
    }

    fn keyed(key: &str) -> NewMessage {
        NewMessage {
            topic: "t.a".into(),
            payload: Bytes::from_static(b"x"),
            headers: vec![],
            key: Some(key.into()),
        }
    }

    fn ids(results: &[Result<Published, PublishRefused>]) -> Vec<(u64, bool)> {
        results
            .iter()
            .map(|r| {
                let p = r.as_ref().unwrap();
                (p.id, p.duplicate)
            })
            .collect()
    }

    #[test]
    fn a_keyed_batch_is_one_submission_and_its_repeats_get_the_first_id() {
        let (ingress, _, dispatched) = ingress_on(MemoryLedger::new(), vec![]);
        let first = ingress.publish(vec![keyed("a"), keyed("a"), keyed("b")]);
        assert_eq!(ids(&first), [(1, false), (1, true), (2, false)]);
        // One submission: the dispatcher got both messages in one hand-over.
        match dispatched.try_recv() {
            Ok(batch) => assert_eq!(batch.len(), 2),
            other => panic!("{other:?}"),
        }
        let again = ingress.publish(vec![keyed("b"), keyed("c")]);
        assert_eq!(ids(&again), [(2, true), (3, false)]);
        assert_eq!(again[0].as_ref().unwrap().instances, 1);
    }

    #[test]
    fn keys_expire_by_dedupe_window_however_few_there_are() {
        // The keys table was swept only once it held 4096 keys: 200 keys of 3 MB stayed
        // for ever.
        let (ingress, clock, _rx) = ingress_on(MemoryLedger::new(), vec![]);
        ingress.publish((0..10).map(|i| keyed(&format!("k{i}"))).collect());
        assert_eq!(ingress.keys_held(), 10);
        clock.advance(WINDOW - Duration::from_millis(1));
        ingress.expire_keys(clock.now());
        assert_eq!(ingress.keys_held(), 10, "within the window");
        assert!(
            ingress.publish(vec![keyed("k3")])[0]
                .as_ref()
                .unwrap()
                .duplicate
        );
        clock.advance(Duration::from_millis(1));
        // No publish needed: the dispatcher's round expires them.
        ingress.expire_keys(clock.now());
        assert_eq!(ingress.keys_held(), 0);
        assert!(
            !ingress.publish(vec![keyed("k3")])[0]
                .as_ref()
                .unwrap()
                .duplicate
        );
    }

    #[test]
    fn keys_from_the_ledger_count_by_the_engines_clock() {
        let known = vec![
            ("old".to_owned(), 7, Timestamp(T0.0 - 30_000)),
            ("older".to_owned(), 5, Timestamp(T0.0 - 120_000)),
        ];
        let (ingress, clock, _rx) = ingress_on(MemoryLedger::new(), known);
        assert_eq!(ingress.keys_held(), 1, "a key past the window is not kept");
        let dup = ingress.publish(vec![keyed("old")]).remove(0).unwrap();
        assert_eq!((dup.id, dup.duplicate, dup.instances), (7, true, 0));
        clock.advance(WINDOW + Duration::from_secs(1));
        let fresh = ingress.publish(vec![keyed("old")]).remove(0).unwrap();
        assert!(!fresh.duplicate);
    }

    #[test]
    fn an_oversized_key_is_refused_before_it_is_looked_up() {
        let (ingress, _, _rx) = ingress_on(MemoryLedger::new(), vec![]);
        let key = "k".repeat(message::MAX_KEY + 1);
        let refused = ingress.publish(vec![keyed(&key)]).remove(0).unwrap_err();
        assert_eq!(
            refused,
            PublishRefused::Invalid("the idempotency key is 257 bytes, more than 256".into())
        );
        assert_eq!(ingress.keys_held(), 0);
    }

    /// A batch held: what runs once it is recorded, and where its answer goes.
    type HeldBatch = (Option<Then>, oneshot::Sender<Result<(), LedgerError>>);

    /// A ledger that answers when the test says so.
    #[derive(Default)]
    struct Held {
        batches: Mutex<Vec<HeldBatch>>,
    }

    impl Held {
        /// Holds a batch until [`Held::answer`].
        fn hold(&self, then: Option<Then>) -> Receipt {
            let (tx, rx) = oneshot::channel();
            lock(&self.batches).push((then, tx));
            Receipt::Pending(rx)
        }

        /// A ledger whose commits `held` holds.
        fn ledger(held: &Arc<Self>) -> Arc<dyn Ledger> {
            let held = held.clone();
            Arc::new(crate::ledger::CommitOnly(move |then| held.hold(then)))
        }

        /// Answers the oldest batch held: recorded (its `then` runs) or failed.
        fn answer(&self, recorded: bool) {
            let (then, answer) = lock(&self.batches).remove(0);
            if recorded {
                if let Some(then) = then {
                    then();
                }
                let _ = answer.send(Ok(()));
            } else {
                drop(then);
                let _ = answer.send(Err(LedgerError::Full("disk".into())));
            }
        }
    }

    #[test]
    fn a_repeat_of_a_key_not_yet_recorded_is_answered_only_once_the_first_is() {
        let ledger = Arc::new(Held::default());
        let (ingress, _, _rx) = ingress_on(Held::ledger(&ledger), vec![]);
        let first = ingress.submit(vec![keyed("a")]);
        let repeat = ingress.submit(vec![keyed("a")]);
        let waiting = std::thread::spawn(move || repeat.wait());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiting.is_finished(),
            "answered before the first was recorded"
        );
        ledger.answer(true);
        assert_eq!(ids(&first.wait()), [(1, false)]);
        assert_eq!(ids(&waiting.join().unwrap()), [(1, true)]);
        // The repeat added nothing to the ledger.
        assert!(lock(&ledger.batches).is_empty());
    }

    #[test]
    fn a_repeat_of_a_key_whose_first_publish_failed_is_refused_and_the_next_is_fresh() {
        let ledger = Arc::new(Held::default());
        let (ingress, _, _rx) = ingress_on(Held::ledger(&ledger), vec![]);
        let first = ingress.submit(vec![keyed("a")]);
        let repeat = ingress.submit(vec![keyed("a")]);
        ledger.answer(false);
        assert!(matches!(
            first.wait()[0],
            Err(PublishRefused::LedgerFull(_))
        ));
        match &repeat.wait()[0] {
            Err(PublishRefused::LedgerFailed(why)) => {
                assert!(why.contains("was not recorded; publish it again"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // Published again, the key is a first publish with an id of its own.
        let again = ingress.submit(vec![keyed("a")]);
        ledger.answer(true);
        assert_eq!(ids(&again.wait()), [(2, false)]);
    }
}
