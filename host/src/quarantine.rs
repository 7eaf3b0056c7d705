//! Quarantine: a library that crashes the daemon while it is instantiated (or on its first
//! delivery) must not make it crash-loop.
//!
//! Before the supervisor instantiates a library it *arms* a durable marker for the library's
//! bytes, `state_dir/loading/<sha256>`: `loading <sha256>`, how many unclean exits it has
//! counted, and one line per instance being started from those bytes, with its phase — `new`
//! while the library is loaded and its `new` runs, then `first` until the instance settled
//! its first delivery or ran [`SETTLE_AFTER`]. Then the instance's line
//! goes, and with the last one the marker (and its count). A clean failure of `new` and a
//! graceful stop disarm too.
//!
//! At the next start, after an unclean exit, a marker still there counts one unclean exit if
//! the crash can be laid at the library's door: an instance was in phase `new`, or in phase
//! `first` with a call of that instance in flight when the process died (the ledger's
//! in-flight markers say so). A SIGKILL that merely happened while an instance idled through
//! its first 30 s counts nothing. At [`UNCLEAN_LIMIT`] the bytes are quarantined: not loaded
//! until they change (another sha256, another marker) or an operator reloads.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

/// A marker is disarmed at the latest this long after its instance started.
pub const SETTLE_AFTER: Duration = Duration::from_secs(30);

/// Unclean exits with the marker armed after which a library is quarantined.
pub const UNCLEAN_LIMIT: u32 = 2;

/// The directory under `state_dir`.
pub const DIR: &str = "loading";

/// Where an instance's start from some bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Loading the library and running `new`.
    New,
    /// Running, until its first delivery settled or it ran long enough.
    First,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Marker {
    unclean: u32,
    /// Instance → phase.
    starting: BTreeMap<String, Phase>,
}

/// The markers of one state dir.
#[derive(Debug)]
pub struct Quarantine {
    dir: PathBuf,
    markers: BTreeMap<[u8; 32], Marker>,
}

fn parse(text: &str) -> Option<([u8; 32], Marker)> {
    let mut lines = text.lines();
    let sha = lines.next()?.strip_prefix("loading ")?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(sha, &mut bytes).ok()?;
    let mut marker = Marker {
        unclean: lines.next()?.strip_prefix("unclean ")?.parse().ok()?,
        ..Marker::default()
    };
    for line in lines {
        let (phase, instance) = line.split_once(' ')?;
        let phase = match phase {
            "new" => Phase::New,
            "first" => Phase::First,
            _ => return None,
        };
        marker.starting.insert(instance.to_owned(), phase);
    }
    Some((bytes, marker))
}

impl Quarantine {
    /// Opens the markers of `state_dir` as the previous run left them; call
    /// [`Quarantine::count`] before arming anything. Unreadable markers are reported and
    /// removed.
    ///
    /// # Errors
    /// The I/O error when the directory cannot be created or read.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join(DIR);
        fs::create_dir_all(&dir)?;
        let mut markers = BTreeMap::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let parsed = fs::read_to_string(&path).ok().as_deref().and_then(parse);
            match parsed {
                Some((sha, marker)) if path.file_name() == Some(hex::encode(sha).as_ref()) => {
                    markers.insert(sha, marker);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "unreadable loading marker removed");
                    fs::remove_file(&path)?;
                }
            }
        }
        Ok(Self { dir, markers })
    }

    /// Counts the previous run's end. A marker still armed means it did not stop gracefully
    /// (a graceful stop disarms every marker): one whose library was in `new`, or in its
    /// first delivery with a call of an instance in `in_plugin_code` running, counts one
    /// unclean exit. Every marker is then rewritten with nothing armed.
    ///
    /// # Errors
    /// The I/O error when a marker cannot be written.
    pub fn count(&mut self, in_plugin_code: &BTreeSet<String>) -> io::Result<()> {
        let shas: Vec<[u8; 32]> = self.markers.keys().copied().collect();
        for sha in shas {
            let marker = self.markers.get_mut(&sha).expect("listed above");
            let crashed = marker
                .starting
                .iter()
                .any(|(instance, phase)| *phase == Phase::New || in_plugin_code.contains(instance));
            if crashed {
                marker.unclean = marker.unclean.saturating_add(1);
            }
            marker.starting.clear();
            if marker.unclean == 0 {
                self.remove(&sha);
            } else {
                self.write(&sha)?;
            }
        }
        Ok(())
    }

    fn path(&self, sha: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(sha))
    }

    /// Writes a marker durably: file and directory synced.
    fn write(&self, sha: &[u8; 32]) -> io::Result<()> {
        let marker = &self.markers[sha];
        let path = self.path(sha);
        let temp = path.with_extension("tmp");
        let mut text = format!("loading {}\nunclean {}\n", hex::encode(sha), marker.unclean);
        for (instance, phase) in &marker.starting {
            let phase = match phase {
                Phase::New => "new",
                Phase::First => "first",
            };
            text.push_str(&format!("{phase} {instance}\n"));
        }
        let mut file = fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    fn remove(&mut self, sha: &[u8; 32]) {
        self.markers.remove(sha);
        match fs::remove_file(self.path(sha)) {
            Ok(()) => {
                let _ = fs::File::open(&self.dir).and_then(|d| d.sync_all());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path(sha).display(), error = %e, "cannot remove a loading marker");
            }
        }
    }

    /// The unclean exits counted for `sha` when it is quarantined.
    pub fn quarantined(&self, sha: &[u8; 32]) -> Option<u32> {
        self.markers
            .get(sha)
            .map(|m| m.unclean)
            .filter(|count| *count >= UNCLEAN_LIMIT)
    }

    fn set(&mut self, sha: &[u8; 32], instance: &str, phase: Phase) -> io::Result<()> {
        self.markers
            .entry(*sha)
            .or_default()
            .starting
            .insert(instance.to_owned(), phase);
        self.write(sha)
    }

    /// Arms the marker before `instance` loads `sha` and runs its `new`; durable when this
    /// returns.
    ///
    /// # Errors
    /// The I/O error; the caller must not load then.
    pub fn arm(&mut self, sha: &[u8; 32], instance: &str) -> io::Result<()> {
        self.set(sha, instance, Phase::New)
    }

    /// `new` returned: `instance` waits for its first delivery now.
    ///
    /// # Errors
    /// The I/O error.
    pub fn started(&mut self, sha: &[u8; 32], instance: &str) -> io::Result<()> {
        self.set(sha, instance, Phase::First)
    }

    /// `instance` settled its first delivery, ran long enough, failed cleanly or stopped:
    /// the marker goes with the last instance armed on it, and with it the count.
    pub fn disarm(&mut self, sha: &[u8; 32], instance: &str) {
        let Some(marker) = self.markers.get_mut(sha) else {
            return;
        };
        if marker.starting.remove(instance).is_none() {
            return;
        }
        if marker.starting.is_empty() {
            self.remove(sha);
        } else if let Err(e) = self.write(sha) {
            tracing::warn!(error = %e, "cannot rewrite a loading marker");
        }
    }

    /// An operator releases quarantined bytes: they are loaded again, counting afresh.
    pub fn release(&mut self, sha: &[u8; 32]) {
        if self.markers.get(sha).is_some_and(|m| m.starting.is_empty()) {
            self.remove(sha);
        }
    }

    /// An operator reload: every quarantine is released.
    pub fn release_all(&mut self) {
        let shas: Vec<[u8; 32]> = self.markers.keys().copied().collect();
        for sha in shas {
            self.release(&sha);
        }
    }

    /// A graceful stop: nothing crashed while loading; quarantines stay.
    pub fn disarm_all(&mut self) {
        let shas: Vec<[u8; 32]> = self.markers.keys().copied().collect();
        for sha in shas {
            let marker = self.markers.get_mut(&sha).expect("listed above");
            if marker.starting.is_empty() {
                continue;
            }
            marker.starting.clear();
            if marker.unclean == 0 {
                self.remove(&sha);
            } else if let Err(e) = self.write(&sha) {
                tracing::warn!(error = %e, "cannot rewrite a loading marker");
            }
        }
    }

    /// Forgets the markers of bytes no library in `plugin_dir` has any more.
    pub fn retain(&mut self, present: &[[u8; 32]]) {
        let gone: Vec<[u8; 32]> = self
            .markers
            .iter()
            .filter(|(sha, m)| !present.contains(sha) && m.starting.is_empty())
            .map(|(sha, _)| *sha)
            .collect();
        for sha in gone {
            self.remove(&sha);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [0xaa; 32];
    const B: [u8; 32] = [0xbb; 32];

    fn reopen(dir: &Path, in_plugin_code: &[&str]) -> Quarantine {
        let mut q = Quarantine::open(dir).unwrap();
        let names = in_plugin_code.iter().map(|s| (*s).to_owned()).collect();
        q.count(&names).unwrap();
        q
    }

    #[test]
    fn two_crashes_in_new_quarantine_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = reopen(dir.path(), &[]);
        q.arm(&A, "a").unwrap();
        // The process dies in `new`: nothing disarms.
        drop(q);
        let mut q = reopen(dir.path(), &[]);
        assert_eq!(q.quarantined(&A), None, "one unclean exit is not enough");
        q.arm(&A, "a").unwrap();
        drop(q);
        let q = reopen(dir.path(), &[]);
        assert_eq!(q.quarantined(&A), Some(2));
        assert_eq!(q.quarantined(&B), None, "other bytes are not quarantined");
        let text = fs::read_to_string(dir.path().join(DIR).join(hex::encode(A))).unwrap();
        assert_eq!(text, format!("loading {}\nunclean 2\n", hex::encode(A)));
    }

    #[test]
    fn a_crash_during_the_first_delivery_counts_only_in_that_instances_code() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = reopen(dir.path(), &[]);
        q.arm(&A, "a").unwrap();
        q.started(&A, "a").unwrap();
        drop(q);
        // Killed while `a` idled: nothing counts, nothing is quarantined.
        let mut q = reopen(dir.path(), &["other"]);
        assert!(q.markers.is_empty(), "{:?}", q.markers);
        q.arm(&A, "a").unwrap();
        q.started(&A, "a").unwrap();
        drop(q);
        let mut q = reopen(dir.path(), &["a"]);
        q.arm(&A, "a").unwrap();
        q.started(&A, "a").unwrap();
        drop(q);
        let q = reopen(dir.path(), &["a"]);
        assert_eq!(q.quarantined(&A), Some(2));
    }

    #[test]
    fn the_marker_goes_with_the_last_instance_and_a_graceful_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = reopen(dir.path(), &[]);
        q.arm(&A, "a").unwrap();
        drop(q);
        let mut q = reopen(dir.path(), &[]);
        q.arm(&A, "a").unwrap();
        q.arm(&A, "b").unwrap();
        q.disarm(&A, "a");
        assert!(
            dir.path().join(DIR).join(hex::encode(A)).exists(),
            "`b` is still armed"
        );
        q.disarm(&A, "b");
        assert!(!dir.path().join(DIR).join(hex::encode(A)).exists());
        q.arm(&B, "b").unwrap();
        q.disarm_all();
        drop(q);
        let q = reopen(dir.path(), &[]);
        assert_eq!((q.quarantined(&A), q.quarantined(&B)), (None, None));
        assert_eq!(fs::read_dir(dir.path().join(DIR)).unwrap().count(), 0);
    }

    #[test]
    fn release_and_retain_forget_quarantined_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let mut q = reopen(dir.path(), &[]);
            q.arm(&A, "a").unwrap();
            q.arm(&B, "b").unwrap();
        }
        let mut q = reopen(dir.path(), &[]);
        assert_eq!((q.quarantined(&A), q.quarantined(&B)), (Some(2), Some(2)));
        q.release(&A);
        assert_eq!(q.quarantined(&A), None);
        q.disarm_all();
        assert_eq!(
            q.quarantined(&B),
            Some(2),
            "a graceful stop keeps a quarantine"
        );
        q.retain(&[A]);
        assert_eq!(q.quarantined(&B), None, "its bytes left plugin_dir");
        fs::write(dir.path().join(DIR).join("junk"), "x").unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        assert!(q.markers.is_empty());
        assert!(!dir.path().join(DIR).join("junk").exists());
    }
}
