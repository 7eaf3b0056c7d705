//! The graceful stop: every actor finishes its call in hand and releases the rest, then its
//! plugin's `shutdown` runs, all within one deadline; a hung instance gets only its
//! `hang_grace`. What is still in flight is released as `shutdown` (no failure), recorded,
//! and the instances still busy are abandoned and named ([`StopReport`]).

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde::Serialize;

use super::DispatchLoop;
use crate::{
    actor::{self, JoinOutcome},
    ledger::Record,
    routing::InstanceId,
};

/// How a graceful stop ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Attempts handed back unstarted (no failure).
    pub released: u64,
    /// Instances whose call in hand did not finish in time: thread and library retained.
    pub abandoned: Vec<String>,
}

impl DispatchLoop {
    /// Stops every actor running now within `deadline` (a generation still draining from a
    /// swap is its supervisor's to wait for), taking their settlements and releases from
    /// `events` meanwhile.
    pub(super) fn stop(
        &mut self,
        deadline: Duration,
        events: &Receiver<actor::ActorEvent>,
    ) -> StopReport {
        let started = Instant::now();
        let mut waiting: Vec<(InstanceId, u32)> = Vec::new();
        for (id, queue) in self.instances.iter().enumerate() {
            if let Some(actor) = &queue.slot.actor {
                actor.request_stop();
                waiting.push((id as InstanceId, actor.generation()));
            }
        }
        let mut report = StopReport::default();
        let mut records = Vec::new();
        // Settlements of the calls in hand and the released hand-offs, while they come.
        while !waiting.is_empty() {
            let left = deadline.saturating_sub(started.elapsed());
            match events.recv_timeout(left.min(Duration::from_millis(10))) {
                Ok(actor::ActorEvent::Released {
                    instance,
                    generation,
                    released,
                }) => {
                    report.released += released.len() as u64;
                    self.event(
                        actor::ActorEvent::Released {
                            instance,
                            generation,
                            released,
                        },
                        &mut records,
                    );
                    waiting.retain(|w| *w != (instance, generation));
                }
                Ok(event) => self.event(event, &mut records),
                Err(_) if left.is_zero() => break,
                Err(_) => {
                    // A hung instance is not waited for beyond its hang_grace.
                    let elapsed = started.elapsed();
                    waiting.retain(|(i, _)| {
                        let queue = &self.instances[*i as usize];
                        !(queue.stats.hung && elapsed >= queue.slot.hang_grace)
                    });
                }
            }
        }
        // Deferred attempts get what is left of the deadline to be settled; the rest are
        // released (their tokens are stale from now on, their draining actors go on).
        while self.instances.iter().any(|q| q.slot.deferred() > 0) {
            let left = deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            if let Ok(event) = events.recv_timeout(left.min(Duration::from_millis(10))) {
                self.event(event, &mut records);
            }
        }
        for queue in &self.instances {
            if let Some(deferrals) = &queue.slot.deferrals {
                let released = deferrals.release_all();
                if released > 0 {
                    tracing::info!(instance = %queue.slot.name, released, "deferred attempts still outstanding at the stop released (no failure)");
                }
            }
        }
        // Attempts still in flight are released as `shutdown` (no failure).
        let now = self.clock.now();
        for ((message, instance), live) in &mut self.live {
            if live.delivery.release(now) {
                records.push(Record::Updated {
                    message: *message,
                    instance: *instance,
                    delivery: live.delivery.clone(),
                });
            }
        }
        self.commit(records);
        for queue in &mut self.instances {
            if let Some(actor) = queue.slot.actor.take() {
                let left = deadline.saturating_sub(started.elapsed());
                let total = if queue.stats.hung {
                    left.min(queue.slot.hang_grace)
                } else {
                    left
                };
                let deadlines = actor::Deadlines {
                    total,
                    shutdown: queue.slot.shutdown_timeout,
                };
                if let JoinOutcome::Abandoned { .. } = actor.join(deadlines, self.clock.as_ref()) {
                    report.abandoned.push(queue.slot.name.clone());
                }
            }
        }
        self.written();
        report
    }
}
