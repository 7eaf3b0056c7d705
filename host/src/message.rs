//! A message as the daemon keeps it — stored once however many instances it goes to — and
//! one attempt's view of it, lent to plugin code without copying.

use std::sync::Arc;

use bytes::Bytes;
use plugind_api::hosting;

use crate::clock::Timestamp;

/// The header that carries how many pipeline hops led to a message.
pub const HOP_HEADER: &str = "plugind-hop";

/// An accepted message. Immutable; shared by every delivery of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    pub topic: String,
    /// In publish order; names may repeat.
    pub headers: Vec<(String, String)>,
    /// A slice of a refcounted buffer: never copied on the way to plugins.
    pub payload: Bytes,
    pub publish_time: Timestamp,
}

impl StoredMessage {
    /// The pipeline hops that led to this message (0 for one published from outside).
    pub fn hops(&self) -> u32 {
        self.headers
            .iter()
            .find(|(name, _)| name == HOP_HEADER)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0)
    }
}

/// One attempt of one delivery: what plugin code sees as a `Message`.
#[derive(Debug)]
pub struct Handed {
    pub message: Arc<StoredMessage>,
    /// 1-based.
    pub attempt: u32,
}

impl hosting::Delivery for Handed {
    fn id(&self) -> u64 {
        self.message.id
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn topic(&self) -> &str {
        &self.message.topic
    }
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }
    fn publish_time_unix_nanos(&self) -> u64 {
        self.message.publish_time.0.saturating_mul(1_000_000)
    }
    fn header_count(&self) -> usize {
        self.message.headers.len()
    }
    fn header_at(&self, index: usize) -> (&str, &str) {
        let (name, value) = &self.message.headers[index];
        (name, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_come_from_the_hop_header() {
        let mut m = StoredMessage {
            id: 1,
            topic: "t".into(),
            headers: vec![],
            payload: Bytes::new(),
            publish_time: Timestamp(0),
        };
        assert_eq!(m.hops(), 0);
        m.headers.push((HOP_HEADER.into(), "3".into()));
        assert_eq!(m.hops(), 3);
    }
}
