//! Actors with real fixture plugins: order and batching, credits, panics, staged children, a
//! graceful stop that releases what was not started, a hung call abandoned, and a blocked
//! instance that delays no other.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, unbounded};
use plugind::{
    actor::{Actor, ActorDeps, ActorEvent, Deadlines, Handoff, JoinOutcome},
    clock::{Clock, SystemClock, Timestamp},
    deferred::Deferrals,
    loader::{self, Policy},
    message::{HOP_HEADER, StoredMessage},
    services::{Child, Identity, InstanceServices, PublishLimits, Publisher},
};
use plugind_api::{MessageId, Outcome, PublishError, hosting::CallErrorKind};
use plugind_tests::{
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

struct Nowhere;

impl Publisher for Nowhere {
    fn publish(&self, _: Child) -> Result<MessageId, PublishError> {
        panic!("these tests publish only inside handle")
    }
}

fn actor(id: u32, fixture: &str, config: &str, capacity: usize) -> (Actor, Receiver<ActorEvent>) {
    let lib = loader::load(
        &fixtures::library(fixture, Profile::Dev),
        &Policy::default(),
    )
    .unwrap();
    let services = InstanceServices::new(
        Identity {
            instance: format!("{fixture}-{id}"),
            plugin: lib.manifest().name.clone(),
            version: lib.manifest().version.clone(),
            generation: 1,
        },
        PublishLimits {
            max_message_size: 1 << 20,
            hop_limit: 4,
        },
        Arc::new(Nowhere),
    );
    let plugin = lib
        .instantiate(config, plugind_api::hosting::host_handle(services.clone()))
        .unwrap();
    let (events, inbox) = unbounded();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let actor = Actor::spawn(
        plugin,
        services,
        ActorDeps {
            instance: id,
            generation: 1,
            capacity,
            events,
            clock,
            marker: None,
            markers: Arc::new(|| None),
            deferrals: Deferrals::new(64, Duration::from_secs(30)),
            first_call: None,
        },
    )
    .unwrap();
    (actor, inbox)
}

fn message(id: u64, headers: &[(&str, &str)]) -> Handoff {
    Handoff {
        message: Arc::new(StoredMessage {
            id,
            topic: "echo.test".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: Bytes::from(format!("payload {id}")),
            publish_time: Timestamp(1),
        }),
        attempt: 1,
    }
}

fn deadlines(total_ms: u64) -> Deadlines {
    Deadlines {
        total: Duration::from_millis(total_ms),
        shutdown: Duration::from_secs(10),
    }
}

/// Waits for the next event, failing the test after 10 s.
fn next(events: &Receiver<ActorEvent>) -> ActorEvent {
    events
        .recv_timeout(Duration::from_secs(10))
        .expect("an actor event within 10 s")
}

#[test]
fn handoffs_are_handled_in_order_settled_in_batches_and_credits_return() {
    let (mut a, events) = actor(0, "fx-echo", "{}", 64);
    let mut next_id = 1;
    let mut seen = Vec::new();
    let mut batches = 0;
    while seen.len() < 500 {
        let room = a.room();
        let batch: Vec<Handoff> = (0..room.min(500 - (next_id as usize - 1)))
            .map(|_| {
                next_id += 1;
                message(next_id - 1, &[])
            })
            .collect();
        a.offer(batch);
        assert_eq!(a.room(), 64 - (next_id as usize - 1 - seen.len()));
        if let ActorEvent::Settled { settlements, .. } = next(&events) {
            batches += 1;
            a.settled(settlements.len());
            for s in settlements {
                assert_eq!(s.result, Ok(Outcome::Ack));
                seen.push(s.message);
            }
        }
    }
    assert_eq!(seen, (1..=500).collect::<Vec<_>>(), "acceptance order kept");
    assert!(
        batches < 500,
        "settlements flow back in batches ({batches} for 500)"
    );
    assert_eq!(a.join(deadlines(5_000), &SystemClock), JoinOutcome::Joined);
}

#[test]
#[should_panic(expected = "with room for 2")]
fn offering_more_than_the_room_is_a_dispatcher_bug() {
    let (mut a, _events) = actor(0, "fx-echo", "{}", 2);
    a.offer((1..=3).map(|id| message(id, &[])).collect());
}

#[test]
fn a_panic_settles_as_a_failure_and_the_next_message_still_flows() {
    let (mut a, events) = actor(0, "fx-faulty", r#"{"fail":"handle-panic"}"#, 8);
    a.offer(vec![message(1, &[]), message(2, &[])]);
    let mut results = Vec::new();
    while results.len() < 2 {
        if let ActorEvent::Settled { settlements, .. } = next(&events) {
            results.extend(settlements.into_iter().map(|s| s.result));
        }
    }
    for result in results {
        let e = result.unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Panic);
        assert!(e.message.contains("index out of bounds"), "{}", e.message);
    }
}

#[test]
fn children_published_in_handle_come_back_with_the_settlement() {
    let (mut a, events) = actor(0, "fx-echo", "{}", 8);
    a.offer(vec![message(
        1,
        &[("publish", "copies.out"), (HOP_HEADER, "2")],
    )]);
    let ActorEvent::Settled { settlements, .. } = next(&events) else {
        panic!("expected a settlement")
    };
    assert_eq!(settlements[0].result, Ok(Outcome::Ack));
    let child = &settlements[0].children[0];
    assert_eq!(child.topic, "copies.out");
    assert_eq!(child.payload, Bytes::from("payload 1"));
    assert!(
        child
            .headers
            .contains(&(HOP_HEADER.to_owned(), "3".to_owned()))
    );
}

#[test]
fn a_stop_finishes_the_call_in_hand_and_releases_the_rest() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let config = format!(r#"{{"gate":"{}"}}"#, gate_file.display());
    let (mut a, events) = actor(0, "fx-block", &config, 8);
    a.offer((1..=5).map(|id| message(id, &[])).collect());
    while a.busy_since().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(gate_file, b"").unwrap();
    });
    assert_eq!(a.join(deadlines(10_000), &SystemClock), JoinOutcome::Joined);
    opener.join().unwrap();
    let ActorEvent::Settled { settlements, .. } = next(&events) else {
        panic!("the call in hand settles first")
    };
    assert_eq!(settlements.len(), 1);
    assert_eq!(
        (settlements[0].message, &settlements[0].result),
        (1, &Ok(Outcome::Ack))
    );
    let ActorEvent::Released { released, .. } = next(&events) else {
        panic!("then what it never started")
    };
    assert_eq!(
        released.iter().map(|h| h.message.id).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    let ActorEvent::Stopped { shutdown_error, .. } = next(&events) else {
        panic!("then the stop report")
    };
    assert_eq!(shutdown_error, None);
}

#[test]
fn a_hung_call_is_abandoned_after_the_deadline_and_its_late_result_arrives_stale() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let config = format!(r#"{{"gate":"{}"}}"#, gate_file.display());
    let (mut a, events) = actor(0, "fx-block", &config, 8);
    a.offer(vec![message(1, &[])]);
    while a.busy_since().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    match a.join(deadlines(200), &SystemClock) {
        JoinOutcome::Abandoned { busy_for } => assert!(busy_for >= Duration::from_millis(150)),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the caller was not held"
    );
    // Unblocked later, the abandoned thread's result still comes back: the dispatcher
    // discards it as stale (its attempt is no longer in flight).
    std::fs::write(&gate_file, b"").unwrap();
    assert!(matches!(next(&events), ActorEvent::Settled { .. }));
    assert!(matches!(next(&events), ActorEvent::Released { .. }));
    assert!(matches!(next(&events), ActorEvent::Stopped { .. }));
}

#[test]
fn a_blocked_instance_delays_no_other_instance() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let config = format!(r#"{{"gate":"{}"}}"#, gate_file.display());
    let (mut blocked, _blocked_events) = actor(0, "fx-block", &config, 8);
    blocked.offer(vec![message(1, &[])]);
    let (mut free, events) = actor(1, "fx-echo", "{}", 128);
    free.offer((1..=100).map(|id| message(id, &[])).collect());
    let mut acked = 0;
    while acked < 100 {
        if let ActorEvent::Settled { settlements, .. } = next(&events) {
            acked += settlements
                .iter()
                .filter(|s| s.result == Ok(Outcome::Ack))
                .count();
        }
    }
    assert!(
        blocked.busy_since().is_some(),
        "still blocked while the other acked 100"
    );
    std::fs::write(&gate_file, b"").unwrap();
    assert_eq!(
        blocked.join(deadlines(10_000), &SystemClock),
        JoinOutcome::Joined
    );
}
