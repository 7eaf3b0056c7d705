//! The 1.0 host: a program built against the frozen plugind-api 1.0.0 source's `hosting`
//! module that loads one plugin library, instantiates it, hands it messages and prints every
//! event as one JSON line (see `report.rs`). It shows what a daemon built against 1.0.0 does
//! with a library built against a later plugind-api.
//!
//! ```text
//! legacy-host [--instance NAME] LIBRARY CONFIG_JSON [TOPIC PAYLOAD]...
//! ```
//!
//! Without `TOPIC PAYLOAD` pairs it reads messages from stdin, one JSON object per line:
//! `{"topic": "t", "payload": "p", "headers": {"k": "v"}, "attempt": 1, "id": 7}` (all but
//! `topic` optional). Exit codes: 0 when the plugin was instantiated (whatever its outcomes),
//! 1 when it was refused at load or `instantiate`, 2 for a usage error.

mod load;
mod report;

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use plugind_api::{
    Level, MessageId, Outcome, PublishError,
    abi::KeyValue,
    hosting::{
        CallError, CallErrorKind, Delivery, Instance, Services, host_handle, message_handle,
    },
    manifest::Manifest,
};
use report::Report;

/// One message to hand to the plugin.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    topic: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "first_attempt")]
    attempt: u32,
    #[serde(default)]
    id: Option<u64>,
}

fn first_attempt() -> u32 {
    1
}

/// A delivery as this host stores it.
struct Stored {
    id: u64,
    attempt: u32,
    topic: String,
    payload: Vec<u8>,
    headers: Vec<(String, String)>,
    publish_time: u64,
}

impl Delivery for Stored {
    fn id(&self) -> u64 {
        self.id
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn topic(&self) -> &str {
        &self.topic
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn publish_time_unix_nanos(&self) -> u64 {
        self.publish_time
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn header_at(&self, index: usize) -> (&str, &str) {
        let (key, value) = &self.headers[index];
        (key, value)
    }
}

/// The services of the one instance: logs and publishes become report lines.
struct Printer {
    instance: String,
    next_id: AtomicU64,
}

impl Services for Printer {
    fn instance_name(&self) -> &str {
        &self.instance
    }
    fn generation(&self) -> u64 {
        1
    }
    fn log_enabled(&self, _level: Level) -> bool {
        true
    }
    fn log(&self, level: Level, target: &str, message: &str, fields: &[KeyValue<'_>]) {
        Report::Log {
            level: level_name(level),
            target: target.to_owned(),
            message: message.to_owned(),
            fields: pairs(fields),
        }
        .emit();
    }
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Report::Published {
            id,
            topic: topic.to_owned(),
            payload: String::from_utf8_lossy(payload).into_owned(),
            headers: pairs(headers),
        }
        .emit();
        Ok(MessageId(id))
    }
}

fn pairs(fields: &[KeyValue<'_>]) -> BTreeMap<String, String> {
    fields
        .iter()
        .map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().to_owned()))
        .collect()
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

fn kind_name(kind: CallErrorKind) -> &'static str {
    match kind {
        CallErrorKind::Error => "error",
        CallErrorKind::Panic => "panic",
        CallErrorKind::Config => "config",
        CallErrorKind::Unknown => "unknown",
    }
}

struct Args {
    instance: String,
    library: PathBuf,
    config: String,
    /// `None`: read stdin.
    messages: Option<Vec<Input>>,
}

fn parse_args() -> Result<Args, String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut instance = "legacy-host".to_owned();
    if args.first().map(String::as_str) == Some("--instance") {
        if args.len() < 2 {
            return Err("--instance needs a NAME".into());
        }
        instance = args.remove(1);
        args.remove(0);
    }
    if args.len() < 2 || args.len() % 2 != 0 {
        return Err(
            "usage: legacy-host [--instance NAME] LIBRARY CONFIG_JSON [TOPIC PAYLOAD]...".into(),
        );
    }
    let messages = (args.len() > 2).then(|| {
        args[2..]
            .chunks(2)
            .map(|pair| Input {
                topic: pair[0].clone(),
                payload: pair[1].clone(),
                headers: BTreeMap::new(),
                attempt: 1,
                id: None,
            })
            .collect()
    });
    Ok(Args {
        instance,
        library: PathBuf::from(&args[0]),
        config: args[1].clone(),
        messages,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("legacy-host: {usage}");
            return ExitCode::from(2);
        }
    };
    let module = match load::load(&args.library) {
        Ok(module) => module,
        Err(e) => {
            Report::LoadError {
                stage: e.stage,
                message: e.message,
            }
            .emit();
            return ExitCode::from(1);
        }
    };
    let (manifest, manifest_error) = match Manifest::decode((module.manifest())().as_slice()) {
        Ok(manifest) => (Some(manifest), None),
        Err(e) => (None, Some(format!("{e:?}"))),
    };
    Report::Loaded {
        host_api_version: plugind_api::API_VERSION,
        manifest,
        manifest_error,
    }
    .emit();
    let services = Arc::new(Printer {
        instance: args.instance,
        next_id: AtomicU64::new(1_000_000),
    });
    // SAFETY: the library is never unloaded (see `load::load`).
    let created = unsafe { Instance::create(module, &args.config, host_handle(services)) };
    let mut instance = match created {
        Ok(instance) => instance,
        Err(CallError { kind, message }) => {
            Report::InstantiateError {
                kind: kind_name(kind),
                message,
            }
            .emit();
            return ExitCode::from(1);
        }
    };
    Report::Instantiated.emit();
    let mut index = 0;
    let mut deliver = |input: Input| {
        deliver(&mut instance, index, input);
        index += 1;
    };
    match args.messages {
        Some(messages) => messages.into_iter().for_each(&mut deliver),
        None => {
            for line in std::io::stdin().lock().lines() {
                let line = match line {
                    Ok(line) => line,
                    Err(e) => {
                        eprintln!("legacy-host: reading stdin: {e}");
                        return ExitCode::from(2);
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str(&line) {
                    Ok(input) => deliver(input),
                    Err(e) => {
                        eprintln!("legacy-host: stdin line {line:?}: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
        }
    }
    let error = instance.shutdown().err().map(|e| e.to_string());
    Report::Shutdown { error }.emit();
    ExitCode::SUCCESS
}

/// Hands one message to the instance and reports what it answered.
fn deliver(instance: &mut Instance, index: usize, input: Input) {
    let stored = Stored {
        id: input.id.unwrap_or(index as u64 + 1),
        attempt: input.attempt,
        topic: input.topic.clone(),
        payload: input.payload.into_bytes(),
        headers: input.headers.into_iter().collect(),
        publish_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    };
    let topic = input.topic;
    match instance.handle(message_handle(Arc::new(stored))) {
        Ok(outcome) => {
            let (outcome, retry_after_ms, reason) = match outcome {
                Outcome::Ack => ("ack", None, None),
                Outcome::Retry { after, reason } => (
                    "retry",
                    after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    Some(reason),
                ),
                Outcome::Reject { reason } => ("reject", None, Some(reason)),
                // `hosting` turns kinds it does not know into a `CallError`; nothing else
                // exists in 1.0.0.
                other => ("unknown", None, Some(format!("{other:?}"))),
            };
            Report::Outcome {
                index,
                topic,
                outcome,
                retry_after_ms,
                reason,
            }
            .emit();
        }
        Err(CallError { kind, message }) => Report::CallError {
            index,
            kind: kind_name(kind),
            message,
        }
        .emit(),
    }
}
