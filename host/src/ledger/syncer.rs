//! The ledger's syncer thread: the log's fsync before a publish is answered (`fsync` mode),
//! the last id answered recorded in the mark between the two, and passive checkpoints
//! between fsyncs.

use std::{
    fs::File,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::Connection;

use super::{
    LedgerError, lock,
    mark::Answerer,
    store,
    writer::{Reply, Shared},
};

/// How often the syncer copies the log into the database when no publish waits.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Publishes waiting for the fsync that covers them, and the highest id among them (0:
/// none), recorded in the mark before they are answered.
pub(super) struct Waiting {
    pub(super) replies: Vec<Reply>,
    pub(super) answered: u64,
}

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
    /// Records the last id answered OK in the mark, after the fsync, before the answers.
    pub(super) answerer: Answerer,
}

impl Syncer {
    pub(super) fn run(mut self, requests: &Receiver<Waiting>) {
        loop {
            let mut waiting = match requests.recv_timeout(CHECKPOINT_EVERY) {
                Ok(waiting) => waiting,
                Err(RecvTimeoutError::Timeout) => Waiting {
                    replies: Vec::new(),
                    answered: 0,
                },
                Err(RecvTimeoutError::Disconnected) => return,
            };
            for more in requests.try_iter() {
                waiting.replies.extend(more.replies);
                waiting.answered = waiting.answered.max(more.answered);
            }
            if !waiting.replies.is_empty() {
                self.log
                    .sync_and_answer(&self.shared, waiting, &mut self.answerer);
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

    /// [`Log::sync`] unless the ledger failed already, and the last id answered recorded in
    /// the mark; then answers `waiting` (and poisons the ledger on a failure).
    pub(super) fn sync_and_answer(
        &mut self,
        shared: &Shared,
        waiting: Waiting,
        answerer: &mut Answerer,
    ) {
        let result = match shared.failed() {
            Some(e) => Err(e),
            None => self
                .sync(shared)
                .and_then(|()| record_answered(answerer, waiting.answered)),
        };
        if let Err(e) = &result {
            shared.poison(e);
        }
        for reply in waiting.replies {
            reply.send(result.clone());
        }
    }
}

/// Records in the mark that ids up to `id` are answered OK (0: none in this batch).
pub(super) fn record_answered(answerer: &mut Answerer, id: u64) -> Result<(), LedgerError> {
    if id == 0 {
        return Ok(());
    }
    answerer.answered(id).map_err(|e| {
        LedgerError::Fatal(format!(
            "cannot record the last id answered in {}: {e}",
            super::mark::FILE
        ))
    })
}
