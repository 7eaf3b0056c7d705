//! A log line that may repeat without bound (a stale settlement per message after a plugin
//! was stopped, say) is written at most once per interval, carrying how many were left out
//! since the last one: the log stays readable and nothing goes uncounted.

use std::time::{Duration, Instant};

/// At most one report per `every`; the others are counted for the next one.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence at `now`: `Some(n)` when it is to be reported, `n` being how many
    /// were left out since the last report; `None` when it is only counted.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_an_interval_carrying_the_count_left_out() {
        let mut throttle = Throttle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(throttle.admit(t0), Some(0), "the first is reported");
        assert_eq!(throttle.admit(ms(10)), None);
        assert_eq!(throttle.admit(ms(999)), None);
        assert_eq!(throttle.admit(ms(1000)), Some(2), "two left out, said");
        assert_eq!(throttle.admit(ms(5000)), Some(0));
    }
}
