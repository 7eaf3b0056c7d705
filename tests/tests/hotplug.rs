//! Hot plug, end to end: the real daemon with real plugins over the real API, while files in
//! `plugin_dir` and `plugins.toml` change under it — a plugin replaced many times while
//! messages flow (by rename and by copying over it in place), an attempt that spans a swap,
//! one whose lease expires while the old generation drains, add, remove, disable/enable, a
//! config change, a topics change, a bad new version, a `new` that fails, a newcomer
//! claiming a taken name, a bad config, autoload, the quarantine of a library that crashes
//! the daemon in `new`, the thread-local fixture, an abandoned generation, and 200 swaps
//! without growth.

use std::{
    fs,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use plugind_tests::{
    daemon::Daemon,
    fixtures::{self, Profile, SwapBuild, swap_build},
    ledger_support::{publish_all, wait_until},
    record::{SwapLine, read_swaps},
    sandbox::Sandbox,
};

/// The library file name the tests replace.
const LIBRARY: &str = "plugins.d/fx-swap.so";

/// A sandbox with build A of `fx-swap` in `plugins.d`.
fn sandbox(label: &str) -> Sandbox {
    let sandbox = Sandbox::new(label);
    sandbox.dir("plugins.d");
    sandbox.copy(LIBRARY, &swap_build(SwapBuild::A));
    sandbox
}

/// A `plugins.toml` with one `fx-swap` instance `swap` on `t.>` recording to `rec.txt`;
/// `extra` goes into its table, `more` into its config table.
fn config(sandbox: &Sandbox, extra: &str, more: &str) -> String {
    format!(
        "[host]\nautoload = false\ngrace_period = \"3s\"\n\n[defaults]\nmax_attempts = 5\n\
         backoff = {{ initial = \"20ms\", max = \"20ms\", jitter = 0.0 }}\n\n\
         [plugins.swap]\nplugin = \"fx-swap\"\ntopics = [\"t.>\"]\n{extra}\n\
         [plugins.swap.config]\npath = \"{}\"\n{more}\n",
        record(sandbox).display()
    )
}

fn record(sandbox: &Sandbox) -> PathBuf {
    sandbox.path().join("rec.txt")
}

/// How a new build gets into `plugin_dir`.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Written under a temporary name, then renamed over the library (what deployment
    /// tools do).
    Rename,
    /// Copied over the library in place (what `cp` does).
    InPlace,
}

fn place(sandbox: &Sandbox, build: SwapBuild, how: Placement) {
    let target = sandbox.path().join(LIBRARY);
    match how {
        Placement::Rename => {
            let temp = sandbox.path().join("plugins.d/.fx-swap.so.tmp");
            fs::copy(swap_build(build), &temp).unwrap();
            fs::rename(&temp, &target).unwrap();
        }
        Placement::InPlace => {
            fs::copy(swap_build(build), &target).unwrap();
        }
    }
}

/// Publishes `t.x` messages one after the other on one connection until stopped; the ids
/// answered OK, and every refusal.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<u64>, Vec<String>)>,
}

impl Publisher {
    fn start(d: &Daemon, pause: Duration) -> Self {
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
                        topic: "t.x".into(),
                        payload: format!("n{n}").into_bytes().into(),
                        headers: vec![],
                        key: String::new(),
                    });
                    match c.publisher.publish(request).await {
                        Ok(reply) => ids.push(reply.into_inner().id),
                        Err(status) => refused.push(format!("{status:?}")),
                    }
                    tokio::time::sleep(pause).await;
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

/// Waits (20 s at most) until the record holds a line satisfying `found`.
fn wait_for_line(d: &Daemon, what: &str, found: impl Fn(&SwapLine) -> bool) -> SwapLine {
    let path = record(d.sandbox());
    let mut line = None;
    wait_until(what, d, || {
        line = read_swaps(&path).into_iter().find(|l| found(l));
        line.is_some()
    });
    line.unwrap()
}

/// How often the build changes from one recorded line to the next.
fn alternations(lines: &[SwapLine]) -> usize {
    lines
        .windows(2)
        .filter(|w| w[0].build != w[1].build)
        .count()
}

fn replace_while_publishing(label: &str, how: Placement) {
    const SWAPS: usize = 50;
    let sandbox = sandbox(label);
    let config = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &config);
    let publisher = Publisher::start(&d, Duration::from_millis(1));
    wait_for_line(&d, "build A handles a message", |l| l.build == 'A');
    for swap in 0..SWAPS {
        let build = SwapBuild::nth_swap(swap);
        let letter = build.letter();
        let before = read_swaps(&record(d.sandbox()))
            .iter()
            .map(|l| l.id)
            .max()
            .unwrap_or(0);
        place(d.sandbox(), build, how);
        // The new build handles a message published after the swap began: it took effect
        // while traffic flowed.
        wait_for_line(
            &d,
            &format!("swap {swap} to build {letter} takes effect"),
            |l| l.build == letter && l.id > before,
        );
    }
    let (ids, refused) = publisher.finish();
    assert!(refused.is_empty(), "publishes refused: {refused:?}");
    let path = record(d.sandbox());
    wait_until("every accepted message is handled", &d, || {
        let seen: std::collections::BTreeSet<u64> =
            read_swaps(&path).iter().map(|l| l.id).collect();
        ids.iter().all(|id| seen.contains(id))
    });
    let lines = read_swaps(&path);
    assert!(
        alternations(&lines) >= SWAPS,
        "the output alternated {} times",
        alternations(&lines)
    );
    let log = d.log();
    assert_eq!(
        log.matches("instance swapped to a new generation").count(),
        SWAPS,
        "{log}"
    );
    let (status, log) = d.stop();
    assert!(
        status.success(),
        "the daemon never crashes: {status}\n{log}"
    );
    assert!(
        !log.contains("library retained"),
        "fx-swap unloads cleanly:\n{log}"
    );
}

#[test]
fn a_plugin_renamed_over_50_times_while_messages_flow_loses_nothing() {
    replace_while_publishing("hotplug-rename", Placement::Rename);
}

#[test]
fn a_plugin_copied_over_in_place_50_times_while_messages_flow_loses_nothing() {
    replace_while_publishing("hotplug-inplace", Placement::InPlace);
}

#[test]
fn an_attempt_that_spans_a_swap_is_settled_once_by_the_old_generation() {
    let sandbox = sandbox("hotplug-span");
    let gate = sandbox.path().join("gate");
    let config = config(
        &sandbox,
        "",
        &format!("hold_on = \"hold\"\ngate = \"{}\"", gate.display()),
    );
    let d = Daemon::start(sandbox, &config);
    let held = publish_all(&d, &["hold".into()], None)[0];
    // Let it reach plugin code, then queue one behind it.
    d.wait_in_flight("swap");
    let behind = publish_all(&d, &["behind".into()], None)[0];
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    // The one not yet handed to plugin code goes to the new generation at once, while the
    // old one still holds its call.
    let line = wait_for_line(&d, "build B handles the queued message", |l| l.id == behind);
    assert_eq!(line.build, 'B');
    fs::write(&gate, "").unwrap();
    let line = wait_for_line(&d, "the held message is settled", |l| l.id == held);
    assert_eq!((line.build, line.attempt), ('A', 1), "{line:?}");
    d.wait_for_log("generation retired", 1);
    std::thread::sleep(Duration::from_millis(300));
    let lines: Vec<SwapLine> = read_swaps(&record(d.sandbox()))
        .into_iter()
        .filter(|l| l.id == held)
        .collect();
    assert_eq!(lines.len(), 1, "settled once: {lines:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("stale settlement"), "{log}");
}

#[test]
fn an_attempt_whose_lease_expires_while_draining_goes_to_the_new_generation_as_a_timeout() {
    let sandbox = sandbox("hotplug-lease");
    let gate = sandbox.path().join("gate");
    let config = config(
        &sandbox,
        "ack_timeout = \"1s\"\nhang_grace = \"10s\"",
        &format!("hold_on = \"hold\"\ngate = \"{}\"", gate.display()),
    );
    let d = Daemon::start(sandbox, &config);
    let held = publish_all(&d, &["hold".into()], None)[0];
    d.wait_in_flight("swap");
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    d.wait_for_log("instance swapped to a new generation", 1);
    // The old generation holds attempt 1 past its 1 s lease: a `timeout` failure, and
    // attempt 2 goes to the new generation (which holds it too, until the gate opens).
    std::thread::sleep(Duration::from_millis(1500));
    fs::write(&gate, "").unwrap();
    let new = wait_for_line(&d, "build B handles attempt 2", |l| {
        l.id == held && l.build == 'B'
    });
    assert_eq!(new.attempt, 2, "{new:?}");
    let old = wait_for_line(&d, "build A finishes attempt 1", |l| {
        l.id == held && l.build == 'A'
    });
    assert_eq!(old.attempt, 1, "{old:?}");
    // The old generation's late answer is refused as stale: the attempt is settled once.
    d.wait_for_log("stale settlement refused", 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_library_added_later_starts_and_a_removed_one_stops_with_its_deliveries_waiting() {
    let sandbox = Sandbox::new("hotplug-add");
    sandbox.dir("plugins.d");
    let config = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &config);
    assert!(
        d.log()
            .contains("no library in plugin_dir provides plugin `fx-swap`"),
        "{}",
        d.log()
    );
    // Accepted while the instance cannot run: they wait in the ledger.
    let early = publish_all(&d, &["e1".into(), "e2".into()], None);
    fs::copy(swap_build(SwapBuild::A), d.sandbox().path().join(LIBRARY)).unwrap();
    d.wait_for_log("instance loaded", 1);
    for id in &early {
        wait_for_line(&d, "a waiting delivery is handled", |l| l.id == *id);
    }
    fs::remove_file(d.sandbox().path().join(LIBRARY)).unwrap();
    d.wait_for_log("instance stopped; its deliveries wait", 1);
    assert!(d.log().contains("library_gone"), "{}", d.log());
    let late = publish_all(&d, &["l1".into()], None)[0];
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !read_swaps(&record(d.sandbox()))
            .iter()
            .any(|l| l.id == late)
    );
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    let line = wait_for_line(&d, "the waiting delivery resumes", |l| l.id == late);
    assert_eq!(line.build, 'B');
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn autoload_starts_a_library_no_entry_names() {
    let sandbox = Sandbox::new("hotplug-autoload");
    sandbox.dir("plugins.d");
    let d = Daemon::start(sandbox, "[host]\nautoload = true\n");
    fs::copy(
        fixtures::library("fx-echo", Profile::Dev),
        d.sandbox().path().join("plugins.d/fx-echo.so"),
    )
    .unwrap();
    d.wait_for_log("instance loaded", 1);
    assert!(d.log().contains("\"instance\":\"fx-echo\""), "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Rewrites `plugins.toml` the way editors do (a new file renamed over it).
fn edit_config(d: &Daemon, text: &str) {
    let temp = d.sandbox().path().join(".plugins.toml.new");
    fs::write(&temp, text).unwrap();
    fs::rename(&temp, d.sandbox().path().join("plugins.toml")).unwrap();
}

#[test]
fn disable_stops_after_the_call_in_hand_and_enable_resumes_what_waited() {
    let sandbox = sandbox("hotplug-toggle");
    let gate = sandbox.path().join("gate");
    let hold = format!("hold_on = \"hold\"\ngate = \"{}\"", gate.display());
    let on = config(&sandbox, "", &hold);
    let off = config(&sandbox, "enabled = false", &hold);
    let d = Daemon::start(sandbox, &on);
    let held = publish_all(&d, &["hold".into()], None)[0];
    d.wait_in_flight("swap");
    let queued = publish_all(&d, &["q1".into(), "q2".into()], None);
    edit_config(&d, &off);
    d.wait_for_log("configuration applied", 1);
    // The call in hand finishes; the queued ones are not started.
    fs::write(&gate, "").unwrap();
    let line = wait_for_line(&d, "the call in hand finishes", |l| l.id == held);
    assert_eq!(line.attempt, 1);
    d.wait_for_log("instance stopped; its deliveries wait", 1);
    assert!(d.log().contains("\"reason\":\"disabled\""), "{}", d.log());
    std::thread::sleep(Duration::from_millis(300));
    let seen = read_swaps(&record(d.sandbox()));
    assert!(
        queued.iter().all(|id| !seen.iter().any(|l| l.id == *id)),
        "nothing is handed to a disabled instance: {seen:?}"
    );
    edit_config(&d, &on);
    d.wait_for_log("configuration applied", 2);
    for id in &queued {
        wait_for_line(&d, "a waiting delivery resumes", |l| l.id == *id);
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_config_change_reinstantiates_and_a_topics_change_reroutes() {
    let sandbox = sandbox("hotplug-config");
    let first = config(&sandbox, "", "label = \"one\"");
    let d = Daemon::start(sandbox, &first);
    let id = publish_all(&d, &["a".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "one");
    edit_config(&d, &config(d.sandbox(), "", "label = \"two\""));
    d.wait_for_log("instance swapped to a new generation", 1);
    let id = publish_all(&d, &["b".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "two");
    // Topics: `u.>` only from now on.
    let rerouted = config(d.sandbox(), "", "label = \"two\"").replace("[\"t.>\"]", "[\"u.>\"]");
    edit_config(&d, &rerouted);
    d.wait_for_log("configuration applied", 2);
    assert_eq!(
        d.log()
            .matches("instance swapped to a new generation")
            .count(),
        1,
        "a topics change does not re-instantiate:\n{}",
        d.log()
    );
    let t = publish_all(&d, &["c".into()], None)[0];
    let u = d.publish("u.x", "d", &[]).unwrap();
    let line = wait_for_line(&d, "u.x is handled", |l| l.id == u);
    assert_eq!(line.label, "two");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !read_swaps(&record(d.sandbox())).iter().any(|l| l.id == t),
        "t.x no longer goes to it"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_bad_new_version_leaves_the_old_one_serving() {
    let sandbox = sandbox("hotplug-bad-library");
    let config = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &config);
    let id = publish_all(&d, &["a".into()], None)[0];
    wait_for_line(&d, "handled", |l| l.id == id);
    // A truncated copy of build B, renamed into place.
    let bytes = fs::read(swap_build(SwapBuild::B)).unwrap();
    let temp = d.sandbox().path().join("plugins.d/.bad.tmp");
    fs::write(&temp, &bytes[..bytes.len() / 2]).unwrap();
    fs::rename(&temp, d.sandbox().path().join(LIBRARY)).unwrap();
    d.wait_for_log("load failed; what ran before keeps running", 1);
    assert!(d.log().contains("incomplete file"), "{}", d.log());
    let id = publish_all(&d, &["b".into()], None)[0];
    assert_eq!(
        wait_for_line(&d, "still handled", |l| l.id == id).build,
        'A'
    );
    // A second library claiming the same plugin name: the newcomer is refused, naming both.
    let newcomer = d.sandbox().path().join("plugins.d/other.so");
    fs::copy(swap_build(SwapBuild::B), &newcomer).unwrap();
    d.wait_for_log("already provides; refused", 1);
    assert!(
        d.log().contains(&newcomer.display().to_string()),
        "{}",
        d.log()
    );
    fs::remove_file(&newcomer).unwrap();
    // A good one then takes over.
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    d.wait_for_log("instance swapped to a new generation", 1);
    let id = publish_all(&d, &["c".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled by B", |l| l.id == id).build, 'B');
    // The same bytes again: nothing happens.
    place(d.sandbox(), SwapBuild::B, Placement::InPlace);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.log().matches("instance swapped").count(),
        1,
        "unchanged bytes are ignored:\n{}",
        d.log()
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_new_generation_whose_new_fails_leaves_the_old_one_serving() {
    let sandbox = sandbox("hotplug-bad-new");
    let good = config(&sandbox, "", "label = \"old\"");
    let d = Daemon::start(sandbox, &good);
    // Its `new` cannot open the record file: the new generation never starts.
    let broken = good
        .replace("label = \"old\"", "label = \"new\"")
        .replace("rec.txt", "missing/rec.txt");
    edit_config(&d, &broken);
    d.wait_for_log("load failed; what ran before keeps running", 1);
    assert!(d.log().contains("`new` failed"), "{}", d.log());
    let id = publish_all(&d, &["a".into()], None)[0];
    assert_eq!(
        wait_for_line(&d, "still handled", |l| l.id == id).label,
        "old"
    );
    // The same file saved again changes nothing (same bytes, nothing applied twice).
    edit_config(&d, &broken);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.log().matches("load failed").count(), 1, "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_bad_config_is_refused_whole_and_the_last_good_one_keeps_running() {
    let sandbox = sandbox("hotplug-bad-config");
    let good = config(&sandbox, "", "label = \"good\"");
    let d = Daemon::start(sandbox, &good);
    let broken = good.replace(
        "label = \"good\"",
        "label = \"bad\"\nmax_attempts = \"many\"",
    ) + "\n[plugins.other]\nplugin = 7\n";
    edit_config(&d, &broken);
    d.wait_for_log("configuration refused; the last good one keeps running", 1);
    let log = d.log();
    assert!(
        log.contains("plugins.toml:"),
        "file:line:column in the event: {log}"
    );
    let id = publish_all(&d, &["a".into()], None)[0];
    assert_eq!(
        wait_for_line(&d, "still handled", |l| l.id == id).label,
        "good"
    );
    assert!(!d.log().contains("instance swapped"), "{}", d.log());
    // SIGHUP reloads too; fixed, the new config applies.
    fs::write(
        d.sandbox().path().join("plugins.toml"),
        good.replace("\"good\"", "\"fixed\""),
    )
    .unwrap();
    d.hangup();
    d.wait_for_log("instance swapped to a new generation", 1);
    let id = publish_all(&d, &["b".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "fixed");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_library_that_aborts_in_new_is_quarantined_after_two_crashes() {
    let sandbox = sandbox("hotplug-quarantine");
    let crashing = config(&sandbox, "", "abort_in_new = true");
    // Two starts die in `new` (as a service manager would restart it).
    let (status, sandbox) =
        Daemon::start_expecting_exit(sandbox, &crashing, Duration::from_secs(10));
    assert!(!status.success());
    let (status, sandbox) =
        Daemon::start_expecting_exit(sandbox, &crashing, Duration::from_secs(10));
    assert!(!status.success());
    // The third does not load it: quarantined, reported, and the daemon runs.
    let d = Daemon::start(sandbox, &crashing);
    let log = d.log();
    assert!(log.contains("library quarantined"), "{log}");
    assert!(log.contains("\"unclean_exits\":2"), "{log}");
    // Publishes are accepted; they wait for the instance.
    let waiting = publish_all(&d, &["w".into()], None)[0];
    // New bytes are not quarantined: build B (still aborting in `new` with this config)
    // would crash again, so the config is fixed and B dropped in together.
    let fixed = config(d.sandbox(), "", "");
    edit_config(&d, &fixed);
    d.wait_for_log("configuration applied", 1);
    assert!(
        d.log().matches("library quarantined").count() == 1,
        "reported once:\n{}",
        d.log()
    );
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    let line = wait_for_line(&d, "new bytes load and deliver", |l| l.id == waiting);
    assert_eq!(line.build, 'B');
    let (status, sandbox) = d.stop_keeping_state();
    assert!(status.success());
    // The marker of the bytes that loaded went with their first delivery; the quarantine
    // record of build A went when its bytes left plugin_dir.
    let markers: Vec<_> = fs::read_dir(sandbox.path().join("state/loading"))
        .unwrap()
        .collect();
    assert!(markers.is_empty(), "{markers:?}");
}

/// The distinct memfd libraries of plugin `plugin` mapped in the daemon now.
fn mapped_generations(d: &Daemon, plugin: &str) -> usize {
    let maps = fs::read_to_string(format!("/proc/{}/maps", d.pid())).unwrap();
    let prefix = format!("/memfd:plugind-{plugin}-");
    let mut names: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|name| name.starts_with(&prefix))
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

#[test]
fn the_thread_local_fixture_leaves_with_its_generations_thread() {
    // fx-tls leaves a thread-local destructor on the thread that calls `handle`, which pins
    // a library for as long as that thread lives. Each generation runs on an actor thread of
    // its own, joined when it retires, so the library really goes: the event says
    // `unloaded` only because glibc's link map no longer has it, and the process maps show
    // one generation of it, the running one.
    let sandbox = Sandbox::new("hotplug-tls");
    sandbox.dir("plugins.d");
    let tls = fixtures::library("fx-tls", Profile::Dev);
    sandbox.copy("plugins.d/fx-tls.so", &tls);
    let config = "[host]\nautoload = false\n\n[plugins.tls]\nplugin = \"fx-tls\"\ntopics = [\"t.>\"]\n\
                  [plugins.tls.config]\nround = 0\n";
    let d = Daemon::start(sandbox, config);
    for round in 1..=3 {
        publish_all(&d, &["x".into()], None);
        // Handled (the thread-local is set) before the generation retires.
        d.wait_idle("tls");
        edit_config(
            &d,
            &config.replace("round = 0", &format!("round = {round}")),
        );
        d.wait_for_log("generation retired", round);
    }
    let log = d.log();
    assert_eq!(log.matches("\"how\":\"unloaded\"").count(), 3, "{log}");
    assert_eq!(mapped_generations(&d, "fx-tls"), 1, "{log}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn an_old_generation_hung_past_its_deadlines_is_abandoned_and_counted_retained() {
    let sandbox = sandbox("hotplug-abandon");
    let gate = sandbox.path().join("gate");
    let config = config(
        &sandbox,
        "ack_timeout = \"300ms\"\nhang_grace = \"200ms\"\nshutdown_timeout = \"200ms\"",
        &format!("hold_on = \"hold\"\ngate = \"{}\"", gate.display()),
    );
    let d = Daemon::start(sandbox, &config);
    let held = publish_all(&d, &["hold".into()], None)[0];
    d.wait_in_flight("swap");
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    d.wait_for_log("\"how\":\"abandoned\"", 1);
    // The next generation serves meanwhile (the held message too, once its lease expired:
    // it holds there as well until the gate opens).
    let id = publish_all(&d, &["after".into()], None)[0];
    assert_eq!(
        mapped_generations(&d, "fx-swap"),
        2,
        "the abandoned generation stays mapped while its thread is stuck in it"
    );
    fs::write(&gate, "").unwrap();
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).build, 'B');
    wait_for_line(&d, "the held one is handled by B", |l| {
        l.id == held && l.build == 'B'
    });
    // Once the stuck call returns, its thread ends and drops the last reference: the
    // library leaves then (its late answer is refused as stale).
    d.wait_for_log("stale settlement refused", 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// The daemon's resident set size in KiB.
fn rss_kib(d: &Daemon) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn two_hundred_swaps_of_a_clean_plugin_leave_nothing_behind() {
    let sandbox = sandbox("hotplug-rss");
    let base = config(&sandbox, "", "label = \"g0\"");
    let d = Daemon::start(sandbox, &base);
    let mut rss_at_10 = 0;
    let started = Instant::now();
    for swap in 1..=200 {
        edit_config(&d, &base.replace("\"g0\"", &format!("\"g{swap}\"")));
        d.wait_for_log("generation retired", swap);
        if swap == 10 {
            rss_at_10 = rss_kib(&d);
        }
    }
    let rss_at_200 = rss_kib(&d);
    eprintln!(
        "200 swaps in {:?}: RSS {rss_at_10} KiB after 10, {rss_at_200} KiB after 200",
        started.elapsed()
    );
    let id = publish_all(&d, &["x".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "g200");
    let log = d.log();
    assert_eq!(log.matches("\"how\":\"unloaded\"").count(), 200, "{log}");
    assert!(!log.contains("library retained"), "{log}");
    assert!(
        rss_at_200 <= rss_at_10 + 8 * 1024,
        "RSS grew from {rss_at_10} KiB to {rss_at_200} KiB"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn children_published_by_the_first_calls_after_a_start_reach_their_targets() {
    // Deliveries wait for a pipeline stage whose library is missing; at the next start they
    // are handed out at once, and the children of those first calls must find the routes.
    let s = plugind_tests::ledger_support::sandbox("hotplug-first-children");
    let sink = s.path().join("sink.txt");
    let config = format!(
        "[host]\nautoload = false\n\n[plugins.upper]\nplugin = \"fx-pipeline\"\n\
         topics = [\"p.>\"]\n[plugins.upper.config]\nto = \"c.upper\"\n\n[plugins.sink]\n\
         plugin = \"fx-record\"\ntopics = [\"c.>\"]\n[plugins.sink.config]\npath = \"{}\"\n",
        sink.display()
    );
    let d = Daemon::start(s, &config);
    let payloads: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    publish_all_to(&d, "p.x", &payloads);
    let (status, s) = d.stop_keeping_state();
    assert!(status.success());
    s.copy(
        "plugins.d/fx-pipeline.so",
        &fixtures::library("fx-pipeline", Profile::Dev),
    );
    let d = Daemon::restart(s);
    wait_until("every child reached the sink", &d, || {
        plugind_tests::ledger_support::recorded_ids(&sink).len() == payloads.len()
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

fn publish_all_to(d: &Daemon, topic: &str, payloads: &[String]) {
    for payload in payloads {
        d.publish(topic, payload, &[])
            .unwrap_or_else(|e| panic!("publish refused: {e}\n{}", d.log()));
    }
}

/// Creates a FIFO at `path`.
fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Whether `event` is a refusal of the file at `path`.
fn refusal_of(event: &serde_json::Value, path: &std::path::Path) -> bool {
    event["event"] == "failed" && event["path"].as_str() == Some(&*path.to_string_lossy())
}

/// Found by the hostile-input campaign: a FIFO named `x.so` in plugin_dir wedged the
/// watcher for ever (even after it was removed) and a symlink to /dev/zero spun it at 100%
/// CPU; library and config changes then went unnoticed with nothing logged, and SIGTERM
/// never completed (a publish was still answered OK 60 s after it). Each is now refused
/// once, named, however often it is touched, while the rest runs and the stop completes.
#[test]
fn a_fifo_and_a_symlink_to_a_device_in_plugin_dir_are_refused_once_and_hot_plug_goes_on() {
    let sandbox = Sandbox::new("hotplug-fifo");
    sandbox.dir("plugins.d");
    let config = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &config);
    let events = d.events();
    let dir = d.sandbox().path().join("plugins.d");
    let (fifo, zero) = (dir.join("fifo.so"), dir.join("zero.so"));
    mkfifo(&fifo);
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    // Touched again and again: the same files, refused for the same reasons.
    for round in 0..10u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(
            &fifo,
            fs::Permissions::from_mode(0o600 + (round % 2) * 0o44),
        )
        .unwrap();
        let touched = std::process::Command::new("touch")
            .arg("-h")
            .arg(&zero)
            .status()
            .unwrap();
        assert!(touched.success());
        std::thread::sleep(Duration::from_millis(50));
    }
    // A library added afterwards is loaded and serves.
    fs::copy(swap_build(SwapBuild::A), d.sandbox().path().join(LIBRARY)).unwrap();
    let (_, mut seen) = events.wait_for("the library added after the junk is loaded", |e| {
        e["event"] == "loaded" && e["instance"] == "swap"
    });
    let id = publish_all(&d, &["after the junk".into()], None)[0];
    wait_for_line(&d, "handled", |l| l.id == id);
    // Gone, the FIFO leaves nothing behind; a last piece of junk closes the account.
    fs::remove_file(&fifo).unwrap();
    let sentinel = dir.join("sentinel.so");
    mkfifo(&sentinel);
    let (last, more) = events.wait_for("the sentinel is refused", |e| refusal_of(e, &sentinel));
    seen.extend(more);
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("a FIFO, not a regular file"),
        "{last}"
    );
    let refusals = |path: &std::path::Path| -> Vec<String> {
        seen.iter()
            .filter(|e| refusal_of(e, path))
            .map(|e| e["error"].as_str().unwrap().to_owned())
            .collect()
    };
    let fifo_refusals = refusals(&fifo);
    assert_eq!(fifo_refusals.len(), 1, "refused once: {seen:#?}");
    assert!(fifo_refusals[0].contains("a FIFO"), "{fifo_refusals:?}");
    let zero_refusals = refusals(&zero);
    assert_eq!(zero_refusals.len(), 1, "refused once: {seen:#?}");
    assert!(
        zero_refusals[0].contains("symlinks are refused"),
        "{zero_refusals:?}"
    );
    // The one refusal is its one log line (no event says what the watcher logged).
    let log = d.log();
    assert_eq!(
        log.lines().filter(|l| l.contains("fifo.so")).count(),
        1,
        "{log}"
    );
    // SIGTERM completes (the test daemon waits 15 s at most; grace_period is 3 s).
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Found by the hostile-input campaign: a plugin_dir deleted and made anew was never
/// watched again, not even after SIGHUP.
#[test]
fn a_plugin_dir_deleted_and_made_anew_is_watched_again() {
    let sandbox = sandbox("hotplug-new-dir");
    let config = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &config);
    let id = publish_all(&d, &["before".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).build, 'A');
    let events = d.events();
    fs::remove_dir_all(d.sandbox().path().join("plugins.d")).unwrap();
    events.wait_for("the instance stops with its library gone", |e| {
        e["event"] == "stopped" && e["instance"] == "swap"
    });
    let waiting = publish_all(&d, &["while the directory is gone".into()], None)[0];
    d.sandbox().dir("plugins.d");
    place(d.sandbox(), SwapBuild::B, Placement::Rename);
    let line = wait_for_line(&d, "the library in the new directory is loaded", |l| {
        l.id == waiting
    });
    assert_eq!(line.build, 'B');
    // Again, with an operator's reload between the directory's return and the library's.
    fs::remove_dir_all(d.sandbox().path().join("plugins.d")).unwrap();
    events.wait_for("the instance stops again", |e| {
        e["event"] == "stopped" && e["instance"] == "swap"
    });
    d.sandbox().dir("plugins.d");
    d.hangup();
    place(d.sandbox(), SwapBuild::A, Placement::InPlace);
    let waiting = publish_all(&d, &["after the reload".into()], None)[0];
    let line = wait_for_line(
        &d,
        "the library copied in after the reload is loaded",
        |l| l.id == waiting,
    );
    assert_eq!(line.build, 'A');
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Found by the hostile-input campaign: a `plugins.toml` in the Kubernetes ConfigMap layout
/// (`plugins.toml -> ..data/plugins.toml`, `..data -> ..2026_12_06_…/`, updated by an atomic
/// swap of the `..data` link) was not watched: updates were never applied.
#[test]
fn a_config_map_swap_of_plugins_toml_is_applied() {
    let sandbox = sandbox("hotplug-config-map");
    let root = sandbox.path().to_owned();
    sandbox.dir("..2026_12_06_01");
    std::os::unix::fs::symlink("..2026_12_06_01", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/plugins.toml", root.join("plugins.toml")).unwrap();
    let one = config(&sandbox, "", "label = \"one\"");
    // Written through the links, into ..2026_12_06_01.
    let d = Daemon::start(sandbox, &one);
    let id = publish_all(&d, &["a".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "one");
    let events = d.events();
    // The kubelet's update: a new directory, a new link renamed over `..data`, the old
    // directory removed.
    d.sandbox().dir("..2026_12_06_02");
    d.sandbox().put(
        "..2026_12_06_02/plugins.toml",
        one.replace("\"one\"", "\"two\""),
    );
    std::os::unix::fs::symlink("..2026_12_06_02", root.join("..data_tmp")).unwrap();
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_dir_all(root.join("..2026_12_06_01")).unwrap();
    events.wait_for("the new configuration is applied", |e| {
        e["event"] == "config_applied"
    });
    let id = publish_all(&d, &["b".into()], None)[0];
    assert_eq!(wait_for_line(&d, "handled", |l| l.id == id).label, "two");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Found by the hostile-input campaign: an empty (0-byte) `plugins.toml` written over a
/// running configuration was applied, and stopped every instance. It is refused (the event
/// says why) and the last good configuration keeps running; a configuration with no
/// instances that says so is applied.
#[test]
fn an_empty_plugins_toml_is_refused_and_the_instances_keep_running() {
    let sandbox = sandbox("hotplug-empty-config");
    let good = config(&sandbox, "", "");
    let d = Daemon::start(sandbox, &good);
    let events = d.events();
    let path = d.sandbox().path().join("plugins.toml");
    // Truncated in place, as `> plugins.toml` does.
    fs::write(&path, "").unwrap();
    let (refused, _) = events.wait_for("the empty file is refused", |e| {
        e["event"] == "config_refused"
    });
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("empty (0 bytes)"),
        "{refused}"
    );
    let id = publish_all(&d, &["still running".into()], None)[0];
    wait_for_line(&d, "handled", |l| l.id == id);
    // An operator's reload of it is refused too, saying why.
    let out = d.cli(&["ctl", "reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("empty (0 bytes)"),
        "{out:?}"
    );
    let id = publish_all(&d, &["after the reload".into()], None)[0];
    wait_for_line(&d, "handled", |l| l.id == id);
    // A configuration with no instances, explicitly: applied.
    edit_config(&d, "[host]\nautoload = false\n");
    events.wait_for(
        "the explicit configuration with no instances is applied",
        |e| e["event"] == "config_applied",
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Found by the hostile-input campaign: a plugin_dir made unsafe (writable by others, or
/// owned by an untrusted user) was reported on reload as "no library in plugin_dir provides
/// …". The reload names the directory and its problem; what runs keeps running.
#[test]
fn an_unsafe_plugin_dir_on_reload_names_its_permission_problem() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let sandbox = sandbox("hotplug-unsafe-dir");
    let config = config(&sandbox, "", "")
        + "\n[plugins.late]\nplugin = \"fx-echo\"\ntopics = [\"late.>\"]\n";
    let d = Daemon::start(sandbox, &config);
    let dir = d.sandbox().path().join("plugins.d");
    let reload = || -> serde_json::Value {
        let out = d.cli(&["ctl", "reload", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let failure = |result: &serde_json::Value, instance: &str| -> Option<String> {
        result["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["instance"] == instance)
            .map(|f| f["error"].as_str().unwrap().to_owned())
    };
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let result = reload();
    let late = failure(&result, "late").expect("late cannot start");
    assert!(
        late.contains(&*dir.to_string_lossy()) && late.contains("writable by others"),
        "{late}"
    );
    assert!(!late.contains("provides"), "{late}");
    assert_eq!(
        failure(&result, "swap"),
        None,
        "what ran keeps running: {result}"
    );
    let id = publish_all(&d, &["a".into()], None)[0];
    wait_for_line(&d, "still handled", |l| l.id == id);
    if fs::metadata(d.sandbox().path()).unwrap().uid() == 0 {
        // Owned by someone not trusted.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let late = failure(&reload(), "late").expect("late cannot start");
        assert!(late.contains("who is not trusted"), "{late}");
        std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    }
    // Safe again: the ordinary answer.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let late = failure(&reload(), "late").expect("late cannot start");
    assert_eq!(late, "no library in plugin_dir provides plugin `fx-echo`");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
