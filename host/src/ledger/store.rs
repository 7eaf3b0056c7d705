//! The on-disk ledger: one SQLite database in `state_dir` (WAL mode), its schema, its format
//! version and upgrade rule, and every statement the ledger runs. Only the writer thread
//! writes; reads for the dispatcher and the control plane use a connection of their own.
//!
//! Format (`PRAGMA user_version`), see ARCHITECTURE.md "Ledger format":
//! - a newer daemon opens older state and upgrades it in one transaction, step by step;
//! - an older daemon refuses newer state, naming both versions.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use rusqlite::{CachedStatement, Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use super::{
    BacklogEntry, DeadLetter, DeadLetterFilter, Forget, HistoryEntry, LedgerError, Origin,
    Remembered, Selection, Subscription,
};
use crate::{clock::Timestamp, delivery::Delivery, message::StoredMessage};

/// The format this build writes, and the newest it reads.
pub(super) const FORMAT: i64 = 2;

/// `PRAGMA application_id`: "plgd". A database without it is not a plugind ledger.
const APPLICATION_ID: i64 = 0x706c_6764;

/// The file name of the database inside `state_dir`.
pub(super) const FILE: &str = "ledger.db";
/// Its write-ahead log, beside it.
pub(super) const LOG: &str = "ledger.db-wal";

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
-- Every instance ever named, with what outlives a run: its subscription (0 none, 1 by its
-- table in plugins.toml, 2 autoloaded), the plugin and that plugin's own topics as last seen
-- (JSON; NULL: never loaded), and an operator's pause (format 2).
CREATE TABLE instances(
    key INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    subscribed INTEGER NOT NULL DEFAULT 0,
    plugin TEXT,
    topics TEXT,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE messages(
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    headers BLOB NOT NULL,
    payload BLOB NOT NULL,
    published INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    -- The one target of a single-target message whose delivery has not ended: it needs no
    -- row in `deliveries` until it changes (most never do: they are acked at once).
    solo INTEGER
);
CREATE TABLE deliveries(
    msg INTEGER NOT NULL,
    inst INTEGER NOT NULL,
    state BLOB,
    PRIMARY KEY(msg, inst)
) WITHOUT ROWID;
CREATE TABLE dead_letters(
    msg INTEGER NOT NULL,
    inst INTEGER NOT NULL,
    at INTEGER NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY(msg, inst)
) WITHOUT ROWID;
CREATE INDEX dead_letters_at ON dead_letters(at);
CREATE TABLE keys(key TEXT PRIMARY KEY, msg INTEGER NOT NULL, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX keys_at ON keys(at);
-- Every delivery not yet ended: the rows of `deliveries`, and the single targets that have
-- none yet (state NULL: as accepted).
CREATE VIEW pending(msg, inst, state) AS
    SELECT m.id, m.solo, NULL FROM messages m
     WHERE m.solo IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.msg = m.id AND d.inst = m.solo)
    UNION ALL SELECT msg, inst, state FROM deliveries;
INSERT INTO meta VALUES ('next_id', 1), ('clean', 1), ('last_id', 0);
";

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sync {
    /// The write-ahead log is fsynced before the commit returns.
    Full,
    /// Written to the OS; a later full commit (or a checkpoint) syncs it.
    Written,
}

/// Classifies a storage error: out of space is [`LedgerError::Full`], anything else is
/// fatal (docs/design.md §7: never retry an fsync, never continue on unrecorded state).
pub(super) fn classify(context: &str, e: &rusqlite::Error) -> LedgerError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => LedgerError::Full(format!("{context}: no space left: {e}")),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            LedgerError::Fatal(format!("{context}: the ledger is corrupt: {e}"))
        }
        _ => LedgerError::Fatal(format!("{context}: {e}")),
    }
}

/// Runs `f` in one transaction of `conn`: committed when it succeeds, rolled back when it
/// (or the commit) fails.
pub(super) fn in_transaction<T>(
    conn: &Connection,
    context: &str,
    f: impl FnOnce() -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    conn.execute_batch("BEGIN").map_err(fatal(context))?;
    let done = f().and_then(|t| {
        conn.execute_batch("COMMIT")
            .map_err(fatal(context))
            .map(|()| t)
    });
    if done.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    done
}

fn fatal(context: &str) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |e| classify(context, &e)
}

/// A lock held by another connection (a checkpoint, a reader) is retried every 100 µs for
/// up to 5 s. SQLite's default busy timeout sleeps up to 100 ms between tries: a pause that
/// long in the writer is a latency spike for every publish queued behind it.
fn wait_briefly(conn: &Connection) -> Result<(), LedgerError> {
    fn retry(attempt: i32) -> bool {
        if attempt >= 50_000 {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
        true
    }
    conn.busy_handler(Some(retry)).map_err(fatal("ledger"))
}

/// Whether [`open`] may create a new ledger where it finds none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Create {
    /// Yes: nothing says a ledger was here.
    Allowed,
    /// No: the state dir had a ledger (its mark says so); a missing or empty database is
    /// refused with the way out.
    Refused,
}

/// Opens (creating or upgrading) the database, with the writer's settings. `ours`: the state
/// dir's mark says a plugind ledger lives here (a file SQLite cannot read is then damaged,
/// not someone else's).
///
/// # Errors
/// [`LedgerError::Refused`] for a database that is empty where `create` refuses one, damaged,
/// not a plugind ledger, or of a newer format; [`LedgerError::Fatal`] when it cannot be read.
pub(super) fn open(dir: &Path, create: Create, ours: bool) -> Result<Connection, LedgerError> {
    let path = dir.join(FILE);
    let conn = Connection::open(&path).map_err(fatal("cannot open the ledger"))?;
    wait_briefly(&conn)?;
    let (empty, format) = check_format(&conn, &path, ours)?;
    if empty && create == Create::Refused {
        return Err(LedgerError::Refused(lost(
            &path,
            "holds no ledger (an empty database)",
        )));
    }
    // auto_vacuum must be chosen before the first table exists. Statement journals (the
    // undo of one statement inside a transaction: multi-row inserts, deletes with RETURNING,
    // INSERT OR REPLACE) stay in memory: they are never needed after a crash, and written to
    // a temporary file they were a sixth of an operator's replay.
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA journal_size_limit = 33554432;
         PRAGMA temp_store = MEMORY;
         PRAGMA foreign_keys = OFF;",
    )
    .map_err(fatal("cannot configure the ledger"))?;
    if empty {
        conn.execute_batch(&format!(
            "BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = \
             {FORMAT}; COMMIT;"
        ))
        .map_err(fatal("cannot create the ledger"))?;
    } else if format < FORMAT {
        upgrade(&conn, format)?;
    }
    Ok(conn)
}

/// The refusal of a state dir whose ledger is gone: `path` `what` (is missing, is empty),
/// and the ways out.
pub(super) fn lost(path: &Path, what: &str) -> String {
    format!(
        "{} {what}, but this state dir had a ledger: it was deleted or lost, with its pending \
         deliveries and dead letters. Nothing was changed. Restore a backup (`plugind restore \
         FILE`), or start a new, empty ledger on purpose with `plugind run --fresh-ledger` \
         (message ids continue after the last one given out)",
        path.display()
    )
}

/// The refusal of a database SQLite cannot use as a ledger.
fn damaged(path: &Path, why: &str) -> LedgerError {
    LedgerError::Refused(format!(
        "{} is damaged ({why}) — restore a backup (`plugind restore FILE`), or move it away and \
         start a new, empty ledger with `plugind run --fresh-ledger`",
        path.display()
    ))
}

/// Checks that `conn` is a plugind ledger of a format this build reads (or an empty
/// database). Returns (whether it is empty, its format). `ours`: the state dir's mark says a
/// plugind ledger lives there.
///
/// # Errors
/// [`LedgerError::Refused`] naming the file and what is wrong with it.
pub(super) fn check_format(
    conn: &Connection,
    path: &Path,
    ours: bool,
) -> Result<(bool, i64), LedgerError> {
    // A file that starts as SQLite's do is a damaged database, not someone else's file.
    let sqlite = std::fs::File::open(path)
        .and_then(|f| {
            let mut magic = [0u8; 16];
            std::io::Read::read_exact(&mut &f, &mut magic).map(|()| magic)
        })
        .is_ok_and(|magic| &magic == b"SQLite format 3\0");
    let empty: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) if ours || sqlite => {
                damaged(path, "SQLite cannot read it: file is not a database")
            }
            Some(ErrorCode::NotADatabase) => LedgerError::Refused(format!(
                "{}: not an SQLite database: damaged, or not a plugind ledger; restore a backup \
                 (`plugind restore FILE`), or move it away, or point state_dir elsewhere",
                path.display()
            )),
            Some(ErrorCode::DatabaseCorrupt) => damaged(path, &e.to_string()),
            _ => classify("cannot read the ledger", &e),
        })?;
    let application: i64 = pragma(conn, "application_id")?;
    let format: i64 = pragma(conn, "user_version")?;
    if empty != 0 && application != APPLICATION_ID {
        if ours {
            return Err(damaged(
                path,
                &format!("its application id is {application:#x}, not plugind's"),
            ));
        }
        return Err(LedgerError::Refused(format!(
            "{}: not a plugind ledger (application id {application:#x}); move it away or point \
             state_dir elsewhere",
            path.display()
        )));
    }
    if format > FORMAT {
        return Err(LedgerError::Refused(format!(
            "{}: the ledger has format {format}, written by a newer plugind; this build reads \
             formats up to {FORMAT}. Run the newer plugind, or restore a backup taken with this \
             version",
            path.display()
        )));
    }
    Ok((empty == 0, format))
}

/// The upgrade rule: each format step is one function here, run in order in one transaction.
/// Format 1 is the first; format 2 remembers subscriptions and pauses per instance.
fn upgrade(conn: &Connection, from: i64) -> Result<(), LedgerError> {
    if from < 1 {
        return Err(LedgerError::Refused(format!(
            "{}: the ledger has format {from}, which no plugind ever wrote (formats start at 1)",
            conn.path().unwrap_or("ledger")
        )));
    }
    in_transaction(conn, "cannot upgrade the ledger", || {
        let step = |sql: &str| {
            conn.execute_batch(sql)
                .map_err(fatal("cannot upgrade the ledger"))
        };
        if from < 2 {
            step(
                "ALTER TABLE instances ADD COLUMN subscribed INTEGER NOT NULL DEFAULT 0;
                 ALTER TABLE instances ADD COLUMN plugin TEXT;
                 ALTER TABLE instances ADD COLUMN topics TEXT;
                 ALTER TABLE instances ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
        step(&format!("PRAGMA user_version = {FORMAT}"))
    })?;
    tracing::info!(from, to = FORMAT, "ledger format upgraded");
    Ok(())
}

/// The syncer's checkpoint connection (it writes the database file, never the log).
pub(super) fn open_checkpointer(dir: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(
        dir.join(FILE),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fatal("cannot open the ledger for checkpoints"))?;
    wait_briefly(&conn)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0")
        .map_err(fatal("ledger"))?;
    Ok(conn)
}

/// A read-only connection for loads and queries beside the writer.
pub(super) fn open_reader(dir: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(
        dir.join(FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fatal("cannot open the ledger for reading"))?;
    wait_briefly(&conn)?;
    Ok(conn)
}

fn pragma(conn: &Connection, name: &str) -> Result<i64, LedgerError> {
    conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        .map_err(fatal("cannot read the ledger"))
}

/// Sets how the next commits sync (`synchronous` is per connection, between transactions).
pub(super) fn set_sync(conn: &Connection, sync: Sync) -> Result<(), LedgerError> {
    conn.execute_batch(match sync {
        Sync::Full => "PRAGMA synchronous = FULL",
        Sync::Written => "PRAGMA synchronous = NORMAL",
    })
    .map_err(fatal("ledger"))
}

pub(super) fn meta(conn: &Connection, key: &str) -> Result<i64, LedgerError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(fatal("cannot read the ledger"))
        .map(Option::unwrap_or_default)
}

pub(super) fn set_meta(conn: &Connection, key: &str, value: i64) -> Result<(), LedgerError> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![key, value]))
        .map(drop)
        .map_err(fatal("cannot write the ledger"))
}

/// Sets `meta` `key` to `value` unless it has a value.
pub(super) fn init_meta(conn: &Connection, key: &str, value: i64) -> Result<(), LedgerError> {
    conn.prepare_cached("INSERT OR IGNORE INTO meta VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![key, value]))
        .map(drop)
        .map_err(fatal("cannot write the ledger"))
}

/// Raises the id high-water mark (ids are never reused, even once their messages are gone).
pub(super) fn raise_next_id(conn: &Connection, next: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'next_id'")?
        .execute([next as i64])
        .map(drop)
}

/// Raises the last id recorded (`meta.last_id`, one row written by every transaction that
/// accepts messages): recovery compares it with the mark's last id answered OK.
pub(super) fn raise_last_id(conn: &Connection, last: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_id' AND value < ?1")?
        .execute([last as i64])
        .map(drop)
}

/// The persistent key of every instance name, creating the missing ones.
pub(super) fn instance_keys(conn: &Connection, names: &[String]) -> Result<Vec<u32>, LedgerError> {
    names
        .iter()
        .map(|name| {
            conn.execute("INSERT OR IGNORE INTO instances(name) VALUES (?1)", [name])
                .and_then(|_| {
                    conn.query_row("SELECT key FROM instances WHERE name = ?1", [name], |r| {
                        r.get(0)
                    })
                })
                .map_err(fatal("cannot register an instance in the ledger"))
        })
        .collect()
}

/// How many dead letters each instance has now, by name.
pub(super) fn dead_letter_counts(conn: &Connection) -> Result<Vec<(String, u64)>, LedgerError> {
    conn.prepare_cached(
        "SELECT i.name, count(*) FROM dead_letters d JOIN instances i ON i.key = d.inst
          GROUP BY d.inst",
    )
    .and_then(|mut s| {
        s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
            .collect()
    })
    .map_err(fatal("cannot count dead letters"))
}

/// What is remembered of every instance that has a subscription or a pause, by name.
pub(super) fn remembered(conn: &Connection) -> Result<Vec<(String, Remembered)>, LedgerError> {
    let map = fatal("cannot read the instances of the ledger");
    let mut stmt = conn
        .prepare(
            "SELECT name, subscribed, plugin, topics, paused FROM instances
              WHERE subscribed != 0 OR paused != 0 ORDER BY name",
        )
        .map_err(&map)?;
    type Row = (String, i64, Option<String>, Option<String>, bool);
    let rows: Vec<Row> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .and_then(Iterator::collect)
        .map_err(&map)?;
    rows.into_iter()
        .map(|(name, subscribed, plugin, topics, paused)| {
            let origin = match subscribed {
                0 => None,
                1 => Some(Origin::Configured),
                2 => Some(Origin::Autoloaded),
                other => {
                    return Err(LedgerError::Fatal(format!(
                        "the ledger is corrupt: instance `{name}` has subscription kind {other}"
                    )));
                }
            };
            let topics = topics
                .map(|t| serde_json::from_str::<Vec<String>>(&t))
                .transpose()
                .map_err(|e| {
                    LedgerError::Fatal(format!(
                        "the ledger is corrupt: the topics of instance `{name}` cannot be read: \
                         {e}"
                    ))
                })?;
            let subscription = origin.map(|origin| Subscription {
                origin,
                plugin: plugin.unwrap_or_else(|| name.clone()),
                topics,
            });
            Ok((
                name,
                Remembered {
                    subscription,
                    paused,
                },
            ))
        })
        .collect()
}

/// Records what is remembered of instance `name` (registering the name if it is new).
pub(super) fn remember(
    conn: &Connection,
    name: &str,
    remembered: &Remembered,
) -> Result<(), LedgerError> {
    let map = fatal("cannot record an instance in the ledger");
    let sub = remembered.subscription.as_ref();
    let subscribed: i64 = match sub.map(|s| s.origin) {
        None => 0,
        Some(Origin::Configured) => 1,
        Some(Origin::Autoloaded) => 2,
    };
    let topics = sub
        .and_then(|s| s.topics.as_ref())
        .map(|t| serde_json::to_string(t).expect("strings always serialize"));
    conn.prepare_cached("INSERT OR IGNORE INTO instances(name) VALUES (?1)")
        .and_then(|mut s| s.execute([name]))
        .map_err(&map)?;
    conn.prepare_cached(
        "UPDATE instances SET subscribed = ?2, plugin = ?3, topics = ?4, paused = ?5
          WHERE name = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            name,
            subscribed,
            sub.map(|s| s.plugin.as_str()),
            topics,
            remembered.paused
        ])
    })
    .map(drop)
    .map_err(&map)
}

/// Every instance name by key.
pub(super) fn instance_names(conn: &Connection) -> Result<Vec<(u32, String)>, LedgerError> {
    let mut stmt = conn
        .prepare("SELECT key, name FROM instances")
        .map_err(fatal("cannot read the ledger"))?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .and_then(Iterator::collect)
        .map_err(fatal("cannot read the ledger"))
}

fn encode_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        for part in [name, value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

fn decode_headers(mut bytes: &[u8]) -> Option<Vec<(String, String)>> {
    fn part(bytes: &mut &[u8]) -> Option<String> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let text = rest.get(..len)?;
        *bytes = &rest[len..];
        String::from_utf8(text.to_vec()).ok()
    }
    let mut headers = Vec::new();
    while !bytes.is_empty() {
        headers.push((part(&mut bytes)?, part(&mut bytes)?));
    }
    Some(headers)
}

/// The checksum of a stored message: a flipped byte anywhere in it is found on load.
fn checksum(id: u64, topic: &str, headers: &[u8], payload: &[u8], published: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(topic.as_bytes());
    h.update(&[0]);
    h.update(headers);
    h.update(payload);
    h.update(&published.to_le_bytes());
    h.finalize()
}

pub(super) fn encode_delivery(delivery: &Delivery) -> Vec<u8> {
    serde_json::to_vec(delivery).expect("a delivery always serializes")
}

pub(super) fn decode_delivery(
    bytes: &[u8],
    message: u64,
    instance: &str,
) -> Result<Delivery, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| {
        LedgerError::Fatal(format!(
            "the ledger is corrupt: the delivery of message {message} to `{instance}` cannot be \
             read: {e}"
        ))
    })
}

/// Messages inserted by one statement (see [`Writes::accept_all`]).
const ROWS: usize = 32;

/// `INSERT INTO messages … VALUES (…), (…), …` for [`ROWS`] messages, built once.
static INSERT_ROWS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO messages(id, topic, headers, payload, published, crc, solo) VALUES {}",
        vec!["(?, ?, ?, ?, ?, ?, ?)"; ROWS].join(", ")
    )
});

/// One `messages` row as stored: the message's columns, its headers encoded, its checksum,
/// and its target when it has exactly one (`solo`: no `deliveries` row until it changes).
struct Row<'m> {
    id: i64,
    topic: &'m str,
    headers: Vec<u8>,
    payload: &'m [u8],
    published: i64,
    crc: u32,
    solo: Option<u32>,
}

impl<'m> Row<'m> {
    fn of(m: &'m StoredMessage, targets: &[u32]) -> Self {
        let headers = encode_headers(&m.headers);
        Self {
            id: m.id as i64,
            topic: &m.topic,
            crc: checksum(m.id, &m.topic, &headers, &m.payload, m.publish_time.0),
            headers,
            payload: &m.payload,
            published: m.publish_time.0 as i64,
            solo: match targets {
                [one] => Some(*one),
                _ => None,
            },
        }
    }

    /// The values of the insert's placeholders, in the order of its column list.
    fn columns(&self) -> [&dyn rusqlite::ToSql; 7] {
        [
            &self.id,
            &self.topic,
            &self.headers,
            &self.payload,
            &self.published,
            &self.crc,
            &self.solo,
        ]
    }
}

/// The statements of one write transaction, prepared once for it.
pub(super) struct Writes<'c> {
    insert_message: CachedStatement<'c>,
    insert_delivery: CachedStatement<'c>,
    put_delivery: CachedStatement<'c>,
    delete_delivery: CachedStatement<'c>,
    drop_message: CachedStatement<'c>,
    clear_solo: CachedStatement<'c>,
    insert_dead: CachedStatement<'c>,
    insert_key: CachedStatement<'c>,
}

impl<'c> Writes<'c> {
    pub(super) fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            insert_message: conn.prepare_cached(
                "INSERT INTO messages(id, topic, headers, payload, published, crc, solo)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            insert_delivery: conn
                .prepare_cached("INSERT INTO deliveries(msg, inst, state) VALUES (?1, ?2, NULL)")?,
            put_delivery: conn.prepare_cached(
                "INSERT OR REPLACE INTO deliveries(msg, inst, state) VALUES (?1, ?2, ?3)",
            )?,
            delete_delivery: conn
                .prepare_cached("DELETE FROM deliveries WHERE msg = ?1 AND inst = ?2")?,
            // A message goes with the end of its last delivery: its single target's, or the
            // last row of `deliveries` when no dead letter keeps it.
            drop_message: conn.prepare_cached(
                "DELETE FROM messages WHERE id = ?1 AND (solo = ?2 OR (solo IS NULL
                   AND NOT EXISTS (SELECT 1 FROM deliveries WHERE msg = ?1)
                   AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE msg = ?1)))",
            )?,
            clear_solo: conn
                .prepare_cached("UPDATE messages SET solo = NULL WHERE id = ?1 AND solo = ?2")?,
            insert_dead: conn.prepare_cached(
                "INSERT OR REPLACE INTO dead_letters(msg, inst, at, state) VALUES (?1, ?2, ?3, ?4)",
            )?,
            insert_key: conn
                .prepare_cached("INSERT OR REPLACE INTO keys(key, msg, at) VALUES (?1, ?2, ?3)")?,
        })
    }

    /// A message and the deliveries to its targets (instance keys).
    pub(super) fn accept(&mut self, m: &StoredMessage, targets: &[u32]) -> rusqlite::Result<()> {
        let row = Row::of(m, targets);
        self.insert_message.execute(&row.columns()[..])?;
        self.deliveries(m.id, targets, row.solo)
    }

    /// The `deliveries` rows of a message with more than one target (a single target is
    /// the message row's `solo`).
    fn deliveries(&mut self, id: u64, targets: &[u32], solo: Option<u32>) -> rusqlite::Result<()> {
        if solo.is_none() {
            for inst in targets {
                self.insert_delivery.execute(params![id as i64, inst])?;
            }
        }
        Ok(())
    }

    /// Messages and the deliveries to their targets, [`ROWS`] messages per statement (one
    /// statement per row costs more than the row itself for small messages).
    pub(super) fn accept_all(
        &mut self,
        conn: &'c Connection,
        messages: &[(&StoredMessage, &[u32])],
    ) -> rusqlite::Result<()> {
        let mut chunks = messages.chunks_exact(ROWS);
        for chunk in &mut chunks {
            let rows: Vec<Row<'_>> = chunk.iter().map(|(m, t)| Row::of(m, t)).collect();
            let values: Vec<&dyn rusqlite::ToSql> = rows.iter().flat_map(Row::columns).collect();
            conn.prepare_cached(&INSERT_ROWS)?
                .execute(rusqlite::params_from_iter(values))?;
            for ((m, targets), row) in chunk.iter().zip(&rows) {
                self.deliveries(m.id, targets, row.solo)?;
            }
        }
        for (m, targets) in chunks.remainder() {
            self.accept(m, targets)?;
        }
        Ok(())
    }

    /// A delivery changed without ending.
    pub(super) fn update(
        &mut self,
        message: u64,
        inst: u32,
        delivery: &Delivery,
    ) -> rusqlite::Result<()> {
        self.put_delivery
            .execute(params![message as i64, inst, encode_delivery(delivery)])
            .map(drop)
    }

    /// A delivery ended (acked or purged): its row goes, and its message too once nothing
    /// refers to it.
    pub(super) fn end(&mut self, message: u64, inst: u32) -> rusqlite::Result<()> {
        self.delete_delivery
            .execute(params![message as i64, inst])?;
        self.drop_message
            .execute(params![message as i64, inst])
            .map(drop)
    }

    /// A delivery ended as a dead letter; the message stays for it.
    pub(super) fn dead_letter(
        &mut self,
        message: u64,
        inst: u32,
        delivery: &Delivery,
        at: Timestamp,
    ) -> rusqlite::Result<()> {
        self.delete_delivery
            .execute(params![message as i64, inst])?;
        self.clear_solo.execute(params![message as i64, inst])?;
        self.insert_dead
            .execute(params![
                message as i64,
                inst,
                at.0 as i64,
                encode_delivery(delivery)
            ])
            .map(drop)
    }

    /// A dead letter is gone (purged, expired): its message goes once nothing refers to it.
    pub(super) fn unreferenced(&mut self, message: u64) -> rusqlite::Result<()> {
        // No instance key is ever negative: only the "nothing refers to it" rule applies.
        self.drop_message
            .execute(params![message as i64, -1])
            .map(drop)
    }

    pub(super) fn key(&mut self, key: &str, message: u64, at: Timestamp) -> rusqlite::Result<()> {
        self.insert_key
            .execute(params![key, message as i64, at.0 as i64])
            .map(drop)
    }
}

/// Housekeeping: keys past the dedupe window and dead letters past their retention go.
/// Returns (keys, dead letters) removed.
pub(super) fn expire(
    conn: &Connection,
    keys_before: Timestamp,
    dead_before: Option<Timestamp>,
) -> rusqlite::Result<(usize, usize)> {
    let keys = conn
        .prepare_cached("DELETE FROM keys WHERE at < ?1")?
        .execute([keys_before.0 as i64])?;
    let dead = match dead_before {
        Some(before) => {
            let messages: Vec<i64> = conn
                .prepare_cached("DELETE FROM dead_letters WHERE at < ?1 RETURNING msg")?
                .query_map([before.0 as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut writes = Writes::new(conn)?;
            for m in &messages {
                writes.unreferenced(*m as u64)?;
            }
            messages.len()
        }
        None => 0,
    };
    Ok((keys, dead))
}

/// The database's page size in bytes.
pub(super) fn page_size(conn: &Connection) -> Result<u64, LedgerError> {
    pragma(conn, "page_size").map(|size| size.max(512) as u64)
}

/// Bytes in use by live pages (the file may be larger until it is vacuumed).
pub(super) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let count: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(((count - free).max(0) * size) as u64)
}

/// Gives free pages back to the file system once they are many: more than a quarter of the
/// file and more than 16 MiB (under a steady load, freed pages are reused and moving pages
/// would only cost writes). At most 1024 pages (4 MiB) a pass, to keep the pass short.
pub(super) fn vacuum(conn: &Connection) -> rusqlite::Result<()> {
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    if free > 4096 && free * 4 > pages {
        // Each step frees one page: step to the end.
        tracing::debug!(
            free,
            pages,
            "ledger: giving free pages back to the file system"
        );
        let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum(1024)")?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
    }
    Ok(())
}

/// Free pages one step of [`give_back`] vacuums. Moving a page writes it, its parent and
/// the pointer map into the log (several pages per page moved): one step's log must fit in
/// the room a full disk has (what the log held before it was cut), so the log is cut again
/// after each step. (One vacuum of every free page at once filled the disk with its log and
/// failed again at every try: 10 MiB of log for 14 MiB freed.)
const GIVE_BACK_STEP: u32 = 64;

/// Gives the file system back the free pages of the database and the whole log (copied
/// first), once the database has at least `enough` free pages (an operator's `purge` or
/// `forget --purge` freed them; 0: go on with a give-back begun before): the log is
/// checkpointed and cut to nothing, then [`GIVE_BACK_STEP`] free pages at a time are vacuumed
/// and the log cut again, until none is left or `budget` is spent. Never waits for a reader
/// (a busy checkpoint stops it: the caller tries again later). Returns the free pages left
/// (0: done).
///
/// # Errors
/// [`LedgerError::Full`] when even one step finds no room; [`LedgerError::Fatal`] else.
pub(super) fn give_back(
    conn: &Connection,
    enough: u64,
    budget: Duration,
) -> Result<u64, LedgerError> {
    let started = std::time::Instant::now();
    let free = || -> rusqlite::Result<u64> {
        conn.query_row("PRAGMA freelist_count", [], |r| r.get::<_, i64>(0))
            .map(|f| f.max(0) as u64)
    };
    let run = || -> rusqlite::Result<u64> {
        if free()? < enough.max(1) {
            return Ok(0);
        }
        let mut step =
            conn.prepare_cached(&format!("PRAGMA incremental_vacuum({GIVE_BACK_STEP})"))?;
        loop {
            // The log first: what the step writes needs room in it, and the database's new
            // end is written by the checkpoint.
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            let left = free()?;
            if busy != 0 || left == 0 || started.elapsed() >= budget {
                return Ok(left);
            }
            let mut rows = step.query([])?;
            while rows.next()?.is_some() {}
        }
    };
    conn.busy_handler(None).map_err(fatal("ledger"))?;
    let done = run().map_err(|e| classify("ledger", &e));
    wait_briefly(conn)?;
    done
}

/// [`classify`], plus where the damage is when the database is corrupt (SQLite's
/// `integrity_check`: the pages and what is wrong with them, at most 8 findings).
fn located(conn: &Connection, context: &str, e: &rusqlite::Error) -> LedgerError {
    let error = classify(context, e);
    if e.sqlite_error_code() != Some(ErrorCode::DatabaseCorrupt) {
        return error;
    }
    let findings: Vec<String> = conn
        .prepare("PRAGMA integrity_check(8)")
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
        .unwrap_or_default();
    LedgerError::Fatal(format!(
        "{error}; {} (integrity check): {}; restore a backup (`plugind restore`)",
        conn.path().unwrap_or(FILE),
        if findings.is_empty() {
            "no details".to_owned()
        } else {
            findings.join("; ")
        }
    ))
}

/// One stored delivery, as recovery reads it.
pub(super) struct StoredDelivery {
    pub message: u64,
    pub inst: u32,
    pub state: Option<Vec<u8>>,
    /// `None`: the delivery's message is missing (corruption, reported).
    pub size: Option<u64>,
    pub published: u64,
}

/// Every pending delivery (of instance key `only`, if given), without payloads (in no
/// particular order).
pub(super) fn scan(
    conn: &Connection,
    only: Option<u32>,
    mut each: impl FnMut(StoredDelivery) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let fail = |e: rusqlite::Error| located(conn, "cannot read the ledger", &e);
    let mut stmt = conn
        .prepare(
            "SELECT d.msg, d.inst, d.state, length(m.payload) + length(m.headers), m.published
               FROM pending d LEFT JOIN messages m ON m.id = d.msg
              WHERE ?1 IS NULL OR d.inst = ?1",
        )
        .map_err(fail)?;
    let mut rows = stmt.query([only]).map_err(fail)?;
    while let Some(row) = rows.next().map_err(fail)? {
        let read = || -> rusqlite::Result<StoredDelivery> {
            Ok(StoredDelivery {
                message: row.get::<_, i64>(0)? as u64,
                inst: row.get(1)?,
                state: row.get(2)?,
                size: row.get::<_, Option<i64>>(3)?.map(|s| s as u64),
                published: row.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
            })
        };
        each(read().map_err(fatal("cannot read the ledger"))?)?;
    }
    Ok(())
}

/// Reads one message back, checking its checksum.
pub(super) fn load(conn: &Connection, id: u64) -> Result<Option<StoredMessage>, LedgerError> {
    let row = conn
        .prepare_cached(
            "SELECT topic, headers, payload, published, crc FROM messages WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([id as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, u32>(4)?,
                ))
            })
            .optional()
        })
        .map_err(fatal("cannot read a message from the ledger"))?;
    let Some((topic, headers, payload, published, crc)) = row else {
        return Ok(None);
    };
    decode(id, topic, &headers, payload, published, crc).map(Some)
}

/// A stored message from its columns, its checksum checked.
fn decode(
    id: u64,
    topic: String,
    headers: &[u8],
    payload: Vec<u8>,
    published: u64,
    crc: u32,
) -> Result<StoredMessage, LedgerError> {
    let corrupt = |what: &str| {
        LedgerError::Corrupt(format!(
            "the ledger is corrupt: message {id} in {FILE}: {what}"
        ))
    };
    if checksum(id, &topic, headers, &payload, published) != crc {
        return Err(corrupt("its checksum does not match its bytes"));
    }
    let headers = decode_headers(headers).ok_or_else(|| corrupt("its headers cannot be read"))?;
    Ok(StoredMessage {
        id,
        topic,
        headers,
        payload: Bytes::from(payload),
        publish_time: Timestamp(published),
    })
}

/// Reads several messages back. Ids close together (the usual case: a backlog read back in
/// acceptance order) are read with one range scan, the others one by one.
pub(super) fn load_many(
    conn: &Connection,
    ids: &[u64],
) -> Result<Vec<Option<Arc<StoredMessage>>>, LedgerError> {
    let (Some(&low), Some(&high)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(Vec::new());
    };
    if high - low >= 4 * ids.len() as u64 {
        return ids
            .iter()
            .map(|id| load(conn, *id).map(|m| m.map(Arc::new)))
            .collect();
    }
    let mut found: rustc_hash::FxHashMap<u64, Arc<StoredMessage>> =
        rustc_hash::FxHashMap::default();
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, topic, headers, payload, published, crc FROM messages
              WHERE id BETWEEN ?1 AND ?2",
        )
        .map_err(fatal("cannot read messages from the ledger"))?;
    let mut rows = stmt
        .query(params![low as i64, high as i64])
        .map_err(fatal("cannot read messages from the ledger"))?;
    while let Some(row) = rows
        .next()
        .map_err(fatal("cannot read messages from the ledger"))?
    {
        let read = || -> rusqlite::Result<_> {
            Ok((
                row.get::<_, i64>(0)? as u64,
                row.get::<_, String>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, Vec<u8>>(3)?,
                row.get::<_, i64>(4)? as u64,
                row.get::<_, u32>(5)?,
            ))
        };
        let (id, topic, headers, payload, published, crc) =
            read().map_err(fatal("cannot read messages from the ledger"))?;
        // A corrupt one is left out: read alone, it says why.
        if let Ok(message) = decode(id, topic, &headers, payload, published, crc) {
            found.insert(id, Arc::new(message));
        }
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

/// Idempotency keys recorded at or after `since`.
pub(super) fn keys(
    conn: &Connection,
    since: Timestamp,
) -> rusqlite::Result<Vec<(String, u64, Timestamp)>> {
    conn.prepare_cached("SELECT key, msg, at FROM keys WHERE at >= ?1")?
        .query_map([since.0 as i64], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? as u64,
                Timestamp(r.get::<_, i64>(2)? as u64),
            ))
        })?
        .collect()
}

/// Dead letters per `filter`.
pub(super) fn dead_letters(
    conn: &Connection,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetter>, LedgerError> {
    let names: std::collections::HashMap<u32, String> = instance_names(conn)?.into_iter().collect();
    let inst = match &filter.instance {
        Some(name) => match names.iter().find(|(_, n)| *n == name) {
            Some((key, _)) => Some(*key),
            None => return Ok(Vec::new()),
        },
        None => None,
    };
    let after = filter.after.as_ref().map_or(0, |(m, _)| *m as i64);
    let limit = if filter.limit == 0 {
        -1
    } else {
        filter.limit as i64 + 64
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT d.msg, d.inst, d.at, d.state, m.topic FROM dead_letters d
               LEFT JOIN messages m ON m.id = d.msg
              WHERE d.msg >= ?1 AND (?2 IS NULL OR d.inst = ?2)
              ORDER BY d.msg LIMIT ?3",
        )
        .map_err(fatal("cannot read dead letters"))?;
    type Row = (i64, u32, i64, Vec<u8>, Option<String>);
    let rows: Vec<Row> = stmt
        .query_map(params![after, inst, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .and_then(Iterator::collect)
        .map_err(fatal("cannot read dead letters"))?;
    let mut out = Vec::new();
    for (msg, inst, at, state, topic) in rows {
        let instance = names
            .get(&inst)
            .cloned()
            .unwrap_or_else(|| format!("#{inst}"));
        if !filter.admits(msg as u64, &instance) {
            continue;
        }
        out.push(DeadLetter {
            message: msg as u64,
            topic: topic.unwrap_or_default(),
            delivery: decode_delivery(&state, msg as u64, &instance)?,
            instance,
            at: at as u64,
        });
    }
    out.sort_by(|a, b| (a.message, &a.instance).cmp(&(b.message, &b.instance)));
    if filter.limit > 0 {
        out.truncate(filter.limit);
    }
    Ok(out)
}

/// The key of instance `name`, if it was ever registered.
pub(super) fn instance_key(conn: &Connection, name: &str) -> rusqlite::Result<Option<u32>> {
    conn.query_row("SELECT key FROM instances WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

/// The dead letters a selection names, taken a chunk at a time (each chunk in a transaction
/// of its own, so that an operator's replay or purge of 100,000 ids interleaves with the
/// publishes instead of stopping them): a list of ids is taken id by id through the primary
/// key; "every dead letter (of an instance)" is a scan in (message, instance) order from a
/// cursor, up to the newest message dead-lettered when the sweep began (what is
/// dead-lettered meanwhile is not chased).
#[derive(Debug, Clone)]
pub(super) struct Sweep {
    /// `None` until the first step resolves the selection.
    inst: Option<Option<u32>>,
    instance: Option<String>,
    /// Sorted and without repeats; `None`: every dead letter.
    ids: Option<Vec<u64>>,
    /// The next index into `ids`.
    next: usize,
    /// The scan's cursor: after this (message, instance key).
    after: (i64, i64),
    /// The scan's end: the newest message dead-lettered when it began.
    upto: i64,
    finished: bool,
}

/// Dead letters a step takes (a chunk takes steps until its time is up).
const STEP: usize = 64;

impl Sweep {
    pub(super) fn new(selection: &Selection) -> Self {
        let ids = (!selection.messages.is_empty()).then(|| {
            let mut ids = selection.messages.clone();
            ids.sort_unstable();
            ids.dedup();
            ids
        });
        Self {
            inst: None,
            instance: selection.instance.clone(),
            ids,
            next: 0,
            after: (-1, -1),
            upto: 0,
            finished: false,
        }
    }

    /// Whether every chunk was taken.
    pub(super) fn finished(&self) -> bool {
        self.finished
    }

    /// The messages of the next [`STEP`] dead letters selected (their dead letters of the
    /// selected instance, or of any when it is `None`), and that instance's key.
    fn step(&mut self, conn: &Connection) -> Result<(Vec<u64>, Option<u32>), LedgerError> {
        let map = fatal("cannot read dead letters");
        let inst = match self.inst {
            Some(inst) => inst,
            None => {
                let inst = match &self.instance {
                    Some(name) => match instance_key(conn, name).map_err(&map)? {
                        Some(key) => Some(key),
                        // Never registered: it has no dead letters.
                        None => {
                            self.finished = true;
                            return Ok((Vec::new(), None));
                        }
                    },
                    None => None,
                };
                self.upto = conn
                    .query_row("SELECT coalesce(max(msg), 0) FROM dead_letters", [], |r| {
                        r.get(0)
                    })
                    .map_err(&map)?;
                self.inst = Some(inst);
                inst
            }
        };
        if let Some(ids) = &self.ids {
            let end = (self.next + STEP).min(ids.len());
            let step = ids[self.next..end].to_vec();
            self.next = end;
            self.finished = end == ids.len();
            return Ok((step, inst));
        }
        let rows: Vec<(i64, u32)> = conn
            .prepare_cached(
                "SELECT msg, inst FROM dead_letters
                  WHERE (msg, inst) > (?1, ?2) AND msg <= ?3 AND (?4 IS NULL OR inst = ?4)
                  ORDER BY msg, inst LIMIT ?5",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![self.after.0, self.after.1, self.upto, inst, STEP as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .collect()
            })
            .map_err(&map)?;
        if let Some((msg, key)) = rows.last() {
            self.after = (*msg, i64::from(*key));
        }
        self.finished = rows.len() < STEP;
        // Every dead letter of these messages that the selection takes goes in this step (a
        // message whose dead letters straddle the step's end included: the next step finds
        // them gone).
        let mut msgs: Vec<u64> = rows.into_iter().map(|(m, _)| m as u64).collect();
        msgs.dedup();
        Ok((msgs, inst))
    }

    /// Steps until `budget` is spent (at least one), the sweep is finished, or a chunk's
    /// worth was taken; `each` is called with the statements' connection for every step.
    fn chunk(
        &mut self,
        conn: &Connection,
        budget: Duration,
        mut each: impl FnMut(&[u64], Option<u32>) -> Result<usize, LedgerError>,
    ) -> Result<(), LedgerError> {
        let started = std::time::Instant::now();
        let mut taken = 0;
        while !self.finished && taken < super::writer::CHUNK && started.elapsed() < budget {
            let (msgs, inst) = self.step(conn)?;
            if !msgs.is_empty() {
                taken += each(&msgs, inst)?;
            }
        }
        Ok(())
    }
}

/// `DELETE … WHERE msg IN (` [`STEP`] placeholders `) AND (?65 IS NULL OR inst = ?65)
/// RETURNING …`: one statement takes a step's dead letters (unused placeholders are NULL,
/// which matches nothing).
fn take_step(returning: &str) -> String {
    format!(
        "DELETE FROM dead_letters WHERE msg IN ({}) AND (?{n} IS NULL OR inst = ?{n})
         RETURNING {returning}",
        vec!["?"; STEP].join(", "),
        n = STEP + 1
    )
}

/// The parameters of [`take_step`]: `msgs` padded with NULLs, then `inst`.
fn step_params(msgs: &[u64], inst: Option<u32>) -> Vec<Option<i64>> {
    let mut params: Vec<Option<i64>> = msgs.iter().map(|m| Some(*m as i64)).collect();
    params.resize(STEP, None);
    params.push(inst.map(i64::from));
    params
}

static REPLAY_STEP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    take_step(
        "msg, inst, state,
         (SELECT coalesce(length(payload) + length(headers), 0) FROM messages WHERE id = dead_letters.msg)",
    )
});
static PURGE_STEP: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| take_step("msg, inst"));

/// Moves the next chunk (what `budget` allows, at most [`super::writer::CHUNK`]) of the dead
/// letters `sweep` selects back to pending (failures reset, history kept). Returns (message,
/// instance key, delivery, size: payload and headers) of each.
pub(super) fn replay(
    conn: &Connection,
    sweep: &mut Sweep,
    budget: Duration,
    now: Timestamp,
) -> Result<Vec<(u64, u32, Delivery, u64)>, LedgerError> {
    let map = fatal("cannot replay dead letters");
    // One statement finds, removes and sizes a step's dead letters.
    let mut take = conn.prepare_cached(&REPLAY_STEP).map_err(&map)?;
    let mut insert = conn
        .prepare_cached("INSERT OR REPLACE INTO deliveries(msg, inst, state) VALUES (?1, ?2, ?3)")
        .map_err(&map)?;
    let mut out = Vec::new();
    sweep.chunk(conn, budget, |msgs, inst| {
        let rows: Vec<(i64, u32, Vec<u8>, Option<i64>)> = take
            .query_map(rusqlite::params_from_iter(step_params(msgs, inst)), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .and_then(Iterator::collect)
            .map_err(&map)?;
        for (msg, inst, state, size) in &rows {
            let mut delivery: Delivery = serde_json::from_slice(state).map_err(|e| {
                LedgerError::Fatal(format!(
                    "the ledger is corrupt: the dead letter of message {msg} to instance \
                     #{inst} cannot be read: {e}"
                ))
            })?;
            delivery.replay(now);
            insert
                .execute(params![msg, inst, encode_delivery(&delivery)])
                .map_err(&map)?;
            out.push((*msg as u64, *inst, delivery, size.unwrap_or(0) as u64));
        }
        Ok(rows.len())
    })?;
    Ok(out)
}

/// Removes the next chunk (what `budget` allows, at most [`super::writer::CHUNK`]) of the
/// dead letters `sweep` selects (and their messages once nothing refers to them); returns
/// how many.
pub(super) fn purge(
    conn: &Connection,
    sweep: &mut Sweep,
    budget: Duration,
) -> Result<u64, LedgerError> {
    let map = fatal("cannot purge dead letters");
    let mut take = conn.prepare_cached(&PURGE_STEP).map_err(&map)?;
    let mut writes = Writes::new(conn).map_err(&map)?;
    let mut count = 0;
    sweep.chunk(conn, budget, |msgs, inst| {
        let mut removed: Vec<i64> = take
            .query_map(rusqlite::params_from_iter(step_params(msgs, inst)), |r| {
                r.get(0)
            })
            .and_then(Iterator::collect)
            .map_err(&map)?;
        let taken = removed.len();
        removed.sort_unstable();
        removed.dedup();
        for msg in removed {
            writes.unreferenced(msg as u64).map_err(&map)?;
        }
        count += taken as u64;
        Ok(taken)
    })?;
    Ok(count)
}

/// Ends every waiting delivery of instance `name`: dead letters (reason `forgotten`) or
/// gone. Returns how many.
pub(super) fn forget(
    conn: &Connection,
    name: &str,
    how: Forget,
    now: Timestamp,
) -> Result<u64, LedgerError> {
    let map = fatal("cannot forget a backlog");
    let Some(inst) = instance_key(conn, name).map_err(&map)? else {
        return Ok(0);
    };
    // Its subscription ends with its backlog, and a pause with it.
    remember(conn, name, &Remembered::default())?;
    let rows: Vec<(i64, Option<Vec<u8>>, i64)> = conn
        .prepare_cached(
            "SELECT d.msg, d.state, coalesce(m.published, 0) FROM pending d
               LEFT JOIN messages m ON m.id = d.msg WHERE d.inst = ?1",
        )
        .and_then(|mut s| {
            s.query_map([inst], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(&map)?;
    let mut writes = Writes::new(conn).map_err(&map)?;
    for (msg, state, published) in &rows {
        let msg = *msg as u64;
        match how {
            Forget::Purge => writes.end(msg, inst).map_err(&map)?,
            Forget::DeadLetter => {
                let mut delivery = match state {
                    Some(bytes) => decode_delivery(bytes, msg, name)?,
                    None => Delivery::new(Timestamp(*published as u64)),
                };
                delivery.forget(now);
                writes
                    .dead_letter(msg, inst, &delivery, now)
                    .map_err(&map)?;
            }
        }
    }
    Ok(rows.len() as u64)
}

/// Every delivery of one message the ledger holds.
pub(super) fn history(conn: &Connection, message: u64) -> Result<Vec<HistoryEntry>, LedgerError> {
    let names: std::collections::HashMap<u32, String> = instance_names(conn)?.into_iter().collect();
    let published: Option<i64> = conn
        .query_row(
            "SELECT published FROM messages WHERE id = ?1",
            [message as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(fatal("cannot read the ledger"))?;
    type Row = (u32, Option<Vec<u8>>, bool);
    let rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT inst, state, 0 FROM pending WHERE msg = ?1
             UNION ALL SELECT inst, state, 1 FROM dead_letters WHERE msg = ?1 ORDER BY 1",
        )
        .and_then(|mut s| {
            s.query_map([message as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(fatal("cannot read the ledger"))?;
    rows.into_iter()
        .map(|(inst, state, dead_letter)| {
            let instance = names
                .get(&inst)
                .cloned()
                .unwrap_or_else(|| format!("#{inst}"));
            let delivery = match state {
                Some(bytes) => decode_delivery(&bytes, message, &instance)?,
                None => Delivery::new(Timestamp(published.unwrap_or(0) as u64)),
            };
            Ok(HistoryEntry {
                instance,
                dead_letter,
                delivery,
            })
        })
        .collect()
}

/// What waits per instance (every instance ever registered that has something).
pub(super) fn backlog(conn: &Connection) -> Result<Vec<BacklogEntry>, LedgerError> {
    conn.prepare_cached(
        "SELECT i.name, count(*), coalesce(sum(length(m.payload) + length(m.headers)), 0)
           FROM pending d JOIN instances i ON i.key = d.inst
           LEFT JOIN messages m ON m.id = d.msg
          GROUP BY d.inst ORDER BY i.name",
    )
    .and_then(|mut s| {
        s.query_map([], |r| {
            Ok(BacklogEntry {
                instance: r.get(0)?,
                deliveries: r.get::<_, i64>(1)? as u64,
                bytes: r.get::<_, i64>(2)? as u64,
            })
        })?
        .collect()
    })
    .map_err(fatal("cannot read the backlog"))
}
