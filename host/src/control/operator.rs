//! The `Control` service: what operators see and do, on top of the engine's owned snapshots
//! (the supervisor's view, the dispatcher's counters, the ledger) and its event hub. Calls
//! that wait on the engine run on blocking threads, never on the runtime's workers.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::pb::{self, control_server};
use crate::{
    delivery::{AttemptResult, Delivery, State},
    dispatch::InstanceStats,
    engine::Engine,
    events::Event,
    ledger::{DeadLetterFilter, Forget, LedgerError, Origin, Selection},
    loader,
    quote::quote,
    supervisor::{ActRefused, InstanceView, ReloadRefused},
};

/// How many events a `Watch` subscriber may be behind before it is ended.
pub const WATCH_BUFFER: usize = 256;

/// How many `Watch` streams may be open at once (each holds a blocking thread).
pub const MAX_WATCHERS: usize = 64;

/// How many of them one peer (a uid on the Unix socket, an IP address over TCP) may hold:
/// one peer cannot use them all up.
pub const WATCHERS_PER_PEER: usize = MAX_WATCHERS / 4;

/// How much of a payload `ShowMessage` returns.
const PREVIEW: usize = 256;

/// The most dead letters one `DeadLetters` page holds (a larger `limit` is cut to it; the
/// page says where the next one starts).
pub const MAX_PAGE: usize = 1000;

/// Sets the daemon's log filter; returns the filter now in force.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// The `Control` service of one engine.
#[derive(Clone)]
pub struct ControlService {
    engine: Arc<Engine>,
    durability: String,
    log_level: SetLogLevel,
    /// `Watch` streams open now.
    watchers: Arc<Watchers>,
}

impl std::fmt::Debug for ControlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl ControlService {
    pub fn new(engine: Arc<Engine>, durability: &str, log_level: SetLogLevel) -> Self {
        Self {
            engine,
            durability: durability.to_owned(),
            log_level,
            watchers: Arc::default(),
        }
    }

    pub fn into_server(self) -> control_server::ControlServer<Self> {
        control_server::ControlServer::new(self)
    }

    /// Runs `work` on a blocking thread with the engine.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Engine) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || work(&engine))
            .await
            .map_err(|e| Status::internal(format!("the call failed: {e}")))?
    }

    /// `Pause` and `Resume`.
    async fn set_paused(
        &self,
        request: Request<pb::InstanceRequest>,
        paused: bool,
    ) -> Result<Response<pb::InstanceResponse>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |engine| {
            engine.pause(&name, paused).map_err(|e| act_status(&e))?;
            Ok(pb::InstanceResponse {
                name,
                state: if paused { "paused" } else { "resumed" }.to_owned(),
            })
        })
        .await
        .map(Response::new)
    }
}

/// A ledger failure as a status.
fn ledger_status(e: &LedgerError) -> Status {
    match e {
        LedgerError::Full(_) => Status::resource_exhausted(e.to_string()),
        LedgerError::Unsupported(_) | LedgerError::Refused(_) | LedgerError::Unusable(_) => {
            Status::failed_precondition(e.to_string())
        }
        LedgerError::Fatal(_) | LedgerError::Corrupt(_) => Status::internal(e.to_string()),
    }
}

/// An operator's act refused, as a status.
fn act_status(e: &ActRefused) -> Status {
    match e {
        ActRefused::Configured { .. } | ActRefused::LibraryPresent { .. } => {
            Status::failed_precondition(e.to_string())
        }
        ActRefused::Unknown(_) => Status::not_found(e.to_string()),
        ActRefused::Ledger(e) => ledger_status(e),
        ActRefused::Stopping => Status::unavailable(e.to_string()),
    }
}

/// One instance's state, combining the supervisor's view and the dispatcher's counters.
fn state(view: &InstanceView, stats: Option<&InstanceStats>) -> String {
    match stats.and_then(|s| s.circuit.as_ref()) {
        Some(crate::circuit::State::Paused) if view.state == "running" => "paused".to_owned(),
        _ => view.state.to_owned(),
    }
}

fn circuit(stats: Option<&InstanceStats>) -> String {
    match stats.and_then(|s| s.circuit.as_ref()) {
        Some(crate::circuit::State::Closed) | None => "closed",
        Some(crate::circuit::State::Open { probe: None, .. }) => "open",
        Some(crate::circuit::State::Open { probe: Some(_), .. }) => "half-open",
        Some(crate::circuit::State::Paused) => "paused",
    }
    .to_owned()
}

fn attempt_result(result: Option<&AttemptResult>) -> String {
    match result {
        None => "in flight".to_owned(),
        Some(AttemptResult::Acked) => "acked".to_owned(),
        Some(AttemptResult::Failed { reason }) => format!("failed: {reason}"),
        Some(AttemptResult::Excused { reason }) => format!("failed (excused): {reason}"),
        // The reason already says "rejected: …".
        Some(AttemptResult::Rejected { reason }) => reason.clone(),
        Some(AttemptResult::Released) => "released".to_owned(),
    }
}

fn history(instance: String, dead_letter: bool, delivery: &Delivery) -> pb::DeliveryHistory {
    let state = if dead_letter {
        "dead_lettered"
    } else if matches!(delivery.state, State::InFlight { .. }) {
        "in_flight"
    } else {
        "pending"
    };
    pb::DeliveryHistory {
        instance,
        state: state.to_owned(),
        deliveries: delivery.deliveries,
        failures: delivery.failures,
        last_reason: delivery.last_reason.clone().unwrap_or_default(),
        attempts: delivery
            .history
            .iter()
            .chain(delivery.current.as_ref())
            .map(|a| pb::AttemptRecord {
                number: a.number,
                started_ms: a.started,
                ended_ms: a.ended.unwrap_or_default(),
                result: attempt_result(a.result.as_ref()),
            })
            .collect(),
    }
}

fn selection(instance: String, ids: Vec<u64>, all: bool) -> Result<Selection, Status> {
    if instance.is_empty() && ids.is_empty() && !all {
        return Err(Status::invalid_argument(
            "name an instance or message ids, or ask for all of them",
        ));
    }
    Ok(Selection {
        instance: (!instance.is_empty()).then_some(instance),
        messages: ids,
    })
}

/// Refuses (NOT_FOUND) a selection naming an instance this daemon does not know: neither
/// registered in this run nor holding dead letters. Replaying or purging it would answer 0,
/// as if a name mistyped were an instance with nothing to do.
fn known(engine: &Engine, selection: &Selection) -> Result<(), Status> {
    let Some(name) = &selection.instance else {
        return Ok(());
    };
    if engine.instance(name).is_some()
        || engine
            .ledger()
            .dead_letter_counts()
            .map_err(|e| ledger_status(&e))?
            .contains_key(name)
    {
        return Ok(());
    }
    Err(Status::not_found(format!(
        "no instance {} is subscribed, running or has dead letters",
        quote(name)
    )))
}

/// An event as the `Watch` stream carries it.
pub fn watch_event(event: &Event, snapshot: bool) -> pb::WatchEvent {
    pb::WatchEvent {
        seq: event.seq,
        at_ms: event.at,
        kind: event.kind.kind().to_owned(),
        instance: event.kind.instance().unwrap_or_default().to_owned(),
        json: event.json.to_string(),
        snapshot,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl control_server::Control for ControlService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let durability = self.durability.clone();
        self.blocking(move |engine| {
            let view = engine.supervisor().view();
            let snapshot = engine.snapshot();
            let counts = engine.ledger().counts();
            let stats = engine.ledger().stats();
            Ok(pb::StatusResponse {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: u64::from(std::process::id()),
                uptime_ms: engine.uptime().as_millis() as u64,
                config_path: view.config.display().to_string(),
                config_sha256: view.config_sha256.clone(),
                durability,
                unrouted: engine.ingress().unrouted(),
                ledger: Some(pb::LedgerStatus {
                    accepted: counts.accepted,
                    acked: counts.acked,
                    dead_lettered: counts.dead_lettered,
                    commits: stats.commits,
                    fsyncs: stats.fsyncs,
                    commit_us: stats.latency_us.to_vec(),
                    lost: engine.lost().map(|lost| pb::LedgerLoss {
                        first_id: lost.first,
                        last_id: lost.last,
                    }),
                }),
                instances: view
                    .instances
                    .iter()
                    .map(|v| {
                        let s = snapshot.instances.iter().find(|s| s.name == v.name);
                        pb::InstanceSummary {
                            name: v.name.clone(),
                            state: state(v, s),
                            backlog: s.map_or(0, |s| s.backlog),
                            in_flight: s.map_or(0, |s| s.in_flight),
                            calling: s.map_or(0, |s| s.calling),
                        }
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn instances(
        &self,
        _: Request<pb::InstancesRequest>,
    ) -> Result<Response<pb::InstancesResponse>, Status> {
        self.blocking(|engine| {
            let view = engine.supervisor().view();
            let snapshot = engine.snapshot();
            let dead_letters = engine
                .ledger()
                .dead_letter_counts()
                .map_err(|e| ledger_status(&e))?;
            Ok(pb::InstancesResponse {
                instances: view
                    .instances
                    .iter()
                    .map(|v| {
                        let s = snapshot.instances.iter().find(|s| s.name == v.name);
                        let backlog = s.map_or(0, |s| s.backlog);
                        let in_flight = s.map_or(0, |s| s.in_flight);
                        pb::InstanceDetail {
                            name: v.name.clone(),
                            state: state(v, s),
                            plugin: v.plugin.clone(),
                            version: v.version.clone(),
                            generation: v.generation,
                            draining: v.draining.clone(),
                            library: v
                                .library
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            sha256: v.sha256.clone().unwrap_or_default(),
                            queue_depth: backlog.saturating_sub(in_flight),
                            backlog,
                            backlog_bytes: v.backlog_bytes,
                            in_flight,
                            acked: s.map_or(0, |s| s.acked),
                            failures: s.map_or(0, |s| s.failures),
                            dead_lettered: s.map_or(0, |s| s.dead_lettered),
                            circuit: circuit(s),
                            hung: s.is_some_and(|s| s.hung),
                            last_error: v.last_error.clone().unwrap_or_default(),
                            topics: v.topics.clone(),
                            subscription: match v.subscribed {
                                Some(Origin::Configured) => "configured",
                                Some(Origin::Autoloaded) => "autoloaded",
                                None => "",
                            }
                            .to_owned(),
                            topics_known: v.topics_known,
                            calling: s.map_or(0, |s| s.calling),
                            paused: matches!(
                                s.and_then(|s| s.circuit.as_ref()),
                                Some(crate::circuit::State::Paused)
                            ),
                            dead_letters: dead_letters.get(&v.name).copied().unwrap_or(0),
                        }
                    })
                    .collect(),
                retained: loader::retained()
                    .into_iter()
                    .map(|r| pb::RetainedLibrary {
                        plugin: r.name,
                        version: r.version,
                        origin: r.origin.display().to_string(),
                        size: r.size,
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn show_message(
        &self,
        request: Request<pb::ShowMessageRequest>,
    ) -> Result<Response<pb::ShowMessageResponse>, Status> {
        let id = request.into_inner().id;
        self.blocking(move |engine| {
            let ledger = engine.ledger();
            let message = ledger.load(id).map_err(|e| ledger_status(&e))?;
            let deliveries = ledger.history(id).map_err(|e| ledger_status(&e))?;
            let Some(message) = message else {
                let next = engine.ingress().next_id();
                return Err(Status::not_found(if id >= next {
                    format!("no message {id} has been accepted yet (the next id is {next})")
                } else {
                    format!(
                        "message {id} was accepted and is no longer in the ledger: every \
                         delivery of it ended (acked, or purged by an operator) and its record \
                         was removed — or it matched no instance and was never stored"
                    )
                }));
            };
            Ok(pb::ShowMessageResponse {
                id,
                topic: message.topic.clone(),
                headers: message
                    .headers
                    .iter()
                    .map(|(name, value)| pb::Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                payload_size: message.payload.len() as u64,
                payload_preview: message.payload.slice(..message.payload.len().min(PREVIEW)),
                published_ms: message.publish_time.0,
                deliveries: deliveries
                    .into_iter()
                    .map(|h| history(h.instance, h.dead_letter, &h.delivery))
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let request = request.into_inner();
        let expected = if request.expected_sha256.is_empty() {
            None
        } else {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&request.expected_sha256, &mut hash).map_err(|e| {
                Status::invalid_argument(format!(
                    "expected_sha256 {} is not a hex SHA-256: {e}",
                    quote(&request.expected_sha256)
                ))
            })?;
            Some(hash)
        };
        let instance = (!request.instance.is_empty()).then_some(request.instance);
        self.blocking(move |engine| {
            let applied = engine
                .supervisor()
                .reload(expected, instance)
                .map_err(|e| match e {
                    ReloadRefused::Invalid(_) => Status::invalid_argument(e.to_string()),
                    ReloadRefused::Changed { .. } => Status::aborted(e.to_string()),
                    ReloadRefused::UnknownInstance(_) => Status::not_found(e.to_string()),
                    ReloadRefused::Stopping => Status::unavailable(e.to_string()),
                })?;
            Ok(pb::ReloadResponse {
                config_sha256: applied.sha256,
                changes: applied
                    .plan
                    .instances
                    .iter()
                    .map(|(name, change)| pb::InstanceChange {
                        instance: name.clone(),
                        change: change.action().to_owned(),
                    })
                    .collect(),
                restart_required: applied
                    .plan
                    .restart_required
                    .iter()
                    .map(|k| (*k).to_owned())
                    .collect(),
                failures: applied
                    .failures
                    .into_iter()
                    .map(|f| pb::InstanceFailure {
                        instance: f.instance,
                        error: f.error.to_string(),
                    })
                    .collect(),
            })
        })
        .await
        .map(Response::new)
    }

    async fn pause(
        &self,
        request: Request<pb::InstanceRequest>,
    ) -> Result<Response<pb::InstanceResponse>, Status> {
        self.set_paused(request, true).await
    }

    async fn resume(
        &self,
        request: Request<pb::InstanceRequest>,
    ) -> Result<Response<pb::InstanceResponse>, Status> {
        self.set_paused(request, false).await
    }

    async fn dead_letters(
        &self,
        request: Request<pb::DeadLettersRequest>,
    ) -> Result<Response<pb::DeadLettersResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            (r.limit as usize).min(MAX_PAGE)
        };
        let filter = DeadLetterFilter {
            instance: (!r.instance.is_empty()).then_some(r.instance),
            after: (r.after_id > 0 || !r.after_instance.is_empty())
                .then_some((r.after_id, r.after_instance)),
            // One more than asked: whether there is a next page.
            limit: limit + 1,
        };
        self.blocking(move |engine| {
            let mut list = engine
                .ledger()
                .dead_letters(&filter)
                .map_err(|e| ledger_status(&e))?;
            let more = list.len() > limit;
            list.truncate(limit);
            let (next_id, next_instance) = match (more, list.last()) {
                (true, Some(last)) => (last.message, last.instance.clone()),
                _ => (0, String::new()),
            };
            Ok(pb::DeadLettersResponse {
                dead_letters: list
                    .into_iter()
                    .map(|d| pb::DeadLetterEntry {
                        id: d.message,
                        instance: d.instance,
                        topic: d.topic,
                        at_ms: d.at,
                        deliveries: d.delivery.deliveries,
                        failures: d.delivery.failures,
                        reason: d.delivery.last_reason.unwrap_or_default(),
                    })
                    .collect(),
                next_id,
                next_instance,
            })
        })
        .await
        .map(Response::new)
    }

    async fn replay(
        &self,
        request: Request<pb::SelectionRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        let r = request.into_inner();
        let selection = selection(r.instance, r.ids, r.all)?;
        self.blocking(move |engine| {
            known(engine, &selection)?;
            let (queued, waiting) = engine.replay(&selection).map_err(|e| ledger_status(&e))?;
            Ok(pb::ReplayResponse { queued, waiting })
        })
        .await
        .map(Response::new)
    }

    async fn purge(
        &self,
        request: Request<pb::SelectionRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let r = request.into_inner();
        let selection = selection(r.instance, r.ids, r.all)?;
        self.blocking(move |engine| {
            known(engine, &selection)?;
            let count = engine
                .ledger()
                .purge(&selection)
                .map_err(|e| ledger_status(&e))?;
            Ok(pb::CountResponse { count })
        })
        .await
        .map(Response::new)
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let r = request.into_inner();
        if r.instance.is_empty() {
            return Err(Status::invalid_argument("name the instance to forget"));
        }
        let how = if r.purge {
            Forget::Purge
        } else {
            Forget::DeadLetter
        };
        self.blocking(move |engine| {
            let count = engine
                .forget(&r.instance, how)
                .map_err(|e| act_status(&e))?;
            Ok(pb::CountResponse { count })
        })
        .await
        .map(Response::new)
    }

    async fn set_log_level(
        &self,
        request: Request<pb::LogLevelRequest>,
    ) -> Result<Response<pb::LogLevelResponse>, Status> {
        let level = request.into_inner().level;
        let now = (self.log_level)(&level).map_err(Status::invalid_argument)?;
        tracing::info!(level = %now, "log level changed");
        Ok(Response::new(pb::LogLevelResponse { level: now }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request
            .extensions()
            .get::<super::server::Peer>()
            .map_or_else(
                || "an unknown peer".to_owned(),
                super::server::Peer::identity,
            );
        // Counted until the thread below ends, however it ends.
        let open = self.watchers.enter(peer)?;
        let subscription = self.engine.events().subscribe(WATCH_BUFFER);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // A blocking thread moves events from the hub to the stream; when the client reads
        // too slowly both buffers fill, the hub drops the subscriber, and the stream ends
        // with RESOURCE_EXHAUSTED — never a silent gap.
        tokio::task::spawn_blocking(move || {
            let _open = open;
            for event in &subscription.history {
                if tx.blocking_send(Ok(watch_event(event, true))).is_err() {
                    return;
                }
            }
            loop {
                match subscription.events.recv_timeout(Duration::from_millis(500)) {
                    Ok(event) => {
                        if tx.blocking_send(Ok(watch_event(&event, false))).is_err() {
                            return;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                        let end = if subscription.lagged() {
                            Status::resource_exhausted(format!(
                                "this watcher fell more than {WATCH_BUFFER} events behind; \
                                 watch again (the snapshot comes first)"
                            ))
                        } else {
                            Status::unavailable("the daemon is shutting down")
                        };
                        let _ = tx.blocking_send(Err(end));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The `Watch` streams open, in all and per peer.
#[derive(Debug, Default)]
struct Watchers {
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// One open `Watch` stream; counted until dropped.
#[derive(Debug)]
struct Watching(Arc<Watchers>, String);

impl Watchers {
    /// Counts a stream of `peer`, within [`MAX_WATCHERS`] and [`WATCHERS_PER_PEER`].
    #[allow(clippy::result_large_err)]
    fn enter(self: &Arc<Self>, peer: String) -> Result<Watching, Status> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per_peer) = &mut *open;
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= WATCHERS_PER_PEER {
            return Err(Status::resource_exhausted(format!(
                "{peer} has {mine} Watch streams open, the most one peer may hold (of \
                 {MAX_WATCHERS} in all); end one first"
            )));
        }
        if *total >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} watchers are open already; try again when one ends"
            )));
        }
        *total += 1;
        *per_peer.entry(peer.clone()).or_default() += 1;
        Ok(Watching(self.clone(), peer))
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut open = self
            .0
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, per_peer) = &mut *open;
        *total -= 1;
        if let Some(mine) = per_peer.get_mut(&self.1) {
            *mine -= 1;
            if *mine == 0 {
                per_peer.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_holds_at_most_its_share_and_all_peers_the_limit() {
        let watchers = Arc::new(Watchers::default());
        let mut held = Vec::new();
        for _ in 0..WATCHERS_PER_PEER {
            held.push(watchers.enter("uid 7".into()).unwrap());
        }
        let refused = watchers.enter("uid 7".into()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("uid 7 has 16"), "{refused:?}");
        for peer in 1..MAX_WATCHERS / WATCHERS_PER_PEER {
            for _ in 0..WATCHERS_PER_PEER {
                held.push(watchers.enter(format!("uid {peer}")).unwrap());
            }
        }
        let full = watchers.enter("uid 99".into()).unwrap_err();
        assert!(full.message().contains("64 watchers are open"), "{full:?}");
        held.pop();
        held.push(watchers.enter("uid 99".into()).unwrap());
        drop(held);
        assert_eq!(watchers.open.lock().unwrap().0, 0);
        assert!(watchers.open.lock().unwrap().1.is_empty());
    }
}
