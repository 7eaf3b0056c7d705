//! The real `plugind` daemon in a sandbox: start it with a configuration and plugins, wait
//! until it is ready, talk to it through the real CLI, stop it with a signal, read its log.

use std::{
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
    sandbox: Sandbox,
    log: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    /// Writes `config` as `plugins.toml` in `sandbox` and runs `plugind run` on it; waits
    /// until it logged readiness (10 s at most).
    ///
    /// # Panics
    /// If it exits or does not become ready in time (with its log).
    pub fn start(sandbox: Sandbox, config: &str) -> Self {
        let config_path = sandbox.put("plugins.toml", config);
        let log = sandbox.path().join("daemon.log");
        let child = Command::new(binary::plugind())
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .current_dir(sandbox.path())
            .env("PLUGIND_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("the log file can be created"))
            .spawn()
            .expect("plugind starts");
        let socket = sandbox.path().join("state/plugind.sock");
        let mut daemon = Self {
            child: Some(child),
            sandbox,
            log,
            socket,
        };
        let started = Instant::now();
        loop {
            if daemon.log().contains("plugind ready") {
                return daemon;
            }
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "plugind exited with {status} before ready:\n{}",
                    daemon.log()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "plugind not ready after 10 s:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a `plugind` client command against the running daemon's default socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary::plugind())
            .args(args)
            .arg("--connect")
            .arg(format!("unix:{}", self.socket.display()))
            .current_dir(self.sandbox.path())
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

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
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
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits (15 s at most) for the exit; returns its status and the log.
    ///
    /// # Panics
    /// If it does not exit in time.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return (status, self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "plugind did not exit 15 s after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
