//! The idempotency keys table ([`Keys`]): the keys seen within `dedupe_window` and what
//! their first publish got, expired by time; and the [`Decision`] a repeat of a key waits on
//! while the batch that first published it is not yet recorded.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::oneshot;

use super::{Published, lock};
use crate::clock::Timestamp;

/// Idempotency keys seen within `dedupe_window`, with what their first publish got. Every
/// way in goes through it (the API, and anything else that publishes with a key); it starts
/// from the keys the ledger kept (a key survives a restart) and keys expire by time, however
/// many there are.
#[derive(Debug)]
pub(super) struct Keys {
    window: Duration,
    /// Each key is allocated once, shared with `order`.
    seen: HashMap<Arc<str>, Seen>,
    /// (time, sequence number, key) in the order they were recorded: the oldest expire
    /// first. An entry whose key was recorded again since (another sequence number) is
    /// skipped.
    order: VecDeque<(Timestamp, u64, Arc<str>)>,
    sequence: u64,
}

#[derive(Debug)]
struct Seen {
    published: Published,
    at: Timestamp,
    sequence: u64,
    /// The batch that records it, until it is known to be recorded (`None`: it is).
    pending: Option<Arc<Decision>>,
}

/// What a publish finds of its key.
pub(super) enum Lookup {
    /// A duplicate of a recorded publish.
    Recorded(Published),
    /// A duplicate of a publish whose batch is not yet recorded: its answer waits for that.
    Pending(Published, oneshot::Receiver<bool>),
}

impl Keys {
    pub(super) fn new(window: Duration, known: Vec<(String, u64, Timestamp)>) -> Self {
        let mut keys = Self {
            window,
            seen: HashMap::with_capacity(known.len()),
            order: VecDeque::with_capacity(known.len()),
            sequence: 0,
        };
        let mut known = known;
        known.sort_by_key(|(_, _, at)| *at);
        for (key, id, at) in known {
            // How many instances a key's message reached is not kept across restarts.
            let published = Published {
                id,
                instances: 0,
                duplicate: true,
            };
            keys.insert(&key, published, at, None);
        }
        keys
    }

    pub(super) fn lookup(&mut self, key: &str, now: Timestamp) -> Option<Lookup> {
        let seen = self.seen.get_mut(key)?;
        if now.since(seen.at) >= self.window {
            return None;
        }
        let published = seen.published;
        let Some(decision) = &seen.pending else {
            return Some(Lookup::Recorded(published));
        };
        match decision.follow() {
            Ok(true) => {
                seen.pending = None;
                Some(Lookup::Recorded(published))
            }
            // Its first publish was refused by the ledger: this one is the first now.
            Ok(false) => None,
            Err(answer) => Some(Lookup::Pending(published, answer)),
        }
    }

    pub(super) fn insert(
        &mut self,
        key: &str,
        published: Published,
        at: Timestamp,
        pending: Option<Arc<Decision>>,
    ) {
        self.sequence += 1;
        let published = Published {
            duplicate: true,
            ..published
        };
        let key: Arc<str> = Arc::from(key);
        self.order.push_back((at, self.sequence, key.clone()));
        self.seen.insert(
            key,
            Seen {
                published,
                at,
                sequence: self.sequence,
                pending,
            },
        );
    }

    /// Keys held now.
    pub(super) fn held(&self) -> usize {
        self.seen.len()
    }

    /// When the oldest key held expires (ms since the epoch; `u64::MAX`: none held).
    pub(super) fn next_expiry(&self) -> u64 {
        self.order
            .front()
            .map_or(u64::MAX, |(at, ..)| at.after(self.window).0)
    }

    /// Drops the keys older than the window; returns when the next one expires (ms since the
    /// epoch; `u64::MAX`: none held).
    pub(super) fn expire(&mut self, now: Timestamp) -> u64 {
        while let Some((at, sequence, _)) = self.order.front() {
            if now.since(*at) < self.window {
                break;
            }
            let sequence = *sequence;
            let (_, _, key) = self.order.pop_front().expect("a front");
            if self.seen.get(&key).is_some_and(|s| s.sequence == sequence) {
                self.seen.remove(&key);
            }
        }
        // A burst of keys must not hold its table's memory once they expired.
        if self.seen.capacity() > 4 * self.seen.len() + 1024 {
            self.seen.shrink_to_fit();
            self.order.shrink_to_fit();
        }
        self.next_expiry()
    }
}

/// Whether the batch that first published some keys was recorded, for the publishes of the
/// same keys that come before the ledger answered it: they answer with its id only once it
/// is recorded (two publishes of one key never both pass, and a duplicate is never answered
/// for a message that was not kept).
#[derive(Debug, Default)]
pub(super) struct Decision(Mutex<Decided>);

#[derive(Debug, Default)]
enum Decided {
    #[default]
    Open,
    Waiting(Vec<oneshot::Sender<bool>>),
    Done(bool),
}

impl Decision {
    /// The answer if known, or where it will come.
    fn follow(&self) -> Result<bool, oneshot::Receiver<bool>> {
        let mut state = lock(&self.0);
        match &mut *state {
            Decided::Done(recorded) => Ok(*recorded),
            Decided::Open => {
                let (tx, rx) = oneshot::channel();
                *state = Decided::Waiting(vec![tx]);
                Err(rx)
            }
            Decided::Waiting(waiting) => {
                let (tx, rx) = oneshot::channel();
                waiting.push(tx);
                Err(rx)
            }
        }
    }

    fn decide(&self, recorded: bool) {
        let state = std::mem::replace(&mut *lock(&self.0), Decided::Done(recorded));
        if let Decided::Waiting(waiting) = state {
            for tx in waiting {
                let _ = tx.send(recorded);
            }
        }
    }
}

/// Decides a batch's keys when dropped: recorded if the ledger ran the batch's `then` (it
/// drops it unrun when the batch fails, or when it is gone).
pub(super) struct Decider {
    pub(super) decision: Arc<Decision>,
    pub(super) recorded: bool,
}

impl Drop for Decider {
    fn drop(&mut self) {
        self.decision.decide(self.recorded);
    }
}
