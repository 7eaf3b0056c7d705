//! Operators' changes run by the writer: replays and purges a chunk at a time between
//! commits (publishes go on meanwhile), forgets, and an instance attached or remembered.

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::Writer;
use crate::{
    clock::Timestamp,
    delivery::Delivery,
    ledger::{Forget, LedgerError, Remembered, Selection, store},
};

/// The most dead letters an operator's replay or purge takes per transaction; a chunk also
/// ends once [`CHUNK_TIME`] is spent. The writer commits what queued up between two chunks,
/// so publishes go on during a long one.
pub(in crate::ledger) const CHUNK: usize = 1024;

/// How long one chunk of an operator's replay or purge may hold the writer (a publish
/// queued behind it waits about that long).
pub(in crate::ledger) const CHUNK_TIME: Duration = Duration::from_millis(2);

/// An operator's change, run by the writer: replays, purges and forgets in turn, a
/// replay or purge a chunk at a time ([`CHUNK`]); the others at once, between two chunks.
pub(in crate::ledger) enum Op {
    Replay(Selection, Timestamp),
    Purge(Selection),
    Forget(String, Forget, Timestamp),
    /// An instance added while running: its key, registered if new, and what waits for it.
    Attach(String),
    /// What is remembered of an instance (its subscription, a pause).
    Remember(String, Remembered),
}

pub(in crate::ledger) enum Done {
    Replayed(Vec<(u64, u32, Delivery, u64)>),
    Count(u64),
    Attached(u32, Vec<store::StoredDelivery>),
}

/// A replay or purge under way, or a forget waiting its turn behind one.
pub(in crate::ledger) struct Task {
    pub(in crate::ledger) op: Op,
    pub(in crate::ledger) sweep: Option<store::Sweep>,
    /// What the chunks so far did.
    pub(in crate::ledger) replayed: Vec<(u64, u32, Delivery, u64)>,
    pub(in crate::ledger) count: u64,
    pub(in crate::ledger) started: Instant,
    pub(in crate::ledger) reported: Instant,
    pub(in crate::ledger) reply: Sender<Result<Done, LedgerError>>,
}

impl Task {
    pub(in crate::ledger) fn name(&self) -> &'static str {
        match self.op {
            Op::Replay(..) => "replay",
            Op::Purge(..) => "purge",
            Op::Forget(..) => "forget",
            Op::Attach(..) | Op::Remember(..) => "instance",
        }
    }
}

impl Writer {
    /// An instance attached or remembered, fsynced in a transaction of its own.
    pub(in crate::ledger) fn operate(&mut self, op: Op) -> Result<Done, LedgerError> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        // On a full disk an operator's act may use the reserve, as settlements do: ending a
        // subscription is how space is freed.
        let mut done = None;
        let result = self.with_reserve(|w| {
            w.set_sync(store::Sync::Full)?;
            let conn = &w.conn;
            done = Some(store::in_transaction(conn, "ledger", || {
                operate(conn, &op)
            })?);
            Ok(())
        });
        if let Err(e @ LedgerError::Fatal(_)) = &result {
            self.shared.poison(e);
        }
        result.map(|()| done.expect("set when the transaction succeeded"))
    }

    /// Runs the next chunk of the first operator's task, in a transaction of its own
    /// (written to the OS; the last one fsynced), and answers it once it is done.
    pub(in crate::ledger) fn step(&mut self) {
        let Some(mut task) = self.tasks.pop_front() else {
            return;
        };
        match self.chunk(&mut task) {
            Ok(false) => {
                if task.reported.elapsed() >= Duration::from_secs(1) {
                    task.reported = Instant::now();
                    tracing::info!(
                        operation = task.name(),
                        done = task.count + task.replayed.len() as u64,
                        "operator's operation in progress"
                    );
                }
                self.tasks.push_front(task);
            }
            Ok(true) => {
                let done = task.count + task.replayed.len() as u64;
                tracing::info!(
                    operation = task.name(),
                    done,
                    micros = task.started.elapsed().as_micros() as u64,
                    "operator's operation done"
                );
                let result = match task.op {
                    Op::Replay(..) => Done::Replayed(task.replayed),
                    _ => Done::Count(task.count),
                };
                let _ = task.reply.send(Ok(result));
            }
            Err(e) => {
                if matches!(e, LedgerError::Fatal(_)) {
                    self.shared.poison(&e);
                }
                let _ = task.reply.send(Err(e));
            }
        }
    }

    /// One chunk of `task`; whether it is finished (and durable).
    pub(in crate::ledger) fn chunk(&mut self, task: &mut Task) -> Result<bool, LedgerError> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        let Task {
            op,
            sweep,
            replayed,
            count,
            ..
        } = task;
        let (selection, now) = match op {
            // A forget is one transaction (the backlog of an instance that does not run).
            // On a full disk it may use the reserve, as settlements do: it frees space.
            Op::Forget(name, how, now) => {
                let (how, now) = (*how, *now);
                self.with_reserve(|w| {
                    w.set_sync(store::Sync::Full)?;
                    let conn = &w.conn;
                    *count = store::in_transaction(conn, "ledger", || {
                        store::forget(conn, name, how, now)
                    })?;
                    Ok(())
                })?;
                return Ok(true);
            }
            Op::Replay(selection, now) => (selection, Some(*now)),
            Op::Purge(selection) => (selection, None),
            Op::Attach(..) | Op::Remember(..) => unreachable!("run at once, not as tasks"),
        };
        let sweep = sweep.get_or_insert_with(|| store::Sweep::new(selection));
        self.set_sync(store::Sync::Written)?;
        let conn = &self.conn;
        match now {
            Some(now) => {
                let rows = store::in_transaction(conn, "ledger", || {
                    store::replay(conn, sweep, CHUNK_TIME, now)
                })?;
                replayed.extend(rows);
            }
            None => {
                // A purge frees space: on a full disk it may use the reserve. A chunk rolled
                // back is taken again from where it began.
                let from = sweep.clone();
                self.with_reserve(|w| {
                    *sweep = from.clone();
                    let conn = &w.conn;
                    *count += store::in_transaction(conn, "ledger", || {
                        store::purge(conn, sweep, CHUNK_TIME)
                    })?;
                    Ok(())
                })?;
            }
        }
        if !sweep.finished() {
            return Ok(false);
        }
        // Durable before it is answered: one fsync of the log covers every chunk.
        if *count + replayed.len() as u64 > 0 {
            self.set_sync(store::Sync::Full)?;
            let conn = &self.conn;
            store::in_transaction(conn, "ledger", || store::set_meta(conn, "clean", 0))?;
        }
        Ok(true)
    }
}

/// An instance attached (its waiting deliveries read) or remembered, inside the caller's
/// transaction.
fn operate(conn: &rusqlite::Connection, op: &Op) -> Result<Done, LedgerError> {
    match op {
        Op::Remember(name, remembered) => {
            store::remember(conn, name, remembered).map(|()| Done::Count(0))
        }
        Op::Attach(name) => {
            let [key] = store::instance_keys(conn, std::slice::from_ref(name))?[..] else {
                unreachable!("one key per name");
            };
            let mut waiting = Vec::new();
            store::scan(conn, Some(key), |stored| {
                waiting.push(stored);
                Ok(())
            })?;
            Ok(Done::Attached(key, waiting))
        }
        Op::Replay(..) | Op::Purge(..) | Op::Forget(..) => {
            unreachable!("replays, purges and forgets are tasks")
        }
    }
}
