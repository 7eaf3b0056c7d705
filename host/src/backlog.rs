//! [`Backlog`]: the bytes and deliveries waiting per instance, against its `max_backlog`.
//! The ingress checks a producer's publish against it and counts what the ledger recorded;
//! the dispatcher takes a delivery out when it ends (acked, dead-lettered, purged).
//! Lock-free: one atomic per counter, the table swapped whole when an instance is added.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arc_swap::ArcSwap;

use crate::routing::InstanceId;

/// A delivery that would take an instance over its `max_backlog`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "instance `{instance}` has {backlog} bytes waiting, and this message would take it over its \
     max_backlog of {limit} bytes"
)]
pub struct BacklogFull {
    pub instance: String,
    /// Its bytes waiting now.
    pub backlog: u64,
    /// Its `max_backlog`.
    pub limit: u64,
}

/// Bytes waiting per instance: added at acceptance, removed when a delivery ends. Instances
/// are added while the engine runs (hot plug); an id, once given, stays.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Indexed by instance id; replaced whole when one is added (rare), read lock-free.
    entries: ArcSwap<Vec<Arc<InstanceBacklog>>>,
}

#[derive(Debug)]
struct InstanceBacklog {
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
        entries.push(Arc::new(InstanceBacklog {
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

    /// The instance's `max_backlog`, in bytes.
    pub fn limit(&self, instance: InstanceId) -> u64 {
        self.entries.load()[instance as usize]
            .limit
            .load(Ordering::Relaxed)
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

    /// Whether one more delivery of `size` bytes stays within the instance's `max_backlog`.
    ///
    /// # Errors
    /// [`BacklogFull`] naming the instance, its backlog and its limit.
    pub fn check(&self, instance: InstanceId, size: u64) -> Result<(), BacklogFull> {
        let entries = self.entries.load();
        let entry = &entries[instance as usize];
        let backlog = entry.bytes.load(Ordering::Relaxed);
        let limit = entry.limit.load(Ordering::Relaxed);
        if backlog.saturating_add(size) > limit {
            return Err(BacklogFull {
                instance: entry.name.clone(),
                backlog,
                limit,
            });
        }
        Ok(())
    }
}
