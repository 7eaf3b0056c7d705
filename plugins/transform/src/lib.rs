//! `transform`: republishes each payload upper-cased (ASCII) to another topic, keeping the
//! headers — the pipeline demo. Published inside `handle`, the copy is committed only if
//! this attempt acks, so a retried message never produces two copies.

use plugind_api::{BoxError, Host, Message, Outcome, Plugin, PublishErrorKind};

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The topic the upper-cased copies go to.
    pub to: String,
}

/// The plugin.
#[derive(Debug)]
pub struct Transform {
    host: Host,
    to: String,
}

impl Plugin for Transform {
    const NAME: &'static str = "transform";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const TOPICS: &'static [&'static str] = &["demo.>"];
    const DESCRIPTION: &'static str = "republishes each payload upper-cased to another topic";
    type Config = Config;

    fn new(config: Config, host: Host) -> Result<Self, BoxError> {
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
            // A limit or a stopping daemon: try again later.
            Err(e) if matches!(
                e.kind,
                PublishErrorKind::ResourceExhausted | PublishErrorKind::ShuttingDown | PublishErrorKind::Unavailable
            ) => Outcome::retry(e.message),
            // A bad topic or a pipeline loop does not get better by retrying.
            Err(e) => Outcome::reject(e.message),
        }
    }
}

plugind_api::export_plugin!(Transform);

#[cfg(test)]
mod tests {
    use plugind_api::{
        PublishError,
        testing::{Harness, Published, TestMessage},
    };

    use super::*;

    fn harness() -> Harness<Transform> {
        Harness::new(serde_json::json!({ "to": "demo.upper" })).unwrap()
    }

    #[test]
    fn republishes_the_payload_upper_cased_with_its_headers() {
        let mut t = harness();
        let msg = TestMessage::new("demo.hello", "hi there").header("k", "v");
        assert_eq!(t.handle(msg), Ok(Outcome::Ack));
        assert_eq!(
            t.published(),
            [Published {
                topic: "demo.upper".into(),
                payload: b"HI THERE".to_vec(),
                headers: vec![("k".into(), "v".into())],
            }]
        );
    }

    #[test]
    fn a_refused_publish_is_retried_or_rejected_by_its_kind() {
        let mut t = harness();
        t.refuse_publish(PublishError {
            kind: PublishErrorKind::ResourceExhausted,
            message: "backlog full".into(),
        });
        assert_eq!(t.handle(TestMessage::new("demo.a", "x")), Ok(Outcome::retry("backlog full")));
        t.refuse_publish(PublishError {
            kind: PublishErrorKind::HopLimit,
            message: "a loop".into(),
        });
        assert_eq!(t.handle(TestMessage::new("demo.a", "x")), Ok(Outcome::reject("a loop")));
    }
}
