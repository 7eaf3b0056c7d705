// The body of fx-legacy, shared with fx-legacy-today (the same source built against today's
// plugin-api). It uses only what the plugind-api 1.0.0 SDK offers, so it builds against
// 1.0.0 and every later 1.x. The includer defines `BUILD` ("legacy" or "today").

use std::{fs::File, io::Write as _, path::PathBuf, time::Duration};

use plugind_api::{Host, Message, Outcome, Plugin};

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Free text in every log event and record line: proves the config was read.
    label: String,
    /// A file to append one line per delivery to.
    #[serde(default)]
    record: Option<PathBuf>,
    /// The delay of the retries the `outcome: retry` header asks for.
    #[serde(default = "default_retry_after_ms")]
    retry_after_ms: u64,
}

fn default_retry_after_ms() -> u64 {
    50
}

#[derive(Debug)]
pub struct Legacy {
    host: Host,
    label: String,
    record: Option<File>,
    retry_after: Duration,
}

impl Plugin for Legacy {
    const NAME: &'static str = "fx-legacy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const TOPICS: &'static [&'static str] = &["legacy.>"];
    const DESCRIPTION: &'static str =
        "test fixture built against plugind-api 1.0.0: acks, retries, rejects, publishes, logs";
    type Config = Config;

    fn new(config: Config, host: Host) -> Result<Self, plugind_api::BoxError> {
        let record = match &config.record {
            Some(path) => Some(
                File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("fx-legacy: cannot open {}: {e}", path.display()))?,
            ),
            None => None,
        };
        tracing::info!(
            label = %config.label,
            build = BUILD,
            api = plugind_api::API_VERSION,
            "fx-legacy started"
        );
        Ok(Legacy {
            host,
            label: config.label,
            record,
            retry_after: Duration::from_millis(config.retry_after_ms),
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        let id = msg.id().0;
        let attempt = msg.attempt();
        if let Some(topic) = msg.header("publish") {
            let parent = id.to_string();
            let headers = [("parent", parent.as_str()), ("from", self.label.as_str())];
            if let Err(e) = self
                .host
                .publish_with_headers(topic, msg.payload(), &headers)
            {
                return Outcome::retry(format!("fx-legacy: publishing to {topic}: {e}"));
            }
        }
        let retries = msg
            .header("retries")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let (kind, outcome) = match msg.header("outcome") {
            Some("retry") if attempt <= retries => (
                "retry",
                Outcome::retry_after(self.retry_after, format!("asked to retry (attempt {attempt})")),
            ),
            Some("reject") => ("reject", Outcome::reject("asked to reject")),
            _ => ("ack", Outcome::Ack),
        };
        if let Some(file) = &mut self.record {
            let handled = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let line = format!(
                "{id} {attempt} {BUILD} {} {} {} {handled} {}\n",
                plugind_api::API_VERSION,
                self.label,
                msg.header("parent").unwrap_or("-"),
                String::from_utf8_lossy(msg.payload())
            );
            // One buffer, one `write` under O_APPEND: lines of several instances never tear.
            if let Err(e) = file.write_all(line.as_bytes()) {
                return Outcome::retry(format!("fx-legacy: recording failed: {e}"));
            }
        }
        tracing::info!(
            label = %self.label,
            id,
            attempt,
            topic = msg.topic(),
            outcome = kind,
            build = BUILD,
            "fx-legacy handled"
        );
        outcome
    }

    fn shutdown(self) {
        tracing::info!(label = %self.label, build = BUILD, "fx-legacy stopped");
    }
}

plugind_api::export_plugin!(Legacy);
