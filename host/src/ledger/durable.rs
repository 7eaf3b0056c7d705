//! The durable ledger: SQLite under `state_dir` with one writer thread doing group commit,
//! the in-flight marker file, recovery with crash accounting, retention and the fault rules.
//!
//! Group commit, pipelined: every caller hands its batch to the writer and waits; the writer
//! takes all that queued up while it was busy and applies it in one transaction — no
//! artificial wait when there is nothing to batch — committed with `synchronous = NORMAL`
//! (written to the OS: it survives a crash of the process). Settlements are answered then.
//! In `fsync` mode the publishes of that transaction go to the syncer thread, which
//! `fdatasync`s the write-ahead log and only then answers them; one fsync covers every
//! commit made before it started, and the writer builds the next transaction meanwhile.
//! (WAL + NORMAL + an fsync of the log after the commit is exactly what `synchronous = FULL`
//! does inside the commit: SQLite already syncs the log before each checkpoint and the
//! database after it, and the log header when the log is reused.)
//!
//! Faults (DESIGN.md §7): out of space refuses the publishes of the batch and retries the
//! settlements alone (releasing the reserve file if needed; publishes are then refused until
//! it can be made again, and opening on a full disk may release it too); any other storage
//! error poisons the ledger — every later commit fails — and calls the fail-stop hook.
//! Nothing is retried after a failed fsync.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded, unbounded};
use hdrhistogram::Histogram;
use rusqlite::Connection;

use super::{
    BacklogEntry, CommitStats, Counts, DeadLetter, DeadLetterFilter, Forget, HistoryEntry, Ledger,
    LedgerError, Pending, Receipt, Record, Recovered, Replayed, Selection, Wait, lock, markers,
    store,
};
use crate::{
    clock::{Clock, Timestamp},
    delivery::{Delivery, Rules, Transition},
    message::StoredMessage,
    routing::InstanceId,
};

/// `durability` for a durable ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A publish is answered after the fsync that covers it.
    Fsync,
    /// A publish is answered once written to the OS.
    Buffered,
}

/// A hook called once when the ledger fails for good (the daemon exits from it).
pub type FailStop = Arc<dyn Fn(&str) + Send + Sync>;

/// How to open a durable ledger.
#[derive(Clone)]
pub struct Options {
    pub mode: Mode,
    pub max_bytes: Option<u64>,
    pub dedupe_window: Duration,
    pub dead_letter_retention: Option<Duration>,
    pub clock: Arc<dyn Clock>,
    pub fail_stop: Option<FailStop>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("mode", &self.mode)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Bytes kept free for settlements when the disk fills up.
const RESERVE_BYTES: usize = 8 << 20;
const RESERVE: &str = "reserve";
const LOCK: &str = "lock";
/// The most requests one transaction takes.
const MAX_BATCH: usize = 4096;
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// One caller's batch as the writer takes it, with where to answer.
type Commit = (Vec<Record>, Wait, Reply);

/// Where a batch's answer goes.
type Reply = tokio::sync::oneshot::Sender<Result<(), LedgerError>>;

/// An operator's change, run by the writer in a transaction of its own.
enum Op {
    Replay(Selection, Timestamp),
    Purge(Selection),
    Forget(String, Forget, Timestamp),
}

enum Done {
    Replayed(Vec<(u64, u32, Delivery, u64)>),
    Count(u64),
}

enum Request {
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
struct Shared {
    /// Persistent instance key by instance id.
    keys: RwLock<Vec<u32>>,
    fatal: OnceLock<String>,
    fail_stop: Option<FailStop>,
    accepted: AtomicU64,
    attempts: AtomicU64,
    acked: AtomicU64,
    dead_lettered: AtomicU64,
    stats: Mutex<Stats>,
    bytes: AtomicU64,
}

struct Stats {
    commits: u64,
    fsyncs: u64,
    messages: u64,
    records: u64,
    latency: Histogram<u64>,
    fsync_latency: Histogram<u64>,
}

impl Shared {
    fn poison(&self, error: &LedgerError) {
        let message = error.to_string();
        if self.fatal.set(message.clone()).is_ok() {
            tracing::error!(error = %message, "the ledger failed: no further changes can be recorded");
            if let Some(hook) = &self.fail_stop {
                hook(&message);
            }
        }
    }

    fn failed(&self) -> Option<LedgerError> {
        self.fatal
            .get()
            .map(|m| LedgerError::Fatal(format!("the ledger failed earlier: {m}")))
    }

    fn key(&self, instance: crate::routing::InstanceId) -> Result<u32, LedgerError> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(instance as usize)
            .copied()
            .ok_or_else(|| LedgerError::Fatal(format!("instance #{instance} is unknown")))
    }
}

/// The durable ledger.
pub struct DurableLedger {
    dir: PathBuf,
    options: Options,
    requests: Sender<Request>,
    /// The writer's end, until recovery starts the writer.
    idle: Mutex<Option<(Connection, Receiver<Request>)>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Connection>,
    /// The in-flight marker slots, once recovered.
    slots: Mutex<Option<Arc<markers::Slots>>>,
    shared: Arc<Shared>,
    /// The reserve file was released (or could not be made) at open: the writer starts
    /// refusing publishes.
    reserve_released: bool,
    /// Held for the ledger's life: one daemon per state dir.
    _lock: File,
}

impl std::fmt::Debug for DurableLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableLedger")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl DurableLedger {
    /// Opens (or creates) the ledger in `dir`.
    ///
    /// # Errors
    /// [`LedgerError::Refused`] for a state dir in use by another daemon, or holding a newer
    /// format or another file; [`LedgerError::Fatal`] when it cannot be read.
    pub fn open(dir: &Path, options: Options) -> Result<Arc<Self>, LedgerError> {
        fs::create_dir_all(dir).map_err(|e| {
            LedgerError::Refused(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
        let lock = lock_state_dir(dir)?;
        // On a full disk even opening writes (the log's recovery, the settings): the reserve
        // goes, so that the daemon starts and delivers what is pending.
        let (conn, reserve_released) = match store::open(dir) {
            Err(LedgerError::Full(_)) if release_reserve(dir) => (store::open(dir)?, true),
            opened => (opened?, false),
        };
        let reader = store::open_reader(dir)?;
        // A reserve that cannot be made (the disk is about full) counts as released: publishes
        // are refused until housekeeping can make it (see `Writer::reserve_released`).
        let reserve_released = reserve_released || !ensure_reserve(dir);
        let (requests, receiver) = unbounded();
        let shared = Arc::new(Shared {
            keys: RwLock::default(),
            fatal: OnceLock::new(),
            fail_stop: options.fail_stop.clone(),
            accepted: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            stats: Mutex::new(Stats {
                commits: 0,
                fsyncs: 0,
                messages: 0,
                records: 0,
                latency: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
                fsync_latency: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
            }),
            bytes: AtomicU64::new(0),
        });
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            options,
            requests,
            idle: Mutex::new(Some((conn, receiver))),
            writer: Mutex::new(None),
            reader: Mutex::new(reader),
            slots: Mutex::new(None),
            shared,
            reserve_released,
            _lock: lock,
        }))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, op: Op) -> Result<Done, LedgerError> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        let (reply, answer) = bounded(1);
        let gone = || LedgerError::Fatal("the ledger writer is gone".into());
        self.requests
            .send(Request::Op { op, reply })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    fn count(&self, op: Op) -> Result<u64, LedgerError> {
        match self.run(op)? {
            Done::Count(n) => Ok(n),
            Done::Replayed(rows) => Ok(rows.len() as u64),
        }
    }

    fn send(&self, records: Vec<Record>, wait: Wait) -> Receipt {
        if let Some(e) = self.shared.failed() {
            return Receipt::Ready(Err(e));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        // A send fails only once the writer ended: the receipt then says it is gone.
        let _ = self.requests.send(Request::Commit {
            records,
            wait,
            reply,
        });
        Receipt::Pending(answer)
    }
}

/// Takes the state dir for this process: an exclusive lock on `state_dir/lock`, held as long
/// as the returned file is open (the kernel drops it when the process dies).
///
/// # Errors
/// [`LedgerError::Refused`] when another process holds it.
pub(super) fn lock_state_dir(dir: &Path) -> Result<File, LedgerError> {
    let path = dir.join(LOCK);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LedgerError::Fatal(format!("{}: {e}", path.display())))?;
    if lock.try_lock().is_err() {
        return Err(LedgerError::Refused(format!(
            "state dir {} is in use by another plugind (stop it first)",
            dir.display()
        )));
    }
    Ok(lock)
}

/// Deletes the reserve file to make room on a full disk; whether there was one.
fn release_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE);
    let released = fs::remove_file(&path).is_ok();
    if released {
        tracing::warn!(path = %path.display(), "disk full: releasing the space reserved for settlements");
    }
    released
}

/// Keeps a reserve file so that settlements can still be written when the disk is full.
/// Returns whether it is in place.
fn ensure_reserve(dir: &Path) -> bool {
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

impl Ledger for DurableLedger {
    fn submit(&self, records: Vec<Record>, wait: Wait) -> Receipt {
        let (mut accepted, mut attempts, mut acked, mut dead) = (0, 0, 0, 0);
        for record in &records {
            match record {
                Record::Accepted { .. } => accepted += 1,
                Record::Attempt { .. } => attempts += 1,
                Record::Acked { .. } => acked += 1,
                Record::DeadLettered { .. } => dead += 1,
                Record::Key { .. } | Record::Updated { .. } | Record::Purged { .. } => {}
            }
        }
        // An attempt's in-flight marker is its actor's slot (see `marker`): the writer
        // has nothing to do for it.
        let s = &self.shared;
        s.accepted.fetch_add(accepted, Ordering::Relaxed);
        s.attempts.fetch_add(attempts as u64, Ordering::Relaxed);
        s.acked.fetch_add(acked, Ordering::Relaxed);
        s.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        if attempts < records.len() {
            self.send(records, wait)
        } else {
            Receipt::Ready(Ok(()))
        }
    }

    fn recover(
        &self,
        instances: &[(String, Rules)],
        now: Timestamp,
    ) -> Result<Recovered, LedgerError> {
        let (conn, receiver) = lock(&self.idle)
            .take()
            .ok_or_else(|| LedgerError::Fatal("the ledger was already recovered".into()))?;
        let names: Vec<String> = instances.iter().map(|(n, _)| n.clone()).collect();
        let keys = store::instance_keys(&conn, &names)?;
        *self
            .shared
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.clone();
        let by_key: rustc_hash::FxHashMap<u32, usize> =
            keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let all_names: rustc_hash::FxHashMap<u32, String> =
            store::instance_names(&conn)?.into_iter().collect();
        let clean = store::meta(&conn, "clean")? == 1;
        let marks = markers::read(&self.dir).map_err(|e| {
            LedgerError::Fatal(format!(
                "cannot read {}: {e}",
                self.dir.join(markers::FILE).display()
            ))
        })?;
        for offset in &marks.corrupt {
            tracing::error!(
                file = %self.dir.join(markers::FILE).display(),
                offset,
                "corrupt in-flight marker: the attempt it names (if any) is not charged"
            );
        }
        let mut recovered = Recovered {
            next_id: store::meta(&conn, "next_id")?.max(1) as u64,
            unclean: !clean,
            ..Recovered::default()
        };
        let mut records = Vec::new();
        store::scan(&conn, |stored| {
            let name = all_names.get(&stored.inst).map_or("?", String::as_str);
            let Some(size) = stored.size else {
                tracing::error!(
                    id = stored.message,
                    instance = name,
                    "the ledger is corrupt: a pending delivery has no message; it is kept and \
                     not handed out"
                );
                return Ok(());
            };
            recovered.next_id = recovered.next_id.max(stored.message + 1);
            let Some(&id) = by_key.get(&stored.inst) else {
                recovered.orphaned += 1;
                return Ok(());
            };
            let mut delivery = match &stored.state {
                Some(bytes) => store::decode_delivery(bytes, stored.message, name)?,
                None => crate::delivery::Delivery::new(Timestamp(stored.published)),
            };
            let instance = id as crate::routing::InstanceId;
            if !clean
                && let Some(&attempt) = marks.marked.get(&(stored.message, stored.inst))
                && delivery.marked(attempt, now)
            {
                recovered.crashed += 1;
                match delivery.crashed(&instances[id].1, now, fastrand::f64()) {
                    Some(Transition::DeadLettered { reason }) => {
                        tracing::warn!(
                            id = stored.message,
                            instance = name,
                            failures = delivery.failures,
                            reason = %reason,
                            "dead-lettered after a crash"
                        );
                        records.push(Record::DeadLettered {
                            message: stored.message,
                            instance,
                            delivery,
                            at: now,
                            stored: None,
                        });
                        return Ok(());
                    }
                    _ => records.push(Record::Updated {
                        message: stored.message,
                        instance,
                        delivery: delivery.clone(),
                    }),
                }
            }
            recovered.pending.push(Pending {
                message: stored.message,
                instance,
                size,
                delivery,
                stored: None,
            });
            Ok(())
        })?;
        let (syncs, to_sync) = unbounded();
        let syncer = Syncer {
            wal: self.dir.join(format!("{}-wal", store::FILE)),
            file: None,
            shared: self.shared.clone(),
            checkpoints: Some(store::open_checkpointer(&self.dir)?),
            last_checkpoint: Instant::now(),
        };
        std::thread::Builder::new()
            .name("ledger-sync".into())
            .spawn(move || syncer.run(&to_sync))
            .map_err(|e| LedgerError::Fatal(format!("cannot start the ledger syncer: {e}")))?;
        // Acceptance order: first deliveries go out in it.
        recovered
            .pending
            .sort_unstable_by_key(|p| (p.message, p.instance));
        let mut writer = Writer {
            syncs,
            conn,
            shared: self.shared.clone(),
            mode: self.options.mode,
            max_bytes: self.options.max_bytes,
            dedupe_window: self.options.dedupe_window,
            dead_letter_retention: self.options.dead_letter_retention,
            clock: self.options.clock.clone(),
            dir: self.dir.clone(),
            sync: None,
            used: 0,
            commits_since_measure: 0,
            reserved: recovered.next_id,
            reserve_released: self.reserve_released,
        };
        // The charges, and "running" (an exit before the next graceful stop is unclean),
        // are durable before anything is handed out.
        writer.recovery_commit(&records, recovered.next_id)?;
        writer.measure();
        // Its space is taken now (with the reserve, on a full disk): a marker is written
        // before every call to plugin code.
        let slots = match markers::Slots::create(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull && release_reserve(&self.dir) => {
                writer.reserve_released = true;
                markers::Slots::create(&self.dir)
            }
            created => created,
        };
        *lock(&self.slots) = Some(slots.map_err(|e| {
            LedgerError::Fatal(format!(
                "cannot create {}: {e}",
                self.dir.join(markers::FILE).display()
            ))
        })?);
        // Checkpoints run in the syncer, between log fsyncs, not inside the writer's commits.
        writer
            .conn
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(|e| store::classify("ledger", &e))?;
        let thread = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer.run(&receiver))
            .map_err(|e| LedgerError::Fatal(format!("cannot start the ledger writer: {e}")))?;
        *lock(&self.writer) = Some(thread);
        Ok(recovered)
    }

    fn reloads(&self) -> bool {
        true
    }

    fn marker(&self, instance: InstanceId) -> Option<Marker> {
        let slots = lock(&self.slots).clone()?;
        let inst = self.shared.key(instance).ok()?;
        Some(Marker {
            slot: slots.claim(inst),
            shared: self.shared.clone(),
            dir: self.dir.clone(),
        })
    }

    fn load(&self, id: u64) -> Result<Option<Arc<StoredMessage>>, LedgerError> {
        store::load(&lock(&self.reader), id).map(|m| m.map(Arc::new))
    }

    fn load_many(&self, ids: &[u64]) -> Result<Vec<Option<Arc<StoredMessage>>>, LedgerError> {
        let reader = lock(&self.reader);
        let map = |e: rusqlite::Error| store::classify("cannot read the ledger", &e);
        reader.execute_batch("BEGIN").map_err(map)?;
        let loaded = store::load_many(&reader, ids);
        reader.execute_batch("COMMIT").map_err(map)?;
        loaded
    }

    fn keys(&self, since: Timestamp) -> Vec<(String, u64, Timestamp)> {
        store::keys(&lock(&self.reader), since).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read idempotency keys from the ledger");
            Vec::new()
        })
    }

    fn dead_letters(&self, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>, LedgerError> {
        store::dead_letters(&lock(&self.reader), filter)
    }

    fn replay(&self, selection: &Selection, now: Timestamp) -> Result<Replayed, LedgerError> {
        let Done::Replayed(rows) = self.run(Op::Replay(selection.clone(), now))? else {
            unreachable!("a replay answers with what it replayed");
        };
        let keys = self
            .shared
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut replayed = Replayed::default();
        for (message, inst, delivery, size) in rows {
            match keys.iter().position(|k| *k == inst) {
                Some(instance) => replayed.pending.push(Pending {
                    message,
                    instance: instance as InstanceId,
                    size,
                    delivery,
                    stored: None,
                }),
                None => replayed.waiting += 1,
            }
        }
        Ok(replayed)
    }

    fn purge(&self, selection: &Selection) -> Result<u64, LedgerError> {
        self.count(Op::Purge(selection.clone()))
    }

    fn forget(&self, instance: &str, how: Forget, now: Timestamp) -> Result<u64, LedgerError> {
        self.count(Op::Forget(instance.to_owned(), how, now))
    }

    fn history(&self, message: u64) -> Result<Vec<HistoryEntry>, LedgerError> {
        store::history(&lock(&self.reader), message)
    }

    fn backlog(&self) -> Result<Vec<BacklogEntry>, LedgerError> {
        store::backlog(&lock(&self.reader))
    }

    fn counts(&self) -> Counts {
        let s = &self.shared;
        Counts {
            accepted: s.accepted.load(Ordering::Relaxed),
            attempts: s.attempts.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
        }
    }

    fn stats(&self) -> CommitStats {
        let stats = lock(&self.shared.stats);
        CommitStats {
            commits: stats.commits,
            fsyncs: stats.fsyncs,
            messages: stats.messages,
            records: stats.records,
            latency_us: [
                stats.latency.value_at_quantile(0.5),
                stats.latency.value_at_quantile(0.99),
                stats.latency.max(),
            ],
            fsync_us: [
                stats.fsync_latency.value_at_quantile(0.5),
                stats.fsync_latency.value_at_quantile(0.99),
                stats.fsync_latency.max(),
            ],
            bytes: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    fn close(&self) {
        let (reply, done) = bounded(1);
        if self.requests.send(Request::Close { reply }).is_ok() {
            let _ = done.recv();
        }
        if let Some(thread) = lock(&self.writer).take() {
            let _ = thread.join();
        }
        if let Some(slots) = lock(&self.slots).as_ref()
            && let Err(e) = slots.clear()
        {
            tracing::warn!(error = %e, "cannot clear the in-flight markers");
        }
    }
}

/// One actor's in-flight marker: written just before each call to plugin code, with one
/// `pwrite` and no fsync (it must survive a crash of the process, not of the machine). A
/// failed write stops the daemon like any ledger failure.
pub struct Marker {
    slot: markers::Slot,
    shared: Arc<Shared>,
    dir: PathBuf,
}

impl std::fmt::Debug for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marker").field("slot", &self.slot).finish()
    }
}

impl Marker {
    fn check(&self, written: std::io::Result<()>) {
        if let Err(e) = written {
            self.shared.poison(&LedgerError::Fatal(format!(
                "cannot record an in-flight attempt in {}: {e}",
                self.dir.join(markers::FILE).display()
            )));
        }
    }

    /// Plugin code is about to be called for `attempt` of `message`.
    pub fn calling(&self, message: u64, attempt: u32) {
        self.check(self.slot.calling(message, attempt));
    }

    /// No call is running.
    pub fn idle(&self) {
        self.check(self.slot.idle());
    }
}

/// Publishes waiting for the fsync that covers them.
type Waiting = Vec<Reply>;

/// The syncer thread: fsyncs the write-ahead log for the commits handed to it, then answers
/// their publishes.
struct Syncer {
    wal: PathBuf,
    file: Option<File>,
    shared: Arc<Shared>,
    /// Passive checkpoints run here, between two log fsyncs and only when no publish waits:
    /// the database's fsync never runs beside the log's, so a publish never waits for a
    /// checkpoint's writeback inside its own fsync.
    checkpoints: Option<Connection>,
    last_checkpoint: Instant,
}

impl Syncer {
    fn run(mut self, requests: &Receiver<Waiting>) {
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
                let result = match self.shared.failed() {
                    Some(e) => Err(e),
                    None => self.sync(),
                };
                if let Err(e) = &result {
                    self.shared.poison(e);
                }
                for reply in waiting {
                    let _ = reply.send(result.clone());
                }
            }
            if requests.is_empty() && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                self.checkpoint();
            }
        }
    }

    /// A passive checkpoint: copies what it can of the log into the database, never waits.
    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        let Some(conn) = &self.checkpoints else {
            return;
        };
        if self.shared.failed().is_some() {
            return;
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            let error = store::classify("ledger checkpoint", &e);
            if matches!(error, LedgerError::Fatal(_)) {
                self.shared.poison(&error);
            }
        }
    }

    /// One `fdatasync` of the log. A failure is final: it is never retried (after a failed
    /// fsync the kernel may have dropped the dirty pages; a retry would report success).
    fn sync(&mut self) -> Result<(), LedgerError> {
        let started = Instant::now();
        let file = match &self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.wal).map_err(|e| {
                LedgerError::Fatal(format!("cannot open {}: {e}", self.wal.display()))
            })?),
        };
        file.sync_data().map_err(|e| {
            LedgerError::Fatal(format!("fsync of {} failed: {e}", self.wal.display()))
        })?;
        let mut stats = lock(&self.shared.stats);
        stats.fsyncs += 1;
        let _ = stats
            .fsync_latency
            .record((started.elapsed().as_micros() as u64).max(1));
        Ok(())
    }
}

/// The log size past which the writer waits for a complete checkpoint.
const LOG_RESTART_BYTES: u64 = 24 << 20;

/// Message ids reserved in `meta` at a time.
const ID_BLOCK: u64 = 1 << 16;

/// How often the syncer copies the log into the database when no publish waits.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// The writer thread's state.
struct Writer {
    /// To the syncer: publishes of committed transactions, in `fsync` mode.
    syncs: Sender<Waiting>,
    conn: Connection,
    shared: Arc<Shared>,
    mode: Mode,
    max_bytes: Option<u64>,
    dedupe_window: Duration,
    dead_letter_retention: Option<Duration>,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    /// The `synchronous` setting in force.
    sync: Option<store::Sync>,
    /// Bytes of live pages, measured every so often.
    used: u64,
    commits_since_measure: u32,
    /// The id high-water mark in `meta`: every id recorded is below it.
    reserved: u64,
    /// The reserve file was deleted to let settlements through on a full disk. Until
    /// housekeeping can reserve it again, publishes are refused: otherwise they would take
    /// the space freed for settlements, and the next settlement would find none (a fail-stop
    /// on a full disk, which must only refuse publishes).
    reserve_released: bool,
}

impl Writer {
    fn run(mut self, requests: &Receiver<Request>) {
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
    fn process(&mut self, batch: Vec<Request>) -> bool {
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

    fn commit_requests(&mut self, commits: Vec<Commit>) {
        if let Some(e) = self.shared.failed() {
            for (_, _, reply) in commits {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let (mut publishes, settles): (Vec<_>, Vec<_>) = commits
            .into_iter()
            .partition(|(_, wait, _)| *wait == Wait::Durable);
        if let Some(limit) = self.max_bytes
            && self.used > limit
            && !publishes.is_empty()
        {
            let full = LedgerError::Full(format!(
                "the ledger holds {} bytes, over max_ledger_bytes ({limit} bytes)",
                self.used
            ));
            for (_, _, reply) in publishes.drain(..) {
                let _ = reply.send(Err(full.clone()));
            }
        }
        if self.reserve_released && !publishes.is_empty() {
            let full = LedgerError::Full(format!(
                "no space left: the space reserved for settlements ({}, {} MiB) is in use; \
                 publishing resumes once it can be reserved again",
                self.dir.join(RESERVE).display(),
                RESERVE_BYTES >> 20
            ));
            for (_, _, reply) in publishes.drain(..) {
                let _ = reply.send(Err(full.clone()));
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
                    let _ = reply.send(Err(LedgerError::Full(reason.clone())));
                }
                let settle: Vec<&[Record]> = settles.iter().map(|(r, ..)| r.as_slice()).collect();
                match self.transaction(&settle) {
                    Err(LedgerError::Full(_)) => {
                        release_reserve(&self.dir);
                        self.reserve_released = true;
                        self.transaction(&settle).map_err(|e| match e {
                            LedgerError::Full(m) => LedgerError::Fatal(format!(
                                "no space left even for settlements: {m}"
                            )),
                            other => other,
                        })
                    }
                    other => other,
                }
            }
            other => other,
        };
        if let Err(e) = &result {
            self.shared.poison(e);
        }
        for (_, _, reply) in settles {
            let _ = reply.send(result.clone());
        }
        if result.is_ok() && self.mode == Mode::Fsync && !publishes.is_empty() {
            let waiting = publishes.into_iter().map(|(_, _, reply)| reply).collect();
            // The syncer ends only after the writer; a failed send means it is gone.
            let _ = self.syncs.send(waiting);
        } else {
            for (_, _, reply) in publishes {
                let _ = reply.send(result.clone());
            }
        }
    }

    /// An operator's change, fsynced in a transaction of its own.
    fn operate(&mut self, op: Op) -> Result<Done, LedgerError> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        self.set_sync(store::Sync::Full)?;
        let map = |e: rusqlite::Error| store::classify("ledger", &e);
        self.conn.execute_batch("BEGIN").map_err(map)?;
        let done = match op {
            Op::Replay(selection, now) => {
                store::replay(&self.conn, &selection, now).map(Done::Replayed)
            }
            Op::Purge(selection) => store::purge(&self.conn, &selection).map(Done::Count),
            Op::Forget(name, how, now) => {
                store::forget(&self.conn, &name, how, now).map(Done::Count)
            }
        };
        let done = done.and_then(|done| {
            self.conn
                .execute_batch("COMMIT")
                .map_err(map)
                .map(|()| done)
        });
        if let Err(e) = &done {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            if matches!(e, LedgerError::Fatal(_)) {
                self.shared.poison(e);
            }
        }
        done
    }

    fn set_sync(&mut self, sync: store::Sync) -> Result<(), LedgerError> {
        if self.sync != Some(sync) {
            store::set_sync(&self.conn, sync)?;
            self.sync = Some(sync);
        }
        Ok(())
    }

    /// One transaction for all of `batches`, written to the OS (the syncer makes it durable).
    fn transaction(&mut self, batches: &[&[Record]]) -> Result<(), LedgerError> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        self.set_sync(store::Sync::Written)?;
        let started = Instant::now();
        let applied = self.apply_all(batches);
        if let Err(e) = applied {
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        let micros = started.elapsed().as_micros() as u64;
        let (mut messages, mut records) = (0, 0);
        for batch in batches {
            records += batch.len() as u64;
            messages += batch
                .iter()
                .filter(|r| matches!(r, Record::Accepted { .. }))
                .count() as u64;
        }
        let mut stats = lock(&self.shared.stats);
        stats.commits += 1;
        stats.messages += messages;
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
    /// copied when a commit starts, so it is never reused and grows without end. Past
    /// [`LOG_RESTART_BYTES`] the writer runs one passive checkpoint itself, between two of
    /// its transactions: nothing is written meanwhile, so it copies the rest of the log
    /// (little: the syncer's checkpoints did most) unless a reader still uses it, and the next
    /// commit starts the log from the beginning (truncated to `journal_size_limit`). A
    /// passive checkpoint never waits for a lock.
    fn bound_log(&mut self) {
        let log = self.dir.join(format!("{}-wal", store::FILE));
        if fs::metadata(&log).is_ok_and(|m| m.len() > LOG_RESTART_BYTES) {
            let done = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            if let Err(e) = done {
                let error = store::classify("ledger checkpoint", &e);
                if matches!(error, LedgerError::Fatal(_)) {
                    self.shared.poison(&error);
                }
            }
        }
    }

    fn apply_all(&mut self, batches: &[&[Record]]) -> Result<(), LedgerError> {
        let context = "cannot write the ledger";
        let map = |e: rusqlite::Error| store::classify(context, &e);
        self.conn.execute_batch("BEGIN").map_err(map)?;
        let mut next_id = 0;
        let keys = self
            .shared
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let key = |instance: crate::routing::InstanceId| {
            keys.get(instance as usize)
                .copied()
                .ok_or_else(|| LedgerError::Fatal(format!("instance #{instance} is unknown")))
        };
        let mut writes = store::Writes::new(&self.conn).map_err(map)?;
        let mut targets_keys = Vec::new();
        for batch in batches {
            for record in *batch {
                match record {
                    Record::Accepted { message, targets } => {
                        targets_keys.clear();
                        for target in targets {
                            targets_keys.push(key(*target)?);
                        }
                        writes.accept(message, &targets_keys).map_err(map)?;
                        next_id = next_id.max(message.id + 1);
                    }
                    Record::Key { key, message, at } => {
                        writes.key(key, *message, *at).map_err(map)?;
                        next_id = next_id.max(message + 1);
                    }
                    Record::Attempt { .. } => {}
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
        }
        drop(writes);
        if next_id > self.reserved {
            // Ids are reserved a block at a time: one write of `meta` per block, not per
            // commit. After a crash the next ids start past the block (never reused).
            self.reserved = next_id + ID_BLOCK;
            store::raise_next_id(&self.conn, self.reserved).map_err(map)?;
        }
        self.conn.execute_batch("COMMIT").map_err(map)
    }

    /// Recovery's charges and the "running" mark (an exit before the next graceful stop is
    /// unclean), fsynced before anything is handed out. On a full disk each of the two
    /// transactions may use the reserve, as settlements do.
    fn recovery_commit(&mut self, records: &[Record], next_id: u64) -> Result<(), LedgerError> {
        self.with_reserve(|w| w.transaction(&[records]))?;
        self.with_reserve(|w| {
            w.set_sync(store::Sync::Full)?;
            let map = |e: rusqlite::Error| store::classify("ledger", &e);
            w.conn.execute_batch("BEGIN").map_err(map)?;
            let done = store::set_meta(&w.conn, "clean", 0)
                .and_then(|()| store::set_meta(&w.conn, "next_id", next_id as i64))
                .and_then(|()| w.conn.execute_batch("COMMIT").map_err(map));
            if done.is_err() && !w.conn.is_autocommit() {
                let _ = w.conn.execute_batch("ROLLBACK");
            }
            done
        })
    }

    /// Runs `step` (one transaction, rolled back when it fails); when it fails for want of
    /// space and the reserve is still there, releases the reserve and runs it once more.
    fn with_reserve(
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

    fn measure(&mut self) {
        self.commits_since_measure = 0;
        if let Ok(used) = store::used_bytes(&self.conn) {
            self.used = used;
        }
        let on_disk = [store::FILE, "ledger.db-wal"]
            .iter()
            .filter_map(|f| fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        self.shared.bytes.store(on_disk, Ordering::Relaxed);
    }

    /// Expired keys and dead letters go; free pages go back to the file system.
    fn housekeep(&mut self) {
        if self.shared.failed().is_some() {
            return;
        }
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
        if !self.dir.join(RESERVE).exists() && ensure_reserve(&self.dir) && self.reserve_released {
            self.reserve_released = false;
            tracing::info!("space reserved for settlements again: publishing resumes");
        }
    }

    /// A graceful stop: checkpoint, then mark the state clean (fsynced).
    fn close(&mut self) {
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
