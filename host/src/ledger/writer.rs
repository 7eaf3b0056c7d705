//! The ledger's writer thread (group commit of everything queued, the out-of-space rule,
//! operators' replays and purges a chunk at a time, housekeeping, a bounded log) and the
//! state the ledger's threads share with the callers. The syncer is in `syncer.rs`;
//! `durable` opens the ledger, recovers it and starts both.

mod operations;
mod space;

use std::{
    cell::Cell,
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, RwLock, atomic::AtomicU64},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use rusqlite::Connection;

use super::{
    FailStop, LedgerError, Record, Then, Wait,
    durable::Mode,
    lock,
    mark::{Answerer, Mark},
    store,
    syncer::{Waiting, record_answered},
};
use crate::{clock::Clock, message::StoredMessage};
pub(super) use operations::{CHUNK, Done, Op, Task};
pub(super) use space::{RESERVE, RESERVE_BYTES, ensure_reserve, release_reserve};

/// The most requests one transaction takes.
pub(super) const MAX_BATCH: usize = 4096;
pub(super) const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// One caller's batch as the writer takes it, with where to answer.
pub(super) type Commit = (Vec<Record>, Wait, Reply);

/// Where a batch's answer goes, and what its caller asked to run first on success.
pub(super) struct Reply {
    pub(super) answer: tokio::sync::oneshot::Sender<Result<(), LedgerError>>,
    pub(super) then: Option<Then>,
}

impl Reply {
    /// Runs the caller's [`Then`] if the batch was recorded, then answers the receipt.
    pub(super) fn send(self, result: Result<(), LedgerError>) {
        if result.is_ok()
            && let Some(then) = self.then
        {
            then();
        }
        // The caller may have stopped waiting: that is its business.
        let _ = self.answer.send(result);
    }
}

pub(super) enum Request {
    Commit {
        records: Vec<Record>,
        wait: Wait,
        reply: Reply,
    },
    Op {
        op: Op,
        reply: Sender<Result<Done, LedgerError>>,
    },
    Close {
        reply: Sender<()>,
    },
}

/// State shared by the callers and the writer.
pub(super) struct Shared {
    /// Persistent instance key by instance id.
    pub(super) keys: RwLock<Vec<u32>>,
    pub(super) fatal: OnceLock<String>,
    pub(super) fail_stop: Option<FailStop>,
    pub(super) accepted: AtomicU64,
    pub(super) attempts: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) stats: Mutex<Stats>,
    pub(super) bytes: AtomicU64,
}

pub(super) struct Stats {
    pub(super) commits: u64,
    pub(super) fsyncs: u64,
    pub(super) messages: u64,
    pub(super) records: u64,
    pub(super) latency: Histogram<u64>,
    pub(super) fsync_latency: Histogram<u64>,
    /// The syncer's passive checkpoints (copy into the database and its fsync).
    pub(super) checkpoint_latency: Histogram<u64>,
    /// Records per commit.
    pub(super) batch: Histogram<u64>,
    /// Checkpoints the writer ran itself to restart a full log.
    pub(super) log_restarts: u64,
}

impl Shared {
    pub(super) fn poison(&self, error: &LedgerError) {
        let message = error.to_string();
        if self.fatal.set(message.clone()).is_ok() {
            tracing::error!(error = %message, "the ledger failed: no further changes can be recorded");
            if let Some(fail_stop) = &self.fail_stop {
                fail_stop.report(&message);
            }
        }
    }

    /// The persistent instance keys, by instance id, as they are now.
    pub(super) fn keys_now(&self) -> Vec<u32> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn failed(&self) -> Option<LedgerError> {
        self.fatal
            .get()
            .map(|m| LedgerError::Fatal(format!("the ledger failed earlier: {m}")))
    }

    pub(super) fn key(&self, instance: crate::routing::InstanceId) -> Result<u32, LedgerError> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(instance as usize)
            .copied()
            .ok_or_else(|| LedgerError::Fatal(format!("instance #{instance} is unknown")))
    }
}

/// The highest id accepted in `batches` (0: none), and the id high-water mark they need:
/// past every id they record.
fn ids(batches: &[&[Record]]) -> (u64, u64) {
    let (mut accepted, mut needed) = (0, 0);
    for record in batches.iter().flat_map(|b| b.iter()) {
        match record {
            Record::Accepted { message, .. } => {
                accepted = accepted.max(message.id);
                needed = needed.max(message.id + 1);
            }
            Record::Key { message, .. } => needed = needed.max(message + 1),
            _ => {}
        }
    }
    (accepted, needed)
}

/// The log size past which the writer waits for a complete checkpoint.
pub(super) const LOG_RESTART_BYTES: u64 = 24 << 20;

thread_local! {
    /// Frames in the log after the last commit of this thread's connection (the writer
    /// thread's: every commit is the writer's).
    static LOG_FRAMES: Cell<u64> = const { Cell::new(0) };
}

/// SQLite's log hook on the writer's connection: called after each commit with the number of
/// frames the log holds.
pub(super) fn count_log_frames(
    _: &rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    LOG_FRAMES.set(u64::try_from(frames).unwrap_or(0));
    Ok(())
}

/// Message ids reserved in `meta` at a time.
pub(super) const ID_BLOCK: u64 = 1 << 16;

/// Applies `batches` inside the caller's transaction: the messages first (32 rows per
/// statement), then every other record in order; raises the id high-water mark in `meta` to
/// `reserve` when given (the mark beside the database was raised first) and the last id
/// recorded to `accepted` (0: no message in them). Returns how many messages it accepted.
fn apply(
    conn: &Connection,
    shared: &Shared,
    batches: &[&[Record]],
    reserve: Option<u64>,
    accepted: u64,
) -> Result<usize, LedgerError> {
    let map = |e: rusqlite::Error| store::classify("cannot write the ledger", &e);
    let keys = shared.keys_now();
    let key = |instance: crate::routing::InstanceId| {
        keys.get(instance as usize)
            .copied()
            .ok_or_else(|| LedgerError::Fatal(format!("instance #{instance} is unknown")))
    };
    let mut writes = store::Writes::new(conn).map_err(map)?;
    let mut keyed: Vec<(&StoredMessage, Vec<u32>)> = Vec::new();
    for record in batches.iter().flat_map(|b| b.iter()) {
        if let Record::Accepted { message, targets } = record {
            let keys = targets
                .iter()
                .map(|t| key(*t))
                .collect::<Result<Vec<u32>, _>>()?;
            keyed.push((message, keys));
        }
    }
    let messages: Vec<(&StoredMessage, &[u32])> =
        keyed.iter().map(|(m, k)| (*m, k.as_slice())).collect();
    writes.accept_all(conn, &messages).map_err(map)?;
    for record in batches.iter().flat_map(|b| b.iter()) {
        match record {
            // Inserted together, before the rest: nothing else in a batch refers to a
            // message accepted in it (its settlements come in later batches).
            Record::Accepted { .. } | Record::Attempt { .. } => {}
            Record::Key { key, message, at } => {
                writes.key(key, *message, *at).map_err(map)?;
            }
            Record::Updated {
                message,
                instance,
                delivery,
            } => writes
                .update(*message, key(*instance)?, delivery)
                .map_err(map)?,
            Record::Acked { message, instance } | Record::Purged { message, instance } => {
                writes.end(*message, key(*instance)?).map_err(map)?;
            }
            Record::DeadLettered {
                message,
                instance,
                delivery,
                at,
                ..
            } => writes
                .dead_letter(*message, key(*instance)?, delivery, *at)
                .map_err(map)?,
        }
    }
    drop(writes);
    if accepted > 0 {
        store::raise_last_id(conn, accepted).map_err(map)?;
    }
    if let Some(reserve) = reserve {
        store::raise_next_id(conn, reserve).map_err(map)?;
    }
    Ok(messages.len())
}

/// The writer thread's state.
pub(super) struct Writer {
    /// To the syncer: publishes of committed transactions, in `fsync` mode.
    pub(super) syncs: Sender<Waiting>,
    pub(super) conn: Connection,
    pub(super) shared: Arc<Shared>,
    pub(super) mode: Mode,
    pub(super) max_bytes: Option<u64>,
    pub(super) dedupe_window: Duration,
    pub(super) dead_letter_retention: Option<Duration>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) dir: PathBuf,
    /// The `synchronous` setting in force.
    pub(super) sync: Option<store::Sync>,
    /// Bytes of live pages, measured every so often.
    pub(super) used: u64,
    /// The database's page size.
    pub(super) page_size: u64,
    pub(super) commits_since_measure: u32,
    /// The id high-water mark in `meta` and in the mark beside the database: every id
    /// recorded is below it.
    pub(super) reserved: u64,
    /// The mark beside the database (its high-water mark is raised before `meta`'s).
    pub(super) mark: Mark,
    /// The mark's high-water mark (never below `reserved`; above it when a transaction that
    /// raised it failed).
    pub(super) marked: u64,
    /// Records the last id answered OK, in `buffered` mode (the syncer does in `fsync` mode).
    pub(super) answerer: Option<Answerer>,
    /// Replays, purges and forgets, in the order asked; the first one runs a chunk at a time
    /// between commits.
    pub(super) tasks: VecDeque<Task>,
    /// The reserve file was deleted to let settlements through on a full disk. Until
    /// housekeeping can reserve it again, publishes are refused: otherwise they would take
    /// the space freed for settlements, and the next settlement would find none (a fail-stop
    /// on a full disk, which must only refuse publishes).
    pub(super) reserve_released: bool,
    /// That the reserve cannot be made was said (once until it can be).
    pub(super) reserve_warned: bool,
    /// A give-back of free pages ran out of its time with pages left: the next housekeeping
    /// goes on with it, however few are left.
    pub(super) giving_back: bool,
}

impl Writer {
    pub(super) fn run(mut self, requests: &Receiver<Request>) {
        let mut housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            // With an operator's task under way the writer does not wait: it commits what
            // queued up, then runs the task's next chunk.
            let wait = if self.tasks.is_empty() {
                housekeeping.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match requests.recv_timeout(wait) {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    if self.process(batch) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.step();
            if Instant::now() >= housekeeping {
                self.housekeep();
                housekeeping = Instant::now() + HOUSEKEEPING;
            }
        }
    }

    /// Commits a batch of requests; returns whether a close was asked for (and done).
    pub(super) fn process(&mut self, batch: Vec<Request>) -> bool {
        let mut commits = Vec::with_capacity(batch.len());
        let mut ops = Vec::new();
        let mut closes = Vec::new();
        for request in batch {
            match request {
                Request::Commit {
                    records,
                    wait,
                    reply,
                } => commits.push((records, wait, reply)),
                Request::Op { op, reply } => ops.push((op, reply)),
                Request::Close { reply } => closes.push(reply),
            }
        }
        self.commit_requests(commits);
        for (op, reply) in ops {
            match op {
                Op::Replay(..) | Op::Purge(..) | Op::Forget(..) => {
                    let now = Instant::now();
                    self.tasks.push_back(Task {
                        op,
                        sweep: None,
                        replayed: Vec::new(),
                        count: 0,
                        started: now,
                        reported: now,
                        reply,
                    });
                }
                Op::Attach(..) | Op::Remember(..) => {
                    let _ = reply.send(self.operate(op));
                }
            }
        }
        if closes.is_empty() {
            return false;
        }
        // What operators asked for is finished first (each chunk is short).
        while !self.tasks.is_empty() {
            self.step();
        }
        self.close();
        for reply in closes {
            let _ = reply.send(());
        }
        true
    }

    pub(super) fn commit_requests(&mut self, commits: Vec<Commit>) {
        if let Some(e) = self.shared.failed() {
            for (_, _, reply) in commits {
                reply.send(Err(e.clone()));
            }
            return;
        }
        let (mut publishes, settles): (Vec<_>, Vec<_>) = commits
            .into_iter()
            .partition(|(_, wait, _)| *wait == Wait::Durable);
        if let Some(refusal) = self.refusal()
            && !publishes.is_empty()
        {
            for (_, _, reply) in publishes.drain(..) {
                reply.send(Err(refusal.clone()));
            }
        }
        let all: Vec<&[Record]> = publishes
            .iter()
            .chain(&settles)
            .map(|(r, ..)| r.as_slice())
            .collect();
        let result = self.transaction(&all);
        let result = match result {
            Err(LedgerError::Full(reason)) => {
                // Publishes are refused; settlements must still be written (reserved space).
                for (_, _, reply) in publishes.drain(..) {
                    reply.send(Err(LedgerError::Full(reason.clone())));
                }
                let settle: Vec<&[Record]> = settles.iter().map(|(r, ..)| r.as_slice()).collect();
                self.with_reserve(|w| w.transaction(&settle))
                    .map_err(|e| match e {
                        LedgerError::Full(m) => {
                            LedgerError::Fatal(format!("no space left even for settlements: {m}"))
                        }
                        other => other,
                    })
            }
            other => other,
        };
        if let Err(e) = &result {
            self.shared.poison(e);
        }
        for (_, _, reply) in settles {
            reply.send(result.clone());
        }
        // The highest id the publishes accepted: recorded in the mark before they are
        // answered, so that recovery can tell if the ledger later lost any of them.
        let answered = ids(&publishes
            .iter()
            .map(|(r, ..)| r.as_slice())
            .collect::<Vec<_>>())
        .0;
        if result.is_ok() && self.mode == Mode::Fsync && !publishes.is_empty() {
            let replies = publishes.into_iter().map(|(_, _, reply)| reply).collect();
            // Only the syncer answers publishes, in commit order: their messages reach the
            // dispatcher in that order (an fsync by the writer beside the syncer's could
            // answer a later commit first).
            // The syncer ends only after the writer; a failed send means it is gone.
            let _ = self.syncs.send(Waiting { replies, answered });
        } else {
            let result = match (&result, &mut self.answerer) {
                (Ok(()), Some(answerer)) if !publishes.is_empty() => {
                    record_answered(answerer, answered)
                }
                _ => result,
            };
            if let Err(e @ LedgerError::Fatal(_)) = &result {
                self.shared.poison(e);
            }
            for (_, _, reply) in publishes {
                reply.send(result.clone());
            }
        }
    }

    /// Why publishes are refused before any write, if they are: over `max_ledger_bytes`, or
    /// the settlement reserve in use.
    fn refusal(&self) -> Option<LedgerError> {
        if let Some(limit) = self.max_bytes
            && self.used > limit
        {
            return Some(LedgerError::Full(format!(
                "the ledger holds {} bytes, over max_ledger_bytes ({limit} bytes)",
                self.used
            )));
        }
        self.reserve_released.then(|| {
            LedgerError::Full(format!(
                "no space left: the space reserved for settlements ({}, {} MiB) is in use; \
                 publishing resumes once it can be reserved again",
                self.dir.join(RESERVE).display(),
                RESERVE_BYTES >> 20
            ))
        })
    }

    pub(super) fn set_sync(&mut self, sync: store::Sync) -> Result<(), LedgerError> {
        if self.sync != Some(sync) {
            store::set_sync(&self.conn, sync)?;
            self.sync = Some(sync);
        }
        Ok(())
    }

    /// One transaction for all of `batches`, written to the OS (the syncer makes it durable).
    pub(super) fn transaction(&mut self, batches: &[&[Record]]) -> Result<(), LedgerError> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        self.set_sync(store::Sync::Written)?;
        let started = Instant::now();
        let (accepted, needed) = ids(batches);
        // Ids are reserved a block at a time: one fsync of the mark and one write of `meta`
        // per block, not per commit. The mark is raised first (it is never behind `meta`),
        // and before anything of the block is answered; after a crash, or a lost database,
        // the next ids start past the block (never reused).
        let reserve = (needed > self.reserved).then(|| needed + ID_BLOCK);
        if let Some(reserve) = reserve.filter(|r| *r > self.marked) {
            self.mark.reserve(reserve).map_err(|e| {
                LedgerError::Fatal(format!(
                    "cannot raise the id high-water mark in {}: {e}",
                    self.mark.path().display()
                ))
            })?;
            self.marked = reserve;
        }
        let messages = store::in_transaction(&self.conn, "cannot write the ledger", || {
            apply(&self.conn, &self.shared, batches, reserve, accepted)
        })?;
        if let Some(reserve) = reserve {
            self.reserved = reserve;
        }
        let micros = started.elapsed().as_micros() as u64;
        let records = batches.iter().map(|b| b.len() as u64).sum::<u64>();
        let mut stats = lock(&self.shared.stats);
        stats.commits += 1;
        stats.messages += messages as u64;
        stats.records += records;
        let _ = stats.latency.record(micros.max(1));
        let _ = stats.batch.record(records.max(1));
        drop(stats);
        self.commits_since_measure += 1;
        if self.commits_since_measure.is_multiple_of(32) {
            self.bound_log();
        }
        if self.commits_since_measure >= 256 {
            self.measure();
        }
        Ok(())
    }

    /// Keeps the write-ahead log bounded. Passive checkpoints (in the syncer) copy it
    /// into the database, but under a constant stream of commits the log is never entirely
    /// copied when a commit starts, so it is never reused and grows without end. Once it
    /// holds more than [`LOG_RESTART_BYTES`] of frames the writer runs one passive checkpoint
    /// itself, between two of its transactions: nothing is written meanwhile, so it copies
    /// the rest of the log (little: the syncer's checkpoints did most) unless a reader still
    /// uses it, and the next commit starts the log from the beginning, overwriting the file
    /// in place (it keeps its size up to `journal_size_limit`). A passive checkpoint never
    /// waits for a lock.
    ///
    /// The frames are counted by SQLite's log hook ([`count_log_frames`]), not from the
    /// file's size: the file keeps its size when the log restarts, so its size would ask for
    /// a checkpoint after every commit once it had grown once.
    pub(super) fn bound_log(&mut self) {
        // A frame is a page and its 24-byte header.
        if LOG_FRAMES.get() * (self.page_size + 24) > LOG_RESTART_BYTES {
            // (busy, frames in the log, frames copied): the log restarts at the next commit
            // only if all of it was copied. A checkpoint of the syncer's in progress makes
            // this one give up at once; it is tried again after the next commit, and only a
            // restart that happens is counted.
            let done = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                });
            match done {
                Ok((0, log, copied)) if log == copied => {
                    lock(&self.shared.stats).log_restarts += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    let error = store::classify("ledger checkpoint", &e);
                    if matches!(error, LedgerError::Fatal(_)) {
                        self.shared.poison(&error);
                    }
                }
            }
        }
    }

    /// Recovery's charges and the "running" mark (an exit before the next graceful stop is
    /// unclean), fsynced before anything is handed out. On a full disk each of the two
    /// transactions may use the reserve, as settlements do.
    pub(super) fn recovery_commit(
        &mut self,
        records: &[Record],
        next_id: u64,
        identity: u64,
    ) -> Result<(), LedgerError> {
        self.with_reserve(|w| w.transaction(&[records]))?;
        self.with_reserve(|w| {
            w.set_sync(store::Sync::Full)?;
            store::in_transaction(&w.conn, "ledger", || {
                store::set_meta(&w.conn, "clean", 0)?;
                store::set_meta(&w.conn, "next_id", next_id as i64)?;
                store::set_meta(&w.conn, "identity", identity as i64)?;
                // A ledger made before `last_id` existed starts counting now.
                store::init_meta(&w.conn, "last_id", 0)
            })
        })
    }

    /// A graceful stop: checkpoint, then mark the state clean (fsynced).
    pub(super) fn close(&mut self) {
        if self.shared.failed().is_some() {
            return;
        }
        let result = self.set_sync(store::Sync::Full).and_then(|()| {
            self.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .map_err(|e| store::classify("ledger checkpoint", &e))?;
            store::set_meta(&self.conn, "clean", 1)
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot mark the ledger clean; the next start charges attempts left in flight");
        }
    }
}
