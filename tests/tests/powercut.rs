//! The power-cut simulation: no publish answered OK in `durability = "fsync"` is lost when
//! the power fails, and what `buffered` loses under the same cut.
//!
//! The daemon runs with the `writelog` shim (`tests/shims/writelog.c`) preloaded: every write,
//! truncation and fsync of `ledger.db` and `ledger.db-wal` is logged with the (realtime)
//! moment it completed, and for fsyncs also when it started. Producers publish over the real
//! API and note when each OK arrived; then the daemon is killed. For each cut point `T`,
//! `plugind_tests::powercut` rebuilds the two files as the disk holds them after a power cut
//! at `T` under the strict model (a change survives only if an fsync of its file started
//! after it completed and completed before `T`; everything else is dropped), SQLite opens
//! them (recovering the log), and every message answered OK before `T` must be there with its
//! payload. The instance cannot start, so nothing is ever acked or removed from the ledger.
//!
//! Cut points: random ones across the run, ones 1 µs after an OK arrived (the fsync that
//! covered it has only just completed), and the end of the run.
//!
//! Run with `--nocapture` for the one-line summaries (BENCHMARKS.md / the reliability notes).

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use plugind_tests::{
    daemon::Daemon,
    ledger_support::{config, sandbox, unstartable_config},
    powercut::{self, Disk, Syncs, WriteLog},
    sandbox::Sandbox,
};
use rusqlite::Connection;

/// Concurrent producers, each on its own connection, one unary publish at a time.
const PRODUCERS: usize = 8;
/// How long they publish (each run; the shim slows every ledger write down).
/// How long they publish (each run; the shim slows every ledger write down):
/// `PLUGIND_POWERCUT_SECONDS`, 2.5 s by default.
fn publishing() -> Duration {
    std::env::var("PLUGIND_POWERCUT_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(Duration::from_millis(2500), Duration::from_secs_f64)
}

/// Random cut points, and as many just after an OK arrived: `PLUGIND_POWERCUT_CUTS` each,
/// 30 by default. (The long version, documented in README.md: 60 s and 1,000 cuts each.)
fn cuts_each() -> usize {
    std::env::var("PLUGIND_POWERCUT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos(),
    )
    .expect("before 2554")
}

/// A publish answered OK: its id, when the OK arrived (realtime ns), its payload.
#[derive(Debug)]
struct Answered {
    id: u64,
    at: u64,
    payload: Vec<u8>,
}

/// One daemon run under the shim, killed at the end.
struct Run {
    /// Holds the write log; removed when the run is dropped.
    sandbox: Sandbox,
    log: WriteLog,
    /// Sorted by `at`.
    answered: Vec<Answered>,
    refused: usize,
    ended: u64,
}

fn run(durability: &str) -> Run {
    let shim = powercut::writelog_shim();
    let s = sandbox("powercut");
    let writelog = s.path().join("writelog.bin");
    // The instance cannot start (its record file is in a missing directory): everything
    // accepted stays in `messages`.
    let text = config(durability, &[("held", "", unstartable_config(&s, ""))]);
    let d = Daemon::start_with_env(
        s,
        &text,
        &[
            ("LD_PRELOAD", shim.as_os_str()),
            ("PLUGIND_TEST_WRITELOG", writelog.as_os_str()),
        ],
    );
    let (mut answered, refused) = publish_for(d.socket(), publishing());
    let sandbox = d.kill9();
    // Every logged operation completed before the kill: the log is whole.
    let ended = now_ns();
    let log = WriteLog::read(&sandbox.path().join("writelog.bin"));
    // The shim saw every change: replaying all of them gives the files the daemon left.
    for (name, image) in powercut::FILES.iter().zip(log.final_files()) {
        let path = sandbox.path().join("state").join(name);
        let on_disk = fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == image,
            "{} ({} bytes) differs from the replay of every logged change to it ({} bytes): \
             the shim missed a write path",
            path.display(),
            on_disk.len(),
            image.len()
        );
    }
    answered.sort_by_key(|a| a.at);
    Run {
        sandbox,
        log,
        answered,
        refused,
        ended,
    }
}

/// `PRODUCERS` producers publish unique payloads to `t.x` for `how_long`; the OKs (with
/// when each arrived) and the number of refusals.
fn publish_for(socket: &Path, how_long: Duration) -> (Vec<Answered>, usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let endpoint = Endpoint::Unix(socket.to_owned());
    runtime.block_on(async move {
        let deadline = Instant::now() + how_long;
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let mut c = client::connect(&endpoint, None)
                        .await
                        .expect("the daemon is reachable");
                    let (mut answered, mut refused) = (Vec::new(), 0);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        n += 1;
                        let payload = format!("p{p}-{n}").into_bytes();
                        let request = c.request(pb::PublishRequest {
                            topic: "t.x".into(),
                            payload: payload.clone().into(),
                            headers: vec![],
                            key: String::new(),
                        });
                        match c.publisher.publish(request).await {
                            Ok(reply) => answered.push(Answered {
                                id: reply.into_inner().id,
                                at: now_ns(),
                                payload,
                            }),
                            Err(_) => refused += 1,
                        }
                    }
                    (answered, refused)
                })
            })
            .collect();
        let (mut all, mut refused) = (Vec::new(), 0);
        for producer in producers {
            let (answered, r) = producer.await.expect("a producer does not panic");
            all.extend(answered);
            refused += r;
        }
        (all, refused)
    })
}

/// The cut points of a run, increasing: random moments from its first logged operation to
/// its end, 1 µs after randomly chosen OKs, and the end.
fn cuts(run: &Run) -> Vec<u64> {
    let first = run
        .log
        .ops()
        .first()
        .expect("the daemon wrote its ledger")
        .end;
    let mut cuts: Vec<u64> = (0..cuts_each())
        .map(|_| fastrand::u64(first..=run.ended))
        .collect();
    if !run.answered.is_empty() {
        cuts.extend(
            (0..cuts_each())
                .map(|_| run.answered[fastrand::usize(..run.answered.len())].at + 1_000),
        );
    }
    cuts.push(run.ended);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// The messages a rebuilt ledger in `dir` holds: id → payload (`None` for a dead letter
/// whose message row is gone, which this test never makes). An empty database (no schema
/// yet) holds none.
///
/// # Errors
/// When SQLite cannot open or read it, or `quick_check` finds it damaged.
fn ledger_contents(dir: &Path) -> Result<HashMap<u64, Option<Vec<u8>>>, String> {
    // Read-write: SQLite recovers the log into a fresh -shm.
    let conn = Connection::open(dir.join("ledger.db")).map_err(|e| e.to_string())?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'messages'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("reading the schema: {e}"))?;
    let mut held = HashMap::new();
    if tables == 0 {
        return Ok(held);
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("quick_check: {e}"))?;
    if check != "ok" {
        return Err(format!("quick_check: {check}"));
    }
    let mut rows = conn
        .prepare("SELECT id, payload FROM messages")
        .map_err(|e| e.to_string())?;
    let messages = rows
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(|e| e.to_string())?;
    for message in messages {
        let (id, payload) = message.map_err(|e| e.to_string())?;
        held.insert(id as u64, Some(payload));
    }
    let mut rows = conn
        .prepare("SELECT msg FROM dead_letters")
        .map_err(|e| e.to_string())?;
    let dead = rows
        .query_map([], |r| r.get::<_, i64>(0))
        .map_err(|e| e.to_string())?;
    for id in dead {
        held.entry(id.map_err(|e| e.to_string())? as u64)
            .or_insert(None);
    }
    Ok(held)
}

/// What one cut left, against the OKs received before it.
#[derive(Debug, Default)]
struct Cut {
    at: u64,
    /// OKs received before the cut.
    expected: usize,
    /// Of those, the ids missing, and the ids present with another payload.
    lost: Vec<u64>,
    /// How long before the cut the oldest lost OK arrived (ns).
    lost_age: u64,
    wrong: Vec<u64>,
    /// Every id the ledger holds.
    held: BTreeSet<u64>,
}

/// Cuts `run` at every point of `cuts` under the model `syncs`; panics if a rebuilt ledger
/// cannot be read (a power cut must never leave an unreadable ledger, in any mode).
fn evaluate(run: &Run, cuts: &[u64], syncs: Syncs) -> Vec<Cut> {
    let mut disk = Disk::new(&run.log, syncs);
    let dir = run.sandbox.path().join(format!("cut-{syncs:?}"));
    cuts.iter()
        .map(|&at| {
            disk.write_cut(at, &dir);
            let held = ledger_contents(&dir).unwrap_or_else(|e| {
                panic!(
                    "the ledger left by a power cut at {at} ({} ns after the end of the run, \
                     model {syncs:?}) cannot be read: {e}",
                    i128::from(at) - i128::from(run.ended)
                )
            });
            let before = run.answered.partition_point(|a| a.at < at);
            let mut cut = Cut {
                at,
                expected: before,
                ..Cut::default()
            };
            for a in &run.answered[..before] {
                match held.get(&a.id) {
                    None => {
                        cut.lost.push(a.id);
                        cut.lost_age = cut.lost_age.max(at - a.at);
                    }
                    Some(Some(payload)) if *payload != a.payload => cut.wrong.push(a.id),
                    Some(_) => {}
                }
            }
            cut.held = held.into_keys().collect();
            cut
        })
        .collect()
}

fn describe(run: &Run, cuts: &[Cut]) -> String {
    let t = run.log.tally();
    let started = run.log.ops().first().map_or(0, |o| o.end);
    let mut text = format!(
        "{} OK'd, {} refused; log: {} writes ({} MiB), {} truncations, {} removals, {} SQLite \
         fsyncs, {} syncer fdatasyncs, {} failed\n",
        run.answered.len(),
        run.refused,
        t.writes,
        t.bytes >> 20,
        t.truncates,
        t.removes,
        t.sqlite_syncs,
        t.syncer_syncs,
        t.failed_syncs
    );
    for cut in cuts
        .iter()
        .filter(|c| !c.lost.is_empty() || !c.wrong.is_empty())
    {
        text.push_str(&format!(
            "  cut at +{:.3} s: {} expected, {} held, lost {:?}{}, wrong payload {:?}\n",
            (cut.at.saturating_sub(started)) as f64 / 1e9,
            cut.expected,
            cut.held.len(),
            &cut.lost[..cut.lost.len().min(10)],
            if cut.lost.len() > 10 { " …" } else { "" },
            &cut.wrong[..cut.wrong.len().min(10)],
        ));
    }
    text
}

#[test]
fn a_power_cut_loses_no_publish_answered_ok_in_fsync_mode() {
    // `fsync`: every OK survives every cut.
    let fsync = run("fsync");
    assert!(
        fsync.answered.len() >= 100,
        "too few publishes to judge ({} OK, {} refused)",
        fsync.answered.len(),
        fsync.refused
    );
    let tally = fsync.log.tally();
    assert!(
        tally.syncer_syncs > 0 && tally.writes > 0,
        "the shim saw no syncer fdatasync or no write (not preloaded?): {tally:?}"
    );
    let points = cuts(&fsync);
    let strict = evaluate(&fsync, &points, Syncs::All);
    let checked: usize = strict.iter().map(|c| c.expected).sum();
    let bad: Vec<&Cut> = strict
        .iter()
        .filter(|c| !c.lost.is_empty() || !c.wrong.is_empty())
        .collect();
    assert!(
        bad.is_empty(),
        "fsync mode lost publishes answered OK at {} of {} cuts:\n{}",
        bad.len(),
        strict.len(),
        describe(&fsync, &strict)
    );
    // The same cuts without the syncer's fdatasyncs (SQLite's own fsyncs only, as if OKs
    // were answered once written): what only the syncer saved. The check must see losses
    // there, or it could not see any.
    let unsynced = evaluate(&fsync, &points, Syncs::SqliteOnly);
    // Strict lost nothing: what the unsynced model loses, only the syncer kept.
    let saved_total: usize = unsynced.iter().map(|u| u.lost.len()).sum();
    let saved_cuts = unsynced.iter().filter(|u| !u.lost.is_empty()).count();
    let saved_distinct: BTreeSet<u64> = unsynced
        .iter()
        .flat_map(|u| u.lost.iter().copied())
        .collect();
    assert!(
        saved_total > 0,
        "without the syncer's fdatasyncs no OK'd publish would be lost at any of {} cuts: the \
         check cannot see a loss (or the syncer was not identified)\n{}",
        unsynced.len(),
        describe(&fsync, &unsynced)
    );
    println!(
        "powercut fsync: {} cuts, {} publishes answered OK, {} checks (OK'd before a cut), 0 \
         lost; without the syncer's fdatasync {} of those checks would fail, at {} cuts ({} \
         distinct messages); {}",
        strict.len(),
        fsync.answered.len(),
        checked,
        saved_total,
        saved_cuts,
        saved_distinct.len(),
        describe(&fsync, &[]).trim_end()
    );
    drop(fsync);

    // `buffered`: reported, not judged (an OK there only means written to the OS).
    let buffered = run("buffered");
    let points = cuts(&buffered);
    let cut = evaluate(&buffered, &points, Syncs::All);
    let checked: usize = cut.iter().map(|c| c.expected).sum();
    let lossy = cut.iter().filter(|c| !c.lost.is_empty()).count();
    let lost_total: usize = cut.iter().map(|c| c.lost.len()).sum();
    let lost_max = cut.iter().map(|c| c.lost.len()).max().unwrap_or(0);
    let distinct: BTreeSet<u64> = cut.iter().flat_map(|c| c.lost.iter().copied()).collect();
    let oldest_ms = cut.iter().map(|c| c.lost_age).max().unwrap_or(0) as f64 / 1e6;
    let wrong: usize = cut.iter().map(|c| c.wrong.len()).sum();
    assert_eq!(
        wrong,
        0,
        "buffered mode kept a message with another payload:\n{}",
        describe(&buffered, &cut)
    );
    println!(
        "powercut buffered: {} cuts, {} publishes answered OK, {} checks; lost at {} cuts: {} \
         in all, at most {} at one cut, OK'd up to {:.1} ms before it ({} distinct messages); \
         {}",
        cut.len(),
        buffered.answered.len(),
        checked,
        lossy,
        lost_total,
        lost_max,
        oldest_ms,
        distinct.len(),
        describe(&buffered, &[]).trim_end()
    );
}
