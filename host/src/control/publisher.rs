//! The `Publisher` service: `Publish` and `PublishStream`, request → [`Front::publish`] →
//! response. The front (the ingress behind it) validates, deduplicates idempotency keys,
//! routes and records; this maps protobuf to its messages and its answers back (refusals
//! through [`code::publish`]), and keeps what belongs to the transport: the request size
//! limit that follows `max_message_size`, and a stream's batches in flight.

use std::{collections::VecDeque, future::Future, pin::Pin};

use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::{
    code,
    pb::{
        self, PublishBatch, PublishBatchResult, PublishOutcome, PublishRequest, PublishResponse,
        publish_outcome, publisher_server,
    },
};
use crate::{
    front::{Front, NewMessage, PublishRefused, Published},
    message, metrics,
};

/// How many batch results of one stream may wait for the client before the server stops
/// reading its requests (HTTP/2 flow control then holds the client back).
const STREAM_BUFFER: usize = 64;

/// The largest request the transport takes below `max_message_size`: gRPC's usual 4 MiB, so
/// that streams keep batching small messages whatever the limit.
const TRANSPORT_FLOOR: usize = 4 << 20;

/// What a request carries besides its payload at most: every header at its bounds, the
/// topic, the key, and protobuf's framing, with room to spare.
const ENVELOPE: usize = message::MAX_HEADERS
    * (message::MAX_HEADER_NAME + message::MAX_HEADER_VALUE + 16)
    + crate::topic::MAX_LEN
    + message::MAX_KEY
    + (64 << 10);

/// The largest request (or stream message) the transport decodes for `max_message_size`: a
/// message of that size always passes the transport, and one a little over it reaches the
/// ingress, which says why it is refused.
pub fn transport_limit(max_message_size: u64) -> usize {
    usize::try_from(max_message_size)
        .unwrap_or(usize::MAX)
        .saturating_add(ENVELOPE)
        .max(TRANSPORT_FLOOR)
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct PublisherService {
    front: Front,
}

impl PublisherService {
    pub fn new(front: Front) -> Self {
        Self { front }
    }

    /// The server, decoding requests up to [`transport_limit`] (tonic's default, 4 MiB,
    /// refused every publish above it whatever `max_message_size` said).
    pub fn into_server(self) -> publisher_server::PublisherServer<Self> {
        let limit = transport_limit(self.front.max_message_size());
        publisher_server::PublisherServer::new(self).max_decoding_message_size(limit)
    }

    /// Publishes a batch (one submission, keyed or not).
    async fn publish(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Vec<Result<Published, PublishRefused>> {
        let results = self
            .front
            .publish(requests.into_iter().map(message).collect())
            .done()
            .await;
        metrics::published(results.iter().map(|r| match r {
            Ok(_) => Ok(()),
            Err(refused) => Err(code::publish(refused).code() as i32),
        }));
        results
    }
}

/// A request as the front's message (protobuf's empty key: none).
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

fn outcome(result: Result<Published, PublishRefused>) -> PublishOutcome {
    match result {
        Ok(published) => PublishOutcome {
            outcome: Some(publish_outcome::Outcome::Id(published.id)),
            instances: published.instances,
            duplicate: published.duplicate,
        },
        Err(refused) => {
            let status = code::publish(&refused);
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

/// Every message's answer of a batch, once the ledger answered it.
type Answers = Pin<Box<dyn Future<Output = Vec<Result<Published, PublishRefused>>> + Send>>;

/// A batch of a stream waiting for the ledger.
struct InFlight {
    correlation_id: u64,
    answers: Answers,
}

fn batch_result(
    correlation_id: u64,
    outcomes: Vec<Result<Published, PublishRefused>>,
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
            Ok(published) => Ok(Response::new(PublishResponse {
                id: published.id,
                instances: published.instances,
                duplicate: published.duplicate,
            })),
            Err(refused) => Err(code::publish(&refused)),
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
            // Batches are submitted as they arrive (ids in arrival order), keyed or not, and
            // answered in that order once durable: many batches share one group commit. A
            // key repeated from a batch still in flight is answered once that one is
            // recorded (the ingress sees to it).
            let mut in_flight: VecDeque<InFlight> = VecDeque::new();
            let mut reading = true;
            let mut error = None;
            while reading || !in_flight.is_empty() {
                tokio::select! {
                    biased;
                    answers = async { (&mut in_flight.front_mut().expect("checked").answers).await },
                        if !in_flight.is_empty() =>
                    {
                        let done = in_flight.pop_front().expect("checked");
                        // A client gone is no reason to stop: what was submitted must
                        // still reach the dispatcher.
                        let _ = results.send(Ok(batch_result(done.correlation_id, answers))).await;
                    }
                    batch = batches.next(), if reading && in_flight.len() < STREAM_BUFFER => {
                        match batch {
                            Some(Ok(batch)) => {
                                let submitted = service
                                    .front
                                    .publish(batch.messages.into_iter().map(message).collect());
                                in_flight.push_back(InFlight {
                                    correlation_id: batch.correlation_id,
                                    answers: Box::pin(submitted.done()),
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
}
