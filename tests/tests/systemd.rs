//! Running under systemd, without systemd as PID 1: the daemon is a child whose
//! `NOTIFY_SOCKET` is a datagram socket the test owns (readiness, reload, refused reload,
//! stop, watchdog), whose stderr is "the journal" (`JOURNAL_STREAM`), and the shipped unit is
//! checked by `systemd-analyze verify` and `systemd-analyze security`.

use std::{
    fs,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use plugind_tests::{binary, daemon::Daemon, fixtures::repo_root, sandbox::Sandbox};

/// The socket the "service manager" listens on, in the sandbox (short path: `sun_path`).
fn listen(sandbox: &Sandbox) -> (UnixDatagram, PathBuf) {
    let path = sandbox.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (socket, path)
}

/// The next datagram that is not only a `STATUS=` update.
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !text.lines().all(|l| l.starts_with("STATUS=")) {
            return text;
        }
    }
}

#[test]
fn ready_reloading_ready_after_a_refused_config_stopping_and_exit_zero_after_the_drain() {
    let (s, config, gate) = plugind_tests::ledger_support::block_sandbox("systemd-notify");
    let (socket, path) = listen(&s);
    let mut d = Daemon::start_with_env(s, &config, &[("NOTIFY_SOCKET", path.as_os_str())]);
    let ready = next(&socket);
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=1 instances up"), "{ready}");
    // SIGHUP: RELOADING with the monotonic clock in one datagram, then READY.
    d.hangup();
    let reloading = next(&socket);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in the same datagram: {reloading}"));
    assert!(usec > 0);
    assert!(next(&socket).starts_with("READY=1"));
    // A refused configuration: READY again all the same, saying so.
    fs::write(
        d.sandbox().path().join("plugins.toml"),
        format!("{config}\n[plugins.x]\nplugin = 7\n"),
    )
    .unwrap();
    d.hangup();
    assert!(next(&socket).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    let again = next(&socket);
    assert!(
        again.starts_with("READY=1") && again.contains("reload refused"),
        "{again}"
    );
    // The watcher saw the same bytes: not refused twice.
    std::thread::sleep(Duration::from_millis(500));
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(!text.contains("RELOADING"), "reloaded again: {text}");
    }
    socket.set_nonblocking(false).unwrap();
    // SIGTERM with a call in hand: STOPPING, the call finishes, exit 0.
    d.publish("t.x", "held", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.signal("TERM");
    assert!(next(&socket).starts_with("STOPPING=1"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.wait_exit(Duration::from_millis(10)).is_none(),
        "the drain waits for the call in hand"
    );
    fs::write(&gate, "").unwrap();
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the drain");
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(d.log().contains("released=0"), "{}", d.log());
}

#[test]
fn the_watchdog_is_pinged_at_half_its_interval() {
    let (s, config, _) = plugind_tests::ledger_support::block_sandbox("systemd-watchdog");
    let (socket, path) = listen(&s);
    let d = Daemon::start_with_env(
        s,
        &config,
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "400000".as_ref()),
        ],
    );
    let started = Instant::now();
    let mut pings = Vec::new();
    while started.elapsed() < Duration::from_millis(2000) {
        if next(&socket) == "WATCHDOG=1" {
            pings.push(Instant::now());
        }
    }
    assert!(pings.len() >= 5, "{} pings in 2 s", pings.len());
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(100),
            "a ping {gap:?} after the previous one: sooner than a quarter of the interval"
        );
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn under_journald_lines_carry_level_prefixes_instead_of_timestamps() {
    let s = Sandbox::new("systemd-journal");
    s.dir("plugins.d");
    s.put("plugins.toml", "[host]\nautoload = false\n");
    let log = s.path().join("journal.log");
    let run = |journal: bool| {
        let file = fs::File::create(&log).unwrap();
        let meta = file.metadata().unwrap();
        let mut command = Command::new(binary::plugind());
        command
            .args(["run", "-c", "plugins.toml"])
            .current_dir(s.path())
            .env_remove("PLUGIND_LOG")
            .stdout(Stdio::null())
            .stderr(file);
        if journal {
            command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            // Inherited by a child whose stderr is elsewhere: must not count.
            command.env("JOURNAL_STREAM", "1:2");
        }
        let mut child = command.spawn().unwrap();
        let started = Instant::now();
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("plugind ready")
        {
            assert!(started.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
        fs::read_to_string(&log).unwrap()
    };
    let journal = run(true);
    let ready = journal
        .lines()
        .find(|l| l.contains("plugind ready"))
        .unwrap();
    assert!(ready.starts_with("<6>"), "{journal}");
    assert!(!ready.contains("Z "), "no timestamp: {ready}");
    assert!(!journal.contains('\u{1b}'), "no colours: {journal}");
    let plain = run(false);
    let ready = plain.lines().find(|l| l.contains("plugind ready")).unwrap();
    assert!(
        !ready.starts_with('<') && ready.contains('Z'),
        "a timestamp again: {ready}"
    );
}

/// The shipped unit with every `/usr/bin/plugind` pointing at the built binary.
fn unit_copy(dir: &Path) -> PathBuf {
    let unit = fs::read_to_string(repo_root().join("deploy/plugind.service")).unwrap();
    let path = dir.join("plugind.service");
    fs::write(
        &path,
        unit.replace("/usr/bin/plugind", &binary::plugind().display().to_string()),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_its_exposure_is_at_most_2_5() {
    let s = Sandbox::new("systemd-unit");
    let unit = unit_copy(s.path());
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (.ci/run installs systemd)");
    assert!(verify.status.success(), "{verify:?}");
    assert!(
        verify.stderr.is_empty(),
        "systemd-analyze verify complained: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for plugind.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(exposure <= 2.5, "exposure {exposure}:\n{report}");
    // The /etc example is a valid configuration as shipped.
    let check = Command::new(binary::plugind())
        .args(["check", "--config-only", "-c"])
        .arg(repo_root().join("deploy/plugins.toml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
}

/// The example plugins, as `cargo test --workspace` builds them (their cdylib).
fn example_plugins() -> Vec<PathBuf> {
    ["file-sink", "transform", "bench"]
        .iter()
        .map(|name| binary::example_plugin(name))
        .collect()
}

#[test]
fn every_example_plugin_loads_under_memory_deny_write_execute() {
    let mdwe = plugind_tests::shim::build_program("mdwe", include_str!("../programs/mdwe.c"));
    // The restrictions bite: a library that wants an executable stack is refused.
    let execstack = plugind_tests::shim::build_with(
        "execstack",
        "int execstack_probe(void) { return 1; }\n",
        &["-Wl,-z,execstack"],
    );
    let refused = Command::new(&mdwe)
        .arg("--dlopen")
        .arg(&execstack)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("executable stack"),
        "{refused:?}"
    );
    for plugin in example_plugins() {
        // Mapped as glibc maps any library…
        let plain = Command::new(&mdwe)
            .arg("--dlopen")
            .arg(&plugin)
            .output()
            .unwrap();
        assert!(plain.status.success(), "{}: {plain:?}", plugin.display());
        // …and through plugind's own loader (sealed memfd, layout check, probe child).
        let loaded = Command::new(&mdwe)
            .arg(binary::plugind())
            .args(["inspect", "--probe"])
            .arg(&plugin)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&loaded.stdout);
        assert!(
            loaded.status.success() && stdout.contains("accepted"),
            "{}: {loaded:?}",
            plugin.display()
        );
    }
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_instance_fields() {
    let s = Sandbox::new("systemd-json-logs");
    s.dir("plugins.d");
    s.copy(
        "plugins.d/fx-echo.so",
        &plugind_tests::fixtures::library("fx-echo", plugind_tests::fixtures::Profile::Dev),
    );
    let config = "[host]\nautoload = false\nlog_format = \"json\"\n\n[plugins.a]\nplugin = \
                  \"fx-echo\"\ntopics = [\"echo.>\"]\n";
    let d = Daemon::start(s, config);
    d.publish("echo.x", "hello", &[]).unwrap();
    d.wait_for_log("\"instance\":\"a\"", 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["timestamp"].is_string(),
            "{line}"
        );
    }
}
