//! Space: the settlement reserve given up on a full disk and made again once space is
//! freed (free pages given back to the file system a step at a time), and the housekeeping
//! that expires keys and dead letters and keeps the ledger's size measured.

use std::{
    fs::{self, File},
    io::Write as _,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::Writer;
use crate::{
    clock::Timestamp,
    ledger::{LedgerError, store},
};

/// Bytes kept free for settlements when the disk fills up.
pub(in crate::ledger) const RESERVE_BYTES: usize = 8 << 20;

pub(in crate::ledger) const RESERVE: &str = "reserve";

/// How long one housekeeping pass may give free pages back to the file system (the writer
/// commits nothing meanwhile; publishes are refused anyway until the reserve is made again).
pub(in crate::ledger) const GIVE_BACK_BUDGET: Duration = Duration::from_millis(200);

/// Deletes the reserve file to make room on a full disk; whether there was one.
pub(in crate::ledger) fn release_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE);
    let released = fs::remove_file(&path).is_ok();
    if released {
        tracing::warn!(path = %path.display(), "disk full: releasing the space reserved for settlements");
    }
    released
}

/// Keeps a reserve file so that settlements can still be written when the disk is full.
///
/// # Errors
/// Why it is not in place (the partial file is removed).
pub(in crate::ledger) fn ensure_reserve(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(RESERVE);
    if fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES as u64) {
        return Ok(());
    }
    let made = File::create(&path).and_then(|mut f| {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    });
    if made.is_err() {
        let _ = fs::remove_file(&path);
    }
    made
}

impl Writer {
    /// Runs `step` (one transaction, rolled back when it fails); when it fails for want of
    /// space and the reserve is still there, releases the reserve and runs it once more.
    pub(in crate::ledger) fn with_reserve(
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

    pub(in crate::ledger) fn measure(&mut self) {
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
    pub(in crate::ledger) fn housekeep(&mut self) {
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
        if !self.dir.join(RESERVE).exists() {
            self.remake_reserve();
        }
    }

    /// The reserve is gone (settlements used it on a full disk) or was never made: once the
    /// ledger holds a quarter of a reserve's worth of free pages (an operator's `forget
    /// --purge` or `purge` freed them; acks alone free little while an instance keeps its
    /// backlog), they go back to the file system, with its log (copied and cut to nothing);
    /// and the reserve is made again if it now fits. Publishing resumes then, without a
    /// restart. (Housekeeping's usual vacuum waits for more free pages than a small disk ever
    /// frees: publishing never resumed.)
    pub(in crate::ledger) fn remake_reserve(&mut self) {
        let enough = if self.giving_back {
            0
        } else {
            RESERVE_BYTES as u64 / 4 / self.page_size.max(512)
        };
        match self
            .set_sync(store::Sync::Written)
            .and_then(|()| store::give_back(&self.conn, enough, GIVE_BACK_BUDGET))
        {
            Ok(left) => self.giving_back = left > 0,
            // Out of space, or a reader in the way: tried again at the next housekeeping.
            Err(e) => {
                tracing::debug!(error = %e, "cannot give the ledger's free space back yet");
            }
        }
        self.measure();
        match ensure_reserve(&self.dir) {
            Ok(()) => {
                self.reserve_warned = false;
                if self.reserve_released {
                    self.reserve_released = false;
                    tracing::info!("space reserved for settlements again: publishing resumes");
                }
            }
            // Said once until it changes: housekeeping tries every second.
            Err(e) if !self.reserve_warned => {
                self.reserve_warned = true;
                tracing::warn!(
                    path = %self.dir.join(RESERVE).display(),
                    error = %e,
                    "cannot reserve space for settlements; publishing resumes once it can be \
                     reserved (tried every second)"
                );
            }
            Err(_) => {}
        }
    }
}
