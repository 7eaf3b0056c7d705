//! What the end-to-end tests of the durable ledger share (`tests/durable.rs`,
//! `tests/faults.rs`): a sandbox holding the `fx-record` fixture, configurations of
//! `fx-record` instances, publishing over the real gRPC API, and polling with a deadline.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};

use crate::{
    daemon::Daemon,
    fixtures::{self, Profile},
    record::Recorded,
    sandbox::Sandbox,
};

/// A new sandbox (named after `label`) with the `fx-record` fixture in `plugins.d`.
pub fn sandbox(label: &str) -> Sandbox {
    Sandbox::with_fixtures(label, &["fx-record"])
}

/// A `plugins.toml` with `durability`, no autoload, a 2 s grace period, `max_attempts = 3`
/// and a constant 20 ms backoff, and one `fx-record` instance on topics `t.>` per entry of
/// `instances`: (name, extra lines of its table, lines of its config table).
pub fn config(durability: &str, instances: &[(&str, &str, String)]) -> String {
    let mut text = format!(
        "[host]\ndurability = \"{durability}\"\nautoload = false\ngrace_period = \"2s\"\n\n\
         [defaults]\nmax_attempts = 3\nbackoff = {{ initial = \"20ms\", max = \"20ms\", \
         jitter = 0.0 }}\n"
    );
    for (name, extra, config) in instances {
        text.push_str(&format!(
            "\n[plugins.{name}]\nplugin = \"fx-record\"\ntopics = [\"t.>\"]\n{extra}\n\
             [plugins.{name}.config]\n{config}\n"
        ));
    }
    text
}

/// The config table of an `fx-record` instance recording to `path`, each line fsynced,
/// followed by the lines `more`.
pub fn record_config(path: &Path, more: &str) -> String {
    format!("path = \"{}\"\nfsync = true\n{more}", path.display())
}

/// The config table of an `fx-record` instance that cannot start — its record file would be
/// in a directory of `sandbox` that does not exist — followed by `more`: what it is sent
/// waits in the ledger.
pub fn unstartable_config(sandbox: &Sandbox, more: &str) -> String {
    record_config(&sandbox.path().join("missing/rec.txt"), more)
}

/// Publishes each payload to `t.x` over the real API, one unary call each, with idempotency
/// key `key` if given; returns the ids.
///
/// # Panics
/// If the daemon cannot be reached or refuses a publish (with the status and its log).
pub fn publish_all(d: &Daemon, payloads: &[String], key: Option<&str>) -> Vec<u64> {
    try_publish_all(d, payloads, key)
        .into_iter()
        .map(|answer| {
            answer.unwrap_or_else(|status| {
                panic!("a publish was refused: {status:?}\n{}", d.history())
            })
        })
        .collect()
}

/// Publishes as [`publish_all`] does, but hands back every answer, refusals included: one
/// `Ok(id)` or `Err(status)` per payload, in order. A daemon that cannot be reached (it
/// exited, say) answers `UNAVAILABLE` for each payload; a connection dropped during a call
/// answers whatever status tonic makes of it (`UNAVAILABLE` or `UNKNOWN`).
pub fn try_publish_all(
    d: &Daemon,
    payloads: &[String],
    key: Option<&str>,
) -> Vec<Result<u64, tonic::Status>> {
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(async {
        let mut c = match client::connect(&endpoint, None).await {
            Ok(c) => c,
            Err(e) => {
                return payloads
                    .iter()
                    .map(|_| Err(tonic::Status::unavailable(e.clone())))
                    .collect();
            }
        };
        let mut answers = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let request = c.request(pb::PublishRequest {
                topic: "t.x".into(),
                payload: payload.clone().into_bytes().into(),
                headers: vec![],
                key: key.unwrap_or_default().into(),
            });
            answers.push(
                c.publisher
                    .publish(request)
                    .await
                    .map(|reply| reply.into_inner().id),
            );
        }
        answers
    })
}

/// Polls `done` every 10 ms until it holds.
///
/// # Panics
/// After 20 s, naming `what`, with every run's log of `d`.
pub fn wait_until(what: &str, d: &Daemon, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting until {what}:\n{}",
            d.history()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The distinct message ids in `records`.
pub fn ids(records: &[Recorded]) -> BTreeSet<u64> {
    records.iter().map(|r| r.id).collect()
}

/// The distinct message ids of the complete lines of the `fx-record` file `path` (none if it
/// does not exist), while an instance may still be writing it: a reader can see a long line
/// (payloads of KiBs) half written, and a kill can tear one, so only lines ending in ` .`
/// count, as [`crate::record::read_record`] counts them.
///
/// # Panics
/// If the file cannot be read or a complete line does not start with an id.
pub fn recorded_ids(path: &Path) -> BTreeSet<u64> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeSet::new(),
        Err(e) => panic!("cannot read the record {}: {e}", path.display()),
    };
    bytes
        .split_inclusive(|b| *b == b'\n')
        // Complete records only (see `fx-record`): blank separators and torn lines skipped.
        .filter_map(|line| line.strip_suffix(b" .\n"))
        .map(|line| {
            let id = line.split(|b| *b == b' ').next().unwrap_or_default();
            std::str::from_utf8(id)
                .ok()
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "not an fx-record line in {}: {:?}",
                        path.display(),
                        String::from_utf8_lossy(&line[..line.len().min(200)])
                    )
                })
        })
        .collect()
}

/// A sandbox with one `fx-block` instance `block` on `t.>` (a 10 s grace period), whose
/// calls hold until the returned gate file exists: its configuration and the gate.
pub fn block_sandbox(label: &str) -> (Sandbox, String, std::path::PathBuf) {
    let s = Sandbox::new(label);
    s.dir("plugins.d");
    s.copy(
        "plugins.d/fx-block.so",
        &fixtures::library("fx-block", Profile::Dev),
    );
    let gate = s.path().join("gate");
    let config = format!(
        "[host]\nautoload = false\ngrace_period = \"10s\"\n\n[plugins.block]\nplugin = \
         \"fx-block\"\ntopics = [\"t.>\"]\n[plugins.block.config]\ngate = \"{}\"\n",
        gate.display()
    );
    (s, config, gate)
}
