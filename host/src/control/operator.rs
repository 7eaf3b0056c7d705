//! The `Control` service: request → [front](crate::front) call → response. It maps
//! protobuf to the front's typed calls and back, and keeps what belongs to the transport:
//! who may open how many `Watch` streams. Calls that wait on the engine run on blocking
//! threads, never on the runtime's workers.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{
    code,
    pb::{self, control_server},
};
use crate::{
    events::Event,
    front::{
        Applied, Cursor, DaemonStatus, DeadLetterPage, DeliveryHistory, Forget, Front,
        InstanceStatus, Instances, MessageHistory, OperateError, OutcomeKind, PageRequest, Pick,
        WatchStep,
    },
    quote::quote,
};

/// How many `Watch` streams may be open at once (each holds a blocking thread).
pub const MAX_WATCHERS: usize = 64;

/// How many of them one peer (a uid on the Unix socket, an IP address over TCP) may hold:
/// one peer cannot use them all up.
pub const WATCHERS_PER_PEER: usize = MAX_WATCHERS / 4;

/// How often a `Watch` thread with nothing to send checks whether its client is gone.
const WATCH_CHECK: Duration = Duration::from_millis(500);

/// The `Control` service on one front.
#[derive(Debug, Clone)]
pub struct ControlService {
    front: Front,
    /// `Watch` streams open now.
    watchers: Arc<Watchers>,
}

impl ControlService {
    pub fn new(front: Front) -> Self {
        Self {
            front,
            watchers: Arc::default(),
        }
    }

    pub fn into_server(self) -> control_server::ControlServer<Self> {
        control_server::ControlServer::new(self)
    }

    /// Runs `call` on a blocking thread with the front; its error becomes a status.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Front) -> Result<T, OperateError> + Send + 'static,
    ) -> Result<T, Status> {
        let front = self.front.clone();
        tokio::task::spawn_blocking(move || call(&front))
            .await
            .map_err(|e| Status::internal(format!("the call failed: {e}")))?
            .map_err(|e| code::operate(&e))
    }

    /// `Pause` and `Resume`.
    async fn set_paused(
        &self,
        request: Request<pb::InstanceRequest>,
        paused: bool,
    ) -> Result<Response<pb::InstanceResponse>, Status> {
        let name = request.into_inner().name;
        self.blocking(move |front| {
            front.pause(&name, paused)?;
            Ok(pb::InstanceResponse {
                name,
                state: if paused { "paused" } else { "resumed" }.to_owned(),
            })
        })
        .await
        .map(Response::new)
    }
}

/// The daemon's status as protobuf.
fn status_response(status: DaemonStatus) -> pb::StatusResponse {
    let DaemonStatus {
        version,
        pid,
        uptime,
        config_path,
        config_sha256,
        durability,
        unrouted,
        ledger,
        instances,
    } = status;
    pb::StatusResponse {
        version: version.to_owned(),
        pid: u64::from(pid),
        uptime_ms: uptime.as_millis() as u64,
        config_path: config_path.display().to_string(),
        config_sha256,
        durability: durability.to_string(),
        unrouted,
        ledger: Some(pb::LedgerStatus {
            accepted: ledger.counts.accepted,
            acked: ledger.counts.acked,
            dead_lettered: ledger.counts.dead_lettered,
            commits: ledger.commits.commits,
            fsyncs: ledger.commits.fsyncs,
            commit_us: ledger.commits.latency_us.to_vec(),
            lost: ledger.lost.map(|lost| pb::LedgerLoss {
                first_id: lost.first,
                last_id: lost.last,
            }),
        }),
        instances: instances
            .into_iter()
            .map(|i| pb::InstanceSummary {
                state: i.state.to_string(),
                backlog: i.backlog,
                in_flight: i.in_flight,
                calling: i.calling,
                name: i.name,
            })
            .collect(),
    }
}

/// One instance in full as protobuf: the one mapping of [`InstanceStatus`] to
/// `InstanceDetail`.
fn instance_detail(i: InstanceStatus) -> pb::InstanceDetail {
    pb::InstanceDetail {
        state: i.state.to_string(),
        circuit: i.circuit.to_string(),
        paused: i.paused(),
        queue_depth: i.queue_depth(),
        subscription: i.subscription.map(|o| o.to_string()).unwrap_or_default(),
        library: i
            .library
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        sha256: i.sha256.unwrap_or_default(),
        last_error: i.last_error.unwrap_or_default(),
        dead_letters: i.dead_letters.unwrap_or_default(),
        name: i.name,
        plugin: i.plugin,
        version: i.version,
        generation: i.generation,
        draining: i.draining,
        backlog: i.backlog,
        backlog_bytes: i.backlog_bytes,
        in_flight: i.in_flight,
        acked: i.acked,
        failures: i.failures,
        dead_lettered: i.dead_lettered,
        hung: i.hung,
        topics: i.topics,
        topics_known: i.topics_known,
        calling: i.calling,
        deferred: i.deferred,
        handed_out: i.handed_out,
        outcomes: OutcomeKind::ALL
            .into_iter()
            .map(|kind| (kind.name().to_owned(), i.outcomes.get(kind)))
            .collect(),
        max_backlog: i.max_backlog,
    }
}

fn instances_response(instances: Instances) -> pb::InstancesResponse {
    pb::InstancesResponse {
        instances: instances
            .instances
            .into_iter()
            .map(instance_detail)
            .collect(),
        retained: instances
            .retained
            .into_iter()
            .map(|r| pb::RetainedLibrary {
                plugin: r.name,
                version: r.version,
                origin: r.origin.display().to_string(),
                size: r.size,
            })
            .collect(),
    }
}

fn delivery_history(d: DeliveryHistory) -> pb::DeliveryHistory {
    pb::DeliveryHistory {
        state: d.stage.to_string(),
        instance: d.instance,
        deliveries: d.deliveries,
        failures: d.failures,
        last_reason: d.last_reason.unwrap_or_default(),
        attempts: d
            .attempts
            .into_iter()
            .map(|a| pb::AttemptRecord {
                number: a.number,
                started_ms: a.started,
                ended_ms: a.ended.unwrap_or_default(),
                result: a.outcome.to_string(),
            })
            .collect(),
    }
}

fn message_response(m: MessageHistory) -> pb::ShowMessageResponse {
    pb::ShowMessageResponse {
        id: m.id,
        topic: m.topic,
        headers: m
            .headers
            .into_iter()
            .map(|(name, value)| pb::Header { name, value })
            .collect(),
        payload_size: m.payload_size,
        payload_preview: m.payload_preview,
        published_ms: m.published.0,
        deliveries: m.deliveries.into_iter().map(delivery_history).collect(),
    }
}

fn reload_response(applied: Applied) -> pb::ReloadResponse {
    pb::ReloadResponse {
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
    }
}

fn dead_letters_response(page: DeadLetterPage) -> pb::DeadLettersResponse {
    let (next_id, next_instance) = page
        .next
        .map_or((0, String::new()), |c| (c.message, c.instance));
    pb::DeadLettersResponse {
        dead_letters: page
            .dead_letters
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
    }
}

/// protobuf's "not set" (an empty string) as `None`.
fn named(name: String) -> Option<String> {
    (!name.is_empty()).then_some(name)
}

fn pick(r: pb::SelectionRequest) -> Pick {
    Pick {
        instance: named(r.instance),
        messages: r.ids,
        all: r.all,
    }
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
        self.blocking(|front| Ok(status_response(front.status())))
            .await
            .map(Response::new)
    }

    async fn instances(
        &self,
        _: Request<pb::InstancesRequest>,
    ) -> Result<Response<pb::InstancesResponse>, Status> {
        self.blocking(|front| front.instances().map(instances_response))
            .await
            .map(Response::new)
    }

    async fn show_message(
        &self,
        request: Request<pb::ShowMessageRequest>,
    ) -> Result<Response<pb::ShowMessageResponse>, Status> {
        let id = request.into_inner().id;
        self.blocking(move |front| front.show_message(id).map(message_response))
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
        let instance = named(request.instance);
        self.blocking(move |front| front.reload(expected, instance).map(reload_response))
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
        let page = PageRequest {
            instance: named(r.instance),
            after: (r.after_id > 0 || !r.after_instance.is_empty()).then_some(Cursor {
                message: r.after_id,
                instance: r.after_instance,
            }),
            limit: (r.limit > 0).then_some(r.limit as usize),
        };
        self.blocking(move |front| front.dead_letters(page).map(dead_letters_response))
            .await
            .map(Response::new)
    }

    async fn replay(
        &self,
        request: Request<pb::SelectionRequest>,
    ) -> Result<Response<pb::ReplayResponse>, Status> {
        let pick = pick(request.into_inner());
        self.blocking(move |front| {
            let replay = front.replay(pick)?;
            Ok(pb::ReplayResponse {
                queued: replay.queued,
                waiting: replay.waiting,
            })
        })
        .await
        .map(Response::new)
    }

    async fn purge(
        &self,
        request: Request<pb::SelectionRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let pick = pick(request.into_inner());
        self.blocking(move |front| {
            Ok(pb::CountResponse {
                count: front.purge(pick)?,
            })
        })
        .await
        .map(Response::new)
    }

    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::CountResponse>, Status> {
        let r = request.into_inner();
        let how = if r.purge {
            Forget::Purge
        } else {
            Forget::DeadLetter
        };
        self.blocking(move |front| {
            Ok(pb::CountResponse {
                count: front.forget(&r.instance, how)?,
            })
        })
        .await
        .map(Response::new)
    }

    async fn set_log_level(
        &self,
        request: Request<pb::LogLevelRequest>,
    ) -> Result<Response<pb::LogLevelResponse>, Status> {
        let level = request.into_inner().level;
        let now = self
            .front
            .set_log_level(&level)
            .map_err(|e| code::operate(&e))?;
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
        let mut watch = self.front.watch();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // A blocking thread moves events from the watch to the stream; when the client reads
        // too slowly both buffers fill, the hub drops the subscriber, and the stream ends
        // with RESOURCE_EXHAUSTED — never a silent gap.
        tokio::task::spawn_blocking(move || {
            let _open = open;
            loop {
                let sent = match watch.next(WATCH_CHECK) {
                    WatchStep::Snapshot(event) => tx.blocking_send(Ok(watch_event(&event, true))),
                    WatchStep::Live(event) => tx.blocking_send(Ok(watch_event(&event, false))),
                    WatchStep::Quiet if tx.is_closed() => return,
                    WatchStep::Quiet => Ok(()),
                    WatchStep::Ended(end) => {
                        let _ = tx.blocking_send(Err(code::watch_end(end)));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
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
