//! The daemon as a library call: [`run`] assembles it — the state dir checked, the ledger
//! `durability` asks for, the engine (dispatcher, supervisor, hot plug), the
//! [front](crate::front) and the gRPC API in front of it — serves until `shutdown` resolves,
//! then drains within `grace_period` while the API keeps answering (health NOT_SERVING,
//! publishes refused), and stops. The `plugind run` command around it only parses, sets up
//! logs and signals, and turns the outcome into an exit code.

use std::{future::Future, path::Path, sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{
    clock::SystemClock,
    config::{Config, Durability},
    control::{operator::ControlService, publisher::PublisherService, server},
    dispatch::StopReport,
    engine::{Engine, EngineError, EngineOptions},
    exporter,
    front::{Front, SetLogLevel},
    ledger::{
        FailStop, Ledger, LedgerError, MemoryLedger,
        durable::{self, DurableLedger, Mode},
    },
    supervisor::SupervisorHandle,
};

/// How long connections may take to close once the daemon stopped.
const CLOSE_CONNECTIONS: Duration = Duration::from_secs(2);

/// How the daemon runs beyond its configuration: what its caller (the `plugind run`
/// command) owns — the logs, the process, the signals.
#[derive(Clone)]
pub struct DaemonOptions {
    /// Start a new, empty ledger where the state dir's was lost (`--fresh-ledger`).
    pub fresh_ledger: bool,
    /// Changes the log filter (`ctl log-level`).
    pub log_level: SetLogLevel,
    /// Called once when the ledger's storage fails for good: nothing more can be recorded,
    /// so nothing more may be accepted or handed out (the command exits 1 from it).
    pub fail_stop: FailStop,
    /// Each notification reloads the configuration and `plugin_dir` (the command's SIGHUP);
    /// the result is logged and evented.
    pub reloads: Arc<Notify>,
    /// The engine's clock, probe, watching and service manager
    /// ([`EngineOptions::daemon`] for `plugind run`: its probe re-executes this binary).
    pub engine: EngineOptions,
}

impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonOptions")
            .field("fresh_ledger", &self.fresh_ledger)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// Why the daemon did not start (nothing was served).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state dir cannot be created or written by this user.
    #[error("{0}")]
    StateDir(String),
    /// The ledger cannot be opened (`LedgerError::Unusable`: the state dir cannot be used).
    #[error(transparent)]
    Ledger(LedgerError),
    /// The API endpoint cannot be bound or given its group.
    #[error(transparent)]
    Endpoint(server::ServeError),
    /// The engine cannot start.
    #[error(transparent)]
    Engine(EngineError),
    /// The metrics endpoint cannot be bound.
    #[error(transparent)]
    Metrics(exporter::serve::BindError),
}

impl DaemonError {
    /// Whether the configuration (or the service manager's sandbox) must change before it
    /// can start: the state dir cannot be created or written. Anything else (a ledger in
    /// use, damaged or lost, an endpoint in use) may start once dealt with.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::StateDir(_) | Self::Ledger(LedgerError::Unusable(_))
        )
    }
}

/// How a daemon that started ended.
#[derive(Debug)]
pub struct Stopped {
    /// What the graceful stop released and abandoned.
    pub report: StopReport,
    /// How the API ended (an error: it failed while serving).
    pub api: Result<(), server::ServeError>,
}

/// Runs the daemon for `config` until `shutdown` resolves (or the API fails), then stops it
/// gracefully.
///
/// # Errors
/// [`DaemonError`] when it cannot start: the state dir or the ledger cannot be used, the
/// endpoint cannot be bound, or the engine cannot start.
pub async fn run(
    config: Config,
    options: DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, DaemonError> {
    // The state dir first: it holds the default socket and the ledger.
    if let Some(problem) = state_dir_problem(&config.host.state_dir) {
        return Err(DaemonError::StateDir(problem));
    }
    let ledger = open_ledger(&config, options.fresh_ledger, options.fail_stop.clone())
        .map_err(DaemonError::Ledger)?;
    let descriptors = raise_descriptor_limit();
    for weakness in server::weaknesses(&config.host, descriptors) {
        tracing::warn!("weak setting: {weakness}");
    }
    let bound = server::bind(&config.host)
        .await
        .map_err(DaemonError::Endpoint)?;
    if let Some(group) = &config.host.socket_group {
        server::set_group(&bound, group).map_err(DaemonError::Endpoint)?;
    }
    let metrics_endpoint = match config.host.metrics {
        Some(addr) => Some(
            exporter::serve::bind(addr)
                .await
                .map_err(DaemonError::Metrics)?,
        ),
        None => None,
    };
    // One fail-stop hook for the ledger's threads and the engine's alike.
    let engine_options = EngineOptions {
        fail_stop: Some(options.fail_stop),
        ..options.engine
    };
    let notifier = engine_options.notifier.clone();
    let (engine, failures) =
        Engine::start(&config, ledger.clone(), engine_options).map_err(DaemonError::Engine)?;
    let engine = Arc::new(engine);
    for failure in &failures {
        tracing::error!(instance = %failure.instance, error = %failure.error, "instance not started");
    }
    let reloads = tokio::spawn(reload_on_request(
        engine.supervisor().clone(),
        options.reloads,
    ));
    let front = Front::new(engine.clone(), config.host.durability, options.log_level);
    // Served before the daemon says it is ready: a scraper that waits for readiness finds it.
    let readiness = exporter::serve::Readiness::default();
    readiness.set(true);
    let metrics_served = metrics_endpoint.map(|endpoint| {
        tracing::info!(
            "serving metrics on http://{}/metrics (and /healthz, /readyz)",
            endpoint.local_addr()
        );
        endpoint.serve(front.clone(), readiness.clone())
    });
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
    let (health_reporter, health) = server::health().await;
    let services = server::Services {
        publisher: PublisherService::new(front.clone()),
        control: ControlService::new(front),
        health,
        access: server::Access::new(&config.host),
    };
    let limits = server::ConnectionLimits::new(&config.host);
    // The API keeps serving while the daemon drains (health says NOT_SERVING, publishes are
    // refused, Watch streams end with UNAVAILABLE); it stops once the engine stopped.
    let (drained, api_shutdown) = tokio::sync::oneshot::channel::<()>();
    let mut api = tokio::spawn(server::serve(bound, services, limits, async {
        let _ = api_shutdown.await;
    }));
    let early = tokio::select! {
        () = shutdown => None,
        served = &mut api => Some(served),
    };
    reloads.abort();
    if let Some(notifier) = &notifier {
        notifier.stopping("draining: finishing the calls in hand");
    }
    server::draining(&health_reporter).await;
    readiness.set(false);
    tracing::info!(grace_period = ?config.host.grace_period, "stopping: draining the calls in hand");
    let grace = config.host.grace_period.max(Duration::from_millis(1));
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
    if let Some(metrics) = metrics_served {
        metrics.stop().await;
    }
    log_commits(ledger.as_ref());
    if report.abandoned.is_empty() {
        tracing::info!(released = report.released, "stopped");
    } else {
        tracing::warn!(released = report.released, abandoned = ?report.abandoned, "stopped; these instances did not finish in time");
    }
    Ok(Stopped {
        report,
        api: served,
    })
}

/// The group commit's figures since start, once at the stop.
fn log_commits(ledger: &dyn Ledger) {
    let stats = ledger.stats();
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

/// The ledger `durability` asks for; a storage failure later calls `fail_stop` (fail-stop:
/// nothing more can be recorded).
fn open_ledger(
    config: &Config,
    fresh_ledger: bool,
    fail_stop: FailStop,
) -> Result<Arc<dyn Ledger>, LedgerError> {
    let mode = match config.host.durability {
        Durability::Memory => return Ok(MemoryLedger::new()),
        Durability::Fsync => Mode::Fsync,
        Durability::Buffered => Mode::Buffered,
    };
    let ledger = DurableLedger::open(
        &config.host.state_dir,
        durable::LedgerOptions {
            mode,
            max_bytes: config.host.max_ledger_bytes,
            dedupe_window: config.host.dedupe_window,
            dead_letter_retention: Some(config.host.dead_letter_retention),
            clock: Arc::new(SystemClock),
            fail_stop: Some(fail_stop),
            fresh: fresh_ledger,
        },
    )?;
    Ok(ledger)
}

/// Every notification reloads the configuration and `plugin_dir` (the result is logged and
/// evented by the supervisor).
async fn reload_on_request(supervisor: SupervisorHandle, reloads: Arc<Notify>) {
    loop {
        reloads.notified().await;
        supervisor.request_reload();
    }
}

/// Why the daemon could not use `dir` as its state dir, if it could not: it must be a
/// directory this user can write and enter, or one it can create (the nearest existing
/// folder above it writable). Nothing is written to find out.
pub fn state_dir_problem(dir: &Path) -> Option<String> {
    use rustix::fs::{Access, AtFlags, CWD, accessat};
    let mut existing = dir;
    let missing = loop {
        match std::fs::metadata(existing) {
            Ok(meta) if meta.is_dir() => break existing != dir,
            Ok(_) => {
                return Some(format!(
                    "state_dir {}: {} is not a directory",
                    dir.display(),
                    existing.display()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && existing != Path::new(".") => {
                existing = existing
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
            }
            Err(e) => return Some(format!("state_dir {}: {e}", dir.display())),
        }
    };
    let access = accessat(
        CWD,
        existing,
        Access::WRITE_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    );
    let why = match access {
        Ok(()) => return None,
        Err(rustix::io::Errno::ROFS) => "is on a read-only file system".to_owned(),
        Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => format!(
            "is not writable by this user (uid {})",
            rustix::process::geteuid().as_raw()
        ),
        Err(e) => e.to_string(),
    };
    Some(if missing {
        format!(
            "state_dir {} does not exist and cannot be created: {} {why}",
            dir.display(),
            existing.display()
        )
    } else {
        format!("state_dir {} {why}", dir.display())
    })
}
