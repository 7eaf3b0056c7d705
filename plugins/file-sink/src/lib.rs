//! `file-sink`: appends every message as one JSON line to a file, fsyncs it, then acks — the
//! simplest durable consumer, and the demo's visible output.
//!
//! A line: `{"id":7,"topic":"demo.hello","attempt":1,"published":"2026-…Z",
//! "headers":[["k","v"]],"payload":"hi"}`; a payload that is not UTF-8 is written as
//! `"payload_base64"` instead. A write or fsync error is a retry: the line may then appear
//! twice, never not at all (at-least-once).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::PathBuf,
    time::SystemTime,
};

use base64::Engine as _;
use plugind_api::{BoxError, Host, Message, Outcome, Plugin};

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file to append to. Created if missing; its directory must exist. A relative path
    /// is relative to the daemon's working directory.
    pub path: PathBuf,
}

/// The plugin: the open file.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
}

/// One output line.
#[derive(serde::Serialize)]
struct Line<'m> {
    id: u64,
    topic: &'m str,
    attempt: u32,
    published: String,
    headers: Vec<(&'m str, &'m str)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'m str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Plugin for FileSink {
    const NAME: &'static str = "file-sink";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const TOPICS: &'static [&'static str] = &["demo.>"];
    const DESCRIPTION: &'static str = "appends each message as a JSON line to a file, fsynced";
    type Config = Config;

    fn new(config: Config, _host: Host) -> Result<Self, BoxError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .map_err(|e| format!("cannot open {} for appending: {e}", config.path.display()))?;
        Ok(Self {
            path: config.path,
            file,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        let text = std::str::from_utf8(msg.payload()).ok();
        let line = Line {
            id: msg.id().0,
            topic: msg.topic(),
            attempt: msg.attempt(),
            published: rfc3339(msg.publish_time()),
            headers: msg.headers().collect(),
            payload: text,
            payload_base64: text
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(msg.payload())),
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(bytes) => bytes,
            Err(e) => return Outcome::reject(format!("cannot encode the message: {e}")),
        };
        bytes.push(b'\n');
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => Outcome::Ack,
            Err(e) => Outcome::retry(format!("cannot write {}: {e}", self.path.display())),
        }
    }
}

plugind_api::export_plugin!(FileSink);

#[cfg(test)]
mod tests {
    use plugind_api::testing::{Harness, TestMessage};

    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("file-sink-{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_one_json_line_per_message_text_or_base64() {
        let dir = temp_dir("lines");
        let path = dir.join("out.jsonl");
        let mut sink = Harness::<FileSink>::new(serde_json::json!({ "path": path })).unwrap();
        let text = TestMessage::new("demo.hello", "hi").id(7).header("k", "v");
        assert_eq!(sink.handle(text), Ok(Outcome::Ack));
        let binary = TestMessage::new("demo.bin", vec![0xff, 0x00]).id(8).attempt(2);
        assert_eq!(sink.handle(binary), Ok(Outcome::Ack));
        let written = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], 7);
        assert_eq!(lines[0]["topic"], "demo.hello");
        assert_eq!(lines[0]["payload"], "hi");
        assert_eq!(lines[0]["headers"], serde_json::json!([["k", "v"]]));
        assert!(lines[0]["published"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["attempt"], 2);
        assert_eq!(lines[1]["payload_base64"], "/wA=");
        assert!(lines[1].get("payload").is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let path = std::env::temp_dir().join("file-sink-no-such-dir/out.jsonl");
        let e = Harness::<FileSink>::new(serde_json::json!({ "path": path })).unwrap_err();
        assert!(e.message.contains("cannot open"), "{}", e.message);
        assert!(e.message.contains("file-sink-no-such-dir/out.jsonl"), "{}", e.message);
    }
}
