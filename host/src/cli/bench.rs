//! `plugind bench`: the operator's load generator, like `nats bench`. It publishes `--count`
//! messages of `--size` bytes over `PublishStream` in batches of `--batch`, flat out or at an
//! open-loop `--rate`, each stamped with its intended send time (header
//! `plugind-bench-sent`, Unix nanoseconds) so a slow daemon cannot hide its latency. The
//! `bench` example plugin turns the stamps into a publish→handle latency histogram and writes
//! it to the file in its config. Before the first message the tool sends a reset marker
//! (header `plugind-bench-reset`), after the last a flush marker (`plugind-bench-flush`);
//! per-instance delivery order makes the report cover exactly this run.

use std::{
    collections::VecDeque,
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
    let (endpoint, _) = match config::client_endpoint(
        args.client.connect.as_deref(),
        args.client.config.as_deref(),
    ) {
        Ok(found) => found,
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
        "{} messages of {} bytes, batches of {}, {rate}",
        report.messages, report.size, report.batch
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
    let start = Instant::now();
    let start_unix = now_nanos();
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let progress = std::io::stderr().is_terminal();
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let (mut sent, mut answered, mut refused, mut correlation) = (0u64, 0u64, 0u64, 0u64);
    let mut last_progress = Instant::now();
    while answered < args.count {
        // Keep the window full.
        while sent < args.count && in_flight.len() < WINDOW {
            let n = (args.count - sent).min(args.batch as u64);
            if let Some(every) = interval {
                // Open loop: the batch leaves when its last message is due; each message is
                // stamped with its own due time, so batching delay counts as latency.
                pace(start + every.mul_f64((sent + n - 1) as f64)).await;
            }
            let messages = (0..n)
                .map(|i| {
                    let stamp = match interval {
                        Some(every) => start_unix.saturating_add(
                            u64::try_from(every.mul_f64((sent + i) as f64).as_nanos()).unwrap_or(0),
                        ),
                        None => now_nanos(),
                    };
                    pb::PublishRequest {
                        topic: args.topic.clone(),
                        payload: payload.clone(),
                        headers: vec![pb::Header {
                            name: SENT_HEADER.to_owned(),
                            value: stamp.to_string(),
                        }],
                        key: String::new(),
                    }
                })
                .collect();
            correlation += 1;
            batches
                .send(pb::PublishBatch {
                    correlation_id: correlation,
                    messages,
                })
                .await
                .map_err(|_| "the stream closed".to_owned())?;
            in_flight.push_back(n);
            sent += n;
        }
        match answers.next().await {
            Some(Ok(result)) => {
                answered += in_flight.pop_front().unwrap_or(0);
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
    // The flush marker goes after everything, so the plugin reports once it saw it all.
    batches
        .send(marker(correlation + 1, FLUSH_HEADER))
        .await
        .map_err(|_| "the stream closed".to_owned())?;
    drop(batches);
    while answers.next().await.is_some() {}
    Ok((elapsed, refused))
}

/// Waits until `due` precisely: tokio's timer has a 1 ms grain, which at 10,000 msgs/s would
/// itself add up to a millisecond of (honestly counted) latency. Sleeps for the coarse part,
/// then yields until due (the connection task keeps running); the generator spends CPU on
/// the last stretch, as precise load generators do.
async fn pace(due: Instant) {
    loop {
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if left > Duration::from_millis(2) {
            tokio::time::sleep(left - Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
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
