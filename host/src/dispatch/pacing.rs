//! Per instance: how fast and in what order deliveries may go out beyond "first deliveries
//! in acceptance order" — `rate_limit` ([`RateBucket`]: deliveries per second, a token
//! bucket holding a tenth of a second's worth) and `ordering_key` ([`KeyOrder`]: deliveries
//! whose key header is equal go out one at a time, in acceptance order).
//!
//! A key is *held* by the delivery handed out with it from its first hand-out until it
//! ends (acked, dead-lettered, purged): a retry waiting its backoff keeps it, so the next
//! message of that key never overtakes it (as message groups of FIFO queues do). Messages
//! of a held key wait *parked*, in order, and go to the front of the ready queue when the
//! key is let go; other keys, and messages without the header, go on meanwhile.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::clock::Timestamp;

/// `rate_limit`: a token bucket refilled continuously.
#[derive(Debug, Clone)]
pub(super) struct RateBucket {
    per_ms: f64,
    capacity: f64,
    tokens: f64,
    at: Timestamp,
}

impl RateBucket {
    /// `per_second` deliveries a second, full at `now`.
    pub(super) fn new(per_second: f64, now: Timestamp) -> Self {
        let capacity = (per_second / 10.0).max(1.0);
        Self {
            per_ms: per_second / 1000.0,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        let elapsed = now.0.saturating_sub(self.at.0) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.at = now;
    }

    /// The limit it enforces, deliveries per second.
    pub(super) fn per_second(&self) -> f64 {
        self.per_ms * 1000.0
    }

    /// How many deliveries may go out now.
    pub(super) fn available(&mut self, now: Timestamp) -> usize {
        self.refill(now);
        self.tokens.floor() as usize
    }

    /// `count` deliveries went out.
    pub(super) fn take(&mut self, count: usize) {
        self.tokens = (self.tokens - count as f64).max(0.0);
    }

    /// When the next delivery may go out (now if it may).
    pub(super) fn next(&self) -> Timestamp {
        if self.tokens >= 1.0 {
            return self.at;
        }
        let wait = ((1.0 - self.tokens) / self.per_ms).ceil() as u64;
        Timestamp(self.at.0 + wait.max(1))
    }
}

/// `ordering_key`: which delivery holds each key, and the messages parked behind it.
#[derive(Debug, Default)]
pub(super) struct KeyOrder {
    /// Key → the message holding it.
    holders: FxHashMap<String, u64>,
    /// Message → the key it holds.
    held: FxHashMap<u64, String>,
    /// Key → messages waiting for it, in acceptance order.
    parked: FxHashMap<String, VecDeque<u64>>,
}

impl KeyOrder {
    /// Whether `message` (with `key`) may go out now; if it may, it holds the key from now on,
    /// else it is parked behind the holder.
    pub(super) fn admit(&mut self, message: u64, key: &str) -> bool {
        match self.holders.get(key) {
            Some(&holder) if holder != message => {
                self.parked
                    .entry(key.to_owned())
                    .or_default()
                    .push_back(message);
                false
            }
            Some(_) => true,
            None => {
                self.holders.insert(key.to_owned(), message);
                self.held.insert(message, key.to_owned());
                true
            }
        }
    }

    /// `message` ended: the key it held goes to the next message parked behind it, which is
    /// returned (to go out next).
    pub(super) fn ended(&mut self, message: u64) -> Option<u64> {
        let key = self.held.remove(&message)?;
        self.holders.remove(&key);
        let parked = self.parked.get_mut(&key)?;
        let next = parked.pop_front();
        if parked.is_empty() {
            self.parked.remove(&key);
        }
        next
    }

    /// Parked messages, every key's in order.
    pub(super) fn parked(&self) -> impl Iterator<Item = u64> + '_ {
        self.parked.values().flatten().copied()
    }

    /// Keeps only the parked messages for which `live` holds.
    pub(super) fn retain(&mut self, live: impl Fn(u64) -> bool) {
        self.parked.retain(|_, queue| {
            queue.retain(|m| live(*m));
            !queue.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_tenth_of_a_second_then_one_per_interval() {
        let mut bucket = RateBucket::new(100.0, Timestamp(1_000));
        assert_eq!(bucket.available(Timestamp(1_000)), 10);
        bucket.take(10);
        assert_eq!(bucket.available(Timestamp(1_000)), 0);
        assert_eq!(bucket.next(), Timestamp(1_010));
        assert_eq!(bucket.available(Timestamp(1_025)), 2);
        // Never more than the capacity, however long it waited.
        assert_eq!(bucket.available(Timestamp(60_000)), 10);
        let mut slow = RateBucket::new(0.5, Timestamp(0));
        assert_eq!(slow.available(Timestamp(0)), 1);
        slow.take(1);
        assert_eq!(slow.next(), Timestamp(2_000));
    }

    #[test]
    fn a_key_goes_out_one_message_at_a_time_in_order() {
        let mut order = KeyOrder::default();
        assert!(order.admit(1, "a"));
        assert!(order.admit(2, "b"), "another key goes on");
        assert!(!order.admit(3, "a"));
        assert!(!order.admit(4, "a"));
        assert!(order.admit(1, "a"), "the holder again (a retry)");
        assert_eq!(order.parked().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(order.ended(1), Some(3), "the next in line");
        assert!(order.admit(3, "a"));
        assert!(!order.admit(5, "a"));
        order.retain(|m| m != 4);
        assert_eq!(order.ended(3), Some(5));
        assert_eq!(order.ended(2), None);
        assert_eq!(order.ended(99), None);
    }
}
