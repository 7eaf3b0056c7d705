//! `plugind run [-c FILE]`: the daemon. Validates the configuration (refused whole: exit 78),
//! sets up the logs, then runs [`daemon::run`](crate::daemon::run) — which binds the API
//! endpoint, starts the delivery engine with every configured instance (an instance that
//! fails to start is logged and its deliveries wait; the rest runs) and serves gRPC — with
//! SIGHUP as its reloads (besides the supervisor's watcher of `plugin_dir` and the config
//! file) and SIGINT/SIGTERM as its shutdown: it stops accepting, drains within
//! `grace_period` and exits 0. Only this command exits the process.

use std::{path::Path, process::ExitCode, sync::Arc};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Notify,
};

use super::logging;
use crate::{
    cli::{EXIT_CONFIG, EXIT_FAILURE, fail},
    config::{self, ConfigError},
    daemon::{self, DaemonError},
    engine,
    ledger::FailStop,
};

/// Runs the daemon until a stop signal. `fresh_ledger`: start a new, empty ledger where the
/// state dir's was lost (`--fresh-ledger`).
pub fn run(config_flag: Option<&Path>, fresh_ledger: bool) -> ExitCode {
    let path = match config::locate(config_flag) {
        // Absolute, once: the daemon reports it (`ctl status`), and `ctl enable` edits it
        // from whatever folder the operator is in.
        Ok((path, _)) => std::path::absolute(&path).unwrap_or(path),
        Err(e) => return fail(EXIT_CONFIG, format_args!("run: {e}")),
    };
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(ConfigError::Invalid(invalid)) => {
            eprintln!("{}\n", invalid.render());
            return fail(
                EXIT_CONFIG,
                format_args!("{}: invalid configuration; not started", path.display()),
            );
        }
        Err(e) => return fail(EXIT_CONFIG, format_args!("run: {e}")),
    };
    let log_level = logging::init(config.host.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("grpc")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return fail(
                EXIT_FAILURE,
                format_args!("run: cannot start the runtime: {e}"),
            );
        }
    };
    runtime.block_on(async {
        // Every signal the daemon acts on is registered before anything starts: one that
        // comes during the start (or just after READY, before the daemon first waits for
        // it) is acted on, never its default action, which kills the process.
        let signals = Signals::install();
        let reloads = Arc::new(Notify::new());
        tokio::spawn(reload_on_hangup(signals.hangup, reloads.clone()));
        let options = daemon::DaemonOptions {
            fresh_ledger,
            log_level,
            fail_stop: exit_on_ledger_failure(),
            reloads,
            engine: engine::EngineOptions::daemon(),
        };
        match daemon::run(
            config,
            options,
            stop_signal(signals.terminate, signals.interrupt),
        )
        .await
        {
            // The daemon logged how the API ended.
            Ok(stopped) if stopped.api.is_err() => ExitCode::from(EXIT_FAILURE),
            Ok(_) => ExitCode::SUCCESS,
            // A state dir this user cannot create or write is a configuration problem (exit
            // 78: the unit does not restart it); a ledger in use, damaged or lost is not
            // (exit 1: it may start once that is dealt with).
            Err(e) => fail(exit_code(&e), format_args!("run: {e}")),
        }
    })
}

fn exit_code(e: &DaemonError) -> u8 {
    if e.is_configuration() {
        EXIT_CONFIG
    } else {
        EXIT_FAILURE
    }
}

/// A storage failure stops the daemon at once (docs/design.md §7: fail-stop, exit 1): nothing
/// more can be recorded, so nothing more may be accepted or handed out.
fn exit_on_ledger_failure() -> FailStop {
    FailStop::new(|error: &str| {
        eprintln!("plugind: ledger: {error}; stopping now (exit 1)");
        std::process::exit(i32::from(EXIT_FAILURE));
    })
}

/// Every SIGHUP asks the daemon to reload the configuration and `plugin_dir`.
async fn reload_on_hangup(hangup: Option<Signal>, reloads: Arc<Notify>) {
    let Some(mut hangup) = hangup else {
        tracing::warn!("cannot listen for SIGHUP; reload with `plugind ctl reload`");
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading");
        reloads.notify_one();
    }
}

/// The signals `plugind run` acts on, registered at once (`None`: it could not be).
struct Signals {
    hangup: Option<Signal>,
    terminate: Option<Signal>,
    interrupt: Option<Signal>,
}

impl Signals {
    fn install() -> Self {
        Self {
            hangup: signal(SignalKind::hangup()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }
}

/// Resolves at the first SIGINT or SIGTERM.
async fn stop_signal(terminate: Option<Signal>, interrupt: Option<Signal>) {
    async fn first(signal: Option<Signal>) {
        match signal {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        () = first(interrupt) => tracing::info!("SIGINT received"),
        () = first(terminate) => tracing::info!("SIGTERM received"),
    }
}
