//! The metrics endpoint end to end: `[host] metrics` serves `/metrics` (the classic text
//! format by default, OpenMetrics when asked), `/healthz` and `/readyz`; a scrape's counters
//! and histograms move by what the daemon did, show the same numbers as `ctl status`, and
//! pass `promtool check metrics`; a changed address needs a restart.

use std::{net::SocketAddr, time::Duration};

use plugind_tests::{
    binary,
    daemon::Daemon,
    metrics::{self, Scrape},
    sandbox::Sandbox,
};

const CONFIG: &str = "\
[host]
durability = \"fsync\"
autoload = false
metrics = \"127.0.0.1:0\"

[defaults]
max_attempts = 2
backoff = { initial = \"10ms\", max = \"10ms\", jitter = 0.0 }

[plugins.echo]
plugin = \"fx-echo\"
topics = [\"demo.>\"]
";

fn start() -> (Daemon, SocketAddr) {
    let d = Daemon::start(Sandbox::with_fixtures("metrics", &["fx-echo"]), CONFIG);
    let addr = metrics::address_in(&d.log());
    (d, addr)
}

/// `after - before` of one sample.
fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

/// Waits (30 s at most) until `done` holds for a fresh scrape; returns it.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = std::time::Instant::now();
    loop {
        let scrape = Scrape::take(addr);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not {what} after 30 s:\n{}",
            scrape.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_scrape_counts_what_the_daemon_did_and_promtool_accepts_it() {
    let (d, addr) = start();
    let echo = [("plugin_instance", "echo")];
    let before = Scrape::take(addr);
    assert_eq!(before.value("plugind_handed_out_total", &echo), 0.0);

    for n in 0..3 {
        d.publish("demo.ok", &format!("m{n}"), &[]).unwrap();
    }
    d.publish("demo.no", "x", &["-H", "outcome=reject"])
        .unwrap();
    d.publish("demo.later", "x", &["-H", "outcome=retry"])
        .unwrap();
    d.publish("nowhere.at.all", "x", &[]).unwrap();
    d.publish("", "x", &[]).unwrap_err();

    // 3 acks, 1 rejection, 2 retries (the second exhausts max_attempts): 6 calls.
    // The backlog's bytes are the supervisor's view, refreshed on its tick: waited for too.
    let after = scrape_until(addr, "every attempt settled", |s| {
        s.value("plugind_dead_lettered_total", &echo) == 2.0
            && s.value("plugind_backlog_messages", &echo) == 0.0
            && s.value("plugind_backlog_bytes", &echo) == 0.0
    });
    let outcome = |kind| {
        moved(
            &before,
            &after,
            "plugind_outcomes_total",
            &[echo[0], ("kind", kind)],
        )
    };
    assert_eq!(outcome("ack"), 3.0);
    assert_eq!(outcome("reject"), 1.0);
    assert_eq!(outcome("retry"), 2.0);
    for kind in ["timeout", "panic", "crash", "error", "dropped"] {
        assert_eq!(outcome(kind), 0.0, "{kind}");
    }
    assert_eq!(
        moved(&before, &after, "plugind_handed_out_total", &echo),
        6.0
    );
    assert_eq!(
        moved(
            &before,
            &after,
            "plugind_handle_duration_seconds_count",
            &echo
        ),
        6.0,
        "every call is timed"
    );
    assert_eq!(
        moved(
            &before,
            &after,
            "plugind_publish_to_settle_seconds_count",
            &echo
        ),
        4.0,
        "the acks and the rejection settle at their call"
    );
    assert_eq!(
        after.value(
            "plugind_handle_duration_seconds_bucket",
            &[echo[0], ("le", "+Inf")]
        ),
        after.value("plugind_handle_duration_seconds_count", &echo)
    );
    assert_eq!(
        moved(&before, &after, "plugind_publishes_accepted_total", &[]),
        6.0
    );
    assert_eq!(
        after.value(
            "plugind_publishes_refused_total",
            &[("code", "INVALID_ARGUMENT")]
        ),
        1.0
    );
    assert_eq!(moved(&before, &after, "plugind_unrouted_total", &[]), 1.0);
    assert_eq!(
        after.value("plugind_instance_state", &[echo[0], ("state", "running")]),
        1.0
    );
    assert_eq!(
        after.value("plugind_circuit_state", &[echo[0], ("state", "closed")]),
        1.0
    );
    assert_eq!(after.value("plugind_instance_generation", &echo), 1.0);
    assert_eq!(
        after.value("plugind_instance_info", &[echo[0], ("plugin", "fx-echo")]),
        1.0
    );
    assert_eq!(
        after.value("plugind_backlog_limit_bytes", &echo),
        1024.0 * 1024.0 * 1024.0,
        "the default max_backlog"
    );

    // The ledger's histograms come from the figures its commits keep: every fsync and every
    // commit is in them.
    let fsyncs = moved(&before, &after, "plugind_ledger_fsyncs_total", &[]);
    assert!(fsyncs > 0.0, "publishes in fsync mode are synced");
    assert_eq!(
        after.value("plugind_ledger_fsync_duration_seconds_count", &[]),
        after.value("plugind_ledger_fsyncs_total", &[])
    );
    assert_eq!(
        after.value("plugind_ledger_commit_duration_seconds_count", &[]),
        after.value("plugind_ledger_commits_total", &[])
    );
    assert_eq!(
        after.value("plugind_ledger_commit_records_count", &[]),
        after.value("plugind_ledger_commits_total", &[])
    );
    assert_eq!(
        after.value("plugind_events_total", &[("kind", "dead_lettered")]),
        2.0
    );
    assert_eq!(
        after.value("plugind_ledger_reserve_bytes", &[]),
        8.0 * 1024.0 * 1024.0,
        "the settlement reserve is in place"
    );

    // One source: `ctl plugins` shows the numbers the scrape shows.
    let out = d.cli(&["ctl", "plugins", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = shown["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "echo")
        .unwrap()
        .clone();
    let pairs = [
        (
            "acked",
            "plugind_outcomes_total",
            vec![echo[0], ("kind", "ack")],
        ),
        ("failures", "plugind_failures_charged_total", echo.to_vec()),
        (
            "dead_lettered",
            "plugind_dead_lettered_total",
            echo.to_vec(),
        ),
        ("backlog", "plugind_backlog_messages", echo.to_vec()),
        ("backlog_bytes", "plugind_backlog_bytes", echo.to_vec()),
        ("queue_depth", "plugind_queue_depth", echo.to_vec()),
        ("in_flight", "plugind_in_flight", echo.to_vec()),
        ("generation", "plugind_instance_generation", echo.to_vec()),
        ("handed_out", "plugind_handed_out_total", echo.to_vec()),
        ("max_backlog", "plugind_backlog_limit_bytes", echo.to_vec()),
    ];
    for (field, metric, labels) in pairs {
        assert_eq!(
            shown[field].as_u64().unwrap_or(0),
            after.value(metric, &labels) as u64,
            "ctl plugins `{field}` and {metric}: {shown}"
        );
    }
    assert_eq!(shown["acked"].as_u64(), Some(3));
    for kind in [
        "ack", "retry", "reject", "timeout", "panic", "crash", "error", "dropped",
    ] {
        assert_eq!(
            shown["outcomes"][kind].as_u64(),
            Some(after.value("plugind_outcomes_total", &[echo[0], ("kind", kind)]) as u64),
            "ctl plugins' outcome {kind}: {shown}"
        );
    }

    // Prometheus's own checker takes the scrape as it is (no lint, no error).
    let checked =
        metrics::run_promtool(&["check", "metrics"], Some(&after.text), d.sandbox().path());
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
        after.text
    );
    d.stop();
}

#[test]
fn the_endpoint_answers_health_readiness_and_openmetrics_and_nothing_else() {
    let (d, addr) = start();
    let health = metrics::get(addr, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = metrics::get(addr, "/readyz");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    assert_eq!(metrics::get(addr, "/").status, 404);
    assert_eq!(metrics::get(addr, "/metrics/extra").status, 404);
    let post = metrics::request(addr, "POST", "/metrics", &[("Content-Length", "0")]);
    assert_eq!(post.status, 405);
    assert_eq!(
        post.headers.get("allow").map(String::as_str),
        Some("GET, HEAD")
    );

    let open = metrics::request(
        addr,
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text; version=1.0.0,text/plain;q=0.5",
        )],
    );
    assert_eq!(open.status, 200);
    assert!(
        open.headers["content-type"].starts_with("application/openmetrics-text; version=1.0.0"),
        "{open:?}"
    );
    assert!(open.body.ends_with("# EOF\n"), "{}", open.body);
    assert!(
        open.body.contains("# TYPE plugind_outcomes counter\n"),
        "{}",
        open.body
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the endpoint stops with the daemon"
    );
}

#[test]
fn a_changed_metrics_address_needs_a_restart_and_the_running_one_keeps_serving() {
    let (d, addr) = start();
    d.sandbox()
        .put("plugins.toml", CONFIG.replace("127.0.0.1:0", "127.0.0.1:1"));
    let out = d.cli(&["ctl", "reload", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let applied: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        applied["restart_required"],
        serde_json::json!(["metrics"]),
        "{applied}"
    );
    assert_eq!(metrics::get(addr, "/healthz").status, 200);
    d.stop();
}

#[test]
fn a_metrics_address_in_use_stops_the_start_with_its_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let config = CONFIG.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let sandbox = Sandbox::with_fixtures("metrics-taken", &["fx-echo"]);
    let (status, sandbox) = Daemon::start_expecting_exit(sandbox, &config, Duration::from_secs(10));
    let log = std::fs::read_to_string(sandbox.path().join("daemon.log")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("metrics endpoint 127.0.0.1:{port}")),
        "{log}"
    );
}

#[test]
fn while_the_daemon_drains_it_is_not_ready_yet_healthy_and_the_call_in_hand_shows() {
    let s = Sandbox::with_fixtures("metrics-drain", &["fx-block"]);
    let gate = s.path().join("open");
    let config = format!(
        "[host]\ndurability = \"memory\"\nautoload = false\ngrace_period = \"60s\"\n\
         metrics = \"127.0.0.1:0\"\n\n[plugins.slow]\nplugin = \"fx-block\"\n\
         topics = [\"t.>\"]\n[plugins.slow.config]\ngate = \"{}\"\n",
        gate.display()
    );
    let mut d = Daemon::start(s, &config);
    let addr = metrics::address_in(&d.log());
    let mut watcher = std::process::Command::new(binary::plugind())
        .args(["ctl", "watch", "--connect"])
        .arg(format!("unix:{}", d.socket().display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("plugind ctl watch runs");
    d.publish("t.a", "x", &[]).unwrap();
    let slow = [("plugin_instance", "slow")];
    let scrape = scrape_until(addr, "one call in hand and one watcher", |s| {
        s.value("plugind_in_flight", &slow) == 1.0
            && s.value("plugind_watch_subscribers", &[]) == 1.0
    });
    assert_eq!(scrape.value("plugind_handed_out_total", &slow), 1.0);
    assert_eq!(scrape.value("plugind_queue_depth", &slow), 0.0);
    assert_eq!(scrape.value("plugind_libraries_loaded", &[]), 1.0);
    assert_eq!(
        scrape.value("plugind_handle_duration_seconds_count", &slow),
        0.0,
        "a call is timed when it returns"
    );

    d.signal("TERM");
    let started = std::time::Instant::now();
    while metrics::get(addr, "/readyz").status != 503 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still ready 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        metrics::get(addr, "/healthz").status,
        200,
        "draining is alive"
    );
    std::fs::write(&gate, b"").unwrap();
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        d.log()
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn an_attempt_the_process_died_in_counts_as_a_crash_after_the_restart() {
    let s = Sandbox::with_fixtures("metrics-crash", &["fx-block"]);
    let gate = s.path().join("open");
    let config = format!(
        "[host]\ndurability = \"fsync\"\nautoload = false\nmetrics = \"127.0.0.1:0\"\n\n\
         [plugins.slow]\nplugin = \"fx-block\"\ntopics = [\"t.>\"]\n\
         [plugins.slow.config]\ngate = \"{}\"\n",
        gate.display()
    );
    let d = Daemon::start(s, &config);
    d.publish("t.a", "x", &[]).unwrap();
    d.wait_in_flight("slow");
    let s = d.kill9();
    std::fs::write(&gate, b"").unwrap();
    let d = Daemon::restart(s);
    let addr = metrics::address_in(&d.log());
    let slow = [("plugin_instance", "slow")];
    let scrape = scrape_until(addr, "the redelivery acked", |s| {
        s.value("plugind_outcomes_total", &[slow[0], ("kind", "ack")]) == 1.0
    });
    assert_eq!(
        scrape.value("plugind_outcomes_total", &[slow[0], ("kind", "crash")]),
        1.0,
        "the attempt in hand when the process died is charged at the start"
    );
    let out = d.cli(&["ctl", "plugins", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["instances"][0]["outcomes"]["crash"], 1, "{shown}");
    d.stop();
}

#[test]
fn a_panic_in_handle_counts_as_a_panic_and_a_dead_letter() {
    let config = "[host]\ndurability = \"memory\"\nautoload = false\nmetrics = \"127.0.0.1:0\"\n\n\
                  [plugins.panicky]\nplugin = \"fx-faulty\"\ntopics = [\"p.>\"]\nmax_attempts = 1\n\
                  [plugins.panicky.config]\nfail = \"handle-panic\"\n";
    let d = Daemon::start(
        Sandbox::with_fixtures("metrics-panic", &["fx-faulty"]),
        config,
    );
    let addr = metrics::address_in(&d.log());
    d.publish("p.x", "x", &[]).unwrap();
    let panicky = [("plugin_instance", "panicky")];
    let scrape = scrape_until(addr, "the dead letter", |s| {
        s.value("plugind_dead_lettered_total", &panicky) == 1.0
    });
    let outcome = |kind| scrape.value("plugind_outcomes_total", &[panicky[0], ("kind", kind)]);
    assert_eq!(
        (outcome("panic"), outcome("ack"), outcome("error")),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(
        scrape.value("plugind_publish_to_settle_seconds_count", &panicky),
        0.0,
        "a panic settles nothing by itself"
    );
    d.stop();
}

#[test]
fn a_lease_that_expires_counts_as_a_timeout_and_the_late_answer_as_nothing() {
    let s = Sandbox::with_fixtures("metrics-timeout", &["fx-block"]);
    let gate = s.path().join("open");
    let config = format!(
        "[host]\ndurability = \"memory\"\nautoload = false\nmetrics = \"127.0.0.1:0\"\n\n\
         [plugins.slow]\nplugin = \"fx-block\"\ntopics = [\"t.>\"]\nmax_attempts = 1\n\
         ack_timeout = \"200ms\"\nhang_grace = \"60s\"\n\
         [plugins.slow.config]\ngate = \"{}\"\n",
        gate.display()
    );
    let d = Daemon::start(s, &config);
    let addr = metrics::address_in(&d.log());
    d.publish("t.a", "x", &[]).unwrap();
    let slow = [("plugin_instance", "slow")];
    let scrape = scrape_until(addr, "the lease expired", |s| {
        s.value("plugind_dead_lettered_total", &slow) == 1.0
    });
    let outcome = |s: &Scrape, kind| s.value("plugind_outcomes_total", &[slow[0], ("kind", kind)]);
    assert_eq!(outcome(&scrape, "timeout"), 1.0);
    std::fs::write(&gate, b"").unwrap();
    // The call returns an ack for an attempt no longer in flight: refused as stale.
    d.wait_for_log("stale settlement refused", 1);
    let scrape = Scrape::take(addr);
    assert_eq!(
        scrape.value("plugind_handle_duration_seconds_count", &slow),
        1.0
    );
    assert_eq!(outcome(&scrape, "ack"), 0.0, "a stale answer is no outcome");
    assert_eq!(outcome(&scrape, "timeout"), 1.0);
    d.stop();
}

/// The repository's `deploy/` folder.
fn deploy() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .expect("deploy/ exists")
}

/// Every `plugind_…` name in `expr`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("plugind_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The PromQL of the shipped rules (`expr:` lines) and dashboard (every `expr` field).
fn shipped_queries() -> Vec<(String, String)> {
    let dir = deploy();
    let rules = std::fs::read_to_string(dir.join("prometheus/plugind.rules.yml")).unwrap();
    let mut queries: Vec<(String, String)> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| ("plugind.rules.yml".to_owned(), e.trim().to_owned()))
        .collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana/plugind.json")).unwrap())
            .expect("the dashboard is JSON");
    fn exprs(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query" | "definition", serde_json::Value::String(e)) => {
                            out.push(("plugind.json".to_owned(), e.clone()));
                        }
                        _ => exprs(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
            _ => {}
        }
    }
    exprs(&dashboard, &mut queries);
    queries
}

#[test]
fn the_shipped_alert_rules_and_scrape_configuration_pass_promtool_and_the_unit_tests() {
    let dir = deploy().join("prometheus");
    let checked = metrics::run_promtool(&["check", "rules", "plugind.rules.yml"], None, &dir);
    assert!(
        checked.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let tested = metrics::run_promtool(&["test", "rules", "plugind.rules.test.yml"], None, &dir);
    assert!(
        tested.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    let config = metrics::run_promtool(&["check", "config", "prometheus.yml"], None, &dir);
    assert!(
        config.status.success(),
        "promtool check config (the example scrape configuration): {}{}",
        String::from_utf8_lossy(&config.stdout),
        String::from_utf8_lossy(&config.stderr)
    );
    let rules = std::fs::read_to_string(dir.join("plugind.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("plugind.rules.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test in plugind.rules.test.yml"
        );
    }
}

#[test]
fn every_metric_the_rules_and_the_dashboard_name_appears_in_a_scrape() {
    let (d, addr) = start();
    // A refusal, so that the refusals' family has a sample.
    d.publish("", "x", &[]).unwrap_err();
    d.publish("demo.ok", "x", &[]).unwrap();
    let scrape = Scrape::take(addr);
    let scraped = scrape.names();
    let queries = shipped_queries();
    assert!(queries.len() > 10, "{queries:?}");
    let mut missing = Vec::new();
    for (file, query) in &queries {
        for name in metric_names(query) {
            if !scraped.contains(name.as_str()) {
                missing.push(format!("{file}: {name} (in `{query}`)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named by the rules or the dashboard, absent from a scrape:\n{}\n\nscrape:\n{}",
        missing.join("\n"),
        scrape.text
    );
    d.stop();
}
