//! The ingress API: what `Publish` does inside the daemon. It validates a message, routes it
//! from the current routing snapshot (fixing its target set for good), enforces
//! `max_message_size` and `max_backlog`, assigns ids, records the batch in the ledger —
//! answering only once it is durable — and hands it to the dispatcher. The gRPC service sits
//! on top of it; plugins publishing outside `handle` come through it too.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_channel::Sender;
use plugind_api::{MessageId, PublishError, PublishErrorKind};

use crate::{
    clock::{Clock, Timestamp},
    config::Unrouted,
    dispatch,
    events::{EventKind, Events},
    ledger::{Ledger, LedgerError, Receipt, Record, Wait},
    message::StoredMessage,
    routing::{InstanceId, Routing, Targets},
    services::{Child, Publisher},
    topic,
};

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub topic: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// An idempotency key, recorded with the message (the caller deduplicates).
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
}

/// Who publishes a message: the unrouted policy differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
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
}

/// A batch handed to the ledger, waiting for its receipt.
#[derive(Debug)]
pub struct Submitted {
    results: Vec<Result<Published, Refused>>,
    receipt: Receipt,
}

impl Submitted {
    /// The ledger's receipt, to wait for (it is taken once).
    pub fn take_receipt(&mut self) -> Receipt {
        std::mem::replace(&mut self.receipt, Receipt::Ready(Ok(())))
    }
}

/// Why a publish was refused. Retryable or not is in the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error(
        "instance `{instance}` has {backlog} bytes waiting, and this message would take it over \
         its max_backlog of {limit} bytes"
    )]
    Backlog {
        instance: String,
        backlog: u64,
        limit: u64,
    },
    #[error("the ledger is full: {0}")]
    LedgerFull(String),
    #[error(
        "no instance subscribes to topic \"{0}\", and unrouted = \"refuse\" (check the topics \
         in plugins.toml, or `plugind ctl plugins`)"
    )]
    Unrouted(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("the ledger failed: {0}")]
    LedgerFailed(String),
}

impl From<&Refused> for PublishError {
    fn from(refused: &Refused) -> Self {
        let kind = match refused {
            Refused::Invalid(_) | Refused::Unrouted(_) => PublishErrorKind::Invalid,
            Refused::Backlog { .. } | Refused::LedgerFull(_) => PublishErrorKind::ResourceExhausted,
            Refused::ShuttingDown => PublishErrorKind::ShuttingDown,
            Refused::LedgerFailed(_) => PublishErrorKind::Unavailable,
        };
        PublishError {
            kind,
            message: refused.to_string(),
        }
    }
}

/// Bytes waiting per instance: added at acceptance, removed when a delivery ends. Instances
/// are added while the engine runs (hot plug); an id, once given, stays.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Indexed by instance id; replaced whole when one is added (rare), read lock-free.
    entries: ArcSwap<Vec<Arc<BacklogEntry>>>,
}

#[derive(Debug)]
struct BacklogEntry {
    name: String,
    limit: AtomicU64,
    bytes: AtomicU64,
    /// Deliveries waiting or in flight.
    count: AtomicU64,
}

impl Backlog {
    /// One entry per instance id: its name and `max_backlog`.
    pub fn new(instances: &[(String, u64)]) -> Self {
        let backlog = Self::default();
        for (name, limit) in instances {
            backlog.push(name, *limit);
        }
        backlog
    }

    /// Adds the next instance id; returns it.
    pub fn push(&self, name: &str, limit: u64) -> InstanceId {
        let mut entries = Vec::clone(&self.entries.load());
        entries.push(Arc::new(BacklogEntry {
            name: name.to_owned(),
            limit: AtomicU64::new(limit),
            bytes: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }));
        let id = entries.len() - 1;
        self.entries.store(Arc::new(entries));
        id as InstanceId
    }

    /// A new `max_backlog` for an instance.
    pub fn set_limit(&self, instance: InstanceId, limit: u64) {
        self.entries.load()[instance as usize]
            .limit
            .store(limit, Ordering::Relaxed);
    }

    pub fn bytes(&self, instance: InstanceId) -> u64 {
        self.entries.load()[instance as usize]
            .bytes
            .load(Ordering::Relaxed)
    }

    /// Deliveries waiting or in flight for an instance.
    pub fn count(&self, instance: InstanceId) -> u64 {
        self.entries.load()[instance as usize]
            .count
            .load(Ordering::Relaxed)
    }

    /// One delivery of `size` payload bytes joins the instance's backlog.
    pub(crate) fn add(&self, instance: InstanceId, size: u64) {
        let entries = self.entries.load();
        let entry = &entries[instance as usize];
        entry.bytes.fetch_add(size, Ordering::Relaxed);
        entry.count.fetch_add(1, Ordering::Relaxed);
    }

    /// One delivery of `size` payload bytes left it.
    pub(crate) fn remove(&self, instance: InstanceId, size: u64) {
        let entries = self.entries.load();
        let entry = &entries[instance as usize];
        let less = |n: u64| move |b: u64| Some(b.saturating_sub(n));
        let _ = entry
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(size));
        let _ = entry
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, less(1));
    }

    fn check(&self, instance: InstanceId, size: u64) -> Result<(), Refused> {
        let entries = self.entries.load();
        let entry = &entries[instance as usize];
        let backlog = entry.bytes.load(Ordering::Relaxed);
        let limit = entry.limit.load(Ordering::Relaxed);
        if backlog.saturating_add(size) > limit {
            return Err(Refused::Backlog {
                instance: entry.name.clone(),
                backlog,
                limit,
            });
        }
        Ok(())
    }
}

/// The ingress of one engine.
pub struct Ingress {
    routing: ArcSwap<Routing>,
    next_id: AtomicU64,
    ledger: Arc<dyn Ledger>,
    dispatcher: Sender<dispatch::Input>,
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
        dispatcher: Sender<dispatch::Input>,
        backlog: Arc<Backlog>,
        max_message_size: u64,
        clock: Arc<dyn Clock>,
        events: Arc<Events>,
    ) -> Self {
        Self {
            routing: ArcSwap::from_pointee(routing),
            next_id: AtomicU64::new(next_id),
            ledger,
            dispatcher,
            backlog,
            max_message_size,
            clock,
            open: AtomicBool::new(true),
            refuse_unrouted: AtomicBool::new(false),
            unrouted: AtomicU64::new(0),
            unrouted_reported: AtomicU64::new(0),
            unrouted_second: AtomicU64::new(0),
            events,
        }
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

    /// Validates and routes one message and gives it an id (none when it matches no
    /// instance and is refused).
    pub(crate) fn prepare(
        &self,
        message: NewMessage,
        source: Source,
        now: Timestamp,
    ) -> Result<(Accepted, Option<String>), Refused> {
        topic::validate_topic(&message.topic)
            .map_err(|e| Refused::Invalid(format!("topic \"{}\" {e}", message.topic)))?;
        let size = message.payload.len() as u64;
        if size > self.max_message_size {
            return Err(Refused::Invalid(format!(
                "payload of {size} bytes is over max_message_size ({} bytes)",
                self.max_message_size
            )));
        }
        let targets = self.routing.load().targets(&message.topic);
        if targets.is_empty() {
            self.unrouted_publish(&message.topic, now);
            if source == Source::Producer && self.refuse_unrouted.load(Ordering::Relaxed) {
                return Err(Refused::Unrouted(message.topic));
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
        };
        Ok((accepted, message.key))
    }

    /// Validates, routes and numbers a batch and hands its records to the ledger. Ids follow
    /// the order of the calls; finish with [`Ingress::complete`] once the receipt answered
    /// (or use [`Ingress::publish`] / [`Ingress::publish_async`]).
    pub fn submit(&self, batch: Vec<NewMessage>) -> Submitted {
        if !self.open.load(Ordering::Acquire) {
            return Submitted {
                results: batch.iter().map(|_| Err(Refused::ShuttingDown)).collect(),
                receipt: Receipt::Ready(Ok(())),
            };
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut accepted = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        // One clock read per batch: the batch is accepted at one time.
        let now = self.clock.now();
        for message in batch {
            match self.prepare(message, Source::Producer, now) {
                Ok((a, key)) => {
                    results.push(Ok(Published {
                        id: a.message.id,
                        instances: a.targets.len() as u32,
                    }));
                    if let Some(key) = key {
                        records.push(Record::Key {
                            key,
                            message: a.message.id,
                            at: now,
                        });
                    }
                    if !a.targets.is_empty() {
                        records.push(Record::Accepted {
                            message: a.message.clone(),
                            targets: a.targets.clone(),
                        });
                        accepted.push(a);
                    }
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let receipt = if records.is_empty() {
            Receipt::Ready(Ok(()))
        } else if accepted.is_empty() {
            self.ledger.submit(records, Wait::Durable)
        } else {
            // Once durable, the messages go to the dispatcher straight from the ledger's
            // thread (before the publisher hears of it): the publishing task's turn on the
            // runtime is not on their way to the plugins.
            let (backlog, dispatcher) = (self.backlog.clone(), self.dispatcher.clone());
            let dispatch = move || {
                for a in &accepted {
                    for target in &a.targets {
                        backlog.add(*target, a.message.payload.len() as u64);
                    }
                }
                // The dispatcher ends only after the ingress closed; a failed send means it
                // is gone.
                let _ = dispatcher.send(dispatch::Input::Accepted(accepted));
            };
            self.ledger
                .submit_then(records, Wait::Durable, Some(Box::new(dispatch)))
        };
        Submitted { results, receipt }
    }

    /// Finishes a submitted batch with the ledger's answer: on success the messages are
    /// already with the dispatcher (see [`Ingress::submit`]); otherwise each is refused with
    /// the reason.
    pub fn complete(
        &self,
        submitted: Submitted,
        recorded: Result<(), LedgerError>,
    ) -> Vec<Result<Published, Refused>> {
        let Submitted { mut results, .. } = submitted;
        if let Err(e) = recorded {
            let refused = match e {
                LedgerError::Full(m) => Refused::LedgerFull(m),
                other => Refused::LedgerFailed(other.to_string()),
            };
            for result in &mut results {
                if result.is_ok() {
                    *result = Err(refused.clone());
                }
            }
        }
        results
    }

    /// Publishes a batch: each message gets its id or its refusal; the accepted ones are
    /// durable in the ledger when this returns. Blocks: for plain threads.
    pub fn publish(&self, batch: Vec<NewMessage>) -> Vec<Result<Published, Refused>> {
        let mut submitted = self.submit(batch);
        let receipt = submitted.take_receipt();
        self.complete(submitted, receipt.wait())
    }

    /// [`Ingress::publish`] for async code: waits for the ledger without blocking a thread.
    pub async fn publish_async(&self, batch: Vec<NewMessage>) -> Vec<Result<Published, Refused>> {
        let mut submitted = self.submit(batch);
        let receipt = submitted.take_receipt();
        self.complete(submitted, receipt.done().await)
    }

    /// Publishes one message.
    ///
    /// # Errors
    /// [`Refused`] with the reason.
    pub fn publish_one(&self, message: NewMessage) -> Result<Published, Refused> {
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

    fn admits(&self, topic: &str) -> bool {
        Ingress::admits(self, topic)
    }
}
