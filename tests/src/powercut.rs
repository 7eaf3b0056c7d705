//! The power-cut simulation's reconstructor: reads the log the `writelog` shim
//! (`tests/shims/writelog.c`) kept of every change to a ledger's files and every fsync of
//! them, and rebuilds `ledger.db` and `ledger.db-wal` as a disk would hold them after a power
//! cut at a given moment.
//!
//! # The model (strict)
//!
//! A change to a file (a write, a truncation, a removal) survives a cut at `T` only if an
//! fsync or fdatasync of the same file **started after the change completed** and
//! **completed, successfully, before `T`**. Every other change is dropped entirely: not torn,
//! not reordered, just gone, as if the page cache were lost with the power. The files start
//! empty (the runs start from an empty state dir).
//!
//! Since one covering fsync covers every earlier change of its file, what survives of a file
//! is a prefix of its changes: those that completed before the latest start of a counted
//! fsync that completed before `T`. [`Disk`] applies those prefixes incrementally, cut after
//! cut in increasing order.
//!
//! Not modelled:
//! - directory fsyncs: the files' directory entries are taken as durable from their creation
//!   (the runs create both before the first publish, and SQLite fsyncs the directory after
//!   creating the log);
//! - a removal (SQLite removes the log when its last connection closes) is a truncation to 0
//!   under the same rule as the other changes;
//! - `ledger.db-shm`: SQLite rebuilds it from the log on open;
//! - torn writes and reordering within what survives: the strict model keeps whole writes in
//!   order, it only drops the unsynced ones (the harshest drop, not every failure a disk has).

use std::{
    fs,
    ops::Range,
    path::{Path, PathBuf},
};

use crate::shim;

/// The `writelog` shim, built once per process: `LD_PRELOAD` it into a daemon with
/// `PLUGIND_TEST_WRITELOG` naming the log to keep.
///
/// # Panics
/// As [`shim::build`].
pub fn writelog_shim() -> PathBuf {
    shim::build("writelog", include_str!("../shims/writelog.c"))
}

/// The files of a ledger, by the shim's file ids.
pub const FILES: [&str; 2] = ["ledger.db", "ledger.db-wal"];

/// What one operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Bytes written at `offset`: the data is `WriteLog::data(range)`.
    Write { offset: u64, data: Range<usize> },
    /// The file's length set (ftruncate, an open with O_TRUNC).
    Truncate(u64),
    /// The file removed (its path unlinked).
    Remove,
    /// An fsync (`data_only`: fdatasync) that started at `start` and succeeded (`ok`) or not,
    /// through an fd opened read-only (`read_only`: plugind's syncer opens the log so; SQLite
    /// opens its files read-write).
    Sync {
        start: u64,
        ok: bool,
        data_only: bool,
        read_only: bool,
    },
}

/// One logged operation on a ledger file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Index in [`FILES`].
    pub file: usize,
    /// When it had completed (CLOCK_REALTIME ns, the clock of `SystemTime::now`).
    pub end: u64,
    pub kind: Kind,
}

/// The whole log of a run.
#[derive(Debug)]
pub struct WriteLog {
    bytes: Vec<u8>,
    ops: Vec<Op>,
}

const HEADER: usize = 32;

impl WriteLog {
    /// Reads and parses the log at `path`.
    ///
    /// # Panics
    /// If it cannot be read, a record is malformed or cut short, or the records are not in
    /// the order of their completion times (the shim writes them so).
    pub fn read(path: &Path) -> Self {
        let bytes = fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read the write log {}: {e}", path.display()));
        let mut ops = Vec::new();
        let mut at = 0;
        let u64_at = |b: &[u8], i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
        while at < bytes.len() {
            assert!(
                bytes.len() - at >= HEADER,
                "the write log ends inside a record header at {at}"
            );
            let h = &bytes[at..at + HEADER];
            let (kind, file, read_only) = (h[0], usize::from(h[1]), h[2] == 1);
            let result = i32::from_ne_bytes(h[4..8].try_into().unwrap());
            let (end, a, b) = (u64_at(h, 8), u64_at(h, 16), u64_at(h, 24));
            assert!(
                file < FILES.len(),
                "file id {file} in the write log at {at}"
            );
            at += HEADER;
            let kind = match kind {
                1 => {
                    let len = usize::try_from(b).expect("a write's length fits");
                    assert!(
                        bytes.len() - at >= len,
                        "the write log ends inside a write's data at {at}"
                    );
                    at += len;
                    Kind::Write {
                        offset: a,
                        data: at - len..at,
                    }
                }
                2 => Kind::Truncate(a),
                3 | 4 => Kind::Sync {
                    start: a,
                    ok: result == 0,
                    data_only: kind == 4,
                    read_only,
                },
                5 => Kind::Remove,
                other => panic!("unknown record kind {other} in the write log"),
            };
            if let Some(last) = ops.last().map(|o: &Op| o.end) {
                assert!(
                    end >= last,
                    "the write log goes back in time ({last} then {end}): the realtime clock \
                     was stepped during the run"
                );
            }
            ops.push(Op { file, end, kind });
        }
        Self { bytes, ops }
    }

    /// Every operation, in the order they completed.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The data of a write.
    pub fn data(&self, range: Range<usize>) -> &[u8] {
        &self.bytes[range]
    }
}

/// Which successful fsyncs make changes durable in a [`Disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syncs {
    /// Every one: the model of the real disk.
    All,
    /// Only SQLite's own (through fds opened read-write): what the ledger would keep without
    /// plugind's syncer thread.
    SqliteOnly,
    /// None: nothing written survives.
    None,
}

impl Syncs {
    fn counts(self, read_only: bool) -> bool {
        match self {
            Self::All => true,
            Self::SqliteOnly => !read_only,
            Self::None => false,
        }
    }
}

/// The ledger's files as the disk holds them after a power cut, rebuilt cut after cut.
#[derive(Debug)]
pub struct Disk<'a> {
    log: &'a WriteLog,
    /// Per file: the indices (in `log.ops`) of its changes, then of its counted syncs.
    changes: [Vec<usize>; 2],
    synced: [Vec<usize>; 2],
    /// Per file: how many of its changes are applied, how many syncs are passed, and the
    /// latest start of a passed sync (the changes completed before it are durable).
    applied: [usize; 2],
    passed: [usize; 2],
    horizon: [u64; 2],
    images: [Vec<u8>; 2],
    last_cut: u64,
}

impl<'a> Disk<'a> {
    /// Empty files, before anything was logged.
    pub fn new(log: &'a WriteLog, syncs: Syncs) -> Self {
        let mut changes = [Vec::new(), Vec::new()];
        let mut synced = [Vec::new(), Vec::new()];
        for (i, op) in log.ops.iter().enumerate() {
            match op.kind {
                Kind::Sync { ok, read_only, .. } => {
                    if ok && syncs.counts(read_only) {
                        synced[op.file].push(i);
                    }
                }
                _ => changes[op.file].push(i),
            }
        }
        Self {
            log,
            changes,
            synced,
            applied: [0; 2],
            passed: [0; 2],
            horizon: [0; 2],
            images: [Vec::new(), Vec::new()],
            last_cut: 0,
        }
    }

    /// The files after a power cut at `t` (CLOCK_REALTIME ns): `[ledger.db, ledger.db-wal]`.
    ///
    /// # Panics
    /// If `t` is before the previous cut (cuts are made in increasing order).
    pub fn cut(&mut self, t: u64) -> [&[u8]; 2] {
        assert!(t >= self.last_cut, "cuts are made in increasing order");
        self.last_cut = t;
        for file in 0..FILES.len() {
            // The syncs that completed before the cut.
            while let Some(&i) = self.synced[file].get(self.passed[file]) {
                let op = &self.log.ops[i];
                if op.end >= t {
                    break;
                }
                if let Kind::Sync { start, .. } = op.kind {
                    self.horizon[file] = self.horizon[file].max(start);
                }
                self.passed[file] += 1;
            }
            // The changes that completed before the latest of their starts.
            while let Some(&i) = self.changes[file].get(self.applied[file]) {
                let op = &self.log.ops[i];
                if op.end >= self.horizon[file] {
                    break;
                }
                apply(&mut self.images[file], self.log, &op.kind);
                self.applied[file] += 1;
            }
        }
        [&self.images[0], &self.images[1]]
    }

    /// Makes a power cut at `t` and writes the files it leaves into `dir` (created if
    /// needed; `ledger.db-shm` removed, as a reboot leaves none that SQLite trusts).
    ///
    /// # Panics
    /// If `dir` cannot be written, or as [`Disk::cut`].
    pub fn write_cut(&mut self, t: u64, dir: &Path) {
        fs::create_dir_all(dir).expect("the cut's dir can be created");
        let images = self.cut(t);
        for (name, image) in FILES.iter().zip(images) {
            fs::write(dir.join(name), image).expect("the cut's files can be written");
        }
        let _ = fs::remove_file(dir.join("ledger.db-shm"));
    }
}

impl WriteLog {
    /// The files as the OS held them at the end of the log (every change applied, synced or
    /// not): what the daemon left on disk when it was killed, if the shim saw every change.
    pub fn final_files(&self) -> [Vec<u8>; 2] {
        let mut images = [Vec::new(), Vec::new()];
        for op in &self.ops {
            apply(&mut images[op.file], self, &op.kind);
        }
        images
    }
}

/// Applies a change to a file's image (a sync changes nothing).
fn apply(image: &mut Vec<u8>, log: &WriteLog, kind: &Kind) {
    match kind {
        Kind::Write { offset, data } => {
            let offset = usize::try_from(*offset).expect("offsets fit");
            let data = log.data(data.clone());
            if image.len() < offset + data.len() {
                image.resize(offset + data.len(), 0);
            }
            image[offset..offset + data.len()].copy_from_slice(data);
        }
        Kind::Truncate(len) => image.resize(usize::try_from(*len).expect("lengths fit"), 0),
        Kind::Remove => image.clear(),
        Kind::Sync { .. } => {}
    }
}

/// Counts of a log's operations, for reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub writes: u64,
    pub bytes: u64,
    pub truncates: u64,
    pub removes: u64,
    /// Successful fsyncs through read-write fds (SQLite's), then through read-only ones
    /// (plugind's syncer), then failed ones.
    pub sqlite_syncs: u64,
    pub syncer_syncs: u64,
    pub failed_syncs: u64,
}

impl WriteLog {
    /// Counts its operations.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for op in &self.ops {
            match &op.kind {
                Kind::Write { data, .. } => {
                    t.writes += 1;
                    t.bytes += data.len() as u64;
                }
                Kind::Truncate(_) => t.truncates += 1,
                Kind::Remove => t.removes += 1,
                Kind::Sync { ok: false, .. } => t.failed_syncs += 1,
                Kind::Sync {
                    read_only: true, ..
                } => t.syncer_syncs += 1,
                Kind::Sync { .. } => t.sqlite_syncs += 1,
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record as the shim writes it.
    fn record(kind: u8, file: u8, read_only: bool, end: u64, a: u64, data: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, file, u8::from(read_only), 0];
        r.extend_from_slice(&0i32.to_ne_bytes());
        for v in [end, a, data.len() as u64] {
            r.extend_from_slice(&v.to_ne_bytes());
        }
        r.extend_from_slice(data);
        r
    }

    fn log(records: &[Vec<u8>]) -> WriteLog {
        let dir = crate::sandbox::Sandbox::new("powercut-unit");
        let path = dir.put("writelog.bin", records.concat());
        WriteLog::read(&path)
    }

    #[test]
    fn a_change_survives_only_an_fsync_started_after_it_and_completed_before_the_cut() {
        let log = log(&[
            record(1, 1, false, 10, 0, b"aaaa"),
            // fdatasync of the log through a read-only fd (the syncer), 20..30
            record(1, 1, false, 25, 2, b"bb"),
            record(4, 1, true, 30, 20, b""),
            record(2, 1, false, 35, 1, b""),
            // SQLite's fsync of the log, 40..50
            record(3, 1, false, 50, 40, b""),
            record(1, 0, false, 55, 4, b"db"),
            record(1, 1, false, 60, 8, b"late"),
        ]);
        assert_eq!(log.ops().len(), 7);
        let mut disk = Disk::new(&log, Syncs::All);
        assert_eq!(disk.cut(30), [&b""[..], &b""[..]], "the sync ends at 30");
        // The write ending at 25 finished after the sync started (20): dropped.
        assert_eq!(disk.cut(31), [&b""[..], &b"aaaa"[..]]);
        assert_eq!(disk.cut(51), [&b""[..], &b"a"[..]], "the truncation and bb");
        assert_eq!(
            disk.cut(1000),
            [&b""[..], &b"a"[..]],
            "nothing syncs the rest"
        );
        let mut sqlite = Disk::new(&log, Syncs::SqliteOnly);
        assert_eq!(
            sqlite.cut(31),
            [&b""[..], &b""[..]],
            "the syncer's is ignored"
        );
        assert_eq!(sqlite.cut(51), [&b""[..], &b"a"[..]]);
        let mut none = Disk::new(&log, Syncs::None);
        assert_eq!(none.cut(1000), [&b""[..], &b""[..]]);
        assert_eq!(
            log.final_files(),
            [b"\0\0\0\0db".to_vec(), b"a\0\0\0\0\0\0\0late".to_vec()]
        );
    }
}
