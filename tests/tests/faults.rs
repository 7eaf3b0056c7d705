//! The durable ledger's fault rules end to end (docs/design.md §7), on the real daemon in `fsync`
//! mode with the real `fx-record` fixture, over the real gRPC API:
//!
//! - a full disk (the state dir on a small tmpfs) refuses publishes with RESOURCE_EXHAUSTED
//!   while deliveries and settlements go on, and the daemon keeps running; killed and
//!   started again on the full disk, it starts and delivers what was waiting;
//! - a failed fsync (an `LD_PRELOAD` shim making `fsync`/`fdatasync` fail with EIO on demand)
//!   stops the daemon at once with exit 1, the syncer's `fdatasync` and SQLite's own `fsync`
//!   alike, and after a restart every message that was answered OK is delivered.
//!
//! They need what not every machine has: root (`CAP_SYS_ADMIN`) to mount a tmpfs, gcc to
//! build the shim. Where that is missing the test fails saying so; it never skips.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use plugind_tests::{
    daemon::Daemon,
    ledger_support::{
        config, ids, record_config, recorded_ids, sandbox, try_publish_all, unstartable_config,
        wait_until,
    },
    record::read_record,
};
use tonic::Code;

/// A size-limited tmpfs mounted for one test; unmounted (and its mount point removed) when
/// dropped, also when the test panics. Create it before the daemon that uses it: locals drop
/// in reverse order, so the daemon is killed first and nothing keeps the mount busy.
#[derive(Debug)]
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `24m`) on a new directory.
    ///
    /// # Panics
    /// If the machine does not allow it (not root, no `CAP_SYS_ADMIN`), saying so.
    fn mount(size: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "plugind-faults-tmpfs-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("the temp dir is writable");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(&dir)
            .output();
        let cause = match mounted {
            Ok(out) if out.status.success() => return Self { dir },
            Ok(out) => format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            Err(e) => format!("cannot run mount: {e}"),
        };
        let _ = fs::remove_dir(&dir);
        panic!(
            "this machine does not allow the full-disk test to mount a tmpfs (it needs root or \
             CAP_SYS_ADMIN for `mount -t tmpfs -o size={size} tmpfs {}`): {}",
            dir.display(),
            cause.trim()
        );
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    /// `df`'s view of it, for failure messages.
    /// `df` of the file system and `ls -l` of what is on it.
    fn usage(&self) -> String {
        let run = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .arg(&self.dir)
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
        };
        run("df", &["-k"]) + &run("ls", &["-l"])
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process has a file open in it): detach it now, the kernel frees it
            // when the last user goes.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A payload of about 8 KiB (one line for fx-record), distinct per `i`.
fn payload(i: usize) -> String {
    format!("m{i} {}", "x".repeat(8000))
}

/// Publishes batches of 50 until the disk is full for good: refused 20 times in a row.
/// After a first refusal the ledger may still fit a message or two in space its log file
/// already holds (a transaction that failed for space leaves its pages allocated); it cannot
/// grow, and what it holds is bounded by the disk. Every answer is OK or
/// RESOURCE_EXHAUSTED: never another error, never a daemon that stopped. Returns the ids
/// accepted, the first refusal and the index of the next payload.
fn fill_disk(d: &Daemon, tmpfs: &Tmpfs, limit: Duration) -> (BTreeSet<u64>, tonic::Status, usize) {
    let mut accepted = BTreeSet::new();
    let mut refusal = None;
    let mut refused_in_a_row = 0;
    let mut next = 0;
    let started = Instant::now();
    while refused_in_a_row < 20 {
        assert!(
            started.elapsed() < limit,
            "not refused 20 times in a row after {} publishes were accepted:\n{}\n{}",
            accepted.len(),
            tmpfs.usage(),
            d.history()
        );
        let batch: Vec<String> = (next..next + 50).map(payload).collect();
        next += batch.len();
        for answer in try_publish_all(d, &batch, None) {
            match answer {
                Ok(id) => {
                    accepted.insert(id);
                    refused_in_a_row = 0;
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    refused_in_a_row += 1;
                    refusal.get_or_insert(status);
                }
                Err(status) => panic!(
                    "a publish failed otherwise than with RESOURCE_EXHAUSTED: {status:?}\n{}\n{}",
                    tmpfs.usage(),
                    d.history()
                ),
            }
        }
    }
    (accepted, refusal.expect("the loop ends on refusals"), next)
}

#[test]
fn a_full_disk_refuses_publishes_while_deliveries_and_settlements_go_on() {
    let s = sandbox("faults");
    // 24 MiB: the ledger reserves 8 MiB of it for settlements (`state_dir/reserve`), the
    // rest fills up within a few thousand publishes. The sandbox's `state` (the default
    // state_dir) is a link to it: removing the sandbox does not cross into the mount.
    let tmpfs = Tmpfs::mount("24m");
    std::os::unix::fs::symlink(tmpfs.path(), s.path().join("state"))
        .expect("the sandbox is writable");
    let rec = s.path().join("rec.txt");
    let held = s.path().join("held.txt");
    let missing = s.path().join("missing/held.txt");
    // `held` cannot start at first (its file cannot be opened): every message is kept for
    // it, so the ledger only grows. `rec` records every message outside the tmpfs.
    let text = |held: &Path| {
        config(
            "fsync",
            &[
                ("rec", "", record_config(&rec, "")),
                ("held", "", record_config(held, "")),
            ],
        )
    };
    let mut d = Daemon::start(s, &text(&missing));

    // Published until the disk is full for good (`fill_disk`).
    let (accepted, refusal, next) = fill_disk(&d, &tmpfs, Duration::from_secs(30));
    assert!(
        refusal.message().contains("the ledger is full") && refusal.message().contains("no space"),
        "the refusal says why: {refusal:?}"
    );
    assert!(
        accepted.len() > 100,
        "the disk filled up after only {} messages:\n{}",
        accepted.len(),
        tmpfs.usage()
    );

    // Deliveries and settlements went on: `rec` got every message answered OK, and its acks
    // were written (the daemon would have stopped otherwise).
    wait_until("rec has every accepted message", &d, || {
        recorded_ids(&rec).is_superset(&accepted)
    });
    let still = d.wait_exit(Duration::from_millis(300));
    assert!(
        still.is_none(),
        "a full disk stopped the daemon ({still:?}):\n{}",
        d.history()
    );
    // Still refused: nothing gives space back (`held` keeps every message, files do not
    // shrink), and if settlements took the reserve, publishing waits until it can be made
    // again.
    let later = try_publish_all(&d, &[payload(next)], None);
    assert!(
        matches!(&later[..], [Err(status)] if status.code() == Code::ResourceExhausted),
        "a publish while the disk is full: {later:?}\n{}\n{}",
        tmpfs.usage(),
        d.history()
    );

    // Killed and started again on the full disk, with `held` now able to start: the daemon
    // starts (taking the reserve if it needs it) and delivers what `held` kept; the
    // settlements of all of it fit.
    let mut d = Daemon::start(d.kill9(), &text(&held));
    wait_until("held has every accepted message", &d, || {
        recorded_ids(&held).is_superset(&accepted)
    });
    let still = d.wait_exit(Duration::from_millis(300));
    assert!(
        still.is_none(),
        "the daemon stopped on a full disk ({still:?}):\n{}\n{}",
        tmpfs.usage(),
        d.history()
    );
    let (status, s) = d.stop_keeping_state();
    assert!(
        status.success(),
        "a graceful stop on a full disk:\n{}",
        fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default()
    );
    // Nothing else arrived: a refused publish is never stored (redeliveries of accepted
    // ones after the kill are allowed: at least once).
    assert_eq!(
        ids(&read_record(&rec)),
        accepted,
        "rec got only accepted messages"
    );
    assert_eq!(
        ids(&read_record(&held)),
        accepted,
        "held got only accepted messages"
    );
    drop(s);
    drop(tmpfs);
}

/// The `failsync` shim (`tests/shims/failsync.c`): while the file named by
/// `PLUGIND_TEST_FAIL_FSYNC` exists, the calls it names (`fsync`, `fdatasync`) fail with EIO,
/// each failure reported on stderr (the daemon's log) with the file's path.
fn failsync_shim() -> PathBuf {
    plugind_tests::shim::build("failsync", include_str!("../shims/failsync.c"))
}

/// The shim interposes only calls resolved by the dynamic linker.
///
/// # Panics
/// If `plugind` does not import `fdatasync` (the syncer's `File::sync_data`) and `fsync`
/// (SQLite's) from libc.
fn assert_syncs_are_imported() {
    use object::{Object as _, read::File};
    let path = plugind_tests::binary::plugind();
    let bytes = fs::read(&path).expect("plugind was built");
    let file = File::parse(&*bytes).expect("plugind is an ELF file");
    let imports = file.imports().expect("its dynamic symbols can be read");
    for call in [&b"fdatasync"[..], b"fsync"] {
        assert!(
            imports.iter().any(|i| i.name() == call),
            "{} does not import {} dynamically (linked statically?): LD_PRELOAD cannot make it \
             fail",
            path.display(),
            String::from_utf8_lossy(call)
        );
    }
}

/// The daemon's fail-stop line (`plugind: ledger: …; stopping now (exit 1)`).
///
/// # Panics
/// If there is none, with the log.
fn fail_stop_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.starts_with("plugind: ledger: ") && l.ends_with("stopping now (exit 1)"))
        .unwrap_or_else(|| panic!("no fail-stop line:\n{log}"))
}

#[test]
fn a_failed_fsync_stops_the_daemon_and_nothing_answered_ok_is_lost() {
    assert_syncs_are_imported();
    let shim = failsync_shim();
    let s = sandbox("faults");
    let rec = s.path().join("rec.txt");
    let held = s.path().join("held.txt");
    let missing = s.path().join("missing/held.txt");
    let flag = s.path().join("fail-fsync");
    // `held` cannot start until the last run: what it is routed is only in the ledger when
    // the daemon stops, and it gets it in the end from the ledger alone.
    let text = |held: &Path| {
        config(
            "fsync",
            &[
                ("rec", "", record_config(&rec, "")),
                ("held", "", record_config(held, "")),
            ],
        )
    };
    let shimmed = [
        ("LD_PRELOAD", shim.as_os_str()),
        ("PLUGIND_TEST_FAIL_FSYNC", flag.as_os_str()),
    ];
    let mut d = Daemon::start_with_env(s, &text(&missing), &shimmed);
    let payloads: Vec<String> = (0..20).map(|i| format!("ok{i}")).collect();
    let mut answered = BTreeSet::new();
    for answer in try_publish_all(&d, &payloads, None) {
        answered.insert(answer.unwrap_or_else(|e| panic!("{e:?}\n{}", d.history())));
    }
    assert_eq!(answered.len(), payloads.len());
    wait_until("rec has every message", &d, || {
        recorded_ids(&rec) == answered
    });

    // 1. The syncer's fdatasync of the log fails (SQLite itself calls fsync, so only the
    //    syncer and fx-record call fdatasync: this failure is the syncer's, deterministically).
    //    The publish's transaction is written, but the fsync that must cover it failed: it is
    //    never answered OK (the daemon exits before answering; the connection drops).
    fs::write(&flag, "fdatasync").expect("the sandbox is writable");
    let refused = try_publish_all(&d, &["refused-1".to_owned()], None);
    assert!(
        matches!(&refused[..], [Err(_)]),
        "a publish whose fsync failed: {refused:?}\n{}",
        d.history()
    );
    let exit = d.wait_exit(Duration::from_secs(5));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(1),
        "the daemon stops with exit 1 after a failed fsync ({exit:?}):\n{}",
        d.history()
    );
    let log = d.log();
    let stopped = fail_stop_line(&log);
    assert!(
        stopped.contains("fsync of") && stopped.contains("ledger.db-wal failed"),
        "the fail-stop names the failed fsync of the log: {stopped}\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("failsync: fdatasync(") && l.contains("ledger.db-wal")),
        "the shim failed the syncer's fdatasync of the log:\n{log}"
    );
    fs::remove_file(&flag).expect("the flag was created above");

    // 2. SQLite's own fsync of the log fails (in the commit, when the log starts over; or in
    //    the checkpoint that follows any commit within 100 ms): a publish made then may be
    //    answered OK (its fdatasync succeeded) or not, and the daemon stops either way.
    let mut d = Daemon::start_with_env(d.kill9(), &text(&missing), &shimmed);
    fs::write(&flag, "fsync").expect("the sandbox is writable");
    for answer in try_publish_all(&d, &["maybe-2".to_owned()], None) {
        answered.extend(answer.ok());
    }
    let exit = d.wait_exit(Duration::from_secs(5));
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(1),
        "the daemon stops with exit 1 after a failed fsync in SQLite ({exit:?}):\n{}",
        d.history()
    );
    let log = d.log();
    let stopped = fail_stop_line(&log);
    assert!(
        stopped.contains("disk I/O error"),
        "the fail-stop names SQLite's I/O error: {stopped}\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.starts_with("failsync: fsync(") && l.contains("ledger.db-wal")),
        "the shim failed SQLite's fsync of the log:\n{log}"
    );
    fs::remove_file(&flag).expect("the flag was created above");

    // Started without the shim, `held` now able to start: every message answered OK is
    // there, from the ledger. A refused one may be there too: its transaction reached the OS
    // before its fsync failed, and the file system still holds it (the EIO was simulated).
    // Delivering it is allowed (its publisher got an error, not an OK: at least once covers
    // retries); only a message answered OK must never be missing.
    let d = Daemon::start(d.kill9(), &text(&held));
    wait_until("held has every message answered OK", &d, || {
        recorded_ids(&held).is_superset(&answered)
    });
    wait_until("rec has every message answered OK", &d, || {
        recorded_ids(&rec).is_superset(&answered)
    });
    let (status, s) = d.stop_keeping_state();
    let log = fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default();
    assert!(status.success(), "{log}");
    for r in read_record(&held).iter().chain(&read_record(&rec)) {
        assert!(
            answered.contains(&r.id) || ["refused-1", "maybe-2"].contains(&r.payload.as_str()),
            "{r:?} was never published:\n{log}"
        );
    }
}

/// Publishes `payloads` while the only instance cannot start (they wait in the ledger), then
/// stops gracefully: the log is checkpointed into `ledger.db`, where the bytes can be
/// damaged. Returns the sandbox, the record path of a working instance and the ids.
fn waiting_ledger(
    label: &str,
    payloads: &[String],
) -> (plugind_tests::sandbox::Sandbox, PathBuf, Vec<u64>) {
    let s = sandbox(label);
    let rec = s.path().join("rec.txt");
    let waiting = config("fsync", &[("rec", "", unstartable_config(&s, ""))]);
    let d = Daemon::start(s, &waiting);
    let ids: Vec<u64> = try_publish_all(&d, payloads, None)
        .into_iter()
        .map(|r| r.expect("accepted"))
        .collect();
    let (status, s) = d.stop_keeping_state();
    assert!(status.success());
    (s, rec, ids)
}

#[test]
fn a_flipped_byte_in_a_stored_payload_is_reported_and_dead_lettered_the_rest_is_delivered() {
    let payloads: Vec<String> = [
        "first-payload",
        "DAMAGED-PAYLOAD-0123456789",
        "last-payload",
    ]
    .map(str::to_owned)
    .to_vec();
    let (s, rec, ids) = waiting_ledger("corrupt-payload", &payloads);
    let db = s.path().join("state/ledger.db");
    let mut bytes = fs::read(&db).unwrap();
    let needle = b"DAMAGED-PAYLOAD-0123456789";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the payload is in ledger.db after a graceful stop");
    bytes[at + 8] ^= 0x01;
    fs::write(&db, &bytes).unwrap();

    let good = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start(s, &good);
    wait_until("the intact messages are delivered", &d, || {
        recorded_ids(&rec) == BTreeSet::from([ids[0], ids[2]])
    });
    d.wait_for_log("cannot be read: dead-lettered", 1);
    let log = d.log();
    assert!(
        log.contains(&format!("id={}", ids[1])) && log.contains("checksum does not match"),
        "the damaged message is named with the cause:\n{log}"
    );
    let (status, s) = d.stop_keeping_state();
    assert!(
        status.success(),
        "the daemon kept running, then stopped cleanly: {status:?}\n{}",
        fs::read_to_string(s.path().join("daemon.log")).unwrap_or_default()
    );
    let conn = rusqlite::Connection::open(s.path().join("state/ledger.db")).unwrap();
    let reason: String = conn
        .query_row(
            "SELECT json_extract(state, '$.last_reason') FROM dead_letters WHERE msg = ?1",
            [ids[1] as i64],
            |r| r.get(0),
        )
        .expect("a dead letter, not dropped");
    assert!(
        reason.starts_with("unreadable: the ledger is corrupt"),
        "{reason}"
    );
}

#[test]
fn a_damaged_database_page_stops_the_start_with_where_the_damage_is() {
    let payloads: Vec<String> = (0..400)
        .map(|i| format!("message-{i}-{}", "x".repeat(200)))
        .collect();
    let (s, rec, _) = waiting_ledger("corrupt-page", &payloads);
    let db = s.path().join("state/ledger.db");
    let mut bytes = fs::read(&db).unwrap();
    assert!(bytes.len() > 8 * 4096, "several pages: {}", bytes.len());
    // Garbage over the middle of the file: B-tree pages of the messages.
    let middle = bytes.len() / 2 / 4096 * 4096;
    for b in &mut bytes[middle..middle + 4096] {
        *b = 0xA5;
    }
    fs::write(&db, &bytes).unwrap();
    let good = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    s.put("plugins.toml", &good);
    let out = Command::new(plugind_tests::binary::plugind())
        .args(["run", "-c"])
        .arg(s.path().join("plugins.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("corrupt") && err.contains("ledger.db") && err.contains("integrity check"),
        "the error names the file, the damage and where:\n{err}"
    );
}

/// Hostile input (issue 18, item 6): a flipped bit in the write-ahead log silently truncated
/// history — SQLite stops reading the log at the first frame whose checksum fails, and what
/// follows is gone (1,123 of 2,000 answered messages remained, nothing said). The ledger
/// keeps the last id it answered OK beside the database (`state_dir/ledger.mark`) and says
/// what the ledger lost at the next start: the status shows the ids.
#[test]
fn a_flipped_byte_in_the_write_ahead_log_after_a_kill_is_reported_with_the_ids_lost() {
    let s = sandbox("faults-wal");
    let waiting = config("fsync", &[("rec", "", unstartable_config(&s, ""))]);
    let d = Daemon::start(s, &waiting);
    let db = d.sandbox().path().join("state/ledger.db");
    // A reader holding a snapshot from before the publishes: no checkpoint copies them into
    // ledger.db and the log cannot start over, so they are in the log alone when the daemon
    // is killed, as the commits since the last checkpoint of a busy daemon are. (It does not
    // checkpoint when it closes.)
    let reader = rusqlite::Connection::open(&db).unwrap();
    reader
        .set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    let payloads: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let answered: BTreeSet<u64> = try_publish_all(&d, &payloads, None)
        .into_iter()
        .map(|r| r.expect("accepted"))
        .collect();
    let s = d.kill9();
    drop(reader);

    let wal = s.path().join("state/ledger.db-wal");
    let mut bytes = fs::read(&wal).unwrap();
    let page = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let frames = (bytes.len() - 32) / (24 + page);
    assert!(
        frames > 100,
        "the publishes are in the log: {frames} frames"
    );
    let at = 32 + frames / 2 * (24 + page) + 24 + 100;
    bytes[at] ^= 0x01;
    fs::write(&wal, &bytes).unwrap();

    let d = Daemon::restart(s);
    let out = d.cli(&["ctl", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {out:?}\n{}", d.history()));
    let lost = &status["ledger"]["lost"];
    let last = *answered.iter().max().unwrap();
    assert_eq!(
        lost["last_id"].as_u64(),
        Some(last),
        "the loss is reported up to the last id answered OK: {status}\n{}",
        d.history()
    );
    let first = lost["first_id"].as_u64().expect("the first id lost");
    let kept = answered.iter().filter(|id| **id < first).count() as u64;
    assert!(kept < answered.len() as u64, "{status}");
    // What the ledger still holds is exactly what came before the first id reported lost.
    let out = d.cli(&["ctl", "plugins", "--json"]);
    let plugins: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        plugins["instances"][0]["backlog"].as_u64(),
        Some(kept),
        "{plugins}\n{status}"
    );
    // Said once: the next start has nothing new to report.
    let d = Daemon::restart(d.kill9());
    let out = d.cli(&["ctl", "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["ledger"]["lost"].is_null(), "{status}");
    d.stop();
}

/// Hostile input (issue 18, item 16): a state dir in use by another daemon and a damaged
/// ledger exited 78, which the systemd unit takes as "do not restart" (only an invalid
/// configuration exits 78), and a damaged header said "not a plugind ledger".
#[test]
fn a_state_dir_in_use_and_a_damaged_ledger_exit_1_saying_what_to_do() {
    let s = sandbox("faults");
    let rec = s.path().join("rec.txt");
    let good = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    let d = Daemon::start(s, &good);
    let run = |s: &Path| {
        Command::new(plugind_tests::binary::plugind())
            .args(["run", "-c"])
            .arg(s.join("plugins.toml"))
            .output()
            .unwrap()
    };
    let out = run(d.sandbox().path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another plugind"), "{err}");
    let (status, s) = d.stop_keeping_state();
    assert!(status.success());

    let db = s.path().join("state/ledger.db");
    let mut bytes = fs::read(&db).unwrap();
    bytes[..16].copy_from_slice(b"garbage-garbage!");
    fs::write(&db, &bytes).unwrap();
    let out = run(s.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("damaged")
            && err.contains("restore a backup")
            && !err.contains("not a plugind ledger"),
        "{err}"
    );
}

/// Hostile input (issue 18, item 16): `check --config-only` (the unit's ExecStartPre)
/// passed a read-only state dir, and the start then failed (exit 1) in a loop. The check
/// refuses it, and so does the start, with exit 78: a state_dir the daemon cannot write is
/// the configuration's to fix (or the unit's), a restart cannot.
#[test]
fn a_read_only_state_dir_fails_check_config_only_and_the_start_with_exit_78() {
    let s = sandbox("faults");
    let tmpfs = Tmpfs::mount("1m");
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(tmpfs.path())
        .status()
        .unwrap();
    assert!(remounted.success(), "the tmpfs can be made read-only");
    std::os::unix::fs::symlink(tmpfs.path(), s.path().join("state"))
        .expect("the sandbox is writable");
    let rec = s.path().join("rec.txt");
    let path = s.put(
        "plugins.toml",
        config("fsync", &[("rec", "", record_config(&rec, ""))]),
    );
    let out = Command::new(plugind_tests::binary::plugind())
        .args(["check", "--config-only", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("state_dir") && err.contains("read-only"),
        "the check names state_dir and why: {err}"
    );
    let out = Command::new(plugind_tests::binary::plugind())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("read-only"), "{err}");
    drop(s);
    drop(tmpfs);
}

/// Hostile input (issue 18, item 23): once the disk was full and the space reserved for
/// settlements was used, freeing the disk with `ctl forget --purge` did not bring publishing
/// back: the freed pages stayed in ledger.db, the reserve could not be made again, and
/// publishes were refused until a restart.
#[test]
fn after_a_full_disk_is_freed_by_forget_purge_publishing_resumes_without_a_restart() {
    full_disk_freed_by_forget_purge(true);
}

/// The same with no settlement while the disk fills (`rec` is subscribed to other topics
/// then), so the reserve is still there when the operator acts: the table's removal and
/// the purge failed with "the ledger is full" (they now may use the reserve, as settlements
/// do); and a purge that freed much space could not give it back (one vacuum of every free
/// page needed more log than the disk had: it is done in steps, the log cut between them).
#[test]
fn a_full_disk_with_its_reserve_intact_is_freed_by_forget_purge() {
    full_disk_freed_by_forget_purge(false);
}

/// `settling`: `rec` acks what is published while the disk fills (the reserve is used up by
/// settlements); else it is subscribed to other topics until the disk is full.
fn full_disk_freed_by_forget_purge(settling: bool) {
    let s = sandbox("faults");
    let tmpfs = Tmpfs::mount("24m");
    std::os::unix::fs::symlink(tmpfs.path(), s.path().join("state"))
        .expect("the sandbox is writable");
    let rec = s.path().join("rec.txt");
    let missing = s.path().join("missing/held.txt");
    let mut both = config(
        "fsync",
        &[
            ("rec", "", record_config(&rec, "")),
            ("held", "", record_config(&missing, "")),
        ],
    );
    if !settling {
        both = both.replacen("topics = [\"t.>\"]", "topics = [\"r.>\"]", 1);
    }
    let d = Daemon::start(s, &both);
    let (_, _, next) = fill_disk(&d, &tmpfs, Duration::from_secs(60));
    // `held`'s table removed (its subscription ends, its backlog stays), then its backlog
    // purged: the space it held is free again.
    let only_rec = config("fsync", &[("rec", "", record_config(&rec, ""))]);
    d.sandbox().put("plugins.toml", &only_rec);
    let out = d.cli(&["ctl", "reload"]);
    assert!(out.status.success(), "{out:?}\n{}", d.history());
    let out = d.cli(&["ctl", "forget", "held", "--purge", "--yes"]);
    assert!(out.status.success(), "{out:?}\n{}", d.history());

    let started = Instant::now();
    let id = loop {
        if let [Ok(id)] = try_publish_all(&d, &[payload(next)], None)[..] {
            break id;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "publishing did not resume after the purge:\n{}\n{}",
            tmpfs.usage(),
            d.history()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    wait_until("rec gets the message published after the purge", &d, || {
        recorded_ids(&rec).contains(&id)
    });
    let (status, s) = d.stop_keeping_state();
    assert!(status.success());
    drop(s);
    drop(tmpfs);
}
