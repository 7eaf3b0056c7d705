//! Watching `plugin_dir` and the config file: file-system activity in, settled [`Change`]s out.
//!
//! This module has one job: turn what happens on disk into a short stream of changes that are
//! worth acting on. It applies nothing; the supervisor (the next step of hot plug) consumes the
//! [`Receiver<Change>`] returned by [`Watcher::start`] and decides what each change means.
//!
//! - `plugin_dir` is watched non-recursively; only `*.so` files count. The config file is
//!   watched through its parent directory, filtered by name, because editors and deployment
//!   tools replace a file by renaming a new one over it (which a watch on the file would lose).
//! - Raw events go through a debouncer (`notify-debouncer-full`), with either the platform's
//!   events ([`Mode::Events`], inotify on Linux) or a polling watcher ([`Mode::Poll`], DESIGN
//!   §4 `watch = "poll"`, for filesystems without change events).
//! - Temporary and hidden names are ignored ([`is_ignored_name`]).
//! - A file renamed into place is reported at once after the debounce, and so is one whose
//!   writer closed it (inotify's close-after-write: `cp` over a library, or a file written
//!   under a temporary name and renamed within the debounce window, which the debouncer
//!   reports at its destination). Any other file written in place is reported only once it
//!   is complete and stable: its size, mtime and inode are read, and read again `settle`
//!   later; it goes out only when they did not change (otherwise the check starts over).
//!   A file caught incomplete all the same is refused by the loader's completeness check and
//!   reported again when it changes.
//! - Content dedupe: the watcher keeps the SHA-256 ([`fingerprint`]) of the last bytes it
//!   reported for each path (seeded with what exists when it starts) and drops a change whose
//!   bytes equal them. A removal always goes out, and forgets the fingerprint.
//!
//! Start the watcher *before* the initial load, so that nothing written in between is missed;
//! a change whose bytes equal what was loaded is then the supervisor's to ignore.

use std::{
    collections::HashMap,
    fs, io,
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use notify::{
    EventKind, PollWatcher, RecommendedWatcher, RecursiveMode,
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
};
use notify_debouncer_full::{
    DebounceEventResult, DebouncedEvent, Debouncer, NoCache, RecommendedCache, new_debouncer_opt,
};
use sha2::{Digest as _, Sha256};

use crate::config::WatchMode;

/// How long the debouncer waits for a path to go quiet before it reports its events.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// How often [`Mode::Poll`] scans the watched directories.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How changes are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The platform's change events (inotify on Linux).
    Events,
    /// Scan the directories every [`POLL_INTERVAL`], comparing mtimes and contents.
    Poll,
}

impl From<WatchMode> for Mode {
    /// `auto` maps to events; falling back to polling when events cannot be set up is the
    /// caller's decision (it sees the [`WatchError`]).
    fn from(mode: WatchMode) -> Self {
        match mode {
            WatchMode::Auto | WatchMode::Inotify => Self::Events,
            WatchMode::Poll => Self::Poll,
        }
    }
}

/// What happened to a library file in `plugin_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibraryChange {
    /// A library the watcher has not reported (or seen at start) appeared.
    Added,
    /// A known library now has different bytes.
    Replaced,
    /// A known library is gone.
    Removed,
}

/// A settled change worth the supervisor's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A `*.so` file in `plugin_dir`.
    Library { path: PathBuf, kind: LibraryChange },
    /// The config file has new bytes (or is gone: the supervisor's load will say so).
    Config { path: PathBuf },
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot resolve {}: {source}", path.display())]
    Resolve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config path {} has no file name", path.display())]
    NoFileName { path: PathBuf },
    #[error("cannot start the watch thread for {}: {source}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The debouncer, of either kind; dropping it stops the watch.
enum Backend {
    Events(Debouncer<RecommendedWatcher, RecommendedCache>),
    Poll(Debouncer<PollWatcher, NoCache>),
}

/// A running watch of `plugin_dir` and the config file. Dropping it stops watching, and the
/// [`Receiver<Change>`] then disconnects.
pub struct Watcher {
    /// Files fingerprinted by the watch thread since it started.
    fingerprinted: Arc<AtomicU64>,
    backend: Option<Backend>,
    thread: Option<JoinHandle<()>>,
    plugin_dir: PathBuf,
    config: PathBuf,
    mode: Mode,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("plugin_dir", &self.plugin_dir)
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Starts watching `plugin_dir` (which must exist) and `config` (whose parent must exist).
    /// `settle` is the interval between the two looks at a file written in place.
    ///
    /// The paths in the [`Change`]s are under the canonical forms of `plugin_dir` and of the
    /// config file's parent.
    pub fn start(
        plugin_dir: &Path,
        config: &Path,
        mode: Mode,
        settle: Duration,
    ) -> Result<(Watcher, Receiver<Change>), WatchError> {
        let canonical = |path: &Path| {
            fs::canonicalize(path).map_err(|source| WatchError::Resolve {
                path: path.to_owned(),
                source,
            })
        };
        let plugin_dir = canonical(plugin_dir)?;
        let name = config.file_name().ok_or_else(|| WatchError::NoFileName {
            path: config.to_owned(),
        })?;
        let parent = match config.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let config_dir = canonical(parent)?;
        let config = config_dir.join(name);

        let (raw_tx, raw_rx) = unbounded::<DebounceEventResult>();
        let fingerprinted = Arc::new(AtomicU64::new(0));
        let watch_error = |path: &Path| {
            let path = path.to_owned();
            move |source| WatchError::Watch { path, source }
        };
        let mut dirs = vec![plugin_dir.clone()];
        if config_dir != plugin_dir {
            dirs.push(config_dir.clone());
        }
        let backend = match mode {
            Mode::Events => {
                let mut d = new_debouncer_opt::<_, RecommendedWatcher, RecommendedCache>(
                    DEBOUNCE,
                    None,
                    raw_tx,
                    RecommendedCache::new(),
                    notify::Config::default(),
                )
                .map_err(watch_error(&plugin_dir))?;
                for dir in &dirs {
                    d.watch(dir, RecursiveMode::NonRecursive)
                        .map_err(watch_error(dir))?;
                }
                Backend::Events(d)
            }
            Mode::Poll => {
                // Contents are compared too: the poller's mtimes have a one-second grain.
                let cfg = notify::Config::default()
                    .with_poll_interval(POLL_INTERVAL)
                    .with_compare_contents(true);
                let mut d = new_debouncer_opt::<_, PollWatcher, NoCache>(
                    DEBOUNCE,
                    None,
                    raw_tx,
                    NoCache::new(),
                    cfg,
                )
                .map_err(watch_error(&plugin_dir))?;
                for dir in &dirs {
                    d.watch(dir, RecursiveMode::NonRecursive)
                        .map_err(watch_error(dir))?;
                }
                Backend::Poll(d)
            }
        };

        let (tx, rx) = unbounded();
        let mut state = State {
            plugin_dir: plugin_dir.clone(),
            config: config.clone(),
            settle,
            known: HashMap::new(),
            fingerprinted: fingerprinted.clone(),
            pending: HashMap::new(),
            tx,
        };
        // The baseline: what exists now counts as already reported.
        state.seed();
        let thread = std::thread::Builder::new()
            .name("plugind-watch".into())
            .spawn(move || {
                // Fingerprinting files is background work (crate::background).
                crate::background::lower_this_thread();
                state.run(raw_rx)
            })
            .map_err(|source| WatchError::Thread {
                path: plugin_dir.clone(),
                source,
            })?;
        Ok((
            Watcher {
                fingerprinted,
                backend: Some(backend),
                thread: Some(thread),
                plugin_dir,
                config,
                mode,
            },
            rx,
        ))
    }

    /// How many files the watcher has read to fingerprint them (at start, and for each
    /// change it considered).
    pub fn fingerprinted(&self) -> u64 {
        self.fingerprinted.load(Ordering::Relaxed)
    }

    /// The canonical `plugin_dir` being watched.
    pub fn plugin_dir(&self) -> &Path {
        &self.plugin_dir
    }

    /// The config file being watched (under its canonical parent).
    pub fn config(&self) -> &Path {
        &self.config
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Stopping the debouncer joins its thread, which drops the raw sender: our thread then
        // sees the disconnect and ends (it never blocks on sending: the channel is unbounded).
        match self.backend.take() {
            Some(Backend::Events(d)) => d.stop(),
            Some(Backend::Poll(d)) => d.stop(),
            None => {}
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The SHA-256 of a file's bytes: the identity of a library or config version.
pub fn fingerprint(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Names of editors' and copy tools' scratch files, and hidden files: never reported.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.starts_with('#')
        || name.ends_with('~')
        || [".tmp", ".swp", ".part", ".partial"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// What a path is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Library,
    Config,
}

/// What is compared between the two looks at a file written in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
}

fn stat(path: &Path) -> Option<Stat> {
    let m = fs::metadata(path).ok()?;
    Some(Stat {
        len: m.len(),
        mtime: m.modified().ok(),
        ino: m.ino(),
    })
}

/// A file written in place, waiting to be stable.
#[derive(Debug)]
struct Pending {
    target: Target,
    last: Option<Stat>,
    due: Instant,
}

/// The watch thread's state.
struct State {
    plugin_dir: PathBuf,
    config: PathBuf,
    settle: Duration,
    fingerprinted: Arc<AtomicU64>,
    /// Reported (or present at start) paths and the bytes last reported; `None` when the file
    /// could not be read (it was reported all the same: the loader will say why).
    known: HashMap<PathBuf, Option<[u8; 32]>>,
    pending: HashMap<PathBuf, Pending>,
    tx: Sender<Change>,
}

impl State {
    fn classify(&self, path: &Path) -> Option<Target> {
        if path == self.config {
            return Some(Target::Config);
        }
        let name = path.file_name()?.to_str()?;
        (path.parent() == Some(self.plugin_dir.as_path())
            && name.ends_with(".so")
            && !is_ignored_name(name))
        .then_some(Target::Library)
    }

    fn libraries(&self) -> Vec<PathBuf> {
        match fs::read_dir(&self.plugin_dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| self.classify(p) == Some(Target::Library) && p.is_file())
                .collect(),
            Err(error) => {
                tracing::warn!(plugin_dir = %self.plugin_dir.display(), %error, "cannot list plugin_dir");
                Vec::new()
            }
        }
    }

    fn seed(&mut self) {
        let mut paths = self.libraries();
        if self.config.is_file() {
            paths.push(self.config.clone());
        }
        for path in paths {
            let fp = self.fingerprint(&path).ok();
            self.known.insert(path, fp);
        }
    }

    fn fingerprint(&self, path: &Path) -> io::Result<[u8; 32]> {
        self.fingerprinted.fetch_add(1, Ordering::Relaxed);
        fingerprint(path)
    }

    fn run(mut self, raw: Receiver<DebounceEventResult>) {
        loop {
            let next = self.pending.values().map(|p| p.due).min();
            let received = match next {
                None => raw.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(due) => raw.recv_timeout(due.saturating_duration_since(Instant::now())),
            };
            match received {
                Ok(Ok(events)) => self.on_events(events),
                Ok(Err(errors)) => {
                    for error in errors {
                        tracing::warn!(%error, "file watch error");
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.check_pending();
        }
    }

    fn on_events(&mut self, events: Vec<DebouncedEvent>) {
        for event in events {
            if event.need_rescan() {
                tracing::warn!("file watch lost events; rescanning");
                self.rescan();
                continue;
            }
            // The destination of a rename: complete by construction.
            let moved_to = match event.kind {
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any)) => {
                    event.paths.first()
                }
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => event.paths.last(),
                _ => None,
            };
            // A writer closed the file (inotify's IN_CLOSE_WRITE): what it wrote is complete.
            // The debouncer also reports a file written under a temporary name and renamed
            // within its window this way, at the destination.
            let closed = matches!(
                event.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            // Opening, reading, mapping or closing a file unwritten changes nothing: these
            // come from the loader, from readers, and from this watcher's own fingerprint
            // reads (acting on those would hash the file again, for ever).
            if matches!(event.kind, EventKind::Access(_)) && !closed {
                continue;
            }
            for path in &event.paths {
                let Some(target) = self.classify(path) else {
                    continue;
                };
                let now = closed || Some(path) == moved_to;
                self.touched(path, target, now);
            }
        }
    }

    /// Something happened at `path`: settle it now (renamed in, or gone) or start waiting
    /// for it to be stable.
    fn touched(&mut self, path: &Path, target: Target, now: bool) {
        let last = stat(path);
        if now || last.is_none() {
            self.pending.remove(path);
            self.settled(path, target);
        } else {
            self.pending.insert(
                path.to_owned(),
                Pending {
                    target,
                    last,
                    due: Instant::now() + self.settle,
                },
            );
        }
    }

    fn check_pending(&mut self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(path, _)| path.clone())
            .collect();
        for path in due {
            let current = stat(&path);
            let Some(p) = self.pending.get_mut(&path) else {
                continue;
            };
            if current == p.last {
                let target = p.target;
                self.pending.remove(&path);
                self.settled(&path, target);
            } else {
                // Still being written: look again later.
                p.last = current;
                p.due = now + self.settle;
            }
        }
    }

    /// Report `path` as it is now, unless its bytes are the ones last reported.
    fn settled(&mut self, path: &Path, target: Target) {
        let exists = path.exists();
        let change = if !exists {
            if self.known.remove(path).is_none() {
                return;
            }
            match target {
                Target::Library => Change::Library {
                    path: path.to_owned(),
                    kind: LibraryChange::Removed,
                },
                Target::Config => Change::Config {
                    path: path.to_owned(),
                },
            }
        } else {
            let fp = match self.fingerprint(path) {
                Ok(fp) => Some(fp),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot read a changed file");
                    None
                }
            };
            let previous = self.known.insert(path.to_owned(), fp);
            if fp.is_some() && previous == Some(fp) {
                return;
            }
            match target {
                Target::Library => Change::Library {
                    path: path.to_owned(),
                    kind: if previous.is_some() {
                        LibraryChange::Replaced
                    } else {
                        LibraryChange::Added
                    },
                },
                Target::Config => Change::Config {
                    path: path.to_owned(),
                },
            }
        };
        tracing::debug!(?change, "file change");
        // The receiver may be gone; the watcher is then being dropped.
        let _ = self.tx.send(change);
    }

    /// After lost events: look at everything again, through the same stability check.
    fn rescan(&mut self) {
        let mut paths = self.libraries();
        paths.push(self.config.clone());
        paths.extend(self.known.keys().cloned());
        paths.sort();
        paths.dedup();
        for path in paths {
            if let Some(target) = self.classify(&path) {
                self.touched(&path, target, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(3);
    const QUIET: Duration = Duration::from_millis(700);
    const SETTLE: Duration = Duration::from_millis(300);

    struct Setup {
        _dir: tempfile::TempDir,
        plugins: PathBuf,
        config: PathBuf,
        watcher: Watcher,
        rx: Receiver<Change>,
    }

    fn setup(mode: Mode) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let plugins = root.join("plugins.d");
        fs::create_dir(&plugins).unwrap();
        let config = root.join("plugins.toml");
        fs::write(&config, "[host]\n").unwrap();
        let (watcher, rx) = Watcher::start(&plugins, &config, mode, SETTLE).unwrap();
        Setup {
            _dir: dir,
            plugins,
            config,
            watcher,
            rx,
        }
    }

    /// Writes `bytes` under a temporary name beside `dest`, then renames it over `dest`.
    fn install(dest: &Path, bytes: &[u8]) {
        let tmp = dest.with_file_name(format!(
            ".{}.tmp",
            dest.file_name().unwrap().to_str().unwrap()
        ));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, dest).unwrap();
    }

    fn next(rx: &Receiver<Change>) -> Change {
        rx.recv_timeout(WAIT).expect("a change within 3 s")
    }

    /// Reading a library (as the loader and the watcher's own fingerprinting do) is no
    /// change: the watcher neither reports it nor reads the file again. Acting on read events
    /// once made it hash its own reads for ever, spending a tenth of a core when idle.
    #[test]
    fn reads_are_not_changes() {
        let s = setup(Mode::Events);
        let lib = s.plugins.join("liba.so");
        install(&lib, b"version 1");
        assert!(matches!(next(&s.rx), Change::Library { .. }));
        let before = s.watcher.fingerprinted();
        for _ in 0..5 {
            assert_eq!(fs::read(&lib).unwrap(), b"version 1");
            fs::read(&s.config).unwrap();
        }
        quiet(&s.rx);
        assert_eq!(
            s.watcher.fingerprinted(),
            before,
            "reads made the watcher hash files"
        );
    }

    fn quiet(rx: &Receiver<Change>) {
        if let Ok(change) = rx.recv_timeout(QUIET) {
            panic!("unexpected change: {change:?}");
        }
    }

    fn library(path: &Path, kind: LibraryChange) -> Change {
        Change::Library {
            path: path.to_owned(),
            kind,
        }
    }

    #[test]
    fn ignored_names() {
        for name in [
            ".a.so",
            "a.so~",
            "a.so.tmp",
            "a.so.swp",
            "a.so.part",
            "a.so.partial",
            "#a.so#",
        ] {
            assert!(is_ignored_name(name), "{name}");
        }
        assert!(!is_ignored_name("liba.so"));
    }

    #[test]
    fn fingerprint_is_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            hex::encode(fingerprint(&path).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn library_lifecycle_events() {
        let s = setup(Mode::Events);
        let lib = s.plugins.join("liba.so");

        // Renamed in: Added.
        install(&lib, b"version one");
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));

        // The same bytes again: nothing.
        install(&lib, b"version one");
        quiet(&s.rx);

        // Written in place in two halves: one Replaced, once complete.
        let full = b"version two, a little longer";
        {
            use std::io::Write as _;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&lib)
                .unwrap();
            f.write_all(&full[..10]).unwrap();
            f.sync_all().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            f.write_all(&full[10..]).unwrap();
        }
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Replaced));
        assert_eq!(fs::read(&lib).unwrap(), full);
        quiet(&s.rx);

        // Removed.
        fs::remove_file(&lib).unwrap();
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Removed));

        // The same bytes after a removal: Added again (the fingerprint was forgotten).
        install(&lib, full);
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));
        quiet(&s.rx);
        drop(s.watcher);
    }

    #[test]
    fn a_file_closed_by_its_writer_is_reported_without_waiting_to_settle() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let plugins = root.join("plugins.d");
        fs::create_dir(&plugins).unwrap();
        let config = root.join("plugins.toml");
        // A settle interval no test waits for: only the writer's close can report these.
        let (_watcher, rx) =
            Watcher::start(&plugins, &config, Mode::Events, Duration::from_secs(60)).unwrap();
        let copied = plugins.join("libcopied.so");
        fs::write(&copied, b"copied in place").unwrap();
        assert_eq!(next(&rx), library(&copied, LibraryChange::Added));
        // Written under a hidden name and renamed within the debounce window: the debouncer
        // reports it at its destination, closed after writing.
        let hidden = plugins.join(".libnew.so.tmp");
        fs::write(&hidden, b"renamed in").unwrap();
        fs::rename(&hidden, plugins.join("libnew.so")).unwrap();
        assert_eq!(
            next(&rx),
            library(&plugins.join("libnew.so"), LibraryChange::Added)
        );
    }

    #[test]
    fn slow_in_place_write_is_reported_once_complete() {
        use std::io::Write as _;
        let s = setup(Mode::Events);
        let lib = s.plugins.join("libslow.so");
        // Five chunks 100 ms apart: longer than `settle` in all, each gap shorter than it.
        let mut f = fs::File::create(&lib).unwrap();
        for i in 0..5u8 {
            f.write_all(&[i; 1000]).unwrap();
            f.sync_all().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(f);
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));
        quiet(&s.rx);
        assert_eq!(fs::metadata(&lib).unwrap().len(), 5000);
    }

    #[test]
    fn ignored_files_are_not_reported() {
        let s = setup(Mode::Events);
        for name in [
            ".hidden.so",
            "liba.so.tmp",
            "liba.so~",
            "liba.so.part",
            "#liba.so#",
        ] {
            fs::write(s.plugins.join(name), b"x").unwrap();
        }
        fs::write(s.plugins.join("README.txt"), b"not a library").unwrap();
        quiet(&s.rx);
    }

    #[test]
    fn existing_files_are_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let lib = root.join("liba.so");
        fs::write(&lib, b"one").unwrap();
        let config = root.join("plugins.toml");
        fs::write(&config, "").unwrap();
        // plugin_dir and the config's folder are one directory here.
        let (_w, rx) = Watcher::start(&root, &config, Mode::Events, SETTLE).unwrap();
        install(&lib, b"one");
        quiet(&rx);
        install(&lib, b"two");
        assert_eq!(next(&rx), library(&lib, LibraryChange::Replaced));
    }

    /// Writes a new config beside the config file and renames it over: one `Config`.
    fn replace_config(s: &Setup) {
        let tmp = s.config.with_file_name("plugins.toml.tmp");
        fs::write(&tmp, "[host]\nautoload = false\n").unwrap();
        fs::rename(&tmp, &s.config).unwrap();
        assert_eq!(
            next(&s.rx),
            Change::Config {
                path: s.config.clone()
            }
        );
    }

    #[test]
    fn config_replaced_by_rename() {
        let s = setup(Mode::Events);
        replace_config(&s);
        quiet(&s.rx);
        // Another file in the config's folder: nothing.
        fs::write(s.config.with_file_name("other.toml"), "x").unwrap();
        quiet(&s.rx);
    }

    #[test]
    fn poll_mode_add_and_config() {
        let s = setup(Mode::Poll);
        let lib = s.plugins.join("liba.so");
        install(&lib, b"version one");
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));

        replace_config(&s);
        quiet(&s.rx);

        fs::remove_file(&lib).unwrap();
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Removed));
    }

    #[test]
    fn dropping_the_watcher_disconnects() {
        let s = setup(Mode::Events);
        drop(s.watcher);
        assert!(matches!(
            s.rx.recv_timeout(WAIT),
            Err(RecvTimeoutError::Disconnected)
        ));
    }
}
