//! Backup and restore of a state dir's ledger. A backup is taken with SQLite's online backup
//! API from a connection of its own: it reads one consistent snapshot and is safe while the
//! daemon runs (the daemon keeps writing; its commits after the snapshot are not in it).
//! A restore refuses to run while a daemon holds the state dir, and replaces the ledger
//! whole: the database, its log and the in-flight markers.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, backup::Backup};
use serde::Serialize;

use super::{LedgerError, markers, store};

/// What a backup or a restore holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contents {
    #[serde(serialize_with = "as_display")]
    pub file: PathBuf,
    pub bytes: u64,
    pub messages: u64,
    pub pending: u64,
    pub dead_letters: u64,
}

/// A path as text (any bytes: a non-UTF-8 name is shown, not refused).
fn as_display<S: serde::Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&path.display())
}

fn contents(conn: &Connection, file: &Path) -> Result<Contents, LedgerError> {
    let count = |sql: &str| -> Result<u64, LedgerError> {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| store::classify(&file.display().to_string(), &e))
    };
    Ok(Contents {
        file: file.to_owned(),
        bytes: fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        messages: count("SELECT count(*) FROM messages")?,
        pending: count("SELECT count(*) FROM pending")?,
        dead_letters: count("SELECT count(*) FROM dead_letters")?,
    })
}

/// Checks that `file` is a whole, readable ledger this build can use.
fn verify(file: &Path) -> Result<Contents, LedgerError> {
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| store::classify(&file.display().to_string(), &e))?;
    if store::check_format(&conn, file)?.0 {
        return Err(LedgerError::Refused(format!(
            "{}: an empty database, not a ledger backup",
            file.display()
        )));
    }
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| store::classify(&file.display().to_string(), &e))?;
    if verdict != "ok" {
        return Err(LedgerError::Refused(format!(
            "{}: the ledger is damaged: {verdict}",
            file.display()
        )));
    }
    contents(&conn, file)
}

/// Copies the ledger in `state_dir` to `dest` (written to a temporary file, checked, fsynced
/// and renamed). Safe while the daemon runs.
///
/// # Errors
/// [`LedgerError`] naming the file and the cause.
pub fn backup(state_dir: &Path, dest: &Path) -> Result<Contents, LedgerError> {
    let source = state_dir.join(store::FILE);
    if !source.exists() {
        return Err(LedgerError::Refused(format!(
            "{}: no ledger here (is state_dir right?)",
            source.display()
        )));
    }
    let from = Connection::open_with_flags(
        &source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| store::classify(&source.display().to_string(), &e))?;
    store::check_format(&from, &source)?;
    let temp = dest.with_extension("partial");
    let _ = fs::remove_file(&temp);
    let io = |e: std::io::Error| LedgerError::Fatal(format!("{}: {e}", temp.display()));
    {
        let mut to = Connection::open(&temp)
            .map_err(|e| store::classify(&temp.display().to_string(), &e))?;
        let copy = Backup::new(&from, &mut to)
            .map_err(|e| store::classify(&temp.display().to_string(), &e))?;
        // 1024 pages (4 MiB) a step; the daemon's writer runs between steps.
        copy.run_to_completion(1024, Duration::from_millis(1), None)
            .map_err(|e| store::classify(&source.display().to_string(), &e))?;
        drop(copy);
        to.execute_batch("PRAGMA journal_mode = DELETE")
            .map_err(|e| store::classify(&temp.display().to_string(), &e))?;
    }
    // Checked before it replaces anything: a bad copy never overwrites a good backup.
    let finish = || {
        let contents = verify(&temp)?;
        File::open(&temp).and_then(|f| f.sync_all()).map_err(io)?;
        fs::rename(&temp, dest).map_err(io)?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|f| f.sync_all()).map_err(io)?;
        }
        Ok(Contents {
            file: dest.to_owned(),
            ..contents
        })
    };
    finish().inspect_err(|_| {
        let _ = fs::remove_file(&temp);
    })
}

/// Replaces the ledger in `state_dir` with the backup `source`. Refused while a daemon uses
/// the state dir.
///
/// # Errors
/// [`LedgerError::Refused`] when a daemon runs or the backup is not a usable ledger.
pub fn restore(state_dir: &Path, source: &Path) -> Result<Contents, LedgerError> {
    let contents = verify(source)?;
    fs::create_dir_all(state_dir).map_err(|e| {
        LedgerError::Refused(format!(
            "cannot create state dir {}: {e}",
            state_dir.display()
        ))
    })?;
    let lock = super::durable::lock_state_dir(state_dir)?;
    let target = state_dir.join(store::FILE);
    let temp = target.with_extension("restoring");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: std::io::Error| LedgerError::Fatal(format!("{}: {e}", path.display()))
    };
    fs::copy(source, &temp).map_err(io(&temp))?;
    File::open(&temp)
        .and_then(|f| f.sync_all())
        .map_err(io(&temp))?;
    // The old log and markers belong to the old database: they go first.
    for stale in [
        store::LOG.to_owned(),
        format!("{}-shm", store::FILE),
        markers::FILE.to_owned(),
    ] {
        match fs::remove_file(state_dir.join(&stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&state_dir.join(&stale))(e)),
        }
    }
    fs::rename(&temp, &target).map_err(io(&target))?;
    File::open(state_dir)
        .and_then(|f| f.sync_all())
        .map_err(io(state_dir))?;
    drop(lock);
    Ok(Contents {
        file: target,
        ..contents
    })
}
