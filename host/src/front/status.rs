//! What the daemon and each instance are doing, as one typed, joined picture: the
//! supervisor's view (lifecycle, plugin, library, topics) and the dispatcher's counters
//! (backlog, calls, circuit) joined by instance name, here and nowhere else.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

pub use crate::{circuit::CircuitState, supervisor::InstanceState, words::UnknownState};
use crate::{
    config::Durability,
    dispatch::{InstanceStats, Snapshot},
    ledger::{CommitStats, Counts, Lost, Origin},
    loader::RetainedLibrary,
    outcomes::Outcomes,
    supervisor::{InstanceView, SupervisorView},
};

/// The state of an instance from the supervisor's view and its circuit: a running
/// instance whose circuit an operator paused is [`InstanceState::Paused`].
fn join_state(view: &InstanceView, circuit: CircuitState) -> InstanceState {
    match (view.state, circuit) {
        (InstanceState::Running, CircuitState::Paused) => InstanceState::Paused,
        (lifecycle, _) => lifecycle,
    }
}

/// One instance: everything the daemon knows of it, joined.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceStatus {
    pub name: String,
    pub state: InstanceState,
    pub circuit: CircuitState,
    /// How it is subscribed (`None`: its subscription ended).
    pub subscription: Option<Origin>,
    /// Whether its topics are known (`false` while it takes them from a library never
    /// loaded: nothing is routed to it yet).
    pub topics_known: bool,
    pub topics: Vec<String>,
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
    /// Deliveries waiting or in flight.
    pub backlog: u64,
    /// Payload bytes of those.
    pub backlog_bytes: u64,
    /// Hand-offs leased to its actor (in its mailbox or in a call).
    pub in_flight: u64,
    /// Calls to its plugin code in progress now.
    pub calling: u64,
    /// Deferred attempts outstanding (tokens taken, not yet settled or expired).
    pub deferred: u64,
    /// Attempts handed to its actor since the start.
    pub handed_out: u64,
    /// Attempts by how they ended since the start (crashes: charged at this start).
    pub outcomes: Outcomes,
    /// Attempts acked (`outcomes.ack`).
    pub acked: u64,
    /// Failures charged (a failure the circuit excused is not).
    pub failures: u64,
    pub dead_lettered: u64,
    /// Its `max_backlog`, in bytes (0: not registered).
    pub max_backlog: u64,
    /// A call outlived its lease and is still running.
    pub hung: bool,
    /// Its dead letters in the ledger (`None`: not counted; a status does not ask the
    /// ledger).
    pub dead_letters: Option<u64>,
}

impl InstanceStatus {
    /// Deliveries waiting for their turn (the backlog less what is in flight).
    pub fn queue_depth(&self) -> u64 {
        self.backlog.saturating_sub(self.in_flight)
    }

    /// Whether an operator paused it (running or not).
    pub fn paused(&self) -> bool {
        self.circuit == CircuitState::Paused
    }

    /// The join of one instance's view and its dispatcher counters (`None`: the dispatcher
    /// has no slot for it yet).
    fn join(
        view: &InstanceView,
        stats: Option<&InstanceStats>,
        dead_letters: Option<&BTreeMap<String, u64>>,
        start: &StartFacts<'_>,
    ) -> Self {
        let circuit = CircuitState::from(stats.and_then(|s| s.circuit.as_ref()));
        let count = |f: fn(&InstanceStats) -> u64| stats.map_or(0, f);
        let outcomes = Outcomes {
            crash: start.crashed.get(&view.name).copied().unwrap_or(0),
            ..stats.map(|s| s.outcomes).unwrap_or_default()
        };
        Self {
            name: view.name.clone(),
            state: join_state(view, circuit),
            circuit,
            subscription: view.subscribed,
            topics_known: view.topics_known,
            topics: view.topics.clone(),
            plugin: view.plugin.clone(),
            version: view.version.clone(),
            generation: view.generation,
            draining: view.draining.clone(),
            library: view.library.clone(),
            sha256: view.sha256.clone(),
            last_error: view.last_error.clone(),
            backlog: count(|s| s.backlog),
            backlog_bytes: view.backlog_bytes,
            in_flight: count(|s| s.in_flight),
            calling: count(|s| s.calling),
            deferred: count(|s| s.deferred),
            handed_out: count(|s| s.handed_out),
            acked: outcomes.ack,
            outcomes,
            failures: count(|s| s.failures),
            dead_lettered: count(|s| s.dead_lettered),
            max_backlog: (start.max_backlog)(&view.name).unwrap_or(0),
            hung: stats.is_some_and(|s| s.hung),
            dead_letters: dead_letters.map(|d| d.get(&view.name).copied().unwrap_or(0)),
        }
    }
}

/// What the engine knows of each instance beside the supervisor's view and the dispatcher's
/// counters.
pub(super) struct StartFacts<'a> {
    /// Attempts charged `crash` at start, by instance.
    pub(super) crashed: &'a BTreeMap<String, u64>,
    /// An instance's `max_backlog`.
    pub(super) max_backlog: &'a dyn Fn(&str) -> Option<u64>,
}

/// Every instance the supervisor shows, in its order (by name), joined with the
/// dispatcher's counters (and the dead letters, when counted).
pub(super) fn join(
    view: &SupervisorView,
    snapshot: &Snapshot,
    dead_letters: Option<&BTreeMap<String, u64>>,
    start: &StartFacts<'_>,
) -> Vec<InstanceStatus> {
    let stats: HashMap<&str, &InstanceStats> = snapshot
        .instances
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    view.instances
        .iter()
        .map(|v| InstanceStatus::join(v, stats.get(v.name.as_str()).copied(), dead_letters, start))
        .collect()
}

/// The ledger's part of a status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerStatus {
    /// What it recorded since start.
    pub counts: Counts,
    /// How its group commit goes.
    pub commits: CommitStats,
    /// Messages answered OK that it no longer held at start, if any.
    pub lost: Option<Lost>,
}

/// The daemon at a glance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DaemonStatus {
    pub version: &'static str,
    pub pid: u32,
    pub uptime: Duration,
    /// The configuration running (the last good one).
    pub config_path: PathBuf,
    pub config_sha256: String,
    pub durability: Durability,
    /// Publishes that matched no instance since start.
    pub unrouted: u64,
    pub ledger: LedgerStatus,
    /// Every instance (without its dead letters: a status does not ask the ledger for them).
    pub instances: Vec<InstanceStatus>,
}

/// What the metrics show, read at once ([`Front::observe`](super::Front::observe)).
#[derive(Debug, Clone)]
pub struct Observation {
    /// The same status `ctl status` shows.
    pub status: DaemonStatus,
    /// The libraries still mapped after their unload.
    pub retained: Vec<RetainedLibrary>,
    /// Events since the start, by kind.
    pub events: Vec<(&'static str, u64)>,
    /// Watch streams open now.
    pub watchers: u64,
    /// Each instance's histograms, by name.
    pub histograms: Vec<(String, crate::metrics::InstanceHistograms)>,
}

/// Every instance in full, and the libraries still mapped after their unload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instances {
    pub instances: Vec<InstanceStatus>,
    pub retained: Vec<RetainedLibrary>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit;

    fn view(name: &str, state: InstanceState) -> InstanceView {
        InstanceView {
            name: name.into(),
            state,
            ..InstanceView::default()
        }
    }

    fn stats(name: &str, circuit: Option<circuit::BreakerState>) -> InstanceStats {
        InstanceStats {
            name: name.into(),
            running: true,
            generation: 1,
            handed_out: 6,
            outcomes: Outcomes {
                ack: 3,
                retry: 1,
                ..Outcomes::default()
            },
            failures: 1,
            dead_lettered: 0,
            backlog: 5,
            resident: 5,
            in_flight: 2,
            calling: 1,
            deferred: 0,
            circuit,
            hung: false,
        }
    }

    #[test]
    fn a_state_reads_back_as_the_word_it_writes() {
        for state in InstanceState::ALL {
            if state == InstanceState::Paused {
                continue;
            }
            let v = view("a", state);
            assert_eq!(join_state(&v, CircuitState::Closed), state);
            assert_eq!(state.to_string(), state.name());
            assert_eq!(state.name().parse(), Ok(state), "the word reads back");
        }
    }

    #[test]
    fn a_paused_circuit_shows_a_running_instance_as_paused_and_no_other() {
        let running = view("a", InstanceState::Running);
        let failed = view("a", InstanceState::Failed);
        assert_eq!(
            join_state(&running, CircuitState::Paused),
            InstanceState::Paused
        );
        assert_eq!(
            join_state(&failed, CircuitState::Paused),
            InstanceState::Failed
        );
    }

    #[test]
    fn circuits_are_named_as_operators_see_them() {
        let open = circuit::BreakerState::Open {
            next_probe: 1,
            probe: None,
        };
        let probing = circuit::BreakerState::Open {
            next_probe: 1,
            probe: Some(7),
        };
        let names: Vec<String> = [
            None,
            Some(&circuit::BreakerState::Closed),
            Some(&open),
            Some(&probing),
            Some(&circuit::BreakerState::Paused),
        ]
        .into_iter()
        .map(|s| CircuitState::from(s).to_string())
        .collect();
        assert_eq!(names, ["closed", "closed", "open", "half-open", "paused"]);
    }

    #[test]
    fn the_join_matches_by_name_and_counts_nothing_it_does_not_know() {
        let supervisor = SupervisorView {
            instances: vec![
                view("a", InstanceState::Running),
                view("b", InstanceState::Stopped),
            ],
            ..SupervisorView::default()
        };
        let snapshot = Snapshot {
            instances: vec![stats("a", Some(circuit::BreakerState::Paused))],
            stale: 0,
        };
        let counted = BTreeMap::from([("a".to_owned(), 4)]);
        let crashed = BTreeMap::from([("b".to_owned(), 2)]);
        let limits = |name: &str| (name == "a").then_some(1000);
        let start = StartFacts {
            crashed: &crashed,
            max_backlog: &limits,
        };
        let joined = join(&supervisor, &snapshot, Some(&counted), &start);
        assert_eq!(joined[0].state, InstanceState::Paused);
        assert!(joined[0].paused());
        assert_eq!(joined[0].queue_depth(), 3);
        assert_eq!(joined[0].dead_letters, Some(4));
        assert_eq!(joined[1].state, InstanceState::Stopped);
        assert_eq!((joined[1].backlog, joined[1].acked), (0, 0));
        assert_eq!(joined[1].circuit, CircuitState::Closed);
        assert_eq!(joined[1].dead_letters, Some(0));
        assert_eq!(
            (
                joined[0].acked,
                joined[0].outcomes.retry,
                joined[0].handed_out
            ),
            (3, 1, 6),
            "the dispatcher's counters, one source for the status and the metrics"
        );
        assert_eq!(joined[0].max_backlog, 1000);
        assert_eq!(
            joined[1].outcomes.crash, 2,
            "crashes charged at start are joined"
        );
        assert_eq!(joined[1].max_backlog, 0);
        assert_eq!(
            join(&supervisor, &snapshot, None, &start)[0].dead_letters,
            None
        );
    }
}
