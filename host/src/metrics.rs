//! The daemon's metrics recorders: what the hot path writes for the metrics alone. The
//! Prometheus adapter over the front that renders them with everything else the status
//! shows, and its endpoint, are the `exporter` module.
//!
//! Counters and gauges are not kept here: the metrics read the same snapshots `ctl status`
//! and `ctl plugins` show (`Front::observe`: the dispatcher's `InstanceStats`, the
//! supervisor's view, the ledger's `CommitStats`). What only the metrics
//! need is recorded where it happens, one call each, into the recorders below: each a set of
//! atomics (no lock, no allocation per message).
//!
//! The recorders are process-wide, keyed by [`InstanceId`]: one daemon (one engine) runs per
//! process; in-process tests that start several engines share them, and nothing reads them
//! but the metrics.

mod histogram;

use std::{
    cell::RefCell,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use plugind_api::{Outcome, hosting::CallError};

pub use histogram::{AtomicHistogram, Distribution, Scale};

use crate::{
    clock::{Clock, Timestamp},
    routing::InstanceId,
};

/// Buckets of `plugind_handle_duration_seconds`, in ns: 1 µs to 60 s.
pub static HANDLE_NANOS: [u64; 24] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// Buckets of `plugind_publish_to_settle_seconds`, in ms (the publish time is kept in ms):
/// 1 ms to 1 h.
pub static SETTLE_MILLIS: [u64; 18] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
    900_000, 3_600_000,
];

/// Buckets of the ledger's commit and fsync latency, in µs: 50 µs to 5 s.
pub static LEDGER_MICROS: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Buckets of the records per commit.
pub static BATCH_RECORDS: [u64; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384];

/// The histograms of one instance, recorded by its actor.
#[derive(Debug)]
struct Recorders {
    handle: AtomicHistogram,
    settle: AtomicHistogram,
}

impl Recorders {
    fn new() -> Self {
        Self {
            handle: AtomicHistogram::new(&HANDLE_NANOS, Scale::Nanos),
            settle: AtomicHistogram::new(&SETTLE_MILLIS, Scale::Millis),
        }
    }
}

/// Every instance's recorders, by id (locked only when a thread first records for an
/// instance, and by a scrape).
static INSTANCES: Mutex<Vec<Option<Arc<Recorders>>>> = Mutex::new(Vec::new());

thread_local! {
    /// The recorders this thread records into: an actor's thread serves one instance.
    static CACHED: RefCell<Option<(InstanceId, Arc<Recorders>)>> = const { RefCell::new(None) };
}

fn recorders(id: InstanceId) -> Arc<Recorders> {
    let mut table = INSTANCES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let index = id as usize;
    if table.len() <= index {
        table.resize(index + 1, None);
    }
    table[index]
        .get_or_insert_with(|| Arc::new(Recorders::new()))
        .clone()
}

/// Runs `call` (one `handle` of `instance`'s plugin, published at `published` by `clock`)
/// and records how long it took, and, when its outcome settles the delivery (an ack or a
/// rejection), the time from the publish to now.
pub fn handled<T>(
    instance: InstanceId,
    published: Timestamp,
    clock: &dyn Clock,
    call: impl FnOnce() -> (Result<Outcome, CallError>, T),
) -> (Result<Outcome, CallError>, T) {
    let started = Instant::now();
    let answer = call();
    let took = started.elapsed();
    let settled = matches!(answer.0, Ok(Outcome::Ack | Outcome::Reject { .. }));
    let since_publish = settled.then(|| clock.now().since(published));
    CACHED.with_borrow_mut(|cached| {
        let recorders = match cached {
            Some((id, recorders)) if *id == instance => recorders,
            _ => &cached.insert((instance, self::recorders(instance))).1,
        };
        recorders
            .handle
            .observe(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        if let Some(latency) = since_publish {
            recorders
                .settle
                .observe(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
        }
    });
    answer
}

/// Where the publish-to-settle times of one instance's deferred attempts go (found once per
/// actor generation, so that a token's settlement takes no lock).
#[derive(Clone)]
pub struct SettleRecorder(Arc<Recorders>);

impl std::fmt::Debug for SettleRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettleRecorder").finish_non_exhaustive()
    }
}

impl SettleRecorder {
    /// The recorder of `instance`.
    pub fn of(instance: InstanceId) -> Self {
        Self(recorders(instance))
    }

    /// A deferred attempt published at `published` was settled now (by `clock`) through its
    /// token with an ack or a rejection.
    pub fn settled(&self, published: Timestamp, clock: &dyn Clock) {
        let latency = clock.now().since(published);
        self.0
            .settle
            .observe(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
    }
}

/// The histograms of one instance, as observed now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceHistograms {
    /// How long its `handle` calls took.
    pub handle: Distribution,
    /// From the publish to the end of the call that acked or rejected it.
    pub settle: Distribution,
}

/// The histograms of instance `id` (empty before its first call).
pub fn instance_histograms(id: InstanceId) -> InstanceHistograms {
    let recorders = recorders(id);
    InstanceHistograms {
        handle: recorders.handle.distribution(),
        settle: recorders.settle.distribution(),
    }
}

/// The gRPC status codes, by number (`tonic::Code` as `i32`).
pub const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static REFUSED: [AtomicU64; 17] = [const { AtomicU64::new(0) }; 17];

/// Counts the answers of one batch published through the API: accepted, or refused with a
/// gRPC status code (`tonic::Code` as `i32`).
pub fn published(answers: impl IntoIterator<Item = Result<(), i32>>) {
    let mut accepted = 0;
    for answer in answers {
        match answer {
            Ok(()) => accepted += 1,
            Err(code) => {
                let slot = usize::try_from(code).unwrap_or(2).min(16);
                REFUSED[slot].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ACCEPTED.fetch_add(accepted, Ordering::Relaxed);
}

/// Publishes accepted through the API, and refused by status code (the ones counted).
pub fn publishes() -> (u64, Vec<(&'static str, u64)>) {
    let refused = CODES
        .iter()
        .zip(&REFUSED)
        .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
        .filter(|(_, n)| *n > 0)
        .collect();
    (ACCEPTED.load(Ordering::Relaxed), refused)
}

static WATCHERS: AtomicU64 = AtomicU64::new(0);

/// Counts one open watch while it lives.
#[derive(Debug)]
pub struct Watching(());

impl Watching {
    /// One more watch open, until this is dropped.
    pub fn new() -> Self {
        WATCHERS.fetch_add(1, Ordering::Relaxed);
        Self(())
    }
}

impl Default for Watching {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        WATCHERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Watch streams open now.
pub fn watchers() -> u64 {
    WATCHERS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_call_is_timed_and_an_ack_measured_from_its_publish() {
        // An id no other test uses: the recorders are process-wide.
        let id: InstanceId = 9_001;
        let clock = ManualClock::at(Timestamp(10_000));
        let (answer, ()) = handled(id, Timestamp(9_990), &clock, || (Ok(Outcome::Ack), ()));
        assert!(answer.is_ok());
        let retry = Outcome::Retry {
            after: None,
            reason: "later".into(),
        };
        let _ = handled(id, Timestamp(9_990), &clock, || (Ok(retry), ()));
        let h = instance_histograms(id);
        assert_eq!(h.handle.count, 2, "every call is timed");
        assert_eq!(h.settle.count, 1, "a retry does not settle");
        assert_eq!(h.settle.sum, 10, "10 ms from the publish");
        let bucket = h.settle.buckets.iter().find(|(le, _)| *le == 10);
        assert_eq!(bucket, Some(&(10, 1)));
    }
}
