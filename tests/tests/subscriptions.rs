//! Nothing routed is ever dropped (docs/design.md §7): a subscription outlives `enabled = false`,
//! a missing library and a restart, and ends only by the operator's act (the instance's
//! table removed, or `ctl forget`). Around it: unrouted publishes made visible, `max_age`,
//! pauses kept across restarts, `ctl enable`/`disable` from any folder, a broken local
//! `plugins.toml`, and acks recorded promptly enough that a crash repeats only a handful of
//! slow calls. Every test runs the real daemon with real plugins over the real API.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use plugind_tests::{
    binary,
    daemon::Daemon,
    ledger_support::{
        config, ids, publish_all, record_config, sandbox, try_publish_all, wait_until,
    },
    record::read_record,
    sandbox::Sandbox,
};

/// `plugind publish TOPIC DATA --json`: the answer (id, instances) and what it printed on
/// stderr.
fn publish(d: &Daemon, topic: &str, data: &str) -> (serde_json::Value, String) {
    let out = d.cli(&["publish", topic, data, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "publish {topic}: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// The message ids in file-sink's output file.
fn sunk(path: &Path) -> BTreeSet<u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_disabled_instance_keeps_collecting_until_enabled_and_past_max_backlog_refuses_naming_it() {
    let s = sandbox("subs-disabled");
    let rec = s.path().join("rec.txt");
    let held = s.path().join("held.txt");
    let text = config(
        "fsync",
        &[
            ("rec", "", record_config(&rec, "")),
            ("held", "max_backlog = \"2KiB\"", record_config(&held, "")),
        ],
    );
    let d = Daemon::start(s, &text);
    let out = d.cli(&["ctl", "disable", "held"]);
    assert!(out.status.success(), "{out:?}");
    // Published while disabled: answered OK, and routed to it all the same.
    let payloads: Vec<String> = (0..4).map(|i| format!("while-disabled-{i}")).collect();
    let published: BTreeSet<u64> = publish_all(&d, &payloads, None).into_iter().collect();
    let held_now = d.instance("held");
    assert_eq!(
        (&held_now["state"], &held_now["backlog"]),
        (&"disabled".into(), &4.into()),
        "{held_now}"
    );
    let text_view = String::from_utf8(d.cli(&["ctl", "plugins"]).stdout).unwrap();
    assert!(
        text_view.contains("4 deliveries wait for it"),
        "ctl plugins shows the backlog of a disabled instance: {text_view}"
    );
    // Past its max_backlog a publish routed to it is refused, naming it; nothing is lost.
    let big = "x".repeat(700);
    let answers = try_publish_all(&d, &vec![big; 4], None);
    let refused: Vec<&tonic::Status> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(!refused.is_empty(), "2 KiB cannot take 4 × 700 bytes");
    for status in &refused {
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("instance `held`"),
            "{}",
            status.message()
        );
    }
    let accepted: BTreeSet<u64> = answers.into_iter().filter_map(Result::ok).collect();
    let out = d.cli(&["ctl", "enable", "held"]);
    assert!(out.status.success(), "{out:?}");
    let all: BTreeSet<u64> = published.union(&accepted).copied().collect();
    wait_until(
        "held has every message published while disabled",
        &d,
        || ids(&read_record(&held)) == all,
    );
    assert_eq!(ids(&read_record(&rec)), all);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// A sandbox with the file-sink example plugin in `plugins.d`, and its `plugins.toml`: one
/// instance `sink` that takes its topics from the plugin (`demo.>`), writing to `out.jsonl`.
fn sink_sandbox(label: &str) -> (Sandbox, String) {
    let s = Sandbox::new(label);
    s.dir("plugins.d");
    s.copy(
        "plugins.d/file-sink.so",
        &binary::example_plugin("file-sink"),
    );
    let text = format!(
        "[host]\nautoload = false\ngrace_period = \"2s\"\n\n[plugins.sink]\nplugin = \
         \"file-sink\"\n[plugins.sink.config]\npath = \"{}\"\n",
        s.path().join("out.jsonl").display()
    );
    (s, text)
}

#[test]
fn a_library_removed_keeps_its_route_across_a_restart_until_it_comes_back() {
    let (s, text) = sink_sandbox("subs-library");
    let library = s.path().join("plugins.d/file-sink.so");
    let out = s.path().join("out.jsonl");
    let d = Daemon::start(s, &text);
    let mut published = BTreeSet::new();
    published.insert(publish(&d, "demo.x", "before").0["id"].as_u64().unwrap());
    wait_until("the first message is written", &d, || {
        sunk(&out) == published
    });
    // A plain `rm` (the first half of an `rm` + `cp` deploy): its route stays.
    fs::remove_file(&library).unwrap();
    d.wait_for_log("instance stopped; its deliveries wait", 1);
    for i in 0..3 {
        let (answer, warning) = publish(&d, "demo.x", &format!("gone-{i}"));
        assert_eq!(answer["instances"], 1, "still routed to sink: {answer}");
        assert!(warning.is_empty(), "{warning}");
        published.insert(answer["id"].as_u64().unwrap());
    }
    // Across a restart with the library still missing: its last known topics route it.
    let s = d.stop_keeping_state().1;
    let d = Daemon::restart(s);
    let sink = d.instance("sink");
    assert_eq!(sink["topics"], serde_json::json!(["demo.>"]), "{sink}");
    assert_eq!(sink["backlog"], 3, "{sink}");
    assert_eq!(sink["state"], "failed", "no library provides it: {sink}");
    for i in 0..2 {
        let (answer, _) = publish(&d, "demo.x", &format!("restarted-{i}"));
        assert_eq!(answer["instances"], 1, "{answer}");
        published.insert(answer["id"].as_u64().unwrap());
    }
    // The `cp`: everything arrives.
    fs::copy(binary::example_plugin("file-sink"), &library).unwrap();
    wait_until("every message is written", &d, || sunk(&out) == published);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn an_autoloaded_instance_stays_subscribed_until_forgotten_which_needs_its_library_gone() {
    let (s, _) = sink_sandbox("subs-autoload");
    let library = s.path().join("plugins.d/file-sink.so");
    // Autoloaded with the defaults: file-sink gets no `path` and cannot start, but its
    // subscription (the plugin's own topics) holds what is published for it.
    let d = Daemon::start(s, "[host]\nautoload = true\ngrace_period = \"2s\"\n");
    let (answer, _) = publish(&d, "demo.x", "one");
    assert_eq!(answer["instances"], 1, "{answer}");
    let sink = d.instance("file-sink");
    assert_eq!(sink["subscription"], "autoloaded", "{sink}");
    // Forget is refused while its library is in plugin_dir (it would be autoloaded again).
    let refused = d.cli(&["ctl", "forget", "file-sink", "--yes"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("is autoloaded from") && stderr.contains("remove the file first"),
        "{stderr}"
    );
    fs::remove_file(&library).unwrap();
    wait_until("its library is gone", &d, || {
        let log = d.log();
        log.contains("no library in plugin_dir provides plugin `file-sink`")
    });
    let (answer, _) = publish(&d, "demo.x", "two");
    assert_eq!(answer["instances"], 1, "still subscribed: {answer}");
    // Across a restart too.
    let s = d.stop_keeping_state().1;
    let d = Daemon::restart(s);
    let (answer, _) = publish(&d, "demo.x", "three");
    assert_eq!(answer["instances"], 1, "still subscribed: {answer}");
    // Forgotten: its subscription and its backlog end.
    let forgotten = d.ctl_json(&["forget", "file-sink", "--yes"]);
    assert_eq!(forgotten["forgotten"], 3, "{forgotten}");
    let dead = d.ctl_json(&["dead-letters", "--instance", "file-sink"]);
    assert_eq!(dead["dead_letters"].as_array().unwrap().len(), 3, "{dead}");
    assert_eq!(dead["dead_letters"][0]["reason"], "forgotten");
    let (answer, warning) = publish(&d, "demo.x", "four");
    assert_eq!(answer["instances"], 0, "{answer}");
    assert!(warning.contains("no instance subscribes"), "{warning}");
    assert!(d.instance("file-sink").is_null(), "no longer listed");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn unrouted_publishes_are_counted_and_warned_and_refused_with_unrouted_refuse() {
    let s = sandbox("subs-unrouted");
    let rec = s.path().join("rec.txt");
    let text = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start(s, &text);
    let (answer, warning) = publish(&d, "nobody.listens", "x");
    assert_eq!(answer["instances"], 0, "{answer}");
    assert!(
        warning.starts_with("plugind: warning: publish nobody.listens: no instance subscribes"),
        "{warning}"
    );
    let (answer, warning) = publish(&d, "t.x", "y");
    assert_eq!(answer["instances"], 1, "{answer}");
    assert!(warning.is_empty(), "{warning}");
    assert_eq!(d.ctl_json(&["status"])["unrouted"], 1);
    d.wait_for_log("published to a topic no instance subscribes to", 1);
    assert!(
        d.log().contains("\"topic\":\"nobody.listens\""),
        "{}",
        d.log()
    );
    // Refused instead, once the configuration says so (applied by a reload).
    let path = d.sandbox().path().join("plugins.toml");
    fs::write(
        &path,
        text.replace("[host]\n", "[host]\nunrouted = \"refuse\"\n"),
    )
    .unwrap();
    let out = d.cli(&["ctl", "reload"]);
    assert!(out.status.success(), "{out:?}");
    let refused = d.cli(&["publish", "nobody.listens", "z"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("FailedPrecondition")
            && stderr.contains("no instance subscribes to topic \"nobody.listens\""),
        "{stderr}"
    );
    assert_eq!(d.ctl_json(&["status"])["unrouted"], 2);
    assert!(d.publish("t.x", "routed", &[]).is_ok());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `plugind ARGS` run in `folder`, with no configuration or endpoint from the environment.
fn plugind_in(folder: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary::plugind())
        .args(args)
        .current_dir(folder)
        .env_remove("PLUGIND_CONNECT")
        .env_remove("PLUGIND_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn enable_and_disable_work_from_any_folder_with_the_daemon_started_without_c() {
    let s = sandbox("subs-folders");
    let rec = s.path().join("rec.txt");
    let text = config("fsync", &[("rec", "", record_config(&rec, ""))])
        .replace("[plugins.rec]\n", "[plugins.rec]   # the recorder\n")
        .replace(
            "topics = [\"t.>\"]\n",
            "topics = [\"t.>\"]\nenabled = true   # keep this comment\n",
        );
    let d = Daemon::start_in_folder(s, &text);
    let folder = d.sandbox().path().to_owned();
    let path = folder.join("plugins.toml");
    // The daemon reports its configuration by its absolute path.
    assert_eq!(
        d.ctl_json(&["status"])["config"],
        path.display().to_string()
    );
    // From the daemon's own folder, finding ./plugins.toml as it did.
    let out = plugind_in(&folder, &["ctl", "disable", "rec"]);
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text.replace("enabled = true   #", "enabled = false   #"),
        "only the value changed; its trailing comment stays"
    );
    assert_eq!(d.instance("rec")["state"], "disabled");
    // From another folder, reaching the daemon by its socket.
    let elsewhere = Sandbox::new("subs-elsewhere");
    let connect = format!("unix:{}", d.socket().display());
    let out = plugind_in(
        elsewhere.path(),
        &["ctl", "enable", "rec", "--connect", &connect],
    );
    assert!(out.status.success(), "{out:?}\n{}", d.log());
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
    assert_eq!(d.instance("rec")["state"], "running");
    assert!(
        fs::read_dir(&folder).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("plugind-ctl")),
        "no temporary file left behind"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_broken_local_plugins_toml_still_reaches_the_daemon_and_says_what_is_wrong() {
    let s = sandbox("subs-broken");
    let rec = s.path().join("rec.txt");
    let text = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start_in_folder(s, &text);
    let folder = d.sandbox().path().to_owned();
    // A mistake saved but not applied (the watcher refuses it; the daemon keeps running).
    fs::write(
        folder.join("plugins.toml"),
        text.replace("autoload = false\n", "autoload = false\nretries = 3\n"),
    )
    .unwrap();
    for command in ["status", "plugins"] {
        let out = plugind_in(&folder, &["ctl", command]);
        assert!(out.status.success(), "ctl {command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("plugind: warning: ctl")
                && stderr.contains("plugins.toml:4:1")
                && stderr.contains("retries")
                && stderr.contains("last good configuration"),
            "{stderr}"
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("rec"));
    }
    // An edit on top of the broken file: written, and refused by the daemon — said so.
    let out = plugind_in(&folder, &["ctl", "disable", "rec"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("was written (enabled = false), but the daemon did not apply it"),
        "{stderr}"
    );
    assert!(
        fs::read_to_string(folder.join("plugins.toml"))
            .unwrap()
            .contains("enabled = false")
    );
    let mut watch = Command::new(binary::plugind())
        .args(["ctl", "watch", "--count", "1"])
        .current_dir(&folder)
        .env_remove("PLUGIND_CONNECT")
        .env_remove("PLUGIND_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while watch.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "watch ends");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = watch.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded"));
    // So does $PLUGIND_CONNECT, when the broken file's listen cannot be read at all.
    fs::write(folder.join("plugins.toml"), "[host\n").unwrap();
    let out = Command::new(binary::plugind())
        .args(["ctl", "status"])
        .current_dir(&folder)
        .env_remove("PLUGIND_CONFIG")
        .env("PLUGIND_CONNECT", format!("unix:{}", d.socket().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid configuration"));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_pause_survives_a_restart_until_resumed() {
    let s = sandbox("subs-pause");
    let rec = s.path().join("rec.txt");
    let text = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start(s, &text);
    d.ctl_json(&["pause", "rec"]);
    let published: BTreeSet<u64> = publish_all(&d, &["held".to_owned()], None)
        .into_iter()
        .collect();
    let s = d.stop_keeping_state().1;
    let d = Daemon::restart(s);
    let rec_now = d.instance("rec");
    assert_eq!(
        (&rec_now["paused"], &rec_now["state"], &rec_now["backlog"]),
        (&true.into(), &"paused".into(), &1.into()),
        "{rec_now}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        read_record(&rec).is_empty(),
        "nothing handed out while paused"
    );
    d.ctl_json(&["resume", "rec"]);
    wait_until("the held message is delivered", &d, || {
        ids(&read_record(&rec)) == published
    });
    // Resumed for good: another restart does not pause it again.
    let s = d.stop_keeping_state().1;
    let d = Daemon::restart(s);
    assert_eq!(d.instance("rec")["paused"], false);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn waiting_deliveries_older_than_max_age_are_dead_lettered_as_expired() {
    let s = sandbox("subs-max-age");
    let held = s.path().join("held.txt");
    let text = config(
        "fsync",
        &[(
            "held",
            "enabled = false\nmax_age = \"1s\"",
            record_config(&held, ""),
        )],
    );
    let d = Daemon::start(s, &text);
    let payloads: Vec<String> = (0..3).map(|i| format!("old-{i}")).collect();
    publish_all(&d, &payloads, None);
    wait_until("the three expire", &d, || {
        d.ctl_json(&["dead-letters", "--instance", "held"])["dead_letters"]
            .as_array()
            .unwrap()
            .len()
            == 3
    });
    let dead = d.ctl_json(&["dead-letters", "--instance", "held"]);
    assert!(
        dead["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["reason"] == "expired" && d["failures"] == 0),
        "{dead}"
    );
    assert_eq!(d.instance("held")["backlog"], 0);
    d.wait_for_log("waiting deliveries older than max_age dead-lettered", 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn after_sigkill_a_slow_plugin_gets_again_only_the_call_in_hand_and_a_handful_more() {
    let s = sandbox("subs-acks");
    let rec = s.path().join("rec.txt");
    // 50 ms a call (a webhook, say), and room for many queued behind it.
    let text = config(
        "fsync",
        &[(
            "rec",
            "queue_capacity = 256",
            record_config(&rec, "delay_ms = 50"),
        )],
    );
    let d = Daemon::start(s, &text);
    let payloads: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
    let published: BTreeSet<u64> = publish_all(&d, &payloads, None).into_iter().collect();
    // About 40 calls in, the process is killed.
    wait_until("about 40 calls", &d, || read_record(&rec).len() >= 40);
    let handled_before = read_record(&rec).len();
    let s = d.kill9();
    let d = Daemon::restart(s);
    // Every delivery settled (a redelivered call waits its backoff behind the rest).
    d.wait_idle("rec");
    let records = read_record(&rec);
    assert_eq!(ids(&records), published);
    let repeated = records.len() - published.len();
    eprintln!("handled before the kill: {handled_before}; delivered again after it: {repeated}");
    // The call in hand, plus the acks of the last moment not yet written: a handful. (With
    // settlements sent back 64 calls at a time, 37 were repeated in one kill.)
    assert!(
        (1..=5).contains(&repeated),
        "{repeated} deliveries repeated after the kill ({handled_before} handled before it)"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn ctl_watch_says_the_connection_closed_when_the_daemon_is_killed() {
    let s = Sandbox::with_fixtures("subs-watch", &["fx-echo"]);
    let d = Daemon::start(
        s,
        "[host]\nautoload = false\n[plugins.a]\nplugin = \"fx-echo\"\ntopics = [\"a\"]\n",
    );
    let watch = Command::new(binary::plugind())
        .args(["ctl", "watch"])
        .arg("--connect")
        .arg(format!("unix:{}", d.socket().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_for_log("instance loaded", 1);
    std::thread::sleep(Duration::from_millis(300));
    drop(d.kill9());
    let out = watch.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the connection to the daemon closed") && !stderr.contains("h2 protocol"),
        "{stderr}"
    );
}

#[test]
fn what_waits_for_a_removed_instance_shows_after_a_restart_until_it_is_forgotten() {
    let s = sandbox("subs-removed");
    let rec = s.path().join("rec.txt");
    let held = s.path().join("held.txt");
    let both = config(
        "fsync",
        &[
            ("rec", "", record_config(&rec, "")),
            ("held", "enabled = false", record_config(&held, "")),
        ],
    );
    let d = Daemon::start(s, &both);
    let payloads: Vec<String> = (0..3).map(|i| format!("m{i}")).collect();
    publish_all(&d, &payloads, None);
    let s = d.stop_keeping_state().1;
    // Its table is gone when the daemon starts again: its subscription has ended, and what
    // waited for it is still there, shown, until an operator forgets it.
    let only_rec = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start(s, &only_rec);
    let held_now = d.instance("held");
    assert_eq!(
        (
            &held_now["state"],
            &held_now["backlog"],
            &held_now["subscription"]
        ),
        (&"removed".into(), &3.into(), &serde_json::Value::Null),
        "{held_now}"
    );
    publish_all(&d, &["more".to_owned()], None);
    assert_eq!(
        d.instance("held")["backlog"],
        3,
        "nothing more is routed to it"
    );
    let forgotten = d.ctl_json(&["forget", "held", "--purge", "--yes"]);
    assert_eq!(forgotten["forgotten"], 3);
    assert!(d.instance("held").is_null());
    assert!(read_record(&held).is_empty());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn an_instance_whose_library_was_never_loaded_has_nothing_routed_to_it_yet() {
    let s = sandbox("subs-never-loaded");
    let rec = s.path().join("rec.txt");
    let text = format!(
        "{}\n[plugins.ghost]\nplugin = \"not-there\"\n",
        config("fsync", &[("rec", "", record_config(&rec, ""))])
    );
    let d = Daemon::start(s, &text);
    let ghost = d.instance("ghost");
    assert_eq!(
        (&ghost["topics_known"], &ghost["topics"]),
        (&false.into(), &serde_json::json!([])),
        "{ghost}"
    );
    let text_view = String::from_utf8(d.cli(&["ctl", "plugins"]).stdout).unwrap();
    assert!(
        text_view.contains("nothing is routed to it yet"),
        "{text_view}"
    );
    publish_all(&d, &["x".to_owned()], None);
    assert_eq!(d.instance("ghost")["backlog"], 0);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
