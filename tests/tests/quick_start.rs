//! The README's quick start, followed literally in a fresh clone: command 1 (build, install
//! the example plugins, run the daemon) in the background, then the publish line, then the
//! message must be in file-sink's output and its upper-cased copy from the pipeline too.
//! The commands are read from README.md, so the quick start cannot rot unnoticed.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use plugind_tests::{fixtures::repo_root, sandbox::Sandbox};

/// The line of the README's first code block that starts with `prefix`.
fn readme_line(prefix: &str) -> String {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("README.md has no line starting with `{prefix}`"))
        .to_owned()
}

fn wait(what: &str, limit: Duration, log: &Path, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut told = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "{what} not within {limit:?}; daemon output:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        // A release build of the clone takes minutes where its cache is cold: say so, and
        // what cargo is at, rather than sit silent.
        if told.elapsed() >= Duration::from_secs(30) {
            told = Instant::now();
            let output = fs::read_to_string(log).unwrap_or_default();
            let last = output.lines().rev().find(|l| !l.trim().is_empty());
            say(&format!(
                "quick start: waiting for {what} ({} s so far); last output: {}",
                start.elapsed().as_secs(),
                last.unwrap_or("(none yet)")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A progress line on the terminal: written to stderr itself, which the test harness does not
/// capture (it captures only `print!` and `eprint!`).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Kills the process group on drop, so a failing test leaves no daemon behind.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_readme_quick_start_works_in_a_fresh_clone() {
    let run = readme_line("cargo build --release --workspace && install -d -m 0755 plugins.d");
    let publish = readme_line("./target/release/plugind publish demo.hello hi");
    assert_eq!(
        readme_line("cargo test --workspace"),
        "cargo test --workspace"
    );

    let sandbox = Sandbox::new("quick-start");
    let clone = sandbox.path().join("plugind");
    let cloned = Command::new("git")
        .args(["clone", "--quiet"])
        .arg(repo_root())
        .arg(&clone)
        .status()
        .unwrap();
    assert!(cloned.success());
    // A build cache of its own, kept between runs: the commands are followed literally, not
    // rebuilt from scratch each time, and the clone's binaries (of the last commit) never
    // replace the working tree's in `target/release`.
    let cache = repo_root().join("target/quick-start");
    fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&cache, clone.join("target")).unwrap();

    let log = sandbox.path().join("daemon.log");
    let log_file = fs::File::create(&log).unwrap();
    let mut daemon = Command::new("sh")
        .arg("-c")
        .arg(&run)
        .current_dir(&clone)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("PLUGIND_CONFIG")
        .env_remove("PLUGIND_CONNECT")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .process_group(0)
        .spawn()
        .unwrap();
    let group = daemon.id();
    let _reaper = Reaper(group);
    say(&format!(
        "quick start: running the README's command 1 in {} (a release build of the clone, \
         cached in {}: minutes when cold)",
        clone.display(),
        cache.display()
    ));
    let ready = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("plugind ready")
    };
    wait(
        "the daemon ready (release build included)",
        Duration::from_secs(1500),
        &log,
        ready,
    );

    let published = Command::new("sh")
        .arg("-c")
        .arg(&publish)
        .current_dir(&clone)
        .env_remove("PLUGIND_CONFIG")
        .env_remove("PLUGIND_CONNECT")
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let output = clone.join("out/demo.jsonl");
    wait(
        "both lines in out/demo.jsonl",
        Duration::from_secs(10),
        &log,
        || {
            let text = fs::read_to_string(&output).unwrap_or_default();
            text.contains("\"payload\":\"hi\"") && text.contains("\"payload\":\"HI\"")
        },
    );

    // SIGTERM to the daemon itself (the shell's child), as Ctrl-C in the README would reach
    // it; the shell then exits with the daemon's status. The whole group is the fallback.
    let signal_group = |name: &str| {
        let _ = Command::new("kill")
            .args(["-s", name, "--", &format!("-{group}")])
            .status();
    };
    let children = Command::new("pgrep")
        .args(["-P", &group.to_string(), "-x", "plugind"])
        .output()
        .unwrap();
    let daemon_pid = String::from_utf8_lossy(&children.stdout).trim().to_owned();
    assert!(!daemon_pid.is_empty(), "the daemon is the shell's child");
    let _ = Command::new("kill")
        .args(["-s", "TERM", &daemon_pid])
        .status();
    let signal = signal_group;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(15) {
            signal("KILL");
            panic!(
                "the daemon did not stop 15 s after SIGTERM:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "{status}:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}
