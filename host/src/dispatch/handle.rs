//! [`Dispatcher`]: the handle every other part of the engine talks to the dispatcher's loop
//! through, one method per request; the message it sends ([`Input`]) stays inside.
//!
//! Requests that need an answer wait for it here (a `bounded(1)` reply channel per call), so
//! no caller builds one by hand. A dispatcher that has stopped answers as documented on each
//! method (a default, or [`DispatcherGone`]): by then the engine is stopping.

use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::{Slot, Snapshot, StopReport};
use crate::{
    actor::Actor,
    config::Settings,
    ingress::{Accepted, AcceptedSink},
    ledger::{Forget, Pending},
    routing::InstanceId,
};

/// What the dispatcher is told: only [`Dispatcher`]'s methods send it, only the loop reads
/// it.
#[derive(Debug)]
pub(super) enum Input {
    /// Messages the ingress accepted (already in the ledger).
    Accepted(Vec<Accepted>),
    /// A snapshot for the caller.
    Snapshot(Sender<Snapshot>),
    /// Deliveries back from the ledger (replayed dead letters).
    Restore(Vec<Pending>),
    /// An operator forgets the waiting deliveries of one instance (not the ones in flight);
    /// the reply is how many.
    Forget {
        instance: InstanceId,
        how: Forget,
        reply: Sender<u64>,
    },
    /// Operator pause / resume of one instance.
    Pause(InstanceId),
    Resume(InstanceId),
    /// A new instance (hot plug): its slot takes the next id; `pending` is what the ledger
    /// holds for it.
    Add {
        slot: Box<Slot>,
        pending: Vec<Pending>,
    },
    /// From now on `actor` runs `instance` (`None`: nothing does; its deliveries wait). The
    /// actor it replaces, already asked to stop (it finishes its call in hand and releases
    /// the rest, which go to the new one), is the reply: the supervisor retires it.
    Run {
        instance: InstanceId,
        actor: Option<Actor>,
        reply: Sender<Option<Actor>>,
    },
    /// New delivery settings for an instance (its circuit restarts if those changed).
    Configure {
        instance: InstanceId,
        settings: Box<Settings>,
    },
    /// Graceful stop: finish the calls in hand, release the rest, stop the actors.
    Stop {
        deadline: Duration,
        reply: Sender<StopReport>,
    },
}

/// The dispatcher has stopped (the engine is stopping): the request was not carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the dispatcher has stopped")]
pub struct DispatcherGone;

/// The handle of a dispatcher: cheap to clone, usable from any thread. Every method only
/// queues its request (the loop applies them in order); the ones that return something wait
/// for the loop's answer.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    inputs: Sender<Input>,
}

/// The receiving end of a dispatcher not yet started: [`Inbox::spawn`] starts its loop.
/// (The handle exists first: the ingress, which the loop needs, sends to it.)
#[derive(Debug)]
pub struct Inbox {
    pub(super) inputs: Receiver<Input>,
}

impl Dispatcher {
    /// A dispatcher's handle and the inbox its loop will read; requests sent before the loop
    /// starts wait in the inbox.
    pub fn new() -> (Self, Inbox) {
        let (inputs, receiver) = unbounded();
        (Self { inputs }, Inbox { inputs: receiver })
    }

    /// Queues `input`; `false` if the loop is gone.
    fn send(&self, input: Input) -> bool {
        self.inputs.send(input).is_ok()
    }

    /// Messages the ingress accepted and the ledger recorded: their deliveries start.
    pub fn accepted(&self, batch: Vec<Accepted>) {
        // The dispatcher ends only after the ingress closed; a failed send means it is gone.
        let _ = self.send(Input::Accepted(batch));
    }

    /// The current counters and states (empty once the dispatcher has stopped).
    pub fn snapshot(&self) -> Snapshot {
        let (reply, answer) = bounded(1);
        if !self.send(Input::Snapshot(reply)) {
            return Snapshot::default();
        }
        answer.recv().unwrap_or_default()
    }

    /// Deliveries handed back by the ledger (replayed dead letters) join their queues.
    pub fn restore(&self, pending: Vec<Pending>) {
        let _ = self.send(Input::Restore(pending));
    }

    /// Ends the waiting deliveries of `instance` for good (the ones in flight finish), as
    /// `how` says, recorded at once; returns how many.
    ///
    /// # Errors
    /// [`DispatcherGone`] when the dispatcher has stopped.
    pub fn forget(&self, instance: InstanceId, how: Forget) -> Result<u64, DispatcherGone> {
        let (reply, answer) = bounded(1);
        if !self.send(Input::Forget {
            instance,
            how,
            reply,
        }) {
            return Err(DispatcherGone);
        }
        answer.recv().map_err(|_| DispatcherGone)
    }

    /// An operator's pause: nothing more is handed to `instance` until [`Dispatcher::resume`].
    pub fn pause(&self, instance: InstanceId) {
        let _ = self.send(Input::Pause(instance));
    }

    /// Ends an operator's pause of `instance`.
    pub fn resume(&self, instance: InstanceId) {
        let _ = self.send(Input::Resume(instance));
    }

    /// A new instance (hot plug): `slot` takes the next instance id; `pending` is what the
    /// ledger holds for it.
    pub fn add(&self, slot: Slot, pending: Vec<Pending>) {
        let _ = self.send(Input::Add {
            slot: Box::new(slot),
            pending,
        });
    }

    /// From now on `actor` runs `instance` (`None`: nothing does; its deliveries wait).
    /// Returns the actor it replaces, already asked to stop (it finishes its call in hand;
    /// what it had not started goes to the new one at once): the caller retires it. `None`
    /// too when the dispatcher has stopped.
    pub fn run(&self, instance: InstanceId, actor: Option<Actor>) -> Option<Actor> {
        let (reply, answer) = bounded(1);
        if !self.send(Input::Run {
            instance,
            actor,
            reply,
        }) {
            return None;
        }
        answer.recv().ok().flatten()
    }

    /// New delivery settings for `instance` (its circuit restarts only if its own changed).
    pub fn configure(&self, instance: InstanceId, settings: Settings) {
        let _ = self.send(Input::Configure {
            instance,
            settings: Box::new(settings),
        });
    }

    /// Graceful stop within `deadline`: every actor finishes its call in hand and releases
    /// the rest (no failure), then its plugin shuts down; the loop ends. Returns how it
    /// ended (an empty report if the dispatcher had already stopped).
    pub fn stop(&self, deadline: Duration) -> StopReport {
        let (reply, answer) = bounded(1);
        if !self.send(Input::Stop { deadline, reply }) {
            return StopReport::default();
        }
        answer.recv().unwrap_or_default()
    }
}

impl AcceptedSink for Dispatcher {
    fn accepted(&self, batch: Vec<Accepted>) {
        Dispatcher::accepted(self, batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_dispatcher_answers_with_defaults_and_refuses_a_forget() {
        let (dispatcher, inbox) = Dispatcher::new();
        drop(inbox);
        assert_eq!(dispatcher.snapshot(), Snapshot::default());
        assert_eq!(
            dispatcher.forget(0, Forget::Purge),
            Err(DispatcherGone),
            "a forget that did not happen is not a count"
        );
        assert!(dispatcher.run(0, None).is_none());
        assert_eq!(dispatcher.stop(Duration::ZERO), StopReport::default());
    }
}
