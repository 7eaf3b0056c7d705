//! `transform`: republishes each payload upper-cased (ASCII) to another topic, keeping the
//! headers — the pipeline demo.
//!
//! It publishes from inside `handle`, which makes the copy part of this attempt: the daemon
//! commits the copy together with the ack of the original and discards it if the attempt
//! fails. So a retried message never yields two copies, and an acked one exactly one.

use plugind_api::{BoxError, Host, Message, Outcome, Plugin, PublishError, PublishErrorKind};

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The topic the upper-cased copies are published to (a topic, not a pattern).
    pub to: String,
}

/// The plugin: where copies go, and the host services that publish them.
#[derive(Debug)]
pub struct Transform {
    host: Host,
    to: String,
}

impl Plugin for Transform {
    const NAME: &'static str = "transform";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// None: an instance gets its topics from `plugins.toml`. Any default would be a trap — a
    /// default such as `demo.>` also matches a `to` such as `demo.shouted`, and every copy
    /// would be transformed again, hop after hop, until `hop_limit` dead-letters it.
    const TOPICS: &'static [&'static str] = &[];
    const DESCRIPTION: &'static str = "republishes each payload upper-cased to another topic";
    type Config = Config;

    fn new(config: Config, host: Host) -> Result<Self, BoxError> {
        // The daemon checks `to` fully at every publish (an invalid topic is rejected there);
        // catching the two likely mistakes here refuses the instance at start instead of
        // dead-lettering every message it receives.
        if config.to.is_empty() {
            return Err("`to` is empty: set the topic the copies are published to".into());
        }
        if config
            .to
            .split('.')
            .any(|token| token == "*" || token == ">")
        {
            return Err(format!(
                "`to` = {:?} is a pattern; copies need a concrete topic",
                config.to
            )
            .into());
        }
        Ok(Self {
            host,
            to: config.to,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        let upper = msg.payload().to_ascii_uppercase();
        let headers: Vec<(&str, &str)> = msg.headers().collect();
        match self.host.publish_with_headers(&self.to, &upper, &headers) {
            Ok(_) => Outcome::Ack,
            Err(refused) => self.outcome_of(&refused),
        }
    }
}

impl Transform {
    /// What a refused publish means for the message being transformed.
    fn outcome_of(&self, refused: &PublishError) -> Outcome {
        let reason = format!(
            "publish to {} refused ({:?}): {}",
            self.to, refused.kind, refused.message
        );
        match refused.kind {
            // The copy itself is wrong (topic, size, headers), or the pipeline loops past
            // `hop_limit`: the same publish would be refused again, so dead-letter now.
            PublishErrorKind::Invalid | PublishErrorKind::HopLimit => Outcome::reject(reason),
            // A limit (backlog, disk), a daemon that is stopping, a passing failure: the same
            // publish may succeed later, after the instance's backoff.
            PublishErrorKind::ResourceExhausted
            | PublishErrorKind::ShuttingDown
            | PublishErrorKind::Unavailable => Outcome::retry(reason),
            // A kind newer than this SDK: retrying is the safe choice, and `max_attempts`
            // still dead-letters the message if it never succeeds.
            _ => Outcome::retry(reason),
        }
    }
}

plugind_api::export_plugin!(Transform);

#[cfg(test)]
mod tests {
    use plugind_api::{
        hosting::CallErrorKind,
        testing::{Harness, Published, TestMessage},
    };

    use super::*;

    fn transform() -> Harness<Transform> {
        Harness::new(serde_json::json!({ "to": "demo.upper" })).unwrap()
    }

    #[test]
    fn republishes_the_payload_upper_cased_with_its_headers() {
        let mut t = transform();
        let msg = TestMessage::new("demo.hello", "hi thére, 42!")
            .header("trace", "abc")
            .header("k", "1")
            .header("k", "2");
        assert_eq!(t.handle(msg), Ok(Outcome::Ack));
        assert_eq!(
            t.published(),
            [Published {
                topic: "demo.upper".to_owned(),
                // ASCII only: `é` (two UTF-8 bytes) is left as it is.
                payload: "HI THéRE, 42!".as_bytes().to_vec(),
                headers: [("trace", "abc"), ("k", "1"), ("k", "2")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .to_vec(),
            }]
        );
    }

    #[test]
    fn a_binary_payload_is_upper_cased_byte_by_byte() {
        let mut t = transform();
        assert_eq!(
            t.handle(TestMessage::new("demo.bin", vec![0xff, b'a', 0x00])),
            Ok(Outcome::Ack)
        );
        assert_eq!(t.published()[0].payload, [0xff, b'A', 0x00]);
    }

    #[test]
    fn a_refused_publish_is_retried_or_rejected_by_its_kind() {
        let cases = [
            (PublishErrorKind::ResourceExhausted, true),
            (PublishErrorKind::ShuttingDown, true),
            (PublishErrorKind::Unavailable, true),
            (PublishErrorKind::Other(200), true),
            (PublishErrorKind::Invalid, false),
            (PublishErrorKind::HopLimit, false),
        ];
        for (kind, retried) in cases {
            let mut t = transform();
            t.refuse_publish(PublishError {
                kind,
                message: "because".to_owned(),
            });
            let reason = format!("publish to demo.upper refused ({kind:?}): because");
            let expected = if retried {
                Outcome::retry(reason)
            } else {
                Outcome::reject(reason)
            };
            assert_eq!(
                t.handle(TestMessage::new("demo.a", "x")),
                Ok(expected),
                "{kind:?}"
            );
            assert!(t.published().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn new_refuses_an_empty_or_pattern_to() {
        for (to, expected) in [
            (
                "",
                "`to` is empty: set the topic the copies are published to",
            ),
            (
                "demo.>",
                "`to` = \"demo.>\" is a pattern; copies need a concrete topic",
            ),
            (
                "demo.*.x",
                "`to` = \"demo.*.x\" is a pattern; copies need a concrete topic",
            ),
        ] {
            let e = Harness::<Transform>::new(serde_json::json!({ "to": to })).unwrap_err();
            assert_eq!(
                (e.kind, e.message.as_str()),
                (CallErrorKind::Error, expected)
            );
        }
        let e = Harness::<Transform>::new(serde_json::json!({})).unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Config);
        assert!(e.message.contains("missing field `to`"), "{}", e.message);
    }
}
