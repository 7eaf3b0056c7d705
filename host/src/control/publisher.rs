//! The `Publisher` service: `Publish` and `PublishStream` on top of the ingress API, with
//! idempotency keys and precise status codes.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::pb::{
    self, PublishBatch, PublishBatchResult, PublishOutcome, PublishRequest, PublishResponse,
    publish_outcome, publisher_server,
};
use crate::{
    clock::{Clock, SystemClock, Timestamp},
    ingress::{Ingress, NewMessage, Published, Refused, Submitted},
    ledger::LedgerError,
};

/// How many batch results of one stream may wait for the client before the server stops
/// reading its requests (HTTP/2 flow control then holds the client back).
const STREAM_BUFFER: usize = 64;

/// Idempotency keys seen within `dedupe_window`, with the id they got. Each key is recorded
/// in the ledger with its message, and the table starts from the ledger's keys: a key
/// survives a restart.
#[derive(Debug)]
struct Keys {
    window: Duration,
    seen: HashMap<String, (Published, Timestamp)>,
    /// The size at which the next sweep of expired keys runs.
    sweep_at: usize,
}

/// The table size below which expired keys are never swept.
const SWEEP_MIN: usize = 4096;

impl Keys {
    fn fresh(&self, at: Timestamp, now: Timestamp) -> bool {
        now.since(at) < self.window
    }

    fn get(&mut self, key: &str, now: Timestamp) -> Option<Published> {
        // Expired keys are dropped in amortised sweeps: a sweep only when the table doubled
        // since the last one, never on every publish.
        if self.seen.len() > self.sweep_at {
            let window = self.window;
            self.seen.retain(|_, (_, at)| now.since(*at) < window);
            self.sweep_at = (self.seen.len() * 2).max(SWEEP_MIN);
        }
        self.seen
            .get(key)
            .filter(|(_, at)| self.fresh(*at, now))
            .map(|(published, _)| *published)
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct PublisherService {
    ingress: Arc<Ingress>,
    /// Held across a keyed publish (until its key is recorded): two publishes of one key
    /// cannot both pass.
    keys: Arc<tokio::sync::Mutex<Keys>>,
}

impl PublisherService {
    /// `known`: the keys the ledger kept from earlier runs (key, id, time).
    pub fn new(
        ingress: Arc<Ingress>,
        dedupe_window: Duration,
        known: Vec<(String, u64, Timestamp)>,
    ) -> Self {
        // How many instances a key's message reached is not kept across restarts.
        let seen: HashMap<String, (Published, Timestamp)> = known
            .into_iter()
            .map(|(key, id, at)| (key, (Published { id, instances: 0 }, at)))
            .collect();
        Self {
            ingress,
            keys: Arc::new(tokio::sync::Mutex::new(Keys {
                window: dedupe_window,
                sweep_at: (seen.len() * 2).max(SWEEP_MIN),
                seen,
            })),
        }
    }

    pub fn into_server(self) -> publisher_server::PublisherServer<Self> {
        publisher_server::PublisherServer::new(self)
    }

    /// Publishes a batch, honouring idempotency keys.
    async fn publish(&self, requests: Vec<PublishRequest>) -> Vec<Result<Outcome, Refused>> {
        let keyed = requests.iter().any(|r| !r.key.is_empty());
        if !keyed {
            return fresh(
                self.ingress
                    .publish_async(requests.into_iter().map(message).collect())
                    .await,
            );
        }
        // Keyed batches are serialized so two publishes of one key cannot both pass.
        let mut keys = self.keys.lock().await;
        let now = SystemClock.now();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            if !request.key.is_empty()
                && let Some(published) = keys.get(&request.key, now)
            {
                results.push(Ok(Outcome {
                    published,
                    duplicate: true,
                }));
                continue;
            }
            let key = request.key.clone();
            let result = self
                .ingress
                .publish_async(vec![message(request)])
                .await
                .pop()
                .expect("one result per message");
            if let (Ok(published), false) = (&result, key.is_empty()) {
                keys.seen.insert(key, (*published, now));
            }
            results.push(result.map(|published| Outcome {
                published,
                duplicate: false,
            }));
        }
        results
    }
}

/// One message's answer: what the ingress said, and whether its key was a duplicate.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    published: Published,
    duplicate: bool,
}

/// Answers of messages published without a key seen before.
fn fresh(results: Vec<Result<Published, Refused>>) -> Vec<Result<Outcome, Refused>> {
    results
        .into_iter()
        .map(|r| {
            r.map(|published| Outcome {
                published,
                duplicate: false,
            })
        })
        .collect()
}

fn message(request: PublishRequest) -> NewMessage {
    NewMessage {
        key: (!request.key.is_empty()).then(|| request.key.clone()),
        topic: request.topic,
        payload: request.payload,
        headers: request
            .headers
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect(),
    }
}

/// The gRPC status for a refusal: the code says whether to retry, the message says why.
pub fn status(refused: &Refused) -> Status {
    match refused {
        Refused::Invalid(_) => Status::invalid_argument(refused.to_string()),
        Refused::Unrouted(_) => Status::failed_precondition(refused.to_string()),
        Refused::Backlog { .. } | Refused::LedgerFull(_) => {
            Status::resource_exhausted(refused.to_string())
        }
        Refused::ShuttingDown => Status::unavailable(refused.to_string()),
        Refused::LedgerFailed(_) => Status::unavailable(refused.to_string()),
    }
}

fn outcome(result: Result<Outcome, Refused>) -> PublishOutcome {
    match result {
        Ok(o) => PublishOutcome {
            outcome: Some(publish_outcome::Outcome::Id(o.published.id)),
            instances: o.published.instances,
            duplicate: o.duplicate,
        },
        Err(refused) => {
            let status = status(&refused);
            PublishOutcome {
                outcome: Some(publish_outcome::Outcome::Refused(pb::Refusal {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                })),
                instances: 0,
                duplicate: false,
            }
        }
    }
}

/// A batch of a stream waiting for the ledger.
struct InFlight {
    correlation_id: u64,
    submitted: Submitted,
    receipt: Pin<Box<dyn Future<Output = Result<(), LedgerError>> + Send>>,
}

impl InFlight {
    /// The stream's answer for this batch, once the ledger answered.
    fn answer(self, ingress: &Ingress, recorded: Result<(), LedgerError>) -> PublishBatchResult {
        batch_result(
            self.correlation_id,
            fresh(ingress.complete(self.submitted, recorded)),
        )
    }
}

fn batch_result(
    correlation_id: u64,
    outcomes: Vec<Result<Outcome, Refused>>,
) -> PublishBatchResult {
    PublishBatchResult {
        correlation_id,
        outcomes: outcomes.into_iter().map(outcome).collect(),
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<PublishBatchResult, Status>> + Send>>;

#[tonic::async_trait]
impl publisher_server::Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let result = self.publish(vec![request.into_inner()]).await;
        match result.into_iter().next().expect("one result per message") {
            Ok(o) => Ok(Response::new(PublishResponse {
                id: o.published.id,
                instances: o.published.instances,
                duplicate: o.duplicate,
            })),
            Err(refused) => Err(status(&refused)),
        }
    }

    type PublishStreamStream = ResultStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishBatch>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut batches = request.into_inner();
        let (results, stream) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            // Batches are submitted as they arrive (ids in arrival order) and answered in
            // that order once durable: many batches share one group commit.
            let mut in_flight: VecDeque<InFlight> = VecDeque::new();
            let mut reading = true;
            let mut error = None;
            while reading || !in_flight.is_empty() {
                tokio::select! {
                    biased;
                    recorded = async { (&mut in_flight.front_mut().expect("checked").receipt).await },
                        if !in_flight.is_empty() =>
                    {
                        let done = in_flight.pop_front().expect("checked");
                        // A client gone is no reason to stop: what was submitted must
                        // still reach the dispatcher.
                        let _ = results.send(Ok(done.answer(&service.ingress, recorded))).await;
                    }
                    batch = batches.next(), if reading && in_flight.len() < STREAM_BUFFER => {
                        match batch {
                            Some(Ok(batch)) if batch.messages.iter().any(|m| !m.key.is_empty()) => {
                                // A keyed batch waits for the ones before it, then goes alone.
                                for mut done in in_flight.drain(..) {
                                    let recorded = (&mut done.receipt).await;
                                    let _ = results.send(Ok(done.answer(&service.ingress, recorded))).await;
                                }
                                let outcomes = service.publish(batch.messages).await;
                                let _ = results.send(Ok(batch_result(batch.correlation_id, outcomes))).await;
                            }
                            Some(Ok(batch)) => {
                                let mut submitted = service
                                    .ingress
                                    .submit(batch.messages.into_iter().map(message).collect());
                                let receipt = Box::pin(submitted.take_receipt().done());
                                in_flight.push_back(InFlight {
                                    correlation_id: batch.correlation_id,
                                    submitted,
                                    receipt,
                                });
                            }
                            Some(Err(status)) => {
                                // The batches before it are still answered, then the error.
                                error = Some(status);
                                reading = false;
                            }
                            None => reading = false,
                        }
                    }
                }
            }
            if let Some(status) = error {
                let _ = results.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost::Message as _;

    use super::*;

    #[test]
    fn a_decoded_payload_points_into_the_receive_buffer() {
        let request = PublishRequest {
            topic: "t".into(),
            payload: Bytes::from(vec![7u8; 4096]),
            headers: vec![],
            key: String::new(),
        };
        let wire = Bytes::from(request.encode_to_vec());
        let decoded = PublishRequest::decode(wire.clone()).unwrap();
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(
            range.contains(&(decoded.payload.as_ptr() as usize)),
            "no copy"
        );
        assert_eq!(decoded.payload.len(), 4096);
    }

    #[test]
    fn refusals_map_to_codes_that_say_whether_to_retry() {
        use tonic::Code;
        let cases = [
            (
                Refused::Invalid("empty topic".into()),
                Code::InvalidArgument,
            ),
            (
                Refused::Backlog {
                    instance: "sink".into(),
                    backlog: 10,
                    limit: 5,
                },
                Code::ResourceExhausted,
            ),
            (Refused::LedgerFull("disk".into()), Code::ResourceExhausted),
            (Refused::ShuttingDown, Code::Unavailable),
            (Refused::Unrouted("a.b".into()), Code::FailedPrecondition),
        ];
        for (refused, code) in cases {
            let s = status(&refused);
            assert_eq!(s.code(), code, "{refused}");
            assert_eq!(s.message(), refused.to_string());
        }
    }
}
