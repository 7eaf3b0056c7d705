//! [`Outcomes`]: how the attempts of one instance ended, counted by kind — the one set of
//! counters the status (`ctl status`, `ctl plugins`) and the metrics read. The dispatcher
//! counts each attempt once, where it applies its outcome (an ack, a rejection, a failure);
//! crashes are charged at start by the ledger's recovery and joined by the front.

use serde::Serialize;

use crate::delivery::Failure;

/// How one attempt ended, as operators count it (the metrics' `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    Ack,
    Retry,
    Reject,
    Timeout,
    Panic,
    Crash,
    /// The plugin answered with an error, or with an outcome this daemon cannot apply.
    Error,
    /// A deferred attempt's token dropped unsettled.
    Dropped,
}

impl OutcomeKind {
    /// Every kind, in the order the metrics list them.
    pub const ALL: [Self; 8] = [
        Self::Ack,
        Self::Retry,
        Self::Reject,
        Self::Timeout,
        Self::Panic,
        Self::Crash,
        Self::Error,
        Self::Dropped,
    ];

    /// The word operators read (the `kind` label's value).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Retry => "retry",
            Self::Reject => "reject",
            Self::Timeout => "timeout",
            Self::Panic => "panic",
            Self::Crash => "crash",
            Self::Error => "error",
            Self::Dropped => "dropped",
        }
    }
}

impl From<&Failure> for OutcomeKind {
    fn from(failure: &Failure) -> Self {
        match failure {
            Failure::Retry { .. } => Self::Retry,
            Failure::Panic { .. } => Self::Panic,
            Failure::Timeout => Self::Timeout,
            Failure::Crash => Self::Crash,
            Failure::Error { .. } => Self::Error,
            Failure::Dropped => Self::Dropped,
        }
    }
}

/// Attempts of one instance by how they ended, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    pub ack: u64,
    pub retry: u64,
    pub reject: u64,
    pub timeout: u64,
    pub panic: u64,
    pub crash: u64,
    pub error: u64,
    pub dropped: u64,
}

impl Outcomes {
    /// One more attempt ended as `kind`.
    pub fn count(&mut self, kind: impl Into<OutcomeKind>) {
        *self.slot(kind.into()) += 1;
    }

    /// How many ended as `kind`.
    pub fn get(&self, kind: OutcomeKind) -> u64 {
        match kind {
            OutcomeKind::Ack => self.ack,
            OutcomeKind::Retry => self.retry,
            OutcomeKind::Reject => self.reject,
            OutcomeKind::Timeout => self.timeout,
            OutcomeKind::Panic => self.panic,
            OutcomeKind::Crash => self.crash,
            OutcomeKind::Error => self.error,
            OutcomeKind::Dropped => self.dropped,
        }
    }

    fn slot(&mut self, kind: OutcomeKind) -> &mut u64 {
        match kind {
            OutcomeKind::Ack => &mut self.ack,
            OutcomeKind::Retry => &mut self.retry,
            OutcomeKind::Reject => &mut self.reject,
            OutcomeKind::Timeout => &mut self.timeout,
            OutcomeKind::Panic => &mut self.panic,
            OutcomeKind::Crash => &mut self.crash,
            OutcomeKind::Error => &mut self.error,
            OutcomeKind::Dropped => &mut self.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_counts_in_its_own_place() {
        let mut outcomes = Outcomes::default();
        for (n, kind) in OutcomeKind::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                outcomes.count(kind);
            }
        }
        for (n, kind) in OutcomeKind::ALL.into_iter().enumerate() {
            assert_eq!(outcomes.get(kind), n as u64 + 1, "{}", kind.name());
        }
        outcomes.count(&Failure::Timeout);
        assert_eq!(outcomes.timeout, 5);
    }
}
