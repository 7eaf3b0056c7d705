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

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    sync::Arc,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender, select};
use plugind_api::{Outcome, hosting::CallErrorKind};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    actor::{self, Actor, Handoff, Settlement, Stopped},
    circuit::{self, Breaker},
    clock::{Clock, Timestamp},
    config::Settings,
    delivery::{Delivery, Failure, Rules, Transition},
    events::{EventKind, Events},
    ingress::{Accepted, Backlog, Ingress, Source},
    ledger::{Forget, Ledger, LedgerError, Pending, Receipt, Record, Wait},
    message::StoredMessage,
    routing::InstanceId,
    throttle::Throttle,
};

/// What the dispatcher is told.
#[derive(Debug)]
pub enum Input {
    /// Messages the ingress accepted (already in the ledger).
    Accepted(Vec<Accepted>),
    /// A snapshot for the caller.
    Snapshot(Sender<Snapshot>),
    /// Deliveries back from the ledger (replayed dead letters).
    Restore(Vec<Pending>),
    /// An operator forgets the waiting deliveries of one instance (not the ones in flight);
    /// the reply is how many.
    Forget {
        instance: InstanceId,
        how: Forget,
        reply: Sender<u64>,
    },
    /// Operator pause / resume of one instance.
    Pause(InstanceId),
    Resume(InstanceId),
    /// A new instance (hot plug): its slot takes the next id; `pending` is what the ledger
    /// holds for it.
    Add {
        slot: Box<Slot>,
        pending: Vec<Pending>,
    },
    /// From now on `actor` runs `instance` (`None`: nothing does; its deliveries wait). The
    /// actor it replaces, already asked to stop (it finishes its call in hand and releases
    /// the rest, which go to the new one), is the reply: the supervisor retires it.
    Run {
        instance: InstanceId,
        actor: Option<Actor>,
        reply: Sender<Option<Actor>>,
    },
    /// New delivery settings for an instance (its circuit restarts if those changed).
    Configure {
        instance: InstanceId,
        settings: Box<Settings>,
    },
    /// Graceful stop: finish the calls in hand, release the rest, stop the actors.
    Stop {
        deadline: Duration,
        reply: Sender<StopReport>,
    },
}

/// One instance as the dispatcher runs it.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub rules: Rules,
    pub breaker: Breaker,
    /// `None` while the instance is not running (failed to load, disabled): its deliveries
    /// wait.
    pub actor: Option<Actor>,
    /// How long a stop waits for a hung instance.
    pub hang_grace: Duration,
    /// How long its plugin's `shutdown` may take.
    pub shutdown_timeout: Duration,
    /// How many of its live deliveries may hold their payload in memory (`queue_capacity +
    /// max_in_flight`), hand-offs included; the others are read back from a ledger that
    /// [reloads](Ledger::reloads) when their turn comes. Messages accepted while no actor
    /// runs it are not held at all with such a ledger.
    pub keep: usize,
    /// Waiting deliveries older than this are dead-lettered (`expired`).
    pub max_age: Option<Duration>,
}

impl Slot {
    /// The slot of instance `name` with `settings`, running nothing yet.
    pub fn new(name: &str, settings: &Settings) -> Self {
        let mut slot = Self {
            name: name.to_owned(),
            rules: Rules::from(settings),
            breaker: Breaker::new(settings.circuit.clone()),
            actor: None,
            hang_grace: Duration::ZERO,
            shutdown_timeout: Duration::ZERO,
            keep: 0,
            max_age: None,
        };
        slot.configure(settings);
        slot
    }

    /// Applies new delivery settings; the circuit restarts only if its own changed.
    pub fn configure(&mut self, settings: &Settings) {
        self.rules = Rules::from(settings);
        if settings.circuit != *self.breaker.settings() {
            self.breaker = Breaker::new(settings.circuit.clone());
        }
        self.hang_grace = settings.hang_grace;
        self.shutdown_timeout = settings.shutdown_timeout;
        self.keep = (settings.queue_capacity + settings.max_in_flight) as usize;
        self.max_age = settings.max_age;
    }
}

/// Counters and state of one instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InstanceStats {
    pub name: String,
    pub running: bool,
    /// The plugin generation running (0: none).
    pub generation: u32,
    pub acked: u64,
    pub failures: u64,
    pub dead_lettered: u64,
    /// Deliveries waiting or in flight.
    pub backlog: u64,
    /// Of those, the ones whose payload is held in memory (the rest are read back from the
    /// ledger when their turn comes).
    pub resident: u64,
    /// Hand-offs leased to its actor (in its mailbox or in a call).
    pub in_flight: u64,
    /// Calls to its plugin code in progress now.
    pub calling: u64,
    pub circuit: Option<circuit::State>,
    /// A call outlived its lease and is still running.
    pub hung: bool,
}

/// What the dispatcher shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub instances: Vec<InstanceStats>,
    /// Settlements refused because their attempt was no longer in flight.
    pub stale: u64,
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Attempts handed back unstarted (no failure).
    pub released: u64,
    /// Instances whose call in hand did not finish in time: thread and library retained.
    pub abandoned: Vec<String>,
}

/// A copy of `message` whose payload owns exactly its bytes. Payloads arrive as slices of
/// the buffer a request was received in (zero copy); a delivery that waits long would pin
/// that whole buffer, so it keeps a compact copy instead.
fn compact(message: &Arc<StoredMessage>) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        payload: bytes::Bytes::copy_from_slice(&message.payload),
        ..StoredMessage::clone(message)
    })
}

/// A storage failure is fatal (DESIGN.md §7): never continue on unrecorded or unreadable
/// state.
pub(crate) fn fail_stop(e: &LedgerError) -> ! {
    tracing::error!(error = %e, "the ledger failed; stopping the daemon");
    std::process::exit(1);
}

struct Live {
    /// `None` while it waits with its payload only in the ledger.
    message: Option<Arc<StoredMessage>>,
    /// The payload's size, for the backlog.
    size: u64,
    delivery: Delivery,
    /// Since when it waits (ms since the epoch): `max_age` counts from here.
    since: u64,
}

struct Inst {
    slot: Slot,
    /// Messages ready to go, first deliveries in acceptance order (released ones in front).
    ready: VecDeque<u64>,
    /// Retries by due time.
    waiting: BinaryHeap<Reverse<(u64, u64)>>,
    /// Live deliveries whose payload is only in the ledger (0: hand-outs need no reads).
    unloaded: usize,
    stats: InstanceStats,
    /// The circuit state last announced.
    circuit: &'static str,
    /// When its waiting deliveries are next checked against `max_age`.
    age_check: Timestamp,
}

impl Inst {
    fn new(slot: Slot) -> Self {
        Self {
            stats: InstanceStats {
                name: slot.name.clone(),
                ..InstanceStats::default()
            },
            slot,
            ready: VecDeque::new(),
            waiting: BinaryHeap::new(),
            unloaded: 0,
            circuit: "closed",
            age_check: Timestamp(0),
        }
    }

    /// Live deliveries holding their payload in memory.
    fn resident(&self) -> usize {
        (self.stats.backlog as usize).saturating_sub(self.unloaded)
    }
}

/// The event loop's state.
pub struct Dispatcher {
    clock: Arc<dyn Clock>,
    ledger: Arc<dyn Ledger>,
    backlog: Arc<Backlog>,
    ingress: Arc<Ingress>,
    events: Arc<Events>,
    instances: Vec<Inst>,
    /// Keyed by small integers: FxHash, not SipHash (measured: ~3% of the engine's time).
    live: FxHashMap<(u64, InstanceId), Live>,
    /// (lease end, message, instance, attempt); entries whose attempt moved on are skipped.
    leases: Leases,
    /// Leases left by the last sweep ([`Dispatcher::sweep_leases`]).
    leases_swept: usize,
    stale: u64,
    /// Stale settlements are logged at most once a second.
    stale_log: Throttle,
    /// Commits handed to the ledger without waiting, oldest first, until answered.
    unanswered: VecDeque<Receipt>,
}

/// Commits the dispatcher leaves unanswered at most before it waits for them.
const MAX_UNANSWERED: usize = 256;

/// Leases kept without a sweep however few are in flight.
const LEASE_SWEEP_FLOOR: usize = 4096;

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("instances", &self.instances.len())
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    pub fn new(
        clock: Arc<dyn Clock>,
        ledger: Arc<dyn Ledger>,
        backlog: Arc<Backlog>,
        ingress: Arc<Ingress>,
        events: Arc<Events>,
        slots: Vec<Slot>,
        pending: Vec<Pending>,
    ) -> Self {
        let instances = slots.into_iter().map(Inst::new).collect();
        let mut dispatcher = Self {
            clock,
            ledger,
            backlog,
            ingress,
            events,
            instances,
            live: FxHashMap::with_capacity_and_hasher(
                (1 << 16).max(pending.len()),
                Default::default(),
            ),
            leases: BinaryHeap::new(),
            leases_swept: 0,
            stale: 0,
            stale_log: Throttle::new(Duration::from_secs(1)),
            unanswered: VecDeque::new(),
        };
        dispatcher.restore(pending);
        dispatcher
    }

    /// Deliveries the ledger recovered: ready ones in acceptance order, the others waiting
    /// for their due time. Their payloads stay in the ledger until handed out.
    fn restore(&mut self, pending: Vec<Pending>) {
        let now = self.clock.now();
        for p in pending {
            let inst = &mut self.instances[p.instance as usize];
            match p.delivery.state {
                crate::delivery::State::Ready { due } if due > now.0 => {
                    inst.waiting.push(Reverse((due, p.message)));
                }
                _ => inst.ready.push_back(p.message),
            }
            inst.stats.backlog += 1;
            inst.unloaded += usize::from(p.stored.is_none());
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
    pub fn run(mut self, inputs: Receiver<Input>, events: Receiver<actor::Event>) {
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
            while let Ok(event) = events.try_recv() {
                self.event(event, &mut records);
            }
            while stop.is_none()
                && let Ok(input) = inputs.try_recv()
            {
                stop = self.input(input);
            }
            if let Some((deadline, reply)) = stop {
                self.commit(records);
                let _ = reply.send(self.stop(deadline, &events));
                return;
            }
            let now = self.clock.now();
            self.ingress.expire_keys(now);
            self.expire(now, &mut records);
            self.outlive(now, &mut records);
            self.promote(now);
            // Children accepted this round (with their parents' acks) are written before
            // the hand-outs, which may read their payloads back from the ledger (an instance
            // that waits, or one past its resident payloads, holds none).
            if records.iter().any(|r| matches!(r, Record::Accepted { .. })) {
                self.commit(std::mem::take(&mut records));
            }
            let handoffs = self.hand_out(now, &mut records);
            // Recorded first: an attempt is in the ledger before plugin code sees it.
            self.commit(records);
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
                fail_stop(&e);
            }
            return;
        }
        self.unanswered.push_back(receipt);
        while let Some(answer) = self.unanswered.front_mut().and_then(Receipt::try_answer) {
            self.unanswered.pop_front();
            if let Err(e) = answer {
                fail_stop(&e);
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
                fail_stop(&e);
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
            Input::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Input::Restore(pending) => self.restore(pending),
            Input::Forget {
                instance,
                how,
                reply,
            } => {
                let _ = reply.send(self.forget(instance, how));
            }
            Input::Add { slot, pending } => {
                self.instances.push(Inst::new(*slot));
                self.restore(pending);
            }
            Input::Run {
                instance,
                actor,
                reply,
            } => {
                let inst = &mut self.instances[instance as usize];
                inst.stats.hung = false;
                let old = std::mem::replace(&mut inst.slot.actor, actor);
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

    fn add(&mut self, accepted: Accepted, now: Timestamp) {
        let reloads = self.ledger.reloads();
        for target in accepted.targets {
            let inst = &mut self.instances[target as usize];
            let resident = inst.resident();
            inst.ready.push_back(accepted.message.id);
            inst.stats.backlog += 1;
            let waits = inst.slot.actor.is_none();
            let message = if reloads && (waits || resident >= inst.slot.keep) {
                // The ledger has it: as many payloads as allowed are held, or nothing runs
                // the instance (it may wait for long: a stopped instance's backlog must not
                // be held in memory byte for byte). It is read back when handed out.
                inst.unloaded += 1;
                None
            } else if waits {
                // An instance that is not running keeps it for long: do not pin a receive
                // buffer.
                Some(compact(&accepted.message))
            } else {
                Some(accepted.message.clone())
            };
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
        let inst = &mut self.instances[instance as usize];
        inst.ready
            .retain(|m| self.live.contains_key(&(*m, instance)));
        inst.waiting
            .retain(|Reverse((_, m))| self.live.contains_key(&(*m, instance)));
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
        for inst in &mut self.instances {
            let state = match inst.slot.breaker.state() {
                circuit::State::Closed => "closed",
                circuit::State::Open { .. } => "open",
                circuit::State::Paused => "paused",
            };
            if state != inst.circuit {
                inst.circuit = state;
                self.events.emit(EventKind::Circuit {
                    instance: inst.slot.name.clone(),
                    state: state.to_owned(),
                });
            }
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
                .map(|(i, in_flight)| InstanceStats {
                    running: i.slot.actor.is_some(),
                    generation: i.slot.actor.as_ref().map_or(0, Actor::generation),
                    in_flight,
                    calling: u64::from(
                        i.slot
                            .actor
                            .as_ref()
                            .is_some_and(|a| a.busy_since().is_some()),
                    ),
                    resident: i.resident() as u64,
                    circuit: Some(i.slot.breaker.state().clone()),
                    hung: i.stats.hung
                        && i.slot
                            .actor
                            .as_ref()
                            .is_some_and(|a| a.busy_since().is_some()),
                    ..i.stats.clone()
                })
                .collect(),
            stale: self.stale,
        }
    }

    fn next_wakeup(&self) -> Option<Timestamp> {
        let retries = self
            .instances
            .iter()
            .filter_map(|i| i.waiting.peek().map(|Reverse((due, _))| Timestamp(*due)));
        let probes = self
            .instances
            .iter()
            .filter_map(|i| i.slot.breaker.next_wakeup());
        let leases = self.leases.peek().map(|Reverse((at, ..))| Timestamp(*at));
        let ages = self
            .instances
            .iter()
            .filter(|i| i.slot.max_age.is_some() && i.stats.backlog > 0)
            .map(|i| i.age_check);
        retries.chain(probes).chain(leases).chain(ages).min()
    }

    /// Waiting deliveries (not in flight) older than their instance's `max_age` become dead
    /// letters with reason `expired`, so that a long-disabled instance need not fill up to
    /// `max_backlog`. An instance is checked every tenth of its `max_age` (at least a
    /// second, at most a minute apart): a check walks its whole queue.
    fn outlive(&mut self, now: Timestamp, records: &mut Vec<Record>) {
        for id in 0..self.instances.len() {
            let inst = &mut self.instances[id];
            let Some(max_age) = inst.slot.max_age else {
                continue;
            };
            if now < inst.age_check || inst.stats.backlog == 0 {
                continue;
            }
            inst.age_check =
                now.after((max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)));
            let instance = id as InstanceId;
            let cutoff = now.0.saturating_sub(max_age.as_millis() as u64);
            let live = &self.live;
            let old: Vec<u64> = inst
                .ready
                .iter()
                .chain(inst.waiting.iter().map(|Reverse((_, m))| m))
                .copied()
                .filter(|m| {
                    live.get(&(*m, instance))
                        .is_some_and(|l| l.since < cutoff && l.delivery.in_flight().is_none())
                })
                .collect();
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
            let live = &self.live;
            let inst = &mut self.instances[id];
            inst.ready.retain(|m| live.contains_key(&(*m, instance)));
            inst.waiting
                .retain(|Reverse((_, m))| live.contains_key(&(*m, instance)));
            tracing::info!(instance = %inst.slot.name, count = old.len(), "waiting deliveries older than max_age dead-lettered");
            self.events.emit(EventKind::Expired {
                instance: inst.slot.name.clone(),
                count: old.len() as u64,
            });
        }
    }

    /// Due retries join the ready queue.
    fn promote(&mut self, now: Timestamp) {
        for inst in &mut self.instances {
            while let Some(Reverse((due, message))) = inst.waiting.peek().copied() {
                if due > now.0 {
                    break;
                }
                inst.waiting.pop();
                inst.ready.push_back(message);
            }
        }
    }

    /// Expired leases become `timeout` failures; a synchronous call still running marks its
    /// instance hung.
    fn expire(&mut self, now: Timestamp, records: &mut Vec<Record>) {
        while let Some(Reverse((at, message, instance, attempt))) = self.leases.peek().copied() {
            if at > now.0 {
                break;
            }
            self.leases.pop();
            let key = (message, instance);
            let Some(live) = self.live.get(&key) else {
                continue;
            };
            if live.delivery.in_flight() != Some(attempt) {
                continue;
            }
            let inst = &mut self.instances[instance as usize];
            if inst
                .slot
                .actor
                .as_ref()
                .is_some_and(|a| a.busy_since().is_some())
            {
                inst.stats.hung = true;
                tracing::warn!(instance = %inst.slot.name, id = message, attempt, "a call outlived its lease: instance hung");
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
        for (id, inst) in self.instances.iter_mut().enumerate() {
            let instance = id as InstanceId;
            let Some(actor) = &inst.slot.actor else {
                continue;
            };
            let room = actor.room();
            // Payloads that wait in the ledger only are read back together.
            let missing: Vec<u64> = if inst.unloaded == 0 {
                Vec::new()
            } else {
                inst.ready
                    .iter()
                    .take(room)
                    .copied()
                    .filter(|m| {
                        self.live
                            .get(&(*m, instance))
                            .is_some_and(|l| l.message.is_none())
                    })
                    .collect()
            };
            if !missing.is_empty() {
                // Within the bound: make room by letting the newest waiting payloads go
                // back to the ledger (the front is what goes out now).
                let mut over = (inst.resident() + missing.len()).saturating_sub(inst.slot.keep);
                for m in inst.ready.iter().skip(room).rev() {
                    if over == 0 {
                        break;
                    }
                    if let Some(live) = self.live.get_mut(&(*m, instance))
                        && live.message.is_some()
                    {
                        live.message = None;
                        inst.unloaded += 1;
                        over -= 1;
                    }
                }
                match self.ledger.load_many(&missing) {
                    Ok(loaded) => {
                        for (id, stored) in missing.iter().zip(loaded) {
                            if let Some(live) = self.live.get_mut(&(*id, instance))
                                && stored.is_some()
                            {
                                live.message = stored;
                                inst.unloaded = inst.unloaded.saturating_sub(1);
                            }
                        }
                    }
                    Err(e) => {
                        fail_stop(&e);
                    }
                }
            }
            let mut batch = Vec::new();
            while batch.len() < room {
                let Some(&message) = inst.ready.front() else {
                    break;
                };
                if !inst.slot.breaker.admit(message, now) {
                    break;
                }
                inst.ready.pop_front();
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
                            inst.unloaded = inst.unloaded.saturating_sub(1);
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
                            fail_stop(&e);
                        }
                    },
                };
                let Some(attempt) = live.delivery.begin(&inst.slot.rules, now) else {
                    continue;
                };
                let lease_until = now.after(inst.slot.rules.ack_timeout);
                records.push(Record::Attempt {
                    message,
                    instance,
                    attempt,
                    lease_until,
                });
                self.leases
                    .push(Reverse((lease_until.0, message, instance, attempt)));
                batch.push(Handoff {
                    message: stored,
                    attempt,
                });
            }
            if !batch.is_empty() {
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
        self.sweep_leases();
        handoffs
    }

    /// A lease stays in the heap after its attempt ended (a heap cannot remove an entry)
    /// until its time comes, `ack_timeout` later. Past twice what was in flight at the last
    /// sweep (and a floor), the ended ones are swept out: the heap holds about what is in
    /// flight, not every hand-out of the last `ack_timeout` (3,000,000 entries after a
    /// minute of 100,000 msgs/s, whose expiry then cost the dispatcher's loop for 30 s).
    fn sweep_leases(&mut self) {
        let live = &self.live;
        sweep(
            &mut self.leases,
            &mut self.leases_swept,
            |message, instance, attempt| {
                live.get(&(message, instance))
                    .is_some_and(|l| l.delivery.in_flight() == Some(attempt))
            },
        );
    }

    fn event(&mut self, event: actor::Event, records: &mut Vec<Record>) {
        let now = self.clock.now();
        match event {
            actor::Event::Settled {
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
            actor::Event::Released {
                instance, released, ..
            } => {
                self.release(instance, released, now, records);
            }
            actor::Event::Stopped {
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

    fn release(
        &mut self,
        instance: InstanceId,
        released: Vec<Handoff>,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let inst = &mut self.instances[instance as usize];
        for handoff in released.into_iter().rev() {
            let key = (handoff.message.id, instance);
            if let Some(live) = self.live.get_mut(&key)
                && live.delivery.in_flight() == Some(handoff.attempt)
                && live.delivery.release(now)
            {
                inst.ready.push_front(handoff.message.id);
                records.push(Record::Updated {
                    message: handoff.message.id,
                    instance,
                    delivery: live.delivery.clone(),
                });
            }
        }
    }

    fn settle(
        &mut self,
        instance: InstanceId,
        s: Settlement,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let key = (s.message, instance);
        let in_flight = self.live.get(&key).and_then(|l| l.delivery.in_flight());
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
                let inst = &mut self.instances[instance as usize];
                inst.slot.breaker.on_success(s.message);
                inst.stats.hung = false;
                let live = self.live.get_mut(&key).expect("checked in flight above");
                live.delivery
                    .ack(s.attempt, now)
                    .expect("checked in flight above");
                records.push(Record::Acked {
                    message: s.message,
                    instance,
                });
                inst.stats.acked += 1;
                // Children commit in the same batch as their parent's ack.
                let mut children = Vec::new();
                for child in s.children {
                    match self.ingress.prepare(child.into(), Source::Child, now) {
                        Ok((accepted, _)) if !accepted.targets.is_empty() => {
                            records.push(Record::Accepted {
                                message: accepted.message.clone(),
                                targets: accepted.targets.clone(),
                            });
                            children.push(accepted);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "a child message was refused"),
                    }
                }
                self.finish(key);
                for child in children {
                    for target in &child.targets {
                        self.backlog.add(*target, child.size);
                    }
                    self.add(child, now);
                }
                return;
            }
            Ok(Outcome::Retry { after, reason }) => Failure::Retry { reason, after },
            Ok(Outcome::Reject { reason }) => {
                let inst = &mut self.instances[instance as usize];
                // The plugin answered on purpose: for the circuit that is a success (a
                // rejected probe closes it; left open, it would wait for that message
                // forever).
                inst.slot.breaker.on_success(s.message);
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

    /// A failure of the attempt in flight: the breaker decides whether it counts.
    fn fail(
        &mut self,
        key: (u64, InstanceId),
        attempt: u32,
        failure: Failure,
        now: Timestamp,
        records: &mut Vec<Record>,
    ) {
        let (message, instance) = key;
        let inst = &mut self.instances[instance as usize];
        let verdict = inst.slot.breaker.on_failure(message, now);
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
        if matches!(inst.slot.breaker.state(), circuit::State::Open { .. }) && !verdict.charged {
            tracing::debug!(instance = %inst.slot.name, "circuit open: failure excused");
        }
        let rules = inst.slot.rules.clone();
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
        if verdict.charged {
            inst.stats.failures += 1;
        }
        match transition {
            Transition::Retry { due } => {
                records.push(Record::Updated {
                    message,
                    instance,
                    delivery: live.delivery.clone(),
                });
                if due <= now {
                    inst.ready.push_back(message);
                } else {
                    // It waits its backoff: the ledger has it, or keep only its own bytes,
                    // not a receive buffer.
                    live.message = if self.ledger.reloads() {
                        inst.unloaded += usize::from(live.message.is_some());
                        None
                    } else {
                        live.message.as_ref().map(compact)
                    };
                    inst.waiting.push(Reverse((due.0, message)));
                }
            }
            Transition::DeadLettered { .. } => {
                self.dead_letter(key, records);
            }
            Transition::Acked => unreachable!("a failure never acks"),
        }
    }

    /// A delivery ended as a dead letter (its state says why): recorded, counted and
    /// announced.
    fn dead_letter(&mut self, key: (u64, InstanceId), records: &mut Vec<Record>) {
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
    fn record_dead_letter(&mut self, key: (u64, InstanceId), records: &mut Vec<Record>) {
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

    /// A delivery ended: it leaves the live state and the backlog.
    fn finish(&mut self, key: (u64, InstanceId)) {
        if let Some(live) = self.live.remove(&key) {
            let inst = &mut self.instances[key.1 as usize];
            inst.stats.backlog = inst.stats.backlog.saturating_sub(1);
            if live.message.is_none() {
                inst.unloaded = inst.unloaded.saturating_sub(1);
            }
            self.backlog.remove(key.1, live.size);
        }
    }

    /// Graceful stop: every actor finishes its call in hand and releases the rest, then runs
    /// its plugin's `shutdown` (at most `shutdown_timeout`), all within `deadline`; a hung
    /// instance gets only `hang_grace`. The ones still busy are abandoned and named.
    fn stop(&mut self, deadline: Duration, events: &Receiver<actor::Event>) -> StopReport {
        let started = std::time::Instant::now();
        // The actors running now (a generation still draining from a swap is its
        // supervisor's to wait for).
        let mut waiting: Vec<(InstanceId, u32)> = Vec::new();
        for (id, inst) in self.instances.iter().enumerate() {
            if let Some(actor) = &inst.slot.actor {
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
                Ok(actor::Event::Released {
                    instance,
                    generation,
                    released,
                }) => {
                    report.released += released.len() as u64;
                    self.event(
                        actor::Event::Released {
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
                        let inst = &self.instances[*i as usize];
                        !(inst.stats.hung && elapsed >= inst.slot.hang_grace)
                    });
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
        for inst in &mut self.instances {
            if let Some(actor) = inst.slot.actor.take() {
                let left = deadline.saturating_sub(started.elapsed());
                let total = if inst.stats.hung {
                    left.min(inst.slot.hang_grace)
                } else {
                    left
                };
                let deadlines = actor::Deadlines {
                    total,
                    shutdown: inst.slot.shutdown_timeout,
                };
                if let Stopped::Abandoned { .. } = actor.join(deadlines, self.clock.as_ref()) {
                    report.abandoned.push(inst.slot.name.clone());
                }
            }
        }
        self.written();
        report
    }
}

/// The heap of leases: (lease end, message, instance, attempt).
type Leases = BinaryHeap<Reverse<(u64, u64, InstanceId, u32)>>;

/// Keeps only the leases of attempts still in flight, once the heap holds more than twice
/// what the last sweep kept (`swept`) plus [`LEASE_SWEEP_FLOOR`]: amortized O(1) a lease.
fn sweep(leases: &mut Leases, swept: &mut usize, in_flight: impl Fn(u64, InstanceId, u32) -> bool) {
    if leases.len() <= 2 * *swept + LEASE_SWEEP_FLOOR {
        return;
    }
    leases.retain(|Reverse((_, message, instance, attempt))| {
        in_flight(*message, *instance, *attempt)
    });
    *swept = leases.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_leases_are_swept_once_they_outnumber_the_live_ones() {
        let mut leases = Leases::new();
        let mut swept = 0;
        // Messages below 10 are in flight; the others ended long before their lease.
        let in_flight = |message: u64, _, _| message < 10;
        for message in 0..LEASE_SWEEP_FLOOR as u64 {
            leases.push(Reverse((1_000 + message, message, 0, 1)));
            sweep(&mut leases, &mut swept, in_flight);
        }
        assert_eq!((leases.len(), swept), (LEASE_SWEEP_FLOOR, 0), "not yet");
        leases.push(Reverse((1, 99_999, 0, 1)));
        sweep(&mut leases, &mut swept, in_flight);
        assert_eq!((leases.len(), swept), (10, 10), "only the live ones stay");
        // The earliest live lease is still first.
        assert_eq!(leases.peek(), Some(&Reverse((1_000, 0, 0, 1))));
        for message in 10_000..10_000 + LEASE_SWEEP_FLOOR as u64 + 20 {
            leases.push(Reverse((5, message, 0, 1)));
            sweep(&mut leases, &mut swept, in_flight);
        }
        assert!(
            leases.len() <= 2 * 10 + LEASE_SWEEP_FLOOR,
            "{}",
            leases.len()
        );
    }

    #[test]
    fn a_compacted_payload_owns_only_its_bytes() {
        let buffer = bytes::Bytes::from(vec![7u8; 64 * 1024]);
        let message = Arc::new(StoredMessage {
            id: 1,
            topic: "t".into(),
            headers: vec![("k".into(), "v".into())],
            payload: buffer.slice(1000..1256),
            publish_time: Timestamp(5),
        });
        let compact = compact(&message);
        assert_eq!(compact.payload, message.payload);
        assert_eq!(
            (compact.id, &compact.topic, &compact.headers),
            (1, &message.topic, &message.headers)
        );
        let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        assert!(
            !range.contains(&(compact.payload.as_ptr() as usize)),
            "no longer in the buffer"
        );
        drop(message);
        // The big buffer is now held only by `buffer` itself.
        assert!(buffer.is_unique());
    }
}
