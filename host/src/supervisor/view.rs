//! The supervisor's side of the control plane: an owned snapshot of every instance,
//! republished after each change, so a status call never waits for a reload in progress.

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::Supervisor;
use crate::ledger::Origin;

/// Where the snapshot is published.
pub(super) type View = Arc<ArcSwap<SupervisorView>>;

/// What the supervisor runs, as last published.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SupervisorView {
    /// The configuration running (the last good one).
    pub config: PathBuf,
    pub config_sha256: String,
    pub instances: Vec<InstanceView>,
    /// Payload bytes waiting, every instance together.
    pub backlog_bytes: u64,
    /// Library files read and checked since the start (the first scan, each file the watcher
    /// reported, each rescan of `plugin_dir`).
    pub library_checks: u64,
}

impl SupervisorView {
    /// One line for the service manager's `STATUS=`.
    pub fn summary(&self) -> String {
        let count = |state| self.instances.iter().filter(|i| i.state == state).count();
        format!(
            "{} instances up, {} failed, {} quarantined, {} disabled; backlog {}",
            count(InstanceState::Running),
            count(InstanceState::Failed) + count(InstanceState::Stopped),
            count(InstanceState::Quarantined),
            count(InstanceState::Disabled),
            bytes(self.backlog_bytes)
        )
    }
}

/// `1.5 MiB`.
fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// One instance as the supervisor sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstanceView {
    pub name: String,
    /// `running`, `stopped`, `failed`, `quarantined`, `disabled` or `removed` (its
    /// subscription ended; its waiting deliveries stay until forgotten).
    pub state: InstanceState,
    /// How it is subscribed (`None`: its subscription ended).
    pub subscribed: Option<Origin>,
    /// Whether its topics are known: `false` while it takes them from a library never
    /// loaded (nothing is routed to it yet).
    pub topics_known: bool,
    pub plugin: String,
    /// Of the generation running (empty when none is).
    pub version: String,
    /// The generation running (0: none).
    pub generation: u32,
    /// Generations replaced or stopped, still finishing their call in hand.
    pub draining: Vec<u32>,
    /// The library file the running generation was loaded from.
    pub library: Option<PathBuf>,
    pub sha256: Option<String>,
    /// Why it does not run (or why the last load failed while an older one kept serving).
    pub last_error: Option<String>,
    pub topics: Vec<String>,
    /// Payload bytes of its deliveries waiting or in flight.
    pub backlog_bytes: u64,
    /// Its deliveries waiting or in flight.
    pub backlog: u64,
}

impl Supervisor {
    /// Publishes what runs now (and tells the service manager when its summary changed).
    pub(super) fn publish_view(&mut self) {
        let config = &self.deps.config;
        let mut views: Vec<InstanceView> = self
            .instances
            .iter()
            // An instance whose subscription ended shows while deliveries wait for it.
            .filter(|(_, inst)| {
                inst.subscribed.is_some()
                    || inst.running.is_some()
                    || !inst.draining.is_empty()
                    || self.deps.backlog.count(inst.id) > 0
            })
            .map(|(name, inst)| {
                let configured = config.instances.get(name);
                let state = match (&inst.running, configured) {
                    (Some(_), _) => InstanceState::Running,
                    (None, _) if inst.subscribed.is_none() => InstanceState::Removed,
                    (None, Some(i)) if !i.enabled => InstanceState::Disabled,
                    (None, _) if inst.quarantined => InstanceState::Quarantined,
                    (None, _) if inst.run && inst.reported.is_some() => InstanceState::Failed,
                    (None, _) => InstanceState::Stopped,
                };
                let running = inst.running.as_ref();
                InstanceView {
                    name: name.clone(),
                    state,
                    subscribed: inst.subscribed,
                    topics_known: inst.topics_known,
                    plugin: running.map_or_else(
                        || {
                            configured.map_or_else(
                                || {
                                    self.remembered
                                        .get(name)
                                        .and_then(|r| r.subscription.as_ref())
                                        .map_or_else(|| name.clone(), |s| s.plugin.clone())
                                },
                                |i| i.plugin.clone(),
                            )
                        },
                        |g| g.library.manifest().name.clone(),
                    ),
                    version: running.map(|g| g.version.clone()).unwrap_or_default(),
                    generation: running.map_or(0, |g| g.number),
                    draining: inst.draining.clone(),
                    library: running.map(|g| g.path.clone()),
                    sha256: running.map(|g| hex::encode(g.key.sha256)),
                    last_error: inst.reported.clone().filter(|_| inst.run),
                    topics: inst.topics.iter().map(ToString::to_string).collect(),
                    backlog_bytes: self.deps.backlog.bytes(inst.id),
                    backlog: self.deps.backlog.count(inst.id),
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let view = SupervisorView {
            config: config.source.clone(),
            config_sha256: hex::encode(config.hash),
            backlog_bytes: views.iter().map(|v| v.backlog_bytes).sum(),
            instances: views,
            library_checks: self.deps.libraries.checks(),
        };
        let summary = view.summary();
        self.view.store(Arc::new(view));
        // Instance changes at once; a moving backlog at most once a second.
        let instances_changed = || {
            let head = |s: &str| s.split(';').next().map(str::to_owned);
            head(&summary) != head(&self.status)
        };
        if summary != self.status
            && (instances_changed() || self.status_at.elapsed() >= Duration::from_secs(1))
            && let Some(notifier) = &self.deps.notifier
        {
            notifier.status(&summary);
            self.status = summary;
            self.status_at = std::time::Instant::now();
        }
    }
}

/// Where an instance is in its life. The supervisor's view gives every state but
/// [`InstanceState::Paused`]: the front shows a running instance whose circuit an operator
/// paused as paused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// A generation runs and takes deliveries.
    Running,
    /// A generation runs; an operator paused it (nothing is handed to it until resumed).
    Paused,
    /// No generation runs, and none failed (not started yet, or stopped).
    #[default]
    Stopped,
    /// Its last start failed; `last_error` says why.
    Failed,
    /// Its library crashed the daemon while loading too often; not loaded again until it
    /// changes or an operator reloads it.
    Quarantined,
    /// Its table says `enabled = false`: it keeps its subscription, nothing runs.
    Disabled,
    /// Its subscription ended; its waiting deliveries stay until forgotten.
    Removed,
}

impl InstanceState {
    /// Every state, in the order above.
    pub const ALL: [Self; 7] = [
        Self::Running,
        Self::Paused,
        Self::Stopped,
        Self::Failed,
        Self::Quarantined,
        Self::Disabled,
        Self::Removed,
    ];

    /// The operator's name of the state (what `Display` writes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Quarantined => "quarantined",
            Self::Disabled => "disabled",
            Self::Removed => "removed",
        }
    }
}

crate::words::spelled_as_words!(InstanceState);
