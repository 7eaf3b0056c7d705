//! Deferred acks (plugind-api 1.1, docs/design.md §5 and §7): a plugin takes an attempt's
//! token in `handle`, returns Defer, and settles it later from a thread of its own. Every
//! test runs the real daemon with the `fx-defer` fixture, which settles as each message's
//! headers say and reports every settle (refused or not) to a file.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use plugind_tests::{
    daemon::Daemon,
    ledger_support::{record_config, wait_until},
    record::read_record,
    sandbox::Sandbox,
};

/// A sandbox with fx-defer and fx-record, and the config of one fx-defer instance `d`
/// (`extra` lines in its table) plus an fx-record instance `kids` on `child.>`.
fn setup(label: &str, durability: &str, extra: &str) -> (Sandbox, String, PathBuf, PathBuf) {
    setup_reporting(label, durability, extra, false)
}

/// [`setup`], fx-defer also reporting each call of `handle` if `calls`.
fn setup_reporting(
    label: &str,
    durability: &str,
    extra: &str,
    calls: bool,
) -> (Sandbox, String, PathBuf, PathBuf) {
    let s = Sandbox::with_fixtures(label, &["fx-defer", "fx-record"]);
    let report = s.path().join("report.jsonl");
    let kids = s.path().join("kids.txt");
    let config = format!(
        "[host]\ndurability = \"{durability}\"\nautoload = false\ngrace_period = \"3s\"\n\n\
         [defaults]\nmax_attempts = 3\nbackoff = {{ initial = \"20ms\", max = \"20ms\", \
         jitter = 0.0 }}\n\n\
         [plugins.d]\nplugin = \"fx-defer\"\ntopics = [\"defer.>\"]\nmax_in_flight = 256\n\
         {extra}\n[plugins.d.config]\nreport = \"{}\"\nreport_calls = {calls}\n\n\
         [plugins.kids]\nplugin = \"fx-record\"\ntopics = [\"child.>\"]\n\
         [plugins.kids.config]\n{}\n",
        report.display(),
        record_config(&kids, "")
    );
    (s, config, report, kids)
}

/// The complete lines of fx-defer's report (one being written is left out).
fn lines(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// The report lines of fx-defer: (id, attempt, op, error).
fn report(path: &Path) -> Vec<(u64, u32, String, Option<String>)> {
    lines(path)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_u64().unwrap(),
                v["attempt"].as_u64().unwrap() as u32,
                v["op"].as_str().unwrap().to_owned(),
                v["error"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The delivery of message `id` to instance `d`, as `ctl show --json` shows it.
fn delivery(d: &Daemon, id: u64) -> serde_json::Value {
    d.ctl_json(&["show", &id.to_string()])["deliveries"]
        .as_array()
        .and_then(|list| list.iter().find(|x| x["instance"] == "d").cloned())
        .unwrap_or_default()
}

fn acked(d: &Daemon) -> u64 {
    d.instance("d")["acked"].as_u64().unwrap()
}

#[test]
fn deferred_attempts_are_acked_from_another_thread_many_at_once() {
    let (s, config, report_path, _) = setup("defer-ack", "fsync", "");
    let d = Daemon::start(s, &config);
    // 40 messages each settled 300 ms after its call: with one attempt at a time this would
    // take 12 s; deferred, they are all outstanding together.
    let ids: Vec<u64> = d.held("d", || {
        (0..40)
            .map(|_| d.publish_with("defer.x", "payload", &[("after-ms", "300")]))
            .collect()
    });
    let mut most = 0;
    wait_until("40 acks", &d, || {
        let p = d.instance("d");
        most = most.max(p["deferred"].as_u64().unwrap());
        p["acked"] == 40
    });
    assert!(most > 1, "never more than one deferred attempt at once");
    let report = report(&report_path);
    assert_eq!(report.len(), 40, "{report:?}");
    assert!(
        report
            .iter()
            .all(|(_, a, op, e)| *a == 1 && op == "settle" && e.is_none())
    );
    let mut settled: Vec<u64> = report.iter().map(|r| r.0).collect();
    settled.sort_unstable();
    assert_eq!(settled, ids);
    let p = d.instance("d");
    assert_eq!(
        (p["failures"].as_u64(), p["deferred"].as_u64()),
        (Some(0), Some(0))
    );
    d.stop();
}

#[test]
fn a_token_whose_attempt_already_ended_is_refused_never_applied_to_another_attempt() {
    let (s, config, report_path, _) = setup("defer-stale", "fsync", "ack_timeout = \"400ms\"");
    let d = Daemon::start(s, &config);
    // Taken, then Ack returned from handle: the token's own ack later is a second settle.
    let twice = d.publish_with(
        "defer.x",
        "payload",
        &[("settle", "sync-ack"), ("after-ms", "100")],
    );
    // Attempt 1 answers after its lease ended (a timeout); attempt 2 acks in time.
    let late = d.publish_with(
        "defer.x",
        "payload",
        &[("after-ms", "1200"), ("until-attempt", "1")],
    );
    wait_until("both reported", &d, || {
        let r = report(&report_path);
        r.iter().any(|x| x.0 == twice) && r.iter().filter(|x| x.0 == late).count() == 2
    });
    let r = report(&report_path);
    let of = |id: u64| r.iter().filter(|x| x.0 == id).collect::<Vec<_>>();
    let twice_reports = of(twice);
    assert_eq!(twice_reports.len(), 1);
    let refused = twice_reports[0]
        .3
        .as_deref()
        .expect("the second settle is refused");
    assert!(refused.contains("already ended"), "{refused}");
    let late_reports = of(late);
    let attempt1 = late_reports.iter().find(|x| x.1 == 1).unwrap();
    let attempt2 = late_reports.iter().find(|x| x.1 == 2).unwrap();
    assert!(
        attempt1
            .3
            .as_deref()
            .is_some_and(|e| e.contains("attempt 1")),
        "the late settle of attempt 1 is refused, naming it: {attempt1:?}"
    );
    assert_eq!(attempt2.3, None, "attempt 2 settles: {attempt2:?}");
    wait_until("both acked", &d, || acked(&d) == 2);
    let p = d.instance("d");
    assert_eq!(p["failures"], 1, "the timeout of attempt 1 only: {p}");
    d.stop();
}

#[test]
fn a_dropped_token_fails_its_attempt_with_reason_dropped() {
    let (s, config, _, _) = setup("defer-drop", "fsync", "");
    let d = Daemon::start(s, &config);
    let id = d.publish_with("defer.x", "payload", &[("settle", "drop")]);
    wait_until("a dead letter", &d, || {
        d.instance("d")["dead_lettered"] == 1
    });
    let shown = delivery(&d, id);
    assert_eq!(shown["state"], "dead_lettered", "{shown}");
    assert_eq!(shown["failures"], 3, "{shown}");
    assert_eq!(shown["last_reason"], "dropped", "{shown}");
    d.stop();
}

#[test]
fn keep_alive_extends_a_lease_past_ack_timeout() {
    let (s, config, report_path, _) = setup("defer-keep", "fsync", "ack_timeout = \"400ms\"");
    let d = Daemon::start(s, &config);
    // Settled after 1.5 s, three leases later, kept alive every 150 ms.
    let kept = d.publish_with(
        "defer.x",
        "payload",
        &[("after-ms", "1500"), ("keep-alive-ms", "150")],
    );
    // Not kept alive: times out.
    let lapsed = d.publish_with(
        "defer.x",
        "payload",
        &[("after-ms", "1500"), ("until-attempt", "1")],
    );
    wait_until("both acked", &d, || acked(&d) == 2);
    let r = report(&report_path);
    assert!(
        r.iter()
            .filter(|x| x.0 == kept && x.2 == "keep_alive")
            .count()
            >= 5,
        "{r:?}"
    );
    assert!(
        r.iter()
            .filter(|x| x.0 == kept)
            .all(|x| x.1 == 1 && x.3.is_none()),
        "one attempt, nothing refused: {r:?}"
    );
    assert!(r.iter().any(|x| x.0 == lapsed && x.1 == 2 && x.3.is_none()));
    assert_eq!(
        d.instance("d")["failures"],
        1,
        "only the one not kept alive"
    );
    d.stop();
}

#[test]
fn children_published_through_a_token_are_committed_only_with_its_ack() {
    let (s, config, _, kids) = setup("defer-kids", "fsync", "");
    let d = Daemon::start(s, &config);
    // Attempt 1 retries (its child is discarded); attempt 2 acks with its child.
    let id = d.publish_with(
        "defer.x",
        "payload",
        &[
            ("settle", "retry"),
            ("until-attempt", "1"),
            ("child", "child.a"),
        ],
    );
    // Rejected: no child at all.
    d.publish_with(
        "defer.x",
        "payload",
        &[("settle", "reject"), ("child", "child.b")],
    );
    wait_until("settled", &d, || {
        let p = d.instance("d");
        p["acked"] == 1 && p["dead_lettered"] == 1
    });
    wait_until("the child", &d, || !read_record(&kids).is_empty());
    d.wait_idle("kids");
    let children = read_record(&kids);
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0].topic, "child.a");
    assert!(children[0].id > id);
    d.stop();
}

#[test]
fn sigkill_with_outstanding_tokens_charges_a_crash_and_redelivers() {
    let (s, config, _, _) = setup("defer-kill", "fsync", "max_attempts = 5");
    let d = Daemon::start(s, &config);
    let ids: Vec<u64> = (0..10)
        .map(|_| d.publish_with("defer.x", "payload", &[("settle", "never")]))
        .collect();
    wait_until("10 deferred", &d, || d.instance("d")["deferred"] == 10);
    let s = d.kill9();
    let d = Daemon::restart(s);
    // Redelivered (deferred again), each charged one `crash`.
    wait_until("10 deferred again", &d, || {
        d.instance("d")["deferred"] == 10
    });
    for id in ids {
        let shown = delivery(&d, id);
        assert_eq!(
            (&shown["failures"], &shown["last_reason"]),
            (&1.into(), &"crash".into()),
            "{shown}"
        );
    }
    d.stop();
}

#[test]
fn a_graceful_stop_waits_for_outstanding_tokens_then_releases_the_rest_without_failure() {
    let (s, config, report_path, _) = setup("defer-stop", "fsync", "");
    let d = Daemon::start(s, &config);
    let (soon, never) = d.held("d", || {
        // Settled a second after their call: within the stop's 3 s grace period.
        let soon: Vec<u64> = (0..5)
            .map(|_| d.publish_with("defer.x", "payload", &[("after-ms", "1000")]))
            .collect();
        // Never settled: released at the end of the grace period.
        let never: Vec<u64> = (0..5)
            .map(|_| {
                d.publish_with(
                    "defer.x",
                    "payload",
                    &[("settle", "never"), ("until-attempt", "1")],
                )
            })
            .collect();
        (soon, never)
    });
    wait_until("10 deferred", &d, || d.instance("d")["deferred"] == 10);
    let started = Instant::now();
    let (status, s) = d.stop_keeping_state();
    assert!(status.success());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "the stop did not wait: {waited:?}"
    );
    let r = report(&report_path);
    for id in &soon {
        assert!(
            r.iter().any(|x| x.0 == *id && x.3.is_none()),
            "{id} was settled during the stop: {r:?}"
        );
    }
    let d = Daemon::restart(s);
    // Only the released ones come back, without a failure, and ack now.
    wait_until("5 acked", &d, || acked(&d) == 5);
    let r = report(&report_path);
    for id in &never {
        assert!(
            r.iter().any(|x| x.0 == *id && x.1 == 2 && x.3.is_none()),
            "{r:?}"
        );
    }
    assert_eq!(d.instance("d")["failures"], 0);
    d.stop();
}

#[test]
fn a_swap_with_100_outstanding_tokens_loses_and_duplicates_nothing() {
    let (s, config, report_path, _) = setup("defer-swap", "fsync", "");
    let d = Daemon::start(s, &config);
    let ids: Vec<u64> = d.held("d", || {
        (0..100)
            .map(|_| d.publish_with("defer.x", "payload", &[("after-ms", "3000")]))
            .collect()
    });
    wait_until("100 deferred", &d, || d.instance("d")["deferred"] == 100);
    // A new generation while they are out; the old one drains.
    let out = d.cli(&["ctl", "reload", "d"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("generation 2", &d, || d.instance("d")["generation"] == 2);
    // New messages go to generation 2 at once.
    let more: Vec<u64> = (0..10)
        .map(|_| d.publish_with("defer.x", "payload", &[]))
        .collect();
    wait_until("110 acked", &d, || acked(&d) == 110);
    wait_until("generation 1 retired", &d, || {
        d.instance("d")["draining"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let r = report(&report_path);
    assert_eq!(r.len(), 110, "each settled once: {r:?}");
    assert!(r.iter().all(|x| x.1 == 1 && x.3.is_none()), "{r:?}");
    let mut settled: Vec<u64> = r.iter().map(|x| x.0).collect();
    settled.sort_unstable();
    let mut all = ids;
    all.extend(more);
    assert_eq!(settled, all);
    let p = d.instance("d");
    assert_eq!(
        (p["failures"].as_u64(), p["deferred"].as_u64()),
        (Some(0), Some(0))
    );
    d.stop();
}

/// The report lines with their time: (id, attempt, op, at_ms), in the order written.
fn timeline(path: &Path) -> Vec<(u64, u32, String, u64)> {
    lines(path)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_u64().unwrap(),
                v["attempt"].as_u64().unwrap() as u32,
                v["op"].as_str().unwrap().to_owned(),
                v["at_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_ordering_key_hands_out_one_delivery_per_key_at_a_time_in_order() {
    let (s, config, report_path, _) =
        setup_reporting("defer-order", "fsync", "ordering_key = \"k\"", true);
    let d = Daemon::start(s, &config);
    let (a1, a2, a3, b1, b2, free) = d.held("d", || {
        (
            // Key a: the first retries once (the key stays held through its backoff).
            d.publish_with(
                "defer.x",
                "payload",
                &[
                    ("k", "a"),
                    ("after-ms", "150"),
                    ("settle", "retry"),
                    ("until-attempt", "1"),
                ],
            ),
            d.publish_with("defer.x", "payload", &[("k", "a"), ("after-ms", "150")]),
            d.publish_with("defer.x", "payload", &[("k", "a"), ("after-ms", "150")]),
            d.publish_with("defer.x", "payload", &[("k", "b"), ("after-ms", "150")]),
            d.publish_with("defer.x", "payload", &[("k", "b"), ("after-ms", "150")]),
            d.publish_with("defer.x", "payload", &[("after-ms", "150")]),
        )
    });
    // Seven settles: a1 twice.
    wait_until("7 settles", &d, || {
        timeline(&report_path)
            .iter()
            .filter(|x| x.2 == "settle")
            .count()
            == 7
    });
    let t = timeline(&report_path);
    let at = |id: u64, attempt: u32, op: &str| {
        t.iter()
            .position(|x| x.0 == id && x.1 == attempt && x.2 == op)
            .unwrap_or_else(|| panic!("no {op} of {id}/{attempt} in {t:?}"))
    };
    // Key a, strictly one after another, the retry first.
    let a = [
        at(a1, 1, "handle"),
        at(a1, 1, "settling"),
        at(a1, 2, "handle"),
        at(a1, 2, "settling"),
        at(a2, 1, "handle"),
        at(a2, 1, "settling"),
        at(a3, 1, "handle"),
    ];
    assert!(
        a.windows(2).all(|w| w[0] < w[1]),
        "key a out of order: {t:?}"
    );
    assert!(at(b1, 1, "settling") < at(b2, 1, "handle"), "key b: {t:?}");
    // Other keys, and messages without one, do not wait for key a.
    assert!(at(b1, 1, "handle") < at(a1, 1, "settling"), "{t:?}");
    assert!(at(free, 1, "handle") < at(a1, 1, "settling"), "{t:?}");
    d.stop();
}

#[test]
fn rate_limit_paces_hand_outs() {
    let (s, config, report_path, _) =
        setup_reporting("defer-rate", "fsync", "rate_limit = 20", true);
    let d = Daemon::start(s, &config);
    for _ in 0..12 {
        d.publish_with("defer.x", "payload", &[]);
    }
    wait_until("12 settles", &d, || {
        timeline(&report_path)
            .iter()
            .filter(|x| x.2 == "settle")
            .count()
            == 12
    });
    let calls: Vec<u64> = timeline(&report_path)
        .into_iter()
        .filter(|x| x.2 == "handle")
        .map(|x| x.3)
        .collect();
    assert_eq!(calls.len(), 12);
    // 20 a second with a burst of 2: the last call comes at least 500 ms after the first
    // (a lower bound: a slow machine only makes it longer).
    let span = calls.last().unwrap() - calls.first().unwrap();
    assert!(span >= 450, "12 calls within {span} ms at 20 a second");
    d.stop();
}

#[test]
fn a_config_the_plugin_refuses_is_reported_at_its_place_in_plugins_toml() {
    let (s, config, _, _) = setup("defer-config", "fsync", "");
    // A misspelled key in the plugin's own table: the plugin names it, before `new`.
    let config = config.replace("report_calls = false", "report_cals = false");
    let line = config
        .lines()
        .position(|l| l.starts_with("report_cals"))
        .unwrap()
        + 1;
    let d = Daemon::start(s, &config);
    let p = d.instance("d");
    let error = p["last_error"].as_str().unwrap_or_default();
    let expected = format!(
        "plugins.toml:{line}:1: plugins.d.config.report_cals: the plugin refuses it: unknown \
         field `report_cals`"
    );
    assert!(error.contains(&expected), "{error}\n{p}");
    assert!(
        !error.contains("line 1 column"),
        "no position in generated JSON: {error}"
    );
    d.stop();
}
