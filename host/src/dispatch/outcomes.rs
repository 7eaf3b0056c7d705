//! What an outcome does to its delivery, on the dispatcher's loop: an ack (with the children
//! the attempt published, committed in the same batch), a retry, a rejection, a failure (the
//! circuit breaker decides whether it counts; the delivery's rules whether it waits or is
//! dead-lettered), and the dead letter itself. A settlement for an attempt no longer in
//! flight is stale: counted, logged at most once a second, ignored.

use plugind_api::{Outcome, hosting::CallErrorKind};

use super::DispatchLoop;
use crate::{
    actor::Settlement,
    circuit,
    clock::Timestamp,
    deferred::TokenEnd,
    delivery::{Failure, Transition},
    events::EventKind,
    ledger::Record,
    outcomes::OutcomeKind,
    routing::InstanceId,
};

impl DispatchLoop {
    /// An outcome from plugin code: applied only to the attempt still in flight.
    pub(super) fn settle(
        &mut self,
        instance: InstanceId,
        s: Settlement,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let key = (s.message, instance);
        let in_flight = self.live.get(&key).and_then(|l| l.delivery.in_flight());
        if s.token {
            self.applied(instance, s.message, s.attempt);
        }
        if matches!(s.result, Ok(Outcome::Defer)) {
            // The call returned and its token is out (or already settled through it): only
            // the credit came back.
            if in_flight == Some(s.attempt)
                && let Some(live) = self.live.get_mut(&key)
            {
                live.delivery.defers += 1;
            }
            return;
        }
        if in_flight != Some(s.attempt) {
            self.stale += 1;
            // A plugin stopped and resumed (SIGSTOP, a long GC pause) answers every lease
            // that expired meanwhile: one line a second, with how many were left out.
            if let Some(more) = self.stale_log.admit(std::time::Instant::now()) {
                tracing::info!(
                    instance = %self.instances[instance as usize].slot.name,
                    id = s.message,
                    attempt = s.attempt,
                    left_out = more,
                    "stale settlement refused: the attempt is no longer in flight"
                );
            }
            return;
        }
        let failure = match s.result {
            Ok(Outcome::Ack) => {
                let queue = &mut self.instances[instance as usize];
                queue.slot.breaker.on_success(s.message);
                queue.stats.hung = false;
                let live = self.live.get_mut(&key).expect("checked in flight above");
                live.delivery
                    .ack(s.attempt, now)
                    .expect("checked in flight above");
                records.push(Record::Acked {
                    message: s.message,
                    instance,
                });
                queue.stats.outcomes.count(OutcomeKind::Ack);
                // Children commit in the same batch as their parent's ack.
                let children = self.ingress.admit_children(s.children, now, records);
                self.finish(key);
                for child in children {
                    self.add(child, now);
                }
                return;
            }
            Ok(Outcome::Retry { after, reason }) => Failure::Retry { reason, after },
            Ok(Outcome::Reject { reason }) => {
                let queue = &mut self.instances[instance as usize];
                // The plugin answered on purpose: for the circuit that is a success (a
                // rejected probe closes it; left open, it would wait for that message
                // forever).
                queue.slot.breaker.on_success(s.message);
                queue.stats.outcomes.count(OutcomeKind::Reject);
                let live = self.live.get_mut(&key).expect("checked in flight above");
                live.delivery
                    .reject(s.attempt, &reason, now)
                    .expect("checked in flight above");
                self.dead_letter(key, records);
                return;
            }
            Ok(other) => Failure::Error {
                message: format!("an outcome this daemon cannot apply: {other:?}"),
            },
            Err(e) if e.kind == CallErrorKind::Panic => Failure::Panic { message: e.message },
            Err(e) => Failure::Error { message: e.message },
        };
        self.fail(key, s.attempt, failure, now, records);
    }

    /// A deferred attempt's token ended: its settlement applies like a call's (children and
    /// all); a dropped token is a `dropped` failure. The registry entry goes once applied.
    pub(super) fn token(
        &mut self,
        instance: InstanceId,
        end: TokenEnd,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        match end {
            TokenEnd::Settled {
                message,
                attempt,
                outcome,
                children,
            } => self.settle(
                instance,
                Settlement {
                    message,
                    attempt,
                    result: outcome,
                    children,
                    token: true,
                },
                now,
                records,
            ),
            TokenEnd::Dropped { message, attempt } => {
                self.applied(instance, message, attempt);
                let key = (message, instance);
                if self.live.get(&key).and_then(|l| l.delivery.in_flight()) == Some(attempt) {
                    self.fail(key, attempt, Failure::Dropped, now, records);
                }
            }
        }
    }

    /// The settlement of a claimed deferred attempt was applied: its registry entry goes at
    /// the end of the round, with the others (one lock per instance and round).
    fn applied(&mut self, instance: InstanceId, message: u64, attempt: u32) {
        let index = instance as usize;
        if self.applied.len() <= index {
            self.applied.resize_with(index + 1, Vec::new);
        }
        self.applied[index].push((message, attempt));
    }

    /// Removes the registry entries of the deferred settlements applied this round.
    pub(super) fn finish_applied(&mut self) {
        for (index, applied) in self.applied.iter_mut().enumerate() {
            if applied.is_empty() {
                continue;
            }
            if let Some(deferrals) = &self.instances[index].slot.deferrals {
                deferrals.finish(applied);
            }
            applied.clear();
        }
    }

    /// A failure of the attempt in flight: the breaker decides whether it counts.
    pub(super) fn fail(
        &mut self,
        key: (u64, InstanceId),
        attempt: u32,
        failure: Failure,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let (message, instance) = key;
        let queue = &mut self.instances[instance as usize];
        let verdict = queue.slot.breaker.on_failure(message, now);
        for excused in verdict.excuse {
            if let Some(other) = self.live.get_mut(&(excused, instance)) {
                other.delivery.excuse(1);
                // Recorded: after a restart the excused failure must not count again.
                if excused != message {
                    records.push(Record::Updated {
                        message: excused,
                        instance,
                        delivery: other.delivery.clone(),
                    });
                }
            }
        }
        if matches!(
            queue.slot.breaker.state(),
            circuit::BreakerState::Open { .. }
        ) && !verdict.charged
        {
            tracing::debug!(instance = %queue.slot.name, "circuit open: failure excused");
        }
        let rules = queue.slot.rules.clone();
        let live = self
            .live
            .get_mut(&key)
            .expect("callers check the attempt is in flight");
        let Ok(transition) = live.delivery.fail(
            attempt,
            &failure,
            verdict.charged,
            &rules,
            now,
            fastrand::f64(),
        ) else {
            return;
        };
        queue.stats.outcomes.count(&failure);
        if verdict.charged {
            queue.stats.failures += 1;
        }
        match transition {
            Transition::Retry { due } => {
                records.push(Record::Updated {
                    message,
                    instance,
                    delivery: live.delivery.clone(),
                });
                queue.retry(message, due, now, live, self.ledger.reloads());
            }
            Transition::DeadLettered { .. } => {
                self.dead_letter(key, records);
            }
            Transition::Acked => unreachable!("a failure never acks"),
        }
    }

    /// A delivery ended as a dead letter (its state says why): recorded, counted and
    /// announced.
    pub(super) fn dead_letter(&mut self, key: (u64, InstanceId), records: &mut Vec<Record>) {
        let reason = self.live[&key]
            .delivery
            .last_reason
            .clone()
            .unwrap_or_default();
        self.events.emit(EventKind::DeadLettered {
            instance: self.instances[key.1 as usize].slot.name.clone(),
            id: key.0,
            reason,
        });
        self.record_dead_letter(key, records);
    }

    /// A delivery ended as a dead letter: recorded and counted (an operator's bulk forget
    /// announces itself once).
    pub(super) fn record_dead_letter(&mut self, key: (u64, InstanceId), records: &mut Vec<Record>) {
        self.instances[key.1 as usize].stats.dead_lettered += 1;
        let live = &self.live[&key];
        records.push(Record::DeadLettered {
            message: key.0,
            instance: key.1,
            delivery: live.delivery.clone(),
            at: self.clock.now(),
            stored: live.message.clone(),
        });
        self.finish(key);
    }
}
