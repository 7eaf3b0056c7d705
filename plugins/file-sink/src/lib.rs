//! `file-sink`: appends every message as one JSON line to a file, fsyncs it, then acks — the
//! simplest durable consumer, and the demo's visible output.
//!
//! One line per message:
//!
//! ```text
//! {"id":7,"topic":"demo.hello","attempt":1,"published":"2026-11-25T21:00:00.123Z","headers":[["k","v"]],"payload":"hi"}
//! ```
//!
//! A payload that is not valid UTF-8 is written as `"payload_base64"` (standard alphabet,
//! padded) instead of `"payload"`, so every line is valid JSON and no byte is lost.
//!
//! Delivery is at least once: the plugin acks only after `sync_data` returned, so an acked
//! message is on disk; a failed write or fsync is retried, so a line may appear twice (same
//! `id`, a later `attempt`), never not at all.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    path::PathBuf,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use plugind_api::{BoxError, Host, Message, Outcome, Plugin};

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file to append to. Created if missing, but its directory must exist: creating
    /// directories (their owner, their mode) is the operator's decision, not the plugin's.
    /// A relative path is relative to the daemon's working directory.
    pub path: PathBuf,
}

/// The plugin: the file, opened once in `new` and kept for the instance's lifetime.
#[derive(Debug)]
pub struct FileSink {
    /// The configured path, for error messages.
    path: PathBuf,
    /// Opened in append mode: every write lands at the current end of the file.
    file: File,
}

/// One output line, borrowing from the message wherever it can.
#[derive(Debug, serde::Serialize)]
struct Line<'m> {
    id: u64,
    topic: &'m str,
    attempt: u32,
    /// When the daemon accepted the message: RFC 3339, UTC, milliseconds.
    published: String,
    /// `[[name, value], …]` rather than an object: a header name may repeat, and the order
    /// the publisher gave is kept.
    headers: Vec<(&'m str, &'m str)>,
    /// The payload, when it is UTF-8 text…
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'m str>,
    /// …or else its base64: exactly one of the two is written.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

impl<'m> Line<'m> {
    fn of(msg: &'m Message) -> Self {
        let text = std::str::from_utf8(msg.payload()).ok();
        Line {
            id: msg.id().0,
            topic: msg.topic(),
            attempt: msg.attempt(),
            // `publish_time` is the epoch plus a u64 of nanoseconds (at most year 2554), within
            // the years 1970..=9999 that humantime formats without panicking.
            published: humantime::format_rfc3339_millis(msg.publish_time()).to_string(),
            headers: msg.headers().collect(),
            payload: text,
            payload_base64: text.is_none().then(|| BASE64.encode(msg.payload())),
        }
    }
}

impl FileSink {
    /// Appends `line` and flushes it to the disk.
    ///
    /// A write that fails part-way (a full disk) is cut back off the file, so the retry does
    /// not leave half a line — invalid JSON — in front of the whole one. This assumes the file
    /// is this instance's alone: give every instance its own `path`.
    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let end = self.file.metadata()?.len();
        if let Err(e) = self.file.write_all(line) {
            // Best effort: if this fails too, the write error is still the one to report.
            let _ = self.file.set_len(end);
            return Err(e);
        }
        self.file.sync_data()
    }
}

impl Plugin for FileSink {
    const NAME: &'static str = "file-sink";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// The demo's topics, when `plugins.toml` gives an instance no `topics` of its own.
    const TOPICS: &'static [&'static str] = &["demo.>"];
    const DESCRIPTION: &'static str = "appends each message as a JSON line to a file, fsynced";
    type Config = Config;

    fn new(config: Config, _host: Host) -> Result<Self, BoxError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)
            .map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::NotFound {
                    " (the file is created if missing, but its directory must exist)"
                } else {
                    ""
                };
                format!(
                    "cannot open {} for appending: {e}{hint}",
                    config.path.display()
                )
            })?;
        Ok(Self {
            path: config.path,
            file,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        let mut line = match serde_json::to_vec(&Line::of(&msg)) {
            Ok(line) => line,
            // Strings and numbers always encode; were it ever to fail, a retry would fail
            // the same way, so the message goes to the dead letters with the cause.
            Err(e) => {
                return Outcome::reject(format!("cannot encode message {} as JSON: {e}", msg.id()));
            }
        };
        line.push(b'\n');
        match self.append(&line) {
            Ok(()) => Outcome::Ack,
            // A full disk or an I/O error may pass: retried with the instance's backoff.
            Err(e) => Outcome::retry(format!("cannot append to {}: {e}", self.path.display())),
        }
    }
}

plugind_api::export_plugin!(FileSink);

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        time::{Duration, UNIX_EPOCH},
    };

    use plugind_api::{
        hosting::CallErrorKind,
        testing::{Harness, TestMessage},
    };

    use super::*;

    /// A fresh directory under the system temp dir, removed when dropped (a failing test too).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("file-sink-test-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sink(path: &Path) -> Harness<FileSink> {
        Harness::new(serde_json::json!({ "path": path })).unwrap()
    }

    #[test]
    fn writes_one_json_line_per_message_text_as_is_binary_as_base64() {
        let dir = TempDir::new("lines");
        let path = dir.0.join("out.jsonl");
        let mut sink = sink(&path);

        let mut text = TestMessage::new("demo.hello", "hi \"there\"")
            .id(7)
            .header("k", "v")
            .header("k", "w");
        text.publish_time = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(sink.handle(text), Ok(Outcome::Ack));

        let mut binary = TestMessage::new("demo.bin", vec![0xff, 0x00, b'a'])
            .id(8)
            .attempt(2);
        binary.publish_time = UNIX_EPOCH + Duration::from_secs(1_700_000_001);
        assert_eq!(sink.handle(binary), Ok(Outcome::Ack));

        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            concat!(
                r#"{"id":7,"topic":"demo.hello","attempt":1,"published":"2023-11-14T22:13:20.123Z","#,
                r#""headers":[["k","v"],["k","w"]],"payload":"hi \"there\""}"#,
                "\n",
                r#"{"id":8,"topic":"demo.bin","attempt":2,"published":"2023-11-14T22:13:21.000Z","#,
                r#""headers":[],"payload_base64":"/wBh"}"#,
                "\n",
            )
        );
    }

    #[test]
    fn appends_to_an_existing_file() {
        let dir = TempDir::new("append");
        let path = dir.0.join("out.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let mut sink = sink(&path);
        assert_eq!(
            sink.handle(TestMessage::new("demo.x", "new")),
            Ok(Outcome::Ack)
        );
        let written = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written}");
        assert_eq!(lines[0], "earlier");
        let line: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(line["payload"], "new");
    }

    #[test]
    fn new_fails_naming_the_path_when_its_directory_is_missing() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no-such-dir").join("out.jsonl");
        let e = Harness::<FileSink>::new(serde_json::json!({ "path": path })).unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Error);
        assert!(
            e.message
                .starts_with(&format!("cannot open {} for appending: ", path.display())),
            "{}",
            e.message
        );
        assert!(
            e.message.ends_with("its directory must exist)"),
            "{}",
            e.message
        );
        assert!(!dir.0.join("no-such-dir").exists(), "no directory created");
    }

    #[test]
    fn a_failed_write_is_retried_naming_the_file_and_the_cause() {
        // Every write to /dev/full fails with ENOSPC: a full disk, on demand (Linux).
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let mut sink = sink(full);
        match sink.handle(TestMessage::new("demo.x", "lost?")) {
            Ok(Outcome::Retry {
                after: None,
                reason,
            }) => {
                assert!(
                    reason.starts_with("cannot append to /dev/full: "),
                    "{reason}"
                );
                assert!(reason.contains("No space left on device"), "{reason}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_config_key_is_refused() {
        let e =
            Harness::<FileSink>::new(serde_json::json!({ "path": "x", "pth": "y" })).unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Config);
        assert!(e.message.contains("unknown field `pth`"), "{}", e.message);
    }
}
