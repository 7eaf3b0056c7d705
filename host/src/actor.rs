//! One actor per plugin instance: plugin code runs on the actor's own thread, fed by a
//! mailbox of owned hand-offs; outcomes go back as batched settlements.
//!
//! Flow control without a blocking edge: the mailbox channel is unbounded, but the
//! dispatcher may only [`Actor::offer`] as many hand-offs as the actor has *room* (credits);
//! each settlement returns its credit. So the mailbox never holds more than `capacity`
//! hand-offs, the dispatcher never blocks on it, and the settlement channel (unbounded too)
//! never holds more than `capacity` settlements per actor: no cycle of bounded channels.
//!
//! Stopping: the actor finishes the call in hand, hands back (releases) what it had not
//! started, runs the plugin's `shutdown` and ends. A call still running when the deadline
//! passes (a hung plugin) is abandoned: the thread is detached with its instance and library
//! (retained, counted), and whatever it returns later is a stale settlement.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender, unbounded};
use plugind_api::{
    Outcome,
    hosting::{self, CallError},
};

use crate::{
    clock::{Clock, Timestamp},
    ledger::durable::Marker,
    loader::PluginInstance,
    message::{Handed, StoredMessage},
    routing::InstanceId,
    services::{Child, InstanceServices},
};

/// Settlements are sent back at least this often (in hand-offs) within a long batch.
const SETTLE_EVERY: usize = 64;

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
    pub result: Result<Outcome, CallError>,
    /// Published during the call; committed only if the attempt acks.
    pub children: Vec<Child>,
}

/// What actors tell the dispatcher.
#[derive(Debug)]
pub enum Event {
    /// Outcomes of one or more attempts; each returns one credit.
    Settled {
        instance: InstanceId,
        settlements: Vec<Settlement>,
    },
    /// The actor stopped taking hand-offs; these it never started (no failure: released).
    Released {
        instance: InstanceId,
        released: Vec<Handoff>,
    },
    /// The actor ended (after its plugin's `shutdown`).
    Stopped {
        instance: InstanceId,
        /// The plugin's `shutdown` failed.
        shutdown_error: Option<CallError>,
    },
}

enum Input {
    Deliver(Vec<Handoff>),
    Stop,
}

/// How an actor's stop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
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
    name: String,
    mailbox: Sender<Input>,
    capacity: usize,
    /// Hand-offs offered and not yet settled.
    outstanding: usize,
    /// When the call in hand started (ms since the epoch), 0 when idle.
    busy_since: Arc<AtomicU64>,
    /// When the plugin's `shutdown` started (ms since the epoch), 0 before.
    shutdown_since: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
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
    /// Starts the actor of `instance` on a thread of its own.
    ///
    /// # Errors
    /// The OS error if the thread cannot be started.
    pub fn spawn(
        instance: InstanceId,
        plugin: PluginInstance,
        services: Arc<InstanceServices>,
        capacity: usize,
        events: Sender<Event>,
        clock: Arc<dyn Clock>,
        marker: Option<Marker>,
    ) -> std::io::Result<Self> {
        let (mailbox, inbox) = unbounded();
        let busy_since = Arc::new(AtomicU64::new(0));
        let shutdown_since = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let name = services.identity().instance.clone();
        let worker = Worker {
            instance,
            plugin,
            services,
            inbox,
            events,
            busy_since: busy_since.clone(),
            shutdown_since: shutdown_since.clone(),
            stopping: stopping.clone(),
            clock,
            marker,
        };
        let thread = std::thread::Builder::new()
            .name(format!("plugin:{name}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            instance,
            name,
            mailbox,
            capacity: capacity.max(1),
            outstanding: 0,
            busy_since,
            shutdown_since,
            stopping,
            thread: Some(thread),
        })
    }

    pub fn instance(&self) -> InstanceId {
        self.instance
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
        // A send fails only after the thread ended; its stop report accounts for them.
        let _ = self.mailbox.send(Input::Deliver(batch));
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
        self.stopping.store(true, Ordering::Release);
        let _ = self.mailbox.send(Input::Stop);
    }

    /// Waits until the actor ended, or abandons it: once `deadlines.total` passed, or once
    /// its plugin's `shutdown` ran longer than `deadlines.shutdown`.
    pub fn join(mut self, deadlines: Deadlines, clock: &dyn Clock) -> Stopped {
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
                return Stopped::Abandoned { busy_for };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
        Stopped::Joined
    }
}

/// The actor's own side, on its thread.
struct Worker {
    instance: InstanceId,
    plugin: PluginInstance,
    services: Arc<InstanceServices>,
    inbox: Receiver<Input>,
    events: Sender<Event>,
    busy_since: Arc<AtomicU64>,
    shutdown_since: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
    /// Records each call just before it starts (survives a crash of the process).
    marker: Option<Marker>,
}

impl Worker {
    fn run(mut self) {
        let mut released = Vec::new();
        let mut settled = Vec::new();
        'run: while let Ok(input) = self.inbox.recv() {
            // One wake-up takes everything waiting (batched hand-offs).
            let mut inputs = vec![input];
            inputs.extend(self.inbox.try_iter());
            for input in inputs {
                let Input::Deliver(batch) = input else {
                    break 'run;
                };
                for handoff in batch {
                    if self.stopping.load(Ordering::Acquire) {
                        released.push(handoff);
                        continue;
                    }
                    settled.push(self.call(handoff));
                    if settled.len() >= SETTLE_EVERY {
                        self.flush(&mut settled);
                    }
                }
            }
            self.flush(&mut settled);
            if let Some(marker) = &self.marker {
                marker.idle();
            }
        }
        // Hand-offs still queued behind the stop.
        for input in self.inbox.try_iter() {
            if let Input::Deliver(batch) = input {
                released.extend(batch);
            }
        }
        // Tell the dispatcher what was released before `shutdown` runs: a `shutdown` that
        // never returns must not keep those deliveries from being handed out again.
        let _ = self.events.send(Event::Released {
            instance: self.instance,
            released,
        });
        self.shutdown_since
            .store(self.clock.now().0.max(1), Ordering::Release);
        let shutdown_error = self.plugin.shutdown().err();
        let _ = self.events.send(Event::Stopped {
            instance: self.instance,
            shutdown_error,
        });
    }

    fn call(&mut self, handoff: Handoff) -> Settlement {
        let message = handoff.message.id;
        let attempt = handoff.attempt;
        let hops = handoff.message.hops();
        let raw = hosting::message_handle(Arc::new(Handed {
            message: handoff.message,
            attempt,
        }));
        if let Some(marker) = &self.marker {
            marker.calling(message, attempt);
        }
        self.busy_since
            .store(self.clock.now().0.max(1), Ordering::Release);
        let plugin = &mut self.plugin;
        let (result, children) = self.services.staged(hops, || plugin.handle(raw));
        self.busy_since.store(0, Ordering::Release);
        Settlement {
            message,
            attempt,
            result,
            children,
        }
    }

    fn flush(&self, settled: &mut Vec<Settlement>) {
        if settled.is_empty() {
            return;
        }
        let _ = self.events.send(Event::Settled {
            instance: self.instance,
            settlements: std::mem::take(settled),
        });
    }
}
