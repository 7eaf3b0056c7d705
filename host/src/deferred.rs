//! Deferred attempts (plugind-api 1.1): the completion tokens plugins hold, and the registry
//! of one instance's outstanding ones.
//!
//! A plugin takes an attempt's token during `handle` ([`Mint::mint`]) and settles it later
//! from any thread. Three parties race for every deferred attempt: the plugin (settle, drop,
//! keep-alive), the actor (the outcome `handle` returned), and the dispatcher (lease expiry,
//! a stop). [`Deferrals`] makes each race exact under one lock: an attempt is
//! *outstanding* until exactly one party *claims* it; the others are refused (a plugin's
//! settle of an attempt that ended returns [`SettleErrorKind::Stale`], never touching a later
//! attempt: tokens name message id + attempt). A claimed settlement travels to the
//! dispatcher as a [`TokenEnd`] (through the actor events); until the dispatcher applied it the entry stays
//! (as *settled*), so a lease that ends meanwhile is not also counted as a timeout.
//!
//! The registry is per instance and shared by its generations: tokens stay valid across a
//! swap (the old generation drains: its actor waits until none of its tokens is outstanding
//! before its plugin's `shutdown` runs). It also bounds the instance's concurrency: an actor
//! starts a call only while fewer than `max_in_flight` tokens are outstanding.
//!
//! Each outstanding token holds an in-flight marker slot of its own (the ledger's
//! [`InFlightMarker`]), written when the token is taken and cleared when it is claimed: after
//! a crash every deferred attempt still outstanding is charged a `crash`, like a call in hand.

use std::{
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use plugind_api::{
    MessageId, Outcome, PublishError, SettleError, SettleErrorKind,
    abi::{KeyValue, RawToken},
    hosting::{self, CallError, Completion},
};
use rustc_hash::FxHashMap;

use crate::{
    clock::{Clock, Timestamp},
    ledger::InFlightMarker,
    message::StoredMessage,
    routing::InstanceId,
    services::{Child, InstanceServices},
};

/// Makes in-flight markers for tokens (`None`: the ledger keeps none).
pub type MarkerSource = Arc<dyn Fn() -> Option<InFlightMarker> + Send + Sync>;

/// How a token ended, for the dispatcher.
#[derive(Debug)]
pub enum TokenEnd {
    /// Settled through the token; `children` were published through it.
    Settled {
        message: u64,
        attempt: u32,
        /// `Err`: an async handler's future panicked.
        outcome: Result<Outcome, CallError>,
        children: Vec<Child>,
    },
    /// Dropped unsettled: a failure with reason `dropped`.
    Dropped { message: u64, attempt: u32 },
}

/// One instance's outstanding deferred attempts.
#[derive(Debug)]
pub struct Deferrals {
    state: Mutex<Registry>,
    /// Signalled whenever an attempt stops being outstanding, and on a stop.
    changed: Condvar,
    /// `outstanding < max_in_flight`, readable without the lock (the actor asks before
    /// every call); written under the lock whenever either changes.
    room: AtomicBool,
    /// Token ends not yet taken by the dispatcher, oldest first.
    ended: Mutex<Vec<TokenEnd>>,
    /// `ended` is not empty (read without its lock).
    pending: AtomicBool,
    /// The dispatcher waits for input (or is about to): a token end must wake it.
    asleep: AtomicBool,
}

#[derive(Debug)]
struct Registry {
    /// By (message, attempt).
    tokens: FxHashMap<(u64, u32), Entry>,
    /// Entries still outstanding (not yet claimed).
    outstanding: usize,
    /// Outstanding entries per generation (for a draining generation's wait).
    by_generation: FxHashMap<u32, usize>,
    max_in_flight: usize,
    ack_timeout: Duration,
    /// Actors waiting on `changed` for room, and draining generations waiting for their
    /// tokens: a change wakes them only if it lets one go on (a wake-up is a system call).
    room_waiters: usize,
    drain_waiters: usize,
}

impl Registry {
    /// Below how many outstanding attempts a full instance's actor goes on.
    fn resume_below(&self) -> usize {
        self.max_in_flight - self.max_in_flight / 8
    }

    /// Whether a change (made under the lock) must wake a waiter: a draining generation
    /// (rare: checks its own count), or an actor waiting for room that now has it.
    fn wakes(&self) -> bool {
        self.drain_waiters > 0 || (self.room_waiters > 0 && self.outstanding < self.resume_below())
    }
}

#[derive(Debug)]
struct Entry {
    generation: u32,
    /// `Some` while outstanding: when its lease ends.
    lease_until: Option<Timestamp>,
    marker: Option<InFlightMarker>,
}

/// What a lease's end finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No token was taken for this attempt: a plain call's lease.
    NotDeferred,
    /// `keep_alive` moved the lease: look again then.
    Extended(Timestamp),
    /// Claimed by its settlement, which is on its way to the dispatcher.
    Settled,
    /// Outstanding and past its lease: claimed now, a `timeout`.
    Expired,
}

/// The attempt ended before this claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended;

impl Deferrals {
    pub fn new(max_in_flight: usize, ack_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Registry {
                tokens: FxHashMap::default(),
                outstanding: 0,
                by_generation: FxHashMap::default(),
                max_in_flight: max_in_flight.max(1),
                ack_timeout,
                room_waiters: 0,
                drain_waiters: 0,
            }),
            changed: Condvar::new(),
            room: AtomicBool::new(true),
            ended: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            // Until the dispatcher first says it is awake, every end wakes it.
            asleep: AtomicBool::new(true),
        })
    }

    /// Wakes the waiters if `wake` (decided under the lock by [`Registry::wakes`]) says so.
    fn wake_if(&self, wake: bool) {
        if wake {
            self.changed.notify_all();
        }
    }

    /// Queues a token's end for the dispatcher; whether the dispatcher must be told (it is
    /// going to sleep, or asleep): an awake dispatcher takes the queue in its round anyway,
    /// so a busy one is not woken once per settlement.
    ///
    /// With [`Deferrals::dispatcher_sleeps`] this is Dekker's handshake, both sides SeqCst:
    /// the end is queued (`pending`) before `asleep` is read, and the dispatcher sets
    /// `asleep` before it reads `pending`, so one of them sees the other.
    pub fn push_end(&self, end: TokenEnd) -> bool {
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ended.push(end);
        self.pending.store(true, Ordering::SeqCst);
        drop(ended);
        self.asleep.load(Ordering::SeqCst)
    }

    /// The token ends queued since the last call (the dispatcher's, each round).
    pub fn take_ends(&self) -> Vec<TokenEnd> {
        if !self.pending.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.pending.store(false, Ordering::SeqCst);
        std::mem::take(&mut *ended)
    }

    /// The dispatcher is about to wait for input: whether it may (no token end queued).
    pub fn dispatcher_sleeps(&self) -> bool {
        self.asleep.store(true, Ordering::SeqCst);
        !self.pending.load(Ordering::SeqCst)
    }

    /// The dispatcher is awake: it takes the queue each round, nobody need tell it.
    pub fn dispatcher_wakes(&self) {
        self.asleep.store(false, Ordering::SeqCst);
    }

    /// Publishes whether there is room, after a change under the lock.
    fn update_room(&self, registry: &Registry) {
        self.room.store(
            registry.outstanding < registry.max_in_flight,
            Ordering::Release,
        );
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// New limits (a reload): they apply to the next call and the next keep-alive.
    pub fn configure(&self, max_in_flight: usize, ack_timeout: Duration) {
        let mut registry = self.lock();
        registry.max_in_flight = max_in_flight.max(1);
        registry.ack_timeout = ack_timeout;
        self.update_room(&registry);
        let wake = registry.wakes();
        drop(registry);
        self.wake_if(wake);
    }

    /// Whether another call may start: fewer than `max_in_flight` attempts outstanding.
    pub fn has_room(&self) -> bool {
        self.room.load(Ordering::Acquire)
    }

    /// Attempts outstanding now (taken, not yet settled or expired).
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    /// Records a token taken for `attempt` of `message` by `generation`.
    fn open(
        &self,
        message: u64,
        attempt: u32,
        generation: u32,
        now: Timestamp,
        marker: Option<InFlightMarker>,
    ) {
        let mut registry = self.lock();
        let lease_until = now.after(registry.ack_timeout);
        registry.outstanding += 1;
        *registry.by_generation.entry(generation).or_default() += 1;
        registry.tokens.insert(
            (message, attempt),
            Entry {
                generation,
                lease_until: Some(lease_until),
                marker,
            },
        );
        self.update_room(&registry);
    }

    /// Ends the outstanding state of the entry of `key` (under the lock); returns its marker
    /// to clear, or `None` when it was not outstanding.
    fn end(registry: &mut Registry, key: (u64, u32)) -> Option<Option<InFlightMarker>> {
        let entry = registry.tokens.get_mut(&key)?;
        entry.lease_until?;
        entry.lease_until = None;
        let (generation, marker) = (entry.generation, entry.marker.take());
        registry.outstanding -= 1;
        if let Some(count) = registry.by_generation.get_mut(&generation) {
            *count -= 1;
            if *count == 0 {
                registry.by_generation.remove(&generation);
            }
        }
        Some(marker)
    }

    /// Claims an outstanding attempt for its settlement: exactly one claim wins.
    ///
    /// # Errors
    /// [`Ended`] when it is not outstanding (settled, expired, released, or never taken).
    pub fn claim(&self, message: u64, attempt: u32) -> Result<(), Ended> {
        let (marker, waiters) = {
            let mut registry = self.lock();
            let marker = Self::end(&mut registry, (message, attempt)).ok_or(Ended)?;
            self.update_room(&registry);
            (marker, registry.wakes())
        };
        self.wake_if(waiters);
        // Cleared outside the lock: a `pwrite`.
        drop(marker);
        Ok(())
    }

    /// The dispatcher applied the settlements of these claimed attempts (message, attempt):
    /// their entries go, under one lock.
    pub fn finish(&self, applied: &[(u64, u32)]) {
        if applied.is_empty() {
            return;
        }
        let mut registry = self.lock();
        let mut ended = false;
        for key in applied {
            // Applied without a claim cannot happen; if it did, the counts stay right.
            ended |= Self::end(&mut registry, *key).is_some();
            registry.tokens.remove(key);
        }
        self.update_room(&registry);
        let wake = registry.wakes();
        drop(registry);
        if ended {
            self.wake_if(wake);
        }
    }

    /// A lease of `attempt` of `message` ended at `now`: what to do about it.
    pub fn expire(&self, message: u64, attempt: u32, now: Timestamp) -> Expiry {
        let marker = {
            let mut registry = self.lock();
            let Some(entry) = registry.tokens.get(&(message, attempt)) else {
                return Expiry::NotDeferred;
            };
            match entry.lease_until {
                None => return Expiry::Settled,
                Some(until) if until > now => return Expiry::Extended(until),
                Some(_) => {}
            }
            let marker = Self::end(&mut registry, (message, attempt));
            registry.tokens.remove(&(message, attempt));
            self.update_room(&registry);
            (marker, registry.wakes())
        };
        self.wake_if(marker.1);
        drop(marker);
        Expiry::Expired
    }

    /// Extends the lease of an outstanding attempt by `ack_timeout` from `now`.
    ///
    /// # Errors
    /// [`Ended`] when it is not outstanding.
    pub fn keep_alive(&self, message: u64, attempt: u32, now: Timestamp) -> Result<(), Ended> {
        let mut registry = self.lock();
        let ack_timeout = registry.ack_timeout;
        match registry.tokens.get_mut(&(message, attempt)) {
            Some(Entry {
                lease_until: Some(until),
                ..
            }) => {
                *until = now.after(ack_timeout);
                Ok(())
            }
            _ => Err(Ended),
        }
    }

    /// A stop: every outstanding attempt is released (the dispatcher releases its delivery
    /// as `shutdown`); their tokens are stale from now on. Returns how many.
    pub fn release_all(&self) -> usize {
        let markers: Vec<Option<InFlightMarker>> = {
            let mut guard = self.lock();
            let registry = &mut *guard;
            let mut markers = Vec::new();
            let mut tokens = std::mem::take(&mut registry.tokens);
            tokens.retain(|_, entry| {
                if entry.lease_until.is_some() {
                    markers.push(entry.marker.take());
                    false
                } else {
                    true
                }
            });
            registry.tokens = tokens;
            registry.outstanding = 0;
            registry.by_generation.clear();
            self.update_room(registry);
            markers
        };
        self.changed.notify_all();
        markers.len()
    }

    /// Waits until the instance may start another call: fewer than `max_in_flight` attempts
    /// outstanding, or `stop` set.
    pub fn wait_for_room(&self, stop: &AtomicBool) {
        let mut registry = self.lock();
        if registry.outstanding < registry.max_in_flight {
            return;
        }
        // Full: wait until an eighth of it is free again, so that a full instance runs its
        // next calls as a batch instead of being woken for every settlement.
        while registry.outstanding >= registry.resume_below() && !stop.load(Ordering::Acquire) {
            registry.room_waiters += 1;
            registry = self
                .changed
                .wait(registry)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            registry.room_waiters -= 1;
        }
    }

    /// Waits until no attempt of `generation` is outstanding (a draining generation).
    pub fn wait_drained(&self, generation: u32) {
        let mut registry = self.lock();
        while registry.by_generation.contains_key(&generation) {
            registry.drain_waiters += 1;
            registry = self
                .changed
                .wait(registry)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            registry.drain_waiters -= 1;
        }
    }

    /// Wakes every waiter (an actor told to stop).
    pub fn wake(&self) {
        // Under the lock: a waiter is either before its check (and sees the stop) or waiting.
        let _registry = self.lock();
        self.changed.notify_all();
    }
}

/// What one actor generation needs to hand out tokens.
pub struct Mint {
    pub instance: InstanceId,
    pub generation: u32,
    pub deferrals: Arc<Deferrals>,
    /// Where a token's end goes (the actor events, to the dispatcher).
    pub report: Box<dyn Fn(TokenEnd) + Send + Sync>,
    pub services: Arc<InstanceServices>,
    pub clock: Arc<dyn Clock>,
    pub markers: MarkerSource,
    /// Publish-to-settle times of its tokens' acks and rejections.
    pub latency: crate::metrics::SettleRecorder,
}

impl std::fmt::Debug for Mint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mint")
            .field("instance", &self.instance)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Mint {
    /// A new token for `attempt` of `message`: registered outstanding, marked in flight.
    /// The [`Issued`] stays with the host (the actor gives it the children `handle` staged).
    pub fn mint(
        self: &Arc<Self>,
        message: &Arc<StoredMessage>,
        attempt: u32,
    ) -> (RawToken, Issued) {
        let marker = (self.markers)();
        if let Some(marker) = &marker {
            marker.calling(message.id, attempt);
        }
        self.deferrals.open(
            message.id,
            attempt,
            self.generation,
            self.clock.now(),
            marker,
        );
        let ctx = Arc::new(TokenCtx {
            mint: self.clone(),
            message: message.clone(),
            attempt,
            children: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        });
        (hosting::token_handle(ctx.clone()), Issued(ctx))
    }
}

/// The host's own reference to a token it issued.
pub struct Issued(Arc<TokenCtx>);

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("message", &self.0.message.id)
            .field("attempt", &self.0.attempt)
            .finish()
    }
}

impl Issued {
    /// Children `handle` published (staged) before it returned Defer join the token's, to
    /// commit with its Ack. Handed back when the token was already settled.
    ///
    /// # Errors
    /// The children, when the token was settled before `handle` returned.
    pub fn adopt(&self, children: Vec<Child>) -> Result<(), Vec<Child>> {
        if children.is_empty() {
            return Ok(());
        }
        let mut held = self
            .0
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.0.done.load(Ordering::Acquire) {
            return Err(children);
        }
        held.extend(children);
        Ok(())
    }
}

/// The host side of one token.
struct TokenCtx {
    mint: Arc<Mint>,
    message: Arc<StoredMessage>,
    attempt: u32,
    /// Published through the token; committed with an Ack.
    children: Mutex<Vec<Child>>,
    /// Settled through this token (its release is then no failure).
    done: AtomicBool,
}

impl TokenCtx {
    fn stale(&self) -> SettleError {
        SettleError {
            kind: SettleErrorKind::Stale,
            message: format!(
                "attempt {} of message {} already ended (settled, its lease expired, or a stop \
                 released it)",
                self.attempt, self.message.id
            ),
        }
    }

    fn send(&self, end: TokenEnd) {
        (self.mint.report)(end);
    }
}

impl Completion for TokenCtx {
    fn settle(&self, outcome: Result<Outcome, CallError>) -> Result<(), SettleError> {
        if self.done.load(Ordering::Acquire) {
            return Err(self.stale());
        }
        self.mint
            .deferrals
            .claim(self.message.id, self.attempt)
            .map_err(|Ended| self.stale())?;
        if matches!(outcome, Ok(Outcome::Ack | Outcome::Reject { .. })) {
            self.mint
                .latency
                .settled(self.message.publish_time, self.mint.clock.as_ref());
        }
        let children = {
            // `done` is set under the children's lock: a child is either adopted before the
            // settlement takes them, or handed back.
            let mut held = self
                .children
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.done.store(true, Ordering::Release);
            std::mem::take(&mut *held)
        };
        self.send(TokenEnd::Settled {
            message: self.message.id,
            attempt: self.attempt,
            outcome,
            children,
        });
        Ok(())
    }

    fn keep_alive(&self) -> Result<(), SettleError> {
        self.mint
            .deferrals
            .keep_alive(self.message.id, self.attempt, self.mint.clock.now())
            .map_err(|Ended| self.stale())
    }

    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        let child = self
            .mint
            .services
            .child(self.message.hops() + 1, topic, payload, headers)?;
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
        // Its id is assigned when the settlement commits it.
        Ok(MessageId(0))
    }

    fn release(&self) {
        if self.done.load(Ordering::Acquire) {
            return;
        }
        if self
            .mint
            .deferrals
            .claim(self.message.id, self.attempt)
            .is_ok()
        {
            self.send(TokenEnd::Dropped {
                message: self.message.id,
                attempt: self.attempt,
            });
        }
    }
}

/// Whether a delivery's token was taken, and whether it still may be.
#[derive(Debug, Default)]
pub struct TokenSlot(AtomicU8);

const OPEN: u8 = 0;
const TAKEN: u8 = 1;
const CLOSED: u8 = 2;

impl TokenSlot {
    /// Takes the token: once, while the call runs.
    pub fn take(&self) -> bool {
        self.0
            .compare_exchange(OPEN, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The call returned: no token may be taken from now on. Returns whether one was.
    pub fn close(&self) -> bool {
        self.0.swap(CLOSED, Ordering::AcqRel) == TAKEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_claim_wins_and_expiry_respects_keep_alive() {
        let d = Deferrals::new(2, Duration::from_millis(100));
        d.open(1, 1, 7, Timestamp(1_000), None);
        d.open(2, 1, 7, Timestamp(1_000), None);
        assert_eq!(d.outstanding(), 2);
        assert_eq!(d.claim(1, 1), Ok(()));
        assert_eq!(d.claim(1, 1), Err(Ended), "a second settle is refused");
        assert_eq!(
            d.expire(1, 1, Timestamp(5_000)),
            Expiry::Settled,
            "settled, not yet applied"
        );
        d.finish(&[(1, 1)]);
        assert_eq!(d.expire(1, 1, Timestamp(5_000)), Expiry::NotDeferred);
        // Keep-alive at 1,050 moves the lease to 1,150.
        assert_eq!(d.keep_alive(2, 1, Timestamp(1_050)), Ok(()));
        assert_eq!(
            d.expire(2, 1, Timestamp(1_100)),
            Expiry::Extended(Timestamp(1_150))
        );
        assert_eq!(d.expire(2, 1, Timestamp(1_150)), Expiry::Expired);
        assert_eq!(d.claim(2, 1), Err(Ended), "a late settle is refused");
        assert_eq!(d.keep_alive(2, 1, Timestamp(1_200)), Err(Ended));
        assert_eq!(d.outstanding(), 0);
        // Another attempt of the same message is another token.
        d.open(2, 2, 8, Timestamp(2_000), None);
        assert_eq!(d.claim(2, 1), Err(Ended));
        assert_eq!(d.release_all(), 1);
        assert_eq!(d.claim(2, 2), Err(Ended), "released by a stop");
    }

    #[test]
    fn a_draining_generation_waits_for_its_own_tokens_only() {
        let d = Deferrals::new(8, Duration::from_secs(30));
        d.open(1, 1, 1, Timestamp(0), None);
        d.open(2, 1, 2, Timestamp(0), None);
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || d.wait_drained(1))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        d.claim(1, 1).unwrap();
        waiter.join().unwrap();
        assert_eq!(d.outstanding(), 1, "generation 2's token is untouched");
    }

    #[test]
    fn room_is_max_in_flight_minus_outstanding() {
        let d = Deferrals::new(1, Duration::from_secs(30));
        let stop = AtomicBool::new(false);
        d.wait_for_room(&stop); // none outstanding: returns at once
        d.open(1, 1, 1, Timestamp(0), None);
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || d.wait_for_room(&AtomicBool::new(false)))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "full: waits");
        d.configure(2, Duration::from_secs(30));
        waiter.join().unwrap();
    }

    #[test]
    fn a_token_slot_is_taken_once_and_only_while_open() {
        let slot = TokenSlot::default();
        assert!(slot.take());
        assert!(!slot.take());
        assert!(slot.close());
        let slot = TokenSlot::default();
        assert!(!slot.close());
        assert!(!slot.take(), "closed: handle returned");
    }
}
