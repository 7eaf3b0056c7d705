//! In-flight markers: "plugin code is being called for this attempt", recorded just before
//! the call in a form that survives a crash of the process without an fsync per call
//! (docs/design.md §7). One file in `state_dir` holds a fixed-size slot per running actor; the
//! actor overwrites its slot with one `pwrite` before each call and marks it idle when its
//! queue runs dry. Once `pwrite` returned the bytes are the kernel's and outlive the
//! process, so after an unclean exit each slot names the attempt its actor was running —
//! exactly the attempts to charge a `crash`, and not the ones only queued behind it.
//!
//! Slot: message id (u64 LE), instance key (u32 LE), attempt (u32 LE, 0 = idle), CRC-32 of
//! those 16 bytes (u32 LE), padding to [`SLOT`] bytes. A slot whose CRC does not match is
//! reported with its offset and not charged.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustc_hash::FxHashMap;

use super::{LedgerError, writer::Shared};

pub(super) const FILE: &str = "inflight";
const SLOT: usize = 32;
/// The marker file's size when created: 128 slots (more actors than that may need a new
/// block for theirs).
const PREALLOCATED: u64 = 4096;

/// (message, instance key) → attempt.
pub(super) type Marked = FxHashMap<(u64, u32), u32>;

fn encode(message: u64, inst: u32, attempt: u32) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[..8].copy_from_slice(&message.to_le_bytes());
    slot[8..12].copy_from_slice(&inst.to_le_bytes());
    slot[12..16].copy_from_slice(&attempt.to_le_bytes());
    let crc = crc32fast::hash(&slot[..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// What a marker file says, read at start.
#[derive(Debug, Default)]
pub(super) struct Read {
    /// The attempt each busy actor was running.
    pub marked: Marked,
    /// Slots that cannot be read: their byte offsets.
    pub corrupt: Vec<u64>,
}

/// Reads the marker file in `dir` (absent: nothing marked).
pub(super) fn read(dir: &Path) -> io::Result<Read> {
    let bytes = match fs::read(dir.join(FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::default()),
        Err(e) => return Err(e),
    };
    let mut read = Read::default();
    for (i, slot) in bytes.chunks(SLOT).enumerate() {
        if slot.iter().all(|b| *b == 0) {
            continue; // never used
        }
        let crc = slot
            .get(16..20)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        if slot.len() < SLOT || crc != Some(crc32fast::hash(&slot[..16])) {
            read.corrupt.push((i * SLOT) as u64);
            continue;
        }
        let message = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
        let inst = u32::from_le_bytes(slot[8..12].try_into().expect("4 bytes"));
        let attempt = u32::from_le_bytes(slot[12..16].try_into().expect("4 bytes"));
        if attempt > 0 {
            let latest = read.marked.entry((message, inst)).or_insert(attempt);
            *latest = (*latest).max(attempt);
        }
    }
    Ok(read)
}

/// The marker file of a running ledger: hands out slots.
#[derive(Debug)]
pub(super) struct Slots {
    file: File,
    /// Slot numbers given back, and the next never used.
    free: Mutex<(Vec<u64>, u64)>,
}

impl Slots {
    /// Starts an empty marker file in `dir` (what it held was read and charged first).
    ///
    /// It is cleared by writing zeros over it, at least [`PREALLOCATED`] bytes, not by
    /// truncating it: its blocks are taken now, so that the `pwrite` before a call never
    /// needs a new one on a full disk (an error there stops the daemon).
    pub(super) fn create(dir: &Path) -> io::Result<Arc<Self>> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(dir.join(FILE))?;
        let len = file.metadata()?.len().max(PREALLOCATED);
        file.write_all_at(&vec![0; len as usize], 0)?;
        Ok(Arc::new(Self {
            file,
            free: Mutex::new((Vec::new(), 0)),
        }))
    }

    /// A slot for one actor of the instance with persistent key `inst`.
    pub(super) fn claim(self: &Arc<Self>, inst: u32) -> MarkerSlot {
        let mut free = super::lock(&self.free);
        let number = free.0.pop().unwrap_or_else(|| {
            free.1 += 1;
            free.1 - 1
        });
        MarkerSlot {
            slots: self.clone(),
            offset: number * SLOT as u64,
            inst,
        }
    }

    /// A graceful stop: nothing is in flight.
    pub(super) fn clear(&self) -> io::Result<()> {
        self.file.set_len(0)
    }
}

/// One actor's slot.
#[derive(Debug)]
pub(super) struct MarkerSlot {
    slots: Arc<Slots>,
    offset: u64,
    inst: u32,
}

impl MarkerSlot {
    /// Plugin code is about to be called for `attempt` of `message`.
    pub(super) fn calling(&self, message: u64, attempt: u32) -> io::Result<()> {
        self.slots
            .file
            .write_all_at(&encode(message, self.inst, attempt), self.offset)
    }

    /// No call is running.
    pub(super) fn idle(&self) -> io::Result<()> {
        self.slots
            .file
            .write_all_at(&encode(0, self.inst, 0), self.offset)
    }
}

impl Drop for MarkerSlot {
    fn drop(&mut self) {
        if self.idle().is_ok() {
            super::lock(&self.slots.free)
                .0
                .push(self.offset / SLOT as u64);
        }
    }
}

/// One actor's in-flight marker ([`Ledger::marker`](super::Ledger::marker)): written just
/// before each call to plugin code, with one `pwrite` and no fsync (it must survive a crash
/// of the process, not of the machine). A failed write stops the daemon like any ledger
/// failure (the ledger's fail-stop).
pub struct InFlightMarker {
    slot: MarkerSlot,
    shared: Arc<Shared>,
    /// The marker file, for the error.
    path: PathBuf,
}

impl std::fmt::Debug for InFlightMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightMarker")
            .field("slot", &self.slot)
            .finish()
    }
}

impl InFlightMarker {
    pub(super) fn new(slot: MarkerSlot, shared: Arc<Shared>, path: PathBuf) -> Self {
        Self { slot, shared, path }
    }

    fn check(&self, written: io::Result<()>) {
        if let Err(e) = written {
            self.shared.poison(&LedgerError::Fatal(format!(
                "cannot record an in-flight attempt in {}: {e}",
                self.path.display()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_names_the_call_its_actor_was_running() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::create(dir.path()).unwrap();
        let a = slots.claim(0);
        let b = slots.claim(1);
        let c = slots.claim(2);
        a.calling(1, 1).unwrap();
        a.calling(2, 1).unwrap(); // message 1 ended; 2 is running
        b.calling(5, 3).unwrap();
        c.calling(9, 1).unwrap();
        c.idle().unwrap();
        std::mem::forget((a, b, c)); // a crash: no drop
        let read = read(dir.path()).unwrap();
        let mut marked: Vec<_> = read.marked.into_iter().collect();
        marked.sort_unstable();
        assert_eq!(marked, vec![((2, 0), 1), ((5, 1), 3)]);
        assert!(read.corrupt.is_empty());
    }

    #[test]
    fn a_released_slot_is_reused_and_a_damaged_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::create(dir.path()).unwrap();
        let a = slots.claim(0);
        a.calling(1, 1).unwrap();
        drop(a);
        let b = slots.claim(4);
        assert_eq!(b.offset, 0, "the first slot again");
        b.calling(7, 2).unwrap();
        let c = slots.claim(5);
        c.calling(8, 1).unwrap();
        std::mem::forget((b, c));
        let path = dir.path().join(FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[SLOT + 3] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let read = read(dir.path()).unwrap();
        assert_eq!(read.marked.get(&(7, 4)), Some(&2));
        assert_eq!(read.marked.len(), 1);
        assert_eq!(read.corrupt, vec![SLOT as u64]);
    }
}
