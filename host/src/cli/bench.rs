//! `plugind bench`: the operator's load generator, like `nats bench`. It publishes `--count`
//! messages of `--size` bytes over `PublishStream` in batches of `--batch`, flat out or at an
//! open-loop `--rate`, each stamped with its intended send time (header
//! `plugind-bench-sent`, Unix nanoseconds) so a slow daemon cannot hide its latency. The
//! `bench` example plugin turns the stamps into a publish→handle latency histogram and writes
//! it to the file in its config. Before the first message the tool sends a reset marker
//! (header `plugind-bench-reset`), after the last a flush marker (`plugind-bench-flush`);
//! per-instance delivery order makes the report cover exactly this run. With `--keyed` every
//! message carries an idempotency key of its own (unique to the run).

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;

use crate::{
    cli::{ClientArgs, EXIT_FAILURE, EXIT_USAGE, fail},
    config,
    control::{client, pb},
};

/// The header carrying a message's intended send time.
pub const SENT_HEADER: &str = "plugind-bench-sent";
/// The header asking the bench plugin to write its report now.
pub const FLUSH_HEADER: &str = "plugind-bench-flush";
/// The header asking the bench plugin to start a new histogram.
pub const RESET_HEADER: &str = "plugind-bench-reset";

/// Batches in flight on the stream at most.
const WINDOW: usize = 32;

/// What to run.
#[derive(Debug)]
pub struct Args {
    pub count: u64,
    pub size: usize,
    pub batch: usize,
    /// Messages per second; 0 = as fast as the daemon accepts.
    pub rate: u64,
    pub topic: String,
    /// The bench plugin's `output` file.
    pub report: Option<PathBuf>,
    /// Every message with an idempotency key of its own.
    pub keyed: bool,
    /// `--json`, `--connect`, `-c`.
    pub client: ClientArgs,
}

/// The bench plugin's report (see `plugins/bench`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Latency {
    pub count: u64,
    #[serde(default)]
    pub unstamped: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The result, as printed with `--json`.
#[derive(Debug, Serialize)]
struct Report {
    messages: u64,
    size: usize,
    batch: usize,
    keyed: bool,
    rate: Option<u64>,
    refused: u64,
    seconds: f64,
    /// Accepted messages per second (publish side).
    msgs_per_sec: f64,
    /// Latency reported by the bench plugin, if a report file was given.
    latency: Option<Latency>,
    /// Messages handled per second, from the first publish until the bench plugin reported
    /// the last one handled (with a report file): the sustained end-to-end rate.
    end_to_end_msgs_per_sec: Option<f64>,
}

/// Runs `bench`.
pub fn run(args: Args) -> ExitCode {
    if args.count == 0 || args.batch == 0 {
        return fail(EXIT_USAGE, "bench: --count and --batch must be at least 1");
    }
    let endpoint = match config::client_endpoint(
        args.client.connect.as_deref(),
        args.client.config.as_deref(),
    ) {
        Ok(found) => found.endpoint,
        Err(e) => return fail(EXIT_FAILURE, format_args!("bench: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format_args!("bench: {e}")),
    };
    if let Some(path) = &args.report {
        // A report from an earlier run must not be mistaken for this one's.
        let _ = std::fs::remove_file(path);
    }
    let started = std::time::Instant::now();
    let result = runtime.block_on(publish_all(&endpoint, &args));
    let (elapsed, refused) = match result {
        Ok(done) => done,
        Err(e) => return fail(EXIT_FAILURE, format_args!("bench: {e}")),
    };
    let latency = match &args.report {
        Some(path) => match wait_for_report(path, args.count - refused) {
            Ok(latency) => Some(latency),
            Err(e) => return fail(EXIT_FAILURE, format_args!("bench: {e}")),
        },
        None => None,
    };
    let handled_in = started.elapsed();
    let report = Report {
        messages: args.count,
        size: args.size,
        batch: args.batch,
        keyed: args.keyed,
        rate: (args.rate > 0).then_some(args.rate),
        refused,
        seconds: elapsed.as_secs_f64(),
        msgs_per_sec: (args.count - refused) as f64 / elapsed.as_secs_f64(),
        end_to_end_msgs_per_sec: latency
            .as_ref()
            .map(|_| (args.count - refused) as f64 / handled_in.as_secs_f64()),
        latency,
    };
    if args.client.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serializes")
        );
    } else {
        print_text(&report);
    }
    ExitCode::SUCCESS
}

fn print_text(report: &Report) {
    let rate = report
        .rate
        .map_or_else(|| "flat out".to_owned(), |r| format!("{r} msgs/s offered"));
    println!(
        "{} messages of {} bytes, batches of {}, {rate}{}",
        report.messages,
        report.size,
        report.batch,
        if report.keyed {
            ", each with an idempotency key"
        } else {
            ""
        }
    );
    println!(
        "  published in {:.2} s: {:.0} msgs/s{}",
        report.seconds,
        report.msgs_per_sec,
        if report.refused > 0 {
            format!(" ({} refused)", report.refused)
        } else {
            String::new()
        }
    );
    if let Some(rate) = report.end_to_end_msgs_per_sec {
        println!("  end to end (until the last was handled): {rate:.0} msgs/s");
    }
    if let Some(l) = &report.latency {
        println!(
            "  publish→handle latency over {} messages: min {} µs, p50 {} µs, p90 {} µs, \
             p99 {} µs, p99.9 {} µs, max {} µs, mean {:.0} µs",
            l.count, l.min_us, l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us
        );
    }
}

fn now_nanos() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Publishes everything; returns the time it took and how many were refused.
async fn publish_all(endpoint: &config::Endpoint, args: &Args) -> Result<(Duration, u64), String> {
    let token = std::env::var("PLUGIND_TOKEN").ok();
    let mut client = client::connect(endpoint, token.as_deref()).await?;
    let (batches, requests) = tokio::sync::mpsc::channel::<pb::PublishBatch>(WINDOW);
    let request = client.request(tokio_stream::wrappers::ReceiverStream::new(requests));
    let mut answers = client
        .publisher
        .publish_stream(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let marker = |correlation_id, header: &str| pb::PublishBatch {
        correlation_id,
        messages: vec![pb::PublishRequest {
            topic: args.topic.clone(),
            payload: Bytes::new(),
            headers: vec![pb::Header {
                name: header.to_owned(),
                value: "1".to_owned(),
            }],
            key: String::new(),
        }],
    };
    batches
        .send(marker(0, RESET_HEADER))
        .await
        .map_err(|_| "the stream closed".to_owned())?;
    match answers.next().await {
        Some(Ok(_)) => {}
        Some(Err(status)) => return Err(format!("{:?}: {}", status.code(), status.message())),
        None => return Err("the daemon closed the stream".to_owned()),
    }
    let payload = Bytes::from(vec![0x42u8; args.size]);
    let progress = std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let (start, start_unix) = (Instant::now(), now_nanos());
    let batches_of = Batches {
        topic: args.topic.clone(),
        payload,
        count: args.count,
        batch: args.batch as u64,
        // Keys unique to this run: an earlier run's are still within dedupe_window.
        keys: args.keyed.then(|| format!("bench-{start_unix}-")),
    };
    // At a rate, a thread of its own sends each batch when its last message is due (open
    // loop: a slow daemon does not slow the offered load); flat out, a window of batches is
    // kept in flight.
    let pacer = (args.rate > 0).then(|| {
        let every = Duration::from_secs_f64(1.0 / args.rate as f64);
        let (sender, batches_of) = (batches.clone(), batches_of.clone());
        std::thread::spawn(move || pace(start, start_unix, every, &batches_of, &sender))
    });
    let (mut sent, mut answered, mut refused, mut correlation) = (0u64, 0u64, 0u64, 0u64);
    let mut in_flight = 0;
    while answered < args.count {
        while pacer.is_none() && sent < args.count && in_flight < WINDOW {
            correlation += 1;
            let batch = batches_of.make(correlation, sent, |_| now_nanos());
            sent += batch.messages.len() as u64;
            batches
                .send(batch)
                .await
                .map_err(|_| "the stream closed".to_owned())?;
            in_flight += 1;
        }
        match answers.next().await {
            Some(Ok(result)) => {
                if pacer.is_none() {
                    in_flight -= 1;
                }
                answered += result.outcomes.len() as u64;
                refused += result
                    .outcomes
                    .iter()
                    .filter(|o| matches!(o.outcome, Some(pb::publish_outcome::Outcome::Refused(_))))
                    .count() as u64;
            }
            Some(Err(status)) => return Err(format!("{:?}: {}", status.code(), status.message())),
            None => return Err("the daemon closed the stream".to_owned()),
        }
        if progress && last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            eprint!(
                "\r  {answered}/{} published ({:.0}%)   ",
                args.count,
                100.0 * answered as f64 / args.count as f64
            );
            let _ = std::io::stderr().flush();
        }
    }
    let elapsed = start.elapsed();
    if progress {
        eprintln!("\r  {answered}/{} published (100%)   ", args.count);
    }
    if let Some(pacer) = pacer {
        correlation = pacer
            .join()
            .map_err(|_| "the pacing thread failed".to_owned())??;
    }
    // The flush marker goes after everything, so the plugin reports once it saw it all.
    batches
        .send(marker(correlation + 1, FLUSH_HEADER))
        .await
        .map_err(|_| "the stream closed".to_owned())?;
    drop(batches);
    while answers.next().await.is_some() {}
    Ok((elapsed, refused))
}

/// The batches of one run, made as they are sent.
#[derive(Clone)]
struct Batches {
    topic: String,
    payload: Bytes,
    count: u64,
    batch: u64,
    /// The prefix of every message's key (`None`: no keys).
    keys: Option<String>,
}

impl Batches {
    /// The batch starting at message `first`; `stamp` gives message `i`'s send time.
    fn make(
        &self,
        correlation_id: u64,
        first: u64,
        stamp: impl Fn(u64) -> u64,
    ) -> pb::PublishBatch {
        let n = (self.count - first).min(self.batch);
        pb::PublishBatch {
            correlation_id,
            messages: (first..first + n)
                .map(|i| pb::PublishRequest {
                    topic: self.topic.clone(),
                    payload: self.payload.clone(),
                    headers: vec![pb::Header {
                        name: SENT_HEADER.to_owned(),
                        value: stamp(i).to_string(),
                    }],
                    key: self
                        .keys
                        .as_ref()
                        .map_or_else(String::new, |prefix| format!("{prefix}{i}")),
                })
                .collect(),
        }
    }
}

/// Sends every batch when its last message is due (message `i` is due `i × every` after
/// `start`, which is `start_unix` on the wall clock), sleeping in between with the timer
/// slack at its minimum: late by the wake-up latency (tens of µs), without spinning a core
/// that the daemon, on the same machine, would miss. Each message carries its due time, so
/// lateness counts as latency. Returns the last correlation id.
fn pace(
    start: Instant,
    start_unix: u64,
    every: Duration,
    batches: &Batches,
    sender: &tokio::sync::mpsc::Sender<pb::PublishBatch>,
) -> Result<u64, String> {
    let due = |i: u64| every.mul_f64(i as f64);
    // Wake up on time: the default slack (50 µs) would be counted as latency. Best effort.
    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
    let mut correlation = 0;
    for first in (0..batches.count).step_by(batches.batch as usize) {
        correlation += 1;
        let last = (first + batches.batch).min(batches.count) - 1;
        // Made while there is time: the stamps are the due times, known in advance.
        let batch = batches.make(correlation, first, |i| {
            start_unix.saturating_add(u64::try_from(due(i).as_nanos()).unwrap_or(u64::MAX))
        });
        let left = (start + due(last)).saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
        sender
            .blocking_send(batch)
            .map_err(|_| "the stream closed".to_owned())?;
    }
    Ok(correlation)
}

fn read_report(path: &Path) -> Option<Latency> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Waits (60 s at most) until the bench plugin reported at least `count` messages.
fn wait_for_report(path: &Path, count: u64) -> Result<Latency, String> {
    let start = Instant::now();
    loop {
        if let Some(latency) = read_report(path)
            && latency.count >= count
        {
            return Ok(latency);
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the bench plugin's report {} did not reach {count} messages within 60 s (is \
                 an instance of the bench plugin subscribed to the topic, with this output?)",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
