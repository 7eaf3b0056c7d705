//! The daemon as a library: the front — the daemon's use cases as plain typed Rust — on a
//! real engine with real fixture plugins and a durable ledger, with no transport in between
//! (publish with keys, the joined instance status, pause, a message's history, dead letters
//! paged, replay, purge, forget, the watch, the errors); and `daemon::run(config, options,
//! shutdown)` serving the API in process until its shutdown resolves.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use plugind::{
    clock::SystemClock,
    config::{self, Durability},
    control::{client, pb},
    daemon::{self, DaemonError},
    engine::{Engine, EngineOptions},
    front::{
        AttemptOutcome, CircuitState, DeliveryStage, Forget, Front, InstanceState, InstanceStatus,
        NewMessage, OperateError, PageRequest, Pick, WatchStep,
    },
    ledger::{
        FailStop,
        durable::{self, DurableLedger, Mode},
    },
};
use plugind_tests::{
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

const CONFIG: &str = "\
[host]
autoload = false

[plugins.good]
plugin = \"fx-echo\"
topics = [\"good.>\"]

[plugins.bad]
plugin = \"fx-faulty\"
topics = [\"bad.>\"]
max_attempts = 1
circuit = { failures = 100 }
[plugins.bad.config]
fail = \"handle-panic\"
";

/// A front on an engine in a sandbox, stopped when dropped.
struct Running {
    _sandbox: Sandbox,
    engine: Arc<Engine>,
    front: Front,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.engine.stop(Duration::from_secs(5));
    }
}

fn start() -> Running {
    let sandbox = Sandbox::new("front");
    sandbox.dir("plugins.d");
    for fixture in ["fx-echo", "fx-faulty"] {
        sandbox.copy(
            &format!("plugins.d/{fixture}.so"),
            &fixtures::library(fixture, Profile::Dev),
        );
    }
    let path = sandbox.put("plugins.toml", CONFIG);
    let config = config::parse(&path, CONFIG).unwrap_or_else(|e| panic!("{}", e.render()));
    let ledger = DurableLedger::open(
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
    .unwrap();
    let options = EngineOptions {
        clock: Arc::new(SystemClock),
        probe: None,
        watch: false,
        notifier: None,
        fail_stop: None,
    };
    let (engine, failures) = Engine::start(&config, ledger, options).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let engine = Arc::new(engine);
    let front = Front::new(
        engine.clone(),
        Durability::Fsync,
        Arc::new(|level: &str| {
            if level == "nonsense=" {
                Err(format!("{level} is no filter"))
            } else {
                Ok(level.to_owned())
            }
        }),
    );
    Running {
        _sandbox: sandbox,
        engine,
        front,
    }
}

fn message(topic: &str, key: Option<&str>) -> NewMessage {
    NewMessage {
        topic: topic.into(),
        payload: Bytes::from_static(b"payload"),
        headers: vec![("h".into(), "v".into())],
        key: key.map(str::to_owned),
    }
}

impl Running {
    fn instance(&self, name: &str) -> InstanceStatus {
        self.front
            .instances()
            .unwrap()
            .instances
            .into_iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no instance {name}"))
    }

    /// Waits (30 s at most) until `done` holds for instance `name`.
    fn until(&self, name: &str, what: &str, done: impl Fn(&InstanceStatus) -> bool) {
        let start = Instant::now();
        loop {
            let status = self.instance(name);
            if done(&status) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: {status:#?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_keyed_batch_is_one_submission_and_a_repeated_key_gets_the_first_id() {
    let r = start();
    let answers = r
        .front
        .publish(vec![
            message("good.a", Some("k1")),
            message("good.b", None),
            message("good.a", Some("k1")),
        ])
        .wait();
    let first = answers[0].clone().unwrap();
    assert_eq!(first.instances, 1);
    assert!(!first.duplicate);
    assert!(!answers[1].as_ref().unwrap().duplicate);
    let repeat = answers[2].clone().unwrap();
    assert!(repeat.duplicate);
    assert_eq!(repeat.id, first.id);
    let again = r.front.publish(vec![message("good.a", Some("k1"))]).wait();
    assert_eq!(again[0].as_ref().unwrap().id, first.id);
    let refused = r.front.publish(vec![message("", None)]).wait();
    assert!(
        matches!(&refused[0], Err(plugind::front::PublishRefused::Invalid(_))),
        "{refused:?}"
    );
}

#[test]
fn status_and_instances_show_one_joined_typed_picture() {
    let r = start();
    r.front.publish(vec![message("good.a", None)]).wait();
    r.until("good", "acked", |i| i.acked == 1);
    let status = r.front.status();
    assert_eq!(status.durability, Durability::Fsync);
    assert_eq!(status.pid, std::process::id());
    let names: Vec<&str> = status.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["bad", "good"]);
    let good = status.instances.iter().find(|i| i.name == "good").unwrap();
    assert_eq!(good.state, InstanceState::Running);
    assert_eq!(good.circuit, CircuitState::Closed);
    assert_eq!(good.dead_letters, None, "a status does not ask the ledger");
    let full = r.instance("good");
    assert_eq!(full.dead_letters, Some(0));
    assert_eq!(full.plugin, "fx-echo");
    assert_eq!(full.generation, 1);
    assert_eq!(full.state.to_string(), "running");

    r.front.pause("good", true).unwrap();
    let paused = r.instance("good");
    assert_eq!(
        (paused.state, paused.circuit, paused.paused()),
        (InstanceState::Paused, CircuitState::Paused, true)
    );
    r.front.pause("good", false).unwrap();
    assert_eq!(r.instance("good").state, InstanceState::Running);
    assert!(matches!(
        r.front.pause("nobody", true),
        Err(OperateError::Act(_))
    ));
}

#[test]
fn dead_letters_are_shown_paged_replayed_and_purged() {
    let r = start();
    let ids: Vec<u64> = r
        .front
        .publish((0..3).map(|_| message("bad.x", None)).collect())
        .wait()
        .into_iter()
        .map(|a| a.unwrap().id)
        .collect();
    r.until("bad", "dead-lettered", |i| i.dead_letters == Some(3));

    let shown = r.front.show_message(ids[0]).unwrap();
    assert_eq!(shown.topic, "bad.x");
    assert_eq!(shown.headers, [("h".to_owned(), "v".to_owned())]);
    assert_eq!(shown.payload_preview, Bytes::from_static(b"payload"));
    assert_eq!(shown.deliveries.len(), 1);
    let delivery = &shown.deliveries[0];
    assert_eq!(delivery.stage, DeliveryStage::DeadLettered);
    assert!(
        matches!(delivery.attempts[0].outcome, AttemptOutcome::Ended(_)),
        "{delivery:?}"
    );
    assert!(
        delivery.attempts[0]
            .outcome
            .to_string()
            .starts_with("failed"),
        "{delivery:?}"
    );
    assert!(matches!(
        r.front.show_message(1_000_000),
        Err(OperateError::NotYetAccepted { id: 1_000_000, .. })
    ));

    let first = r
        .front
        .dead_letters(PageRequest {
            limit: Some(2),
            ..PageRequest::default()
        })
        .unwrap();
    assert_eq!(first.dead_letters.len(), 2);
    let rest = r
        .front
        .dead_letters(PageRequest {
            after: first.next.clone(),
            ..PageRequest::default()
        })
        .unwrap();
    assert_eq!(rest.dead_letters.len(), 1);
    assert_eq!(rest.next, None);

    assert!(matches!(
        r.front.replay(Pick::default()),
        Err(OperateError::NothingPicked)
    ));
    assert!(matches!(
        r.front.purge(Pick {
            instance: Some("nobody".into()),
            all: true,
            ..Pick::default()
        }),
        Err(OperateError::UnknownInstance(name)) if name == "nobody"
    ));
    let replay = r
        .front
        .replay(Pick {
            messages: vec![ids[0]],
            ..Pick::default()
        })
        .unwrap();
    assert_eq!((replay.queued, replay.waiting), (1, 0));
    r.until("bad", "dead-lettered again, and recorded", |i| {
        i.dead_lettered == 4 && i.dead_letters == Some(3)
    });
    let purged = r
        .front
        .purge(Pick {
            instance: Some("bad".into()),
            all: true,
            ..Pick::default()
        })
        .unwrap();
    assert_eq!(purged, 3);
    assert!(matches!(
        r.front.forget("", Forget::Purge),
        Err(OperateError::NoInstanceNamed)
    ));
    assert!(matches!(
        r.front.forget("bad", Forget::Purge),
        Err(OperateError::Act(_))
    ));
}

#[test]
fn a_watch_gives_the_snapshot_then_live_events_and_the_log_level_is_checked() {
    let r = start();
    let mut watch = r.front.watch();
    let mut snapshot = 0;
    while let WatchStep::Snapshot(_) = watch.next(Duration::from_millis(10)) {
        snapshot += 1;
    }
    assert!(snapshot > 0, "the starts of both instances are kept");
    r.front.pause("good", true).unwrap();
    let start = Instant::now();
    loop {
        match watch.next(Duration::from_millis(100)) {
            WatchStep::Live(event) if event.kind.instance() == Some("good") => break,
            WatchStep::Live(_) | WatchStep::Quiet => {}
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no live event");
    }
    assert_eq!(r.front.set_log_level("debug").unwrap(), "debug");
    assert!(matches!(
        r.front.set_log_level("nonsense="),
        Err(OperateError::LogLevel(_))
    ));
    r.front.pause("good", false).unwrap();
}

fn daemon_options() -> daemon::DaemonOptions {
    daemon::DaemonOptions {
        fresh_ledger: false,
        log_level: Arc::new(|level: &str| Ok(level.to_owned())),
        fail_stop: FailStop::new(|error: &str| panic!("the ledger failed: {error}")),
        reloads: Arc::default(),
        engine: EngineOptions {
            clock: Arc::new(SystemClock),
            probe: None,
            watch: false,
            notifier: None,
            fail_stop: None,
        },
    }
}

#[test]
fn daemon_run_serves_the_api_until_its_shutdown_resolves() {
    let sandbox = Sandbox::new("daemon-run");
    sandbox.dir("plugins.d");
    sandbox.copy(
        "plugins.d/fx-echo.so",
        &fixtures::library("fx-echo", Profile::Dev),
    );
    let text = "\
[host]
autoload = false
listen = \"unix:api.sock\"

[plugins.good]
plugin = \"fx-echo\"
topics = [\"good.>\"]
";
    let path = sandbox.put("plugins.toml", text);
    let config = config::parse(&path, text).unwrap_or_else(|e| panic!("{}", e.render()));
    let endpoint = config.host.listen.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let daemon = tokio::spawn(daemon::run(config, daemon_options(), async {
            let _ = stopped.await;
        }));
        let start = Instant::now();
        let mut api = loop {
            match client::connect(&endpoint, None).await {
                Ok(api) => break api,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(30), "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let status = api
            .control
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.durability, "fsync");
        assert_eq!(status.instances.len(), 1);
        assert_eq!(status.instances[0].state, "running");
        let published = api
            .publisher
            .publish(pb::PublishRequest {
                topic: "good.a".into(),
                payload: Bytes::from_static(b"x"),
                headers: vec![],
                key: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(published.instances, 1);
        stop.send(()).unwrap();
        let stopped = daemon.await.unwrap().unwrap();
        assert!(stopped.api.is_ok(), "{:?}", stopped.api);
        assert!(stopped.report.abandoned.is_empty(), "{:?}", stopped.report);
    });
}

#[test]
fn daemon_run_refuses_a_state_dir_it_cannot_use_as_a_configuration_problem() {
    let sandbox = Sandbox::new("daemon-run-state");
    let text = "[host]\nstate_dir = \"plugins.toml\"\n";
    let path = sandbox.put("plugins.toml", text);
    let config = config::parse(&path, text).unwrap_or_else(|e| panic!("{}", e.render()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = runtime
        .block_on(daemon::run(
            config,
            daemon_options(),
            std::future::pending(),
        ))
        .unwrap_err();
    assert!(matches!(refused, DaemonError::StateDir(_)), "{refused:?}");
    assert!(refused.is_configuration());
    assert!(refused.to_string().contains("not a directory"), "{refused}");
}
