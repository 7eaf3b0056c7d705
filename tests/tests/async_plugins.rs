//! Async plugins (plugind-api 1.1, `AsyncPlugin`): `async fn handle` on a tokio runtime that
//! lives inside the plugin library, settling each delivery's token when its future completes.
//! Every test runs the real daemon with the `fx-async` fixture, which uses tokio's timer.

use plugind_tests::{
    daemon::Daemon,
    ledger_support::{record_config, wait_until},
    record::read_record,
    sandbox::Sandbox,
};

/// A sandbox with fx-async (instance `a`, `extra` lines in its table) and an fx-record
/// instance `kids` on `child.>`.
fn setup(label: &str, extra: &str) -> (Sandbox, String, std::path::PathBuf) {
    let s = Sandbox::with_fixtures(label, &["fx-async", "fx-record"]);
    let kids = s.path().join("kids.txt");
    let config = format!(
        "[host]\nautoload = false\ngrace_period = \"3s\"\n\n\
         [defaults]\nmax_attempts = 3\nbackoff = {{ initial = \"20ms\", max = \"20ms\", \
         jitter = 0.0 }}\n\n\
         [plugins.a]\nplugin = \"fx-async\"\nmax_in_flight = 256\n{extra}\n\
         [plugins.a.config]\ngreeting = \"hello\"\n\n\
         [plugins.kids]\nplugin = \"fx-record\"\ntopics = [\"child.>\"]\n\
         [plugins.kids.config]\n{}\n",
        record_config(&kids, "")
    );
    (s, config, kids)
}

#[test]
fn async_handlers_run_concurrently_on_the_plugins_own_runtime() {
    let (s, config, _) = setup("async-many", "workers = 2");
    let d = Daemon::start(s, &config);
    // 30 handlers that each await tokio's timer for 300 ms.
    d.held("a", || {
        for _ in 0..30 {
            d.publish_with("async.x", "payload", &[("sleep-ms", "300")]);
        }
    });
    let mut most = 0;
    wait_until("30 acks", &d, || {
        let p = d.instance("a");
        most = most.max(p["deferred"].as_u64().unwrap());
        p["acked"] == 30
    });
    assert!(most > 2, "at most {most} at once on 2 worker threads");
    assert_eq!(d.instance("a")["failures"], 0);
    // `new` ran on the runtime and logged through tracing, tagged with the instance.
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("started") && l.contains("instance=a") && l.contains("hello")),
        "{log}"
    );
    d.stop();
}

#[test]
fn a_panic_inside_a_future_fails_the_attempt_with_the_panic_text() {
    let (s, config, _) = setup("async-panic", "");
    let d = Daemon::start(s, &config);
    let id = d.publish_with("async.x", "payload", &[("outcome", "panic")]);
    wait_until("a dead letter", &d, || {
        d.instance("a")["dead_lettered"] == 1
    });
    let shown = d.ctl_json(&["show", &id.to_string()]);
    let delivery = &shown["deliveries"][0];
    assert_eq!(delivery["failures"], 3, "{shown}");
    let reason = delivery["last_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("panic: ") && reason.contains("told to panic in the future"),
        "{reason}"
    );
    // The runtime survived: the next message acks.
    d.publish_with("async.x", "payload", &[]);
    wait_until("an ack", &d, || d.instance("a")["acked"] == 1);
    d.stop();
}

#[test]
fn host_publish_inside_a_future_is_a_child_committed_only_with_its_ack() {
    let (s, config, kids) = setup("async-kids", "");
    let d = Daemon::start(s, &config);
    let acked = d.publish_with(
        "async.x",
        "payload",
        &[("child", "child.a"), ("sleep-ms", "50")],
    );
    d.publish_with(
        "async.x",
        "payload",
        &[("child", "child.b"), ("outcome", "reject")],
    );
    wait_until("settled", &d, || {
        let p = d.instance("a");
        p["acked"] == 1 && p["dead_lettered"] == 1
    });
    wait_until("the child", &d, || !read_record(&kids).is_empty());
    d.wait_idle("kids");
    let children = read_record(&kids);
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0].topic, "child.a");
    assert!(children[0].id > acked);
    d.stop();
}

#[test]
fn a_swapped_out_async_generation_drains_and_its_library_is_unloaded_not_retained() {
    let (s, config, _) = setup("async-swap", "");
    let d = Daemon::start(s, &config);
    d.held("a", || {
        for _ in 0..50 {
            d.publish_with("async.x", "payload", &[("sleep-ms", "3000")]);
        }
    });
    wait_until("50 deferred", &d, || d.instance("a")["deferred"] == 50);
    let out = d.cli(&["ctl", "reload", "a"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("generation 2", &d, || d.instance("a")["generation"] == 2);
    for _ in 0..10 {
        d.publish_with("async.x", "payload", &[]);
    }
    wait_until("60 acked, generation 1 retired", &d, || {
        let p = d.instance("a");
        p["acked"] == 60 && p["draining"].as_array().is_some_and(Vec::is_empty)
    });
    let plugins = d.ctl_json(&["plugins"]);
    assert_eq!(
        plugins["retained"],
        serde_json::json!([]),
        "the old generation's library stayed mapped:\n{}",
        d.history()
    );
    assert_eq!(d.instance("a")["failures"], 0);
    let (status, log) = d.stop();
    assert!(status.success());
    assert!(!log.contains("library retained"), "{log}");
}

#[test]
fn a_plugins_events_from_its_runtime_reach_the_log_as_fields_under_a_filter_per_instance() {
    let (s, config, _) = setup("async-logs", "workers = 3");
    let config = config.replace("[host]\n", "[host]\nlog_format = \"json\"\n");
    let d = Daemon::start(s, &config);
    let lines = |d: &Daemon| -> Vec<serde_json::Value> {
        d.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["fields"]["message"] == "handled")
            .collect()
    };
    // `workers = 3` reached the plugin's runtime (the SDK's default is 2).
    let started: Vec<serde_json::Value> = d
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "started")
        .collect();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["fields"]["workers"], "3", "{started:?}");
    let first = d.publish_with("async.x", "payload", &[]);
    wait_until("an ack", &d, || d.instance("a")["acked"] == 1);
    assert!(lines(&d).is_empty(), "debug is off by default");
    // `a=debug`: that instance's plugin events, down to its own `tracing::debug!`.
    let set = d.ctl_json(&["log-level", "info,a=debug"]);
    assert_eq!(set["level"], "plugin::a=debug,info", "{set}");
    let second = d.publish_with("async.x", "payload", &[]);
    wait_until("the debug event", &d, || !lines(&d).is_empty());
    let handled = lines(&d);
    assert_eq!(handled.len(), 1, "{handled:?}");
    let event = &handled[0];
    assert_eq!(event["target"], "plugin::a");
    let fields = &event["fields"];
    assert_eq!(
        fields["id"],
        second.to_string(),
        "the plugin's own field: {event}"
    );
    assert_eq!(fields["attempt"], "1");
    assert_eq!(fields["instance"], "a");
    assert_eq!(fields["plugin"], "fx-async");
    assert_eq!(fields["generation"], 1);
    assert!(first < second);
    d.stop();
}
