//! Compatibility with plugind-api 1.0.0 (issue 20, "Compatibility"), end to end.
//!
//! Today's daemon runs `fx-legacy`, a plugin built against the frozen 1.0.0 source
//! (`tests/compat/plugind-api-1.0.0`), unchanged: `plugind inspect` shows it as built against
//! 1.0.0 and the probe loads it; it acks, a retry is redelivered after its delay, a reject is
//! dead-lettered, a child it publishes during `handle` reaches another instance, its tracing
//! events reach the daemon's log tagged with the instance, and it hot-swaps with the same
//! source built against today's plugin-api without losing a message.
//!
//! The other way round, the 1.0 host (`tests/compat/legacy-host`, built against the 1.0.0
//! source's `hosting`) loads fixtures built against today's plugin-api and they ack, retry,
//! reject and publish there; it still refuses an incompatible layout and accepts a root
//! module with an appended field, the supported way to extend the ABI.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use sha2::{Digest as _, Sha256};

use plugind_tests::{
    binary,
    daemon::Daemon,
    fixtures::{self, LegacyBuild, Profile, Variant},
    ledger_support::wait_until,
    sandbox::Sandbox,
};

/// The sha256 of the frozen plugind-api 1.0.0 source as committed (see
/// [`the_frozen_1_0_0_source_is_unchanged`]).
const FROZEN_SHA256: &str = "58d7e9630368199bfdc1c9f464e9e3386c52f229cc4f02fc98cf0829c5f82884";

/// The library file name of the plugin in `plugin_dir`.
const LIBRARY: &str = "plugins.d/fx-legacy.so";

/// A sandbox whose `plugins.d` holds `fx-legacy` as build `build`.
fn sandbox(label: &str, build: LegacyBuild) -> Sandbox {
    let sandbox = Sandbox::new(label);
    sandbox.dir("plugins.d");
    sandbox.copy(LIBRARY, &fixtures::legacy_plugin(build));
    sandbox
}

/// A `plugins.toml` with a 50 ms constant backoff, `max_attempts = 3`, and one `fx-legacy`
/// instance per `(name, topics, label)`, all recording to `rec.txt` in the sandbox.
fn config(sandbox: &Sandbox, instances: &[(&str, &str, &str)]) -> String {
    let mut text = "[host]\nautoload = false\ngrace_period = \"3s\"\n\n[defaults]\n\
                    max_attempts = 3\nbackoff = { initial = \"50ms\", max = \"50ms\", \
                    jitter = 0.0 }\n"
        .to_owned();
    for (name, topics, label) in instances {
        text.push_str(&format!(
            "\n[plugins.{name}]\nplugin = \"fx-legacy\"\ntopics = [\"{topics}\"]\n\n\
             [plugins.{name}.config]\nlabel = \"{label}\"\nrecord = \"{}\"\n\
             retry_after_ms = 100\n",
            record_path(sandbox).display()
        ));
    }
    text
}

fn record_path(sandbox: &Sandbox) -> PathBuf {
    sandbox.path().join("rec.txt")
}

/// One line `fx-legacy` recorded: `<id> <attempt> <build> <api> <label> <parent> <handled, Unix
/// µs> <payload>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    id: u64,
    attempt: u32,
    build: String,
    api: String,
    label: String,
    parent: Option<u64>,
    handled_us: u64,
    payload: String,
}

fn read_lines(path: &Path) -> Vec<Line> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.splitn(8, ' ').collect();
            let [id, attempt, build, api, label, parent, handled, payload] = f[..] else {
                return None;
            };
            Some(Line {
                id: id.parse().ok()?,
                attempt: attempt.parse().ok()?,
                build: build.to_owned(),
                api: api.to_owned(),
                label: label.to_owned(),
                parent: parent.parse().ok(),
                handled_us: handled.parse().ok()?,
                payload: payload.to_owned(),
            })
        })
        .collect()
}

/// Waits until the record holds a line satisfying `found`; returns it.
fn wait_for_line(d: &Daemon, what: &str, found: impl Fn(&Line) -> bool) -> Line {
    let path = record_path(d.sandbox());
    let mut line = None;
    wait_until(what, d, || {
        line = read_lines(&path).into_iter().find(|l| found(l));
        line.is_some()
    });
    line.expect("found")
}

/// `(acked, failures, dead_lettered)` of `instance`, from `plugind ctl plugins --json`.
fn settled(d: &Daemon, instance: &str) -> (u64, u64, u64) {
    let plugins = d.ctl_json(&["plugins"]);
    let entry = plugins["instances"]
        .as_array()
        .and_then(|list| list.iter().find(|i| i["name"] == instance))
        .unwrap_or_else(|| panic!("no instance {instance} in {plugins}"))
        .clone();
    let count = |key: &str| entry[key].as_u64().unwrap_or_default();
    (count("acked"), count("failures"), count("dead_lettered"))
}

/// Every file of the frozen copy but its README, in path order, as `path NUL bytes NUL`.
fn frozen_digest(dir: &Path) -> String {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    let mut relative: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(dir).unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "README.md")
        .collect();
    relative.sort();
    let mut hasher = Sha256::new();
    for name in &relative {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(fs::read(dir.join(name)).unwrap());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// Guards the premise of every other test here: the 1.0.0 source is what plugins built
/// against 1.0.0 contain, so it never changes (a compatibility fix belongs in
/// `plugin-api/` or the daemon, never in the copy the tests build the old side from).
#[test]
fn the_frozen_1_0_0_source_is_unchanged() {
    let dir = fixtures::repo_root().join("tests/compat/plugind-api-1.0.0");
    assert_eq!(
        frozen_digest(&dir),
        FROZEN_SHA256,
        "{} changed: it must stay plugind-api 1.0.0 as released (tag plugind-api-v1.0.0); \
         see its README.md",
        dir.display()
    );
}

#[test]
fn inspect_shows_the_1_0_built_plugin_as_built_against_api_1_0_0_and_the_probe_loads_it() {
    let library = fixtures::legacy_plugin(LegacyBuild::V1_0);
    let output = Command::new(binary::plugind())
        .args(["inspect", "--probe", "--json"])
        .arg(&library)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["manifest"]["name"], "fx-legacy");
    assert_eq!(report["manifest"]["api_version"], "1.0.0");
    assert_eq!(report["manifest"]["topics"][0], "legacy.>");
    // The probe child loaded it the way the daemon does: abi_stable's layout and version
    // checks against today's plugin-api accepted the 1.0.0 layout.
    assert_eq!(report["verdict"], "accepted", "{report}");
    assert_eq!(report["verdict_kind"], "probed", "{report}");
}

#[test]
fn a_1_0_built_plugin_acks_retries_rejects_and_logs_in_todays_daemon() {
    let sandbox = sandbox("compat-outcomes", LegacyBuild::V1_0);
    let config = config(&sandbox, &[("legacy", "legacy.>", "from-config")]);
    let d = Daemon::start(sandbox, &config);
    let acked = d.publish("legacy.ack", "plain", &[]).unwrap();
    let retried = d
        .publish("legacy.retry", "again", &["-H", "outcome=retry"])
        .unwrap();
    let rejected = d
        .publish("legacy.reject", "never", &["-H", "outcome=reject"])
        .unwrap();

    wait_until("ack, retry-then-ack and reject are settled", &d, || {
        settled(&d, "legacy") == (2, 1, 1)
    });
    let lines = read_lines(&record_path(d.sandbox()));
    let of = |id: u64| -> Vec<&Line> { lines.iter().filter(|l| l.id == id).collect() };
    let attempts = |id: u64| -> Vec<u32> { of(id).iter().map(|l| l.attempt).collect() };
    assert_eq!(attempts(acked), [1], "{lines:?}");
    assert_eq!(
        attempts(retried),
        [1, 2],
        "the retry is redelivered: {lines:?}"
    );
    assert_eq!(attempts(rejected), [1], "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.build == "legacy" && l.api == "1.0.0" && l.label == "from-config"),
        "every delivery reached the 1.0-built code with its config: {lines:?}"
    );
    let dead = d.ctl_json(&["dead-letters"]);
    let dead_ids: Vec<u64> = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|letter| letter["id"].as_u64())
        .collect();
    assert_eq!(dead_ids, [rejected], "{dead}");
    // The plugin asked for 100 ms (its config's `retry_after_ms`), the instance's backoff is
    // 50 ms: the redelivery waited for the plugin's delay. (The first line was written before
    // the first attempt ended, so the gap is at least the delay whatever the load.)
    let (first, second) = (of(retried)[0], of(retried)[1]);
    let gap_us = second.handled_us - first.handled_us;
    assert!(
        gap_us >= 100_000,
        "the retry came {gap_us} µs after the failed attempt: {lines:?}"
    );

    // Its tracing events, fields and all, reach the daemon's log tagged with the instance.
    d.wait_for_log("fx-legacy handled", 4);
    let log = d.log();
    let handled: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fx-legacy handled"))
        .collect();
    assert_eq!(handled.len(), 4, "{log}");
    let retry_line = handled
        .iter()
        .find(|l| l.contains("outcome=\"retry\"") || l.contains("outcome=retry"))
        .unwrap_or_else(|| panic!("no retry event in:\n{log}"));
    for expected in [
        "instance=legacy",
        "plugin=fx-legacy",
        "label=from-config",
        "attempt=1",
        &format!("id={retried}"),
    ] {
        assert!(
            retry_line.contains(expected),
            "`{expected}` in {retry_line}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("fx-legacy started") && l.contains("instance=legacy")),
        "{log}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("fx-legacy stopped") && l.contains("instance=legacy")),
        "its shutdown ran and logged: {log}"
    );
}

#[test]
fn a_child_a_1_0_built_plugin_publishes_during_handle_reaches_another_instance() {
    let sandbox = sandbox("compat-pipeline", LegacyBuild::V1_0);
    let config = config(
        &sandbox,
        &[
            ("up", "legacy.>", "upstream"),
            ("down", "next.>", "downstream"),
        ],
    );
    let d = Daemon::start(sandbox, &config);
    let parent = d
        .publish("legacy.in", "piped", &["-H", "publish=next.out"])
        .unwrap();
    let child = wait_for_line(&d, "the child reaches `down`", |l| l.label == "downstream");
    assert_eq!(child.parent, Some(parent), "{child:?}");
    assert_eq!(child.payload, "piped");
    assert_ne!(child.id, parent);
    wait_until("both are acked", &d, || {
        settled(&d, "up") == (1, 0, 0) && settled(&d, "down") == (1, 0, 0)
    });
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("fx-legacy handled")
            && l.contains("instance=down")
            && l.contains("topic=next.out")),
        "{log}"
    );
}

/// Publishes `legacy.x` messages one after the other until stopped; the ids answered OK and
/// every refusal.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<u64>, Vec<String>)>,
}

impl Publisher {
    fn start(d: &Daemon) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let endpoint = Endpoint::Unix(d.socket().to_owned());
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut c = client::connect(&endpoint, None).await.unwrap();
                let (mut ids, mut refused) = (Vec::new(), Vec::new());
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    let request = c.request(pb::PublishRequest {
                        topic: "legacy.x".into(),
                        payload: format!("n{n}").into_bytes().into(),
                        headers: vec![],
                        key: String::new(),
                    });
                    match c.publisher.publish(request).await {
                        Ok(reply) => ids.push(reply.into_inner().id),
                        Err(status) => refused.push(format!("{status:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (ids, refused)
            })
        });
        Self { stop, thread }
    }

    fn finish(self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn hot_swaps_between_the_1_0_build_and_todays_build_lose_nothing() {
    const SWAPS: usize = 4;
    let sandbox = sandbox("compat-swap", LegacyBuild::V1_0);
    let config = config(&sandbox, &[("legacy", "legacy.>", "swapped")]);
    let d = Daemon::start(sandbox, &config);
    let publisher = Publisher::start(&d);
    wait_for_line(&d, "the 1.0 build handles a message", |l| {
        l.build == "legacy"
    });
    for swap in 0..SWAPS {
        let build = if swap % 2 == 0 {
            LegacyBuild::Today
        } else {
            LegacyBuild::V1_0
        };
        let before = read_lines(&record_path(d.sandbox()))
            .iter()
            .map(|l| l.id)
            .max()
            .unwrap_or(0);
        // Written under a hidden name, then renamed over the library: what deployments do.
        let temp = d.sandbox().path().join("plugins.d/.fx-legacy.so.tmp");
        fs::copy(fixtures::legacy_plugin(build), &temp).unwrap();
        fs::rename(&temp, d.sandbox().path().join(LIBRARY)).unwrap();
        wait_for_line(
            &d,
            &format!("swap {swap} to the {} build takes effect", build.word()),
            |l| l.build == build.word() && l.id > before,
        );
    }
    let (ids, refused) = publisher.finish();
    assert!(refused.is_empty(), "publishes refused: {refused:?}");
    let path = record_path(d.sandbox());
    wait_until("every accepted message is handled", &d, || {
        let seen: BTreeSet<u64> = read_lines(&path).iter().map(|l| l.id).collect();
        ids.iter().all(|id| seen.contains(id))
    });
    let lines = read_lines(&path);
    let changes = lines
        .windows(2)
        .filter(|w| w[0].build != w[1].build)
        .count();
    assert!(
        changes >= SWAPS,
        "the build changed {changes} times: {lines:?}"
    );
    let log = d.log();
    assert_eq!(
        log.matches("instance swapped to a new generation").count(),
        SWAPS,
        "{log}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
}

/// Runs the 1.0 host on `library` with `config`, the messages (JSON lines) on stdin; its exit
/// code and its report lines.
fn run_legacy_host(
    library: &Path,
    config: &str,
    messages: &[serde_json::Value],
) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut child = Command::new(fixtures::legacy_host())
        .arg(library)
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the 1.0 host runs");
    {
        let mut stdin = child.stdin.take().expect("piped");
        for message in messages {
            writeln!(stdin, "{message}").expect("the 1.0 host reads its stdin");
        }
    }
    let output = child.wait_with_output().expect("the 1.0 host ends");
    let reports = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "not a JSON line ({e}): {line}\nstderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            })
        })
        .collect();
    (output.status.code(), reports)
}

/// The report lines whose `event` is `event`.
fn events<'a>(reports: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    reports.iter().filter(|r| r["event"] == event).collect()
}

/// The `outcome` of each `outcome` line, in order.
fn outcomes(reports: &[serde_json::Value]) -> Vec<String> {
    events(reports, "outcome")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts the 1.0 host loaded `plugin`, built against today's plugin-api, and instantiated
/// it; returns the report lines.
fn loaded_in_the_1_0_host(
    library: &Path,
    plugin: &str,
    config: &str,
    messages: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    let (code, reports) = run_legacy_host(library, config, messages);
    assert_eq!(code, Some(0), "{plugin}: {reports:#?}");
    let loaded = events(&reports, "loaded");
    assert_eq!(loaded.len(), 1, "{reports:#?}");
    assert_eq!(loaded[0]["host_api_version"], "1.0.0");
    assert_eq!(loaded[0]["manifest"]["name"], plugin);
    assert_eq!(
        loaded[0]["manifest"]["api_version"],
        plugind_api::API_VERSION,
        "built against today's plugin-api"
    );
    assert_eq!(events(&reports, "instantiated").len(), 1, "{reports:#?}");
    assert_eq!(events(&reports, "shutdown").len(), 1, "{reports:#?}");
    assert!(events(&reports, "call_error").is_empty(), "{reports:#?}");
    reports
}

#[test]
fn fixtures_built_against_todays_plugin_api_load_and_run_in_the_1_0_host() {
    use serde_json::json;
    // fx-echo: ack, retry with its delay, reject, a publish during handle, tracing events.
    let reports = loaded_in_the_1_0_host(
        &fixtures::library("fx-echo", Profile::Dev),
        "fx-echo",
        r#"{"label": "in-1.0"}"#,
        &[
            json!({"topic": "echo.a", "payload": "hello"}),
            json!({"topic": "echo.b", "headers": {"outcome": "retry"}}),
            json!({"topic": "echo.c", "headers": {"outcome": "reject"}}),
            json!({"topic": "echo.d", "payload": "fwd", "headers": {"publish": "out.x"}}),
        ],
    );
    assert_eq!(outcomes(&reports), ["ack", "retry", "reject", "ack"]);
    let retry = events(&reports, "outcome")[1];
    assert_eq!(retry["retry_after_ms"], 250, "{retry}");
    let published = events(&reports, "published");
    assert_eq!(published.len(), 1, "{reports:#?}");
    assert_eq!(
        (&published[0]["topic"], &published[0]["payload"]),
        (&json!("out.x"), &json!("fwd"))
    );
    let logs = events(&reports, "log");
    assert!(
        logs.iter()
            .any(|l| l["message"] == "handled" && l["fields"]["label"] == "in-1.0"),
        "tracing events with fields reach the 1.0 host: {logs:#?}"
    );

    // fx-flaky: retries its first attempt, acks the second.
    let reports = loaded_in_the_1_0_host(
        &fixtures::library("fx-flaky", Profile::Dev),
        "fx-flaky",
        r#"{"fail_times": 1, "retry_after_ms": 5}"#,
        &[
            json!({"topic": "any", "attempt": 1}),
            json!({"topic": "any", "attempt": 2}),
        ],
    );
    assert_eq!(outcomes(&reports), ["retry", "ack"]);

    // fx-pipeline: publishes during handle, with headers.
    let reports = loaded_in_the_1_0_host(
        &fixtures::library("fx-pipeline", Profile::Dev),
        "fx-pipeline",
        r#"{"to": "stage.two"}"#,
        &[json!({"topic": "stage.one", "payload": "abc"})],
    );
    assert_eq!(outcomes(&reports), ["ack"]);
    let published = events(&reports, "published");
    assert_eq!(published.len(), 1, "{reports:#?}");
    assert_eq!(published[0]["payload"], "ABC");
    assert_eq!(published[0]["headers"]["parent-attempt"], "1");

    // fx-legacy's own source built against today's plugin-api: its config read, retry then ack.
    let reports = loaded_in_the_1_0_host(
        &fixtures::legacy_plugin(LegacyBuild::Today),
        "fx-legacy",
        r#"{"label": "today-in-1.0"}"#,
        &[
            json!({"topic": "legacy.a", "headers": {"outcome": "retry"}, "attempt": 1}),
            json!({"topic": "legacy.a", "headers": {"outcome": "retry"}, "attempt": 2}),
        ],
    );
    assert_eq!(outcomes(&reports), ["retry", "ack"]);
    assert!(
        events(&reports, "log")
            .iter()
            .any(|l| l["fields"]["build"] == "today" && l["fields"]["label"] == "today-in-1.0"),
        "{reports:#?}"
    );
}

#[test]
fn the_1_0_host_reports_a_config_its_plugin_refuses() {
    let (code, reports) = run_legacy_host(
        &fixtures::legacy_plugin(LegacyBuild::Today),
        r#"{"no_label": true}"#,
        &[],
    );
    assert_eq!(code, Some(1), "{reports:#?}");
    let refused = events(&reports, "instantiate_error");
    assert_eq!(refused.len(), 1, "{reports:#?}");
    assert_eq!(refused[0]["kind"], "config");
    let message = refused[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no_label"), "{message}");
}

#[test]
fn the_1_0_host_accepts_an_appended_root_module_field_and_refuses_a_changed_layout() {
    // A 1.1.0 copy of plugin-api whose root module gained a field: the supported extension.
    let (code, reports) = run_legacy_host(
        &fixtures::variant(Variant::AppendedField),
        "{}",
        &[serde_json::json!({"topic": "any"})],
    );
    assert_eq!(code, Some(0), "{reports:#?}");
    assert_eq!(
        events(&reports, "loaded")[0]["manifest"]["api_version"],
        "1.2.0"
    );
    assert_eq!(outcomes(&reports), ["ack"]);

    // `LogLevel` widened: the 1.0 host's layout check refuses it, naming the mismatch.
    let (code, reports) = run_legacy_host(&fixtures::variant(Variant::Incompatible), "{}", &[]);
    assert_eq!(code, Some(1), "{reports:#?}");
    let refused = events(&reports, "load_error");
    assert_eq!(refused.len(), 1, "{reports:#?}");
    assert_eq!(refused[0]["stage"], "layout");
    let message = refused[0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("expected u8, found u16"), "{message}");
}

#[test]
fn a_1_1_plugin_that_defers_refuses_itself_in_a_1_0_host_naming_both_versions() {
    // fx-defer (DEFERS) and fx-async (an AsyncPlugin) need 1.1's tokens; a 1.0 daemon would
    // count every deferred attempt as failed, so they refuse to start there, before `new`.
    for (fixture, config) in [
        ("fx-defer", r#"{"report": "/dev/null"}"#),
        ("fx-async", "{}"),
    ] {
        let (code, reports) =
            run_legacy_host(&fixtures::library(fixture, Profile::Dev), config, &[]);
        assert_eq!(code, Some(1), "{fixture}: {reports:#?}");
        let refused = events(&reports, "instantiate_error");
        assert_eq!(refused.len(), 1, "{fixture}: {reports:#?}");
        let message = refused[0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("plugind-api 1.1.0") && message.contains("older than 1.1 (1.0)"),
            "{fixture}: {message}"
        );
        assert!(
            outcomes(&reports).is_empty(),
            "nothing was handled: {reports:#?}"
        );
    }
}

#[test]
fn check_probe_says_a_1_0_plugins_config_was_not_checked_never_all_good() {
    let sandbox = sandbox("compat-check", LegacyBuild::V1_0);
    let config = config(&sandbox, &[("legacy", "legacy.>", "from-config")]);
    sandbox.put("plugins.toml", &config);
    let check = |args: &[&str]| {
        Command::new(binary::plugind())
            .arg("check")
            .arg("-c")
            .arg(sandbox.path().join("plugins.toml"))
            .args(args)
            .env_remove("PLUGIND_CONFIG")
            .output()
            .unwrap()
    };
    let out = check(&["--probe"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("its config was not checked: its plugin was built with plugind-api 1.0"),
        "{stdout}"
    );
    assert!(!stdout.contains("all good"), "{stdout}");
    assert!(
        stdout.contains("no problem found, but 1 instance config could not be checked"),
        "{stdout}"
    );
    let out = check(&["--probe", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let legacy = report["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "legacy")
        .unwrap()
        .clone();
    assert_eq!(legacy["config_checked"], false, "{report}");
}
