//! Watching `plugin_dir` and the config file: file-system activity in, settled [`FileChange`]s out.
//!
//! This module has one job: turn what happens on disk into a short stream of changes that are
//! worth acting on. It applies nothing; the supervisor (the next step of hot plug) consumes the
//! [`Receiver<FileChange>`] returned by [`Watcher::start`] and decides what each change means.
//!
//! - `plugin_dir` is watched non-recursively; only `*.so` entries that are not directories
//!   count. The config file is watched through its parent directory, filtered by name,
//!   because editors and deployment tools replace a file by renaming a new one over it (which
//!   a watch on the file would lose).
//! - A config file reached through symlinks (a Kubernetes ConfigMap: `plugins.toml ->
//!   ..data/plugins.toml`, `..data -> ..2026_…/`, updated by renaming a new `..data` over the
//!   old) is followed: every directory holding a link of the chain, and the one holding the
//!   file it ends at, is watched; any activity there re-resolves the chain, and a new target
//!   (or a new write) is a change.
//! - Raw events go through a debouncer (`notify-debouncer-full`) with the platform's events
//!   ([`Detection::Events`], inotify on Linux), or the directories are scanned every
//!   [`POLL_INTERVAL`] ([`Detection::Poll`], DESIGN §4 `watch = "poll"`, for filesystems without
//!   change events), comparing what `lstat` says of each entry. notify's own poller is not
//!   used: to compare contents it opens and reads every regular file it lists, by path, each
//!   round — a FIFO swapped in between its `stat` and its `open` would block it for ever.
//! - A watched directory deleted and made anew, or replaced by a rename, is watched again: the
//!   directories are looked at every [`DIR_CHECK`], at once when an event names one of them,
//!   and when the supervisor asks ([`Watcher::refresh`], an operator's reload); a directory
//!   found anew is scanned as at a start.
//! - Temporary and hidden names are ignored ([`is_ignored_name`]).
//! - A file renamed into place is reported at once after the debounce, and so is one whose
//!   writer closed it (inotify's close-after-write: `cp` over a library, or a file written
//!   under a temporary name and renamed within the debounce window, which the debouncer
//!   reports at its destination). Any other file written in place is reported only once it
//!   is complete and stable: what `lstat` says of it is read, and read again `settle` later;
//!   it goes out only when nothing changed (otherwise the check starts over).
//!   A file caught incomplete all the same is refused by the loader's completeness check and
//!   reported again when it changes.
//! - The watcher reads no file: it compares what `lstat` says of each path (`stat` for the
//!   config file, through its symlinks) with what it said when the path was last reported
//!   (seeded with what exists when it starts), and drops an event whose file is the same file,
//!   unchanged. Whether the bytes are new is the supervisor's to decide: it reads them anyway
//!   (to check a library, to parse the config), and only it knows what runs. A removal
//!   always goes out.
//! - Hostile entries: a FIFO, a device, a socket or a symlink named `*.so` is reported once
//!   (the supervisor's refusal is its one log line) and not again while it stays the same
//!   file, however often it is touched. Watch errors are logged once each.
//! - Nothing ever waits for the watch thread: dropping the [`Watcher`] tells it to end and
//!   returns at once.
//!
//! Start the watcher *before* the initial load, so that nothing written in between is missed;
//! a change whose bytes equal what was loaded is then the supervisor's to ignore.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    ffi::OsString,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::config::WatchMode;
use crossbeam_channel::{Receiver, Sender, never, select, unbounded};
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode,
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
};
use notify_debouncer_full::{
    DebounceEventResult, DebouncedEvent, Debouncer, RecommendedCache, new_debouncer_opt,
};

/// How long the debouncer waits for a path to go quiet before it reports its events.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// How often [`Detection::Poll`] scans the watched directories.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often the watched directories themselves are looked at (deleted and made anew, or
/// replaced by a rename: a watch stays with the directory it was set on, gone or not).
const DIR_CHECK: Duration = Duration::from_secs(1);

/// The most symlinks followed from the config file to its bytes (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// The most distinct watch errors remembered as logged; beyond, the memory starts over.
const MAX_LOGGED_ERRORS: usize = 256;

/// How changes are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// The platform's change events (inotify on Linux).
    Events,
    /// Scan the directories every [`POLL_INTERVAL`], comparing what `lstat` says.
    Poll,
}

impl From<WatchMode> for Detection {
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
    /// A known library is another file now, or was written (its bytes may be the same).
    Replaced,
    /// A known library is gone.
    Removed,
}

/// A settled change worth the supervisor's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChange {
    /// A `*.so` entry in `plugin_dir` (a non-regular one too, once: the loader refuses it).
    Library { path: PathBuf, kind: LibraryChange },
    /// The config file is another file now, or was written (its bytes may be the same), or
    /// is gone (the supervisor's load will say so).
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

/// The platform's events through the debouncer; dropping it stops the watch without waiting.
type EventSource = Debouncer<RecommendedWatcher, RecommendedCache>;

/// What the watch thread is told besides file-system events.
#[derive(Debug)]
enum WatchCommand {
    /// Look at the watched directories again now.
    Refresh,
}

/// A running watch of `plugin_dir` and the config file. Dropping it ends the watch thread
/// without waiting for it, and the [`Receiver<FileChange>`] then disconnects.
pub struct Watcher {
    /// Paths the watch thread looked at to settle them since it started.
    examined: Arc<AtomicU64>,
    /// The watch thread ends when this is dropped.
    control: Sender<WatchCommand>,
    plugin_dir: PathBuf,
    config: PathBuf,
    mode: Detection,
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
    /// The paths in the [`FileChange`]s are under the canonical forms of `plugin_dir` and of the
    /// config file's parent.
    ///
    /// # Errors
    /// [`WatchError`] when a directory cannot be resolved or watched, or the thread cannot
    /// start.
    pub fn start(
        plugin_dir: &Path,
        config: &Path,
        mode: Detection,
        settle: Duration,
    ) -> Result<(Watcher, Receiver<FileChange>), WatchError> {
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
        let mut dirs = vec![plugin_dir.clone()];
        if config_dir != plugin_dir {
            dirs.push(config_dir.clone());
        }
        let backend = match mode {
            Detection::Events => {
                let watch_error = |path: &Path| {
                    let path = path.to_owned();
                    move |source| WatchError::Watch { path, source }
                };
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
                Some(d)
            }
            // The thread scans by itself; the raw channel stays empty (and disconnected).
            Detection::Poll => None,
        };

        let (tx, rx) = unbounded();
        let (control, control_rx) = unbounded();
        let examined = Arc::new(AtomicU64::new(0));
        let mut state = WatchThread {
            plugin_dir: plugin_dir.clone(),
            config: config.clone(),
            settle,
            mode,
            backend,
            examined: examined.clone(),
            known: HashMap::new(),
            pending: HashMap::new(),
            dirs: dirs.iter().map(|d| (d.clone(), dir_id(d))).collect(),
            chain: Chain::default(),
            config_seen: None,
            polled: HashMap::new(),
            polled_config: None,
            errors_logged: HashSet::new(),
            tx,
        };
        // The baseline: what exists now counts as already reported. This runs before the
        // caller's first scan, and reads no file (never blocking).
        state.seed();
        std::thread::Builder::new()
            .name("plugind-watch".into())
            .spawn(move || {
                // Fingerprinting files is background work (crate::background).
                crate::background::lower_this_thread();
                state.run(raw_rx, control_rx)
            })
            .map_err(|source| WatchError::Thread {
                path: plugin_dir.clone(),
                source,
            })?;
        Ok((
            Watcher {
                examined,
                control,
                plugin_dir,
                config,
                mode,
            },
            rx,
        ))
    }

    /// Asks the watch thread to look at the watched directories again now (an operator's
    /// reload): one deleted and made anew since is watched again and scanned. Never waits.
    pub fn refresh(&self) {
        let _ = self.control.send(WatchCommand::Refresh);
    }

    /// How many times the watcher looked at a path to settle it (at start, and for each
    /// change it considered); it reads no file.
    pub fn examined(&self) -> u64 {
        self.examined.load(Ordering::Relaxed)
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

/// What is compared between two looks at an entry: which file it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ident {
    dev: u64,
    ino: u64,
    /// The file type bits of the mode.
    kind: u32,
    len: u64,
    mtime: (i64, i64),
}

impl Ident {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            kind: meta.mode() & libc::S_IFMT,
            len: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// What is compared between two reports of an entry: for anything but a regular file,
    /// which file it is (refused by the supervisor for its kind, whatever it holds or however
    /// often it is touched); for a regular file, its size and modification time too.
    fn reported(self) -> Self {
        if self.kind == libc::S_IFREG {
            self
        } else {
            Self {
                len: 0,
                mtime: (0, 0),
                ..self
            }
        }
    }
}

/// A library is looked at without following a symlink (the loader refuses symlinks); the
/// config file through them (a ConfigMap is a chain of symlinks).
fn look(path: &Path, target: Target) -> Option<Ident> {
    let meta = match target {
        Target::Library => fs::symlink_metadata(path),
        Target::Config => fs::metadata(path),
    };
    meta.ok().map(|m| Ident::of(&m))
}

/// Which directory a watched path is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirId {
    dev: u64,
    ino: u64,
}

fn dir_id(path: &Path) -> Option<DirId> {
    fs::metadata(path)
        .ok()
        .filter(fs::Metadata::is_dir)
        .map(|m| DirId {
            dev: m.dev(),
            ino: m.ino(),
        })
}

/// The config file's symlink chain, as last resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Chain {
    /// Every path that was a symlink on the way, in order.
    links: Vec<PathBuf>,
    /// Where the chain ends (the file itself; it may not exist).
    target: PathBuf,
}

impl Chain {
    /// Follows `path` (absolute) component by component, recording every symlink met.
    fn resolve(path: &Path) -> Self {
        enum Part {
            Up,
            Name(OsString),
        }
        fn parts(path: &Path) -> impl DoubleEndedIterator<Item = Part> + '_ {
            path.components().filter_map(|c| match c {
                Component::ParentDir => Some(Part::Up),
                Component::Normal(name) => Some(Part::Name(name.to_owned())),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
            })
        }
        let mut links = Vec::new();
        let mut todo: VecDeque<Part> = parts(path).collect();
        let mut current = PathBuf::from("/");
        while let Some(part) = todo.pop_front() {
            let name = match part {
                Part::Up => {
                    current.pop();
                    continue;
                }
                Part::Name(name) => name,
            };
            let next = current.join(&name);
            let link = fs::symlink_metadata(&next)
                .is_ok_and(|m| m.file_type().is_symlink())
                .then(|| fs::read_link(&next).ok())
                .flatten()
                .filter(|_| links.len() < MAX_LINKS);
            match link {
                Some(target) => {
                    links.push(next);
                    if target.is_absolute() {
                        current = PathBuf::from("/");
                    }
                    for part in parts(&target).rev() {
                        todo.push_front(part);
                    }
                }
                None => current = next,
            }
        }
        Self {
            links,
            target: current,
        }
    }

    /// The directories holding a link of the chain or its end.
    fn dirs(&self) -> BTreeSet<PathBuf> {
        self.links
            .iter()
            .chain([&self.target])
            .filter_map(|p| p.parent().map(Path::to_owned))
            .collect()
    }
}

/// A file written in place, waiting to be stable.
#[derive(Debug)]
struct Settling {
    target: Target,
    last: Option<Ident>,
    due: Instant,
}

/// The watch thread's state.
struct WatchThread {
    plugin_dir: PathBuf,
    config: PathBuf,
    settle: Duration,
    mode: Detection,
    /// `None` in [`Detection::Poll`].
    backend: Option<EventSource>,
    examined: Arc<AtomicU64>,
    /// Reported (or present at start) paths and what was last reported of them.
    known: HashMap<PathBuf, Ident>,
    pending: HashMap<PathBuf, Settling>,
    /// The directories watched, and which directory each path was when it was watched
    /// (`None`: missing, or the watch could not be set; tried again at every check).
    dirs: BTreeMap<PathBuf, Option<DirId>>,
    /// The config file's symlink chain when it was last settled.
    chain: Chain,
    /// What the config file (through its chain) was when it was last settled.
    config_seen: Option<Ident>,
    /// [`Detection::Poll`]: what each library entry was at the last scan, and the config file.
    polled: HashMap<PathBuf, Ident>,
    polled_config: Option<(Option<Ident>, Chain)>,
    /// Watch errors already logged (each is logged once).
    errors_logged: HashSet<String>,
    tx: Sender<FileChange>,
}

impl WatchThread {
    fn classify(&self, path: &Path) -> Option<Target> {
        if path == self.config || path == self.chain.target {
            return Some(Target::Config);
        }
        let name = path.file_name()?.to_str()?;
        (path.parent() == Some(self.plugin_dir.as_path())
            && name.ends_with(".so")
            && !is_ignored_name(name))
        .then_some(Target::Library)
    }

    /// Whether activity at `path` may have changed what the config file resolves to: a link
    /// of its chain, or anything in a directory of the chain.
    fn touches_config(&self, path: &Path) -> bool {
        self.chain.links.iter().any(|l| l == path)
            || path
                .parent()
                .is_some_and(|parent| self.chain.dirs().contains(parent))
    }

    /// The `*.so` entries of `plugin_dir` that are not directories.
    fn libraries(&mut self) -> Vec<PathBuf> {
        match fs::read_dir(&self.plugin_dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    self.classify(p) == Some(Target::Library)
                        && look(p, Target::Library).is_some_and(|i| !i.is_dir())
                })
                .collect(),
            Err(error) => {
                let plugin_dir = self.plugin_dir.display().to_string();
                self.warn_once(format!("cannot list plugin_dir {plugin_dir}: {error}"));
                Vec::new()
            }
        }
    }

    fn seed(&mut self) {
        self.chain = Chain::resolve(&self.config);
        self.config_seen = look(&self.config, Target::Config);
        let mut paths = self.libraries();
        if self.config_seen.is_some() {
            paths.push(self.config.clone());
        }
        for path in paths {
            let target = self.classify(&path).unwrap_or(Target::Library);
            if let Some(seen) = self.see(&path, target) {
                self.known.insert(path, seen);
            }
        }
        self.polled = self.scan_libraries();
        self.polled_config = Some((self.config_seen, self.chain.clone()));
        // The chain's directories beyond the two watched already.
        self.check_dirs();
    }

    /// What is at `path` now, as compared between reports; `None` if it is gone (or a
    /// directory, which is no library). Nothing is read: the supervisor reads what it takes.
    fn see(&mut self, path: &Path, target: Target) -> Option<Ident> {
        let ident = look(path, target)?;
        if target == Target::Library && ident.is_dir() {
            return None;
        }
        self.examined.fetch_add(1, Ordering::Relaxed);
        Some(ident.reported())
    }

    /// Logs a watch problem once (until the watches are set up again).
    fn warn_once(&mut self, error: String) {
        if self.errors_logged.len() >= MAX_LOGGED_ERRORS {
            self.errors_logged.clear();
        }
        if self.errors_logged.insert(error.clone()) {
            tracing::warn!(%error, "file watch problem (logged once)");
        }
    }

    fn run(mut self, raw: Receiver<DebounceEventResult>, control: Receiver<WatchCommand>) {
        let mut raw = raw;
        let mut next_poll = Instant::now() + POLL_INTERVAL;
        let mut next_dir_check = Instant::now() + DIR_CHECK;
        loop {
            let mut wake = next_dir_check;
            if self.mode == Detection::Poll {
                wake = wake.min(next_poll);
            }
            if let Some(due) = self.pending.values().map(|p| p.due).min() {
                wake = wake.min(due);
            }
            let timeout = wake.saturating_duration_since(Instant::now());
            select! {
                recv(raw) -> received => match received {
                    Ok(Ok(events)) => self.on_events(events),
                    Ok(Err(errors)) => {
                        for error in errors {
                            self.warn_once(error.to_string());
                        }
                    }
                    Err(_) => raw = never(),
                },
                recv(control) -> command => match command {
                    Ok(WatchCommand::Refresh) => self.check_dirs(),
                    // The Watcher was dropped: nobody waits for this thread, which ends here
                    // (dropping the debouncer stops it without waiting either).
                    Err(_) => return,
                },
                default(timeout) => {}
            }
            let now = Instant::now();
            if self.mode == Detection::Poll && now >= next_poll {
                self.poll();
                next_poll = now + POLL_INTERVAL;
            }
            if now >= next_dir_check {
                self.check_dirs();
                next_dir_check = now + DIR_CHECK;
            }
            self.check_pending();
        }
    }

    fn on_events(&mut self, events: Vec<DebouncedEvent>) {
        let mut dirs = false;
        let mut config = false;
        for event in events {
            if event.need_rescan() {
                self.warn_once("file watch lost events; rescanning".to_owned());
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
            // come from the loader and from readers (acting on them once made the watcher
            // hash its own reads, for ever).
            if matches!(event.kind, EventKind::Access(_)) && !closed {
                continue;
            }
            for path in &event.paths {
                // A watched directory itself: deleted, moved away, or made anew.
                dirs |= self.dirs.contains_key(path);
                match self.classify(path) {
                    Some(Target::Config) => {
                        let now = closed || Some(path) == moved_to;
                        let config = self.config.clone();
                        self.touched(&config, Target::Config, now);
                    }
                    Some(Target::Library) => {
                        let now = closed || Some(path) == moved_to;
                        self.touched(path, Target::Library, now);
                    }
                    None => config |= self.touches_config(path),
                }
            }
        }
        if config {
            self.config_check();
        }
        if dirs {
            self.check_dirs();
        }
    }

    /// Something in the config file's chain changed (a link swapped, a directory made or
    /// removed): a change if the file it resolves to is not the one last settled.
    fn config_check(&mut self) {
        if Chain::resolve(&self.config) != self.chain
            || look(&self.config, Target::Config) != self.config_seen
        {
            // A symlink swap is atomic: what it points at is complete.
            let config = self.config.clone();
            self.touched(&config, Target::Config, true);
        }
    }

    /// Something happened at `path`: settle it now (renamed in, or gone) or start waiting
    /// for it to be stable.
    fn touched(&mut self, path: &Path, target: Target, now: bool) {
        let last = look(path, target);
        if now || last.is_none() {
            self.pending.remove(path);
            self.settled(path, target);
        } else {
            self.pending.insert(
                path.to_owned(),
                Settling {
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
            let Some(p) = self.pending.get(&path) else {
                continue;
            };
            let target = p.target;
            let current = look(&path, target);
            if current == p.last {
                self.pending.remove(&path);
                self.settled(&path, target);
            } else if let Some(p) = self.pending.get_mut(&path) {
                // Still being written: look again later.
                p.last = current;
                p.due = now + self.settle;
            }
        }
    }

    /// Report `path` as it is now, unless what is there is what was last reported.
    fn settled(&mut self, path: &Path, target: Target) {
        if target == Target::Config {
            // Whatever it is now, its chain is what is watched from here on.
            self.chain = Chain::resolve(&self.config);
            self.config_seen = look(&self.config, Target::Config);
            self.check_dirs();
        }
        let change = match self.see(path, target) {
            None => {
                if self.known.remove(path).is_none() {
                    return;
                }
                match target {
                    Target::Library => FileChange::Library {
                        path: path.to_owned(),
                        kind: LibraryChange::Removed,
                    },
                    Target::Config => FileChange::Config {
                        path: path.to_owned(),
                    },
                }
            }
            Some(seen) => {
                let previous = self.known.insert(path.to_owned(), seen);
                if previous == Some(seen) {
                    return;
                }
                match target {
                    Target::Library => FileChange::Library {
                        path: path.to_owned(),
                        kind: if previous.is_some() {
                            LibraryChange::Replaced
                        } else {
                            LibraryChange::Added
                        },
                    },
                    Target::Config => FileChange::Config {
                        path: path.to_owned(),
                    },
                }
            }
        };
        tracing::debug!(?change, "file change");
        // The receiver may be gone; the watcher is then being dropped.
        let _ = self.tx.send(change);
    }

    /// After lost events: look at everything again, through the same stability check.
    fn rescan(&mut self) {
        self.rescan_libraries();
        let config = self.config.clone();
        self.touched(&config, Target::Config, false);
    }

    /// Every library entry there is and every one known, through the stability check: new
    /// ones are added, gone ones removed.
    fn rescan_libraries(&mut self) {
        let mut paths = self.libraries();
        paths.extend(
            self.known
                .keys()
                .filter(|p| p.parent() == Some(self.plugin_dir.as_path()))
                .cloned(),
        );
        paths.sort();
        paths.dedup();
        for path in paths {
            if self.classify(&path) == Some(Target::Library) && !self.pending.contains_key(&path) {
                self.touched(&path, Target::Library, false);
            }
        }
    }

    /// What every library entry is now.
    fn scan_libraries(&mut self) -> HashMap<PathBuf, Ident> {
        self.libraries()
            .into_iter()
            .filter_map(|p| look(&p, Target::Library).map(|i| (p, i)))
            .collect()
    }

    /// [`Detection::Poll`]: what changed since the last scan goes through the stability check.
    fn poll(&mut self) {
        let now = self.scan_libraries();
        let changed: Vec<PathBuf> = now
            .iter()
            .filter(|(path, ident)| self.polled.get(*path) != Some(ident))
            .map(|(path, _)| path.clone())
            .chain(
                self.polled
                    .keys()
                    .filter(|path| !now.contains_key(*path))
                    .cloned(),
            )
            .collect();
        self.polled = now;
        for path in changed {
            if !self.pending.contains_key(&path) {
                self.touched(&path, Target::Library, false);
            }
        }
        let config = (
            look(&self.config, Target::Config),
            Chain::resolve(&self.config),
        );
        if self.polled_config.as_ref() != Some(&config) {
            self.polled_config = Some(config);
            if !self.pending.contains_key(&self.config) {
                let path = self.config.clone();
                self.touched(&path, Target::Config, false);
            }
        }
    }

    /// Makes the watches match the directories as they are now: `plugin_dir` and every
    /// directory of the config file's chain. A directory that is another one than when it
    /// was watched (deleted and made anew, or renamed over) is watched again and scanned.
    fn check_dirs(&mut self) {
        let wanted: BTreeSet<PathBuf> = std::iter::once(self.plugin_dir.clone())
            .chain(self.chain.dirs())
            .collect();
        let gone: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|d| !wanted.contains(*d))
            .cloned()
            .collect();
        for dir in gone {
            self.dirs.remove(&dir);
            if let Some(backend) = &mut self.backend {
                // It may be gone with its directory already.
                let _ = backend.unwatch(&dir);
            }
        }
        let (mut libraries, mut config) = (false, false);
        for dir in wanted {
            let now = dir_id(&dir);
            let before = self.dirs.get(&dir).copied();
            if before == Some(now) && now.is_some() {
                continue;
            }
            if before == Some(None) && now.is_none() {
                continue;
            }
            let mut watched = now;
            if let Some(backend) = &mut self.backend {
                let _ = backend.unwatch(&dir);
                if now.is_some()
                    && let Err(e) = backend.watch(&dir, RecursiveMode::NonRecursive)
                {
                    let error = format!("cannot watch {}: {e}", dir.display());
                    self.warn_once(error);
                    watched = None;
                }
            }
            if watched.is_some() && before.is_some() {
                tracing::info!(dir = %dir.display(), "a watched directory was made anew; watching it again");
                // Problems logged about the old one may happen again to the new one.
                self.errors_logged.clear();
            }
            self.dirs.insert(dir.clone(), watched);
            if before.is_some() {
                if dir == self.plugin_dir {
                    libraries = true;
                } else {
                    config = true;
                }
            }
        }
        if libraries {
            self.rescan_libraries();
        }
        if config {
            self.config_check();
        }
    }
}

#[cfg(test)]
mod tests {
    use crossbeam_channel::RecvTimeoutError;

    use super::*;

    const WAIT: Duration = Duration::from_secs(3);
    const QUIET: Duration = Duration::from_millis(700);
    const SETTLE: Duration = Duration::from_millis(300);

    struct Setup {
        _dir: tempfile::TempDir,
        plugins: PathBuf,
        config: PathBuf,
        watcher: Watcher,
        rx: Receiver<FileChange>,
    }

    fn setup(mode: Detection) -> Setup {
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

    fn next(rx: &Receiver<FileChange>) -> FileChange {
        rx.recv_timeout(WAIT).expect("a change within 3 s")
    }

    /// Reading a library (as the loader does) is no change: the watcher neither reports it
    /// nor looks at the file again. Acting on read events once made it hash its own reads for
    /// ever, spending a tenth of a core when idle.
    #[test]
    fn reads_are_not_changes() {
        let s = setup(Detection::Events);
        let lib = s.plugins.join("liba.so");
        install(&lib, b"version 1");
        assert!(matches!(next(&s.rx), FileChange::Library { .. }));
        let before = s.watcher.examined();
        for _ in 0..5 {
            assert_eq!(fs::read(&lib).unwrap(), b"version 1");
            fs::read(&s.config).unwrap();
        }
        quiet(&s.rx);
        assert_eq!(
            s.watcher.examined(),
            before,
            "reads made the watcher look at files"
        );
    }

    fn quiet(rx: &Receiver<FileChange>) {
        if let Ok(change) = rx.recv_timeout(QUIET) {
            panic!("unexpected change: {change:?}");
        }
    }

    fn library(path: &Path, kind: LibraryChange) -> FileChange {
        FileChange::Library {
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
    fn library_lifecycle_events() {
        let s = setup(Detection::Events);
        let lib = s.plugins.join("liba.so");

        // Renamed in: Added.
        install(&lib, b"version one");
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));

        // The same bytes again, renamed in: another file, reported (whether its bytes are
        // new is the supervisor's to decide: it reads them anyway).
        install(&lib, b"version one");
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Replaced));
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

        // The same bytes after a removal: Added again (the path was forgotten).
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
        let (_watcher, rx) = Watcher::start(
            &plugins,
            &config,
            Detection::Events,
            Duration::from_secs(60),
        )
        .unwrap();
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
        let s = setup(Detection::Events);
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
        let s = setup(Detection::Events);
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

    /// What exists at start counts as reported: nothing is reported for it until it
    /// changes.
    #[test]
    fn existing_files_are_the_baseline() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let lib = root.join("liba.so");
        fs::write(&lib, b"one").unwrap();
        let config = root.join("plugins.toml");
        fs::write(&config, "").unwrap();
        // plugin_dir and the config's folder are one directory here.
        let (_w, rx) = Watcher::start(&root, &config, Detection::Events, SETTLE).unwrap();
        // Its attributes touched, the file unchanged: nothing.
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o600)).unwrap();
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
            FileChange::Config {
                path: s.config.clone()
            }
        );
    }

    #[test]
    fn config_replaced_by_rename() {
        let s = setup(Detection::Events);
        replace_config(&s);
        quiet(&s.rx);
        // Another file in the config's folder: nothing.
        fs::write(s.config.with_file_name("other.toml"), "x").unwrap();
        quiet(&s.rx);
    }

    #[test]
    fn poll_mode_add_and_config() {
        let s = setup(Detection::Poll);
        let lib = s.plugins.join("liba.so");
        install(&lib, b"version one");
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));

        replace_config(&s);
        quiet(&s.rx);

        fs::remove_file(&lib).unwrap();
        assert_eq!(next(&s.rx), library(&lib, LibraryChange::Removed));
    }

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mkfifo {}", path.display());
    }

    /// Drops `watcher` on a thread of its own; panics unless that returns within [`WAIT`].
    fn drop_within_wait(watcher: Watcher) {
        let (done, dropped) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            drop(watcher);
            let _ = done.send(());
        });
        dropped
            .recv_timeout(WAIT)
            .expect("dropping the watcher waited for its thread");
    }

    /// Found by the hostile-input campaign: a FIFO named `x.so` in plugin_dir wedged the
    /// watch thread for ever (fingerprinting it opened it, blocking until a writer came, even
    /// after it was removed), and a symlink to /dev/zero kept it reading at 100% CPU; later
    /// changes went unnoticed, and dropping the watcher (the daemon's stop) waited for ever.
    #[test]
    fn a_fifo_or_a_symlink_to_a_device_never_stops_the_watch() {
        for mode in [Detection::Events, Detection::Poll] {
            let s = setup(mode);
            let fifo = s.plugins.join("x.so");
            mkfifo(&fifo);
            let zero = s.plugins.join("zero.so");
            std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
            // Each is reported once, never read (the supervisor's loader refuses it).
            let mut reported = vec![next(&s.rx), next(&s.rx)];
            reported.sort_by_key(|c| format!("{c:?}"));
            assert_eq!(
                reported,
                [
                    library(&fifo, LibraryChange::Added),
                    library(&zero, LibraryChange::Added)
                ],
                "{mode:?}"
            );
            let lib = s.plugins.join("liba.so");
            install(&lib, b"a library");
            assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added), "{mode:?}");
            fs::remove_file(&fifo).unwrap();
            assert_eq!(next(&s.rx), library(&fifo, LibraryChange::Removed));
            install(&lib, b"another library");
            assert_eq!(next(&s.rx), library(&lib, LibraryChange::Replaced));
            quiet(&s.rx);
            drop_within_wait(s.watcher);
        }
    }

    /// Found by the hostile-input campaign: junk named `*.so` that cannot be read was
    /// reported (and logged) again at every event that touched it. It is reported once, and
    /// again only when it is another file.
    #[test]
    fn unreadable_junk_is_reported_once_however_often_it_is_touched() {
        use std::os::unix::fs::PermissionsExt as _;
        let s = setup(Detection::Events);
        let junk = s.plugins.join("junk.so");
        std::os::unix::fs::symlink(&s.plugins, &junk).unwrap();
        let fifo = s.plugins.join("fifo.so");
        mkfifo(&fifo);
        let mut reported = vec![next(&s.rx), next(&s.rx)];
        reported.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            reported,
            [
                library(&fifo, LibraryChange::Added),
                library(&junk, LibraryChange::Added)
            ]
        );
        let before = s.watcher.examined();
        for round in 0..5u32 {
            let touched = std::process::Command::new("touch")
                .arg("-h")
                .arg(&junk)
                .status()
                .unwrap();
            assert!(touched.success());
            fs::set_permissions(
                &fifo,
                fs::Permissions::from_mode(0o600 + (round % 2) * 0o44),
            )
            .unwrap();
            std::thread::sleep(DEBOUNCE * 2);
        }
        quiet(&s.rx);
        assert!(s.watcher.examined() > before, "the touches were seen");
        // Another file under the same name is news.
        fs::remove_file(&junk).unwrap();
        assert_eq!(next(&s.rx), library(&junk, LibraryChange::Removed));
        std::os::unix::fs::symlink("/", &junk).unwrap();
        assert_eq!(next(&s.rx), library(&junk, LibraryChange::Added));
    }

    /// Found by the hostile-input campaign: a plugin_dir deleted and made anew was never
    /// watched again (not even after a reload).
    #[test]
    fn a_plugin_dir_deleted_and_made_anew_is_watched_again() {
        for mode in [Detection::Events, Detection::Poll] {
            let s = setup(mode);
            let lib = s.plugins.join("liba.so");
            install(&lib, b"one");
            assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added));
            fs::remove_dir_all(&s.plugins).unwrap();
            assert_eq!(next(&s.rx), library(&lib, LibraryChange::Removed));
            fs::create_dir(&s.plugins).unwrap();
            install(&lib, b"two");
            assert_eq!(next(&s.rx), library(&lib, LibraryChange::Added), "{mode:?}");
            // And what comes after, through the new watch.
            let other = s.plugins.join("libb.so");
            install(&other, b"three");
            assert_eq!(next(&s.rx), library(&other, LibraryChange::Added));
            quiet(&s.rx);
        }
    }

    /// A Kubernetes ConfigMap volume: `..2026_…/plugins.toml` holds the bytes, `..data`
    /// links to that directory, `plugins.toml` to `..data/plugins.toml`.
    fn config_map(mount: &Path, version: &str, text: &str) {
        fs::create_dir(mount.join(version)).unwrap();
        fs::write(mount.join(version).join("plugins.toml"), text).unwrap();
    }

    /// An update as the kubelet makes it: a new directory, a new link renamed over `..data`,
    /// the old directory removed.
    fn config_map_swap(mount: &Path, old: &str, new: &str, text: &str) {
        config_map(mount, new, text);
        std::os::unix::fs::symlink(new, mount.join("..data_tmp")).unwrap();
        fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        fs::remove_dir_all(mount.join(old)).unwrap();
    }

    /// Found by the hostile-input campaign: a config file reached through symlinks (the
    /// ConfigMap layout, updated by an atomic swap of the `..data` link) was not watched.
    #[test]
    fn a_config_map_swap_is_a_config_change() {
        for mode in [Detection::Events, Detection::Poll] {
            let dir = tempfile::tempdir().unwrap();
            let root = fs::canonicalize(dir.path()).unwrap();
            let plugins = root.join("plugins.d");
            fs::create_dir(&plugins).unwrap();
            let mount = root.join("config");
            fs::create_dir(&mount).unwrap();
            config_map(&mount, "..2026_12_06_01", "[host]\n");
            std::os::unix::fs::symlink("..2026_12_06_01", mount.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/plugins.toml", mount.join("plugins.toml")).unwrap();
            let config = mount.join("plugins.toml");
            let (_w, rx) = Watcher::start(&plugins, &config, mode, SETTLE).unwrap();
            let changed = FileChange::Config {
                path: config.clone(),
            };
            config_map_swap(
                &mount,
                "..2026_12_06_01",
                "..2026_12_06_02",
                "[host]\nautoload = false\n",
            );
            assert_eq!(next(&rx), changed, "{mode:?}");
            quiet(&rx);
            config_map_swap(&mount, "..2026_12_06_02", "..2026_12_06_03", "[host]\n");
            assert_eq!(next(&rx), changed, "{mode:?}");
            quiet(&rx);
            // The same bytes in a new version: another file, reported (the supervisor finds the
            // bytes it runs, and does nothing).
            config_map_swap(&mount, "..2026_12_06_03", "..2026_12_06_04", "[host]\n");
            assert_eq!(next(&rx), changed, "{mode:?}");
            quiet(&rx);
        }
    }

    #[test]
    fn dropping_the_watcher_disconnects() {
        let s = setup(Detection::Events);
        drop(s.watcher);
        assert!(matches!(
            s.rx.recv_timeout(WAIT),
            Err(RecvTimeoutError::Disconnected)
        ));
    }
}
