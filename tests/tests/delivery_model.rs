//! Property tests of the delivery state machine (`plugind::delivery`) against a small model of
//! the rules in docs/design.md §7, and of the circuit breaker (`plugind::circuit`) driven the way
//! `dispatch.rs` drives it: the breaker's verdict decides whether a failure is `charged`, and the
//! earlier failures it excuses when it trips get `excuse(1)` on the deliveries still live.
//!
//! The model keeps its own counters, state, history and timestamps; after every step it must
//! equal the real `Delivery` field by field. Backoff is checked twice: the due time must be
//! exactly `now + delivery::backoff(…)` for the same jitter draw, and that function must agree
//! with the formula of §7 computed independently here (to within the float → millisecond
//! rounding).

use std::{collections::VecDeque, time::Duration};

use plugind::{
    circuit::{self, Breaker},
    clock::Timestamp,
    config,
    delivery::{
        self, Attempt, AttemptResult, Delivery, Failure, HISTORY_LIMIT, Rules, Stale, State,
        Transition,
    },
};
use proptest::{prelude::*, test_runner::TestCaseError};

const T0: u64 = 1_700_000_000_000;
const CASES: u32 = 512;

/// 512 cases per property; a failure is shrunk and printed, not written into the source tree
/// (the known discrepancies are pinned as plain tests at the end of this file).
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// The model of one delivery.
// ---------------------------------------------------------------------------------------------

/// What docs/design.md §7 says one delivery is, written without looking at how `Delivery` does it
/// (the plain data types `State`, `Attempt` and `AttemptResult` are shared so the two compare).
#[derive(Debug, Clone)]
struct Model {
    deliveries: u32,
    failures: u32,
    defers: u32,
    state: State,
    first_failure: Option<u64>,
    last_failure: Option<u64>,
    last_reason: Option<String>,
    current: Option<Attempt>,
    history: VecDeque<Attempt>,
    history_dropped: u32,
}

/// A failure as the model sees it: its recorded reason and the plugin's own delay.
struct Failed {
    reason: String,
    after: Option<Duration>,
}

impl Model {
    fn new(now: u64) -> Self {
        Self {
            deliveries: 0,
            failures: 0,
            defers: 0,
            state: State::Ready { due: now },
            first_failure: None,
            last_failure: None,
            last_reason: None,
            current: None,
            history: VecDeque::new(),
            history_dropped: 0,
        }
    }

    fn in_flight(&self) -> Option<u32> {
        match self.state {
            State::InFlight { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    fn settled(&self) -> bool {
        matches!(self.state, State::Acked | State::DeadLettered { .. })
    }

    fn is_due(&self, now: u64) -> bool {
        matches!(self.state, State::Ready { due } if due <= now)
    }

    fn stale(&self, attempt: u32) -> Result<(), Stale> {
        match self.in_flight() {
            Some(a) if a == attempt => Ok(()),
            in_flight => Err(Stale { attempt, in_flight }),
        }
    }

    fn begin(&mut self, rules: &Rules, now: u64) -> Option<u32> {
        if !self.is_due(now) {
            return None;
        }
        self.deliveries += 1;
        self.state = State::InFlight {
            attempt: self.deliveries,
            lease_until: now.saturating_add(millis(rules.ack_timeout)),
        };
        self.current = Some(Attempt {
            number: self.deliveries,
            started: now,
            ended: None,
            result: None,
        });
        Some(self.deliveries)
    }

    /// The attempt in flight ends: an ack leaves no trace, anything else joins the history.
    fn end(&mut self, now: u64, result: Option<AttemptResult>) {
        let Some(mut attempt) = self.current.take() else {
            return;
        };
        let Some(result) = result else { return };
        attempt.ended = Some(now);
        attempt.result = Some(result);
        self.history.push_back(attempt);
        if self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
            self.history_dropped += 1;
        }
    }

    fn note(&mut self, now: u64, reason: &str) {
        if self.first_failure.is_none() {
            self.first_failure = Some(now);
        }
        self.last_failure = Some(now);
        self.last_reason = Some(reason.to_owned());
    }

    fn ack(&mut self, attempt: u32, now: u64) -> Result<Transition, Stale> {
        self.stale(attempt)?;
        self.end(now, None);
        self.state = State::Acked;
        Ok(Transition::Acked)
    }

    fn reject(&mut self, attempt: u32, reason: &str, now: u64) -> Result<Transition, Stale> {
        self.stale(attempt)?;
        let reason = format!("rejected: {reason}");
        self.end(
            now,
            Some(AttemptResult::Rejected {
                reason: reason.clone(),
            }),
        );
        self.note(now, &reason);
        self.state = State::DeadLettered {
            reason: reason.clone(),
        };
        Ok(Transition::DeadLettered { reason })
    }

    /// The attempt in flight failed (the caller checked it is in flight).
    fn failure(
        &mut self,
        rules: &Rules,
        failed: Failed,
        charged: bool,
        now: u64,
        unit: f64,
    ) -> Result<Transition, TestCaseError> {
        let Failed { reason, after } = failed;
        self.note(now, &reason);
        if !charged {
            // Excused: counts nothing, due at once.
            self.end(now, Some(AttemptResult::Excused { reason }));
            self.state = State::Ready { due: now };
            return Ok(Transition::Retry {
                due: Timestamp(now),
            });
        }
        self.end(
            now,
            Some(AttemptResult::Failed {
                reason: reason.clone(),
            }),
        );
        prop_assert!(self.failures < rules.max_attempts, "model: live at max");
        self.failures += 1;
        if self.failures == rules.max_attempts {
            self.state = State::DeadLettered {
                reason: reason.clone(),
            };
            return Ok(Transition::DeadLettered { reason });
        }
        let delay = match after {
            Some(after) => millis(after),
            None => {
                let real = delivery::backoff(&rules.backoff, self.failures, unit);
                check_backoff(&rules.backoff, self.failures, unit, real)?;
                millis(real)
            }
        };
        let due = now.saturating_add(delay);
        self.state = State::Ready { due };
        Ok(Transition::Retry {
            due: Timestamp(due),
        })
    }

    fn extend(&mut self, attempt: u32, rules: &Rules, now: u64) -> Result<(), Stale> {
        self.stale(attempt)?;
        self.state = State::InFlight {
            attempt,
            lease_until: now.saturating_add(millis(rules.ack_timeout)),
        };
        Ok(())
    }

    fn release(&mut self, now: u64) -> bool {
        if self.in_flight().is_none() {
            return false;
        }
        self.end(now, Some(AttemptResult::Released));
        self.state = State::Ready { due: now };
        true
    }

    /// Recovery found `attempt` marked: only an attempt later than every one recorded counts.
    fn marked(&mut self, attempt: u32, started: u64) -> bool {
        if attempt <= self.deliveries || self.settled() {
            return false;
        }
        self.deliveries = attempt;
        self.state = State::InFlight {
            attempt,
            lease_until: started,
        };
        self.current = Some(Attempt {
            number: attempt,
            started,
            ended: None,
            result: None,
        });
        true
    }

    fn excuse(&mut self, count: u32) {
        if !self.settled() {
            self.failures = self.failures.saturating_sub(count);
        }
    }

    fn forget(&mut self, now: u64) {
        if self.settled() {
            return;
        }
        self.end(
            now,
            Some(AttemptResult::Failed {
                reason: "forgotten".into(),
            }),
        );
        self.last_reason = Some("forgotten".into());
        self.state = State::DeadLettered {
            reason: "forgotten".into(),
        };
    }

    fn replay(&mut self, now: u64) -> bool {
        if !matches!(self.state, State::DeadLettered { .. }) {
            return false;
        }
        self.failures = 0;
        self.state = State::Ready { due: now };
        true
    }
}

/// `delivery::backoff` against §7 computed here in milliseconds:
/// `min(max, initial · multiplier^(failures-1))`, scaled by `1 + jitter·(2·unit − 1)`. The
/// code works in f64 seconds and truncates to whole milliseconds; allow 1 µs of float error
/// around a millisecond boundary, nothing more.
fn check_backoff(
    b: &config::Backoff,
    failures: u32,
    unit: f64,
    real: Duration,
) -> Result<(), TestCaseError> {
    let max = b.max.as_secs_f64() * 1e3;
    let mut base = b.initial.as_secs_f64() * 1e3;
    for _ in 1..failures {
        if base >= max {
            break;
        }
        base *= b.multiplier;
    }
    let ideal = base.min(max) * (1.0 + b.jitter * (2.0 * unit - 1.0));
    let lo = (ideal - 1e-3).max(0.0).floor() as u128;
    let hi = (ideal + 1e-3).max(0.0).floor() as u128;
    prop_assert!(
        (lo..=hi).contains(&real.as_millis()),
        "backoff({b:?}, failures {failures}, unit {unit}) = {real:?}, §7 says {ideal} ms"
    );
    Ok(())
}

/// The real delivery equals the model in every observable field, and the invariants hold.
fn same(real: &Delivery, m: &Model, rules: &Rules, now: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(real.deliveries, m.deliveries, "deliveries");
    prop_assert_eq!(real.failures, m.failures, "failures");
    prop_assert_eq!(real.defers, m.defers, "defers");
    prop_assert_eq!(&real.state, &m.state, "state");
    prop_assert_eq!(real.first_failure, m.first_failure, "first_failure");
    prop_assert_eq!(real.last_failure, m.last_failure, "last_failure");
    prop_assert_eq!(&real.last_reason, &m.last_reason, "last_reason");
    prop_assert_eq!(&real.current, &m.current, "current");
    prop_assert!(real.history.iter().eq(m.history.iter()), "history");
    prop_assert_eq!(real.history_dropped, m.history_dropped, "history_dropped");
    prop_assert_eq!(real.in_flight(), m.in_flight());
    prop_assert_eq!(real.is_settled(), m.settled());
    for t in [now.saturating_sub(1), now, now + 1, u64::MAX] {
        prop_assert_eq!(real.is_due(Timestamp(t)), m.is_due(t), "is_due({})", t);
    }
    // Invariants that hold whatever the sequence.
    prop_assert!(real.failures <= rules.max_attempts);
    if !real.is_settled() {
        prop_assert!(real.failures < rules.max_attempts, "live at max_attempts");
    }
    prop_assert_eq!(real.current.is_some(), real.in_flight().is_some());
    if let (Some(current), Some(attempt)) = (&real.current, real.in_flight()) {
        prop_assert_eq!(current.number, attempt);
        prop_assert_eq!(attempt, real.deliveries);
    }
    prop_assert!(real.history.len() <= HISTORY_LIMIT);
    prop_assert!(real.history.windows(2).all(|w| w[0].number < w[1].number));
    prop_assert!(real.history.iter().all(|a| a.number <= real.deliveries));
    prop_assert!(real.first_failure <= real.last_failure);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Operations on one delivery.
// ---------------------------------------------------------------------------------------------

/// Which attempt a settlement names.
#[derive(Debug, Clone)]
enum Sel {
    /// The one in flight (else the latest).
    Current,
    /// `deliveries + offset`: stale unless it is the one in flight.
    Offset(i8),
}

#[derive(Debug, Clone)]
enum Kind {
    Retry {
        after: Option<Duration>,
    },
    Panic,
    Error,
    /// Passed to `fail`, as the dispatcher does for an expired lease.
    Timeout,
    Crash,
}

impl Kind {
    fn failure(&self) -> (Failure, Failed) {
        let (failure, reason, after) = match self {
            Kind::Retry { after } => (
                Failure::Retry {
                    reason: "db down".into(),
                    after: *after,
                },
                "retry: db down",
                *after,
            ),
            Kind::Panic => (
                Failure::Panic {
                    message: "boom".into(),
                },
                "panic: boom",
                None,
            ),
            Kind::Error => (
                Failure::Error {
                    message: "bad outcome".into(),
                },
                "error: bad outcome",
                None,
            ),
            Kind::Timeout => (Failure::Timeout, "timeout", None),
            Kind::Crash => (Failure::Crash, "crash", None),
        };
        (
            failure,
            Failed {
                reason: reason.into(),
                after,
            },
        )
    }
}

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    /// To the due time (± 1 ms) if ready.
    ToDue(i8),
    /// To the lease's end (± 1 ms) if in flight.
    ToLease(i8),
    Begin,
    Ack(Sel),
    Reject(Sel),
    Fail {
        sel: Sel,
        kind: Kind,
        charged: bool,
        unit: f64,
    },
    /// `expire` (after moving to the lease's end if `to_lease`).
    Expire {
        to_lease: bool,
        unit: f64,
    },
    Extend(Sel),
    /// A graceful stop.
    Release,
    /// Recovery after an unclean exit: the marker names `deliveries + ahead`; if `marked`
    /// takes it, `crashed` charges it.
    Recover {
        ahead: u32,
        unit: f64,
    },
    Crashed(f64),
    Excuse(u32),
    Replay,
    Forget,
    /// `n` times: to due, begin, then an excused failure or a release — enough attempts to
    /// overflow the history within one sequence.
    Burst {
        n: u8,
        release: bool,
    },
}

fn arb_duration_ms(max: u64) -> impl Strategy<Value = Duration> {
    (0..=max).prop_map(Duration::from_millis)
}

fn arb_rules() -> impl Strategy<Value = Rules> {
    (
        prop_oneof![4 => 1u32..=6, 1 => 7u32..=200],
        1u64..=60_000,
        prop_oneof![1 => Just(0u64), 6 => 1u64..=2_000],
        prop_oneof![1 => Just(0u64), 6 => 0u64..=600_000],
        prop_oneof![
            Just(1.0),
            Just(1.5),
            Just(2.0),
            1.0f64..=4.0,
            1.0f64..=100.0
        ],
        prop_oneof![Just(0.0), Just(0.2), Just(1.0), 0.0f64..=1.0],
    )
        .prop_map(
            |(max_attempts, ack, initial, max, multiplier, jitter)| Rules {
                max_attempts,
                ack_timeout: Duration::from_millis(ack),
                backoff: config::Backoff {
                    initial: Duration::from_millis(initial),
                    max: Duration::from_millis(max),
                    multiplier,
                    jitter,
                },
            },
        )
}

fn arb_unit() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.5), Just(0.0), Just(0.999_999_999), 0.0f64..1.0]
}

fn arb_sel() -> impl Strategy<Value = Sel> {
    prop_oneof![4 => Just(Sel::Current), 1 => (-3i8..=2).prop_map(Sel::Offset)]
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Retry { after: None }),
        2 => prop_oneof![
            (0u64..=120_000_000).prop_map(Duration::from_micros),
            Just(Duration::ZERO),
        ]
        .prop_map(|after| Kind::Retry { after: Some(after) }),
        1 => Just(Kind::Panic),
        1 => Just(Kind::Error),
        1 => Just(Kind::Timeout),
        1 => Just(Kind::Crash),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop_oneof![
            arb_duration_ms(50),
            arb_duration_ms(5_000),
            arb_duration_ms(700_000)
        ]
        .prop_map(|d| Op::Advance(millis(d))),
        4 => (-1i8..=1).prop_map(Op::ToDue),
        2 => (-1i8..=1).prop_map(Op::ToLease),
        8 => Just(Op::Begin),
        3 => arb_sel().prop_map(Op::Ack),
        1 => arb_sel().prop_map(Op::Reject),
        8 => (arb_sel(), arb_kind(), prop::bool::weighted(0.8), arb_unit())
            .prop_map(|(sel, kind, charged, unit)| Op::Fail { sel, kind, charged, unit }),
        4 => (any::<bool>(), arb_unit()).prop_map(|(to_lease, unit)| Op::Expire { to_lease, unit }),
        1 => arb_sel().prop_map(Op::Extend),
        2 => Just(Op::Release),
        2 => (0u32..=3, arb_unit()).prop_map(|(ahead, unit)| Op::Recover { ahead, unit }),
        1 => arb_unit().prop_map(Op::Crashed),
        1 => (0u32..=3).prop_map(Op::Excuse),
        2 => Just(Op::Replay),
        1 => Just(Op::Forget),
        3 => (1u8..=64, any::<bool>()).prop_map(|(n, release)| Op::Burst { n, release }),
    ]
}

/// One delivery, its model and the clock.
struct One {
    rules: Rules,
    now: u64,
    real: Delivery,
    model: Model,
}

impl One {
    fn attempt(&self, sel: &Sel) -> u32 {
        match sel {
            Sel::Current => self.model.in_flight().unwrap_or(self.model.deliveries),
            Sel::Offset(o) => {
                u32::try_from((i64::from(self.model.deliveries) + i64::from(*o)).max(0))
                    .unwrap_or(0)
            }
        }
    }

    /// A settlement the model refuses must be refused alike and change nothing.
    fn refused<T: std::fmt::Debug + PartialEq>(
        &self,
        before: &Delivery,
        real: Result<T, Stale>,
        stale: Stale,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(real, Err(stale));
        prop_assert_eq!(
            &self.real,
            before,
            "a refused settlement changed the delivery"
        );
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.real.clone();
        let now = self.now;
        let t = Timestamp(now);
        let rules = &self.rules;
        match op {
            Op::Advance(ms) => self.now = now.saturating_add(*ms),
            Op::ToDue(d) => {
                if let State::Ready { due } = self.model.state {
                    self.now = now.max(due.saturating_add_signed(i64::from(*d)));
                }
            }
            Op::ToLease(d) => {
                if let State::InFlight { lease_until, .. } = self.model.state {
                    self.now = now.max(lease_until.saturating_add_signed(i64::from(*d)));
                }
            }
            Op::Begin => {
                let expected = self.model.begin(rules, now);
                prop_assert_eq!(self.real.begin(rules, t), expected);
                if let Some(attempt) = expected {
                    prop_assert_eq!(attempt, before.deliveries + 1, "attempts go up by one");
                }
            }
            Op::Ack(sel) => {
                let attempt = self.attempt(sel);
                let got = self.real.ack(attempt, t);
                match self.model.ack(attempt, now) {
                    Ok(expected) => prop_assert_eq!(got, Ok(expected)),
                    Err(stale) => self.refused(&before, got, stale)?,
                }
            }
            Op::Reject(sel) => {
                let attempt = self.attempt(sel);
                let got = self.real.reject(attempt, "malformed", t);
                match self.model.reject(attempt, "malformed", now) {
                    Ok(expected) => prop_assert_eq!(got, Ok(expected)),
                    Err(stale) => self.refused(&before, got, stale)?,
                }
            }
            Op::Fail {
                sel,
                kind,
                charged,
                unit,
            } => {
                let attempt = self.attempt(sel);
                let (failure, failed) = kind.failure();
                let got = self.real.fail(attempt, &failure, *charged, rules, t, *unit);
                match self.model.stale(attempt) {
                    Err(stale) => self.refused(&before, got, stale)?,
                    Ok(()) => {
                        let expected = self.model.failure(rules, failed, *charged, now, *unit)?;
                        prop_assert_eq!(got, Ok(expected));
                    }
                }
            }
            Op::Expire { to_lease, unit } => {
                if let (true, State::InFlight { lease_until, .. }) = (to_lease, &self.model.state) {
                    self.now = now.max(*lease_until);
                }
                let (now, t) = (self.now, Timestamp(self.now));
                let expected = match self.model.state {
                    State::InFlight { lease_until, .. } if lease_until <= now => {
                        let failed = Failed {
                            reason: "timeout".into(),
                            after: None,
                        };
                        Some(self.model.failure(rules, failed, true, now, *unit)?)
                    }
                    _ => None,
                };
                prop_assert_eq!(self.real.expire(rules, t, *unit), expected.clone());
                if expected.is_none() {
                    prop_assert_eq!(&self.real, &before, "an unexpired lease changes nothing");
                }
            }
            Op::Extend(sel) => {
                let attempt = self.attempt(sel);
                let got = self.real.extend(attempt, rules, t);
                match self.model.extend(attempt, rules, now) {
                    Ok(()) => prop_assert_eq!(got, Ok(())),
                    Err(stale) => self.refused(&before, got, stale)?,
                }
            }
            Op::Release => {
                let expected = self.model.release(now);
                prop_assert_eq!(self.real.release(t), expected);
                if expected {
                    prop_assert_eq!(
                        self.real.failures,
                        before.failures,
                        "a release is no failure"
                    );
                }
            }
            Op::Recover { ahead, unit } => {
                let attempt = self.model.deliveries + ahead;
                let expected = self.model.marked(attempt, now);
                prop_assert_eq!(self.real.marked(attempt, t), expected);
                same(&self.real, &self.model, rules, now)?;
                if expected {
                    let failures = self.model.failures;
                    let failed = Failed {
                        reason: "crash".into(),
                        after: None,
                    };
                    let transition = self.model.failure(rules, failed, true, now, *unit)?;
                    prop_assert_eq!(self.real.crashed(rules, t, *unit), Some(transition));
                    prop_assert_eq!(self.real.failures, failures + 1, "a crash is one failure");
                    prop_assert!(!self.real.marked(attempt, t), "a crash is charged once");
                } else {
                    prop_assert_eq!(&self.real, &before, "a refused marker changes nothing");
                }
            }
            Op::Crashed(unit) => {
                let expected = match self.model.in_flight() {
                    Some(_) => {
                        let failed = Failed {
                            reason: "crash".into(),
                            after: None,
                        };
                        Some(self.model.failure(rules, failed, true, now, *unit)?)
                    }
                    None => None,
                };
                prop_assert_eq!(self.real.crashed(rules, t, *unit), expected);
            }
            Op::Excuse(count) => {
                self.model.excuse(*count);
                self.real.excuse(*count);
            }
            Op::Replay => {
                let expected = self.model.replay(now);
                prop_assert_eq!(self.real.replay(t), expected);
                if expected {
                    prop_assert_eq!(&self.real.history, &before.history, "replay keeps history");
                    prop_assert!(self.real.is_due(t), "a replayed dead letter is due now");
                }
            }
            Op::Forget => {
                self.model.forget(now);
                self.real.forget(t);
                prop_assert_eq!(
                    self.real.failures,
                    before.failures,
                    "forget counts no failure"
                );
            }
            Op::Burst { n, release } => {
                for _ in 0..*n {
                    self.step(&Op::ToDue(0))?;
                    self.step(&Op::Begin)?;
                    if *release {
                        self.step(&Op::Release)?;
                    } else {
                        self.step(&Op::Fail {
                            sel: Sel::Current,
                            kind: Kind::Retry { after: None },
                            charged: false,
                            unit: 0.5,
                        })?;
                    }
                }
            }
        }
        // Terminal means terminal: only a replay (of a dead letter) changes a settled delivery.
        if before.is_settled() && !matches!(op, Op::Replay) {
            prop_assert_eq!(&self.real, &before, "a settled delivery changed");
        }
        same(&self.real, &self.model, &self.rules, self.now)
    }
}

fn run_one(rules: Rules, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut one = One {
        now: T0,
        real: Delivery::new(Timestamp(T0)),
        model: Model::new(T0),
        rules,
    };
    same(&one.real, &one.model, &one.rules, one.now)?;
    for op in ops {
        one.step(op)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// One delivery under random operations equals the model after every step.
    #[test]
    fn a_delivery_follows_the_model(rules in arb_rules(), ops in prop::collection::vec(arb_op(), 1..=64)) {
        run_one(rules, &ops)?;
    }

    /// `backoff` is §7's formula for every setting, failure count and jitter draw, stays
    /// within ± jitter of the capped delay, and never decreases with the failure count.
    #[test]
    fn backoff_is_the_formula_of_design(rules in arb_rules(), failures in prop_oneof![1u32..=12, 1u32..=10_000], unit in arb_unit()) {
        let b = &rules.backoff;
        // Known discrepancy, pinned in `a_zero_initial_backoff_stays_zero_however_many_failures`.
        prop_assume!(!(b.initial.is_zero() && b.multiplier.powf(f64::from(failures)).is_infinite()));
        let real = delivery::backoff(b, failures, unit);
        check_backoff(b, failures, unit, real)?;
        let next = delivery::backoff(b, failures + 1, unit);
        prop_assert!(next >= real, "{next:?} after {real:?}");
        let capped = b.initial.as_secs_f64() * b.multiplier.powf(f64::from(failures - 1));
        let capped = capped.min(b.max.as_secs_f64());
        let d = real.as_secs_f64();
        prop_assert!(d >= capped * (1.0 - b.jitter) - 1e-3 && d <= capped * (1.0 + b.jitter) + 1e-9);
    }
}

// ---------------------------------------------------------------------------------------------
// The circuit: a few deliveries of one instance behind one breaker, driven as dispatch.rs does.
// ---------------------------------------------------------------------------------------------

/// The breaker's documented rules (circuit.rs, docs/design.md §7), written out.
#[derive(Debug)]
struct BreakerModel {
    failures: usize,
    window: u64,
    probe: u64,
    /// Charged failures still within the window: (time, message).
    recent: Vec<(u64, u64)>,
    state: circuit::BreakerState,
}

impl BreakerModel {
    fn new(settings: &config::Circuit) -> Self {
        Self {
            failures: settings.failures as usize,
            window: millis(settings.window),
            probe: millis(settings.probe),
            recent: Vec::new(),
            state: circuit::BreakerState::Closed,
        }
    }

    fn admit(&mut self, message: u64, now: u64) -> bool {
        match &mut self.state {
            circuit::BreakerState::Closed => true,
            circuit::BreakerState::Paused => false,
            circuit::BreakerState::Open { next_probe, probe } => match probe {
                None if *next_probe <= now => {
                    *probe = Some(message);
                    true
                }
                _ => *probe == Some(message),
            },
        }
    }

    /// (charged, excused earlier failures)
    fn on_failure(&mut self, message: u64, now: u64) -> (bool, Vec<u64>) {
        match &mut self.state {
            circuit::BreakerState::Closed => {}
            circuit::BreakerState::Paused => return (false, Vec::new()),
            circuit::BreakerState::Open { next_probe, probe } => {
                if *probe == Some(message) {
                    *probe = None;
                    *next_probe = now.saturating_add(self.probe);
                }
                return (false, Vec::new());
            }
        }
        // A failure at `at` is within the window at `now` while `now - at < window`.
        self.recent
            .retain(|(at, _)| now.saturating_sub(*at) < self.window);
        let mut distinct: Vec<u64> = self.recent.iter().map(|(_, m)| *m).collect();
        distinct.push(message);
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < self.failures {
            self.recent.push((now, message));
            return (true, Vec::new());
        }
        let excused = self.recent.drain(..).map(|(_, m)| m).collect();
        self.state = circuit::BreakerState::Open {
            next_probe: now.saturating_add(self.probe),
            probe: None,
        };
        (false, excused)
    }

    fn on_success(&mut self, message: u64) -> bool {
        if matches!(self.state, circuit::BreakerState::Open { probe: Some(p), .. } if p == message)
        {
            self.state = circuit::BreakerState::Closed;
            self.recent.clear();
            return true;
        }
        false
    }
}

#[derive(Debug, Clone)]
/// `usize` fields pick the k-th candidate (modulo their number): a due delivery for a
/// hand-out, one in flight for a settlement.
enum COp {
    Advance(u64),
    /// To the moment the oldest failure in the window leaves it (± 1 ms).
    WindowEdge(i8),
    /// To the breaker's next wake-up (the next probe), if it waits for one.
    ToProbe,
    /// The dispatcher's hand-out of one due delivery: `admit`, then `begin`.
    HandOut(usize),
    /// The dispatcher's round: every due delivery in order, until `admit` refuses one.
    Round,
    Ack(usize),
    Reject(usize),
    Fail(usize, Kind, f64),
    /// Every lease that ended, in lease order, fails with `timeout` through the breaker.
    Expire(f64),
    Release(usize),
    Pause,
    Resume,
}

fn arb_cop() -> impl Strategy<Value = COp> {
    let k = || 0usize..5;
    prop_oneof![
        6 => prop_oneof![0u64..=100, 0u64..=3_000].prop_map(COp::Advance),
        3 => (-1i8..=1).prop_map(COp::WindowEdge),
        2 => Just(COp::ToProbe),
        6 => k().prop_map(COp::HandOut),
        3 => Just(COp::Round),
        4 => k().prop_map(COp::Ack),
        1 => k().prop_map(COp::Reject),
        8 => (k(), arb_kind(), arb_unit()).prop_map(|(i, k, u)| COp::Fail(i, k, u)),
        2 => arb_unit().prop_map(COp::Expire),
        1 => k().prop_map(COp::Release),
        1 => Just(COp::Pause),
        1 => Just(COp::Resume),
    ]
}

fn arb_circuit_case() -> impl Strategy<Value = (Rules, config::Circuit, usize, Vec<COp>)> {
    (
        (
            prop_oneof![1 => Just(1u32), 4 => 2u32..=8],
            1u64..=2_000,
            0u64..=200,
            0u64..=1_000,
            1.0f64..=3.0,
            0.0f64..=1.0,
        )
            .prop_map(
                |(max_attempts, ack, initial, max, multiplier, jitter)| Rules {
                    max_attempts,
                    ack_timeout: Duration::from_millis(ack),
                    backoff: config::Backoff {
                        initial: Duration::from_millis(initial),
                        max: Duration::from_millis(max),
                        multiplier,
                        jitter,
                    },
                },
            ),
        (1u32..=4, prop_oneof![1u64..=20, 1u64..=3_000], 1u64..=2_000).prop_map(
            |(failures, window, probe)| config::Circuit {
                failures,
                window: Duration::from_millis(window),
                probe: Duration::from_millis(probe),
            },
        ),
        1usize..=5,
    )
        .prop_flat_map(|(rules, circuit, n)| {
            (
                Just(rules),
                Just(circuit),
                Just(n),
                prop::collection::vec(arb_cop(), 1..=64),
            )
        })
}

/// One instance: its breaker, its deliveries (message `i + 1` at index `i`) and their models.
struct Instance {
    rules: Rules,
    probe: u64,
    now: u64,
    breaker: Breaker,
    model: BreakerModel,
    real: Vec<Delivery>,
    models: Vec<Model>,
    /// When an open circuit may next let a new probe out (from what was observed).
    probe_from: Option<u64>,
}

impl Instance {
    fn id(i: usize) -> u64 {
        i as u64 + 1
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.breaker.state(), &self.model.state, "breaker state");
        for (real, model) in self.real.iter().zip(&self.models) {
            same(real, model, &self.rules, self.now)?;
        }
        match self.breaker.state() {
            circuit::BreakerState::Open {
                probe: Some(p),
                next_probe,
            } => {
                // The probe is a live delivery (a rejected one closed the circuit).
                let live = !self.real[*p as usize - 1].is_settled();
                prop_assert!(
                    live,
                    "the probe {} is settled: {:?}",
                    p,
                    self.real[*p as usize - 1].state
                );
                prop_assert!(*next_probe <= self.now, "a probe before its time");
            }
            circuit::BreakerState::Open { probe: None, .. } => {
                prop_assert!(self.probe_from.is_some());
            }
            _ => {}
        }
        Ok(())
    }

    /// dispatch.rs `fail`: the breaker decides `charged`; what it excuses gets `excuse(1)`.
    fn fail(&mut self, i: usize, kind: &Kind, unit: f64) -> Result<(), TestCaseError> {
        let now = self.now;
        let Some(attempt) = self.models[i].in_flight() else {
            return Ok(());
        };
        let was = self.breaker.state().clone();
        let failures_before: Vec<u32> = self.real.iter().map(|d| d.failures).collect();
        let verdict = self.breaker.on_failure(Self::id(i), Timestamp(now));
        let (charged, excused) = self.model.on_failure(Self::id(i), now);
        prop_assert_eq!(verdict.charged, charged, "charged");
        prop_assert_eq!(&verdict.excuse, &excused, "excused");
        let tripped = was == circuit::BreakerState::Closed && self.breaker.state() != &was;
        if was != circuit::BreakerState::Closed || tripped {
            prop_assert!(
                !verdict.charged,
                "a failure while the circuit trips or is open counted"
            );
        }
        // The next probe may go out one `probe` after the circuit opened or its probe failed.
        let probe_failed =
            matches!(was, circuit::BreakerState::Open { probe: Some(p), .. } if p == Self::id(i));
        if tripped || probe_failed {
            self.probe_from = Some(now + self.probe);
        }
        for id in &verdict.excuse {
            let j = *id as usize - 1;
            if !self.real[j].is_settled() {
                self.real[j].excuse(1);
                self.models[j].excuse(1);
            }
        }
        if tripped {
            // Every earlier failure in the window is uncharged on the deliveries still live.
            for (j, before) in failures_before.iter().enumerate() {
                if j != i && !self.real[j].is_settled() {
                    let n = excused.iter().filter(|id| **id == Self::id(j)).count() as u32;
                    prop_assert_eq!(self.real[j].failures, before.saturating_sub(n));
                }
            }
        }
        let (failure, failed) = kind.failure();
        let got = self.real[i].fail(
            attempt,
            &failure,
            charged,
            &self.rules,
            Timestamp(now),
            unit,
        );
        let expected = self.models[i].failure(&self.rules, failed, charged, now, unit)?;
        prop_assert_eq!(got, Ok(expected));
        if !charged {
            prop_assert!(
                !self.real[i].is_settled(),
                "an excused failure dead-lettered"
            );
            prop_assert!(
                self.real[i].is_due(Timestamp(now)),
                "an excused failure waits"
            );
            prop_assert_eq!(
                self.real[i].failures,
                failures_before[i],
                "an excused failure counted"
            );
        }
        Ok(())
    }

    /// The `k`-th delivery (modulo their number) of those that `pred` selects.
    fn pick(&self, k: usize, pred: impl Fn(&Model) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.models.len())
            .filter(|i| pred(&self.models[*i]))
            .collect();
        (!candidates.is_empty()).then(|| candidates[k % candidates.len()])
    }

    /// dispatch.rs `hand_out` for one due delivery: `admit`, then `begin`. Returns whether it
    /// was admitted.
    fn hand_out(&mut self, i: usize) -> Result<bool, TestCaseError> {
        let (now, t) = (self.now, Timestamp(self.now));
        let was = self.breaker.state().clone();
        let admitted = self.breaker.admit(Self::id(i), t);
        prop_assert_eq!(admitted, self.model.admit(Self::id(i), now), "admit");
        match was {
            circuit::BreakerState::Paused => prop_assert!(!admitted),
            circuit::BreakerState::Open { probe: None, .. } if admitted => {
                // A new probe: not before its interval.
                let from = self.probe_from.expect("opened");
                prop_assert!(now >= from, "a probe at {} before {}", now, from);
            }
            circuit::BreakerState::Open { probe: Some(p), .. } => {
                prop_assert_eq!(admitted, p == Self::id(i), "one probe at a time");
            }
            _ => {}
        }
        if admitted {
            let expected = self.models[i].begin(&self.rules, now);
            prop_assert!(expected.is_some());
            prop_assert_eq!(self.real[i].begin(&self.rules, t), expected);
        }
        Ok(admitted)
    }

    fn step(&mut self, op: &COp) -> Result<(), TestCaseError> {
        let now = self.now;
        let t = Timestamp(now);
        match op {
            COp::Advance(ms) => self.now += ms,
            COp::WindowEdge(d) => {
                if let Some((at, _)) = self.model.recent.first() {
                    let edge = at.saturating_add(self.model.window);
                    self.now = now.max(edge.saturating_add_signed(i64::from(*d)));
                    // Then a failure there, the case the edge matters for.
                    if let Some(i) =
                        self.pick(usize::from(d.unsigned_abs()), |m| m.in_flight().is_some())
                    {
                        self.fail(i, &Kind::Panic, 0.5)?;
                    }
                }
            }
            COp::ToProbe => {
                let expected = match self.model.state {
                    circuit::BreakerState::Open {
                        next_probe,
                        probe: None,
                    } => Some(Timestamp(next_probe)),
                    _ => None,
                };
                prop_assert_eq!(self.breaker.next_wakeup(), expected, "next_wakeup");
                if let Some(at) = expected {
                    self.now = now.max(at.0);
                }
            }
            COp::HandOut(k) => {
                if let Some(i) = self.pick(*k, |m| !m.settled() && m.is_due(now)) {
                    self.hand_out(i)?;
                }
            }
            COp::Round => {
                for i in 0..self.real.len() {
                    if !self.models[i].settled()
                        && self.models[i].is_due(now)
                        && !self.hand_out(i)?
                    {
                        break;
                    }
                }
            }
            COp::Ack(k) => {
                if let Some(i) = self.pick(*k, |m| m.in_flight().is_some()) {
                    let attempt = self.models[i].in_flight().expect("picked");
                    let was_probe = matches!(self.breaker.state(),
                        circuit::BreakerState::Open { probe: Some(p), .. } if *p == Self::id(i));
                    let closed = self.breaker.on_success(Self::id(i));
                    prop_assert_eq!(closed, self.model.on_success(Self::id(i)));
                    prop_assert_eq!(closed, was_probe, "the probe's success closes it");
                    if closed {
                        prop_assert_eq!(self.breaker.state(), &circuit::BreakerState::Closed);
                        self.probe_from = None;
                    }
                    let expected = self.models[i].ack(attempt, now);
                    prop_assert_eq!(self.real[i].ack(attempt, t), expected);
                }
            }
            COp::Reject(k) => {
                // dispatch.rs `settle`, Outcome::Reject: a success for the breaker (the
                // plugin answered on purpose), so a rejected probe closes the circuit.
                if let Some(i) = self.pick(*k, |m| m.in_flight().is_some()) {
                    let attempt = self.models[i].in_flight().expect("picked");
                    let closed = self.breaker.on_success(Self::id(i));
                    prop_assert_eq!(closed, self.model.on_success(Self::id(i)));
                    if closed {
                        self.probe_from = None;
                    }
                    let expected = self.models[i].reject(attempt, "no", now);
                    prop_assert_eq!(self.real[i].reject(attempt, "no", t), expected);
                }
            }
            COp::Fail(k, kind, unit) => {
                if let Some(i) = self.pick(*k, |m| m.in_flight().is_some()) {
                    self.fail(i, kind, *unit)?;
                }
            }
            COp::Expire(unit) => {
                let mut ended: Vec<(u64, usize)> = self
                    .models
                    .iter()
                    .enumerate()
                    .filter_map(|(i, m)| match m.state {
                        State::InFlight { lease_until, .. } if lease_until <= now => {
                            Some((lease_until, i))
                        }
                        _ => None,
                    })
                    .collect();
                ended.sort_unstable();
                for (_, i) in ended {
                    self.fail(i, &Kind::Timeout, *unit)?;
                }
            }
            COp::Release(k) => {
                if let Some(i) = self.pick(*k, |m| m.in_flight().is_some()) {
                    prop_assert!(self.models[i].release(now));
                    prop_assert!(self.real[i].release(t));
                }
            }
            COp::Pause => {
                self.breaker.pause();
                self.model.state = circuit::BreakerState::Paused;
                self.probe_from = None;
            }
            COp::Resume => {
                self.breaker.resume();
                self.model.state = circuit::BreakerState::Closed;
                self.model.recent.clear();
                self.probe_from = None;
            }
        }
        self.check()
    }
}

fn run_circuit(
    rules: Rules,
    settings: config::Circuit,
    n: usize,
    ops: &[COp],
) -> Result<(), TestCaseError> {
    let mut inst = Instance {
        probe: millis(settings.probe),
        now: T0,
        breaker: Breaker::new(settings.clone()),
        model: BreakerModel::new(&settings),
        real: (0..n).map(|_| Delivery::new(Timestamp(T0))).collect(),
        models: (0..n).map(|_| Model::new(T0)).collect(),
        probe_from: None,
        rules,
    };
    for op in ops {
        inst.step(op)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Deliveries of one instance behind its breaker, driven as the dispatcher drives them:
    /// the breaker equals its model, every delivery equals its model, failures while the
    /// circuit trips or is open are not charged, earlier ones in the window are excused, an
    /// open circuit lets one probe out per `probe` interval, and the probe's success closes it.
    #[test]
    fn the_circuit_follows_the_model((rules, settings, n, ops) in arb_circuit_case()) {
        run_circuit(rules, settings, n, &ops)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Discrepancies with docs/design.md §7 this test found (now fixed), with the smallest sequence.
// ---------------------------------------------------------------------------------------------

/// §7: "one probe message goes out every `probe`". dispatch.rs `settle` dead-letters a
/// rejected delivery without telling the breaker, so when the rejected delivery is the probe,
/// `probe` stays `Some(that message)` forever and `admit` refuses every other message: the
/// instance gets nothing until an operator resumes it. Driven here exactly as dispatch.rs
/// does (`fail`: `on_failure` then `Delivery::fail(charged)`; `Reject`: `Delivery::reject`
/// only).
#[test]
fn a_rejected_probe_does_not_keep_the_circuit_open_for_good() {
    let rules = Rules {
        max_attempts: 5,
        ack_timeout: Duration::from_secs(30),
        backoff: config::Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        },
    };
    let mut breaker = Breaker::new(config::Circuit {
        failures: 1,
        window: Duration::from_secs(30),
        probe: Duration::from_secs(10),
    });
    let t0 = Timestamp(T0);
    let (mut m1, m2) = (Delivery::new(t0), Delivery::new(t0));
    // Message 1 fails: the circuit trips (failures = 1); the failure is excused.
    assert!(breaker.admit(1, t0));
    let attempt = m1.begin(&rules, t0).unwrap();
    let verdict = breaker.on_failure(1, t0);
    assert!(!verdict.charged);
    m1.fail(attempt, &Failure::Timeout, verdict.charged, &rules, t0, 0.5)
        .unwrap();
    // Ten seconds later message 1 is the probe, and the plugin rejects it.
    let t1 = t0 + Duration::from_secs(10);
    assert!(breaker.admit(1, t1));
    let attempt = m1.begin(&rules, t1).unwrap();
    m1.reject(attempt, "malformed", t1).unwrap();
    breaker.on_success(1);
    // Message 2 never gets out, however long it waits.
    let admitted = (1..=100).any(|k| {
        let t = t1 + Duration::from_secs(10 * k);
        m2.is_due(t) && breaker.admit(2, t)
    });
    assert!(
        admitted,
        "no probe for 1000 s after the probe was rejected: {:?}",
        breaker.state()
    );
}

/// §7: backoff = `min(max, initial · multiplier^(failures-1))`. With `initial = 0` (allowed:
/// `backoff.initial` may be 0) that is 0 for every failure count, but once
/// `multiplier^(failures-1)` overflows f64 `backoff` computes `0 · ∞ = NaN`, and
/// `NaN.min(max)` is `max`: the retry waits `max` instead of 0. With `multiplier = 100` that
/// is from the 156th failure on (`max_attempts` may be up to 10 000).
#[test]
fn a_zero_initial_backoff_stays_zero_however_many_failures() {
    let b = config::Backoff {
        initial: Duration::ZERO,
        max: Duration::from_secs(60),
        multiplier: 100.0,
        jitter: 0.0,
    };
    assert_eq!(delivery::backoff(&b, 155, 0.5), Duration::ZERO);
    assert_eq!(delivery::backoff(&b, 156, 0.5), Duration::ZERO);
}
