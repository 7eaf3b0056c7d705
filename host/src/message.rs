//! A message as the daemon keeps it — stored once however many instances it goes to — and
//! one attempt's view of it, lent to plugin code without copying.

use bytes::Bytes;

use crate::{
    clock::Timestamp,
    quote::{invisible, quote},
    topic,
};

/// The header that carries how many pipeline hops led to a message.
pub const HOP_HEADER: &str = "plugind-hop";

/// The most headers one message may carry.
pub const MAX_HEADERS: usize = 64;
/// The longest header name, in bytes.
pub const MAX_HEADER_NAME: usize = 256;
/// The longest header value, in bytes.
pub const MAX_HEADER_VALUE: usize = 16 << 10;
/// The longest idempotency key, in bytes.
pub const MAX_KEY: usize = 256;
/// What a header costs beyond its name and value: the two lengths that frame them in the
/// ledger. A message's size counts its headers as they are stored, so that the backlog read
/// back from the ledger at start is the one counted at acceptance.
pub const HEADER_FRAMING: u64 = 8;

/// The bytes `headers` take: names and values, and their framing.
pub fn headers_size(headers: &[(String, String)]) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.len() + value.len()) as u64 + HEADER_FRAMING)
        .sum()
}

/// Every publish's checks, whichever way it comes (a producer through the ingress, a child a
/// plugin stages inside `handle`): a valid topic, then [`check`]. Returns the size the
/// message counts for.
///
/// # Errors
/// What is wrong: the topic (quoted) and why, or [`check`]'s.
pub fn validate(
    topic: &str,
    payload: usize,
    headers: &[(String, String)],
    key: Option<&str>,
    max_size: u64,
) -> Result<u64, String> {
    topic::validate_topic(topic).map_err(|e| format!("topic {} {e}", quote(topic)))?;
    check(payload, headers, key, max_size)
}

/// Checks a message's headers and idempotency key against their bounds, and its size —
/// payload, headers (with their framing) and key — against `max_size`. Returns that size,
/// which is what the message counts for in `max_message_size` and `max_backlog`.
///
/// # Errors
/// What is wrong, naming the header at fault (quoted, bounded).
pub fn check(
    payload: usize,
    headers: &[(String, String)],
    key: Option<&str>,
    max_size: u64,
) -> Result<u64, String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "{} headers, more than {MAX_HEADERS}",
            headers.len()
        ));
    }
    for (position, (name, value)) in headers.iter().enumerate() {
        check_header_name(name).map_err(|e| format!("header {}: {e}", position + 1))?;
        if value.len() > MAX_HEADER_VALUE {
            return Err(format!(
                "header {}: the value of {} is {} bytes, more than {MAX_HEADER_VALUE}",
                position + 1,
                quote(name),
                value.len()
            ));
        }
    }
    let key = key.map_or(0, str::len);
    if key > MAX_KEY {
        return Err(format!(
            "the idempotency key is {key} bytes, more than {MAX_KEY}"
        ));
    }
    let headers = headers_size(headers);
    let size = payload as u64 + headers + key as u64;
    if size > max_size {
        return Err(if headers == 0 && key == 0 {
            format!("payload of {size} bytes is over max_message_size ({max_size} bytes)")
        } else {
            format!(
                "message of {size} bytes (payload {payload}, headers {headers}, key {key}) is \
                 over max_message_size ({max_size} bytes)"
            )
        });
    }
    Ok(size)
}

/// A header name: 1 to [`MAX_HEADER_NAME`] bytes, no control or invisible characters.
fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > MAX_HEADER_NAME {
        return Err(format!(
            "the name {} is {} bytes, more than {MAX_HEADER_NAME}",
            quote(name),
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || invisible(*c)) {
        let what = if c.is_control() {
            "a control character"
        } else {
            "an invisible format character (zero-width or bidirectional)"
        };
        return Err(format!("the name {} contains {what}", quote(name)));
    }
    Ok(())
}

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
    /// What it counts for in a backlog: its payload and headers as stored (its key, if it
    /// had one, is not stored with it).
    pub fn size(&self) -> u64 {
        self.payload.len() as u64 + headers_size(&self.headers)
    }

    /// The pipeline hops that led to this message (0 for one published from outside).
    pub fn hops(&self) -> u32 {
        self.headers
            .iter()
            .find(|(name, _)| name == HOP_HEADER)
            .and_then(|(_, value)| value.parse().ok())
            .unwrap_or(0)
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

    fn h(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn headers_are_bounded_in_number_name_and_value() {
        let max = u64::MAX;
        let many: Vec<_> = (0..=MAX_HEADERS)
            .map(|i| h(&format!("h{i}"), "v"))
            .collect();
        assert!(check(0, &many[..MAX_HEADERS], None, max).is_ok());
        let e = check(0, &many, None, max).unwrap_err();
        assert_eq!(e, "65 headers, more than 64");
        let long_name = "n".repeat(MAX_HEADER_NAME + 1);
        assert!(check(0, &[h(&long_name[1..], "v")], None, max).is_ok());
        let e = check(0, &[h(&long_name, "v")], None, max).unwrap_err();
        assert!(e.contains("257 bytes, more than 256"), "{e}");
        let value = "v".repeat(MAX_HEADER_VALUE + 1);
        assert!(check(0, &[h("a", &value[1..])], None, max).is_ok());
        let e = check(0, &[h("a", &value)], None, max).unwrap_err();
        assert!(e.contains("16385 bytes, more than 16384"), "{e}");
        let key = "k".repeat(MAX_KEY + 1);
        assert!(check(0, &[], Some(&key[1..]), max).is_ok());
        let e = check(0, &[], Some(&key), max).unwrap_err();
        assert_eq!(e, "the idempotency key is 257 bytes, more than 256");
    }

    #[test]
    fn header_names_that_are_empty_or_hold_control_or_invisible_characters_are_refused() {
        for (name, what) in [
            ("", "the name is empty"),
            ("trace\nid", "a control character"),
            ("\u{0}", "a control character"),
            ("trace\u{200b}", "an invisible format character"),
            ("\u{202e}di", "an invisible format character"),
        ] {
            let e = check(0, &[h("ok", "v"), h(name, "v")], None, u64::MAX).unwrap_err();
            assert!(
                e.starts_with("header 2: ") && e.contains(what),
                "{name:?}: {e}"
            );
        }
        // Values are data: anything goes.
        assert!(check(0, &[h("ok", "a\nb\u{202e}")], None, u64::MAX).is_ok());
    }

    #[test]
    fn headers_and_key_count_in_the_message_size() {
        let headers = [h("name", "value")];
        let size = 100 + 4 + 5 + HEADER_FRAMING + 3;
        assert_eq!(check(100, &headers, Some("key"), size), Ok(size));
        let e = check(100, &headers, Some("key"), size - 1).unwrap_err();
        assert_eq!(
            e,
            format!(
                "message of {size} bytes (payload 100, headers 17, key 3) is over \
                 max_message_size ({} bytes)",
                size - 1
            )
        );
        // A payload of exactly the limit, alone, is within it.
        assert_eq!(check(1024, &[], None, 1024), Ok(1024));
        assert_eq!(
            check(1025, &[], None, 1024).unwrap_err(),
            "payload of 1025 bytes is over max_message_size (1024 bytes)"
        );
    }
}
