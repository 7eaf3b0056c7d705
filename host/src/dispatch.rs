//! The dispatcher: the engine's event loop, on one thread that owns the live delivery state.
//!
//! It takes accepted messages from the ingress and settlements from the actors; hands due
//! deliveries to each actor only while it has room (it never blocks on a mailbox); records
//! every change in the ledger *before* acting on it (an attempt before plugin code is
//! called, a parent's ack together with its children); schedules retries and lease expiries;
//! and asks each instance's circuit breaker before every hand-out.
//!
//! Per instance, first deliveries go out in acceptance order; a retry waits in a timer heap
//! until it is due, so it never blocks the messages behind it.
//!
//! This file is the loop; the types it owns live beside it: [`Dispatcher`], the handle the
//! rest of the engine talks to it through (`handle`); the leases of the attempts in flight
//! (`leases`); each instance's queues, counters and payload residency (`queues`); what each
//! outcome does to its delivery (`outcomes`); the graceful stop (`stop`).

mod handle;
mod leases;
mod outcomes;
mod pacing;
mod queues;
mod stop;

use std::{collections::VecDeque, sync::Arc, time::Duration};

use crossbeam_channel::{Receiver, Sender, select};

use handle::Input;
pub use handle::{Dispatcher, DispatcherGone, Inbox};
pub use queues::{InstanceStats, Slot, Snapshot};
pub use stop::StopReport;

use crate::{
    actor::{self, Handoff},
    backlog::Backlog,
    clock::{Clock, Timestamp},
    deferred::Expiry,
    delivery::{Delivery, Failure},
    events::{EventKind, Events},
    ingress::{Accepted, Ingress},
    ledger::{FailStop, Forget, Ledger, LedgerError, Pending, Receipt, Record, Wait},
    routing::InstanceId,
    throttle::Throttle,
};
use leases::Leases;
use queues::{InstanceQueue, Live, LiveMap};

/// What the dispatcher's loop works with, besides its inbox.
#[derive(Clone)]
pub struct Collaborators {
    pub clock: Arc<dyn Clock>,
    /// Where every change is recorded before it is acted on.
    pub ledger: Arc<dyn Ledger>,
    /// Bytes waiting per instance: a delivery leaves it when it ends.
    pub backlog: Arc<Backlog>,
    /// Admits the children of acked attempts; its idempotency keys expire by the loop's round.
    pub ingress: Arc<Ingress>,
    pub events: Arc<Events>,
    /// Where a commit or a read of the ledger that failed goes: the loop never goes on on
    /// state that was not recorded or could not be read.
    pub fail_stop: FailStop,
}

impl std::fmt::Debug for Collaborators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collaborators").finish_non_exhaustive()
    }
}

impl Inbox {
    /// Starts the dispatcher's loop on a thread of its own (`dispatcher`), with the instances
    /// of `slots` (instance ids in that order), the deliveries the ledger recovered
    /// (`pending`), and the actors' events; it runs until stopped through its
    /// [`Dispatcher`], or until every handle is gone.
    ///
    /// # Errors
    /// When the thread cannot start.
    pub fn spawn(
        self,
        with: Collaborators,
        slots: Vec<Slot>,
        pending: Vec<Pending>,
        events: Receiver<actor::ActorEvent>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let dispatcher = DispatchLoop::new(with, slots, pending);
        let inputs = self.inputs;
        std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || dispatcher.run(&inputs, events))
    }
}

/// The event loop's state.
struct DispatchLoop {
    clock: Arc<dyn Clock>,
    ledger: Arc<dyn Ledger>,
    backlog: Arc<Backlog>,
    ingress: Arc<Ingress>,
    events: Arc<Events>,
    fail_stop: FailStop,
    /// By instance id.
    instances: Vec<InstanceQueue>,
    live: LiveMap,
    leases: Leases,
    stale: u64,
    /// Stale settlements are logged at most once a second.
    stale_log: Throttle,
    /// Commits handed to the ledger without waiting, oldest first, until answered.
    unanswered: VecDeque<Receipt>,
    /// Snapshots asked for this round, answered at its end: a count (a dead letter, say) is
    /// shown only once its record is handed to the ledger.
    snapshots: Vec<Sender<Snapshot>>,
    /// Per instance, the deferred settlements applied this round, whose registry entries go
    /// at its end.
    applied: Vec<Vec<(u64, u32)>>,
}

/// Commits the dispatcher leaves unanswered at most before it waits for them.
const MAX_UNANSWERED: usize = 256;

impl DispatchLoop {
    fn new(with: Collaborators, slots: Vec<Slot>, pending: Vec<Pending>) -> Self {
        let mut dispatcher = Self {
            clock: with.clock,
            ledger: with.ledger,
            backlog: with.backlog,
            ingress: with.ingress,
            events: with.events,
            fail_stop: with.fail_stop,
            instances: slots.into_iter().map(InstanceQueue::new).collect(),
            live: LiveMap::with_capacity_and_hasher(
                (1 << 16).max(pending.len()),
                Default::default(),
            ),
            leases: Leases::default(),
            stale: 0,
            stale_log: Throttle::new(Duration::from_secs(1)),
            unanswered: VecDeque::new(),
            snapshots: Vec::new(),
            applied: Vec::new(),
        };
        dispatcher.restore(pending);
        dispatcher
    }

    /// Deliveries the ledger recovered: ready ones in acceptance order, the others waiting
    /// for their due time. Their payloads stay in the ledger until handed out.
    fn restore(&mut self, pending: Vec<Pending>) {
        let now = self.clock.now();
        for p in pending {
            self.instances[p.instance as usize].take_back(&p, now);
            self.backlog.add(p.instance, p.size);
            self.live.insert(
                (p.message, p.instance),
                Live {
                    message: p.stored,
                    size: p.size,
                    delivery: p.delivery,
                    since: p.since.0,
                },
            );
        }
    }

    /// Runs until stopped (or until every sender is gone).
    fn run(mut self, inputs: &Receiver<Input>, events: Receiver<actor::ActorEvent>) {
        // With no actor left (none started) the event channel is disconnected: wait on a
        // channel that never fires instead of spinning on the disconnection.
        let mut events = events;
        loop {
            let now = self.clock.now();
            let wait = self
                .next_wakeup()
                .map_or(Duration::from_secs(1), |at| at.since(now))
                .min(Duration::from_secs(1));
            let mut records = Vec::new();
            let mut stop = None;
            // Token ends queued while awake are taken below; asleep, one wakes the loop.
            let wait = if self.may_sleep() {
                wait
            } else {
                Duration::ZERO
            };
            select! {
                recv(inputs) -> input => match input {
                    Ok(input) => stop = self.input(input),
                    Err(_) => {
                        self.written();
                        return;
                    }
                },
                recv(events) -> event => match event {
                    Ok(event) => self.event(event, &mut records),
                    Err(_) => events = crossbeam_channel::never(),
                },
                default(wait) => {}
            }
            // Take everything else waiting in one go (batching).
            self.awake(now, &mut records);
            while let Ok(event) = events.try_recv() {
                self.event(event, &mut records);
            }
            self.finish_applied();
            while stop.is_none()
                && let Ok(input) = inputs.try_recv()
            {
                stop = self.input(input);
            }
            if let Some((deadline, reply)) = stop {
                self.commit(records);
                self.answer_snapshots();
                let _ = reply.send(self.stop(deadline, &events));
                return;
            }
            let now = self.clock.now();
            self.ingress.expire_keys(now);
            self.expire(now, &mut records);
            self.outlive(now, &mut records);
            for queue in &mut self.instances {
                queue.promote(now);
            }
            // Children accepted this round (with their parents' acks) are written before
            // the hand-outs, which may read their payloads back from the ledger (an instance
            // that waits, or one past its resident payloads, holds none).
            if records.iter().any(|r| matches!(r, Record::Accepted { .. })) {
                self.commit(std::mem::take(&mut records));
            }
            let handoffs = self.hand_out(now, &mut records);
            // Recorded first: an attempt is in the ledger before plugin code sees it.
            self.commit(records);
            self.answer_snapshots();
            self.announce_circuits();
            for (instance, batch) in handoffs {
                if let Some(actor) = &mut self.instances[instance as usize].slot.actor {
                    actor.offer(batch);
                }
            }
        }
    }

    /// Hands `records` to the ledger. Acks (and hand-outs, which the in-flight markers
    /// record) go without waiting: nothing the dispatcher does later depends on them being
    /// written, and a crash before they are only means a redelivery. Every other record waits
    /// until it is written, and with it everything handed over before (one writer, in order):
    /// a child accepted must be in the ledger before plugin code sees it (a crash in its first
    /// attempt is charged to its row), a delivery updated carries the failure count its retry
    /// depends on, and dead letters, purges and releases are what operators list next.
    fn commit(&mut self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let unawaited = records
            .iter()
            .all(|r| matches!(r, Record::Acked { .. } | Record::Attempt { .. }));
        let receipt = self.ledger.submit(records, Wait::Written);
        if !unawaited {
            self.unanswered.clear();
            if let Err(e) = receipt.wait() {
                self.fail_stop.halt(&e);
            }
            return;
        }
        self.unanswered.push_back(receipt);
        while let Some(answer) = self.unanswered.front_mut().and_then(Receipt::try_answer) {
            self.unanswered.pop_front();
            if let Err(e) = answer {
                self.fail_stop.halt(&e);
            }
        }
        if self.unanswered.len() > MAX_UNANSWERED {
            self.written();
        }
    }

    /// Waits until everything handed to the ledger is written.
    fn written(&mut self) {
        for receipt in self.unanswered.drain(..) {
            if let Err(e) = receipt.wait() {
                self.fail_stop.halt(&e);
            }
        }
    }

    /// Applies one input; a stop request is handed back for the loop to carry out.
    fn input(&mut self, input: Input) -> Option<(Duration, Sender<StopReport>)> {
        match input {
            Input::Accepted(batch) => {
                let now = self.clock.now();
                for accepted in batch {
                    self.add(accepted, now);
                }
            }
            Input::Snapshot(reply) => self.snapshots.push(reply),
            Input::Restore(pending) => self.restore(pending),
            Input::Forget {
                instance,
                how,
                reply,
            } => {
                let _ = reply.send(self.forget(instance, how));
            }
            Input::Add { slot, pending } => {
                self.instances.push(InstanceQueue::new(*slot));
                self.restore(pending);
            }
            Input::Run {
                instance,
                actor,
                reply,
            } => {
                let queue = &mut self.instances[instance as usize];
                queue.stats.hung = false;
                let old = queue.slot.run(actor);
                if let Some(old) = &old {
                    // What it had not started goes to the next generation (or waits) at
                    // once; it finishes only its call in hand.
                    let unstarted = old.reclaim();
                    let mut records = Vec::new();
                    self.release(instance, unstarted, self.clock.now(), &mut records);
                    self.commit(records);
                }
                let _ = reply.send(old);
            }
            Input::Configure { instance, settings } => {
                self.instances[instance as usize].slot.configure(&settings);
            }
            Input::Pause(id) => self.instances[id as usize].slot.breaker.pause(),
            Input::Resume(id) => self.instances[id as usize].slot.breaker.resume(),
            Input::Stop { deadline, reply } => return Some((deadline, reply)),
        }
        None
    }

    /// An accepted message: a first delivery to each of its targets.
    fn add(&mut self, accepted: Accepted, now: Timestamp) {
        let reloads = self.ledger.reloads();
        for target in accepted.targets {
            let message = self.instances[target as usize].enqueue(&accepted.message, reloads);
            self.live.insert(
                (accepted.message.id, target),
                Live {
                    message,
                    size: accepted.size,
                    delivery: Delivery::new(now),
                    since: now.0,
                },
            );
        }
    }

    /// Ends the waiting deliveries of one instance for good, recorded at once.
    fn forget(&mut self, instance: InstanceId, how: Forget) -> u64 {
        let now = self.clock.now();
        let keys: Vec<(u64, InstanceId)> = self
            .live
            .iter()
            .filter(|((_, i), live)| *i == instance && live.delivery.in_flight().is_none())
            .map(|(key, _)| *key)
            .collect();
        let mut records = Vec::with_capacity(keys.len());
        for key in &keys {
            match how {
                Forget::Purge => {
                    records.push(Record::Purged {
                        message: key.0,
                        instance,
                    });
                    self.finish(*key);
                }
                Forget::DeadLetter => {
                    if let Some(live) = self.live.get_mut(key) {
                        live.delivery.forget(now);
                    }
                    self.record_dead_letter(*key, &mut records);
                }
            }
        }
        self.instances[instance as usize].keep_live(instance, &self.live);
        self.commit(records);
        self.events.emit(EventKind::Forgotten {
            instance: self.instances[instance as usize].slot.name.clone(),
            count: keys.len() as u64,
            purged: how == Forget::Purge,
        });
        keys.len() as u64
    }

    /// Announces every circuit that changed state since the last round.
    fn announce_circuits(&mut self) {
        for queue in &mut self.instances {
            if let Some(state) = queue.circuit_change() {
                self.events.emit(EventKind::Circuit {
                    instance: queue.slot.name.clone(),
                    state: state.to_owned(),
                });
            }
        }
    }

    /// Answers the snapshots asked for this round, now that its records are handed over.
    fn answer_snapshots(&mut self) {
        if self.snapshots.is_empty() {
            return;
        }
        let snapshot = self.snapshot();
        for reply in self.snapshots.drain(..) {
            let _ = reply.send(snapshot.clone());
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut in_flight = vec![0u64; self.instances.len()];
        for ((_, instance), live) in &self.live {
            if live.delivery.in_flight().is_some() {
                in_flight[*instance as usize] += 1;
            }
        }
        Snapshot {
            instances: self
                .instances
                .iter()
                .zip(in_flight)
                .map(|(queue, in_flight)| queue.stats(in_flight))
                .collect(),
            stale: self.stale,
        }
    }

    fn next_wakeup(&self) -> Option<Timestamp> {
        self.instances
            .iter()
            .filter_map(InstanceQueue::next_wakeup)
            .chain(self.leases.next_end())
            .min()
    }

    /// Waiting deliveries (not in flight) older than their instance's `max_age` become dead
    /// letters with reason `expired`, so that a long-disabled instance need not fill up to
    /// `max_backlog`.
    fn outlive(&mut self, now: Timestamp, records: &mut Vec<Record>) {
        for id in 0..self.instances.len() {
            let instance = id as InstanceId;
            let old = self.instances[id].outlived(instance, now, &self.live);
            if old.is_empty() {
                continue;
            }
            for message in &old {
                let key = (*message, instance);
                if let Some(live) = self.live.get_mut(&key) {
                    live.delivery.outlived(now);
                }
                self.record_dead_letter(key, records);
            }
            let queue = &mut self.instances[id];
            queue.keep_live(instance, &self.live);
            tracing::info!(instance = %queue.slot.name, count = old.len(), "waiting deliveries older than max_age dead-lettered");
            self.events.emit(EventKind::Expired {
                instance: queue.slot.name.clone(),
                count: old.len() as u64,
            });
        }
    }

    /// Expired leases become `timeout` failures; a synchronous call still running marks its
    /// instance hung.
    fn expire(&mut self, now: Timestamp, records: &mut Vec<Record>) {
        while let Some((message, instance, attempt)) = self.leases.pop_ended(now) {
            let key = (message, instance);
            let Some(live) = self.live.get(&key) else {
                continue;
            };
            if live.delivery.in_flight() != Some(attempt) {
                continue;
            }
            let queue = &mut self.instances[instance as usize];
            let expiry = queue
                .slot
                .deferrals
                .as_ref()
                .map_or(Expiry::NotDeferred, |d| d.expire(message, attempt, now));
            match expiry {
                // Its settlement is on the way.
                Expiry::Settled => continue,
                Expiry::Extended(until) => {
                    self.leases.push(until, message, instance, attempt);
                    continue;
                }
                Expiry::Expired => {}
                Expiry::NotDeferred => {
                    if queue.slot.calling() {
                        queue.stats.hung = true;
                        tracing::warn!(instance = %queue.slot.name, id = message, attempt, "a call outlived its lease: instance hung");
                    }
                }
            }
            self.fail(key, attempt, Failure::Timeout, now, records);
        }
    }

    /// Chooses the hand-outs of this round: per instance, as many as it has room for.
    fn hand_out(
        &mut self,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) -> Vec<(InstanceId, Vec<Handoff>)> {
        let mut handoffs = Vec::new();
        let mut unreadable = Vec::new();
        for (id, queue) in self.instances.iter_mut().enumerate() {
            let instance = id as InstanceId;
            let Some(actor) = &queue.slot.actor else {
                continue;
            };
            let mut room = actor.room();
            if let Some(rate) = &mut queue.slot.rate {
                room = room.min(rate.available(now));
            }
            if let Err(e) = queue.load_front(instance, room, &mut self.live, self.ledger.as_ref()) {
                self.fail_stop.halt(&e);
            }
            let mut batch = Vec::new();
            while batch.len() < room {
                let Some(&message) = queue.ready.front() else {
                    break;
                };
                if !queue.slot.breaker.admit(message, now) {
                    break;
                }
                queue.ready.pop_front();
                let Some(live) = self.live.get_mut(&(message, instance)) else {
                    continue;
                };
                if !live.delivery.is_due(now) {
                    continue;
                }
                let stored = match &live.message {
                    Some(stored) => stored.clone(),
                    None => match self.ledger.load(message) {
                        Ok(Some(stored)) => {
                            live.message = Some(stored.clone());
                            queue.unloaded = queue.unloaded.saturating_sub(1);
                            stored
                        }
                        Ok(None) => {
                            unreadable.push((
                                (message, instance),
                                format!("message {message} is missing from the ledger"),
                            ));
                            continue;
                        }
                        Err(LedgerError::Corrupt(reason)) => {
                            unreadable.push(((message, instance), reason));
                            continue;
                        }
                        Err(e) => {
                            self.fail_stop.halt(&e);
                        }
                    },
                };
                // Another delivery of its ordering key is out: it waits behind it.
                if let Some(header) = &queue.slot.ordering_key
                    && let Some((_, key)) = stored.headers.iter().find(|(n, _)| n == header)
                    && !queue.order.admit(message, key)
                {
                    continue;
                }
                let Some(attempt) = live.delivery.begin(&queue.slot.rules, now) else {
                    continue;
                };
                let lease_until = now.after(queue.slot.rules.ack_timeout);
                records.push(Record::Attempt {
                    message,
                    instance,
                    attempt,
                    lease_until,
                });
                self.leases.push(lease_until, message, instance, attempt);
                batch.push(Handoff {
                    message: stored,
                    attempt,
                });
            }
            if let Some(rate) = &mut queue.slot.rate {
                rate.take(batch.len());
            }
            if !batch.is_empty() {
                queue.stats.handed_out += batch.len() as u64;
                handoffs.push((instance, batch));
            }
        }
        // A message that cannot be read back is reported and dead-lettered, never dropped.
        for (key, reason) in unreadable {
            tracing::error!(instance = %self.instances[key.1 as usize].slot.name, id = key.0, %reason, "a pending message cannot be read: dead-lettered");
            if let Some(live) = self.live.get_mut(&key) {
                live.delivery.unreadable(&reason, now);
                self.dead_letter(key, records);
            }
        }
        let live = &self.live;
        self.leases.sweep(|message, instance, attempt| {
            live.get(&(message, instance))
                .is_some_and(|l| l.delivery.in_flight() == Some(attempt))
        });
        handoffs
    }

    fn event(&mut self, event: actor::ActorEvent, records: &mut Vec<Record>) {
        let now = self.clock.now();
        match event {
            actor::ActorEvent::Settled {
                instance,
                generation,
                settlements,
            } => {
                // Credits are the current generation's; a draining one gets no more work.
                if let Some(actor) = &mut self.instances[instance as usize].slot.actor
                    && actor.generation() == generation
                {
                    actor.settled(settlements.len());
                }
                for settlement in settlements {
                    self.settle(instance, settlement, now, records);
                }
            }
            actor::ActorEvent::Released {
                instance, released, ..
            } => {
                self.release(instance, released, now, records);
            }
            actor::ActorEvent::Tokens { instance } => self.take_tokens(instance, now, records),
            actor::ActorEvent::Stopped {
                instance,
                shutdown_error,
                ..
            } => {
                if let Some(e) = shutdown_error {
                    let name = &self.instances[instance as usize].slot.name;
                    tracing::warn!(instance = %name, error = %e, "shutdown failed");
                }
            }
        }
    }

    /// The token ends queued for `instance`, applied.
    fn take_tokens(&mut self, instance: InstanceId, now: Timestamp, records: &mut Vec<Record>) {
        let ends = self.instances[instance as usize]
            .slot
            .deferrals
            .as_ref()
            .map(|d| d.take_ends())
            .unwrap_or_default();
        for end in ends {
            self.token(instance, end, now, records);
        }
    }

    /// Whether the loop may wait for input: it tells every instance's deferrals it is going
    /// to sleep, and may not if a token end is already queued.
    fn may_sleep(&self) -> bool {
        let mut may = true;
        for queue in &self.instances {
            if let Some(deferrals) = &queue.slot.deferrals {
                may &= deferrals.dispatcher_sleeps();
            }
        }
        may
    }

    /// The loop is awake: token ends no longer wake it; it takes those queued now.
    fn awake(&mut self, now: Timestamp, records: &mut Vec<Record>) {
        for id in 0..self.instances.len() {
            if let Some(deferrals) = &self.instances[id].slot.deferrals {
                deferrals.dispatcher_wakes();
            }
            self.take_tokens(id as InstanceId, now, records);
        }
    }

    /// Hand-offs an actor gave back unstarted go to the front of the ready queue, in their
    /// order (no failure).
    fn release(
        &mut self,
        instance: InstanceId,
        released: Vec<Handoff>,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let queue = &mut self.instances[instance as usize];
        for handoff in released.into_iter().rev() {
            let key = (handoff.message.id, instance);
            if let Some(live) = self.live.get_mut(&key)
                && live.delivery.in_flight() == Some(handoff.attempt)
                && live.delivery.release(now)
            {
                queue.ready.push_front(handoff.message.id);
                records.push(Record::Updated {
                    message: handoff.message.id,
                    instance,
                    delivery: live.delivery.clone(),
                });
            }
        }
    }

    /// A delivery ended: it leaves the live state and the backlog.
    fn finish(&mut self, key: (u64, InstanceId)) {
        if let Some(live) = self.live.remove(&key) {
            self.instances[key.1 as usize].ended(key.0, &live);
            self.backlog.remove(key.1, live.size);
        }
    }
}

impl std::fmt::Debug for DispatchLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchLoop")
            .field("instances", &self.instances.len())
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{clock::ManualClock, config::Settings, ledger::MemoryLedger, routing::Routing};

    #[test]
    fn a_commit_the_ledger_fails_goes_to_the_fail_stop_and_the_loop_goes_no_further() {
        // The dispatcher called `std::process::exit(1)` itself: a library ending its host's
        // process, past whatever hook the daemon's assembly had.
        let clock = Arc::new(ManualClock::at(Timestamp(1_700_000_000_000)));
        let told = Arc::new(Mutex::new(Vec::<String>::new()));
        let fail_stop = FailStop::new({
            let told = told.clone();
            move |error: &str| told.lock().unwrap().push(error.to_owned())
        });
        let backlog = Arc::new(Backlog::new(&[("sink".to_owned(), 1 << 20)]));
        let events = Events::new(clock.clone());
        let (dispatcher, inbox) = Dispatcher::new();
        let ingress = Arc::new(Ingress::new(
            Routing::default(),
            1,
            MemoryLedger::new(),
            Arc::new(dispatcher.clone()),
            backlog.clone(),
            1 << 20,
            clock.clone(),
            events.clone(),
            Duration::from_secs(60),
            Vec::new(),
        ));
        let waiting = Pending {
            message: 1,
            instance: 0,
            size: 1,
            delivery: Delivery::new(clock.now()),
            since: clock.now(),
            stored: None,
        };
        let (_actors, actor_events) = crossbeam_channel::unbounded();
        let thread = inbox
            .spawn(
                Collaborators {
                    clock,
                    // Every commit fails, as after a failed fsync.
                    ledger: Arc::new(crate::ledger::CommitOnly(|_| {
                        Receipt::Ready(Err(LedgerError::Fatal("disk I/O error".into())))
                    })),
                    backlog,
                    ingress,
                    events,
                    fail_stop,
                },
                vec![Slot::new("sink", &Settings::default())],
                vec![waiting],
                actor_events,
            )
            .unwrap();
        // Forgetting the waiting delivery is a dead letter to record: the commit fails.
        assert_eq!(
            dispatcher.forget(0, Forget::DeadLetter),
            Err(DispatcherGone),
            "no count for a forget that was not recorded"
        );
        assert!(thread.join().is_err(), "the loop went on after the failure");
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].contains("disk I/O error"), "{told:?}");
    }
}
