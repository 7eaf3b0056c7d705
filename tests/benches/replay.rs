//! An operator's replay and purge of 100,000 dead letters named by id, while publishes flow
//! (issue 18, item 5: they used to stop every publish for 0.5–1.9 ms per id, 51–192 s for
//! 100,000). The release daemon in `fsync` mode with two `fx-record` instances: `dl` fails
//! every message (`retry_on`, `max_attempts = 1`: each becomes a dead letter at once; its
//! circuit never opens) and
//! `sink` takes the publishes measured meanwhile.
//!
//! 1. COUNT messages to `dl` over `PublishStream` (batches of 256, 8 in flight): the
//!    publish cost per message, for comparison; then `dl` is paused (what is replayed waits).
//! 2. Publish latency with nothing else going on: unary publishes to `sink` at 1,000 msgs/s
//!    for 5 s, open loop (each sent at its time, answered or not), each timed from its
//!    intended send time to its answer.
//! 3. `Replay` of the COUNT ids in one request, the same publishes going on: its duration and
//!    the publishes' latency while it ran.
//! 4. `dl` resumed: every replayed message fails again and is dead-lettered; then `Purge` of
//!    the COUNT ids in one request, measured the same way.
//!
//! Run: `cargo bench -p plugind-tests --bench replay -- [COUNT]` (default 100000).

use std::time::{Duration, Instant};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use plugind_tests::{
    daemon::Daemon,
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

/// The publishes measured beside each operation: one every millisecond.
const INTERVAL: Duration = Duration::from_millis(1);

fn start() -> Daemon {
    let sandbox = Sandbox::new("bench-replay");
    sandbox.dir("plugins.d");
    sandbox.copy(
        "plugins.d/fx-record.so",
        &fixtures::library("fx-record", Profile::Release),
    );
    let path = |name: &str| sandbox.path().join(name).display().to_string();
    let config = format!(
        "[host]\nautoload = false\ndurability = \"fsync\"\n\n\
         [plugins.dl]\nplugin = \"fx-record\"\ntopics = [\"dl.>\"]\nmax_attempts = 1\n\
         max_backlog = \"1GiB\"\ncircuit = {{ failures = 1000000 }}\n[plugins.dl.config]\npath = \"{}\"\nretry_on = \"dead\"\n\n\
         [plugins.sink]\nplugin = \"fx-record\"\ntopics = [\"t.>\"]\n\
         [plugins.sink.config]\npath = \"{}\"\n",
        path("dl.txt"),
        path("sink.txt")
    );
    Daemon::start_release(sandbox, &config)
}

/// Publishes `count` messages `dead` to `dl.x` over `PublishStream`; their ids.
async fn dead_letters(c: &mut client::Client, count: u64) -> Vec<u64> {
    const BATCH: u64 = 256;
    let batches: Vec<pb::PublishBatch> = (0..count.div_ceil(BATCH))
        .map(|b| pb::PublishBatch {
            correlation_id: b,
            messages: (b * BATCH..((b + 1) * BATCH).min(count))
                .map(|_| pb::PublishRequest {
                    topic: "dl.x".into(),
                    payload: "dead".into(),
                    headers: vec![],
                    key: String::new(),
                })
                .collect(),
        })
        .collect();
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    let request = c.request(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let mut results = c
        .publisher
        .publish_stream(request)
        .await
        .expect("PublishStream")
        .into_inner();
    let feeding = tokio::spawn(async move {
        for batch in batches {
            if sender.send(batch).await.is_err() {
                break;
            }
        }
    });
    let mut ids = Vec::with_capacity(count as usize);
    while (ids.len() as u64) < count {
        let result = results
            .message()
            .await
            .expect("a batch result")
            .expect("the stream stays open");
        for outcome in result.outcomes {
            match outcome.outcome {
                Some(pb::publish_outcome::Outcome::Id(id)) => ids.push(id),
                other => panic!("a publish was refused: {other:?}"),
            }
        }
    }
    feeding.await.unwrap();
    ids
}

async fn status(c: &mut client::Client) -> pb::StatusResponse {
    c.control
        .status(c.request(pb::StatusRequest {}))
        .await
        .expect("Status")
        .into_inner()
}

/// Waits until the ledger counted `count` dead letters since start.
async fn wait_dead_lettered(c: &mut client::Client, count: u64) {
    let started = Instant::now();
    loop {
        let dead = status(c).await.ledger.map_or(0, |l| l.dead_lettered);
        if dead >= count {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {dead} of {count} dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unary publishes to `sink`, one per [`INTERVAL`], until `stop` says so: the latency of
/// each from its intended send time to its answer, in µs. Open loop: each is sent at its
/// time whether or not the ones before were answered (a stall is counted for every publish
/// it holds up, not hidden by a client that waits).
async fn paced(c: client::Client, stop: tokio::sync::watch::Receiver<bool>) -> Vec<u64> {
    let started = Instant::now();
    let mut sent = Vec::new();
    for i in 0u32.. {
        if *stop.borrow() {
            break;
        }
        let intended = started + INTERVAL * i;
        tokio::time::sleep_until(intended.into()).await;
        let mut c = c.clone();
        sent.push(tokio::spawn(async move {
            let request = c.request(pb::PublishRequest {
                topic: "t.x".into(),
                payload: "flowing".into(),
                headers: vec![],
                key: String::new(),
            });
            c.publisher.publish(request).await.expect("a publish");
            intended.elapsed().as_micros() as u64
        }));
    }
    let mut latencies = Vec::with_capacity(sent.len());
    for publish in sent {
        latencies.push(publish.await.expect("the publish task"));
    }
    latencies
}

/// Runs `operation` while [`paced`] publishes go on (and for 5 s alone when it is `None`):
/// its duration, and the publishes' latencies.
async fn beside<F, T>(endpoint: &Endpoint, operation: Option<F>) -> (Duration, Vec<u64>, Option<T>)
where
    F: std::future::Future<Output = T>,
{
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let publisher = client::connect(endpoint, None).await.expect("connect");
    let publishes = tokio::spawn(paced(publisher, stopped));
    // The publishes settle first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let out = match operation {
        Some(operation) => Some(operation.await),
        None => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            None
        }
    };
    let took = started.elapsed();
    stop.send(true).unwrap();
    let mut latencies = publishes.await.unwrap();
    // Only those sent while the operation ran (the first 200 ms are left out).
    let skip = (Duration::from_millis(200).as_micros() / INTERVAL.as_micros()) as usize;
    latencies.drain(..skip.min(latencies.len()));
    (took, latencies, out)
}

fn summary(latencies: &mut [u64]) -> String {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    if latencies.is_empty() {
        return "no publishes".into();
    }
    format!(
        "{} publishes: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        latencies[latencies.len() - 1]
    )
}

fn main() {
    let count: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let d = start();
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut c = client::connect(&endpoint, None).await.expect("connect");
        let started = Instant::now();
        let ids = dead_letters(&mut c, count).await;
        let publishing = started.elapsed();
        println!(
            "published {count} messages over PublishStream in {:.2} s: {:.2} µs per message",
            publishing.as_secs_f64(),
            publishing.as_micros() as f64 / count as f64
        );
        wait_dead_lettered(&mut c, count).await;
        c.control
            .pause(c.request(pb::InstanceRequest { name: "dl".into() }))
            .await
            .expect("Pause");

        let (_, mut alone, _) = beside(&endpoint, None::<std::future::Ready<()>>).await;
        println!("publishes alone: {}", summary(&mut alone));

        let selection = pb::SelectionRequest {
            instance: String::new(),
            ids: ids.clone(),
            all: false,
        };
        let mut operator = client::connect(&endpoint, None).await.expect("connect");
        let request = operator.request(selection.clone());
        let (took, mut during, replayed) =
            beside(&endpoint, Some(operator.control.replay(request))).await;
        let replayed = replayed.unwrap().expect("Replay").into_inner();
        println!(
            "replay of {count} ids: {:.2} s ({:.2} µs per id), {} back in a queue; publishes \
             meanwhile: {}",
            took.as_secs_f64(),
            took.as_micros() as f64 / count as f64,
            replayed.queued,
            summary(&mut during)
        );

        c.control
            .resume(c.request(pb::InstanceRequest { name: "dl".into() }))
            .await
            .expect("Resume");
        wait_dead_lettered(&mut c, 2 * count).await;
        let request = operator.request(selection);
        let (took, mut during, purged) =
            beside(&endpoint, Some(operator.control.purge(request))).await;
        let purged = purged.unwrap().expect("Purge").into_inner();
        println!(
            "purge of {count} ids: {:.2} s ({:.2} µs per id), {} purged; publishes meanwhile: \
             {}",
            took.as_secs_f64(),
            took.as_micros() as f64 / count as f64,
            purged.count,
            summary(&mut during)
        );
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    for line in log
        .lines()
        .filter(|l| l.contains("ledger: commits since start"))
    {
        println!("daemon: {line}");
    }
}
