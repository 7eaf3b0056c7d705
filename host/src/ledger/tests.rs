//! The durable ledger against its contract: what a reopened ledger recovers after a graceful
//! stop and after a crash (the ledger dropped without `close`, as a killed process leaves
//! it), crash accounting, ids, keys, dead letters, format and lock refusals, corruption and
//! the byte limit.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use smallvec::smallvec;

use super::{
    DeadLetterFilter, Forget, Ledger, LedgerError, Origin, Record, Remembered, Selection,
    Subscription, Wait,
    durable::{DurableLedger, LedgerOptions, Mode},
    store,
};
use crate::{
    clock::{ManualClock, Timestamp},
    config,
    delivery::{Delivery, Failure, Rules, State},
    message::StoredMessage,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn rules(max_attempts: u32) -> Rules {
    Rules {
        max_attempts,
        ack_timeout: Duration::from_secs(30),
        backoff: config::Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        },
    }
}

fn options(max_bytes: Option<u64>) -> LedgerOptions {
    LedgerOptions {
        mode: Mode::Fsync,
        max_bytes,
        dedupe_window: Duration::from_secs(3600),
        dead_letter_retention: None,
        clock: Arc::new(ManualClock::at(T0)),
        fail_stop: None,
        fresh: false,
    }
}

fn open(dir: &Path) -> Arc<DurableLedger> {
    DurableLedger::open(dir, options(None)).unwrap()
}

fn instances(max_attempts: u32) -> Vec<(String, Rules)> {
    vec![
        ("a".to_owned(), rules(max_attempts)),
        ("b".to_owned(), rules(max_attempts)),
    ]
}

fn message(id: u64, payload: &str) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        id,
        topic: "orders.created".into(),
        headers: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        payload: Bytes::from(payload.to_owned()),
        publish_time: T0,
    })
}

fn accept(ledger: &DurableLedger, id: u64, payload: &str) {
    ledger
        .commit(
            vec![Record::Accepted {
                message: message(id, payload),
                targets: smallvec![0, 1],
            }],
            Wait::Durable,
        )
        .unwrap();
}

/// A new ledger, recovered (empty) for instances `a` and `b`.
fn fresh(max_attempts: u32) -> (tempfile::TempDir, Arc<DurableLedger>) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    ledger.recover(&instances(max_attempts), T0).unwrap();
    (dir, ledger)
}

fn ack(ledger: &DurableLedger, id: u64, instance: u32) {
    ledger
        .commit(
            vec![Record::Acked {
                message: id,
                instance,
            }],
            Wait::Written,
        )
        .unwrap();
}

fn attempt(ledger: &DurableLedger, id: u64, instance: u32, attempt: u32) {
    let marker = ledger.marker(instance).unwrap();
    marker.calling(id, attempt);
    // The call is running when the process dies: the marker is never dropped (idle).
    std::mem::forget(marker);
}

#[test]
fn a_reopened_ledger_recovers_pending_deliveries_without_their_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(dir.path());
    assert!(
        ledger
            .recover(&instances(5), T0)
            .unwrap()
            .pending
            .is_empty()
    );
    accept(&ledger, 1, "one");
    accept(&ledger, 2, "two");
    ack(&ledger, 1, 0);
    drop(ledger);

    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    let pending: Vec<(u64, u32, u64)> = recovered
        .pending
        .iter()
        .map(|p| (p.message, p.instance, p.size))
        .collect();
    // Sizes count the payload and the headers as stored (what the backlog counted).
    let size = message(0, "abc").size();
    assert_eq!(size, 3 + 20);
    assert_eq!(pending, vec![(1, 1, size), (2, 0, size), (2, 1, size)]);
    assert!(recovered.next_id >= 3, "past every id recorded");
    assert!(recovered.unclean, "dropped without close");
    assert_eq!(recovered.crashed, 0, "nothing was in flight");
    assert_eq!(
        ledger.load(2).unwrap().as_deref(),
        Some(&*message(2, "two")),
        "read back whole: topic, repeated headers, payload, time"
    );
}

#[test]
fn ids_are_never_reused_even_when_every_message_is_gone() {
    let (dir, ledger) = fresh(5);
    accept(&ledger, 41, "x");
    let acks = (0..2)
        .map(|instance| Record::Acked {
            message: 41,
            instance,
        })
        .collect();
    ledger.commit(acks, Wait::Written).unwrap();
    assert_eq!(
        ledger.load(41).unwrap(),
        None,
        "a settled message is removed"
    );
    ledger.close();
    drop(ledger);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert!(recovered.next_id > 41, "{}", recovered.next_id);
    assert!(recovered.pending.is_empty());
    assert!(!recovered.unclean);
}

#[test]
fn an_attempt_left_in_flight_by_a_crash_is_charged_once_and_a_graceful_stop_charges_nothing() {
    let (dir, ledger) = fresh(5);
    accept(&ledger, 1, "one");
    accept(&ledger, 2, "two");
    attempt(&ledger, 1, 0, 1);
    attempt(&ledger, 2, 0, 1);
    // Attempt 1 of message 2 ended (a retry); attempt 1 of message 1 was running.
    let mut failed = Delivery::new(T0);
    failed.begin(&rules(5), T0);
    failed
        .fail(
            1,
            &Failure::Error {
                message: "x".into(),
            },
            true,
            &rules(5),
            T0,
            0.5,
        )
        .unwrap();
    ledger
        .commit(
            vec![Record::Updated {
                message: 2,
                instance: 0,
                delivery: failed.clone(),
            }],
            Wait::Written,
        )
        .unwrap();
    drop(ledger); // a crash: no close

    let later = T0.after(Duration::from_secs(5));
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), later).unwrap();
    assert_eq!(recovered.crashed, 1);
    let one = recovered
        .pending
        .iter()
        .find(|p| (p.message, p.instance) == (1, 0))
        .unwrap();
    assert_eq!((one.delivery.deliveries, one.delivery.failures), (1, 1));
    assert_eq!(one.delivery.last_reason.as_deref(), Some("crash"));
    assert_eq!(
        one.delivery.state,
        State::Ready {
            due: later.after(Duration::from_secs(1)).0
        },
        "the crash waits its backoff from the restart"
    );
    let two = recovered
        .pending
        .iter()
        .find(|p| (p.message, p.instance) == (2, 0))
        .unwrap();
    assert_eq!(two.delivery, failed, "its end was recorded: not charged");
    drop(ledger); // crash again, right after recovery: the charge is not repeated

    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), later).unwrap();
    assert_eq!(
        recovered.crashed, 0,
        "the markers were settled by the first recovery"
    );
    attempt(&ledger, 1, 0, 2);
    ledger.close();
    drop(ledger);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), later).unwrap();
    assert!(!recovered.unclean);
    assert_eq!(recovered.crashed, 0, "a graceful stop charges nothing");
}

#[test]
fn crashes_dead_letter_a_delivery_at_max_attempts_and_dead_letters_survive() {
    let (dir, ledger) = fresh(2);
    accept(&ledger, 7, "poison");
    attempt(&ledger, 7, 0, 1);
    drop(ledger); // crash 1

    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(2), T0).unwrap();
    assert_eq!(recovered.crashed, 1);
    assert_eq!(recovered.pending.len(), 2);
    attempt(&ledger, 7, 0, 2);
    drop(ledger); // crash 2: max_attempts reached

    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(2), T0).unwrap();
    assert_eq!(recovered.crashed, 1);
    let pending: Vec<_> = recovered
        .pending
        .iter()
        .map(|p| (p.message, p.instance))
        .collect();
    assert_eq!(pending, vec![(7, 1)], "dead-lettered for a; b untouched");
    drop(ledger);

    let ledger = open(dir.path());
    ledger.recover(&instances(2), T0).unwrap();
    let dead = ledger.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].message, dead[0].instance.as_str()), (7, "a"));
    assert_eq!(dead[0].topic, "orders.created");
    assert_eq!(dead[0].delivery.failures, 2);
    assert_eq!(dead[0].delivery.last_reason.as_deref(), Some("crash"));
    assert_eq!(
        ledger.load(7).unwrap().unwrap().payload,
        "poison",
        "a dead letter keeps its message"
    );
    let filtered = DeadLetterFilter {
        instance: Some("b".into()),
        ..DeadLetterFilter::default()
    };
    assert!(ledger.dead_letters(&filtered).unwrap().is_empty());
}

#[test]
fn deliveries_of_an_instance_not_configured_now_wait_for_it() {
    let (dir, ledger) = fresh(5);
    accept(&ledger, 1, "one");
    drop(ledger);
    let ledger = open(dir.path());
    let only_b = vec![("b".to_owned(), rules(5))];
    let recovered = ledger.recover(&only_b, T0).unwrap();
    assert_eq!(recovered.orphaned, 1);
    assert_eq!(
        recovered
            .pending
            .iter()
            .map(|p| (p.message, p.instance))
            .collect::<Vec<_>>(),
        vec![(1, 0)],
        "b is instance 0 now"
    );
    drop(ledger);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(recovered.pending.len(), 2, "a is back: its delivery too");
}

#[test]
fn idempotency_keys_survive_a_restart() {
    let (dir, ledger) = fresh(5);
    ledger
        .commit(
            vec![Record::Key {
                key: "order-17".into(),
                message: 9,
                at: T0,
            }],
            Wait::Durable,
        )
        .unwrap();
    drop(ledger);
    let ledger = open(dir.path());
    ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(ledger.keys(T0), vec![("order-17".to_owned(), 9, T0)]);
    assert!(ledger.keys(T0.after(Duration::from_millis(1))).is_empty());
}

#[test]
fn subscriptions_and_pauses_are_remembered_across_a_restart_and_forget_ends_both() {
    let (dir, ledger) = fresh(5);
    accept(&ledger, 1, "one");
    let auto = Remembered {
        subscription: Some(Subscription {
            origin: Origin::Autoloaded,
            plugin: "a".into(),
            topics: Some(vec!["orders.>".into(), "audit.*".into()]),
        }),
        paused: true,
    };
    let never_loaded = Remembered {
        subscription: Some(Subscription {
            origin: Origin::Configured,
            plugin: "x".into(),
            topics: None,
        }),
        paused: false,
    };
    ledger.remember("a", &auto).unwrap();
    ledger.remember("new", &never_loaded).unwrap();
    ledger.close();
    drop(ledger);
    let ledger = open(dir.path());
    let remembered = ledger.remembered().unwrap();
    assert_eq!(remembered.get("a"), Some(&auto));
    assert_eq!(remembered.get("new"), Some(&never_loaded));
    assert!(!remembered.contains_key("b"), "nothing remembered of b");
    ledger.recover(&instances(5), T0).unwrap();
    // Forgetting `a` ends its subscription, its pause and its backlog at once.
    assert_eq!(ledger.forget("a", Forget::Purge, T0).unwrap(), 1);
    assert_eq!(ledger.remembered().unwrap().get("a"), None);
    ledger.remember("new", &Remembered::default()).unwrap();
    assert!(ledger.remembered().unwrap().is_empty());
}

#[test]
fn a_format_1_ledger_is_upgraded_in_place_and_keeps_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The format-1 schema, as plugind 1.0 wrote it.
        let conn = rusqlite::Connection::open(dir.path().join(store::FILE)).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
             CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE instances(key INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
             CREATE TABLE messages(id INTEGER PRIMARY KEY, topic TEXT NOT NULL,
                 headers BLOB NOT NULL, payload BLOB NOT NULL, published INTEGER NOT NULL,
                 crc INTEGER NOT NULL, solo INTEGER);
             CREATE TABLE deliveries(msg INTEGER NOT NULL, inst INTEGER NOT NULL, state BLOB,
                 PRIMARY KEY(msg, inst)) WITHOUT ROWID;
             CREATE TABLE dead_letters(msg INTEGER NOT NULL, inst INTEGER NOT NULL,
                 at INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY(msg, inst)) WITHOUT ROWID;
             CREATE INDEX dead_letters_at ON dead_letters(at);
             CREATE TABLE keys(key TEXT PRIMARY KEY, msg INTEGER NOT NULL, at INTEGER NOT NULL)
                 WITHOUT ROWID;
             CREATE INDEX keys_at ON keys(at);
             CREATE VIEW pending(msg, inst, state) AS
                 SELECT m.id, m.solo, NULL FROM messages m
                  WHERE m.solo IS NOT NULL AND NOT EXISTS
                        (SELECT 1 FROM deliveries d WHERE d.msg = m.id AND d.inst = m.solo)
                 UNION ALL SELECT msg, inst, state FROM deliveries;
             INSERT INTO meta VALUES ('next_id', 100), ('clean', 1);
             INSERT INTO instances(key, name) VALUES (1, 'a'), (2, 'b');
             PRAGMA application_id = 1886152548; PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let ledger = open(dir.path());
    assert!(ledger.remembered().unwrap().is_empty());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(recovered.next_id, 100, "the id high-water mark is kept");
    ledger
        .remember(
            "b",
            &Remembered {
                subscription: None,
                paused: true,
            },
        )
        .unwrap();
    assert!(ledger.remembered().unwrap()["b"].paused);
    ledger.close();
    drop(ledger);
    let conn = rusqlite::Connection::open(dir.path().join(store::FILE)).unwrap();
    let format: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(format, store::FORMAT);
}

#[test]
fn a_newer_format_and_a_foreign_file_are_refused_with_the_reason() {
    let (dir, ledger) = fresh(5);
    ledger.close();
    drop(ledger);
    let conn = rusqlite::Connection::open(dir.path().join(store::FILE)).unwrap();
    conn.execute_batch(&format!("PRAGMA user_version = {}", store::FORMAT + 1))
        .unwrap();
    drop(conn);
    let Err(LedgerError::Refused(message)) = DurableLedger::open(dir.path(), options(None)) else {
        panic!("a newer format must be refused");
    };
    assert!(
        message.contains(&format!(
            "format {}, written by a newer plugind",
            store::FORMAT + 1
        )) && message.contains(&format!("reads formats up to {}", store::FORMAT)),
        "{message}"
    );

    let other = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(other.path().join(store::FILE)).unwrap();
    conn.execute_batch("CREATE TABLE t(x)").unwrap();
    drop(conn);
    let Err(LedgerError::Refused(message)) = DurableLedger::open(other.path(), options(None))
    else {
        panic!("another database must be refused");
    };
    assert!(message.contains("not a plugind ledger"), "{message}");
}

#[test]
fn one_daemon_per_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let Err(LedgerError::Refused(message)) = DurableLedger::open(dir.path(), options(None)) else {
        panic!("a second ledger on the same dir must be refused");
    };
    assert!(message.contains("in use by another plugind"), "{message}");
}

#[test]
fn a_flipped_byte_in_a_payload_is_detected_on_load() {
    let (dir, ledger) = fresh(5);
    accept(&ledger, 3, "intact");
    let conn = rusqlite::Connection::open(dir.path().join(store::FILE)).unwrap();
    conn.execute(
        "UPDATE messages SET payload = ?1 WHERE id = 3",
        [&b"intacT"[..]],
    )
    .unwrap();
    drop(conn);
    let Err(LedgerError::Corrupt(message)) = ledger.load(3) else {
        panic!("corruption must be reported");
    };
    assert!(
        message.contains("message 3") && message.contains("checksum"),
        "{message}"
    );
}

#[test]
fn over_max_ledger_bytes_publishes_are_refused_and_settlements_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = DurableLedger::open(dir.path(), options(Some(1))).unwrap();
    ledger.recover(&instances(5), T0).unwrap();
    let Err(LedgerError::Full(message)) = ledger.commit(
        vec![Record::Accepted {
            message: message(5, "more"),
            targets: smallvec![0],
        }],
        Wait::Durable,
    ) else {
        panic!("over the limit, a publish is refused");
    };
    assert!(message.contains("max_ledger_bytes"), "{message}");
    ack(&ledger, 1, 0);
}

#[test]
fn commits_are_counted_and_publishes_fsync() {
    let (_dir, ledger) = fresh(5);
    let before = ledger.stats();
    accept(&ledger, 1, "a");
    attempt(&ledger, 1, 0, 1);
    ack(&ledger, 1, 0);
    let after = ledger.stats();
    assert_eq!(after.commits - before.commits, 2, "the marker is no commit");
    assert_eq!(after.fsyncs - before.fsyncs, 1, "only the publish fsynced");
    assert_eq!(after.messages - before.messages, 1);
    assert!(after.latency_us[2] >= after.latency_us[0]);
}

/// Under a constant stream of commits the write-ahead log is restarted once it holds
/// `LOG_RESTART_BYTES` of frames, counted by SQLite's log hook; not after every 32 commits
/// once the file has grown (the file keeps its size when the log restarts), as when the
/// file's size was the measure.
#[test]
fn the_log_restarts_when_its_frames_fill_it_not_by_the_file_size() {
    let (dir, ledger) = fresh(5);
    let payload = "x".repeat(64 << 10);
    for id in 1..=800 {
        ledger
            .commit(
                vec![Record::Accepted {
                    message: message(id, &payload),
                    targets: smallvec![0],
                }],
                Wait::Written,
            )
            .unwrap();
        ack(&ledger, id, 0);
    }
    // About 17 frames a message (its payload overflows into 16 pages): some 55 MiB of
    // frames, 2 restarts at 24 MiB (the file-size measure made dozens).
    let restarts = ledger.stats().log_restarts;
    assert!((1..=8).contains(&restarts), "{restarts} restarts");
    let log = std::fs::metadata(dir.path().join(store::LOG))
        .unwrap()
        .len();
    assert!(log <= 40 << 20, "the log file grew to {log} bytes");
}

fn dead_letter(ledger: &DurableLedger, id: u64, instance: u32) {
    let mut delivery = Delivery::new(T0);
    delivery.begin(&rules(1), T0);
    delivery
        .reject(1, "bad", T0)
        .expect("attempt 1 is in flight");
    ledger
        .commit(
            vec![Record::DeadLettered {
                message: id,
                instance,
                delivery,
                at: T0,
                stored: None,
            }],
            Wait::Written,
        )
        .unwrap();
}

#[test]
fn dead_letters_page_replay_and_purge() {
    let (_dir, ledger) = fresh(5);
    for id in 1..=5 {
        accept(&ledger, id, "x");
        dead_letter(&ledger, id, 0);
    }
    dead_letter(&ledger, 3, 1);
    let page = |after: Option<(u64, &str)>| {
        ledger
            .dead_letters(&DeadLetterFilter {
                instance: None,
                after: after.map(|(m, i)| (m, i.to_owned())),
                limit: 2,
            })
            .unwrap()
            .into_iter()
            .map(|d| (d.message, d.instance))
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None), vec![(1, "a".into()), (2, "a".into())]);
    assert_eq!(page(Some((2, "a"))), vec![(3, "a".into()), (3, "b".into())]);
    assert_eq!(page(Some((3, "b"))), vec![(4, "a".into()), (5, "a".into())]);

    let later = T0.after(Duration::from_secs(9));
    let replayed = ledger
        .replay(
            &Selection {
                instance: Some("a".into()),
                messages: vec![2, 3],
            },
            later,
        )
        .unwrap();
    let back: Vec<_> = replayed
        .pending
        .iter()
        .map(|p| (p.message, p.instance, p.size))
        .collect();
    assert_eq!(back, vec![(2, 0, 1 + 20), (3, 0, 1 + 20)]);
    let d = &replayed.pending[0].delivery;
    assert_eq!(
        (d.failures, d.deliveries, d.history.len()),
        (0, 1, 1),
        "failures reset, history kept"
    );
    assert_eq!(d.state, State::Ready { due: later.0 });
    let history = ledger.history(3).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|h| (h.instance.as_str(), h.dead_letter))
            .collect::<Vec<_>>(),
        vec![("a", false), ("b", true)],
        "pending for a again, still dead for b"
    );

    let purged = ledger
        .purge(&Selection {
            instance: None,
            messages: vec![],
        })
        .unwrap();
    assert_eq!(purged, 4, "1, 4, 5 for a and 3 for b");
    assert!(
        ledger
            .dead_letters(&DeadLetterFilter::default())
            .unwrap()
            .is_empty()
    );
    assert!(
        ledger.load(1).unwrap().is_some(),
        "b's delivery of 1 still waits"
    );
    ack(&ledger, 1, 1);
    assert_eq!(
        ledger.load(1).unwrap(),
        None,
        "nothing refers to 1 any more: gone"
    );
    assert!(
        ledger.load(3).unwrap().is_some(),
        "3 is pending for a again"
    );
}

#[test]
fn forgetting_an_instance_not_running_ends_its_backlog_for_good() {
    let (_dir, ledger) = fresh(5);
    for id in 1..=3 {
        accept(&ledger, id, "abc");
    }
    let backlog = ledger.backlog().unwrap();
    assert_eq!(
        backlog
            .iter()
            .map(|b| (b.instance.as_str(), b.deliveries, b.bytes))
            .collect::<Vec<_>>(),
        vec![("a", 3, 3 * (3 + 20)), ("b", 3, 3 * (3 + 20))],
        "payloads and headers"
    );
    assert_eq!(ledger.forget("a", Forget::DeadLetter, T0).unwrap(), 3);
    assert_eq!(ledger.forget("b", Forget::Purge, T0).unwrap(), 3);
    assert_eq!(ledger.forget("nobody", Forget::Purge, T0).unwrap(), 0);
    assert!(ledger.backlog().unwrap().is_empty());
    let dead = ledger.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!(dead.len(), 3);
    assert_eq!(dead[0].delivery.last_reason.as_deref(), Some("forgotten"));
    assert_eq!(dead[0].delivery.failures, 0, "forgetting is no failure");
}

#[test]
fn single_target_messages_keep_every_rule_without_a_delivery_row() {
    let (dir, ledger) = fresh(5);
    let solo = |id| Record::Accepted {
        message: message(id, "solo"),
        targets: smallvec![1],
    };
    ledger
        .commit(vec![solo(1), solo(2), solo(3), solo(4)], Wait::Durable)
        .unwrap();
    let mut failed = Delivery::new(T0);
    failed.begin(&rules(5), T0);
    failed
        .fail(1, &Failure::Timeout, true, &rules(5), T0, 0.5)
        .unwrap();
    ledger
        .commit(
            vec![Record::Updated {
                message: 2,
                instance: 1,
                delivery: failed.clone(),
            }],
            Wait::Written,
        )
        .unwrap();
    ack(&ledger, 3, 1);
    dead_letter(&ledger, 4, 1);
    drop(ledger);

    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    let pending: Vec<_> = recovered
        .pending
        .iter()
        .map(|p| (p.message, p.instance, p.delivery.failures))
        .collect();
    assert_eq!(
        pending,
        vec![(1, 1, 0), (2, 1, 1)],
        "as accepted; as updated"
    );
    assert_eq!(ledger.load(3).unwrap(), None, "acked: gone");
    let dead = ledger.dead_letters(&DeadLetterFilter::default()).unwrap();
    assert_eq!((dead.len(), dead[0].message), (1, 4));
    assert!(
        ledger.load(4).unwrap().is_some(),
        "kept for its dead letter"
    );
    let backlog = ledger.backlog().unwrap();
    assert_eq!(
        backlog
            .iter()
            .map(|b| (b.instance.as_str(), b.deliveries))
            .collect::<Vec<_>>(),
        vec![("b", 2)]
    );
    // Replayed, then acked: the message goes.
    let replayed = ledger.replay(&Selection::default(), T0).unwrap();
    assert_eq!(replayed.pending.len(), 1);
    ack(&ledger, 4, 1);
    assert_eq!(ledger.load(4).unwrap(), None);
    ack(&ledger, 2, 1);
    assert_eq!(ledger.load(2).unwrap(), None, "updated, then acked: gone");
}

#[test]
fn housekeeping_removes_dead_letters_past_their_retention_and_keys_past_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(T0);
    let ledger = DurableLedger::open(
        dir.path(),
        LedgerOptions {
            dead_letter_retention: Some(Duration::from_secs(3600)),
            clock: Arc::new(clock.clone()),
            ..options(None)
        },
    )
    .unwrap();
    ledger.recover(&instances(5), T0).unwrap();
    ledger
        .commit(
            vec![
                Record::Accepted {
                    message: message(1, "old"),
                    targets: smallvec![0],
                },
                Record::Key {
                    key: "k".into(),
                    message: 1,
                    at: T0,
                },
            ],
            Wait::Durable,
        )
        .unwrap();
    dead_letter(&ledger, 1, 0);
    clock.advance(Duration::from_secs(2 * 3600));
    let started = std::time::Instant::now();
    while !ledger
        .dead_letters(&DeadLetterFilter::default())
        .unwrap()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "housekeeping (every second) did not remove the dead letter"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ledger.load(1).unwrap(), None, "its message went with it");
    assert!(
        ledger.keys(T0).is_empty(),
        "the key is past dedupe_window (1 h)"
    );
}

#[test]
fn a_forgotten_backlog_gives_its_space_back() {
    let (dir, ledger) = fresh(5);
    let payload = "x".repeat(1024);
    for batch in 0..20u64 {
        let records = (0..1000)
            .map(|i| Record::Accepted {
                message: message(1 + batch * 1000 + i, &payload),
                targets: smallvec![1],
            })
            .collect();
        ledger.commit(records, Wait::Durable).unwrap();
    }
    let file = dir.path().join(store::FILE);
    let size = || {
        std::fs::metadata(&file).map_or(0, |m| m.len())
            + std::fs::metadata(dir.path().join("ledger.db-wal")).map_or(0, |m| m.len())
    };
    // Let the checkpointer copy the backlog into the database.
    std::thread::sleep(Duration::from_millis(500));
    let full = size();
    assert!(full > 20 << 20, "20,000 messages of 1 KiB: {full} bytes");
    assert_eq!(ledger.forget("b", Forget::Purge, T0).unwrap(), 20_000);
    // Housekeeping (every second) gives free pages back, 4 MiB a pass.
    let started = std::time::Instant::now();
    while size() > full - (8 << 20) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the state dir did not shrink: {} of {full} bytes",
            size()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_large_batch_is_stored_whole_across_multi_row_statements() {
    let (dir, ledger) = fresh(5);
    // 70 messages: two statements of 32 rows and 6 alone; one or two targets each.
    let records: Vec<Record> = (1..=70u64)
        .map(|id| Record::Accepted {
            message: message(id, &format!("payload {id}")),
            targets: if id % 3 == 0 {
                smallvec![0, 1]
            } else {
                smallvec![1]
            },
        })
        .collect();
    ledger.commit(records, Wait::Durable).unwrap();
    drop(ledger);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(
        recovered.pending.len(),
        70 + 23,
        "one delivery each, two for every third"
    );
    for id in 1..=70u64 {
        assert_eq!(
            ledger.load(id).unwrap().as_deref(),
            Some(&*message(id, &format!("payload {id}"))),
            "message {id}"
        );
    }
    assert_eq!(
        ledger
            .load_many(&(1..=70).collect::<Vec<_>>())
            .unwrap()
            .iter()
            .flatten()
            .count(),
        70
    );
}

/// Hostile input (issue 18, item 5): a replay (or purge) of a list of ids ran in one
/// transaction of the writer, each id a scan of every dead letter: 100,000 ids stopped every
/// publish for 51–192 s. It runs in chunks, each committed on its own, and what was
/// published meanwhile is committed (and answered) between two chunks.
#[test]
fn a_long_replay_runs_in_chunks_and_publishes_are_committed_between_them() {
    const N: u64 = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let ledger = DurableLedger::open(
        dir.path(),
        LedgerOptions {
            // Publishes are answered by the writer itself, as soon as they are committed.
            mode: Mode::Buffered,
            ..options(None)
        },
    )
    .unwrap();
    ledger.recover(&instances(5), T0).unwrap();
    let ids: Vec<u64> = (1..=N).collect();
    for chunk in ids.chunks(2048) {
        let accepted = chunk
            .iter()
            .map(|id| Record::Accepted {
                message: message(*id, "x"),
                targets: smallvec![0, 1],
            })
            .collect();
        ledger.commit(accepted, Wait::Durable).unwrap();
        let mut delivery = Delivery::new(T0);
        delivery.begin(&rules(1), T0);
        delivery.reject(1, "bad", T0).unwrap();
        let dead = chunk
            .iter()
            .flat_map(|id| [0, 1].map(|instance| (*id, instance)))
            .map(|(message, instance)| Record::DeadLettered {
                message,
                instance,
                delivery: delivery.clone(),
                at: T0,
                stored: None,
            })
            .collect();
        ledger.commit(dead, Wait::Written).unwrap();
    }
    let of_a = || {
        ledger
            .dead_letter_counts()
            .unwrap()
            .get("a")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(of_a(), N);
    // A list of ids in no order, with repeats and ids that are no dead letter.
    let mut selected: Vec<u64> = ids.iter().rev().copied().collect();
    selected.extend([1, 2, N + 100]);
    let (replayed, interleaved) = std::thread::scope(|scope| {
        let replay = scope.spawn(|| {
            ledger.replay(
                &Selection {
                    instance: Some("a".into()),
                    messages: selected,
                },
                T0,
            )
        });
        let (mut interleaved, mut next) = (0, N + 1);
        while !replay.is_finished() {
            let before = of_a();
            accept(&ledger, next, "published during the replay");
            next += 1;
            // Some of the replay was committed before this publish was sent, and some was
            // not yet when it was answered: it went in between two chunks.
            if before < N && of_a() > 0 {
                interleaved += 1;
            }
        }
        (replay.join().unwrap().unwrap(), interleaved)
    });
    assert!(
        interleaved > 0,
        "no publish was committed while the replay ran: it held the writer throughout"
    );
    assert_eq!(
        replayed.pending.len() as u64,
        N,
        "each dead letter of a once"
    );
    assert_eq!(of_a(), 0);
    let counts = ledger.dead_letter_counts().unwrap();
    assert_eq!(counts.get("b"), Some(&N), "b's are not selected");

    // Every dead letter of an instance, many chunks, publishes going on: all of them.
    let purged = std::thread::scope(|scope| {
        let purge = scope.spawn(|| {
            ledger.purge(&Selection {
                instance: Some("b".into()),
                messages: vec![],
            })
        });
        let mut next = 10 * N;
        while !purge.is_finished() {
            accept(&ledger, next, "published during the purge");
            next += 1;
        }
        purge.join().unwrap().unwrap()
    });
    assert_eq!(purged, N);
    assert!(ledger.dead_letter_counts().unwrap().is_empty());
    assert!(ledger.load(1).unwrap().is_some(), "pending for a again");
}

/// The mark beside the database (issue 18, items 2 and 6): what the database lost is
/// reported by id, once; a lost database is refused unless started afresh, and then ids
/// continue; a damaged mark is made again.
#[test]
fn the_mark_reports_what_the_database_lost_and_keeps_ids_past_a_lost_database() {
    let (dir, ledger) = fresh(5);
    for id in 1..=3 {
        accept(&ledger, id, "x");
    }
    drop(ledger);
    // The database loses its last commits (as a log cut short does): its last id goes back.
    let conn = rusqlite::Connection::open(dir.path().join(store::FILE)).unwrap();
    conn.execute_batch(
        "DELETE FROM messages WHERE id > 1; UPDATE meta SET value = 1 WHERE key = 'last_id'",
    )
    .unwrap();
    drop(conn);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(
        recovered.lost,
        Some(super::Lost { first: 2, last: 3 }),
        "ids 2 and 3 were answered OK and are gone"
    );
    drop(ledger);
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(recovered.lost, None, "said once");
    let next = recovered.next_id;
    accept(&ledger, next, "y");
    drop(ledger);

    // The database deleted: refused, nothing created.
    for file in [store::FILE, store::LOG] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    let refused = DurableLedger::open(dir.path(), options(None)).unwrap_err();
    assert!(
        matches!(&refused, LedgerError::Refused(m) if m.contains("is missing") && m.contains("--fresh-ledger")),
        "{refused}"
    );
    assert!(!dir.path().join(store::FILE).exists());
    // Started afresh on purpose: ids continue past every id given out.
    let ledger = DurableLedger::open(
        dir.path(),
        LedgerOptions {
            fresh: true,
            ..options(None)
        },
    )
    .unwrap();
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert!(recovered.next_id > next, "{} > {next}", recovered.next_id);
    accept(&ledger, recovered.next_id, "z");
    drop(ledger);

    // A mark damaged in both slots: reported, made again from the database.
    let mark = dir.path().join(super::mark::FILE);
    std::fs::write(&mark, [0xA5; 96]).unwrap();
    let ledger = open(dir.path());
    let again = ledger.recover(&instances(5), T0).unwrap();
    assert!(again.next_id > recovered.next_id);
    assert_eq!(again.lost, None);
    assert!(
        super::mark::read(dir.path()).unwrap().is_some(),
        "made again"
    );
}

/// Another ledger copied over this one by hand (not `plugind restore`): no false loss is
/// reported, and ids still continue past every id this state dir gave out.
#[test]
fn a_ledger_replaced_by_hand_keeps_ids_past_the_state_dirs_mark() {
    let (dir, ledger) = fresh(5);
    for id in 1..=3 {
        accept(&ledger, id, "x");
    }
    drop(ledger);
    let (other, copied) = fresh(5);
    accept(&copied, 1, "from another state dir");
    drop(copied);
    for file in [store::FILE, store::LOG] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    for file in [store::FILE, store::LOG] {
        if other.path().join(file).exists() {
            std::fs::copy(other.path().join(file), dir.path().join(file)).unwrap();
        }
    }
    let ledger = open(dir.path());
    let recovered = ledger.recover(&instances(5), T0).unwrap();
    assert_eq!(
        recovered.lost, None,
        "another ledger, not a loss of this one"
    );
    assert!(recovered.next_id > 3, "next id {}", recovered.next_id);
}
