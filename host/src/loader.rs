//! Turns a plugin library file into callable plugin code: the only module that calls into
//! `libloading` and abi_stable's loading machinery.
//!
//! The path from file to code (DESIGN.md §9, `research/native-plugins.md`):
//! 1. read the file once into memory; every check runs on those bytes;
//! 2. check the ELF is a complete shared object (a truncated one can kill the process inside
//!    `dlopen`) and decode the manifest section without running anything;
//! 3. copy the bytes into a sealed memfd and `dlopen("/proc/self/fd/N")`, so what is mapped is
//!    exactly what was checked, a file replaced on disk can neither crash nor fool us, and two
//!    versions of one plugin load side by side;
//! 4. look up abi_stable's library header, check the layout of the root module against a
//!    fresh `CheckingGlobals` (the global one keeps pointers into unloaded libraries), then
//!    initialise it with the version check only, and compare the root module's manifest with
//!    the section.
//!
//! Lifetime: a [`Library`] is an `Arc` around the loaded object; every [`PluginInstance`]
//! holds one, so the library is closed only when nothing from it remains. If it is still
//! mapped after `dlclose` (thread-local destructors, leftover threads) it is *retained*: its
//! memfd stays open for good (glibc identifies it by the `/proc/self/fd/N` string, so the
//! number must never be reused) and it is counted in [`retained`].

use std::{
    ffi::{CStr, CString, c_int, c_void},
    fmt,
    fs::File,
    io::Write as _,
    mem::ManuallyDrop,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use abi_stable::{
    StableAbi,
    abi_stability::abi_checking::{CheckingGlobals, check_layout_compatibility_with_globals},
    library::{AbiHeaderRef, LibraryError, ROOT_MODULE_LOADER_NAME_WITH_NUL},
};
use object::{Object as _, ObjectSection as _};
use plugind_api::{
    Outcome,
    abi::{PluginModRef, RawHost, RawMessage},
    hosting::{CallError, Instance},
    manifest::{self, Manifest, ManifestError},
};
use sha2::{Digest as _, Sha256};

mod abi_error;

/// Why a library was refused. Every message is one line naming the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
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
    #[error("{path}: cannot load: {detail}")]
    Dlopen { path: PathBuf, detail: String },
    #[error("{path}: not a plugind plugin: {detail}")]
    NotAPlugin { path: PathBuf, detail: String },
    #[error("{path}: incompatible ABI: {detail}")]
    IncompatibleAbi { path: PathBuf, detail: String },
    #[error(
        "{path}: incompatible plugind-api version: the daemon needs {expected}, the plugin was \
         built against {found}"
    )]
    IncompatibleApiVersion {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the manifest section differs from the manifest the loaded code returns")]
    ManifestMismatch { path: PathBuf },
    #[error("{path}: {detail}")]
    Other { path: PathBuf, detail: String },
}

/// A loaded plugin library. Cheap to clone; closed when the last clone and the last
/// instance made from it are gone.
#[derive(Clone)]
pub struct Library {
    inner: Arc<Loaded>,
}

/// The loaded object and what was learnt about it.
struct Loaded {
    module: PluginModRef,
    manifest: Manifest,
    sha256: [u8; 32],
    size: u64,
    origin: PathBuf,
    /// The name glibc knows it by (`/proc/self/fd/N`).
    link_name: String,
    // Invariant: `lib` is closed (or retained) in `Drop` before `memfd` may be closed.
    lib: ManuallyDrop<libloading::os::unix::Library>,
    memfd: ManuallyDrop<OwnedFd>,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("origin", &self.inner.origin)
            .field("name", &self.inner.manifest.name)
            .field("version", &self.inner.manifest.version)
            .field("link_name", &self.inner.link_name)
            .finish()
    }
}

impl Library {
    /// Loads the library at `path` (see the module docs for every step).
    ///
    /// # Errors
    /// [`LoadError`] naming the first check the file failed.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let checked = Checked::inspect(path, bytes)?;
        checked.load()
    }

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

    /// Creates one instance with its config (as JSON) and services.
    ///
    /// # Errors
    /// [`CallError`] with the plugin's config error, `new` error or panic text.
    pub fn instantiate(
        &self,
        config_json: &str,
        host: RawHost,
    ) -> Result<PluginInstance, CallError> {
        // SAFETY: the returned `PluginInstance` holds a clone of this library, and its field
        // order drops the instance before that clone, so the library outlives the instance.
        let instance = unsafe { Instance::create(self.inner.module, config_json, host) }?;
        Ok(PluginInstance {
            instance: Some(instance),
            library: self.clone(),
        })
    }
}

/// One plugin instance together with the library it came from.
#[derive(Debug)]
pub struct PluginInstance {
    // Invariant: declared before `library`, so it is dropped first.
    instance: Option<Instance>,
    library: Library,
}

impl PluginInstance {
    /// Hands one delivery to the plugin.
    ///
    /// # Errors
    /// [`CallError`] when the plugin panicked or answered with an unknown outcome.
    #[inline]
    pub fn handle(&mut self, message: RawMessage) -> Result<Outcome, CallError> {
        self.instance
            .as_mut()
            .expect("a PluginInstance holds its instance until shutdown consumes it")
            .handle(message)
    }

    /// Runs the plugin's shutdown and frees the instance.
    ///
    /// # Errors
    /// [`CallError`] when the plugin's shutdown panicked.
    pub fn shutdown(mut self) -> Result<(), CallError> {
        self.instance
            .take()
            .expect("a PluginInstance holds its instance until shutdown consumes it")
            .shutdown()
    }

    /// The library this instance runs.
    pub fn library(&self) -> &Library {
        &self.library
    }
}

/// A file's bytes that passed every check that needs no loading.
#[derive(Debug)]
pub struct Checked {
    path: PathBuf,
    bytes: Vec<u8>,
    manifest: Manifest,
    sha256: [u8; 32],
}

impl Checked {
    /// Runs every check on `bytes` that needs no loading: a complete ELF shared object with a
    /// valid manifest section.
    ///
    /// # Errors
    /// [`LoadError`] naming the first check that failed.
    pub fn inspect(path: &Path, bytes: Vec<u8>) -> Result<Self, LoadError> {
        check_elf(path, &bytes)?;
        let manifest = read_manifest(path, &bytes)?;
        let sha256 = Sha256::digest(&bytes).into();
        Ok(Self {
            path: path.to_owned(),
            bytes,
            manifest,
            sha256,
        })
    }

    /// The manifest read from the section.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the bytes.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// Loads the checked bytes from a sealed memfd.
    ///
    /// # Errors
    /// [`LoadError`] when `dlopen`, the header, the ABI, the version or the manifest
    /// cross-check fails.
    pub fn load(self) -> Result<Library, LoadError> {
        let path = self.path;
        let other = |detail: String| LoadError::Other {
            path: path.clone(),
            detail,
        };
        let memfd = sealed_memfd(&self.manifest, &self.bytes)
            .map_err(|e| other(format!("cannot stage the library in memory: {e}")))?;
        let link_name = format!("/proc/self/fd/{}", memfd.as_raw_fd());
        // SAFETY: loading runs the library's constructors. The bytes passed the ELF and
        // manifest checks; unpinned libraries are probe-loaded in a child first (loader
        // hardening), so a constructor that crashes cannot reach this point unnoticed.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&link_name),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|e| LoadError::Dlopen {
            path: path.clone(),
            detail: libloading_detail(&e),
        });
        let lib = match lib {
            Ok(lib) => lib,
            Err(e) => {
                // Nothing was mapped, so the fd may be closed.
                drop(memfd);
                return Err(e);
            }
        };
        let module = match init_root_module(&path, &lib) {
            Ok(module) => module,
            Err(e) => {
                unload(lib, memfd, &link_name);
                return Err(e);
            }
        };
        let loaded = Loaded {
            module,
            manifest: self.manifest,
            sha256: self.sha256,
            size: self.bytes.len() as u64,
            origin: path.clone(),
            link_name,
            lib: ManuallyDrop::new(lib),
            memfd: ManuallyDrop::new(memfd),
        };
        // From here on, dropping `loaded` unloads the library.
        let returned = (loaded.module.manifest())().as_slice();
        let same = Manifest::encoded_len_of(returned) == Some(returned.len())
            && Manifest::decode(returned).as_ref() == Ok(&loaded.manifest);
        if !same {
            return Err(LoadError::ManifestMismatch { path });
        }
        Ok(Library {
            inner: Arc::new(loaded),
        })
    }
}

fn init_root_module(
    path: &Path,
    lib: &libloading::os::unix::Library,
) -> Result<PluginModRef, LoadError> {
    // SAFETY: the symbol is abi_stable's library header, an `AbiHeaderRef`-typed static; its
    // validity is checked by `upgrade` before anything else is read.
    let header: AbiHeaderRef = unsafe {
        lib.get::<AbiHeaderRef>(ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes())
            .map(|symbol| *symbol)
    }
    .map_err(|e| LoadError::NotAPlugin {
        path: path.to_owned(),
        detail: format!(
            "it exports no plugind root module (symbol {} not found: {})",
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            libloading_detail(&e)
        ),
    })?;
    let header = header.upgrade().map_err(|e| library_error(path, e))?;
    let layout = header.layout().ok_or_else(|| LoadError::IncompatibleAbi {
        path: path.to_owned(),
        detail: "the library carries no type layout to check".to_owned(),
    })?;
    // A fresh checker per library: the process-global one keeps pointers into libraries
    // that may be unloaded later, and the next check through it would crash.
    check_layout_compatibility_with_globals(
        <PluginModRef as StableAbi>::LAYOUT,
        layout,
        &CheckingGlobals::new(),
    )
    .map_err(|e| LoadError::IncompatibleAbi {
        path: path.to_owned(),
        detail: abi_error::summarize(&e.to_string()),
    })?;
    // SAFETY: the layout was checked just above against a fresh checker; this still checks
    // the package name and version.
    unsafe { header.init_root_module_with_unchecked_layout::<PluginModRef>() }
        .map_err(|e| library_error(path, e))
}

fn library_error(path: &Path, e: LibraryError) -> LoadError {
    let path = path.to_owned();
    match e {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::IncompatibleApiVersion {
            path,
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
        },
        LibraryError::AbiInstability(e) => LoadError::IncompatibleAbi {
            path,
            detail: abi_error::summarize(&e.to_string()),
        },
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            LoadError::IncompatibleAbi {
                path,
                detail: one_line(&e.to_string()),
            }
        }
        other => LoadError::NotAPlugin {
            path,
            detail: one_line(&other.to_string()),
        },
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn libloading_detail(e: &libloading::Error) -> String {
    // libloading's Display is only "dlopen failed"; the reason is in the source.
    match std::error::Error::source(e) {
        Some(source) => one_line(&source.to_string()),
        None => one_line(&format!("{e:?}")),
    }
}

const ET_DYN: u16 = 3;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;

/// Checks that `bytes` are a complete little-endian 64-bit ELF shared object: `dlopen` of a
/// truncated one dies with SIGBUS instead of returning an error.
fn check_elf(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    let refuse = |reason: &str| LoadError::NotSharedObject {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 64 || bytes[..4] != *b"\x7fELF" {
        return Err(refuse("no ELF header"));
    }
    if bytes[4] != ELFCLASS64 || bytes[5] != ELFDATA2LSB {
        return Err(refuse("not a 64-bit little-endian ELF file"));
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| {
        u64::from_le_bytes(
            bytes[at..at + 8]
                .try_into()
                .expect("an 8-byte slice converts to [u8; 8]"),
        )
    };
    if u16_at(16) != ET_DYN {
        return Err(refuse("an ELF file that is not a shared library"));
    }
    let machine = u16_at(18);
    if machine != HOST_MACHINE {
        return Err(refuse(&format!(
            "built for ELF machine {machine}, this daemon runs on {HOST_MACHINE}"
        )));
    }
    let shoff = u64_at(40);
    let shentsize = u64::from(u16_at(58));
    let shnum = u64::from(u16_at(60));
    let expected = shoff.saturating_add(shentsize.saturating_mul(shnum));
    let size = bytes.len() as u64;
    if shoff == 0 || expected != size {
        return Err(LoadError::Incomplete {
            path: path.to_owned(),
            size,
            expected,
        });
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
const HOST_MACHINE: u16 = 62;
#[cfg(target_arch = "aarch64")]
const HOST_MACHINE: u16 = 183;

fn read_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, LoadError> {
    let file = object::File::parse(bytes).map_err(|e| LoadError::NotSharedObject {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let section = file
        .section_by_name(manifest::SECTION_NAME)
        .ok_or(LoadError::NoManifest {
            path: path.to_owned(),
            section: manifest::SECTION_NAME,
        })?;
    let data = section.data().map_err(|e| LoadError::ManifestMalformed {
        path: path.to_owned(),
        error: ManifestError::Json(e.to_string()),
    })?;
    Manifest::decode(data).map_err(|error| LoadError::ManifestMalformed {
        path: path.to_owned(),
        error,
    })
}

/// Copies `bytes` into a new memfd and seals it against every change.
fn sealed_memfd(manifest: &Manifest, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // The name shows in /proc/self/maps and crash dumps; keep it printable and short.
    let label: String = format!("plugind-{}-{}-{seq}", manifest.name, manifest.version)
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(200)
        .collect();
    let name = CString::new(label).expect("the label has no NUL: non-graphic chars were replaced");
    // SAFETY: `name` is a valid C string; the flags are valid memfd_create flags.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // `write`, not `mmap`: a writable mapping would make F_SEAL_WRITE fail with EBUSY.
    File::from(fd.try_clone()?).write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: `fd` is a live memfd created with MFD_ALLOW_SEALING.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// A library that stayed mapped after it was closed.
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

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: `lib` and `memfd` are taken exactly once, here. Nothing from the library
        // remains: every instance holds a `Library` clone, so the last one is gone.
        let (lib, memfd) = unsafe {
            (
                ManuallyDrop::take(&mut self.lib),
                ManuallyDrop::take(&mut self.memfd),
            )
        };
        if unload(lib, memfd, &self.link_name) {
            return;
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
    }
}

/// Closes `lib`; returns whether it really left the process. If it is still in the link map,
/// glibc would hand it out again for the same `/proc/self/fd/N` string, so the fd number must
/// never be reused: the memfd is then kept open for good.
fn unload(lib: libloading::os::unix::Library, memfd: OwnedFd, link_name: &str) -> bool {
    let closed = lib.close();
    if closed.is_ok() && !is_mapped(link_name) {
        drop(memfd);
        true
    } else {
        std::mem::forget(memfd);
        false
    }
}

/// Whether the dynamic linker still lists an object named `name`.
fn is_mapped(name: &str) -> bool {
    struct Search<'a> {
        name: &'a [u8],
        found: bool,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Search` passed below, alive for the whole iteration.
        let search = unsafe { &mut *data.cast::<Search<'_>>() };
        // SAFETY: glibc passes a valid `dl_phdr_info` for the duration of the callback.
        let name_ptr = unsafe { (*info).dlpi_name };
        if !name_ptr.is_null() {
            // SAFETY: `dlpi_name` is a NUL-terminated string owned by the linker.
            let entry = unsafe { CStr::from_ptr(name_ptr) };
            if entry.to_bytes() == search.name {
                search.found = true;
                return 1;
            }
        }
        0
    }
    let mut search = Search {
        name: name.as_bytes(),
        found: false,
    };
    // SAFETY: `visit` matches the callback signature and only reads what it is given.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search<'_>).cast()) };
    search.found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_file_is_not_a_shared_object() {
        let e = check_elf(Path::new("x.so"), b"hello").unwrap_err();
        assert!(matches!(e, LoadError::NotSharedObject { .. }), "{e}");
    }

    #[test]
    fn a_file_cut_by_one_byte_is_incomplete() {
        // The test executable itself is a complete ELF file: cutting it must be detected.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let cut = &me[..me.len() - 1];
        // Rust links test binaries as PIE, which are ET_DYN like a shared library.
        match check_elf(Path::new("cut"), cut) {
            Err(LoadError::Incomplete { size, expected, .. }) => assert_eq!(size + 1, expected),
            other => panic!("a truncated file passed or failed otherwise: {other:?}"),
        }
    }
}
