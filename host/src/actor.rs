//! One actor per plugin instance: plugin code runs on the actor's own thread, fed by a
//! mailbox of owned hand-offs; outcomes go back as batched settlements.
//!
//! Flow control without a blocking edge: the mailbox is an unbounded queue, but the
//! dispatcher may only [`Actor::offer`] as many hand-offs as the actor has *room* (credits);
//! each settlement returns its credit. So the mailbox never holds more than `capacity`
//! hand-offs, the dispatcher never blocks on it, and the settlement channel (unbounded too)
//! never holds more than `capacity` settlements per actor: no cycle of bounded channels.
//!
//! The worker takes hand-offs from the mailbox one at a time, so everything not yet handed
//! to plugin code stays in the mailbox, where [`Actor::reclaim`] takes it back at once —
//! even while a call runs (a swap gives those deliveries to the next generation without
//! waiting for the call in hand).
//!
//! Deferred attempts (plugind-api 1.1): a call that returns Defer gives its credit back at
//! once, while its token stays outstanding in the instance's [`Deferrals`]; the worker starts
//! a call only while fewer than `max_in_flight` tokens are outstanding.
//!
//! Stopping: the actor finishes the call in hand, hands back (releases) what it had not
//! started, waits until none of its generation's tokens is outstanding (settled, expired, or
//! released by a daemon stop), runs the plugin's `shutdown` and ends. A call still running when the deadline
//! passes (a hung plugin) is abandoned: the thread is detached with its instance and library
//! (retained, counted), and whatever it returns later is a stale settlement.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::Sender;
use plugind_api::{
    Outcome,
    abi::RawToken,
    hosting::{self, CallError, CallErrorKind},
};

use crate::{
    clock::{Clock, Timestamp},
    deferred::{Deferrals, Issued, MarkerSource, Mint, TokenSlot},
    ledger::InFlightMarker,
    loader::PluginInstance,
    message::StoredMessage,
    metrics,
    routing::InstanceId,
    services::{Child, InstanceServices},
};

/// Settlements are sent back at least this often (in hand-offs) within a long batch.
const SETTLE_EVERY: usize = 64;

/// A batch of settlements covers at most this much time of calls: it is sent back once this
/// long has passed since its first call started (or when the queue runs dry). Fast calls
/// still share one settlement batch; a slow plugin's outcome goes back (and its ack to the
/// ledger) as soon as its call returns, so a crash redelivers only what was not yet written.
const SETTLE_WITHIN: Duration = Duration::from_millis(1);

/// Runs on the actor's thread once its first call returned (the supervisor's quarantine
/// marker goes then).
pub type FirstCall = Box<dyn FnOnce() + Send>;

/// One delivery attempt handed to an actor.
#[derive(Debug, Clone)]
pub struct Handoff {
    pub message: Arc<StoredMessage>,
    /// 1-based; recorded in the ledger before the hand-off.
    pub attempt: u32,
}

/// How one attempt ended, from the actor.
#[derive(Debug)]
pub struct Settlement {
    pub message: u64,
    pub attempt: u32,
    /// `Ok(Outcome::Defer)`: the call returned, its token is outstanding (or already
    /// settled through it): only the credit comes back.
    pub result: Result<Outcome, CallError>,
    /// Published during the call; committed only if the attempt acks.
    pub children: Vec<Child>,
    /// The call took the attempt's token, then returned this outcome itself: the registry
    /// entry goes once it is applied.
    pub token: bool,
}

/// One attempt of one delivery: what plugin code sees as a `Message`.
#[derive(Debug)]
pub struct Handed {
    pub message: Arc<StoredMessage>,
    /// 1-based.
    pub attempt: u32,
    /// Whether the call took the attempt's token.
    slot: TokenSlot,
    mint: Arc<Mint>,
    issued: std::sync::OnceLock<Issued>,
}

impl hosting::Delivery for Handed {
    fn id(&self) -> u64 {
        self.message.id
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn topic(&self) -> &str {
        &self.message.topic
    }
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }
    fn publish_time_unix_nanos(&self) -> u64 {
        self.message.publish_time.0.saturating_mul(1_000_000)
    }
    fn header_count(&self) -> usize {
        self.message.headers.len()
    }
    fn header_at(&self, index: usize) -> (&str, &str) {
        let (name, value) = &self.message.headers[index];
        (name, value)
    }
    fn defer(&self) -> Option<RawToken> {
        if !self.slot.take() {
            return None;
        }
        let (raw, issued) = self.mint.mint(&self.message, self.attempt);
        let _ = self.issued.set(issued);
        Some(raw)
    }
}

/// What actors tell the dispatcher.
#[derive(Debug)]
pub enum ActorEvent {
    /// Outcomes of one or more attempts; each returns one credit.
    Settled {
        instance: InstanceId,
        generation: u32,
        settlements: Vec<Settlement>,
    },
    /// The actor stopped taking hand-offs; these it never started (no failure: released).
    Released {
        instance: InstanceId,
        generation: u32,
        released: Vec<Handoff>,
    },
    /// Deferred attempts' tokens ended (settled or dropped) from plugin threads: their ends
    /// wait in the instance's `Deferrals` (one notice per batch).
    Tokens { instance: InstanceId },
    /// The actor ended (after its plugin's `shutdown`).
    Stopped {
        instance: InstanceId,
        generation: u32,
        /// The plugin's `shutdown` failed.
        shutdown_error: Option<CallError>,
    },
}

/// Hand-offs not yet started, shared by the dispatcher (which adds and reclaims) and the
/// worker (which takes them one at a time).
#[derive(Debug, Default)]
struct Mailbox {
    state: Mutex<Queue>,
    wake: Condvar,
    /// `Queue::stop`, readable without the lock (the wait for room reads it).
    stopping: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    handoffs: VecDeque<Handoff>,
    stop: bool,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next hand-off, waiting for one; `None` once stopped.
    fn next(&self, idle: impl FnOnce()) -> Option<Handoff> {
        let mut queue = self.lock();
        if queue.handoffs.is_empty() && !queue.stop {
            // About to sleep: the caller's batch ends here.
            drop(queue);
            idle();
            queue = self.lock();
            while queue.handoffs.is_empty() && !queue.stop {
                queue = self
                    .wake
                    .wait(queue)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        if queue.stop {
            return None;
        }
        queue.handoffs.pop_front()
    }
}

/// How an actor's stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The thread finished and was joined.
    Joined,
    /// The call in hand outlived the deadline: the thread was detached and its library is
    /// retained for good.
    Abandoned { busy_for: Duration },
}

/// The handle the dispatcher holds for one actor.
#[derive(Debug)]
pub struct Actor {
    instance: InstanceId,
    /// The plugin generation it runs (a new one gets a new actor thread).
    generation: u32,
    name: String,
    mailbox: Arc<Mailbox>,
    capacity: usize,
    /// Hand-offs offered and not yet settled.
    outstanding: usize,
    /// When the call in hand started (ms since the epoch), 0 when idle.
    busy_since: Arc<AtomicU64>,
    /// When the plugin's `shutdown` started (ms since the epoch), 0 before.
    shutdown_since: Arc<AtomicU64>,
    /// The instance's deferred attempts (shared with its other generations).
    deferrals: Arc<Deferrals>,
    thread: Option<JoinHandle<()>>,
}

/// What an actor needs besides its plugin: its identity, limits and the engine's channels.
#[allow(missing_debug_implementations)]
pub struct ActorDeps {
    pub instance: InstanceId,
    pub generation: u32,
    pub capacity: usize,
    pub events: Sender<ActorEvent>,
    pub clock: Arc<dyn Clock>,
    /// The in-flight marker of its calls.
    pub marker: Option<InFlightMarker>,
    /// In-flight markers of its tokens.
    pub markers: MarkerSource,
    pub deferrals: Arc<Deferrals>,
    pub first_call: Option<FirstCall>,
}

/// How long a stopping actor may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// For the whole stop: the call in hand, then `shutdown`.
    pub total: Duration,
    /// For the plugin's `shutdown` alone, from when it starts.
    pub shutdown: Duration,
}

impl Actor {
    /// Starts the actor of `deps.instance` on a thread of its own.
    ///
    /// # Errors
    /// The OS error if the thread cannot be started.
    pub fn spawn(
        plugin: PluginInstance,
        services: Arc<InstanceServices>,
        deps: ActorDeps,
    ) -> std::io::Result<Self> {
        let ActorDeps {
            instance,
            generation,
            capacity,
            events,
            clock,
            marker,
            markers,
            deferrals,
            first_call,
        } = deps;
        let mailbox = Arc::new(Mailbox::default());
        let busy_since = Arc::new(AtomicU64::new(0));
        let shutdown_since = Arc::new(AtomicU64::new(0));
        let name = services.identity().instance.clone();
        let mint = Arc::new(Mint {
            instance,
            generation,
            deferrals: deferrals.clone(),
            report: {
                let (events, deferrals) = (events.clone(), deferrals.clone());
                Box::new(move |end| {
                    // Told only when it may be asleep: awake, it takes the ends each round.
                    if deferrals.push_end(end) {
                        let _ = events.send(ActorEvent::Tokens { instance });
                    }
                })
            },
            services: services.clone(),
            clock: clock.clone(),
            markers,
            latency: metrics::SettleRecorder::of(instance),
        });
        let worker = Worker {
            instance,
            generation,
            plugin,
            services,
            mailbox: mailbox.clone(),
            events,
            busy_since: busy_since.clone(),
            shutdown_since: shutdown_since.clone(),
            clock,
            marker,
            first_call,
            deferrals: deferrals.clone(),
            mint,
        };
        let thread = std::thread::Builder::new()
            .name(format!("plugin:{name}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            instance,
            generation,
            name,
            mailbox,
            capacity: capacity.max(1),
            outstanding: 0,
            busy_since,
            shutdown_since,
            deferrals,
            thread: Some(thread),
        })
    }

    /// The instance's deferred attempts.
    pub fn deferrals(&self) -> &Arc<Deferrals> {
        &self.deferrals
    }

    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How many more hand-offs it may be offered now.
    pub fn room(&self) -> usize {
        self.capacity - self.outstanding
    }

    /// Offers hand-offs; never blocks.
    ///
    /// # Panics
    /// If `batch` exceeds [`Actor::room`]: the dispatcher's invariant.
    pub fn offer(&mut self, batch: Vec<Handoff>) {
        assert!(
            batch.len() <= self.room(),
            "offered {} hand-offs to {} with room for {}",
            batch.len(),
            self.name,
            self.room()
        );
        if batch.is_empty() {
            return;
        }
        self.outstanding += batch.len();
        let mut queue = self.mailbox.lock();
        queue.handoffs.extend(batch);
        drop(queue);
        self.mailbox.wake.notify_one();
    }

    /// Returns the credits of `settled` hand-offs.
    pub fn settled(&mut self, settled: usize) {
        self.outstanding = self.outstanding.saturating_sub(settled);
    }

    /// When the call in hand started, if one is running.
    pub fn busy_since(&self) -> Option<Timestamp> {
        match self.busy_since.load(Ordering::Acquire) {
            0 => None,
            millis => Some(Timestamp(millis)),
        }
    }

    /// Asks the actor to stop: it finishes the call in hand and releases the rest.
    pub fn request_stop(&self) {
        self.mailbox.lock().stop = true;
        self.mailbox.stopping.store(true, Ordering::Release);
        self.mailbox.wake.notify_one();
        self.deferrals.wake();
    }

    /// Asks the actor to stop and takes back at once every hand-off it has not started
    /// (no plugin code saw them); it finishes the call in hand.
    pub fn reclaim(&self) -> Vec<Handoff> {
        let mut queue = self.mailbox.lock();
        queue.stop = true;
        self.mailbox.stopping.store(true, Ordering::Release);
        let unstarted = queue.handoffs.drain(..).collect();
        drop(queue);
        self.mailbox.wake.notify_one();
        self.deferrals.wake();
        unstarted
    }

    /// Waits until the actor ended, or abandons it: once `deadlines.total` passed, or once
    /// its plugin's `shutdown` ran longer than `deadlines.shutdown`.
    pub fn join(mut self, deadlines: Deadlines, clock: &dyn Clock) -> JoinOutcome {
        self.request_stop();
        let thread = self.thread.take().expect("an actor joins once");
        let start = std::time::Instant::now();
        while !thread.is_finished() {
            let now = clock.now();
            let in_shutdown = match self.shutdown_since.load(Ordering::Acquire) {
                0 => None,
                since => Some(now.since(Timestamp(since))),
            };
            let overdue = start.elapsed() >= deadlines.total
                || in_shutdown.is_some_and(|d| d >= deadlines.shutdown);
            if overdue {
                let busy_for = self
                    .busy_since()
                    .map(|since| now.since(since))
                    .or(in_shutdown)
                    .unwrap_or(Duration::ZERO);
                tracing::warn!(
                    instance = %self.name,
                    busy_for = ?busy_for,
                    in_shutdown = in_shutdown.is_some(),
                    "abandoning a stuck instance: its thread and library are retained"
                );
                drop(thread);
                return JoinOutcome::Abandoned { busy_for };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
        JoinOutcome::Joined
    }
}

/// The actor's own side, on its thread.
struct Worker {
    instance: InstanceId,
    generation: u32,
    plugin: PluginInstance,
    services: Arc<InstanceServices>,
    mailbox: Arc<Mailbox>,
    events: Sender<ActorEvent>,
    busy_since: Arc<AtomicU64>,
    shutdown_since: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    /// Records each call just before it starts (survives a crash of the process).
    marker: Option<InFlightMarker>,
    first_call: Option<FirstCall>,
    deferrals: Arc<Deferrals>,
    mint: Arc<Mint>,
}

impl Worker {
    fn run(mut self) {
        let mut settled = Vec::new();
        // When the first call of the batch in `settled` started.
        let mut batch_started = None;
        loop {
            // `max_in_flight` tokens outstanding: no call starts until one ends.
            if !self.deferrals.has_room() {
                self.flush(&mut settled);
                if let Some(marker) = &self.marker {
                    marker.idle();
                }
                self.deferrals.wait_for_room(&self.mailbox.stopping);
            }
            let next = self.mailbox.next(|| {
                // The queue ran dry: settle what is done, then sleep.
                self.flush(&mut settled);
                if let Some(marker) = &self.marker {
                    marker.idle();
                }
            });
            let Some(handoff) = next else {
                break;
            };
            if settled.is_empty() {
                batch_started = None;
            }
            let started = *batch_started.get_or_insert_with(std::time::Instant::now);
            settled.push(self.call(handoff));
            if settled.len() >= SETTLE_EVERY || started.elapsed() >= SETTLE_WITHIN {
                self.flush(&mut settled);
            }
        }
        self.flush(&mut settled);
        if let Some(marker) = &self.marker {
            marker.idle();
        }
        // Hand-offs still queued behind the stop.
        let released: Vec<Handoff> = self.mailbox.lock().handoffs.drain(..).collect();
        // Tell the dispatcher what was released before `shutdown` runs: a `shutdown` that
        // never returns must not keep those deliveries from being handed out again.
        let _ = self.events.send(ActorEvent::Released {
            instance: self.instance,
            generation: self.generation,
            released,
        });
        // A draining generation keeps its plugin until its tokens are settled, expired, or
        // released by a daemon stop.
        self.deferrals.wait_drained(self.generation);
        self.shutdown_since
            .store(self.clock.now().0.max(1), Ordering::Release);
        let shutdown_error = self.plugin.shutdown().err();
        let _ = self.events.send(ActorEvent::Stopped {
            instance: self.instance,
            generation: self.generation,
            shutdown_error,
        });
    }

    fn call(&mut self, handoff: Handoff) -> Settlement {
        let message = handoff.message.id;
        let attempt = handoff.attempt;
        let hops = handoff.message.hops();
        let published = handoff.message.publish_time;
        let handed = Arc::new(Handed {
            message: handoff.message,
            attempt,
            slot: TokenSlot::default(),
            mint: self.mint.clone(),
            issued: std::sync::OnceLock::new(),
        });
        let raw = hosting::message_handle(handed.clone());
        if let Some(marker) = &self.marker {
            marker.calling(message, attempt);
        }
        self.busy_since
            .store(self.clock.now().0.max(1), Ordering::Release);
        let plugin = &mut self.plugin;
        let (result, children) = metrics::handled(self.instance, published, &*self.clock, || {
            self.services.staged(hops, || plugin.handle(raw))
        });
        self.busy_since.store(0, Ordering::Release);
        if let Some(first_call) = self.first_call.take() {
            first_call();
        }
        let taken = handed.slot.close();
        let (result, children, token) = self.deferral(&handed, taken, result, children);
        Settlement {
            message,
            attempt,
            result,
            children,
            token,
        }
    }

    /// What a call's outcome means once its token is accounted for: Defer with the token
    /// taken gives only the credit back; Defer without it fails the attempt; another
    /// outcome after taking the token settles the attempt only if the token was not settled
    /// first (then the token is stale).
    fn deferral(
        &self,
        handed: &Handed,
        taken: bool,
        result: Result<Outcome, CallError>,
        children: Vec<Child>,
    ) -> (Result<Outcome, CallError>, Vec<Child>, bool) {
        match (result, taken) {
            (Ok(Outcome::Defer), true) => {
                if let Some(issued) = handed.issued.get()
                    && let Err(lost) = issued.adopt(children)
                {
                    tracing::warn!(
                        instance = %self.services.identity().instance,
                        id = handed.message.id,
                        children = lost.len(),
                        "messages published in handle after its token was already settled \
                         are discarded: publish through the token"
                    );
                }
                (Ok(Outcome::Defer), Vec::new(), false)
            }
            (Ok(Outcome::Defer), false) => (
                Err(CallError {
                    kind: CallErrorKind::Error,
                    message: "handle returned Defer without taking the message's token \
                              (Message::defer)"
                        .to_owned(),
                }),
                Vec::new(),
                false,
            ),
            (result, true) => {
                if self
                    .deferrals
                    .claim(handed.message.id, handed.attempt)
                    .is_ok()
                {
                    (result, children, true)
                } else {
                    // The token settled (or was dropped) before handle returned: it counts.
                    (Ok(Outcome::Defer), Vec::new(), false)
                }
            }
            (result, false) => (result, children, false),
        }
    }

    fn flush(&self, settled: &mut Vec<Settlement>) {
        if settled.is_empty() {
            return;
        }
        let _ = self.events.send(ActorEvent::Settled {
            instance: self.instance,
            generation: self.generation,
            settlements: std::mem::take(settled),
        });
    }
}
