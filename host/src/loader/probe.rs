//! Probe before trust: a library without a sha256 pin is first loaded by a short-lived child
//! process (the `plugind` binary re-executed with the hidden `probe-load` command), because
//! `dlopen` runs the library's constructors before any check inside it can, and a
//! malformed or hostile library can kill the process that loads it.
//!
//! The child gets the very bytes the parent checked, in a sealed memfd as its stdin (spawned
//! without a fork: posix_spawn); it maps them, checks the layout, the version and the
//! manifest, unloads, and prints one JSON line.
//! A child killed by a signal becomes [`LoadError::ProbeCrashed`].

use std::{
    collections::BTreeMap,
    io::Read as _,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use plugind_api::{
    hosting::{ConfigProblem, Instance},
    manifest::Manifest,
};
use serde::{Deserialize, Serialize};

use super::{Checked, LoadError, image};

/// How to run the probe child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeCommand {
    /// The `plugind` binary (the daemon passes its own executable).
    pub program: PathBuf,
    /// How long the child may take before it is killed and the library refused.
    pub timeout: Duration,
}

impl ProbeCommand {
    /// Probing with `program` and a 10-second timeout.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The running executable, if it is `plugind` (the daemon and the CLI).
    pub fn current_exe() -> Option<Self> {
        std::env::current_exe().ok().map(Self::new)
    }
}

/// What the child says, one JSON line on stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum ProbeReport {
    /// The library mapped, passed every check and unloaded again.
    Accepted {
        /// Whether it really left the child process after `dlclose`.
        unloaded: bool,
        /// What the plugin said of each config it was asked to check, by instance.
        #[serde(default)]
        configs: BTreeMap<String, ConfigCheck>,
    },
    /// The library was refused without harming the child.
    Refused { error: String },
}

/// What a plugin said of one instance's config (plugind-api 1.1 `check_config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "config", rename_all = "snake_case")]
pub enum ConfigCheck {
    /// It deserializes into the plugin's `Config`.
    Accepted,
    /// The plugin was built against plugind-api 1.0, which cannot check a config without
    /// instantiating the plugin: not checked.
    Unchecked,
    /// Refused: the dotted path of the key inside the `config` table, and why.
    Refused { path: String, message: String },
}

/// What the parent learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// With what the plugin said of the configs it was given.
    Accepted(BTreeMap<String, ConfigCheck>),
    /// Refused for a reason the in-process checks will find again, safely.
    Refused(String),
}

/// Runs the probe child on `bytes`.
pub(super) fn run(
    command: &ProbeCommand,
    path: &Path,
    manifest: &Manifest,
    bytes: &[u8],
    configs: &BTreeMap<String, serde_json::Value>,
) -> Result<Verdict, LoadError> {
    let other = |detail: String| LoadError::ProbeFailed {
        path: path.to_owned(),
        detail,
    };
    let memfd = image::sealed_memfd(manifest, bytes)
        .map_err(|e| other(format!("cannot stage the library for the probe: {e}")))?;
    // The memfd is the child's stdin (fd 0): no fd needs its close-on-exec cleared, so no
    // code runs between fork and exec, and the standard library spawns with posix_spawn
    // (vfork semantics). A fork of the daemon would copy its page tables and make every
    // thread's next write to memory fault until the exec: a stall of the deliveries.
    let mut child = Command::new(&command.program);
    child
        .arg("probe-load")
        .arg("--fd")
        .arg("0")
        .arg("--path")
        .arg(path)
        .arg("--configs")
        .arg(serde_json::Value::from(serde_json::Map::from_iter(configs.clone())).to_string())
        .stdin(Stdio::from(memfd))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // The child must not speak for the daemon to systemd.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    let mut child = child.spawn().map_err(|e| {
        other(format!(
            "cannot start the probe {}: {e}",
            command.program.display()
        ))
    })?;
    let deadline = Instant::now() + command.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LoadError::ProbeTimedOut {
                    path: path.to_owned(),
                    timeout: command.timeout,
                });
            }
            Err(e) => return Err(other(format!("cannot wait for the probe: {e}"))),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    if let Some(signal) = status.signal() {
        return Err(LoadError::ProbeCrashed {
            path: path.to_owned(),
            signal,
            name: signal_name(signal),
        });
    }
    match serde_json::from_str::<ProbeReport>(stdout.trim()) {
        Ok(ProbeReport::Accepted { configs, .. }) if status.success() => {
            Ok(Verdict::Accepted(configs))
        }
        Ok(ProbeReport::Refused { error }) => Ok(Verdict::Refused(error)),
        _ => {
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(other(format!(
                "the probe exited with {status} without a verdict{}{last}",
                if last.is_empty() { "" } else { ": " }
            )))
        }
    }
}

/// The child's side: checks and maps the library in the inherited memfd `fd` (its stdin),
/// and asks it about each config of `configs` (instance → its `config` table as JSON).
pub fn child(fd: i32, path: &Path, configs: &BTreeMap<String, serde_json::Value>) -> ProbeReport {
    let report = (|| {
        let mut bytes = Vec::new();
        std::fs::File::open(format!("/proc/self/fd/{fd}"))
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(|source| LoadError::Read {
                path: path.to_owned(),
                source,
            })?;
        let checked = Checked::from_bytes(path, bytes)?;
        let image = image::Image::load(path, &checked.bytes, &checked.manifest)?;
        let checks = configs
            .iter()
            .map(|(instance, config)| {
                // SAFETY: the image stays loaded until `unload` below, after every check.
                let answer = unsafe { Instance::check_config(image.module, &config.to_string()) };
                let check = match answer {
                    None => ConfigCheck::Unchecked,
                    Some(Ok(())) => ConfigCheck::Accepted,
                    Some(Err(ConfigProblem { path, message })) => {
                        ConfigCheck::Refused { path, message }
                    }
                };
                (instance.clone(), check)
            })
            .collect();
        Ok::<_, LoadError>((image.unload(), checks))
    })();
    match report {
        Ok((unloaded, configs)) => ProbeReport::Accepted { unloaded, configs },
        Err(e) => ProbeReport::Refused {
            error: e.to_string(),
        },
    }
}

/// `SIGSEGV`-style name of a signal number.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}
