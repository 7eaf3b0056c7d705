//! The ledger: the only writer of delivery state. Callers hand it batches of [`Record`]s —
//! what happened, in order — and each batch is applied atomically and is durable (per the
//! configured durability) when [`Ledger::commit`] returns.
//!
//! The dispatcher keeps the live state (which delivery is due, which is in flight) in memory
//! and writes every change here *before* acting on it: an attempt is recorded before plugin
//! code is called, a parent's ack is committed in the same batch as its children. A durable
//! ledger replays its records at start ([`Ledger::recover`]); this in-memory one keeps only
//! what outlives a delivery (dead letters) and counts, and recovers nothing.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

use crate::{
    clock::Timestamp,
    delivery::Delivery,
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
    /// Plugin code is about to be called for this attempt (the in-flight marker).
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
    /// A delivery ended as a dead letter.
    DeadLettered {
        message: Arc<StoredMessage>,
        instance: InstanceId,
        delivery: Delivery,
    },
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub message: u64,
    pub topic: String,
    pub instance: InstanceId,
    pub delivery: Delivery,
}

/// Why the ledger could not record something.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Out of space (ENOSPC/EDQUOT): publishing stops, deliveries go on.
    #[error("the ledger is full: {0}")]
    Full(String),
    /// A storage failure: the daemon must stop (an fsync is never retried).
    #[error("ledger storage failed: {0}")]
    Fatal(String),
}

/// What a ledger holds at start: deliveries not yet settled.
#[derive(Debug, Default)]
pub struct Recovered {
    /// (message, instance, its delivery), in acceptance order.
    pub pending: Vec<(Arc<StoredMessage>, InstanceId, Delivery)>,
    /// The first message id to use from now on.
    pub next_id: u64,
}

/// Counts of what the ledger recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub accepted: u64,
    pub attempts: u64,
    pub acked: u64,
    pub dead_lettered: u64,
}

/// The ledger interface.
pub trait Ledger: Send + Sync + 'static {
    /// Applies `records` atomically.
    ///
    /// # Errors
    /// [`LedgerError::Full`] or [`LedgerError::Fatal`]; nothing of the batch was applied.
    fn commit(&self, records: Vec<Record>) -> Result<(), LedgerError>;

    /// The pending deliveries and the next id, at start.
    ///
    /// # Errors
    /// [`LedgerError::Fatal`] if the stored state cannot be read.
    fn recover(&self) -> Result<Recovered, LedgerError>;

    /// Dead letters, optionally of one instance.
    fn dead_letters(&self, instance: Option<InstanceId>) -> Vec<DeadLetter>;

    fn counts(&self) -> Counts;
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
    dead: Mutex<Vec<DeadLetter>>,
}

impl MemoryLedger {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }
}

impl Ledger for MemoryLedger {
    fn commit(&self, records: Vec<Record>) -> Result<(), LedgerError> {
        let mut dead = Vec::new();
        for record in records {
            match record {
                Record::Accepted { .. } => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Record::Attempt { .. } => {
                    self.attempts.fetch_add(1, Ordering::Relaxed);
                }
                Record::Updated { .. } => {}
                Record::Acked { .. } => {
                    self.acked.fetch_add(1, Ordering::Relaxed);
                }
                Record::DeadLettered {
                    message,
                    instance,
                    delivery,
                } => dead.push(DeadLetter {
                    message: message.id,
                    topic: message.topic.clone(),
                    instance,
                    delivery,
                }),
            }
        }
        if !dead.is_empty() {
            self.dead
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(dead);
        }
        Ok(())
    }

    fn recover(&self) -> Result<Recovered, LedgerError> {
        Ok(Recovered {
            pending: Vec::new(),
            next_id: 1,
        })
    }

    fn dead_letters(&self, instance: Option<InstanceId>) -> Vec<DeadLetter> {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|d| instance.is_none_or(|i| d.instance == i))
            .cloned()
            .collect()
    }

    fn counts(&self) -> Counts {
        let dead = self.dead.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        Counts {
            accepted: self.accepted.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            dead_lettered: dead,
        }
    }
}
