//! Per instance: its [`Slot`] (settings, breaker, actor), its queues ([`InstanceQueue`]:
//! ready in acceptance order, retries by due time) and its counters; per live delivery
//! ([`Live`]) where its payload is — held in memory, or left in the ledger to be read back
//! when its turn comes (payload residency: at most `queue_capacity + max_in_flight` held per
//! instance, none for an instance that runs nothing, with a ledger that [reloads]).
//!
//! [reloads]: crate::ledger::Ledger::reloads

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    sync::Arc,
    time::Duration,
};

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::pacing::{KeyOrder, RateBucket};

use crate::{
    actor::Actor,
    circuit::{self, Breaker, CircuitState},
    clock::Timestamp,
    config::Settings,
    deferred::Deferrals,
    delivery::{Delivery, Rules, State},
    ledger::{Ledger, LedgerError, Pending},
    message::StoredMessage,
    routing::InstanceId,
};

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
    /// Its deferred attempts (from its first actor on; they outlive every generation).
    pub deferrals: Option<Arc<Deferrals>>,
    /// `max_in_flight` and `ack_timeout`, for its deferrals.
    limits: (usize, Duration),
    /// `rate_limit`: how many deliveries may go out now.
    pub(super) rate: Option<RateBucket>,
    /// `ordering_key`: the header whose value orders deliveries.
    pub ordering_key: Option<String>,
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
            deferrals: None,
            limits: (0, Duration::ZERO),
            rate: None,
            ordering_key: None,
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
        self.limits = (settings.max_in_flight as usize, settings.ack_timeout);
        let rate_changed = match (&self.rate, settings.rate_limit) {
            (Some(_), None) | (None, Some(_)) => true,
            (Some(bucket), Some(limit)) => bucket.per_second() != limit,
            (None, None) => false,
        };
        if rate_changed {
            self.rate = settings
                .rate_limit
                .map(|limit| RateBucket::new(limit, Timestamp(0)));
        }
        self.ordering_key = settings.ordering_key.clone();
        if let Some(deferrals) = &self.deferrals {
            deferrals.configure(self.limits.0, self.limits.1);
        }
    }

    /// Its actor from now on (`None`: it runs nothing); its deferrals are the actor's.
    pub fn run(&mut self, actor: Option<Actor>) -> Option<Actor> {
        if let Some(actor) = &actor {
            let deferrals = actor.deferrals().clone();
            deferrals.configure(self.limits.0, self.limits.1);
            self.deferrals = Some(deferrals);
        }
        std::mem::replace(&mut self.actor, actor)
    }

    /// Deferred attempts outstanding now.
    pub fn deferred(&self) -> u64 {
        self.deferrals
            .as_ref()
            .map_or(0, |d| d.outstanding() as u64)
    }

    /// A call of its actor is running now.
    pub(super) fn calling(&self) -> bool {
        self.actor
            .as_ref()
            .is_some_and(|a| a.busy_since().is_some())
    }
}

/// Counters and state of one instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InstanceStats {
    pub name: String,
    pub running: bool,
    /// The plugin generation running (0: none).
    pub generation: u32,
    /// Attempts handed to its actor.
    pub handed_out: u64,
    /// Attempts by how they ended.
    pub outcomes: crate::outcomes::Outcomes,
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
    /// Deferred attempts outstanding: tokens taken, not yet settled or expired.
    pub deferred: u64,
    pub circuit: Option<circuit::BreakerState>,
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

/// One live delivery (waiting or in flight).
pub(super) struct Live {
    /// `None` while it waits with its payload only in the ledger.
    pub(super) message: Option<Arc<StoredMessage>>,
    /// What it counts for in the backlog.
    pub(super) size: u64,
    pub(super) delivery: Delivery,
    /// Since when it waits (ms since the epoch): `max_age` counts from here.
    pub(super) since: u64,
}

/// Every live delivery, by (message, instance). Keyed by small integers: FxHash, not SipHash
/// (measured: ~3% of the engine's time).
pub(super) type LiveMap = FxHashMap<(u64, InstanceId), Live>;

/// A copy of `message` whose payload owns exactly its bytes. Payloads arrive as slices of
/// the buffer a request was received in (zero copy); a delivery that waits long would pin
/// that whole buffer, so it keeps a compact copy instead.
pub(super) fn compact(message: &Arc<StoredMessage>) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        payload: bytes::Bytes::copy_from_slice(&message.payload),
        ..StoredMessage::clone(message)
    })
}

/// One instance's queues and counters, around its [`Slot`].
pub(super) struct InstanceQueue {
    pub(super) slot: Slot,
    /// Messages ready to go, first deliveries in acceptance order (released ones in front).
    pub(super) ready: VecDeque<u64>,
    /// Retries by due time.
    waiting: BinaryHeap<Reverse<(u64, u64)>>,
    /// Live deliveries whose payload is only in the ledger (0: hand-outs need no reads).
    pub(super) unloaded: usize,
    pub(super) stats: InstanceStats,
    /// The circuit state last announced.
    circuit: CircuitState,
    /// When its waiting deliveries are next checked against `max_age`.
    age_check: Timestamp,
    /// `ordering_key`: keys held and messages parked behind them.
    pub(super) order: KeyOrder,
}

impl InstanceQueue {
    pub(super) fn new(slot: Slot) -> Self {
        Self {
            stats: InstanceStats {
                name: slot.name.clone(),
                ..InstanceStats::default()
            },
            slot,
            ready: VecDeque::new(),
            waiting: BinaryHeap::new(),
            unloaded: 0,
            circuit: CircuitState::Closed,
            age_check: Timestamp(0),
            order: KeyOrder::default(),
        }
    }

    /// Live deliveries holding their payload in memory.
    pub(super) fn resident(&self) -> usize {
        (self.stats.backlog as usize).saturating_sub(self.unloaded)
    }

    /// A first delivery of `message` joins the ready queue; returns the payload it holds
    /// (`None`: left in the ledger, which `reloads`).
    pub(super) fn enqueue(
        &mut self,
        message: &Arc<StoredMessage>,
        reloads: bool,
    ) -> Option<Arc<StoredMessage>> {
        let resident = self.resident();
        self.ready.push_back(message.id);
        self.stats.backlog += 1;
        let waits = self.slot.actor.is_none();
        if reloads && (waits || resident >= self.slot.keep) {
            // The ledger has it: as many payloads as allowed are held, or nothing runs the
            // instance (it may wait for long: a stopped instance's backlog must not be held
            // in memory byte for byte). It is read back when handed out.
            self.unloaded += 1;
            None
        } else if waits {
            // An instance that is not running keeps it for long: do not pin a receive
            // buffer.
            Some(compact(message))
        } else {
            Some(message.clone())
        }
    }

    /// A delivery the ledger handed back (recovered, replayed, attached) joins its queue:
    /// ready, or waiting for its due time.
    pub(super) fn take_back(&mut self, pending: &Pending, now: Timestamp) {
        match pending.delivery.state {
            State::Ready { due } if due > now.0 => {
                self.waiting.push(Reverse((due, pending.message)));
            }
            _ => self.ready.push_back(pending.message),
        }
        self.stats.backlog += 1;
        self.unloaded += usize::from(pending.stored.is_none());
    }

    /// A failed attempt goes again at `due`: at once, or it waits its backoff — then the
    /// ledger has its payload (one that `reloads`), or it keeps only its own bytes, not a
    /// receive buffer.
    pub(super) fn retry(
        &mut self,
        message: u64,
        due: Timestamp,
        now: Timestamp,
        live: &mut Live,
        reloads: bool,
    ) {
        if due <= now {
            self.ready.push_back(message);
            return;
        }
        live.message = if reloads {
            self.unloaded += usize::from(live.message.is_some());
            None
        } else {
            live.message.as_ref().map(compact)
        };
        self.waiting.push(Reverse((due.0, message)));
    }

    /// The delivery of `message` ended (`live` left the live state); the ordering key it held
    /// goes to the next message of that key.
    pub(super) fn ended(&mut self, message: u64, live: &Live) {
        if let Some(next) = self.order.ended(message) {
            self.ready.push_front(next);
        }
        self.stats.backlog = self.stats.backlog.saturating_sub(1);
        if live.message.is_none() {
            self.unloaded = self.unloaded.saturating_sub(1);
        }
    }

    /// Due retries join the ready queue.
    pub(super) fn promote(&mut self, now: Timestamp) {
        while let Some(Reverse((due, message))) = self.waiting.peek().copied() {
            if due > now.0 {
                break;
            }
            self.waiting.pop();
            self.ready.push_back(message);
        }
    }

    /// Drops from the queues every message of `instance` (this one) that left `live`.
    pub(super) fn keep_live(&mut self, instance: InstanceId, live: &LiveMap) {
        self.ready.retain(|m| live.contains_key(&(*m, instance)));
        self.waiting
            .retain(|Reverse((_, m))| live.contains_key(&(*m, instance)));
        self.order.retain(|m| live.contains_key(&(m, instance)));
    }

    /// When this instance next needs the loop: a retry due, a circuit probe, an age check.
    pub(super) fn next_wakeup(&self) -> Option<Timestamp> {
        let retry = self.waiting.peek().map(|Reverse((due, _))| Timestamp(*due));
        let age = (self.slot.max_age.is_some() && self.stats.backlog > 0).then_some(self.age_check);
        let rate = self
            .slot
            .rate
            .as_ref()
            .filter(|_| !self.ready.is_empty())
            .map(RateBucket::next);
        [retry, self.slot.breaker.next_wakeup(), age, rate]
            .into_iter()
            .flatten()
            .min()
    }

    /// If its waiting deliveries are due for a `max_age` check now (every tenth of
    /// `max_age`, at least a second, at most a minute apart: a check walks its whole queue),
    /// the messages of `instance` (this one) waiting since before `max_age` ago.
    pub(super) fn outlived(
        &mut self,
        instance: InstanceId,
        now: Timestamp,
        live: &LiveMap,
    ) -> Vec<u64> {
        let Some(max_age) = self.slot.max_age else {
            return Vec::new();
        };
        if now < self.age_check || self.stats.backlog == 0 {
            return Vec::new();
        }
        self.age_check =
            now.after((max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)));
        let cutoff = now.0.saturating_sub(max_age.as_millis() as u64);
        self.ready
            .iter()
            .chain(self.waiting.iter().map(|Reverse((_, m))| m))
            .copied()
            .chain(self.order.parked())
            .filter(|m| {
                live.get(&(*m, instance))
                    .is_some_and(|l| l.since < cutoff && l.delivery.in_flight().is_none())
            })
            .collect()
    }

    /// The circuit's state if it changed since the last call.
    pub(super) fn circuit_change(&mut self) -> Option<CircuitState> {
        let state = match CircuitState::from(Some(self.slot.breaker.state())) {
            // The event says open from the trip to the close, probe or not.
            CircuitState::HalfOpen => CircuitState::Open,
            state => state,
        };
        (state != self.circuit).then(|| {
            self.circuit = state;
            state
        })
    }

    /// Its counters now, with `in_flight` hand-offs.
    pub(super) fn stats(&self, in_flight: u64) -> InstanceStats {
        let calling = self.slot.calling();
        InstanceStats {
            running: self.slot.actor.is_some(),
            generation: self.slot.actor.as_ref().map_or(0, Actor::generation),
            in_flight,
            calling: u64::from(calling),
            deferred: self.slot.deferred(),
            resident: self.resident() as u64,
            circuit: Some(self.slot.breaker.state().clone()),
            hung: self.stats.hung && calling,
            ..self.stats.clone()
        }
    }

    /// Before the first `room` ready messages of `instance` (this one) go out: the payloads
    /// among them that wait in the ledger only are read back together, after letting the
    /// newest waiting payloads go back to the ledger to stay within `keep` (the front is what
    /// goes out now).
    ///
    /// # Errors
    /// The ledger's, when it cannot be read (a fail-stop for the caller).
    pub(super) fn load_front(
        &mut self,
        instance: InstanceId,
        room: usize,
        live: &mut LiveMap,
        ledger: &dyn Ledger,
    ) -> Result<(), LedgerError> {
        if self.unloaded == 0 {
            return Ok(());
        }
        let missing: Vec<u64> = self
            .ready
            .iter()
            .take(room)
            .copied()
            .filter(|m| {
                live.get(&(*m, instance))
                    .is_some_and(|l| l.message.is_none())
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut over = (self.resident() + missing.len()).saturating_sub(self.slot.keep);
        for m in self.ready.iter().skip(room).rev() {
            if over == 0 {
                break;
            }
            if let Some(live) = live.get_mut(&(*m, instance))
                && live.message.is_some()
            {
                live.message = None;
                self.unloaded += 1;
                over -= 1;
            }
        }
        let loaded = ledger.load_many(&missing)?;
        for (id, stored) in missing.iter().zip(loaded) {
            if let Some(live) = live.get_mut(&(*id, instance))
                && stored.is_some()
            {
                live.message = stored;
                self.unloaded = self.unloaded.saturating_sub(1);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
