//! Turns a plugin library file into callable plugin code: the only module that calls into
//! `libloading` and abi_stable's loading machinery, and the one path every caller uses
//! (`plugind run`, `check`, `inspect`, the supervisor).
//!
//! The path from file to code (docs/design.md §9):
//! 1. [`file`]: open the file relative to its directory's fd without following symlinks,
//!    judge the open fd (regular file, permissions, owner) and its directories, read it once;
//! 2. [`elf`]: on those bytes, check the ELF is a complete shared library, decode the
//!    manifest section, check the declared API version; then the optional sha256 pin —
//!    this is the *declared* verdict ([`check`]), reached without running anything;
//! 3. [`probe`]: without a pin, map the bytes in a short-lived child first;
//! 4. [`image`]: copy the bytes into a sealed memfd, `dlopen("/proc/self/fd/N")`, check the
//!    root module's layout against a fresh `CheckingGlobals`, init it with the version check
//!    and cross-check its manifest with the section.
//!
//! What is mapped is byte for byte what was checked: a file replaced or rewritten on disk
//! can neither crash the daemon nor slip in unchecked code, and two versions of one plugin
//! load side by side. A [`Library`] is an `Arc`; every [`PluginInstance`] holds one, so a
//! library is unloaded only when nothing from it remains. If it is still mapped afterwards it
//! is *retained*, reported by [`retained`].

use std::{
    collections::BTreeMap,
    fmt,
    mem::ManuallyDrop,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use plugind_api::{
    Outcome,
    abi::{RawHost, RawMessage},
    hosting::{CallError, CallErrorKind, ConfigProblem, Instance},
    manifest::{Manifest, ManifestError},
};
use sha2::{Digest as _, Sha256};

mod abi_error;
mod elf;
mod file;
mod image;
mod probe;

pub use file::{group_of, uid_of};
pub use probe::{ConfigCheck, ProbeCommand, ProbeReport, child as probe_child};

/// Why a library was refused. Every message is one line naming the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: not found")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: refused: {kind}, not a regular file")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{path}: unsafe permissions: the {what} is {bit} (mode {mode:04o})")]
    UnsafePermissions {
        path: PathBuf,
        what: &'static str,
        bit: &'static str,
        mode: u32,
    },
    #[error("{path}: owned by {owner}, who is not trusted (trusted: {trusted})")]
    UntrustedOwner {
        path: PathBuf,
        owner: String,
        trusted: String,
    },
    #[error("{path}: not a shared object: {reason}")]
    NotSharedObject { path: PathBuf, reason: String },
    #[error(
        "{path}: incomplete file: {size} bytes, but its section headers end at byte {expected} \
         (still being written, or truncated)"
    )]
    Incomplete {
        path: PathBuf,
        size: u64,
        expected: u64,
    },
    #[error("{path}: no plugind manifest (section {section} is missing): not a plugind plugin")]
    NoManifest {
        path: PathBuf,
        section: &'static str,
    },
    #[error("{path}: malformed manifest: {error}")]
    ManifestMalformed { path: PathBuf, error: ManifestError },
    #[error("{path}: sha256 mismatch: expected {expected}, found {found}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "{path}: incompatible plugind-api version: the daemon needs {expected}, the plugin was \
         built against {found}"
    )]
    IncompatibleApiVersion {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the probe process loading it was killed by {name} (signal {signal})")]
    ProbeCrashed {
        path: PathBuf,
        signal: i32,
        name: String,
    },
    #[error("{path}: the probe process loading it did not finish within {timeout:?}")]
    ProbeTimedOut { path: PathBuf, timeout: Duration },
    #[error("{path}: probe failed: {detail}")]
    ProbeFailed { path: PathBuf, detail: String },
    #[error("{path}: cannot load: {detail}")]
    Dlopen { path: PathBuf, detail: String },
    #[error("{path}: not a plugind plugin: {detail}")]
    NotAPlugin { path: PathBuf, detail: String },
    #[error("{path}: incompatible ABI: {detail}")]
    IncompatibleAbi { path: PathBuf, detail: String },
    #[error("{path}: the manifest section differs from the manifest the loaded code returns")]
    ManifestMismatch { path: PathBuf },
    #[error("{path}: the instance's config was rejected: {message}")]
    ConfigRejected { path: PathBuf, message: String },
    #[error("{path}: `new` failed: {message}")]
    NewFailed { path: PathBuf, message: String },
    #[error("{path}: `new` panicked: {message}")]
    NewPanicked { path: PathBuf, message: String },
    #[error("{path}: {detail}")]
    Other { path: PathBuf, detail: String },
}

/// The library files in `dir` the daemon considers: `*.so`, not hidden (editors' and
/// installers' temporary names start with a dot or end otherwise), not directories; sorted.
///
/// # Errors
/// The I/O error reading the directory.
pub fn library_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && name.ends_with(".so") && !path.is_dir()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// How to judge a library: who may own it, what its bytes must hash to, how to probe it.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Owners (uids) trusted besides the daemon's own user (`trusted_owners`).
    pub trusted_owners: Vec<u32>,
    /// The pin: refuse any other bytes. A pinned library is not probed.
    pub sha256: Option<[u8; 32]>,
    /// How to probe an unpinned library before loading it in this process; `None` loads it
    /// directly (only for callers that accept the risk, such as tests of pinned files).
    pub probe: Option<ProbeCommand>,
}

/// A file that passed every check that needs no loading: the declared verdict. Cheap to
/// clone (the bytes are shared).
#[derive(Debug, Clone)]
pub struct Checked {
    path: PathBuf,
    bytes: Arc<[u8]>,
    manifest: Manifest,
    sha256: [u8; 32],
}

/// Reads `path` and runs every check that needs no loading: file policy, ELF completeness,
/// manifest, declared API version, sha256 pin.
///
/// # Errors
/// [`LoadError`] naming the first check the file failed.
pub fn check(path: &Path, policy: &Policy) -> Result<Checked, LoadError> {
    let owners = file::Owners {
        trusted: policy.trusted_owners.clone(),
    };
    let bytes = file::read(path, &owners)?.bytes;
    let checked = Checked::from_bytes(path, bytes)?;
    checked.check_pin(policy.sha256)?;
    Ok(checked)
}

/// Checks the directory `dir` (a `plugin_dir`) and its ancestors as [`check`] checks the
/// directories above every library: not writable by group or others (sticky ancestors such
/// as `/tmp` aside), owned by root, the daemon's user or a trusted owner. A directory that
/// fails this has every file in it refused, whatever the file.
///
/// # Errors
/// [`LoadError::UnsafePermissions`] or [`LoadError::UntrustedOwner`] naming the directory,
/// [`LoadError::NotFound`] or [`LoadError::Read`].
pub fn check_dir(dir: &Path, policy: &Policy) -> Result<(), LoadError> {
    file::check_dir(
        dir,
        &file::Owners {
            trusted: policy.trusted_owners.clone(),
        },
    )
}

/// Every library file in `dir` ([`library_files`]) with its declared verdict ([`check`]),
/// in path order: the one scan of a plugin directory, for `plugind check` and the engine.
///
/// # Errors
/// The I/O error reading the directory.
pub fn scan(
    dir: &Path,
    policy: &Policy,
) -> std::io::Result<Vec<(PathBuf, Result<Checked, LoadError>)>> {
    Ok(library_files(dir)?
        .into_iter()
        .map(|path| {
            let checked = check(&path, policy);
            (path, checked)
        })
        .collect())
}

/// [`check`], then [`Checked::load`].
///
/// # Errors
/// [`LoadError`] naming the first check the file failed.
pub fn load(path: &Path, policy: &Policy) -> Result<Library, LoadError> {
    check(path, policy)?.load(policy)
}

impl Checked {
    /// Runs the checks on bytes already read (no file policy, no pin).
    ///
    /// # Errors
    /// [`LoadError`] naming the first check the bytes failed.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        elf::check(path, &bytes)?;
        let manifest = elf::manifest(path, &bytes)?;
        elf::check_api_version(path, &manifest.api_version)?;
        let sha256 = Sha256::digest(&bytes).into();
        Ok(Self {
            path: path.to_owned(),
            bytes: bytes.into(),
            manifest,
            sha256,
        })
    }

    /// The manifest read from the section.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The file the bytes were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses the bytes if `pin` is set and differs from their SHA-256.
    ///
    /// # Errors
    /// [`LoadError::DigestMismatch`] with both digests.
    pub fn check_pin(&self, pin: Option<[u8; 32]>) -> Result<(), LoadError> {
        match pin {
            Some(pin) if pin != self.sha256 => Err(LoadError::DigestMismatch {
                path: self.path.clone(),
                expected: hex::encode(pin),
                found: hex::encode(self.sha256),
            }),
            _ => Ok(()),
        }
    }

    /// SHA-256 of the bytes.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Maps the checked bytes in a probe child: the full verdict, nothing loaded here.
    ///
    /// # Errors
    /// [`LoadError::ProbeCrashed`], [`LoadError::ProbeTimedOut`], [`LoadError::ProbeFailed`],
    /// or [`LoadError::Other`] with the child's refusal.
    pub fn probe(&self, command: &ProbeCommand) -> Result<(), LoadError> {
        self.probe_configs(command, &BTreeMap::new()).map(drop)
    }

    /// [`Checked::probe`], asking the plugin in the child about each config of `configs`
    /// (instance → its `config` table as JSON) without instantiating it.
    ///
    /// # Errors
    /// As [`Checked::probe`].
    pub fn probe_configs(
        &self,
        command: &ProbeCommand,
        configs: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, ConfigCheck>, LoadError> {
        match probe::run(command, &self.path, &self.manifest, &self.bytes, configs)? {
            probe::Verdict::Accepted(checks) => Ok(checks),
            probe::Verdict::Refused(error) => Err(LoadError::Other {
                path: self.path.clone(),
                detail: format!("refused by the probe: {error}"),
            }),
        }
    }

    /// Loads the checked bytes into this process, probing them first unless pinned. Each call
    /// loads a separate copy (one per instance), from the bytes read once.
    ///
    /// # Errors
    /// [`LoadError`] from the probe, `dlopen`, the header, the ABI, the version or the
    /// manifest cross-check.
    pub fn load(&self, policy: &Policy) -> Result<Library, LoadError> {
        if policy.sha256.is_none()
            && let Some(command) = &policy.probe
        {
            // A refusal the child survived is found again here, safely, with its type.
            probe::run(
                command,
                &self.path,
                &self.manifest,
                &self.bytes,
                &BTreeMap::new(),
            )?;
        }
        let image = image::Image::load(&self.path, &self.bytes, &self.manifest)?;
        Ok(Library {
            inner: Arc::new(Loaded {
                image: Some(image),
                manifest: self.manifest.clone(),
                sha256: self.sha256,
                size: self.bytes.len() as u64,
                origin: self.path.clone(),
            }),
        })
    }
}

/// A loaded plugin library. Cheap to clone; unloaded when the last clone and the last
/// instance made from it are gone.
#[derive(Clone)]
pub struct Library {
    inner: Arc<Loaded>,
}

struct Loaded {
    // Invariant: `Some` until `Drop` or `Library::retire` takes it.
    image: Option<image::Image>,
    manifest: Manifest,
    sha256: [u8; 32],
    size: u64,
    origin: PathBuf,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("origin", &self.inner.origin)
            .field("name", &self.inner.manifest.name)
            .field("version", &self.inner.manifest.version)
            .finish()
    }
}

impl Library {
    /// The manifest (section and root module agree).
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// SHA-256 of the bytes that were loaded.
    pub fn sha256(&self) -> [u8; 32] {
        self.inner.sha256
    }

    /// Size in bytes of the loaded file.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The file it was loaded from.
    pub fn origin(&self) -> &Path {
        &self.inner.origin
    }

    /// Asks the plugin whether it accepts `config_json` (its `config` table as JSON) without
    /// instantiating it; `None` for a plugin built against plugind-api 1.0, which cannot.
    pub fn check_config(&self, config_json: &str) -> Option<Result<(), ConfigProblem>> {
        let image = self
            .inner
            .image
            .as_ref()
            .expect("a live Library holds its image");
        // SAFETY: `self` keeps the library loaded for the whole call, and the answer is
        // copied into host memory before it returns.
        unsafe { Instance::check_config(image.module, config_json) }
    }

    /// Creates one instance with its config (as JSON) and services.
    ///
    /// # Errors
    /// [`LoadError::ConfigRejected`], [`LoadError::NewFailed`] or [`LoadError::NewPanicked`]
    /// with the plugin's message.
    pub fn instantiate(
        &self,
        config_json: &str,
        host: RawHost,
    ) -> Result<PluginInstance, LoadError> {
        let image = self
            .inner
            .image
            .as_ref()
            .expect("a live Library holds its image");
        // SAFETY: the returned `PluginInstance` holds a clone of this library, and its field
        // order drops the instance before that clone, so the library outlives the instance.
        let instance = unsafe { Instance::create(image.module, config_json, host) };
        let path = self.inner.origin.clone();
        match instance {
            Ok(instance) => Ok(PluginInstance {
                instance: ManuallyDrop::new(instance),
                library: self.clone(),
            }),
            Err(CallError { kind, message }) => Err(match kind {
                CallErrorKind::Config => LoadError::ConfigRejected { path, message },
                CallErrorKind::Panic => LoadError::NewPanicked { path, message },
                CallErrorKind::Error | CallErrorKind::Unknown => {
                    LoadError::NewFailed { path, message }
                }
            }),
        }
    }
}

/// What [`Library::retire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The library left the process.
    Unloaded,
    /// It stays mapped (recorded in [`retained`]).
    Retained,
    /// Something else still holds it (an abandoned thread): it stays loaded.
    InUse,
}

impl Library {
    /// Drops this handle, unloading the library if it was the last one, and says what
    /// became of it.
    pub fn retire(self) -> Retired {
        match Arc::try_unwrap(self.inner) {
            Ok(mut loaded) => {
                let image = loaded.image.take().expect("a live Library holds its image");
                if loaded.unload(image) {
                    Retired::Unloaded
                } else {
                    Retired::Retained
                }
            }
            Err(_) => Retired::InUse,
        }
    }
}

impl Loaded {
    /// Unloads `image`; whether it left the process (if not, it is recorded as retained).
    fn unload(&self, image: image::Image) -> bool {
        if image.unload() {
            return true;
        }
        tracing::warn!(
            plugin = %self.manifest.name,
            version = %self.manifest.version,
            origin = %self.origin.display(),
            size = self.size,
            "library retained: still mapped after unload (a thread-local destructor or a \
             thread of the plugin pins it)"
        );
        RETAINED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(RetainedLibrary {
                name: self.manifest.name.clone(),
                version: self.manifest.version.clone(),
                origin: self.origin.clone(),
                size: self.size,
            });
        false
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(image) = self.image.take() {
            self.unload(image);
        }
    }
}

/// One plugin instance together with the library it came from.
#[derive(Debug)]
pub struct PluginInstance {
    // Invariant: dropped (or shut down) before `library`, which keeps its code mapped.
    instance: ManuallyDrop<Instance>,
    library: Library,
}

impl PluginInstance {
    /// Hands one delivery to the plugin.
    ///
    /// # Errors
    /// [`CallError`] when the plugin panicked or answered with an unknown outcome.
    #[inline]
    pub fn handle(&mut self, message: RawMessage) -> Result<Outcome, CallError> {
        self.instance.handle(message)
    }

    /// Runs the plugin's shutdown and frees the instance.
    ///
    /// # Errors
    /// [`CallError`] when the plugin's shutdown panicked.
    pub fn shutdown(self) -> Result<(), CallError> {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: taken exactly once; `this` is never dropped, so `Drop` does not take it
        // again. The library clone is released after the instance is gone.
        let instance = unsafe { ManuallyDrop::take(&mut this.instance) };
        let result = instance.shutdown();
        // SAFETY: read exactly once from a value that is never dropped.
        drop(unsafe { std::ptr::read(&this.library) });
        result
    }

    /// The library this instance runs.
    pub fn library(&self) -> &Library {
        &self.library
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        // SAFETY: taken exactly once, before `library` drops (it is dropped after this).
        unsafe { ManuallyDrop::drop(&mut self.instance) }
    }
}

/// A library that stayed mapped after it was unloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedLibrary {
    pub name: String,
    pub version: String,
    pub origin: PathBuf,
    pub size: u64,
}

static RETAINED: Mutex<Vec<RetainedLibrary>> = Mutex::new(Vec::new());

/// Every library that could not be unmapped since the process started.
pub fn retained() -> Vec<RetainedLibrary> {
    RETAINED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}
