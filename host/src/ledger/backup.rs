//! Backup and restore of a state dir's ledger. A backup is taken with SQLite's online backup
//! API from a connection of its own: it reads one consistent snapshot and is safe while the
//! daemon runs (the daemon keeps writing; its commits after the snapshot are not in it). It
//! is written only where it cannot hurt: never inside `state_dir`, never over anything but a
//! regular file, and over an existing one only when asked (`--force`).
//! A restore refuses to run while a daemon holds the state dir, and replaces the ledger
//! whole: the database, its log and the in-flight markers; its message ids continue past
//! every id the state dir gave out before (its mark's high-water mark), whatever the backup
//! says: an id never names two messages.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags, backup::Backup};
use serde::Serialize;

use super::{
    LedgerError,
    mark::{self, Mark, Marks},
    markers, store,
};

/// What a backup or a restore holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Contents {
    #[serde(serialize_with = "as_display")]
    pub file: PathBuf,
    pub bytes: u64,
    pub messages: u64,
    pub pending: u64,
    pub dead_letters: u64,
    /// The first message id the ledger gives out next.
    pub next_id: u64,
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
        next_id: store::meta(conn, "next_id")?.max(1) as u64,
    })
}

/// Checks that `file` is a whole, readable ledger this build can use.
fn verify(file: &Path) -> Result<Contents, LedgerError> {
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| store::classify(&file.display().to_string(), &e))?;
    if store::check_format(&conn, file, false)?.0 {
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

/// What a path names, for refusals.
fn kind(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Refuses a path inside `state_dir`: a backup there could replace the live ledger (a
/// backup renamed over `state/ledger.db` did: what was answered OK afterwards was lost at
/// the next restart), and would go with the state dir. `what` names the path's role.
fn outside_state_dir(state_dir: &Path, path: &Path, what: &str) -> Result<(), LedgerError> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let folder = fs::canonicalize(folder)
        .map_err(|e| LedgerError::Refused(format!("{}: {e}", path.display())))?;
    let state = fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    if folder.starts_with(&state) {
        return Err(LedgerError::Refused(format!(
            "{}: {what} inside state_dir {} is refused (it could replace the live ledger, and \
             would be lost with the state dir); choose a path outside it",
            path.display(),
            state.display()
        )));
    }
    Ok(())
}

/// Refuses to write over anything but a regular file, and over one unless `force`.
fn writable_destination(path: &Path, force: bool) -> Result<(), LedgerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => Err(LedgerError::Refused(format!(
            "{} is not a regular file ({}): refused, even with --force",
            path.display(),
            kind(meta.file_type())
        ))),
        Ok(_) if !force => Err(LedgerError::Refused(format!(
            "{} exists: refused; pass --force to replace it",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LedgerError::Refused(format!("{}: {e}", path.display()))),
    }
}

/// Copies the ledger in `state_dir` to `dest` (written to `DEST.partial`, checked, fsynced
/// and renamed). Safe while the daemon runs. Refused inside `state_dir`, over anything but a
/// regular file, and over an existing file unless `force`.
///
/// # Errors
/// [`LedgerError`] naming the file and the cause.
pub fn backup(state_dir: &Path, dest: &Path, force: bool) -> Result<Contents, LedgerError> {
    let source = state_dir.join(store::FILE);
    if !source.exists() {
        return Err(LedgerError::Refused(format!(
            "{}: no ledger here (is state_dir right?)",
            source.display()
        )));
    }
    outside_state_dir(state_dir, dest, "a backup")?;
    writable_destination(dest, force)?;
    let mut temp = dest.as_os_str().to_owned();
    temp.push(".partial");
    let temp = PathBuf::from(temp);
    // A partial copy left by an interrupted backup is ours to replace; nothing else is.
    writable_destination(&temp, true)?;
    let _ = fs::remove_file(&temp);
    let from = Connection::open_with_flags(
        &source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| store::classify(&source.display().to_string(), &e))?;
    let ours = state_dir.join(mark::FILE).exists();
    store::check_format(&from, &source, ours)?;
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
        // Checked again just before: what appeared meanwhile is not replaced either.
        writable_destination(dest, force)?;
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

/// The highest id the ledger now in `state_dir` may have given out, plus one: its mark's
/// high-water mark, or, without one, what its database says (when it can be read).
fn given_out(state_dir: &Path) -> Result<u64, LedgerError> {
    let marked = match mark::read(state_dir) {
        Ok(marks) => marks.map(|m| m.reserved),
        Err(mark::MarkError::Io { path, source }) => {
            return Err(LedgerError::Fatal(format!("{}: {source}", path.display())));
        }
        Err(e @ mark::MarkError::Damaged { .. }) => {
            tracing::warn!(error = %e, "the mark of the ledger being replaced is damaged");
            None
        }
    };
    let db = state_dir.join(store::FILE);
    let stored = (fs::metadata(&db).is_ok_and(|m| m.len() > 0))
        .then(|| {
            let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
            let _ = conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            );
            let next = store::meta(&conn, "next_id").ok()?;
            let last = store::meta(&conn, "last_id").ok()?;
            Some(next.max(last + 1).max(0) as u64)
        })
        .flatten();
    Ok(marked.unwrap_or(0).max(stored.unwrap_or(0)))
}

/// Replaces the ledger in `state_dir` with the backup `source`. Refused while a daemon uses
/// the state dir, and for a backup inside it. Ids given out next continue past every id the
/// state dir gave out before (they are never reused), whatever the backup says.
///
/// # Errors
/// [`LedgerError::Refused`] when a daemon runs or the backup is not a usable ledger.
pub fn restore(state_dir: &Path, source: &Path) -> Result<Contents, LedgerError> {
    let contents = verify(source)?;
    if state_dir.exists() {
        outside_state_dir(state_dir, source, "a backup to restore")?;
    }
    fs::create_dir_all(state_dir).map_err(|e| {
        LedgerError::Unusable(format!(
            "state_dir {}: cannot create it: {e}",
            state_dir.display()
        ))
    })?;
    let lock = super::durable::lock_state_dir(state_dir)?;
    let floor = given_out(state_dir)?;
    let target = state_dir.join(store::FILE);
    let temp = target.with_extension("restoring");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: std::io::Error| LedgerError::Fatal(format!("{}: {e}", path.display()))
    };
    fs::copy(source, &temp).map_err(io(&temp))?;
    // The copy's ids start past the backup's and past the state dir's; it keeps the backup's
    // identity (or gets one).
    let (identity, next_id) = {
        let map = |e: rusqlite::Error| store::classify(&temp.display().to_string(), &e);
        let conn = Connection::open(&temp).map_err(map)?;
        let stored = |key| store::meta(&conn, key).map(|v| v.max(0) as u64);
        let next_id = stored("next_id")?
            .max(stored("last_id")? + 1)
            .max(floor)
            .max(1);
        let identity = match stored("identity")? {
            0 => mark::new_identity(),
            identity => identity,
        };
        store::in_transaction(&conn, "restore", || {
            store::set_meta(&conn, "next_id", next_id as i64)?;
            store::set_meta(&conn, "identity", identity as i64)
        })?;
        (identity, next_id)
    };
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
    // The state dir's mark now says this ledger (and keeps the high-water mark).
    Mark::create(
        state_dir,
        Marks {
            identity,
            reserved: next_id,
            answered: None,
            seq: 0,
        },
    )
    .map_err(io(&state_dir.join(mark::FILE)))?;
    File::open(state_dir)
        .and_then(|f| f.sync_all())
        .map_err(io(state_dir))?;
    drop(lock);
    Ok(Contents {
        file: target,
        next_id,
        ..contents
    })
}
