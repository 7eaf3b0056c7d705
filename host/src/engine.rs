//! The delivery engine, assembled. At start the supervisor part finds every library in
//! `plugin_dir`, loads one copy per configured instance through the loader (probe, pin and
//! owners as configured), runs `new` off the control path with `init_timeout`, and starts
//! an actor per instance; then the ingress, the dispatcher and the ledger are wired together.
//! An instance that fails to start is reported and its deliveries wait in the ledger; the
//! rest runs. `plugind run` puts gRPC in front of [`Engine::ingress`].

use std::{collections::BTreeMap, path::Path, sync::Arc, thread::JoinHandle, time::Duration};

use crossbeam_channel::{Sender, bounded, unbounded};
use plugind_api::hosting;
use serde::Serialize;

use crate::{
    actor::{self, Actor},
    circuit::Breaker,
    clock::{Clock, SystemClock},
    config::{Config, Settings},
    delivery::Rules,
    dispatch::{Dispatcher, Input, Slot, Snapshot, StopReport},
    ingress::{Backlog, Ingress},
    ledger::{Forget, Ledger, LedgerError, Selection},
    loader::{self, Checked, Library, LoadError, Policy, ProbeCommand},
    routing::{InstanceId, Routing},
    services::{Identity, InstanceServices, Limits},
    topic::Pattern,
};

/// How the engine runs beyond its configuration.
#[derive(Clone)]
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// How unpinned libraries are probed before loading (`None`: not probed).
    pub probe: Option<ProbeCommand>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// The daemon's: the real clock, probing with its own executable.
    pub fn daemon() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            probe: ProbeCommand::current_exe(),
        }
    }
}

/// Why the engine could not start at all (a single instance failing is no such reason).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// An instance that did not start, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StartFailure {
    pub instance: String,
    pub error: String,
}

/// A running engine.
#[derive(Debug)]
pub struct Engine {
    ingress: Arc<Ingress>,
    inputs: Sender<Input>,
    dispatcher: Option<JoinHandle<()>>,
    ledger: Arc<dyn Ledger>,
    names: Vec<String>,
}

/// One instance to run, before it runs.
struct Planned {
    name: String,
    plugin: String,
    settings: Settings,
    topics: Option<Vec<Pattern>>,
    sha256: Option<[u8; 32]>,
    config: serde_json::Value,
}

impl Engine {
    /// Starts the engine for `config`.
    ///
    /// # Errors
    /// [`EngineError`] when the ledger cannot be read or a thread cannot start.
    pub fn start(
        config: &Config,
        ledger: Arc<dyn Ledger>,
        options: Options,
    ) -> Result<(Self, Vec<StartFailure>), EngineError> {
        let index = library_index(config);
        let planned = plan_instances(config, &index);
        let rules: Vec<(String, Rules)> = planned
            .iter()
            .map(|p| (p.name.clone(), Rules::from(&p.settings)))
            .collect();
        let recovered = ledger.recover(&rules, options.clock.now())?;
        if recovered.unclean || !recovered.pending.is_empty() || recovered.orphaned > 0 {
            tracing::info!(
                pending = recovered.pending.len(),
                crashed = recovered.crashed,
                orphaned = recovered.orphaned,
                unclean = recovered.unclean,
                "ledger recovered"
            );
        }
        let backlog = Arc::new(Backlog::new(
            &planned
                .iter()
                .map(|p| (p.name.clone(), p.settings.max_backlog))
                .collect::<Vec<_>>(),
        ));
        let (inputs, inputs_rx) = unbounded();
        let (events, events_rx) = unbounded();
        let ingress = Arc::new(Ingress::new(
            Routing::default(),
            recovered.next_id.max(1),
            ledger.clone(),
            inputs.clone(),
            backlog.clone(),
            config.host.max_message_size,
            options.clock.clone(),
        ));
        let mut failures = Vec::new();
        let mut slots = Vec::new();
        let mut patterns: BTreeMap<InstanceId, Vec<Pattern>> = BTreeMap::new();
        for (id, plan) in planned.iter().enumerate() {
            let id = id as InstanceId;
            let library = index
                .get(&plan.plugin)
                .and_then(|claims| match claims.as_slice() {
                    [one] => Some(one),
                    _ => None,
                });
            let wiring = Wiring {
                ingress: &ingress,
                events: &events,
                ledger: &ledger,
            };
            let (actor, topics) = match start_instance(id, plan, library, config, &wiring, &options)
            {
                Ok((actor, default_topics)) => {
                    (Some(actor), plan.topics.clone().or(Some(default_topics)))
                }
                Err(error) => {
                    tracing::error!(instance = %plan.name, %error, "instance not started; its deliveries wait");
                    failures.push(StartFailure {
                        instance: plan.name.clone(),
                        error,
                    });
                    (None, plan.topics.clone())
                }
            };
            patterns.insert(id, topics.unwrap_or_default());
            slots.push(Slot {
                name: plan.name.clone(),
                rules: Rules::from(&plan.settings),
                breaker: Breaker::new(plan.settings.circuit.clone()),
                actor,
                hang_grace: plan.settings.hang_grace,
                shutdown_timeout: plan.settings.shutdown_timeout,
                keep: (plan.settings.queue_capacity + plan.settings.max_in_flight) as usize,
            });
        }
        ingress.set_routing(Routing::new(&patterns));
        let dispatcher = Dispatcher::new(
            options.clock.clone(),
            ledger.clone(),
            backlog,
            ingress.clone(),
            slots,
            recovered.pending,
        );
        let thread = std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || dispatcher.run(inputs_rx, events_rx))?;
        Ok((
            Self {
                ingress,
                inputs,
                dispatcher: Some(thread),
                ledger,
                names: planned.into_iter().map(|p| p.name).collect(),
            },
            failures,
        ))
    }

    /// Where messages come in.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The id of instance `name`.
    pub fn instance(&self, name: &str) -> Option<InstanceId> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| i as InstanceId)
    }

    /// The current counters and states.
    pub fn snapshot(&self) -> Snapshot {
        let (reply, answer) = bounded(1);
        if self.inputs.send(Input::Snapshot(reply)).is_err() {
            return Snapshot::default();
        }
        answer.recv().unwrap_or_default()
    }

    /// Replays dead letters: failures reset, history kept; the ones of configured instances
    /// go out again at once. Returns (back in a queue, waiting for an instance not
    /// configured).
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot do it.
    pub fn replay(&self, selection: &Selection) -> Result<(u64, u64), LedgerError> {
        let replayed = self.ledger.replay(selection, self.ingress.clock().now())?;
        let queued = replayed.pending.len() as u64;
        if queued > 0 {
            let _ = self.inputs.send(Input::Restore(replayed.pending));
        }
        Ok((queued, replayed.waiting))
    }

    /// Ends the waiting deliveries of instance `name` for good (dead letters or gone); the
    /// ones in flight finish. Works for instances not configured now too. Returns how many.
    ///
    /// # Errors
    /// [`LedgerError`] when the ledger cannot do it.
    pub fn forget(&self, name: &str, how: Forget) -> Result<u64, LedgerError> {
        match self.instance(name) {
            Some(instance) => {
                let (reply, answer) = bounded(1);
                self.inputs
                    .send(Input::Forget {
                        instance,
                        how,
                        reply,
                    })
                    .map_err(|_| LedgerError::Fatal("the dispatcher is gone".into()))?;
                answer
                    .recv()
                    .map_err(|_| LedgerError::Fatal("the dispatcher is gone".into()))
            }
            None => self.ledger.forget(name, how, self.ingress.clock().now()),
        }
    }

    /// An operator pauses an instance (nothing more is handed to it).
    pub fn pause(&self, instance: InstanceId) {
        let _ = self.inputs.send(Input::Pause(instance));
    }

    pub fn resume(&self, instance: InstanceId) {
        let _ = self.inputs.send(Input::Resume(instance));
    }

    /// Graceful stop: stop accepting, let every actor finish its call in hand, release the
    /// rest as `shutdown` (no failure), shut the instances down; after `grace`, abandon the
    /// ones still busy and name them.
    pub fn stop(mut self, grace: Duration) -> StopReport {
        self.ingress.close();
        let (reply, answer) = bounded(1);
        let report = if self
            .inputs
            .send(Input::Stop {
                deadline: grace,
                reply,
            })
            .is_ok()
        {
            answer.recv().unwrap_or_default()
        } else {
            StopReport::default()
        };
        if let Some(thread) = self.dispatcher.take() {
            let _ = thread.join();
        }
        // Everything is recorded: the next start charges nothing.
        self.ledger.close();
        report
    }
}

/// Manifest name → the libraries claiming it that passed the declared checks, their bytes
/// kept: every instance loads its copy from them without reading the file again.
fn library_index(config: &Config) -> BTreeMap<String, Vec<Checked>> {
    let policy = Policy {
        trusted_owners: config.host.trusted_owner_uids.clone(),
        ..Policy::default()
    };
    let scanned = loader::scan(&config.host.plugin_dir, &policy).unwrap_or_else(|e| {
        tracing::error!(plugin_dir = %config.host.plugin_dir.display(), error = %e, "cannot read plugin_dir");
        Vec::new()
    });
    let mut index: BTreeMap<String, Vec<Checked>> = BTreeMap::new();
    for (_, checked) in scanned {
        match checked {
            Ok(checked) => index
                .entry(checked.manifest().name.clone())
                .or_default()
                .push(checked),
            Err(e) => tracing::error!(error = %e, "library refused"),
        }
    }
    for (name, claims) in index.iter().filter(|(_, c)| c.len() > 1) {
        let paths: Vec<&Path> = claims.iter().map(Checked::path).collect();
        tracing::error!(plugin = %name, libraries = ?paths, "several libraries claim one plugin name; none is loaded");
    }
    index
}

/// The enabled instances of the configuration, then (with `autoload`) one per library no
/// entry names, in a stable order.
fn plan_instances(config: &Config, index: &BTreeMap<String, Vec<Checked>>) -> Vec<Planned> {
    let mut planned: Vec<Planned> = config
        .instances
        .values()
        .filter(|i| i.enabled)
        .map(|i| Planned {
            name: i.name.clone(),
            plugin: i.plugin.clone(),
            settings: i.settings.clone(),
            topics: i.topics.clone(),
            sha256: i.sha256,
            config: i.config.clone(),
        })
        .collect();
    if config.host.autoload {
        for name in index.keys() {
            let named = config
                .instances
                .values()
                .any(|i| &i.plugin == name || &i.name == name);
            if !named {
                planned.push(Planned {
                    name: name.clone(),
                    plugin: name.clone(),
                    settings: config.defaults.clone(),
                    topics: None,
                    sha256: None,
                    config: serde_json::json!({}),
                });
            }
        }
    }
    planned
}

/// Loads, instantiates and starts one instance; returns its actor and its library's default
/// topics.
/// What a starting instance is connected to.
struct Wiring<'a> {
    ingress: &'a Arc<Ingress>,
    events: &'a Sender<actor::Event>,
    ledger: &'a Arc<dyn Ledger>,
}

fn start_instance(
    id: InstanceId,
    plan: &Planned,
    library: Option<&Checked>,
    config: &Config,
    wiring: &Wiring<'_>,
    options: &Options,
) -> Result<(Actor, Vec<Pattern>), String> {
    let checked = library.ok_or_else(|| {
        format!(
            "no single library in {} provides plugin `{}`",
            config.host.plugin_dir.display(),
            plan.plugin
        )
    })?;
    let policy = Policy {
        trusted_owners: config.host.trusted_owner_uids.clone(),
        sha256: plan.sha256,
        probe: options.probe.clone(),
    };
    // One copy per instance (its statics are its own), from the bytes checked at the scan.
    checked.check_pin(plan.sha256).map_err(|e| e.to_string())?;
    let lib = checked.load(&policy).map_err(|e| e.to_string())?;
    let defaults = lib
        .manifest()
        .topics
        .iter()
        .filter_map(|t| Pattern::parse(t).ok())
        .collect();
    let services = InstanceServices::new(
        Identity {
            instance: plan.name.clone(),
            plugin: lib.manifest().name.clone(),
            version: lib.manifest().version.clone(),
            generation: 1,
        },
        Limits {
            max_message_size: config.host.max_message_size,
            hop_limit: config.host.hop_limit,
        },
        wiring.ingress.clone(),
    );
    let plugin = instantiate(&lib, &plan.config, &services, plan.settings.init_timeout)?;
    let actor = Actor::spawn(
        id,
        plugin,
        services,
        plan.settings.queue_capacity as usize,
        wiring.events.clone(),
        options.clock.clone(),
        wiring.ledger.marker(id),
    )
    .map_err(|e| format!("cannot start its thread: {e}"))?;
    Ok((actor, defaults))
}

/// Runs the plugin's `new` on a thread of its own, waiting at most `timeout`.
fn instantiate(
    lib: &Library,
    config: &serde_json::Value,
    services: &Arc<InstanceServices>,
    timeout: Duration,
) -> Result<loader::PluginInstance, String> {
    let (reply, answer) = bounded(1);
    let (lib, config, services) = (lib.clone(), config.to_string(), services.clone());
    std::thread::Builder::new()
        .name("plugin-new".into())
        .spawn(move || {
            let result = lib.instantiate(&config, hosting::host_handle(services));
            let _ = reply.send(result);
        })
        .map_err(|e| format!("cannot start a thread for `new`: {e}"))?;
    match answer.recv_timeout(timeout) {
        Ok(result) => result.map_err(|e: LoadError| e.to_string()),
        Err(_) => Err(format!(
            "`new` did not finish within init_timeout ({}); its thread is abandoned",
            humantime::format_duration(timeout)
        )),
    }
}
