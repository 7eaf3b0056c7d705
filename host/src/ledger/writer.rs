//! The ledger's threads: the writer (group commit of everything queued, the out-of-space
//! rule, housekeeping, a bounded log) and the syncer (the log's fsync before a publish is
//! answered, and passive checkpoints between fsyncs), and the state they share with the
//! callers. `durable` opens the ledger, recovers it and starts them.

use std::{
    cell::Cell,
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use rusqlite::Connection;

use super::{
    Forget, LedgerError, Record, Selection, Then, Wait,
    durable::{FailStop, Mode},
    lock, store,
};
use crate::{
    clock::{Clock, Timestamp},
    delivery::Delivery,
    message::StoredMessage,
};

/// Bytes kept free for settlements when the disk fills up.
pub(super) const RESERVE_BYTES: usize = 8 << 20;
pub(super) const RESERVE: &str = "reserve";
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

/// An operator's change, run by the writer in a transaction of its own.
pub(super) enum Op {
    Replay(Selection, Timestamp),
    Purge(Selection),
    Forget(String, Forget, Timestamp),
    /// An instance added while running: its key, registered if new, and what waits for it.
    Attach(String),
    /// What is remembered of an instance (its subscription, a pause).
    Remember(String, super::Remembered),
}

pub(super) enum Done {
    Replayed(Vec<(u64, u32, Delivery, u64)>),
    Count(u64),
    Attached(u32, Vec<store::StoredDelivery>),
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
    /// Checkpoints the writer ran itself to restart a full log.
    pub(super) log_restarts: u64,
}

impl Shared {
    pub(super) fn poison(&self, error: &LedgerError) {
        let message = error.to_string();
        if self.fatal.set(message.clone()).is_ok() {
            tracing::error!(error = %message, "the ledger failed: no further changes can be recorded");
            if let Some(hook) = &self.fail_stop {
                hook(&message);
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

/// Deletes the reserve file to make room on a full disk; whether there was one.
pub(super) fn release_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE);
    let released = fs::remove_file(&path).is_ok();
    if released {
        tracing::warn!(path = %path.display(), "disk full: releasing the space reserved for settlements");
    }
    released
}

/// Keeps a reserve file so that settlements can still be written when the disk is full.
/// Returns whether it is in place.
pub(super) fn ensure_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE);
    if fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES as u64) {
        return true;
    }
    let made = File::create(&path).and_then(|mut f| {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    });
    if let Err(e) = made {
        let _ = fs::remove_file(&path);
        tracing::warn!(path = %path.display(), error = %e, "cannot reserve space for settlements");
        return false;
    }
    true
}

/// Publishes waiting for the fsync that covers them.
pub(super) type Waiting = Vec<Reply>;

/// The syncer thread: fsyncs the write-ahead log for the commits handed to it, then answers
/// their publishes.
pub(super) struct Syncer {
    pub(super) log: Log,
    pub(super) shared: Arc<Shared>,
    /// Passive checkpoints run here, between two log fsyncs and only when no publish waits:
    /// the database's fsync never runs beside the log's, so a publish never waits for a
    /// checkpoint's writeback inside its own fsync.
    pub(super) checkpoints: Connection,
    pub(super) last_checkpoint: Instant,
}

impl Syncer {
    pub(super) fn run(mut self, requests: &Receiver<Waiting>) {
        loop {
            let mut waiting = match requests.recv_timeout(CHECKPOINT_EVERY) {
                Ok(waiting) => waiting,
                Err(RecvTimeoutError::Timeout) => Vec::new(),
                Err(RecvTimeoutError::Disconnected) => return,
            };
            for more in requests.try_iter() {
                waiting.extend(more);
            }
            if !waiting.is_empty() {
                self.log.sync_and_answer(&self.shared, waiting);
            }
            if requests.is_empty() && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                self.checkpoint();
            }
        }
    }

    /// A passive checkpoint: copies what it can of the log into the database, never waits.
    pub(super) fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if self.shared.failed().is_some() {
            return;
        }
        if let Err(e) = self
            .checkpoints
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            let error = store::classify("ledger checkpoint", &e);
            if matches!(error, LedgerError::Fatal(_)) {
                self.shared.poison(&error);
            }
        }
        let micros = self.last_checkpoint.elapsed().as_micros() as u64;
        let _ = lock(&self.shared.stats)
            .checkpoint_latency
            .record(micros.max(1));
        if micros > 1000 {
            tracing::debug!(micros, "slow ledger checkpoint");
        }
    }
}

/// The write-ahead log, opened for the syncer's fsyncs.
pub(super) struct Log {
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
}

impl Log {
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// One `fdatasync` of the log. A failure is final: it is never retried (after a failed
    /// fsync the kernel may have dropped the dirty pages; a retry would report success).
    pub(super) fn sync(&mut self, shared: &Shared) -> Result<(), LedgerError> {
        let started = Instant::now();
        let file = match &self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.path).map_err(|e| {
                LedgerError::Fatal(format!("cannot open {}: {e}", self.path.display()))
            })?),
        };
        file.sync_data().map_err(|e| {
            LedgerError::Fatal(format!("fsync of {} failed: {e}", self.path.display()))
        })?;
        let micros = started.elapsed().as_micros() as u64;
        if micros > 10_000 {
            tracing::debug!(micros, "slow log fsync");
        }
        let mut stats = lock(&shared.stats);
        stats.fsyncs += 1;
        let _ = stats.fsync_latency.record(micros.max(1));
        Ok(())
    }

    /// [`Log::sync`] unless the ledger failed already; then answers `waiting` (and poisons
    /// the ledger on a failure).
    pub(super) fn sync_and_answer(&mut self, shared: &Shared, waiting: Waiting) {
        let result = match shared.failed() {
            Some(e) => Err(e),
            None => self.sync(shared),
        };
        if let Err(e) = &result {
            shared.poison(e);
        }
        for reply in waiting {
            reply.send(result.clone());
        }
    }
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

/// How often the syncer copies the log into the database when no publish waits.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Applies `batches` inside the caller's transaction: the messages first (32 rows per
/// statement), then every other record in order. Raises the id high-water mark past
/// `reserved` when needed. Returns (messages accepted, the new high-water mark).
fn apply(
    conn: &Connection,
    shared: &Shared,
    batches: &[&[Record]],
    reserved: u64,
) -> Result<(usize, u64), LedgerError> {
    let map = |e: rusqlite::Error| store::classify("cannot write the ledger", &e);
    let mut next_id = 0;
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
            next_id = next_id.max(message.id + 1);
        }
    }
    let accepted: Vec<(&StoredMessage, &[u32])> =
        keyed.iter().map(|(m, k)| (*m, k.as_slice())).collect();
    writes.accept_all(conn, &accepted).map_err(map)?;
    for record in batches.iter().flat_map(|b| b.iter()) {
        match record {
            // Inserted together, before the rest: nothing else in a batch refers to a
            // message accepted in it (its settlements come in later batches).
            Record::Accepted { .. } | Record::Attempt { .. } => {}
            Record::Key { key, message, at } => {
                writes.key(key, *message, *at).map_err(map)?;
                next_id = next_id.max(message + 1);
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
    if next_id <= reserved {
        return Ok((accepted.len(), reserved));
    }
    // Ids are reserved a block at a time: one write of `meta` per block, not per commit.
    // After a crash the next ids start past the block (never reused).
    let reserved = next_id + ID_BLOCK;
    store::raise_next_id(conn, reserved).map_err(map)?;
    Ok((accepted.len(), reserved))
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
    /// The id high-water mark in `meta`: every id recorded is below it.
    pub(super) reserved: u64,
    /// The reserve file was deleted to let settlements through on a full disk. Until
    /// housekeeping can reserve it again, publishes are refused: otherwise they would take
    /// the space freed for settlements, and the next settlement would find none (a fail-stop
    /// on a full disk, which must only refuse publishes).
    pub(super) reserve_released: bool,
}

impl Writer {
    pub(super) fn run(mut self, requests: &Receiver<Request>) {
        let mut housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            let wait = housekeeping.saturating_duration_since(Instant::now());
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
            let _ = reply.send(self.operate(op));
        }
        if closes.is_empty() {
            return false;
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
        if result.is_ok() && self.mode == Mode::Fsync && !publishes.is_empty() {
            let waiting = publishes.into_iter().map(|(_, _, reply)| reply).collect();
            // Only the syncer answers publishes, in commit order: their messages reach the
            // dispatcher in that order (an fsync by the writer beside the syncer's could
            // answer a later commit first).
            // The syncer ends only after the writer; a failed send means it is gone.
            let _ = self.syncs.send(waiting);
        } else {
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

    /// An operator's change, fsynced in a transaction of its own.
    pub(super) fn operate(&mut self, op: Op) -> Result<Done, LedgerError> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        self.set_sync(store::Sync::Full)?;
        let conn = &self.conn;
        let done = store::in_transaction(conn, "ledger", || match op {
            Op::Replay(selection, now) => store::replay(conn, &selection, now).map(Done::Replayed),
            Op::Purge(selection) => store::purge(conn, &selection).map(Done::Count),
            Op::Forget(name, how, now) => store::forget(conn, &name, how, now).map(Done::Count),
            Op::Remember(name, remembered) => {
                store::remember(conn, &name, &remembered).map(|()| Done::Count(0))
            }
            Op::Attach(name) => {
                let [key] = store::instance_keys(conn, &[name])?[..] else {
                    unreachable!("one key per name");
                };
                let mut waiting = Vec::new();
                store::scan(conn, Some(key), |stored| {
                    waiting.push(stored);
                    Ok(())
                })?;
                Ok(Done::Attached(key, waiting))
            }
        });
        if let Err(e @ LedgerError::Fatal(_)) = &done {
            self.shared.poison(e);
        }
        done
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
        let (messages, reserved) =
            store::in_transaction(&self.conn, "cannot write the ledger", || {
                apply(&self.conn, &self.shared, batches, self.reserved)
            })?;
        self.reserved = reserved;
        let micros = started.elapsed().as_micros() as u64;
        let records = batches.iter().map(|b| b.len() as u64).sum::<u64>();
        let mut stats = lock(&self.shared.stats);
        stats.commits += 1;
        stats.messages += messages as u64;
        stats.records += records;
        let _ = stats.latency.record(micros.max(1));
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
    ) -> Result<(), LedgerError> {
        self.with_reserve(|w| w.transaction(&[records]))?;
        self.with_reserve(|w| {
            w.set_sync(store::Sync::Full)?;
            store::in_transaction(&w.conn, "ledger", || {
                store::set_meta(&w.conn, "clean", 0)?;
                store::set_meta(&w.conn, "next_id", next_id as i64)
            })
        })
    }

    /// Runs `step` (one transaction, rolled back when it fails); when it fails for want of
    /// space and the reserve is still there, releases the reserve and runs it once more.
    pub(super) fn with_reserve(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        match step(self) {
            Err(LedgerError::Full(_)) if release_reserve(&self.dir) => {
                self.reserve_released = true;
                step(self)
            }
            done => done,
        }
    }

    pub(super) fn measure(&mut self) {
        self.commits_since_measure = 0;
        if let Ok(used) = store::used_bytes(&self.conn) {
            self.used = used;
        }
        let on_disk = [store::FILE, store::LOG]
            .iter()
            .filter_map(|f| fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        self.shared.bytes.store(on_disk, Ordering::Relaxed);
    }

    /// Expired keys and dead letters go; free pages go back to the file system.
    pub(super) fn housekeep(&mut self) {
        if self.shared.failed().is_some() {
            return;
        }
        let started = Instant::now();
        let now = self.clock.now();
        let keys_before = Timestamp(now.0.saturating_sub(self.dedupe_window.as_millis() as u64));
        let dead_before = self
            .dead_letter_retention
            .map(|r| Timestamp(now.0.saturating_sub(r.as_millis() as u64)));
        let result = self.set_sync(store::Sync::Written).and_then(|()| {
            store::expire(&self.conn, keys_before, dead_before)
                .and_then(|removed| store::vacuum(&self.conn).map(|()| removed))
                .map_err(|e| store::classify("ledger housekeeping", &e))
        });
        match result {
            Ok((_, dead)) if dead > 0 => {
                tracing::info!(
                    removed = dead,
                    "dead letters past dead_letter_retention removed"
                );
            }
            Ok(_) => {}
            Err(LedgerError::Full(_)) => {}
            Err(e) => self.shared.poison(&e),
        }
        self.measure();
        let micros = started.elapsed().as_micros() as u64;
        if micros > 1000 {
            tracing::debug!(micros, "slow ledger housekeeping");
        }
        if !self.dir.join(RESERVE).exists() && ensure_reserve(&self.dir) && self.reserve_released {
            self.reserve_released = false;
            tracing::info!("space reserved for settlements again: publishing resumes");
        }
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
