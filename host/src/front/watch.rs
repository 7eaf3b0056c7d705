//! A watch of the daemon's events: the events kept when it began (the snapshot), then each
//! new one as it happens, then why it ended. A watcher that falls behind is ended and told
//! so, never left with a silent gap.

use std::{collections::VecDeque, time::Duration};

use crossbeam_channel::RecvTimeoutError;

use crate::events::{Event, EventSubscription};

/// How many events a watcher may be behind before it is ended.
pub const WATCH_BUFFER: usize = 256;

/// One subscriber's view of the event hub. Blocking: read it on a thread of its own.
#[derive(Debug)]
pub struct Watch {
    snapshot: VecDeque<Event>,
    subscription: EventSubscription,
    /// Counted among the watchers while it lives.
    _counted: crate::metrics::Watching,
}

/// What a watch gives next.
#[derive(Debug)]
pub enum WatchStep {
    /// An event from before the watch began (the snapshot comes first, oldest first).
    Snapshot(Event),
    /// An event as it happened.
    Live(Event),
    /// Nothing within the wait: the caller may check its own end, then ask again.
    Quiet,
    /// The watch is over.
    Ended(WatchEnd),
}

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchEnd {
    #[error(
        "this watcher fell more than {WATCH_BUFFER} events behind; watch again (the snapshot \
         comes first)"
    )]
    Lagged,
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl Watch {
    pub(super) fn new(subscription: EventSubscription) -> Self {
        let mut subscription = subscription;
        let snapshot = std::mem::take(&mut subscription.history).into();
        Self {
            snapshot,
            subscription,
            _counted: crate::metrics::Watching::new(),
        }
    }

    /// The next step, waiting at most `wait` for a live event.
    pub fn next(&mut self, wait: Duration) -> WatchStep {
        if let Some(event) = self.snapshot.pop_front() {
            return WatchStep::Snapshot(event);
        }
        match self.subscription.events.recv_timeout(wait) {
            Ok(event) => WatchStep::Live(event),
            Err(RecvTimeoutError::Timeout) => WatchStep::Quiet,
            Err(RecvTimeoutError::Disconnected) => {
                WatchStep::Ended(if self.subscription.lagged() {
                    WatchEnd::Lagged
                } else {
                    WatchEnd::ShuttingDown
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        clock::SystemClock,
        events::{EventKind, Events},
    };

    fn event() -> EventKind {
        EventKind::Unrouted {
            topic: "t".into(),
            count: 1,
        }
    }

    #[test]
    fn the_snapshot_comes_first_then_live_events_then_the_end() {
        let events = Events::new(Arc::new(SystemClock));
        events.emit(event());
        let mut watch = Watch::new(events.subscribe(WATCH_BUFFER));
        events.emit(event());
        let wait = Duration::from_millis(10);
        assert!(matches!(watch.next(wait), WatchStep::Snapshot(e) if e.seq == 1));
        assert!(matches!(watch.next(wait), WatchStep::Live(e) if e.seq == 2));
        assert!(matches!(watch.next(wait), WatchStep::Quiet));
        events.close();
        assert!(matches!(
            watch.next(wait),
            WatchStep::Ended(WatchEnd::ShuttingDown)
        ));
    }

    #[test]
    fn a_watcher_that_falls_behind_is_told_so() {
        let events = Events::new(Arc::new(SystemClock));
        let mut watch = Watch::new(events.subscribe(1));
        for _ in 0..3 {
            events.emit(event());
        }
        let mut steps = 0;
        let end = loop {
            steps += 1;
            assert!(steps < 10, "never ended");
            if let WatchStep::Ended(end) = watch.next(Duration::from_millis(10)) {
                break end;
            }
        };
        assert_eq!(end, WatchEnd::Lagged);
    }
}
