//! The real `plugind` daemon in a sandbox: start it with a configuration and plugins, wait
//! until it is ready, talk to it through the real CLI, stop it with a signal, read its log.
//!
//! # Restarts
//!
//! A daemon owns its sandbox; [`Daemon::kill9`] and [`Daemon::stop_keeping_state`] hand it
//! back (state dir, plugins, record files and logs intact) for [`Daemon::restart`] or another
//! [`Daemon::start`]. Starting never clears the sandbox: it only writes `plugins.toml` and
//! moves the previous run's `daemon.log` aside to `daemon.log.<run>` (`daemon.log.1` is the
//! first run), so [`Daemon::log`] is this run's log and [`Daemon::history`] every run's.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{binary, sandbox::Sandbox};

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// `Some` until [`Daemon::kill9`] or [`Daemon::stop_keeping_state`] hands it back.
    sandbox: Option<Sandbox>,
    log: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    /// Writes `config` as `plugins.toml` in `sandbox` and runs `plugind run` on it; waits
    /// until it logged readiness (10 s at most). The sandbox may hold a previous run's state:
    /// nothing in it is removed (see the module's doc on restarts).
    ///
    /// # Panics
    /// If it exits or does not become ready in time (with its log).
    pub fn start(sandbox: Sandbox, config: &str) -> Self {
        Self::start_with_env(sandbox, config, &[])
    }

    /// Starts it as [`Daemon::start`] does, with the variables `env` set in its environment
    /// besides the inherited ones (`LD_PRELOAD` for a fault-injection shim, say). They hold
    /// for this run only: [`Daemon::restart`] runs without them.
    ///
    /// # Panics
    /// As [`Daemon::start`].
    pub fn start_with_env(sandbox: Sandbox, config: &str, env: &[(&str, &OsStr)]) -> Self {
        sandbox.put("plugins.toml", config);
        Self::spawn(sandbox, env)
    }

    /// Runs `plugind run` again on the `plugins.toml` already in `sandbox` (one that a
    /// previous daemon ran on, handed back by [`Daemon::kill9`] or
    /// [`Daemon::stop_keeping_state`]); waits until it is ready, as [`Daemon::start`] does.
    ///
    /// # Panics
    /// If the sandbox has no `plugins.toml`, or as [`Daemon::start`].
    pub fn restart(sandbox: Sandbox) -> Self {
        Self::restart_unwatched(sandbox).wait_ready()
    }

    /// Runs `plugind run` again as [`Daemon::restart`] does, without waiting for it to be
    /// ready: as a service manager restarts a daemon that may die again before it is (a
    /// plugin that aborts the process on a message redelivered at start). Follow with
    /// [`Daemon::wait_exit`], then [`Daemon::wait_ready`].
    ///
    /// # Panics
    /// If the sandbox has no `plugins.toml`.
    pub fn restart_unwatched(sandbox: Sandbox) -> Self {
        assert!(
            sandbox.path().join("plugins.toml").exists(),
            "restart needs the plugins.toml of a previous start in {}",
            sandbox.path().display()
        );
        Self::launch(sandbox, &[])
    }

    /// Writes `config` and runs `plugind run` on it with the options `args` added
    /// (`--fresh-ledger`, say); waits until it is ready, as [`Daemon::start`] does.
    ///
    /// # Panics
    /// As [`Daemon::start`].
    pub fn start_with_args(sandbox: Sandbox, config: &str, args: &[&str]) -> Self {
        sandbox.put("plugins.toml", config);
        Self::launch_args(sandbox, &[], &binary::plugind(), true, args).wait_ready()
    }

    /// Starts it as [`Daemon::start`] does, running the release build (benchmarks).
    ///
    /// # Panics
    /// As [`Daemon::start`].
    pub fn start_release(sandbox: Sandbox, config: &str) -> Self {
        sandbox.put("plugins.toml", config);
        let daemon = Self::launch_binary(sandbox, &[], &binary::plugind_release());
        daemon.wait_ready()
    }

    /// Writes `config` and runs `plugind run` in the sandbox without `-c`, as an operator in
    /// that folder would: the daemon finds `./plugins.toml` itself. Waits until it is ready.
    ///
    /// # Panics
    /// As [`Daemon::start`].
    pub fn start_in_folder(sandbox: Sandbox, config: &str) -> Self {
        sandbox.put("plugins.toml", config);
        Self::launch_with(sandbox, &[], &binary::plugind(), false).wait_ready()
    }

    /// Starts `plugind run` without waiting for anything.
    fn launch(sandbox: Sandbox, env: &[(&str, &OsStr)]) -> Self {
        Self::launch_binary(sandbox, env, &binary::plugind())
    }

    fn launch_binary(sandbox: Sandbox, env: &[(&str, &OsStr)], binary: &Path) -> Self {
        Self::launch_with(sandbox, env, binary, true)
    }

    /// Starts `binary run` in the sandbox, given its `plugins.toml` with `-c` if `flag`.
    fn launch_with(sandbox: Sandbox, env: &[(&str, &OsStr)], binary: &Path, flag: bool) -> Self {
        Self::launch_args(sandbox, env, binary, flag, &[])
    }

    /// Starts `binary run [-c plugins.toml] ARGS` in the sandbox.
    fn launch_args(
        sandbox: Sandbox,
        env: &[(&str, &OsStr)],
        binary: &Path,
        flag: bool,
        args: &[&str],
    ) -> Self {
        let config_path = sandbox.path().join("plugins.toml");
        let log = sandbox.path().join("daemon.log");
        if log.exists() {
            let previous = previous_logs(&log).len() + 1;
            fs::rename(&log, log.with_extension(format!("log.{previous}")))
                .expect("the previous log can be moved aside");
        }
        let mut command = Command::new(binary);
        command.arg("run");
        if flag {
            command.arg("-c").arg(&config_path);
        }
        command.args(args);
        command
            .current_dir(sandbox.path())
            .env_remove("PLUGIND_CONFIG")
            .env(
                "PLUGIND_LOG",
                std::env::var("PLUGIND_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("the log file can be created"));
        // No core file: some tests crash the daemon on purpose (fx-record's `abort_on`).
        // Set on the test process, inherited by the daemon.
        rlimit::Resource::CORE
            .set(0, 0)
            .expect("the core-file limit can be lowered");
        let child = command.spawn().expect("plugind starts");
        let socket = sandbox.path().join("state/plugind.sock");
        Self {
            child: Some(child),
            sandbox: Some(sandbox),
            log,
            socket,
        }
    }

    fn spawn(sandbox: Sandbox, env: &[(&str, &OsStr)]) -> Self {
        Self::launch(sandbox, env).wait_ready()
    }

    /// Waits until it logged readiness (10 s at most).
    ///
    /// # Panics
    /// If it exits or does not become ready in time (with its log).
    pub fn wait_ready(mut self) -> Self {
        let started = Instant::now();
        loop {
            if self.log().contains("plugind ready") {
                return self;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "plugind exited with {status} before ready:\n{}",
                    self.history()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "plugind not ready after 10 s:\n{}",
                self.history()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes `config` and runs `plugind run` on it, expecting it to exit by itself before it
    /// is ready (a plugin crashes it while loading, say): its exit status and the sandbox.
    ///
    /// # Panics
    /// If it still runs after `timeout` (it is killed first), with its log.
    pub fn start_expecting_exit(
        sandbox: Sandbox,
        config: &str,
        timeout: Duration,
    ) -> (ExitStatus, Sandbox) {
        sandbox.put("plugins.toml", config);
        let mut daemon = Self::launch(sandbox, &[]);
        let status = daemon.wait_exit(timeout);
        let history = daemon.history();
        let sandbox = daemon.kill9();
        let status =
            status.unwrap_or_else(|| panic!("plugind did not exit within {timeout:?}:\n{history}"));
        (status, sandbox)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `backlog` and `in_flight` of `instance`, as `plugind ctl status --json` reports them.
    ///
    /// # Panics
    /// If the command fails or names no such instance.
    pub fn counts(&self, instance: &str) -> (u64, u64) {
        let out = self.cli(&["ctl", "status", "--json"]);
        assert!(out.status.success(), "ctl status: {out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let entry = status["instances"]
            .as_array()
            .and_then(|list| list.iter().find(|i| i["name"] == instance))
            .unwrap_or_else(|| panic!("no instance {instance} in {status}"));
        (
            entry["backlog"].as_u64().unwrap_or_default(),
            entry["in_flight"].as_u64().unwrap_or_default(),
        )
    }

    /// Waits (10 s at most) until `instance` holds a call in flight (handed to its plugin).
    ///
    /// # Panics
    /// On timeout, with the log.
    pub fn wait_in_flight(&self, instance: &str) {
        self.wait_counts(instance, "a call in flight", |(_, in_flight)| in_flight > 0);
    }

    /// Waits (10 s at most) until nothing waits for `instance` or is in flight there.
    ///
    /// # Panics
    /// On timeout, with the log.
    pub fn wait_idle(&self, instance: &str) {
        self.wait_counts(instance, "nothing waiting", |counts| counts == (0, 0));
    }

    fn wait_counts(&self, instance: &str, what: &str, done: impl Fn((u64, u64)) -> bool) {
        let started = Instant::now();
        while !done(self.counts(instance)) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{instance}: not {what} after 10 s:\n{}",
                self.history()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `plugind ctl ARGS --json`, which must succeed.
    ///
    /// # Panics
    /// If the command fails (with its stderr and the daemon's log).
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "plugind {all:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.history()
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    }

    /// Instance `name` as `ctl plugins --json` shows it (`Null` when it is not listed).
    pub fn instance(&self, name: &str) -> serde_json::Value {
        self.ctl_json(&["plugins"])["instances"]
            .as_array()
            .and_then(|list| list.iter().find(|i| i["name"] == name).cloned())
            .unwrap_or_default()
    }

    /// Publishes `data` to `topic` with `headers` (name, value); the message id.
    ///
    /// # Panics
    /// If the publish is refused (with the daemon's log).
    pub fn publish_with(&self, topic: &str, data: &str, headers: &[(&str, &str)]) -> u64 {
        let pairs: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = Vec::new();
        for pair in &pairs {
            args.extend(["-H", pair.as_str()]);
        }
        self.publish(topic, data, &args)
            .unwrap_or_else(|e| panic!("publish refused: {e}\n{}", self.history()))
    }

    /// Runs `publish` with instance `name` paused, then resumes it: everything published
    /// is handed out together, however slowly the publishes went (each is a CLI process).
    pub fn held<T>(&self, name: &str, publish: impl FnOnce() -> T) -> T {
        self.ctl_json(&["pause", name]);
        let published = publish();
        self.ctl_json(&["resume", name]);
        published
    }

    /// Sends SIGHUP (reload).
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends signal `name` (`TERM`, `HUP`, …) and returns at once.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Runs a `plugind` client command against the running daemon's default socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary::plugind())
            .args(args)
            .arg("--connect")
            .arg(format!("unix:{}", self.socket.display()))
            .current_dir(self.sandbox().path())
            .env_remove("PLUGIND_CONNECT")
            .env_remove("PLUGIND_CONFIG")
            .output()
            .expect("plugind runs")
    }

    /// Runs a `plugind` command in the sandbox, as an operator in that directory would (its
    /// `plugins.toml` is found there).
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(binary::plugind())
            .args(args)
            .current_dir(self.sandbox().path())
            .env_remove("PLUGIND_CONNECT")
            .env_remove("PLUGIND_CONFIG")
            .output()
            .expect("plugind runs")
    }

    /// `plugind publish TOPIC DATA [args]`; returns the id, or the error text.
    pub fn publish(&self, topic: &str, data: &str, args: &[&str]) -> Result<u64, String> {
        let mut all = vec!["publish", topic, data];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(text.trim().parse().expect("publish prints the id"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Everything the daemon logged so far in this run.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The logs of the previous runs in this sandbox, oldest first, then this run's, each
    /// under a header naming its file; just [`Daemon::log`] on a first run.
    pub fn history(&self) -> String {
        let previous = previous_logs(&self.log);
        if previous.is_empty() {
            return self.log();
        }
        let mut all = String::new();
        for path in previous.iter().chain([&self.log]) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            all.push_str(&format!("===== {name} =====\n"));
            all.push_str(&fs::read_to_string(path).unwrap_or_default());
        }
        all
    }

    pub fn sandbox(&self) -> &Sandbox {
        self.sandbox
            .as_ref()
            .expect("a daemon owns its sandbox until it hands it back")
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits (10 s at most) until the log contains `text` `count` times.
    ///
    /// # Panics
    /// On timeout, with the log.
    pub fn wait_for_log(&self, text: &str, count: usize) {
        let started = Instant::now();
        while self.log().matches(text).count() < count {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "`{text}` not logged {count} times:\n{}",
                self.history()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (`timeout` at most) for a daemon expected to exit by itself (a plugin aborts
    /// the process, say): its exit status, or `None` if it still runs. Afterwards
    /// [`Daemon::kill9`] hands back the sandbox without a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits (15 s at most) for the exit; returns its status and the log.
    /// The sandbox is removed.
    ///
    /// # Panics
    /// If it does not exit in time.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let status = self.terminate();
        (status, self.log())
    }

    /// Stops it as [`Daemon::stop`] does but keeps the sandbox: its status, and the sandbox
    /// to [`Daemon::restart`] on.
    ///
    /// # Panics
    /// If it does not exit in time.
    pub fn stop_keeping_state(mut self) -> (ExitStatus, Sandbox) {
        let status = self.terminate();
        (
            status,
            self.sandbox.take().expect("the daemon owns its sandbox"),
        )
    }

    /// Kills it with SIGKILL, the crash a durable daemon must survive: no shutdown code runs.
    /// Waits for the exit and hands back the sandbox, with everything the daemon left in it,
    /// to [`Daemon::restart`] on. On a daemon that already exited it sends nothing.
    pub fn kill9(mut self) -> Sandbox {
        let mut child = self.child.take().expect("running");
        if !matches!(child.try_wait(), Ok(Some(_))) {
            // `Child::kill` is SIGKILL on Unix.
            child.kill().expect("plugind can be killed");
        }
        child.wait().expect("plugind can be waited for");
        self.sandbox.take().expect("the daemon owns its sandbox")
    }

    /// SIGTERM, then waits 15 s at most.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let started = Instant::now();
        loop {
            // The child stays in `self` until it exited: if this panics, drop kills it.
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "plugind did not exit 15 s after SIGTERM:\n{}",
                self.history()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Daemon {
    /// `plugind ctl watch --json` against this daemon, in the background: the events it
    /// kept, then the ones that happen (typed: the `event` object of each line).
    pub fn events(&self) -> Events {
        let mut child = Command::new(binary::plugind())
            .args(["ctl", "watch", "--json"])
            .arg("--connect")
            .arg(format!("unix:{}", self.socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("plugind ctl watch starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(value["event"].clone()).is_err()
                {
                    break;
                }
            }
        });
        Events { child, lines }
    }
}

/// A running `plugind ctl watch --json`; killed when dropped.
#[derive(Debug)]
pub struct Events {
    child: Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Events {
    /// Waits (20 s at most) for an event satisfying `found`; returns it and every event
    /// received before it, in order.
    ///
    /// # Panics
    /// On timeout, with the events seen.
    pub fn wait_for(
        &self,
        what: &str,
        found: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Vec<serde_json::Value>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(event) if found(&event) => return (event, before),
                Ok(event) => before.push(event),
                Err(_) => panic!("no event `{what}` within 20 s; seen: {before:#?}"),
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `daemon.log.1`, `daemon.log.2`, … next to `log`, as long as they exist: oldest first.
fn previous_logs(log: &Path) -> Vec<PathBuf> {
    (1..)
        .map(|run| log.with_extension(format!("log.{run}")))
        .take_while(|path| path.exists())
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
