//! End-to-end throughput of deferred and async deliveries (plugind-api 1.1), with the real
//! release daemon, `durability = "fsync"`, and `plugind bench` publishing in another process:
//!
//! - `async`: the fx-async fixture, whose handler awaits tokio's timer for 50 ms — one
//!   instance, `max_in_flight = 256`: the bound is 256 / 50 ms = 5,120 msgs/s (a synchronous
//!   handler that waits 50 ms delivers 20 msgs/s);
//! - `webhook`: the webhook example plugin posting to a local HTTP server that answers after
//!   50 ms, `max_in_flight = 256`.
//!
//! Run: `cargo bench -p plugind-tests --bench deferred` (`-- async` or `-- webhook` for one;
//! `-- N` for the message count, default 20,000).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use plugind_tests::{
    binary,
    daemon::Daemon,
    fixtures::{self, Profile},
    http_server::{Answer, HttpServer},
    sandbox::Sandbox,
};

fn acked(d: &Daemon, instance: &str) -> u64 {
    let out = d.cli(&["ctl", "plugins", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all["instances"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i["name"] == instance))
        .and_then(|i| i["acked"].as_u64())
        .unwrap_or(0)
}

/// Publishes `n` messages to `topic` with `plugind bench` and waits until `instance` acked
/// them all; returns the end-to-end rate (from the first publish to the last ack).
fn measure(d: &Daemon, instance: &str, topic: &str, n: u64) -> f64 {
    let before = acked(d, instance);
    let started = Instant::now();
    let out = Command::new(binary::plugind_release())
        .args(["bench", "-c"])
        .arg(d.sandbox().path().join("plugins.toml"))
        .args(["--count", &n.to_string(), "--topic", topic, "--size", "256"])
        .output()
        .expect("plugind bench runs");
    assert!(out.status.success(), "plugind bench: {out:?}");
    // `plugind bench` also sends its reset and flush markers: two more messages.
    let target = before + n + 2;
    while acked(d, instance) < target {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all acked:\n{}",
            d.history()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn config(plugin: &str, table: &str) -> String {
    format!(
        "[host]\nautoload = false\ndurability = \"fsync\"\n\n\
         [plugins.p]\nplugin = \"{plugin}\"\ntopics = [\"bench.>\"]\nmax_in_flight = 256\n\
         max_backlog = \"1GiB\"\n[plugins.p.config]\n{table}\n"
    )
}

fn async_run(n: u64) {
    let s = Sandbox::new("bench-async");
    s.dir("plugins.d");
    s.copy(
        "plugins.d/fx-async.so",
        &fixtures::library("fx-async", Profile::Release),
    );
    let d = Daemon::start_release(s, &config("fx-async", "sleep_ms = 50"));
    measure(&d, "p", "bench.warm", 2_000);
    for run in 1..=3 {
        let rate = measure(&d, "p", "bench.async", n);
        println!(
            "async handler awaiting 50 ms, max_in_flight 256, fsync: run {run}: {rate:.0} msgs/s \
             ({:.0}% of the 5,120 msgs/s bound)",
            rate / 5_120.0 * 100.0
        );
    }
    d.stop();
}

fn webhook_run(n: u64) {
    let server = HttpServer::start(|_| Answer {
        status: 204,
        headers: Vec::new(),
        delay: Duration::from_millis(50),
    });
    let s = Sandbox::new("bench-webhook");
    s.dir("plugins.d");
    s.copy(
        "plugins.d/libwebhook.so",
        &binary::example_plugin_release("webhook"),
    );
    let table = format!("url = \"{}/hook\"\ntimeout = \"5s\"", server.url());
    let d = Daemon::start_release(s, &config("webhook", &table));
    measure(&d, "p", "bench.warm", 2_000);
    for run in 1..=3 {
        let rate = measure(&d, "p", "bench.webhook", n);
        println!(
            "webhook, server answering after 50 ms, max_in_flight 256, fsync: run {run}: \
             {rate:.0} msgs/s"
        );
    }
    d.stop();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(20_000);
    let only = |name: &str| {
        !args.iter().any(|a| a == "async" || a == "webhook") || args.iter().any(|a| a == name)
    };
    if only("async") {
        async_run(n);
    }
    if only("webhook") {
        webhook_run(n);
    }
}
