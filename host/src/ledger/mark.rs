//! The ledger's mark: `state_dir/ledger.mark`, a small file beside the database that says
//! which ledger lives in this state dir and how far it got, so that a database lost, emptied,
//! replaced or cut short is noticed rather than started afresh (issue 18):
//!
//! - the ledger's **identity** (a random number, also in the database's `meta`);
//! - the **id high-water mark**: no id at or past it was ever given out. The writer raises it
//!   (fsynced) before it commits an id past it, a block of [`super::writer::ID_BLOCK`] ids at a
//!   time, so it costs one fsync per block, not one per commit; ids are never reused on one
//!   state dir, whatever happens to the database;
//! - the **last id answered OK**: written (one `pwrite`, no fsync) after a commit is as
//!   durable as its publishes were promised and before they are answered. Recovery compares
//!   it with the last id the database holds: what lies between was answered OK and lost.
//!
//! Layout (little-endian, 96 bytes, written in place once made): two slots of the identity
//! and high-water mark (32 bytes each: magic `plgdmark`, identity u64, mark u64, sequence u32,
//! CRC-32 of the 28 bytes before it), written alternately so that a torn write leaves the
//! other; then the answered record (magic `plgdansw`, identity u64, id u64, 0 u32, CRC-32).
//! A whole new mark is written to a temporary file, fsynced and renamed.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

/// The mark's file name inside `state_dir`.
pub(super) const FILE: &str = "ledger.mark";

const SLOT: usize = 32;
const SLOT_MAGIC: &[u8; 8] = b"plgdmark";
const ANSWERED_MAGIC: &[u8; 8] = b"plgdansw";
const ANSWERED_AT: u64 = 2 * SLOT as u64;
const SIZE: usize = 3 * SLOT;

/// What a mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marks {
    /// The ledger this state dir holds.
    pub identity: u64,
    /// No id at or past it was given out.
    pub reserved: u64,
    /// The last id answered OK since the mark was made (`None`: none, or its record was torn).
    pub answered: Option<u64>,
    /// The sequence of the slot read (0: a mark not read from a file).
    pub seq: u32,
}

/// Why a mark cannot be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum MarkError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is damaged ({why})")]
    Damaged { path: PathBuf, why: &'static str },
}

fn encode(magic: &[u8; 8], identity: u64, value: u64, seq: u32) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..8].copy_from_slice(magic);
    slot[8..16].copy_from_slice(&identity.to_le_bytes());
    slot[16..24].copy_from_slice(&value.to_le_bytes());
    slot[24..28].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&slot[..28]);
    slot[28..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// (identity, value, sequence) of a record whose magic and CRC hold.
fn decode(magic: &[u8; 8], slot: &[u8]) -> Option<(u64, u64, u32)> {
    let slot: &[u8; SLOT] = slot.try_into().ok()?;
    let u64_at = |at: usize| u64::from_le_bytes(slot[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
    if &slot[..8] != magic || u32_at(28) != crc32fast::hash(&slot[..28]) {
        return None;
    }
    Some((u64_at(8), u64_at(16), u32_at(24)))
}

/// Reads the mark in `dir`: `None` when there is none.
///
/// # Errors
/// [`MarkError::Io`] when it cannot be read; [`MarkError::Damaged`] when neither slot holds.
pub(super) fn read(dir: &Path) -> Result<Option<Marks>, MarkError> {
    let path = dir.join(FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MarkError::Io { path, source }),
    };
    let slots = [0, SLOT].map(|at| bytes.get(at..at + SLOT).and_then(|s| decode(SLOT_MAGIC, s)));
    let Some((identity, reserved, seq)) = slots.into_iter().flatten().max_by_key(|(.., seq)| *seq)
    else {
        return Err(MarkError::Damaged {
            path,
            why: if bytes.len() < SIZE {
                "too short"
            } else {
                "no slot holds"
            },
        });
    };
    let answered = bytes
        .get(ANSWERED_AT as usize..SIZE)
        .and_then(|s| decode(ANSWERED_MAGIC, s))
        .filter(|(of, ..)| *of == identity)
        .map(|(_, id, _)| id);
    Ok(Some(Marks {
        identity,
        reserved,
        answered,
        seq,
    }))
}

/// The writer's handle on the mark: raises the high-water mark.
#[derive(Debug)]
pub(super) struct Mark {
    file: File,
    path: PathBuf,
    identity: u64,
    /// The sequence of the slot written last (the next write goes to the other).
    seq: u32,
}

impl Mark {
    /// Writes a whole new mark in `dir` (temporary file, fsync, rename, fsync of `dir`) and
    /// opens it.
    ///
    /// # Errors
    /// The I/O error.
    pub(super) fn create(dir: &Path, marks: Marks) -> io::Result<Self> {
        let path = dir.join(FILE);
        let temp = dir.join(format!("{FILE}.new"));
        let mut bytes = [0u8; SIZE];
        // Sequence 1, in the slot of odd sequences.
        bytes[SLOT..2 * SLOT].copy_from_slice(&encode(
            SLOT_MAGIC,
            marks.identity,
            marks.reserved,
            1,
        ));
        if let Some(id) = marks.answered {
            bytes[ANSWERED_AT as usize..].copy_from_slice(&encode(
                ANSWERED_MAGIC,
                marks.identity,
                id,
                0,
            ));
        }
        {
            let file = File::create(&temp)?;
            file.write_all_at(&bytes, 0)?;
            file.sync_all()?;
        }
        fs::rename(&temp, &path)?;
        File::open(dir)?.sync_all()?;
        let file = File::options().read(true).write(true).open(&path)?;
        Ok(Self {
            file,
            path,
            identity: marks.identity,
            seq: 1,
        })
    }

    /// The mark of a ledger starting: `identity`, ids from `reserved` on, nothing answered
    /// yet. The mark `found` in `dir` is updated in place when it is the same ledger's (no
    /// new file: it works on a full disk), else a new one is written.
    ///
    /// # Errors
    /// The I/O error.
    pub(super) fn start(
        dir: &Path,
        identity: u64,
        reserved: u64,
        found: Option<&Marks>,
    ) -> io::Result<Self> {
        let path = dir.join(FILE);
        let same = found.is_some_and(|f| f.identity == identity)
            && fs::metadata(&path).is_ok_and(|m| m.len() >= SIZE as u64);
        let Some(found) = found.filter(|_| same) else {
            return Self::create(
                dir,
                Marks {
                    identity,
                    reserved,
                    answered: None,
                    seq: 0,
                },
            );
        };
        let mut mark = Self {
            file: File::options().read(true).write(true).open(&path)?,
            path,
            identity,
            seq: found.seq,
        };
        // The answered record is cleared and the high-water mark written, one fsync for both.
        mark.file.write_all_at(&[0u8; SLOT], ANSWERED_AT)?;
        mark.reserve(reserved)?;
        Ok(mark)
    }

    /// Where it is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Raises the high-water mark to `reserved`, durably (one `pwrite` of the older slot and
    /// an `fdatasync`) before it returns.
    ///
    /// # Errors
    /// The I/O error: the mark may not have moved.
    pub(super) fn reserve(&mut self, reserved: u64) -> io::Result<()> {
        let seq = self.seq.wrapping_add(1);
        let at = u64::from(seq % 2) * SLOT as u64;
        self.file
            .write_all_at(&encode(SLOT_MAGIC, self.identity, reserved, seq), at)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
    }

    /// A handle that records answered ids (for the thread that answers publishes).
    ///
    /// # Errors
    /// The I/O error of duplicating the file.
    pub(super) fn answerer(&self) -> io::Result<Answerer> {
        Ok(Answerer {
            file: self.file.try_clone()?,
            identity: self.identity,
            last: 0,
        })
    }
}

/// Records the last id answered OK: one `pwrite`, no fsync (it must survive a crash of the
/// process; after a power cut an older value only makes the comparison less sharp, and in
/// `fsync` mode what it names was fsynced before it was written).
#[derive(Debug)]
pub(super) struct Answerer {
    file: File,
    identity: u64,
    last: u64,
}

impl Answerer {
    /// Ids up to `id` are about to be answered OK.
    ///
    /// # Errors
    /// The I/O error.
    pub(super) fn answered(&mut self, id: u64) -> io::Result<()> {
        if id <= self.last {
            return Ok(());
        }
        self.file
            .write_all_at(&encode(ANSWERED_MAGIC, self.identity, id, 0), ANSWERED_AT)?;
        self.last = id;
        Ok(())
    }
}

/// A new ledger identity (never 0: 0 is "none" in a database that has no identity yet).
pub(super) fn new_identity() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_reads_back_what_was_written_and_survives_a_torn_slot() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let mut mark = Mark::create(
            dir.path(),
            Marks {
                identity: 7,
                reserved: 100,
                answered: None,
                seq: 0,
            },
        )
        .unwrap();
        let marks = read(dir.path()).unwrap().unwrap();
        assert_eq!(
            (marks.identity, marks.reserved, marks.answered),
            (7, 100, None)
        );
        mark.reserve(200).unwrap();
        let mut answerer = mark.answerer().unwrap();
        answerer.answered(150).unwrap();
        answerer.answered(120).unwrap();
        let marks = read(dir.path()).unwrap().unwrap();
        assert_eq!((marks.reserved, marks.answered), (200, Some(150)));
        mark.reserve(300).unwrap();
        // A torn write of the newest slot (sequence 3, the second slot): the other holds.
        let path = dir.path().join(FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[SLOT + 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let found = read(dir.path()).unwrap().unwrap();
        assert_eq!(found.reserved, 200);
        // Started again: updated in place, the answered record cleared.
        drop(mark);
        let mut mark = Mark::start(dir.path(), 7, 250, Some(&found)).unwrap();
        let marks = read(dir.path()).unwrap().unwrap();
        assert_eq!(
            (marks.identity, marks.reserved, marks.answered),
            (7, 250, None)
        );
        mark.reserve(260).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().reserved, 260);
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read(dir.path()).unwrap().unwrap().reserved,
            250,
            "the older slot holds"
        );
        bytes[SLOT + 20] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(dir.path()), Err(MarkError::Damaged { .. })));
    }
}
