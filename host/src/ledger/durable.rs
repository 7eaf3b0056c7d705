//! The durable ledger: SQLite under `state_dir`, opened (one daemon per state dir) and
//! recovered here, with crash accounting from the in-flight markers; its writer and syncer
//! threads (`writer`) do the group commit, retention and the fault rules described below.
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
//! Faults (docs/design.md §7): out of space refuses the publishes of the batch and retries the
//! settlements alone (releasing the reserve file if needed; publishes are then refused until
//! it can be made again, and opening on a full disk may release it too); any other storage
//! error poisons the ledger — every later commit fails — and calls the fail-stop hook.
//! Nothing is retried after a failed fsync.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use hdrhistogram::Histogram;
use rusqlite::Connection;

use super::{
    BacklogEntry, CommitStats, Counts, DeadLetter, DeadLetterFilter, FailStop, Forget,
    HistoryEntry, InFlightMarker, Ledger, LedgerError, Lost, Pending, Receipt, Record, Recovered,
    Remembered, Replayed, Selection, Then, Wait, lock,
    mark::{self, Mark, MarkError, Marks},
    markers, store,
    syncer::{Log, Syncer},
    writer::{Done, Op, Reply, Request, Shared, Stats, Writer, ensure_reserve, release_reserve},
};
use crate::{
    clock::{Clock, Timestamp},
    delivery::{Rules, Transition},
    message::StoredMessage,
    metrics,
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

/// How to open a durable ledger.
#[derive(Clone)]
pub struct LedgerOptions {
    pub mode: Mode,
    pub max_bytes: Option<u64>,
    pub dedupe_window: Duration,
    pub dead_letter_retention: Option<Duration>,
    pub clock: Arc<dyn Clock>,
    /// Reported to once when the ledger fails for good (the daemon exits from it).
    pub fail_stop: Option<FailStop>,
    /// Start a new, empty ledger where the state dir's is missing or empty (`plugind run
    /// --fresh-ledger`): refused without it, since a ledger that should be there is lost.
    pub fresh: bool,
}

impl std::fmt::Debug for LedgerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerOptions")
            .field("mode", &self.mode)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

const LOCK: &str = "lock";
/// The durable ledger.
pub struct DurableLedger {
    dir: PathBuf,
    options: LedgerOptions,
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
    /// The state dir's mark as found at open (`None`: none, or damaged).
    marks: Option<Marks>,
    /// A new, empty ledger was started where one was lost (`--fresh-ledger`).
    fresh: bool,
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
    /// [`LedgerError::Unusable`] for a state dir that cannot be created or written;
    /// [`LedgerError::Refused`] for a state dir in use by another daemon, a ledger that is
    /// missing or empty where the state dir's mark says one lives (unless
    /// [`LedgerOptions::fresh`]), damaged, of a newer format or another program's file;
    /// [`LedgerError::Fatal`] when it cannot be read.
    pub fn open(dir: &Path, options: LedgerOptions) -> Result<Arc<Self>, LedgerError> {
        fs::create_dir_all(dir).map_err(|e| {
            LedgerError::Unusable(format!(
                "state_dir {}: cannot create it: {e}",
                dir.display()
            ))
        })?;
        let lock = lock_state_dir(dir)?;
        let (marks, ours) = match mark::read(dir) {
            Ok(marks) => {
                let ours = marks.is_some() || had_a_ledger(dir);
                (marks, ours)
            }
            Err(e @ MarkError::Damaged { .. }) => {
                tracing::error!(
                    error = %e,
                    "the ledger's mark is damaged: it is made again from the database (a loss \
                     of answered messages before this start cannot be detected)"
                );
                (None, true)
            }
            Err(e @ MarkError::Io { .. }) => return Err(LedgerError::Fatal(e.to_string())),
        };
        let db = dir.join(store::FILE);
        let size = match fs::symlink_metadata(&db) {
            Ok(meta) => Some(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LedgerError::Fatal(format!("{}: {e}", db.display()))),
        };
        let gone = match size {
            None => Some("is missing"),
            Some(0) => Some("is empty (0 bytes)"),
            Some(_) => None,
        };
        let fresh = ours && gone.is_some() && options.fresh;
        if ours
            && let Some(what) = gone
            && !options.fresh
        {
            return Err(LedgerError::Refused(store::lost(&db, what)));
        }
        if fresh {
            forget_stale_files(dir)?;
        } else if options.fresh && gone.is_none() {
            tracing::warn!(
                path = %db.display(),
                "--fresh-ledger ignored: the ledger is there and is used as it is (the option \
                 only allows starting without one; remove it)"
            );
        }
        let create = if ours && !fresh {
            store::Create::Refused
        } else {
            store::Create::Allowed
        };
        // On a full disk even opening writes (the log's recovery, the settings): the reserve
        // goes, so that the daemon starts and delivers what is pending.
        let (conn, reserve_released) = match store::open(dir, create, ours) {
            Err(LedgerError::Full(_)) if release_reserve(dir) => {
                (store::open(dir, create, ours)?, true)
            }
            opened => (opened?, false),
        };
        let reader = store::open_reader(dir)?;
        // A reserve that cannot be made (the disk is about full) counts as released: publishes
        // are refused until housekeeping can make it (see `Writer::reserve_released`).
        let reserve_made = ensure_reserve(dir).inspect_err(|e| {
            tracing::warn!(
                path = %dir.join(super::writer::RESERVE).display(),
                error = %e,
                "cannot reserve space for settlements; publishing waits until it can be reserved"
            );
        });
        let reserve_released = reserve_released || reserve_made.is_err();
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
                checkpoint_latency: Histogram::new_with_bounds(1, 60_000_000, 2)
                    .expect("valid bounds"),
                batch: Histogram::new_with_bounds(1, 1 << 30, 2).expect("valid bounds"),
                log_restarts: 0,
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
            marks,
            fresh,
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
            Done::Attached(_, rows) => Ok(rows.len() as u64),
        }
    }

    fn send(&self, records: Vec<Record>, wait: Wait, then: Option<Then>) -> Receipt {
        if let Some(e) = self.shared.failed() {
            return Receipt::Ready(Err(e));
        }
        let (answer, receipt) = tokio::sync::oneshot::channel();
        // A send fails only once the writer ended: the receipt then says it is gone.
        let _ = self.requests.send(Request::Commit {
            records,
            wait,
            reply: Reply { answer, then },
        });
        Receipt::Pending(receipt)
    }
}

impl DurableLedger {
    /// The ledger's identity (the database's, or a new one), and what the database lost that
    /// the mark says was answered OK. Says it loudly, once: the mark starts over for this run.
    fn compare_with_mark(&self, conn: &Connection) -> Result<(u64, Option<Lost>), LedgerError> {
        let stored = store::meta(conn, "identity")? as u64;
        let identity = if stored == 0 {
            mark::new_identity()
        } else {
            stored
        };
        let db = self.dir.join(store::FILE);
        if self.fresh {
            tracing::warn!(
                path = %db.display(),
                "a new, empty ledger replaces the lost one (--fresh-ledger); message ids continue \
                 after the last one given out"
            );
            return Ok((identity, None));
        }
        let Some(marks) = &self.marks else {
            return Ok((identity, None));
        };
        if stored != marks.identity {
            if stored != 0 {
                tracing::warn!(
                    path = %db.display(),
                    ledger = format_args!("{stored:016x}"),
                    expected = format_args!("{:016x}", marks.identity),
                    "ledger.db is not the ledger this state dir ran last: it was replaced \
                     by hand (use `plugind restore`); message ids continue after the last one \
                     this state dir gave out"
                );
            }
            return Ok((identity, None));
        }
        let last = store::meta(conn, "last_id")? as u64;
        let lost = marks
            .answered
            .filter(|answered| *answered > last)
            .map(|answered| Lost {
                first: last + 1,
                last: answered,
            });
        if let Some(lost) = &lost {
            tracing::error!(
                path = %db.display(),
                first = lost.first,
                last = lost.last,
                "THE LEDGER LOST MESSAGES ANSWERED OK: the messages with ids {} to {} were \
                 answered OK, but the ledger no longer holds them (nor their deliveries or dead \
                 letters): its write-ahead log was damaged or cut short, or the database was \
                 replaced by an older copy of itself. Starting with what it holds; restore a \
                 newer backup if you have one",
                lost.first,
                lost.last
            );
        }
        Ok((identity, lost))
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
        .map_err(|e| {
            unusable(dir, &e)
                .unwrap_or_else(|| LedgerError::Fatal(format!("{}: {e}", path.display())))
        })?;
    if lock.try_lock().is_err() {
        return Err(LedgerError::Refused(format!(
            "state dir {} is in use by another plugind (stop it first)",
            dir.display()
        )));
    }
    Ok(lock)
}

/// The refusal of a state dir this user cannot write (a configuration problem: no restart
/// fixes it), if that is what `e` says.
fn unusable(dir: &Path, e: &std::io::Error) -> Option<LedgerError> {
    let why = match e.raw_os_error() {
        Some(code) if code == rustix::io::Errno::ROFS.raw_os_error() => {
            "is on a read-only file system"
        }
        Some(code)
            if code == rustix::io::Errno::ACCESS.raw_os_error()
                || code == rustix::io::Errno::PERM.raw_os_error() =>
        {
            "is not writable by this user"
        }
        _ => return None,
    };
    Some(LedgerError::Unusable(format!(
        "state_dir {} {why}: {e}",
        dir.display()
    )))
}

/// Whether the ledger's other files say a ledger lived in `dir` before marks existed (a state
/// dir of an older plugind, its `ledger.db` lost).
fn had_a_ledger(dir: &Path) -> bool {
    [store::LOG, markers::FILE, super::writer::RESERVE]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// A new ledger replaces a lost one (`--fresh-ledger`): the files of the old one that SQLite
/// or recovery would read with it (its log, the log's index, its in-flight markers) go.
fn forget_stale_files(dir: &Path) -> Result<(), LedgerError> {
    for stale in [
        store::LOG.to_owned(),
        format!("{}-shm", store::FILE),
        markers::FILE.to_owned(),
    ] {
        let path = dir.join(stale);
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "removed: it belonged to the lost ledger")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LedgerError::Fatal(format!("{}: {e}", path.display()))),
        }
    }
    Ok(())
}

/// The size (payload and headers) of a stored pending delivery; `None`, reported, when its
/// message is missing (corruption: the delivery is kept and not handed out).
fn readable(stored: &store::StoredDelivery, name: &str) -> Option<u64> {
    if stored.size.is_none() {
        tracing::error!(
            id = stored.message,
            instance = name,
            "the ledger is corrupt: a pending delivery has no message; it is kept and not \
             handed out"
        );
    }
    stored.size
}

/// The state of a stored pending delivery (as accepted when it has none yet).
fn delivery_of(
    stored: &store::StoredDelivery,
    name: &str,
) -> Result<crate::delivery::Delivery, LedgerError> {
    match &stored.state {
        Some(bytes) => store::decode_delivery(bytes, stored.message, name),
        None => Ok(crate::delivery::Delivery::new(Timestamp(stored.published))),
    }
}

impl Ledger for DurableLedger {
    fn submit_then(&self, records: Vec<Record>, wait: Wait, then: Option<Then>) -> Receipt {
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
            self.send(records, wait, then)
        } else {
            if let Some(then) = then {
                then();
            }
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
        let (identity, lost) = self.compare_with_mark(&conn)?;
        recovered.lost = lost;
        // Ids are never reused on one state dir: the mark is never behind the database, and
        // outlives it.
        if let Some(marks) = &self.marks {
            recovered.next_id = recovered.next_id.max(marks.reserved);
        }
        let mut records = Vec::new();
        store::scan(&conn, None, |stored| {
            let name = all_names.get(&stored.inst).map_or("?", String::as_str);
            let Some(size) = readable(&stored, name) else {
                return Ok(());
            };
            recovered.next_id = recovered.next_id.max(stored.message + 1);
            let Some(&id) = by_key.get(&stored.inst) else {
                recovered.orphaned += 1;
                if !recovered.orphaned_in.contains(name) {
                    recovered.orphaned_in.insert(name.to_owned());
                }
                return Ok(());
            };
            let mut delivery = delivery_of(&stored, name)?;
            let instance = id as crate::routing::InstanceId;
            if !clean
                && let Some(&attempt) = marks.marked.get(&(stored.message, stored.inst))
                && delivery.marked(attempt, now)
            {
                recovered.crashed += 1;
                recovered.crashed_in.insert(name.to_owned());
                *recovered.crashed_by.entry(name.to_owned()).or_default() += 1;
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
                since: Timestamp(stored.published),
                stored: None,
            });
            Ok(())
        })?;
        // The mark says this ledger and where its ids start, before anything is handed out.
        let start = |dir: &Path| Mark::start(dir, identity, recovered.next_id, self.marks.as_ref());
        let mut reserve_released = self.reserve_released;
        let made = match start(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull && release_reserve(&self.dir) => {
                reserve_released = true;
                start(&self.dir)
            }
            made => made,
        };
        let mark = made.map_err(|e| {
            LedgerError::Fatal(format!(
                "cannot write {}: {e}",
                self.dir.join(mark::FILE).display()
            ))
        })?;
        let answerer = || {
            mark.answerer().map_err(|e| {
                LedgerError::Fatal(format!("cannot open {}: {e}", mark.path().display()))
            })
        };
        let (syncs, to_sync) = unbounded();
        let syncer = Syncer {
            log: Log::new(self.dir.join(store::LOG)),
            shared: self.shared.clone(),
            checkpoints: store::open_checkpointer(&self.dir)?,
            last_checkpoint: Instant::now(),
            answerer: answerer()?,
        };
        std::thread::Builder::new()
            .name("ledger-sync".into())
            .spawn(move || syncer.run(&to_sync))
            .map_err(|e| LedgerError::Fatal(format!("cannot start the ledger syncer: {e}")))?;
        // Acceptance order: first deliveries go out in it.
        recovered
            .pending
            .sort_unstable_by_key(|p| (p.message, p.instance));
        let page_size = store::page_size(&conn)?;
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
            page_size,
            commits_since_measure: 0,
            reserved: recovered.next_id,
            marked: recovered.next_id,
            answerer: (self.options.mode == Mode::Buffered)
                .then(answerer)
                .transpose()?,
            mark,
            tasks: std::collections::VecDeque::new(),
            reserve_released,
            reserve_warned: false,
            giving_back: false,
        };
        // The charges, and "running" (an exit before the next graceful stop is unclean),
        // are durable before anything is handed out.
        writer.recovery_commit(&records, recovered.next_id, identity)?;
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
        // (Turning automatic checkpoints off clears the log hook: it is set after.)
        writer
            .conn
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(|e| store::classify("ledger", &e))?;
        writer.conn.wal_hook(Some(super::writer::count_log_frames));
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

    fn marker(&self, instance: InstanceId) -> Option<InFlightMarker> {
        let slots = lock(&self.slots).clone()?;
        let inst = self.shared.key(instance).ok()?;
        Some(InFlightMarker::new(
            slots.claim(inst),
            self.shared.clone(),
            self.dir.join(markers::FILE),
        ))
    }

    fn load(&self, id: u64) -> Result<Option<Arc<StoredMessage>>, LedgerError> {
        store::load(&lock(&self.reader), id).map(|m| m.map(Arc::new))
    }

    fn load_many(&self, ids: &[u64]) -> Result<Vec<Option<Arc<StoredMessage>>>, LedgerError> {
        let reader = lock(&self.reader);
        // One read transaction: one snapshot for every id.
        store::in_transaction(&reader, "cannot read the ledger", || {
            store::load_many(&reader, ids)
        })
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

    fn dead_letter_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, LedgerError> {
        store::dead_letter_counts(&lock(&self.reader)).map(|rows| rows.into_iter().collect())
    }

    fn replay(&self, selection: &Selection, now: Timestamp) -> Result<Replayed, LedgerError> {
        let Done::Replayed(rows) = self.run(Op::Replay(selection.clone(), now))? else {
            unreachable!("a replay answers with what it replayed");
        };
        let keys = self.shared.keys_now();
        let mut replayed = Replayed::default();
        for (message, inst, delivery, size) in rows {
            match keys.iter().position(|k| *k == inst) {
                Some(instance) => replayed.pending.push(Pending {
                    message,
                    instance: instance as InstanceId,
                    size,
                    delivery,
                    since: now,
                    stored: None,
                }),
                None => replayed.waiting += 1,
            }
        }
        // Acceptance order, as recovery hands them over.
        replayed
            .pending
            .sort_unstable_by_key(|p| (p.message, p.instance));
        Ok(replayed)
    }

    fn attach(&self, id: InstanceId, name: &str) -> Result<Vec<Pending>, LedgerError> {
        let Done::Attached(key, rows) = self.run(Op::Attach(name.to_owned()))? else {
            unreachable!("an attach answers with its key");
        };
        {
            let mut keys = self
                .shared
                .keys
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if keys.len() != id as usize {
                return Err(LedgerError::Fatal(format!(
                    "instance `{name}` attached as #{id}, but the next id is #{}",
                    keys.len()
                )));
            }
            keys.push(key);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for stored in rows {
            let Some(size) = readable(&stored, name) else {
                continue;
            };
            pending.push(Pending {
                message: stored.message,
                instance: id,
                size,
                delivery: delivery_of(&stored, name)?,
                since: Timestamp(stored.published),
                stored: None,
            });
        }
        pending.sort_unstable_by_key(|p| p.message);
        Ok(pending)
    }

    fn purge(&self, selection: &Selection) -> Result<u64, LedgerError> {
        self.count(Op::Purge(selection.clone()))
    }

    fn forget(&self, instance: &str, how: Forget, now: Timestamp) -> Result<u64, LedgerError> {
        self.count(Op::Forget(instance.to_owned(), how, now))
    }

    fn remembered(&self) -> Result<std::collections::BTreeMap<String, Remembered>, LedgerError> {
        store::remembered(&lock(&self.reader)).map(|rows| rows.into_iter().collect())
    }

    fn remember(&self, name: &str, remembered: &Remembered) -> Result<(), LedgerError> {
        self.count(Op::Remember(name.to_owned(), remembered.clone()))
            .map(drop)
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
            latency_us: summary(&stats.latency),
            fsync_us: summary(&stats.fsync_latency),
            checkpoint_us: summary(&stats.checkpoint_latency),
            log_restarts: stats.log_restarts,
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            checkpoints: stats.checkpoint_latency.len(),
            reserve_bytes: std::fs::metadata(self.dir.join(super::writer::RESERVE))
                .map_or(0, |m| m.len()),
            commit_latency: metrics::Distribution::from_hdr(
                &stats.latency,
                &metrics::LEDGER_MICROS,
                metrics::Scale::Micros,
            ),
            fsync_latency: metrics::Distribution::from_hdr(
                &stats.fsync_latency,
                &metrics::LEDGER_MICROS,
                metrics::Scale::Micros,
            ),
            batch_records: metrics::Distribution::from_hdr(
                &stats.batch,
                &metrics::BATCH_RECORDS,
                metrics::Scale::One,
            ),
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

/// p50, p99 and max of a latency histogram.
fn summary(histogram: &Histogram<u64>) -> [u64; 3] {
    [
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.99),
        histogram.max(),
    ]
}
