//! The rules of one delivery — one message to one instance — as a pure state machine
//! (docs/design.md §7): the `deliveries` / `failures` / `defers` counters, backoff with jitter and
//! the plugin's override, dead-lettering when failures reach `max_attempts`, leases, stale
//! settlements refused, a graceful stop's release, a crash's charge, replay.
//!
//! Nothing here reads a clock or a random source: the time and the jitter draw are arguments,
//! so every rule is tested exactly. The ledger stores a `Delivery`; the dispatcher drives it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{clock::Timestamp, config};

/// How many attempts a delivery remembers in full; older ones are counted.
pub const HISTORY_LIMIT: usize = 64;

/// The settings that govern a delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub max_attempts: u32,
    pub ack_timeout: Duration,
    pub backoff: config::Backoff,
}

impl From<&config::Settings> for Rules {
    fn from(settings: &config::Settings) -> Self {
        Self {
            max_attempts: settings.max_attempts,
            ack_timeout: settings.ack_timeout,
            backoff: settings.backoff.clone(),
        }
    }
}

/// The delay before the retry that follows failure number `failures` (1-based):
/// `min(max, initial · multiplier^(failures-1))`, then ± `jitter` of it, where `unit` is a
/// uniform draw from [0, 1) (0.5 means no jitter).
pub fn backoff(backoff: &config::Backoff, failures: u32, unit: f64) -> Duration {
    if backoff.initial.is_zero() {
        // 0 · multiplier^n is 0, even once the power overflows (0 · ∞ would be NaN).
        return Duration::ZERO;
    }
    let exponent = i32::try_from(failures.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = backoff.initial.as_secs_f64() * backoff.multiplier.powi(exponent);
    let capped = base.min(backoff.max.as_secs_f64());
    let factor = 1.0 + backoff.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    Duration::try_from_secs_f64((capped * factor).max(0.0)).unwrap_or(backoff.max)
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// The plugin asked for a retry, optionally after a delay of its own.
    Retry {
        reason: String,
        #[serde(skip)]
        after: Option<Duration>,
    },
    /// Plugin code panicked.
    Panic { message: String },
    /// The lease expired before the attempt was settled.
    Timeout,
    /// The process died while the attempt was in flight.
    Crash,
    /// The plugin dropped the attempt's token without settling it.
    Dropped,
    /// The plugin returned something the daemon could not use.
    Error { message: String },
}

impl Failure {
    /// The reason recorded for operators.
    pub fn reason(&self) -> String {
        match self {
            Self::Retry { reason, .. } => format!("retry: {reason}"),
            Self::Panic { message } => format!("panic: {message}"),
            Self::Timeout => "timeout".to_owned(),
            Self::Crash => "crash".to_owned(),
            Self::Dropped => "dropped".to_owned(),
            Self::Error { message } => format!("error: {message}"),
        }
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Waiting to be handed to the instance, not before `due`.
    Ready { due: u64 },
    /// Plugin code was called for `attempt`; the lease ends at `lease_until`.
    InFlight { attempt: u32, lease_until: u64 },
    /// Settled: the instance acked it.
    Acked,
    /// Settled: it failed `max_attempts` times or was rejected.
    DeadLettered { reason: String },
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AttemptResult {
    Acked,
    /// A failure counted against `max_attempts`.
    Failed {
        reason: String,
    },
    /// A failure not counted (while the instance's circuit was tripping).
    Excused {
        reason: String,
    },
    Rejected {
        reason: String,
    },
    /// Handed back by a graceful stop: no failure.
    Released,
}

/// One attempt in a delivery's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub started: u64,
    pub ended: Option<u64>,
    pub result: Option<AttemptResult>,
}

/// What a settlement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Acked,
    /// Back to ready, due at this time.
    Retry {
        due: Timestamp,
    },
    DeadLettered {
        reason: String,
    },
}

/// A settlement for an attempt that is not the one in flight: refused (it is logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stale settlement for attempt {attempt} (in flight: {})", in_flight.map_or_else(|| "none".to_owned(), |a| a.to_string()))]
pub struct Stale {
    pub attempt: u32,
    pub in_flight: Option<u32>,
}

/// One message's delivery to one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Times plugin code was called for it.
    pub deliveries: u32,
    /// Failures counted against `max_attempts`.
    pub failures: u32,
    /// Times it was deferred (deferred acks).
    pub defers: u32,
    pub state: State,
    pub first_failure: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_reason: Option<String>,
    /// The attempt in flight, if any (kept inline: most attempts ack, and an acked delivery
    /// needs no history, so the common path allocates nothing).
    pub current: Option<Attempt>,
    /// The latest attempts that ended other than in an ack, oldest first (at most
    /// [`HISTORY_LIMIT`]).
    pub history: Vec<Attempt>,
    /// Attempts dropped from the front of `history`.
    pub history_dropped: u32,
}

impl Delivery {
    /// A new delivery, ready now.
    pub fn new(now: Timestamp) -> Self {
        Self {
            deliveries: 0,
            failures: 0,
            defers: 0,
            state: State::Ready { due: now.0 },
            first_failure: None,
            last_failure: None,
            last_reason: None,
            current: None,
            history: Vec::new(),
            history_dropped: 0,
        }
    }

    /// Whether it may be handed to the instance at `now`.
    pub fn is_due(&self, now: Timestamp) -> bool {
        matches!(self.state, State::Ready { due } if due <= now.0)
    }

    /// Whether it reached a terminal state.
    pub fn is_settled(&self) -> bool {
        matches!(self.state, State::Acked | State::DeadLettered { .. })
    }

    /// The attempt in flight, if any.
    pub fn in_flight(&self) -> Option<u32> {
        match self.state {
            State::InFlight { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    /// Starts the next attempt (recorded *before* plugin code is called). Returns its
    /// 1-based number, or `None` if it is not due.
    pub fn begin(&mut self, rules: &Rules, now: Timestamp) -> Option<u32> {
        if !self.is_due(now) {
            return None;
        }
        self.deliveries += 1;
        let attempt = self.deliveries;
        self.state = State::InFlight {
            attempt,
            lease_until: now.after(rules.ack_timeout).0,
        };
        self.current = Some(Attempt {
            number: attempt,
            started: now.0,
            ended: None,
            result: None,
        });
        Some(attempt)
    }

    fn check(&self, attempt: u32) -> Result<(), Stale> {
        match self.in_flight() {
            Some(current) if current == attempt => Ok(()),
            in_flight => Err(Stale { attempt, in_flight }),
        }
    }

    /// Ends the attempt in flight; all but acks go into the history.
    fn end(&mut self, now: Timestamp, result: AttemptResult) {
        let Some(mut attempt) = self.current.take() else {
            return;
        };
        if result == AttemptResult::Acked {
            return;
        }
        attempt.ended = Some(now.0);
        attempt.result = Some(result);
        if self.history.len() == HISTORY_LIMIT {
            self.history.remove(0);
            self.history_dropped += 1;
        }
        self.history.push(attempt);
    }

    /// The instance acked `attempt`.
    ///
    /// # Errors
    /// [`Stale`] if `attempt` is not the one in flight.
    pub fn ack(&mut self, attempt: u32, now: Timestamp) -> Result<Transition, Stale> {
        self.check(attempt)?;
        self.end(now, AttemptResult::Acked);
        self.state = State::Acked;
        Ok(Transition::Acked)
    }

    /// The instance rejected `attempt`: dead-letter now.
    ///
    /// # Errors
    /// [`Stale`] if `attempt` is not the one in flight.
    pub fn reject(
        &mut self,
        attempt: u32,
        reason: &str,
        now: Timestamp,
    ) -> Result<Transition, Stale> {
        self.check(attempt)?;
        let reason = format!("rejected: {reason}");
        self.end(
            now,
            AttemptResult::Rejected {
                reason: reason.clone(),
            },
        );
        self.note_failure(now, &reason);
        self.state = State::DeadLettered {
            reason: reason.clone(),
        };
        Ok(Transition::DeadLettered { reason })
    }

    /// `attempt` failed. A charged failure counts against `max_attempts` and waits the
    /// backoff (or the plugin's delay); an excused one (a tripping circuit) counts nothing
    /// and is due at once. `unit` is the jitter draw.
    ///
    /// # Errors
    /// [`Stale`] if `attempt` is not the one in flight.
    pub fn fail(
        &mut self,
        attempt: u32,
        failure: &Failure,
        charged: bool,
        rules: &Rules,
        now: Timestamp,
        unit: f64,
    ) -> Result<Transition, Stale> {
        self.check(attempt)?;
        Ok(self.apply_failure(failure, charged, rules, now, unit))
    }

    fn note_failure(&mut self, now: Timestamp, reason: &str) {
        self.first_failure.get_or_insert(now.0);
        self.last_failure = Some(now.0);
        self.last_reason = Some(reason.to_owned());
    }

    fn apply_failure(
        &mut self,
        failure: &Failure,
        charged: bool,
        rules: &Rules,
        now: Timestamp,
        unit: f64,
    ) -> Transition {
        let reason = failure.reason();
        self.note_failure(now, &reason);
        if !charged {
            self.end(
                now,
                AttemptResult::Excused {
                    reason: reason.clone(),
                },
            );
            self.state = State::Ready { due: now.0 };
            return Transition::Retry { due: now };
        }
        self.end(
            now,
            AttemptResult::Failed {
                reason: reason.clone(),
            },
        );
        self.failures += 1;
        if self.failures >= rules.max_attempts {
            self.state = State::DeadLettered {
                reason: reason.clone(),
            };
            return Transition::DeadLettered { reason };
        }
        let delay = match failure {
            Failure::Retry {
                after: Some(after), ..
            } => *after,
            _ => backoff(&rules.backoff, self.failures, unit),
        };
        let due = now.after(delay);
        self.state = State::Ready { due: due.0 };
        Transition::Retry { due }
    }

    /// If the lease of the attempt in flight has passed at `now`: a `timeout` failure.
    pub fn expire(&mut self, rules: &Rules, now: Timestamp, unit: f64) -> Option<Transition> {
        match self.state {
            State::InFlight { lease_until, .. } if lease_until <= now.0 => {
                Some(self.apply_failure(&Failure::Timeout, true, rules, now, unit))
            }
            _ => None,
        }
    }

    /// Extends the lease of `attempt` (`keep_alive` of a deferred attempt).
    ///
    /// # Errors
    /// [`Stale`] if `attempt` is not the one in flight.
    pub fn extend(&mut self, attempt: u32, rules: &Rules, now: Timestamp) -> Result<(), Stale> {
        self.check(attempt)?;
        self.state = State::InFlight {
            attempt,
            lease_until: now.after(rules.ack_timeout).0,
        };
        Ok(())
    }

    /// A graceful stop hands back the attempt in flight: ready again at once, no failure.
    pub fn release(&mut self, now: Timestamp) -> bool {
        if self.in_flight().is_none() {
            return false;
        }
        self.end(now, AttemptResult::Released);
        self.state = State::Ready { due: now.0 };
        true
    }

    /// Recovery: the ledger found attempt `attempt` marked in flight by a previous run (it
    /// started at `started`), later than any attempt this delivery recorded an end for.
    /// Returns whether it was such a later attempt.
    pub fn marked(&mut self, attempt: u32, started: Timestamp) -> bool {
        if attempt <= self.deliveries || self.is_settled() {
            return false;
        }
        self.deliveries = attempt;
        self.state = State::InFlight {
            attempt,
            lease_until: started.0,
        };
        self.current = Some(Attempt {
            number: attempt,
            started: started.0,
            ended: None,
            result: None,
        });
        true
    }

    /// Recovery after an unclean exit: the attempt still in flight is a `crash` failure.
    pub fn crashed(&mut self, rules: &Rules, now: Timestamp, unit: f64) -> Option<Transition> {
        self.in_flight()?;
        Some(self.apply_failure(&Failure::Crash, true, rules, now, unit))
    }

    /// The instance's circuit tripped: `count` earlier charged failures are excused. A
    /// delivery that already settled stays settled.
    pub fn excuse(&mut self, count: u32) {
        if !self.is_settled() {
            self.failures = self.failures.saturating_sub(count);
        }
    }

    /// An operator forgets the backlog this delivery waits in: it becomes a dead letter
    /// (reason `forgotten`), counting no failure.
    pub fn forget(&mut self, now: Timestamp) {
        self.abandon("forgotten", now);
    }

    /// It waited longer than its instance's `max_age`: it becomes a dead letter (reason
    /// `expired`), counting no failure.
    pub fn outlived(&mut self, now: Timestamp) {
        self.abandon("expired", now);
    }

    /// Ends a delivery no plugin code settled, as a dead letter with `reason`.
    fn abandon(&mut self, reason: &str, now: Timestamp) {
        if self.is_settled() {
            return;
        }
        self.end(
            now,
            AttemptResult::Failed {
                reason: reason.to_owned(),
            },
        );
        self.last_reason = Some(reason.to_owned());
        self.state = State::DeadLettered {
            reason: reason.to_owned(),
        };
    }

    /// Its message cannot be read back from the ledger (corrupt or missing): it becomes a
    /// dead letter at once with the reason, counting no failure (no plugin code ran).
    pub fn unreadable(&mut self, reason: &str, now: Timestamp) {
        if self.is_settled() {
            return;
        }
        let reason = format!("unreadable: {reason}");
        self.note_failure(now, &reason);
        self.state = State::DeadLettered { reason };
    }

    /// An operator replays a dead letter: failures reset, history kept, ready now.
    pub fn replay(&mut self, now: Timestamp) -> bool {
        if !matches!(self.state, State::DeadLettered { .. }) {
            return false;
        }
        self.failures = 0;
        self.state = State::Ready { due: now.0 };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp(1_000_000);

    fn rules(max_attempts: u32) -> Rules {
        Rules {
            max_attempts,
            ack_timeout: Duration::from_secs(30),
            backoff: config::Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.2,
            },
        }
    }

    fn retry(reason: &str) -> Failure {
        Failure::Retry {
            reason: reason.to_owned(),
            after: None,
        }
    }

    #[test]
    fn backoff_doubles_from_initial_and_stops_at_max() {
        let b = rules(100).backoff;
        let sequence: Vec<u128> = (1..=12).map(|n| backoff(&b, n, 0.5).as_millis()).collect();
        assert_eq!(
            sequence,
            [
                200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 60_000, 60_000, 60_000
            ]
        );
        assert_eq!(
            backoff(&b, u32::MAX, 0.5),
            Duration::from_secs(60),
            "no overflow"
        );
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let b = rules(100).backoff;
        assert_eq!(backoff(&b, 1, 0.0), Duration::from_millis(160));
        assert_eq!(backoff(&b, 1, 1.0), Duration::from_millis(240));
        for i in 0..1000 {
            let unit = f64::from(i) / 1000.0;
            let d = backoff(&b, 3, unit).as_secs_f64();
            assert!((0.64..=0.96).contains(&d), "{d} for {unit}");
        }
        let flat = config::Backoff { jitter: 0.0, ..b };
        assert_eq!(backoff(&flat, 2, 0.99), Duration::from_millis(400));
    }

    #[test]
    fn an_ack_settles_and_counts_one_delivery() {
        let mut d = Delivery::new(T0);
        assert_eq!(d.begin(&rules(5), T0), Some(1));
        assert_eq!(
            d.ack(1, T0 + Duration::from_millis(3)),
            Ok(Transition::Acked)
        );
        assert_eq!(
            (d.deliveries, d.failures, d.state.clone()),
            (1, 0, State::Acked)
        );
        assert!(
            d.history.is_empty() && d.current.is_none(),
            "an ack leaves no history"
        );
        assert_eq!(d.begin(&rules(5), T0), None, "settled stays settled");
    }

    #[test]
    fn failures_retry_with_backoff_until_max_attempts_then_dead_letter() {
        let r = rules(3);
        let mut d = Delivery::new(T0);
        let mut now = T0;
        for (attempt, expected_delay) in [(1, 200), (2, 400)] {
            assert_eq!(d.begin(&r, now), Some(attempt));
            let t = d
                .fail(attempt, &retry("db down"), true, &r, now, 0.5)
                .unwrap();
            let due = now + Duration::from_millis(expected_delay);
            assert_eq!(t, Transition::Retry { due });
            assert!(!d.is_due(Timestamp(due.0 - 1)), "not before its backoff");
            now = due;
        }
        // The off-by-one: the third failure with max_attempts = 3 dead-letters.
        assert_eq!(d.begin(&r, now), Some(3));
        let t = d.fail(3, &retry("db down"), true, &r, now, 0.5).unwrap();
        assert_eq!(
            t,
            Transition::DeadLettered {
                reason: "retry: db down".into()
            }
        );
        assert_eq!((d.deliveries, d.failures), (3, 3));
        assert_eq!(d.first_failure, Some(T0.0));
        assert_eq!(d.last_failure, Some(now.0));
        assert_eq!(d.history.len(), 3);
    }

    #[test]
    fn max_attempts_one_dead_letters_on_the_first_failure() {
        let r = rules(1);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        assert!(matches!(
            d.fail(1, &Failure::Timeout, true, &r, T0, 0.5),
            Ok(Transition::DeadLettered { .. })
        ));
    }

    #[test]
    fn a_plugin_given_delay_overrides_the_backoff() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        let failure = Failure::Retry {
            reason: "rate limited".into(),
            after: Some(Duration::from_secs(7)),
        };
        assert_eq!(
            d.fail(1, &failure, true, &r, T0, 0.0),
            Ok(Transition::Retry {
                due: T0 + Duration::from_secs(7)
            })
        );
    }

    #[test]
    fn a_reject_dead_letters_at_once() {
        let mut d = Delivery::new(T0);
        d.begin(&rules(5), T0);
        assert_eq!(
            d.reject(1, "malformed order", T0),
            Ok(Transition::DeadLettered {
                reason: "rejected: malformed order".into()
            })
        );
        assert_eq!(d.failures, 0, "a reject is not a counted failure");
    }

    #[test]
    fn a_lease_expires_into_a_timeout_failure() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        assert_eq!(d.expire(&r, T0 + Duration::from_millis(29_999), 0.5), None);
        let at = T0 + Duration::from_secs(30);
        assert_eq!(
            d.expire(&r, at, 0.5),
            Some(Transition::Retry {
                due: at + Duration::from_millis(200)
            })
        );
        assert_eq!(d.last_reason.as_deref(), Some("timeout"));
        assert_eq!(d.failures, 1);
    }

    #[test]
    fn keep_alive_extends_the_lease() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        d.extend(1, &r, T0 + Duration::from_secs(20)).unwrap();
        assert_eq!(d.expire(&r, T0 + Duration::from_secs(40), 0.5), None);
        assert!(d.expire(&r, T0 + Duration::from_secs(50), 0.5).is_some());
    }

    #[test]
    fn a_stale_settlement_is_refused_and_changes_nothing() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        d.expire(&r, T0 + Duration::from_secs(30), 0.5);
        let before = d.clone();
        assert_eq!(
            d.ack(1, T0 + Duration::from_secs(31)),
            Err(Stale {
                attempt: 1,
                in_flight: None
            })
        );
        d.begin(&r, T0 + Duration::from_secs(31));
        assert_eq!(
            d.fail(1, &retry("late"), true, &r, T0, 0.5),
            Err(Stale {
                attempt: 1,
                in_flight: Some(2)
            })
        );
        assert_eq!(before.failures, d.failures);
    }

    #[test]
    fn an_excused_failure_counts_nothing_and_is_due_at_once() {
        let r = rules(2);
        let mut d = Delivery::new(T0);
        for attempt in 1..=5 {
            d.begin(&r, T0);
            assert_eq!(
                d.fail(attempt, &retry("circuit tripping"), false, &r, T0, 0.5),
                Ok(Transition::Retry { due: T0 })
            );
        }
        assert_eq!((d.deliveries, d.failures), (5, 0));
        assert!(matches!(
            d.history[0].result,
            Some(AttemptResult::Excused { .. })
        ));
    }

    #[test]
    fn a_tripping_circuit_excuses_earlier_failures_of_unsettled_deliveries() {
        let r = rules(3);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        d.fail(1, &retry("down"), true, &r, T0, 0.5).unwrap();
        d.excuse(1);
        assert_eq!(d.failures, 0);
        let mut dead = Delivery::new(T0);
        dead.begin(&rules(1), T0);
        dead.fail(1, &retry("down"), true, &rules(1), T0, 0.5)
            .unwrap();
        dead.excuse(1);
        assert_eq!((dead.failures, dead.is_settled()), (1, true));
    }

    #[test]
    fn a_graceful_release_is_no_failure_and_a_crash_is_one() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        assert!(d.release(T0));
        assert_eq!((d.failures, d.is_due(T0)), (0, true));
        assert_eq!(d.history[0].result, Some(AttemptResult::Released));
        assert_eq!(d.begin(&r, T0), Some(2), "the next attempt number goes on");
        assert!(matches!(
            d.crashed(&r, T0, 0.5),
            Some(Transition::Retry { .. })
        ));
        assert_eq!((d.failures, d.last_reason.as_deref()), (1, Some("crash")));
        assert_eq!(d.crashed(&r, T0, 0.5), None, "nothing in flight any more");
    }

    #[test]
    fn a_marked_attempt_later_than_the_recorded_ones_is_charged_as_a_crash() {
        let r = rules(5);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        d.fail(1, &retry("busy"), true, &r, T0, 0.5).unwrap();
        assert!(!d.marked(1, T0), "attempt 1 has its end recorded");
        assert!(
            d.marked(3, T0),
            "attempts 2 and 3 started; 3 was still running"
        );
        assert_eq!(d.in_flight(), Some(3));
        let due = T0.after(backoff(&r.backoff, 2, 0.5));
        assert_eq!(
            d.crashed(&r, T0, 0.5),
            Some(Transition::Retry { due }),
            "the crash is the second failure"
        );
        assert_eq!((d.deliveries, d.failures), (3, 2));
        assert_eq!(d.last_reason.as_deref(), Some("crash"));
        assert!(!d.marked(3, T0), "charged once");
    }

    #[test]
    fn replay_resets_failures_and_keeps_the_history() {
        let r = rules(1);
        let mut d = Delivery::new(T0);
        d.begin(&r, T0);
        d.fail(
            1,
            &Failure::Panic {
                message: "boom".into(),
            },
            true,
            &r,
            T0,
            0.5,
        )
        .unwrap();
        assert!(d.replay(T0));
        assert_eq!((d.failures, d.is_due(T0), d.history.len()), (0, true, 1));
        assert_eq!(d.begin(&r, T0), Some(2));
        assert!(!d.replay(T0), "only dead letters are replayed");
    }

    #[test]
    fn the_history_keeps_the_latest_attempts_and_counts_the_rest() {
        let r = rules(u32::MAX);
        let mut d = Delivery::new(T0);
        for attempt in 1..=(HISTORY_LIMIT as u32 + 10) {
            d.begin(&r, T0);
            d.fail(attempt, &retry("again"), false, &r, T0, 0.5)
                .unwrap();
        }
        assert_eq!(d.history.len(), HISTORY_LIMIT);
        assert_eq!(d.history_dropped, 10);
        assert_eq!(d.history[0].number, 11);
    }
}
