//! `plugind run [-c FILE]`: the daemon. Validates the configuration (refused whole: exit 78),
//! binds the API endpoint, starts the delivery engine with every configured instance (an
//! instance that fails to start is logged and its deliveries wait; the rest runs), serves
//! gRPC, reloads on SIGHUP (and, through the supervisor's watcher, when `plugin_dir` or the
//! config file change), and on SIGINT/SIGTERM stops accepting, drains within
//! `grace_period` and exits 0.

use std::{path::Path, process::ExitCode, sync::Arc, time::Duration};

use super::logging;
use crate::{
    cli::{EXIT_CONFIG, EXIT_FAILURE, fail},
    clock::SystemClock,
    config::{self, ConfigError, Durability},
    control::{
        operator::{ControlService, SetLogLevel},
        publisher::PublisherService,
        server,
    },
    engine::{Engine, Options},
    ledger::{
        FailStop, Ledger, LedgerError, MemoryLedger,
        durable::{self, DurableLedger, Mode},
    },
    supervisor::SupervisorHandle,
};

/// How long connections may take to close once the daemon stopped.
const CLOSE_CONNECTIONS: Duration = Duration::from_secs(2);

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
    runtime.block_on(serve(config, log_level, fresh_ledger))
}

async fn serve(config: config::Config, log_level: SetLogLevel, fresh_ledger: bool) -> ExitCode {
    // The state dir first: it holds the default socket and the ledger. One this user cannot
    // create or write is a configuration problem (exit 78: the unit does not restart it); a
    // ledger in use, damaged or lost is not (exit 1: it may start once that is dealt with).
    if let Some(problem) = super::check::state_dir_problem(&config.host.state_dir) {
        return fail(EXIT_CONFIG, format_args!("run: {problem}"));
    }
    // A storage failure stops the daemon at once (DESIGN.md §7: fail-stop, exit 1): nothing
    // more can be recorded, so nothing more may be accepted or handed out. One hook for the
    // ledger's threads and the engine alike.
    let fail_stop = FailStop::new(|error: &str| {
        eprintln!("plugind: ledger: {error}; stopping now (exit 1)");
        std::process::exit(i32::from(EXIT_FAILURE));
    });
    let ledger = match open_ledger(&config, fresh_ledger, &fail_stop) {
        Ok(ledger) => ledger,
        Err(e @ LedgerError::Unusable(_)) => return fail(EXIT_CONFIG, format_args!("run: {e}")),
        Err(e) => return fail(EXIT_FAILURE, format_args!("run: {e}")),
    };
    let descriptors = raise_descriptor_limit();
    for weakness in server::weaknesses(&config.host, descriptors) {
        tracing::warn!("weak setting: {weakness}");
    }
    let bound = match server::bind(&config.host).await {
        Ok(bound) => bound,
        Err(e) => return fail(EXIT_FAILURE, format_args!("run: {e}")),
    };
    if let Some(group) = &config.host.socket_group
        && let Err(e) = server::set_group(&bound, group)
    {
        return fail(EXIT_FAILURE, format_args!("run: {e}"));
    }
    let options = Options {
        fail_stop: Some(fail_stop),
        ..Options::daemon()
    };
    let notifier = options.notifier.clone();
    let (engine, failures) = match Engine::start(&config, ledger.clone(), options) {
        Ok((engine, failures)) => (Arc::new(engine), failures),
        Err(e) => return fail(EXIT_FAILURE, format_args!("run: {e}")),
    };
    for failure in &failures {
        tracing::error!(instance = %failure.instance, error = %failure.error, "instance not started");
    }
    let reloads = tokio::spawn(reload_on_hangup(engine.supervisor().clone()));
    let instances = engine.snapshot().instances.len();
    tracing::info!(
        listen = %bound.describe(),
        instances,
        failed = failures.len(),
        config = %config.source.display(),
        "plugind ready"
    );
    if let Some(notifier) = &notifier {
        notifier.ready(&engine.supervisor().view().summary());
    }
    let publisher = PublisherService::new(engine.ingress().clone());
    let (health_reporter, health) = server::health().await;
    let services = server::Services {
        publisher,
        control: ControlService::new(
            engine.clone(),
            match config.host.durability {
                Durability::Fsync => "fsync",
                Durability::Buffered => "buffered",
                Durability::Memory => "memory",
            },
            log_level,
        ),
        health,
        access: server::Access::new(&config.host),
    };
    let limits = server::Limits::new(&config.host);
    // The API keeps serving while the daemon drains (health says NOT_SERVING, publishes are
    // refused, Watch streams end with UNAVAILABLE); it stops once the engine stopped.
    let (drained, shutdown) = tokio::sync::oneshot::channel::<()>();
    let mut api = tokio::spawn(server::serve(bound, services, limits, async {
        let _ = shutdown.await;
    }));
    let early = tokio::select! {
        () = stop_signal() => None,
        served = &mut api => Some(served),
    };
    reloads.abort();
    if let Some(notifier) = &notifier {
        notifier.stopping("draining: finishing the calls in hand");
    }
    server::draining(&health_reporter).await;
    tracing::info!(grace_period = ?config.host.grace_period, "stopping: draining the calls in hand");
    let grace = config.host.grace_period.max(Duration::from_millis(1));
    let stats_of = ledger.clone();
    let stopping = engine.clone();
    let report = tokio::task::spawn_blocking(move || stopping.stop(grace))
        .await
        .unwrap_or_default();
    let _ = drained.send(());
    // Connections are closed gracefully, but a client that never reads (a stuck watcher, a
    // suspended process) must not hold the exit: it gets a moment, then is dropped.
    let served = match early {
        Some(served) => served,
        None => match tokio::time::timeout(CLOSE_CONNECTIONS, &mut api).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(after = ?CLOSE_CONNECTIONS, "clients still connected; closing their connections");
                api.abort();
                Ok(Ok(()))
            }
        },
    }
    .unwrap_or_else(|e| {
        Err(server::ServeError::Reflection(format!(
            "the API task failed: {e}"
        )))
    });
    if let Err(e) = &served {
        tracing::error!(error = %e, "the API stopped");
    }
    let stats = stats_of.stats();
    if stats.commits > 0 {
        tracing::info!(
            commits = stats.commits,
            fsyncs = stats.fsyncs,
            messages_per_commit = format_args!("{:.1}", stats.messages as f64 / stats.commits as f64),
            commit_us = ?stats.latency_us,
            fsync_us = ?stats.fsync_us,
            checkpoint_us = ?stats.checkpoint_us,
            log_restarts = stats.log_restarts,
            "ledger: commits since start (latency p50, p99, max)"
        );
    }
    if report.abandoned.is_empty() {
        tracing::info!(released = report.released, "stopped");
    } else {
        tracing::warn!(released = report.released, abandoned = ?report.abandoned, "stopped; these instances did not finish in time");
    }
    if served.is_err() {
        return ExitCode::from(EXIT_FAILURE);
    }
    ExitCode::SUCCESS
}

/// Raises the soft limit of open files to the hard one (as systemd expects of a daemon that
/// needs many: the soft default of 1024 stays for `select(2)` users); returns the soft limit
/// now in force (`None`: unlimited).
fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current
}

/// The ledger `durability` asks for; a storage failure later goes to `fail_stop`.
fn open_ledger(
    config: &config::Config,
    fresh_ledger: bool,
    fail_stop: &FailStop,
) -> Result<Arc<dyn Ledger>, LedgerError> {
    let mode = match config.host.durability {
        Durability::Memory => return Ok(MemoryLedger::new()),
        Durability::Fsync => Mode::Fsync,
        Durability::Buffered => Mode::Buffered,
    };
    let ledger = DurableLedger::open(
        &config.host.state_dir,
        durable::Options {
            mode,
            max_bytes: config.host.max_ledger_bytes,
            dedupe_window: config.host.dedupe_window,
            dead_letter_retention: Some(config.host.dead_letter_retention),
            clock: Arc::new(SystemClock),
            fail_stop: Some(fail_stop.clone()),
            fresh: fresh_ledger,
        },
    )?;
    Ok(ledger)
}

/// Every SIGHUP reloads the configuration and `plugin_dir` (the result is logged and
/// evented by the supervisor).
async fn reload_on_hangup(supervisor: SupervisorHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with `plugind ctl reload`");
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading");
        supervisor.request_reload();
    }
}

/// Resolves at the first SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let term = async {
        match &mut terminate {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
