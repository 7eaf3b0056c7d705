//! The circuit breaker of one instance (docs/design.md §7): when it fails on `failures` distinct
//! messages within `window` it is paused, and those failures are excused (an outage must not
//! burn every message's attempts); while open, one probe message goes out every `probe`, and
//! the probe's success closes it. Operators pause and resume by hand.
//!
//! Pure and clock-injected, like `delivery`: the dispatcher asks it before every hand-out and
//! tells it every outcome.

use std::collections::VecDeque;

use serde::Serialize;

use crate::{clock::Timestamp, config};

/// Where the breaker stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    /// Deliveries flow.
    Closed,
    /// Tripped: only a probe goes out, not before `next_probe`.
    Open {
        next_probe: u64,
        /// The message out as the probe, if one is.
        probe: Option<u64>,
    },
    /// Paused by an operator: nothing goes out until resumed.
    Paused,
}

/// What to do with a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether this failure counts against the message's `max_attempts`.
    pub charged: bool,
    /// The circuit just opened: these earlier failures (message ids, once per failure) are
    /// excused too.
    pub excuse: Vec<u64>,
}

/// The breaker of one instance.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: config::Circuit,
    /// Charged failures within the window, oldest first: (time, message).
    recent: VecDeque<(Timestamp, u64)>,
    state: BreakerState,
}

impl Breaker {
    /// The settings it runs with.
    pub fn settings(&self) -> &config::Circuit {
        &self.settings
    }

    pub fn new(settings: config::Circuit) -> Self {
        Self {
            settings,
            recent: VecDeque::new(),
            state: BreakerState::Closed,
        }
    }

    pub fn state(&self) -> &BreakerState {
        &self.state
    }

    /// Whether `message` may be handed out at `now`; while open, the first message asked
    /// for once the probe time has come becomes the probe.
    pub fn admit(&mut self, message: u64, now: Timestamp) -> bool {
        match &mut self.state {
            BreakerState::Closed => true,
            BreakerState::Paused => false,
            BreakerState::Open { next_probe, probe } => {
                if probe.is_none() && *next_probe <= now.0 {
                    *probe = Some(message);
                    true
                } else {
                    *probe == Some(message)
                }
            }
        }
    }

    /// When the breaker next lets something out by itself (the next probe), if it waits.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        match self.state {
            BreakerState::Open {
                next_probe,
                probe: None,
            } => Some(Timestamp(next_probe)),
            _ => None,
        }
    }

    /// `message` failed at `now`.
    pub fn on_failure(&mut self, message: u64, now: Timestamp) -> Verdict {
        match &mut self.state {
            BreakerState::Open { next_probe, probe } => {
                if *probe == Some(message) {
                    *probe = None;
                    *next_probe = now.after(self.settings.probe).0;
                }
                return Verdict {
                    charged: false,
                    excuse: Vec::new(),
                };
            }
            BreakerState::Paused => {
                return Verdict {
                    charged: false,
                    excuse: Vec::new(),
                };
            }
            BreakerState::Closed => {}
        }
        let horizon =
            Timestamp(now.0.saturating_sub(
                u64::try_from(self.settings.window.as_millis()).unwrap_or(u64::MAX),
            ));
        while self.recent.front().is_some_and(|(at, _)| *at <= horizon) {
            self.recent.pop_front();
        }
        self.recent.push_back((now, message));
        let mut distinct: Vec<u64> = self.recent.iter().map(|(_, m)| *m).collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < self.settings.failures as usize {
            return Verdict {
                charged: true,
                excuse: Vec::new(),
            };
        }
        // Tripped: excuse every failure in the window except this one, which is excused by
        // not being charged.
        let mut excuse: Vec<u64> = self.recent.drain(..).map(|(_, m)| m).collect();
        excuse.pop();
        self.state = BreakerState::Open {
            next_probe: now.after(self.settings.probe).0,
            probe: None,
        };
        Verdict {
            charged: false,
            excuse,
        }
    }

    /// `message` succeeded: a probe's success closes the circuit. Returns whether it closed.
    pub fn on_success(&mut self, message: u64) -> bool {
        if let BreakerState::Open { probe, .. } = &self.state
            && *probe == Some(message)
        {
            self.state = BreakerState::Closed;
            self.recent.clear();
            return true;
        }
        false
    }

    /// An operator pauses the instance.
    pub fn pause(&mut self) {
        self.state = BreakerState::Paused;
    }

    /// An operator resumes it: closed, with a clean window.
    pub fn resume(&mut self) {
        self.state = BreakerState::Closed;
        self.recent.clear();
    }
}

/// An instance's circuit breaker, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CircuitState {
    /// Deliveries flow (also: no circuit yet).
    Closed,
    /// Tripped: nothing goes out until the next probe is due.
    Open,
    /// Tripped, with one probe out.
    HalfOpen,
    /// Paused by an operator.
    Paused,
}

impl CircuitState {
    /// Every state, in the order above.
    pub const ALL: [Self; 4] = [Self::Closed, Self::Open, Self::HalfOpen, Self::Paused];

    /// The operator's name of the state (what `Display` writes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
            Self::Paused => "paused",
        }
    }
}

impl From<Option<&BreakerState>> for CircuitState {
    fn from(state: Option<&BreakerState>) -> Self {
        match state {
            Some(BreakerState::Closed) | None => Self::Closed,
            Some(BreakerState::Open { probe: None, .. }) => Self::Open,
            Some(BreakerState::Open { probe: Some(_), .. }) => Self::HalfOpen,
            Some(BreakerState::Paused) => Self::Paused,
        }
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: Timestamp = Timestamp(5_000_000);

    fn breaker() -> Breaker {
        Breaker::new(config::Circuit {
            failures: 3,
            window: Duration::from_secs(30),
            probe: Duration::from_secs(10),
        })
    }

    fn at(seconds: u64) -> Timestamp {
        T0 + Duration::from_secs(seconds)
    }

    #[test]
    fn failures_on_distinct_messages_within_the_window_open_it_and_are_excused() {
        let mut b = breaker();
        assert!(b.on_failure(1, at(0)).charged);
        assert!(
            b.on_failure(1, at(1)).charged,
            "the same message again is not distinct"
        );
        assert!(b.on_failure(2, at(2)).charged);
        let verdict = b.on_failure(3, at(3));
        assert_eq!(
            verdict,
            Verdict {
                charged: false,
                excuse: vec![1, 1, 2]
            }
        );
        assert_eq!(
            b.state(),
            &BreakerState::Open {
                next_probe: at(13).0,
                probe: None
            }
        );
        assert!(!b.admit(4, at(5)), "nothing but a probe while open");
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut b = breaker();
        b.on_failure(1, at(0));
        b.on_failure(2, at(10));
        assert!(
            b.on_failure(3, at(31)).charged,
            "message 1 fell out of the window"
        );
        assert_eq!(b.state(), &BreakerState::Closed);
    }

    #[test]
    fn one_probe_every_probe_interval_and_its_success_closes_the_circuit() {
        let mut b = breaker();
        for m in 1..=3 {
            b.on_failure(m, at(0));
        }
        assert_eq!(b.next_wakeup(), Some(at(10)));
        assert!(!b.admit(7, at(9)));
        assert!(b.admit(7, at(10)), "the probe");
        assert!(!b.admit(8, at(10)), "only one probe at a time");
        assert!(b.admit(7, at(11)), "the probe itself stays admitted");
        assert_eq!(b.next_wakeup(), None, "a probe is out");
        let verdict = b.on_failure(7, at(12));
        assert!(!verdict.charged, "a failing probe is excused");
        assert_eq!(b.next_wakeup(), Some(at(22)));
        assert!(b.admit(9, at(22)));
        assert!(!b.on_success(8), "not the probe");
        assert!(b.on_success(9));
        assert_eq!(b.state(), &BreakerState::Closed);
        assert!(b.admit(10, at(22)));
        assert!(
            b.on_failure(10, at(23)).charged,
            "a clean window after closing"
        );
    }

    #[test]
    fn operators_pause_and_resume_by_hand() {
        let mut b = breaker();
        b.pause();
        assert!(!b.admit(1, at(0)));
        assert!(
            !b.on_failure(1, at(0)).charged,
            "in-flight failures while paused are excused"
        );
        b.resume();
        assert!(b.admit(1, at(1)));
    }
}
