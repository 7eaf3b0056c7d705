//! The supervisor's side of the control plane: an owned snapshot of every instance,
//! republished after each change, so a status call never waits for a reload in progress.

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::Supervisor;

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
}

impl SupervisorView {
    /// One line for the service manager's `STATUS=`.
    pub fn summary(&self) -> String {
        let count = |state: &str| self.instances.iter().filter(|i| i.state == state).count();
        format!(
            "{} instances up, {} failed, {} quarantined, {} disabled; backlog {}",
            count("running"),
            count("failed") + count("stopped"),
            count("quarantined"),
            count("disabled"),
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
    /// `running`, `stopped`, `failed`, `quarantined` or `disabled`.
    pub state: &'static str,
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
}

impl Supervisor {
    /// Publishes what runs now (and tells the service manager when its summary changed).
    pub(super) fn publish_view(&mut self) {
        let config = &self.parts.config;
        let mut views: Vec<InstanceView> = self
            .instances
            .iter()
            .map(|(name, inst)| {
                let configured = config.instances.get(name);
                let state = match (&inst.running, configured) {
                    (Some(_), _) => "running",
                    (None, Some(i)) if !i.enabled => "disabled",
                    (None, _) if inst.quarantined => "quarantined",
                    (None, _) if inst.reported.is_some() => "failed",
                    (None, _) => "stopped",
                };
                let running = inst.running.as_ref();
                InstanceView {
                    name: name.clone(),
                    state,
                    plugin: running.map_or_else(
                        || configured.map_or_else(|| name.clone(), |i| i.plugin.clone()),
                        |g| g.library.manifest().name.clone(),
                    ),
                    version: running.map(|g| g.version.clone()).unwrap_or_default(),
                    generation: running.map_or(0, |g| g.number),
                    draining: inst.draining.clone(),
                    library: running.map(|g| g.path.clone()),
                    sha256: running.map(|g| hex::encode(g.key.sha256)),
                    last_error: inst.reported.clone(),
                    topics: inst.topics.iter().map(ToString::to_string).collect(),
                    backlog_bytes: self.parts.backlog.bytes(inst.id),
                }
            })
            .collect();
        // Disabled entries that never ran in this process are instances too.
        for (name, entry) in &config.instances {
            if !self.instances.contains_key(name) {
                views.push(InstanceView {
                    name: name.clone(),
                    state: if entry.enabled { "stopped" } else { "disabled" },
                    plugin: entry.plugin.clone(),
                    ..InstanceView::default()
                });
            }
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let view = SupervisorView {
            config: config.source.clone(),
            config_sha256: hex::encode(config.hash),
            backlog_bytes: views.iter().map(|v| v.backlog_bytes).sum(),
            instances: views,
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
            && let Some(notifier) = &self.parts.notifier
        {
            notifier.status(&summary);
            self.status = summary;
            self.status_at = std::time::Instant::now();
        }
    }
}
