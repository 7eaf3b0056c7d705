//! The delivery engine through the host library's ingress API, with real fixture plugins
//! loaded by the real loader: fan-out, retries, dead letters, a blocked instance, pipelines,
//! the backlog limit and a graceful stop.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use plugind::{
    backlog::BacklogFull,
    clock::{Clock, ManualClock, SystemClock, Timestamp},
    config,
    dispatch::{InstanceStats, Snapshot},
    engine::{Engine, EngineOptions},
    ingress::{NewMessage, PublishRefused},
    ledger::{
        DeadLetterFilter, Forget, Ledger, MemoryLedger, Selection,
        durable::{self, DurableLedger, Mode},
    },
    supervisor::ActRefused,
};
use plugind_tests::{
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

/// A deployment in a sandbox: the fixture libraries in `plugins.d/`, then `plugins.toml`.
struct Deployment {
    sandbox: Sandbox,
    engine: Option<Engine>,
}

fn start(libraries: &[&str], config_text: &str) -> Deployment {
    start_with(libraries, config_text, Arc::new(SystemClock))
}

fn start_with(libraries: &[&str], config_text: &str, clock: Arc<dyn Clock>) -> Deployment {
    let (d, failures) = try_start(libraries, config_text, clock);
    assert!(failures.is_empty(), "{failures:?}");
    d
}

fn try_start(
    libraries: &[&str],
    config_text: &str,
    clock: Arc<dyn Clock>,
) -> (Deployment, Vec<plugind::engine::StartFailure>) {
    try_start_on(libraries, config_text, clock, |_| MemoryLedger::new())
}

/// A deployment whose ledger is durable, in the sandbox's `state/`.
fn start_durable(libraries: &[&str], config_text: &str) -> Deployment {
    let (d, failures) = try_start_on(libraries, config_text, Arc::new(SystemClock), |sandbox| {
        DurableLedger::open(
            &sandbox.path().join("state"),
            durable::LedgerOptions {
                mode: Mode::Fsync,
                max_bytes: None,
                dedupe_window: Duration::from_secs(60),
                dead_letter_retention: None,
                clock: Arc::new(SystemClock),
                fail_stop: None,
                fresh: false,
            },
        )
        .unwrap()
    });
    assert!(failures.is_empty(), "{failures:?}");
    d
}

fn try_start_on(
    libraries: &[&str],
    config_text: &str,
    clock: Arc<dyn Clock>,
    ledger: impl FnOnce(&Sandbox) -> Arc<dyn Ledger>,
) -> (Deployment, Vec<plugind::engine::StartFailure>) {
    let sandbox = Sandbox::new("engine");
    sandbox.dir("plugins.d");
    for fixture in libraries {
        sandbox.copy(
            &format!("plugins.d/{fixture}.so"),
            &fixtures::library(fixture, Profile::Dev),
        );
    }
    let text = format!("[host]\nautoload = false\n\n{config_text}");
    let path = sandbox.put("plugins.toml", &text);
    let config = config::parse(&path, &text).unwrap_or_else(|e| panic!("{}", e.render()));
    let options = EngineOptions {
        clock,
        probe: None,
        watch: false,
        notifier: None,
        fail_stop: None,
    };
    let (engine, failures) = Engine::start(&config, ledger(&sandbox), options).unwrap();
    (
        Deployment {
            sandbox,
            engine: Some(engine),
        },
        failures,
    )
}

impl Deployment {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("running")
    }

    fn publish(&self, topic: &str, payload: &str) -> Result<u64, PublishRefused> {
        self.engine()
            .ingress()
            .publish_one(NewMessage {
                topic: topic.into(),
                payload: Bytes::from(payload.to_owned()),
                headers: vec![],
                key: None,
            })
            .map(|p| p.id)
    }

    fn stats(&self, name: &str) -> InstanceStats {
        self.engine()
            .snapshot()
            .instances
            .into_iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no instance {name}"))
    }

    /// Waits (10 s at most) until `done` holds for the snapshot.
    fn until(&self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let start = Instant::now();
        loop {
            let snapshot = self.engine().snapshot();
            if done(&snapshot) {
                return snapshot;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: {snapshot:#?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> plugind::dispatch::StopReport {
        self.engine
            .take()
            .expect("running")
            .stop(Duration::from_secs(5))
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.stop(Duration::from_secs(5));
        }
        let _ = &self.sandbox;
    }
}

fn acked(snapshot: &Snapshot, name: &str) -> u64 {
    snapshot
        .instances
        .iter()
        .find(|i| i.name == name)
        .map_or(0, |i| i.outcomes.ack)
}

#[test]
fn every_message_fans_out_to_every_subscribed_instance() {
    let d = start(
        &["fx-echo"],
        "\
[plugins.left]
plugin = \"fx-echo\"
topics = [\"orders.>\"]
[plugins.left.config]
label = \"left\"

[plugins.right]
plugin = \"fx-echo\"
topics = [\"orders.eu.*\"]
[plugins.right.config]
label = \"right\"
",
    );
    for i in 0..20 {
        d.publish("orders.eu.new", &format!("order {i}")).unwrap();
    }
    d.publish("orders.us.new", "only left").unwrap();
    d.until("both acked", |s| {
        acked(s, "left") == 21 && acked(s, "right") == 20
    });
    assert_eq!(
        d.publish("billing.paid", "nobody").map(|_| ()),
        Ok(()),
        "accepted, not stored"
    );
    assert_eq!(d.engine().ingress().unrouted(), 1);
    let counts = d.engine().ledger().counts();
    assert_eq!((counts.accepted, counts.acked), (21, 41));
}

#[test]
fn a_flaky_plugin_is_acked_on_the_attempt_after_its_failures() {
    let d = start(
        &["fx-flaky"],
        "\
[plugins.flaky]
plugin = \"fx-flaky\"
topics = [\"jobs.>\"]
max_attempts = 5
backoff = { initial = \"10ms\", max = \"50ms\" }
[plugins.flaky.config]
fail_times = 2
",
    );
    d.publish("jobs.a", "x").unwrap();
    let s = d.until("acked", |s| acked(s, "flaky") == 1);
    let flaky = &s.instances[0];
    assert_eq!(
        (flaky.failures, flaky.dead_lettered, flaky.backlog),
        (2, 0, 0)
    );
    assert_eq!(
        d.engine().ledger().counts().attempts,
        3,
        "acked on attempt 3"
    );
}

#[test]
fn a_panicking_plugin_is_dead_lettered_at_max_attempts_while_others_flow() {
    let d = start(
        &["fx-faulty", "fx-echo"],
        "\
[plugins.bad]
plugin = \"fx-faulty\"
topics = [\"work.>\"]
max_attempts = 3
backoff = { initial = \"5ms\", max = \"20ms\" }
circuit = { failures = 100 }
[plugins.bad.config]
fail = \"handle-panic\"

[plugins.good]
plugin = \"fx-echo\"
topics = [\"work.>\"]
",
    );
    for i in 0..5 {
        d.publish("work.item", &i.to_string()).unwrap();
    }
    d.until("all settled", |s| {
        acked(s, "good") == 5
            && s.instances
                .iter()
                .any(|i| i.name == "bad" && i.dead_lettered == 5)
    });
    let dead = d
        .engine()
        .ledger()
        .dead_letters(&DeadLetterFilter {
            instance: Some("bad".into()),
            ..DeadLetterFilter::default()
        })
        .unwrap();
    assert_eq!(dead.len(), 5);
    for letter in dead {
        assert_eq!(
            (letter.delivery.deliveries, letter.delivery.failures),
            (3, 3)
        );
        let reason = letter.delivery.last_reason.unwrap();
        assert!(reason.starts_with("panic: panicked at "), "{reason}");
        assert_eq!(
            letter.delivery.history.len(),
            3,
            "the attempt history is kept"
        );
    }
}

#[test]
fn a_blocked_instance_delays_neither_ingress_nor_other_instances() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let d = start(
        &["fx-block", "fx-echo"],
        &format!(
            "\
[plugins.stuck]
plugin = \"fx-block\"
topics = [\"t.>\"]
[plugins.stuck.config]
gate = \"{}\"

[plugins.free]
plugin = \"fx-echo\"
topics = [\"t.>\"]
",
            gate_file.display()
        ),
    );
    let started = Instant::now();
    for i in 0..100 {
        d.publish("t.x", &i.to_string()).unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ingress was not held up"
    );
    d.until("the free instance acked 100", |s| acked(s, "free") == 100);
    assert_eq!(d.stats("stuck").outcomes.ack, 0, "still blocked");
    std::fs::write(&gate_file, b"").unwrap();
    d.until("the stuck one catches up", |s| acked(s, "stuck") == 100);
}

#[test]
fn children_of_a_failed_attempt_are_never_delivered_and_one_per_message_is() {
    let d = start(
        &["fx-pipeline", "fx-echo"],
        "\
[plugins.upper]
plugin = \"fx-pipeline\"
topics = [\"in.>\"]
[plugins.upper.config]
to = \"out.upper\"
fail_first = true

[plugins.sink]
plugin = \"fx-echo\"
topics = [\"out.>\"]
",
    );
    for i in 0..10 {
        d.publish("in.text", &format!("hello {i}")).unwrap();
    }
    d.until("parents acked", |s| acked(s, "upper") == 10);
    d.until("children delivered", |s| acked(s, "sink") == 10);
    // Nothing else arrives: the children published during the failed first attempts were
    // discarded with them.
    std::thread::sleep(Duration::from_millis(200));
    let s = d.engine().snapshot();
    assert_eq!((acked(&s, "upper"), acked(&s, "sink")), (10, 10));
    assert_eq!(d.stats("upper").failures, 10, "each parent failed once");
}

#[test]
fn past_max_backlog_a_publish_is_refused_naming_the_instance() {
    let gate = Sandbox::new("gate");
    let d = start(
        &["fx-block"],
        &format!(
            "\
[plugins.slow]
plugin = \"fx-block\"
topics = [\"t.>\"]
max_backlog = 1024
[plugins.slow.config]
gate = \"{}\"
",
            gate.path().join("never").display()
        ),
    );
    let payload = "x".repeat(400);
    d.publish("t.a", &payload).unwrap();
    d.publish("t.a", &payload).unwrap();
    match d.publish("t.a", &payload) {
        Err(PublishRefused::Backlog(BacklogFull {
            instance,
            backlog,
            limit,
        })) => assert_eq!((instance.as_str(), backlog, limit), ("slow", 800, 1024)),
        other => panic!("{other:?}"),
    }
    // Other topics are not affected.
    assert!(d.publish("elsewhere", &payload).is_ok());
}

#[test]
fn a_graceful_stop_finishes_the_call_in_hand_and_releases_the_rest() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let d = start(
        &["fx-block"],
        &format!(
            "\
[plugins.slow]
plugin = \"fx-block\"
topics = [\"t.>\"]
[plugins.slow.config]
gate = \"{}\"
",
            gate_file.display()
        ),
    );
    for i in 0..5 {
        d.publish("t.a", &i.to_string()).unwrap();
    }
    d.until("one call in hand", |s| s.instances[0].in_flight >= 1);
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(gate_file, b"").unwrap();
    });
    let report = d.stop();
    opener.join().unwrap();
    assert!(report.abandoned.is_empty(), "{report:?}");
    assert!(
        report.released >= 1,
        "the unstarted ones were handed back: {report:?}"
    );
}

#[test]
fn an_expired_lease_is_a_timeout_failure_marks_the_instance_hung_and_its_late_result_is_stale() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let clock = ManualClock::at(Timestamp(1_000_000));
    let d = start_with(
        &["fx-block"],
        &format!(
            "\
[plugins.slow]
plugin = \"fx-block\"
topics = [\"t.>\"]
ack_timeout = \"30s\"
backoff = {{ initial = \"1s\", jitter = 0.0 }}
[plugins.slow.config]
gate = \"{}\"
",
            gate_file.display()
        ),
        Arc::new(clock.clone()),
    );
    d.publish("t.a", "x").unwrap();
    // In a call, not only handed out: a lease that ends before the call starts is a timeout
    // with no call to call hung.
    d.until("in a call", |s| s.instances[0].calling == 1);
    clock.advance(Duration::from_secs(29));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.stats("slow").failures, 0, "the lease has not ended yet");
    clock.advance(Duration::from_secs(2));
    let s = d.until("timed out", |s| s.instances[0].failures == 1);
    assert!(s.instances[0].hung, "the call outlived its lease: {s:#?}");
    clock.advance(Duration::from_secs(2));
    std::fs::write(&gate_file, b"").unwrap();
    // The first attempt's late ack is refused; the retry (attempt 2) acks.
    let s = d.until("acked by the retry", |s| s.instances[0].outcomes.ack == 1);
    assert_eq!(s.stale, 1);
    assert!(!s.instances[0].hung);
}

#[test]
fn failures_on_distinct_messages_open_the_circuit_then_one_probe_per_interval() {
    // Retries wait for the manual clock (1 s): with a backoff of 1 ms, which jitter can round
    // to 0, a message published first could use its three attempts before the publisher,
    // slow on a loaded machine, had sent the others.
    let clock = ManualClock::at(Timestamp(1_000_000));
    let d = start_with(
        &["fx-flaky"],
        "\
[plugins.down]
plugin = \"fx-flaky\"
topics = [\"t.>\"]
max_attempts = 3
backoff = { initial = \"1s\", max = \"1s\" }
circuit = { failures = 3, window = \"30s\", probe = \"10s\" }
[plugins.down.config]
fail_times = 1000
",
        Arc::new(clock.clone()),
    );
    for i in 0..5 {
        d.publish("t.a", &i.to_string()).unwrap();
    }
    let s = d.until("circuit open", |s| {
        matches!(
            s.instances[0].circuit,
            Some(plugind::circuit::BreakerState::Open { .. })
        )
    });
    let attempts = d.engine().ledger().counts().attempts;
    assert_eq!(
        s.instances[0].dead_lettered, 0,
        "an outage burns no message's attempts"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        d.engine().ledger().counts().attempts,
        attempts,
        "nothing goes out while open"
    );
    clock.advance(Duration::from_secs(10));
    d.until("one probe", |_| {
        d.engine().ledger().counts().attempts == attempts + 1
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        d.engine().ledger().counts().attempts,
        attempts + 1,
        "only one probe"
    );
    assert_eq!(d.stats("down").dead_lettered, 0);
}

#[test]
fn a_new_that_outlives_init_timeout_keeps_only_that_instance_from_starting() {
    let gate = Sandbox::new("gate");
    let (d, failures) = try_start(
        &["fx-block", "fx-echo"],
        &format!(
            "\
[plugins.stuck]
plugin = \"fx-block\"
topics = [\"t.>\"]
init_timeout = \"200ms\"
[plugins.stuck.config]
gate = \"{}\"
block_new = true

[plugins.fine]
plugin = \"fx-echo\"
topics = [\"t.>\"]
",
            gate.path().join("never").display()
        ),
        Arc::new(SystemClock),
    );
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].instance, "stuck");
    assert!(
        failures[0]
            .error
            .to_string()
            .contains("did not finish within init_timeout (200ms)"),
        "{}",
        failures[0].error
    );
    d.publish("t.a", "x").unwrap();
    let s = d.until("the other instance works", |s| acked(s, "fine") == 1);
    let stuck = s.instances.iter().find(|i| i.name == "stuck").unwrap();
    assert_eq!(
        (stuck.running, stuck.backlog),
        (false, 1),
        "its delivery waits in the ledger"
    );
}

#[test]
fn stopping_a_hung_instance_abandons_it_after_hang_grace() {
    let gate = Sandbox::new("gate");
    let clock = ManualClock::at(Timestamp(1_000_000));
    let mut d = start_with(
        &["fx-block"],
        &format!(
            "\
[plugins.slow]
plugin = \"fx-block\"
topics = [\"t.>\"]
ack_timeout = \"30s\"
hang_grace = \"200ms\"
[plugins.slow.config]
gate = \"{}\"
",
            gate.path().join("never").display()
        ),
        Arc::new(clock.clone()),
    );
    d.publish("t.a", "x").unwrap();
    // In a call, not only handed out (see above).
    d.until("in a call", |s| s.instances[0].calling == 1);
    clock.advance(Duration::from_secs(31));
    d.until("hung", |s| s.instances[0].hung);
    let started = Instant::now();
    let report = d.engine.take().unwrap().stop(Duration::from_secs(30));
    assert_eq!(report.abandoned, ["slow"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "hang_grace, not the 30 s grace"
    );
}

#[test]
fn a_shutdown_that_outlives_shutdown_timeout_is_abandoned() {
    let gate = Sandbox::new("gate");
    let mut d = start(
        &["fx-block", "fx-echo"],
        &format!(
            "\
[plugins.sticky]
plugin = \"fx-block\"
topics = [\"t.>\"]
shutdown_timeout = \"200ms\"
[plugins.sticky.config]
gate = \"{}\"
block_shutdown = true

[plugins.fine]
plugin = \"fx-echo\"
topics = [\"t.>\"]
",
            gate.path().join("never").display()
        ),
    );
    let started = Instant::now();
    let report = d.engine.take().unwrap().stop(Duration::from_secs(30));
    assert_eq!(
        report.abandoned,
        ["sticky"],
        "named; the other stopped cleanly"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown_timeout, not the grace"
    );
}

#[test]
fn a_publish_from_a_plugins_own_thread_is_accepted_at_once_not_staged() {
    let d = start(
        &["fx-pipeline", "fx-echo"],
        "\
[plugins.upper]
plugin = \"fx-pipeline\"
topics = [\"in.>\"]
[plugins.upper.config]
to = \"out.upper\"
fail_first = true
from_thread = true

[plugins.sink]
plugin = \"fx-echo\"
topics = [\"out.>\"]
",
    );
    for i in 0..10 {
        d.publish("in.text", &format!("hello {i}")).unwrap();
    }
    // Published outside `handle`, each child stands on its own: the failed first attempts'
    // children are delivered too (two per parent), unlike staged ones.
    d.until("parents acked", |s| acked(s, "upper") == 10);
    d.until("both children of each parent delivered", |s| {
        acked(s, "sink") == 20
    });
}

#[test]
fn a_durable_engine_keeps_only_queue_capacity_plus_max_in_flight_payloads_of_a_backlog() {
    let gate = Sandbox::new("gate");
    let gate_file = gate.path().join("open");
    let d = start_durable(
        &["fx-block"],
        &format!(
            "\
[plugins.slow]
plugin = \"fx-block\"
topics = [\"t.>\"]
queue_capacity = 8
max_in_flight = 4
[plugins.slow.config]
gate = \"{}\"
",
            gate_file.display()
        ),
    );
    for i in 0..500 {
        d.publish("t.x", &format!("payload {i}")).unwrap();
    }
    let stats = d.stats("slow");
    assert_eq!(stats.backlog, 500);
    assert!(
        stats.resident <= 8 + 4,
        "at most queue_capacity + max_in_flight payloads in memory: {stats:?}"
    );
    std::fs::write(&gate_file, b"").unwrap();
    d.until("every message was read back and acked", |s| {
        acked(s, "slow") == 500
    });
    assert_eq!(d.stats("slow").resident, 0);
}

#[test]
fn replayed_dead_letters_are_delivered_again_and_forget_ends_a_backlog() {
    let d = start_durable(
        &["fx-faulty"],
        "\
[plugins.bad]
plugin = \"fx-faulty\"
topics = [\"bad.>\"]
max_attempts = 1
circuit = { failures = 100 }
[plugins.bad.config]
fail = \"handle-panic\"
",
    );
    for i in 0..5 {
        d.publish("bad.x", &i.to_string()).unwrap();
    }
    d.until("dead-lettered", |s| {
        s.instances
            .iter()
            .any(|i| i.name == "bad" && i.dead_lettered == 5)
    });
    let ledger = d.engine().ledger().clone();
    assert_eq!(
        ledger
            .dead_letters(&DeadLetterFilter::default())
            .unwrap()
            .len(),
        5
    );
    let (queued, waiting) = d
        .engine()
        .replay(&Selection {
            instance: Some("bad".into()),
            messages: vec![],
        })
        .unwrap();
    assert_eq!((queued, waiting), (5, 0));
    d.until("dead-lettered again after the replay", |s| {
        s.instances
            .iter()
            .any(|i| i.name == "bad" && i.dead_lettered == 10)
    });
    let history = ledger.history(1).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0].delivery.history.len(),
        2,
        "the attempt before the replay is kept: {history:?}"
    );
    // `bad` is configured: its subscription ends only when its table goes, so forget is
    // refused naming the table; an instance never heard of is not found.
    let refused = d.engine().forget("bad", Forget::Purge).unwrap_err();
    assert!(
        matches!(&refused, ActRefused::Configured { instance, .. } if instance == "bad"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("[plugins.bad]"), "{refused}");
    assert!(matches!(
        d.engine().forget("gone", Forget::DeadLetter),
        Err(ActRefused::Unknown(_))
    ));
}

/// The config file's hash, as `Reload` expects it.
fn hash_of(path: &std::path::Path) -> [u8; 32] {
    let text = std::fs::read_to_string(path).unwrap();
    config::parse(path, &text).unwrap().hash
}

#[test]
fn reload_applies_a_new_config_and_refuses_a_stale_hash_an_invalid_file_or_an_unknown_name() {
    use plugind::{config::Change, supervisor::ReloadRefused};
    let one = "[plugins.a]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]\n";
    let d = start(&["fx-echo"], one);
    let path = d.sandbox.path().join("plugins.toml");
    let before = hash_of(&path);
    let two = format!("[host]\nautoload = false\n\n{one}\n[plugins.b]\nplugin = \"fx-echo\"\n");
    std::fs::write(&path, &two).unwrap();
    // Someone else's edit since the caller read the file: refused, nothing applied.
    let stale = d.engine().supervisor().reload(Some(before), None);
    assert!(
        matches!(stale, Err(ReloadRefused::Changed { .. })),
        "{stale:?}"
    );
    assert!(d.engine().instance("b").is_none());
    let applied = d
        .engine()
        .supervisor()
        .reload(Some(hash_of(&path)), None)
        .unwrap();
    assert_eq!(applied.plan.instances["b"], Change::Start);
    assert_eq!(applied.plan.instances["a"], Change::Unchanged);
    assert!(applied.failures.is_empty(), "{:?}", applied.failures);
    d.until("b runs", |s| {
        s.instances.iter().any(|i| i.name == "b" && i.running)
    });
    // A mistake: refused whole with its position; what ran keeps running.
    std::fs::write(&path, format!("{two}\n[plugins.c]\nplugin = 7\n")).unwrap();
    let Err(ReloadRefused::Invalid(error)) = d.engine().supervisor().reload(None, None) else {
        panic!("an invalid file is refused");
    };
    assert!(error.contains("plugins.toml:"), "{error}");
    assert!(d.stats("a").running && d.stats("b").running);
    let events = d.engine().events().history();
    assert!(
        events
            .iter()
            .any(|e| serde_json::to_value(e).unwrap()["event"] == "config_refused"),
        "{events:?}"
    );
    std::fs::write(&path, &two).unwrap();
    assert!(matches!(
        d.engine().supervisor().reload(None, Some("nope".into())),
        Err(ReloadRefused::UnknownInstance(_))
    ));
}

#[test]
fn a_durable_engine_holds_no_payload_of_an_instance_that_waits_and_reads_them_back_when_it_starts()
{
    // A disabled instance's backlog was held in memory byte for byte (a compact copy of every
    // payload: 600 MB waiting took 627 MB of RSS); in the ledger it waits for free.
    let record = Sandbox::new("record");
    let path = record.path().join("rec.txt");
    // A pipeline stage's children (committed with their parents' acks) wait for it too.
    let instance = |enabled: bool| {
        format!(
            "[plugins.rec]\nplugin = \"fx-record\"\ntopics = [\"t.>\"]\nenabled = {enabled}\n\
             [plugins.rec.config]\npath = \"{}\"\n\n\
             [plugins.stage]\nplugin = \"fx-pipeline\"\ntopics = [\"in.>\"]\n\
             [plugins.stage.config]\nto = \"t.child\"\n",
            path.display()
        )
    };
    let d = start_durable(&["fx-record", "fx-pipeline"], &instance(false));
    let mut payloads: Vec<String> = (0..300)
        .map(|i| format!("{i:04}{}", "x".repeat(4096)))
        .collect();
    for payload in &payloads {
        d.publish("t.x", payload).unwrap();
    }
    for i in 0..20 {
        d.publish("in.x", &format!("child {i}")).unwrap();
    }
    payloads.extend((0..20).map(|i| format!("CHILD {i}")));
    d.until("the stage published its children", |s| {
        acked(s, "stage") == 20
    });
    let stats = d.stats("rec");
    assert_eq!((stats.running, stats.backlog), (false, 320));
    assert_eq!(
        stats.resident, 0,
        "payloads held for an instance that waits: {stats:?}"
    );
    // Enabled, it gets every one, in order, read back from the ledger.
    let config = d.sandbox.path().join("plugins.toml");
    std::fs::write(
        &config,
        format!("[host]\nautoload = false\n\n{}", instance(true)),
    )
    .unwrap();
    d.engine().supervisor().reload(None, None).unwrap();
    d.until("every waiting message delivered", |s| {
        acked(s, "rec") == 320
    });
    let seen: Vec<String> = plugind_tests::record::read_record(&path)
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(seen, payloads);
    assert_eq!(d.stats("rec").resident, 0);
}

#[test]
fn an_idempotency_key_is_deduplicated_by_the_ingress_whichever_way_a_message_comes_in() {
    // The keys table lived in the gRPC publisher: the same key through the ingress itself
    // (a plugin, the engine's API) was published twice.
    let d = start(
        &["fx-echo"],
        "[plugins.a]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]\n",
    );
    let keyed = |key: &str| NewMessage {
        topic: "echo.k".into(),
        payload: Bytes::from_static(b"once"),
        headers: vec![],
        key: Some(key.into()),
    };
    let ingress = d.engine().ingress();
    let first = ingress.publish_one(keyed("order-1")).unwrap();
    let again = ingress.publish_one(keyed("order-1")).unwrap();
    assert_eq!((again.id, again.duplicate), (first.id, true));
    assert!(!first.duplicate);
    // A keyed batch: the repeat inside it too, one submission.
    let batch = ingress.publish(vec![keyed("order-2"), keyed("order-2"), keyed("order-1")]);
    let batch: Vec<(u64, bool)> = batch
        .into_iter()
        .map(|r| r.map(|p| (p.id, p.duplicate)).unwrap())
        .collect();
    assert_eq!(batch[1], (batch[0].0, true));
    assert_eq!(batch[2], (first.id, true));
    // Two messages were stored, whatever was published.
    assert_eq!(d.engine().ledger().counts().accepted, 2);
    d.until("the first of each key delivered", |s| acked(s, "a") == 2);
}

/// Waits (20 s at most) until `done` holds for what the supervisor publishes.
fn until_view(
    engine: &Engine,
    what: &str,
    done: impl Fn(&plugind::supervisor::SupervisorView) -> bool,
) -> Arc<plugind::supervisor::SupervisorView> {
    let start = Instant::now();
    loop {
        let view = engine.supervisor().view();
        if done(&view) {
            return view;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {view:#?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An engine watching its sandbox's `plugins.d/` (the fixtures `libraries`) and
/// `plugins.toml` (`config_text`), as `plugind run` does.
fn start_watched(libraries: &[&str], config_text: &str) -> (Sandbox, Engine) {
    let sandbox = Sandbox::with_fixtures("engine", libraries);
    let path = sandbox.put("plugins.toml", config_text);
    let config = config::parse(&path, config_text).unwrap_or_else(|e| panic!("{}", e.render()));
    let options = EngineOptions {
        clock: Arc::new(SystemClock),
        probe: None,
        watch: true,
        notifier: None,
        fail_stop: None,
    };
    let (engine, failures) = Engine::start(&config, MemoryLedger::new(), options).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    (sandbox, engine)
}

/// A change of `plugins.toml` alone made the supervisor read and check every library in
/// `plugin_dir` again (a config event from the watcher rescanned the directory). Libraries
/// are read again when the watcher reports one of them, or an operator reloads.
#[test]
fn a_config_change_seen_by_the_watcher_does_not_check_the_libraries_again() {
    let one = "[host]\nautoload = false\n\n[plugins.a]\nplugin = \"fx-echo\"\n";
    let (sandbox, engine) = start_watched(&["fx-echo", "fx-noop"], one);
    let path = sandbox.path().join("plugins.toml");
    let checks = engine.supervisor().view().library_checks;
    assert_eq!(checks, 2, "the first scan checks each library once");

    // plugins.toml alone changes (renamed into place, as editors do): applied, and no library
    // is read for it.
    let two = format!("{one}\n[plugins.b]\nplugin = \"fx-noop\"\n");
    let tmp = sandbox.put("plugins.toml.tmp", &two);
    std::fs::rename(&tmp, &path).unwrap();
    let sha256 = hex::encode(hash_of(&path));
    let view = until_view(&engine, "the new configuration is applied", |v| {
        v.config_sha256 == sha256
            && v.instances
                .iter()
                .any(|i| i.name == "b" && i.state.name() == "running")
    });
    assert_eq!(
        view.library_checks, checks,
        "a config-only change re-read the libraries"
    );

    // A library's own change is read (once the watcher reports it).
    sandbox.copy(
        "plugins.d/fx-record.so",
        &fixtures::library("fx-record", Profile::Dev),
    );
    let view = until_view(&engine, "the new library is checked", |v| {
        v.library_checks > checks
    });
    // An operator's reload reads plugin_dir again, every library.
    let before = view.library_checks;
    engine.supervisor().reload(None, None).unwrap();
    assert!(
        engine.supervisor().view().library_checks >= before + 3,
        "an operator's reload checks every library again"
    );
    engine.stop(Duration::from_secs(5));
}

/// The supervisor alone decides that the same bytes are nothing to do (the watcher reads no
/// file): a library renamed in again with the bytes that run is checked, and nothing else
/// happens.
#[test]
fn the_same_library_bytes_renamed_in_again_are_nothing_to_do() {
    let one = "[host]\nautoload = false\n\n[plugins.a]\nplugin = \"fx-echo\"\n";
    let (sandbox, engine) = start_watched(&["fx-echo"], one);
    let before = engine.supervisor().view();
    let events = engine.events().history().len();
    let library = sandbox.path().join("plugins.d/fx-echo.so");
    let tmp = sandbox.copy("plugins.d/.fx-echo.so.tmp", &library);
    std::fs::rename(&tmp, &library).unwrap();
    let after = until_view(&engine, "the library is checked again", |v| {
        v.library_checks > before.library_checks
    });
    assert_eq!(
        after.instances, before.instances,
        "the same bytes changed what runs"
    );
    assert_eq!(
        engine.events().history().len(),
        events,
        "the same bytes made events: {:?}",
        engine.events().history()
    );
    engine.stop(Duration::from_secs(5));
}
