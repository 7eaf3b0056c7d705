//! One plugin generation: loaded, instantiated off the supervisor's loop with
//! `init_timeout`, run by an actor of its own; later drained and retired on a thread of its
//! own.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Sender, bounded};
use plugind_api::hosting::{self, ConfigProblem};

use crate::{
    actor::{self, Actor, JoinOutcome},
    background,
    clock::Clock,
    events::Retirement,
    ledger::Ledger,
    loader::{self, Checked, Library, LoadError, Policy, Retired},
    quarantine::Quarantine,
    routing::InstanceId,
    services::{Identity, InstanceServices, PublishLimits},
};

use super::{StartError, desired::Want};

/// What a generation is made of: equal keys, equal generation (nothing to do).
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub sha256: [u8; 32],
    pub config: serde_json::Value,
}

/// A generation that runs.
#[derive(Debug)]
pub struct Generation {
    pub number: u32,
    pub key: Key,
    pub path: PathBuf,
    pub version: String,
    pub library: Library,
    /// When its quarantine marker was armed, until it is disarmed.
    pub armed: Option<Instant>,
}

impl Generation {
    /// Whether its quarantine marker may go for time alone (its first call disarms it
    /// sooner: `SupervisorCommand::FirstCall`).
    pub fn ran_for(&self, after: Duration) -> bool {
        self.armed.is_some_and(|t| t.elapsed() >= after)
    }
}

/// What a new generation is started with: the ingress (its publishes), the dispatcher's actor
/// events, the ledger (its in-flight marker), the clock, the load policy and the limits of its
/// host services.
#[allow(missing_debug_implementations)]
pub struct GenerationDeps<'a> {
    pub ingress: &'a Arc<crate::ingress::Ingress>,
    pub events: &'a Sender<actor::ActorEvent>,
    pub ledger: &'a Arc<dyn Ledger>,
    pub clock: &'a Arc<dyn Clock>,
    pub policy: Policy,
    pub limits: PublishLimits,
    /// The instance's deferred attempts.
    pub deferrals: &'a Arc<crate::deferred::Deferrals>,
    /// The `plugins.toml` the instance comes from (a config the plugin refuses is shown in
    /// it).
    pub config_file: &'a std::path::Path,
}

/// Loads `checked` for instance `name` as generation `number`, instantiates it and starts
/// its actor (for the dispatcher; the generation stays with the supervisor). The quarantine
/// marker is armed before anything of the library runs and moves on when `new` returned;
/// `first_call` runs on the actor's thread when its first call came back (the supervisor
/// disarms the marker then); a clean failure of `new` disarms it here.
///
/// # Errors
/// [`StartError`]: why it could not start, for the report; nothing of it is left running.
#[allow(clippy::too_many_arguments)]
pub fn start(
    id: InstanceId,
    name: &str,
    number: u32,
    want: &Want,
    checked: &Checked,
    wiring: &GenerationDeps<'_>,
    quarantine: &mut Quarantine,
    mut first_call: Option<actor::FirstCall>,
) -> Result<(Generation, Actor), StartError> {
    checked
        .check_pin(want.pin)
        .map_err(|e| StartError::Pin(Arc::new(e)))?;
    let sha256 = checked.sha256();
    // Without a marker (a full disk, say) the library still loads: crash-loop protection
    // is lost for this load, the service is not.
    let armed = match quarantine.arm(&sha256, name) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(instance = name, error = %e, "cannot write the loading marker under the state dir; loading without quarantine protection");
            false
        }
    };
    let started = (|| {
        let policy = Policy {
            sha256: want.pin,
            ..wiring.policy.clone()
        };
        let library =
            background::run(|| checked.load(&policy)).map_err(|e| StartError::Load(Arc::new(e)))?;
        let services = InstanceServices::new(
            Identity {
                instance: name.to_owned(),
                plugin: library.manifest().name.clone(),
                version: library.manifest().version.clone(),
                generation: u64::from(number),
            },
            wiring.limits,
            wiring.ingress.clone(),
        )
        .with_workers(want.settings.workers);
        let plugin = instantiate(
            &library,
            &want.config,
            &services,
            want.settings.init_timeout,
        )
        .map_err(|e| match e {
            Instantiated::Refused(problem) => StartError::Config {
                file: wiring.config_file.to_owned(),
                problem: crate::config::plugin_config_problem(
                    &std::fs::read_to_string(wiring.config_file).unwrap_or_default(),
                    name,
                    &problem.path,
                    &problem.message,
                ),
            },
            Instantiated::Failed(e) => e,
        })?;
        if armed && let Err(e) = quarantine.started(&sha256, name) {
            tracing::warn!(instance = name, error = %e, "cannot update the loading marker");
        }
        // The marker goes as soon as plugin code came back from its first call.
        let first_call = if armed { first_call.take() } else { None };
        let ledger = wiring.ledger.clone();
        let actor = Actor::spawn(
            plugin,
            services,
            actor::ActorDeps {
                instance: id,
                generation: number,
                capacity: want.settings.queue_capacity as usize,
                events: wiring.events.clone(),
                clock: wiring.clock.clone(),
                marker: wiring.ledger.marker(id),
                markers: Arc::new(move || ledger.marker(id)),
                deferrals: wiring.deferrals.clone(),
                first_call,
            },
        )
        .map_err(|e| StartError::ActorThread(Arc::new(e)))?;
        Ok((library, actor))
    })();
    match started {
        Ok((library, actor)) => Ok((
            Generation {
                number,
                key: Key {
                    sha256,
                    config: want.config.clone(),
                },
                path: checked.path().to_owned(),
                version: library.manifest().version.clone(),
                library,
                armed: armed.then(Instant::now),
            },
            actor,
        )),
        Err(e) => {
            if armed {
                quarantine.disarm(&sha256, name);
            }
            Err(e)
        }
    }
}

/// Why [`instantiate`] did not give an instance.
enum Instantiated {
    /// The plugin refused its config when asked first (plugind-api 1.1).
    Refused(ConfigProblem),
    Failed(StartError),
}

/// Runs the plugin's `new` on a thread of its own, waiting at most `timeout`; a plugin that
/// can check its config without starting (plugind-api 1.1) is asked first.
fn instantiate(
    lib: &Library,
    config: &serde_json::Value,
    services: &Arc<InstanceServices>,
    timeout: Duration,
) -> Result<loader::PluginInstance, Instantiated> {
    let (reply, answer) = bounded(1);
    let (lib, config, services) = (lib.clone(), config.to_string(), services.clone());
    std::thread::Builder::new()
        .name("plugin-new".into())
        .spawn(move || {
            background::lower_this_thread();
            let result = match lib.check_config(&config) {
                Some(Err(problem)) => Err(Instantiated::Refused(problem)),
                _ => lib
                    .instantiate(&config, hosting::host_handle(services))
                    .map_err(|e: LoadError| Instantiated::Failed(StartError::New(Arc::new(e)))),
            };
            let _ = reply.send(result);
        })
        .map_err(|e| Instantiated::Failed(StartError::NewThread(Arc::new(e))))?;
    match answer.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(Instantiated::Failed(StartError::InitTimeout(timeout))),
    }
}

/// Waits for a replaced or stopped generation on a thread of its own: it finishes its call
/// in hand (at most `deadlines`), runs its plugin's `shutdown`, and its library is unloaded
/// when nothing holds it any more; `done` gets how it went.
pub fn retire(
    actor: Actor,
    generation: Generation,
    deadlines: actor::Deadlines,
    clock: Arc<dyn Clock>,
    done: impl FnOnce(Retirement) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("retire#{}", generation.number))
        .spawn(move || {
            background::lower_this_thread();
            let how = match actor.join(deadlines, clock.as_ref()) {
                JoinOutcome::Abandoned { .. } => Retirement::Abandoned,
                JoinOutcome::Joined => match generation.library.retire() {
                    Retired::Unloaded => Retirement::Unloaded,
                    // Held elsewhere (an abandoned `new`), or mapped for good: retained.
                    Retired::Retained | Retired::InUse => Retirement::Retained,
                },
            };
            done(how);
        })
}
