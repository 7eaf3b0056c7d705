//! The fault campaign's kill loop: producers publish continuously (directly to two recording
//! instances, and through a pipeline stage to a third) while the daemon is killed with
//! SIGKILL at random moments and restarted on the same state dir; then the history checker
//! compares every answer with what the plugins saw. Nothing answered OK may be lost, nothing
//! refused or never published may arrive, no attempt may pass `max_attempts` and no retry may
//! come before its backoff. Duplicates are allowed (at least once) and counted.
//!
//! In the suite: 20 kills (`PLUGIND_CAMPAIGN_KILLS` overrides). The soak, documented in
//! README.md: `PLUGIND_CAMPAIGN_KILLS=1000 cargo test --release -p plugind-tests --test
//! campaign -- --nocapture`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use plugind_tests::{
    daemon::Daemon,
    fixtures::{self, Profile},
    history::{self, Answer, Published, Report, Target},
    ledger_support::sandbox,
    record::read_record,
};

const MAX_ATTEMPTS: u32 = 5;
const BACKOFF_MS: u64 = 50;

fn kills() -> usize {
    std::env::var("PLUGIND_CAMPAIGN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// One producer: publishes `<prefix>-<n>` to `topic` until told to stop, reconnecting after
/// every kill, and logs each answer.
fn produce(
    socket: std::path::PathBuf,
    topic: &'static str,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Published>>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let endpoint = Endpoint::Unix(socket);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut c) = client::connect(&endpoint, None).await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let payload = format!("{prefix}-{n}");
                let request = c.request(pb::PublishRequest {
                    topic: topic.into(),
                    payload: payload.clone().into_bytes().into(),
                    headers: vec![],
                    key: String::new(),
                });
                let answer = match c.publisher.publish(request).await {
                    Ok(response) => Answer::Ok(response.into_inner().id),
                    // The daemon died under the call: it may or may not have stored it.
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled
                        ) =>
                    {
                        Answer::Unknown
                    }
                    Err(status) => Answer::Refused(status.to_string()),
                };
                let broken = answer == Answer::Unknown;
                log.lock().unwrap().push(Published {
                    topic: topic.into(),
                    payload,
                    answer,
                });
                if broken {
                    break;
                }
            }
        }
    });
}

#[test]
fn nothing_answered_ok_is_lost_across_sigkills_at_random_moments() {
    let s = sandbox("campaign");
    s.copy(
        "plugins.d/fx-pipeline.so",
        &fixtures::library("fx-pipeline", Profile::Dev),
    );
    let dir = s.path().to_owned();
    let record = |name: &str| dir.join(format!("{name}.txt"));
    let recorder = |name: &str, topics: &str| {
        format!(
            "\n[plugins.{name}]\nplugin = \"fx-record\"\ntopics = [\"{topics}\"]\n\
             [plugins.{name}.config]\npath = \"{}\"\n",
            record(name).display()
        )
    };
    let mut config = format!(
        "[host]\ndurability = \"fsync\"\nautoload = false\ngrace_period = \"2s\"\n\n\
         [defaults]\nmax_attempts = {MAX_ATTEMPTS}\nbackoff = {{ initial = \"{BACKOFF_MS}ms\", \
         max = \"{BACKOFF_MS}ms\", jitter = 0.0 }}\ncircuit = {{ failures = 1000 }}\n"
    );
    config.push_str(&recorder("a", "t.>"));
    config.push_str(&recorder("b", "t.>"));
    config.push_str(&recorder("sink", "c.>"));
    config.push_str(
        "\n[plugins.upper]\nplugin = \"fx-pipeline\"\ntopics = [\"p.>\"]\n\
         [plugins.upper.config]\nto = \"c.upper\"\n",
    );
    let mut d = Daemon::start(s, &config);
    let socket = d.socket().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let producers: Vec<_> = [("t.x", "t"), ("p.x", "p")]
        .into_iter()
        .map(|(topic, prefix)| {
            let (socket, stop, log) = (socket.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || produce(socket, topic, prefix, stop, log))
        })
        .collect();

    let kills = kills();
    let started = Instant::now();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(fastrand::u64(20..250)));
        d = Daemon::restart(d.kill9());
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.join().unwrap();
    }
    let published = log.lock().unwrap().clone();

    // Every delivery settles after the last restart; then the history is checked.
    let check = || {
        let (a, b, sink) = (
            read_record(&record("a")),
            read_record(&record("b")),
            read_record(&record("sink")),
        );
        let targets = [
            Target {
                name: "a",
                records: &a,
                topic: "t.x",
                derive: None,
            },
            Target {
                name: "b",
                records: &b,
                topic: "t.x",
                derive: None,
            },
            Target {
                name: "sink",
                records: &sink,
                topic: "p.x",
                derive: Some(|p| p.to_ascii_uppercase()),
            },
        ];
        // 5 ms of tolerance: the plugin's clock reads and the timer's grain.
        history::check(&published, &targets, MAX_ATTEMPTS, BACKOFF_MS - 5)
    };
    let waited = Instant::now();
    let mut report = check();
    while !report.lost.is_empty() && waited.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        report = check();
    }
    println!(
        "campaign: {kills} kills in {:.1} s; {} publishes checked ({} OK, {} refused, {} \
         unknown); {} duplicates ({:.1} per kill); lost {}, unexpected {}, wrong ids {}, over \
         max_attempts {}, early retries {}",
        started.elapsed().as_secs_f64(),
        report.published,
        report.answered_ok,
        report.refused,
        report.unknown,
        report.duplicates,
        report.duplicates as f64 / kills.max(1) as f64,
        report.lost.len(),
        report.unexpected.len(),
        report.wrong_id.len(),
        report.over_attempts.len(),
        report.early_retries.len(),
    );
    assert!(
        report.answered_ok > kills,
        "the producers got answers between the kills: {report:?}"
    );
    assert!(
        report.is_clean(),
        "{:#?}\n{}",
        Report {
            lost: report.lost.iter().take(20).cloned().collect(),
            ..report.clone()
        },
        d.history()
            .lines()
            .rev()
            .take(80)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
