//! [`Leases`]: when each attempt in flight stops being its actor's. An attempt's lease is
//! pushed when it is handed out; once it ends unsettled the dispatcher fails the attempt with
//! `timeout`. A heap cannot remove an entry, so a lease stays after its attempt settled: it
//! is skipped when its time comes, and swept out before the ended ones pile up.

use std::{cmp::Reverse, collections::BinaryHeap};

use crate::{clock::Timestamp, routing::InstanceId};

/// Leases kept without a sweep however few are in flight.
const SWEEP_FLOOR: usize = 4096;

/// The leases of the attempts handed out, by end time.
#[derive(Debug, Default)]
pub(super) struct Leases {
    /// (lease end, message, instance, attempt); entries whose attempt moved on are skipped.
    heap: BinaryHeap<Reverse<(u64, u64, InstanceId, u32)>>,
    /// Leases left by the last sweep.
    swept: usize,
}

impl Leases {
    /// `attempt` of `message` to `instance` is leased until `until`.
    pub(super) fn push(
        &mut self,
        until: Timestamp,
        message: u64,
        instance: InstanceId,
        attempt: u32,
    ) {
        self.heap
            .push(Reverse((until.0, message, instance, attempt)));
    }

    /// When the earliest lease ends.
    pub(super) fn next_end(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((at, ..))| Timestamp(*at))
    }

    /// Takes the next lease that ended by `now`: (message, instance, attempt). The caller
    /// checks whether that attempt is still in flight.
    pub(super) fn pop_ended(&mut self, now: Timestamp) -> Option<(u64, InstanceId, u32)> {
        let Reverse((at, message, instance, attempt)) = *self.heap.peek()?;
        if at > now.0 {
            return None;
        }
        self.heap.pop();
        Some((message, instance, attempt))
    }

    /// Keeps only the leases of attempts still in flight, once the heap holds more than
    /// twice what the last sweep kept plus [`SWEEP_FLOOR`]: amortized O(1) a lease. The heap
    /// then holds about what is in flight, not every hand-out of the last `ack_timeout`
    /// (3,000,000 entries after a minute of 100,000 msgs/s, whose expiry then cost the
    /// dispatcher's loop for 30 s).
    pub(super) fn sweep(&mut self, in_flight: impl Fn(u64, InstanceId, u32) -> bool) {
        if self.heap.len() <= 2 * self.swept + SWEEP_FLOOR {
            return;
        }
        self.heap
            .retain(|Reverse((_, message, instance, attempt))| {
                in_flight(*message, *instance, *attempt)
            });
        self.swept = self.heap.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_leases_are_swept_once_they_outnumber_the_live_ones() {
        let mut leases = Leases::default();
        // Messages below 10 are in flight; the others ended long before their lease.
        let in_flight = |message: u64, _, _| message < 10;
        for message in 0..SWEEP_FLOOR as u64 {
            leases.push(Timestamp(1_000 + message), message, 0, 1);
            leases.sweep(in_flight);
        }
        assert_eq!(
            (leases.heap.len(), leases.swept),
            (SWEEP_FLOOR, 0),
            "not yet"
        );
        leases.push(Timestamp(1), 99_999, 0, 1);
        leases.sweep(in_flight);
        assert_eq!(
            (leases.heap.len(), leases.swept),
            (10, 10),
            "only the live ones stay"
        );
        // The earliest live lease is still first.
        assert_eq!(leases.heap.peek(), Some(&Reverse((1_000, 0, 0, 1))));
        for message in 10_000..10_000 + SWEEP_FLOOR as u64 + 20 {
            leases.push(Timestamp(5), message, 0, 1);
            leases.sweep(in_flight);
        }
        assert!(
            leases.heap.len() <= 2 * 10 + SWEEP_FLOOR,
            "{}",
            leases.heap.len()
        );
    }

    #[test]
    fn only_ended_leases_are_taken_earliest_first() {
        let mut leases = Leases::default();
        leases.push(Timestamp(30), 3, 0, 1);
        leases.push(Timestamp(10), 1, 0, 2);
        leases.push(Timestamp(20), 2, 1, 1);
        assert_eq!(leases.next_end(), Some(Timestamp(10)));
        assert_eq!(leases.pop_ended(Timestamp(9)), None);
        assert_eq!(leases.pop_ended(Timestamp(20)), Some((1, 0, 2)));
        assert_eq!(leases.pop_ended(Timestamp(20)), Some((2, 1, 1)));
        assert_eq!(leases.pop_ended(Timestamp(20)), None);
        assert_eq!(leases.next_end(), Some(Timestamp(30)));
    }
}
