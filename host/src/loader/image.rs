//! A library mapped into the process from a sealed memfd: staging the checked bytes,
//! `dlopen`, initialising the root module, and unloading (or retaining) it.
//!
//! The memfd's path string `/proc/self/fd/N` is the library's identity in glibc's link map:
//! while the library is mapped, the fd number must never be reused, or `dlopen` of a new
//! memfd that got the same number would silently return the old library. So the fd stays
//! open until `dlclose` really unmapped the library, and forever if it did not.

use std::{
    ffi::{CStr, CString, c_int, c_void},
    fs::File,
    io::Write as _,
    mem::ManuallyDrop,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use abi_stable::{
    StableAbi,
    abi_stability::abi_checking::{CheckingGlobals, check_layout_compatibility_with_globals},
    library::{
        AbiHeaderRef, LibraryError, ROOT_MODULE_LOADER_NAME, ROOT_MODULE_LOADER_NAME_WITH_NUL,
    },
};
use plugind_api::{abi::PluginModRef, manifest::Manifest};

use super::{LoadError, abi_error};

/// A library mapped from a sealed memfd, with its initialised root module.
pub(super) struct Image {
    pub(super) module: PluginModRef,
    /// The name glibc knows it by (`/proc/self/fd/N`).
    link_name: String,
    // Invariant: `lib` is closed (or the image retained) before `memfd` may be closed.
    lib: ManuallyDrop<libloading::os::unix::Library>,
    memfd: ManuallyDrop<OwnedFd>,
}

impl Image {
    /// Maps `bytes` (already checked) and initialises the root module: layout checked
    /// against a fresh `CheckingGlobals`, then the version check, then the manifest
    /// cross-check against `manifest` (what the section said).
    pub(super) fn load(path: &Path, bytes: &[u8], manifest: &Manifest) -> Result<Self, LoadError> {
        let memfd = sealed_memfd(manifest, bytes).map_err(|e| LoadError::Other {
            path: path.to_owned(),
            detail: format!("cannot stage the library in memory: {e}"),
        })?;
        Self::open(path, memfd, manifest)
    }

    fn open(path: &Path, memfd: OwnedFd, manifest: &Manifest) -> Result<Self, LoadError> {
        let link_name = format!("/proc/self/fd/{}", memfd.as_raw_fd());
        // SAFETY: loading runs the library's constructors. The bytes passed the file, ELF and
        // manifest checks, and a library without a sha256 pin was first loaded by a probe
        // child; a library with one is what the operator vouched for.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&link_name),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        };
        let lib = match lib {
            Ok(lib) => lib,
            Err(e) => {
                // Nothing was mapped, so the fd may be closed.
                drop(memfd);
                return Err(LoadError::Dlopen {
                    path: path.to_owned(),
                    detail: libloading_detail(&e),
                });
            }
        };
        let module = match init_root_module(path, &lib) {
            Ok(module) => module,
            Err(e) => {
                unload(lib, memfd, &link_name);
                return Err(e);
            }
        };
        let image = Self {
            module,
            link_name,
            lib: ManuallyDrop::new(lib),
            memfd: ManuallyDrop::new(memfd),
        };
        // From here on, dropping `image` unloads the library.
        let returned = (image.module.manifest())().as_slice();
        let same = Manifest::encoded_len_of(returned) == Some(returned.len())
            && Manifest::decode(returned).as_ref() == Ok(manifest);
        if !same {
            return Err(LoadError::ManifestMismatch {
                path: path.to_owned(),
            });
        }
        Ok(image)
    }

    /// Closes the library; returns whether it really left the process.
    pub(super) fn unload(mut self) -> bool {
        // SAFETY: `lib` and `memfd` are taken exactly once, here, and `self` is forgotten
        // right after so `Drop` does not take them again.
        let (lib, memfd) = unsafe {
            (
                ManuallyDrop::take(&mut self.lib),
                ManuallyDrop::take(&mut self.memfd),
            )
        };
        let link_name = std::mem::take(&mut self.link_name);
        std::mem::forget(self);
        unload(lib, memfd, &link_name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: `lib` and `memfd` are taken exactly once, here (`unload` forgets `self`).
        let (lib, memfd) = unsafe {
            (
                ManuallyDrop::take(&mut self.lib),
                ManuallyDrop::take(&mut self.memfd),
            )
        };
        unload(lib, memfd, &self.link_name);
    }
}

/// Closes `lib`; returns whether it really left the process. If it is still in the link map
/// the memfd is kept open for good (see the module docs).
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
            "it exports no plugind root module (symbol {ROOT_MODULE_LOADER_NAME} not found: {})",
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
    let ours = <PluginModRef as StableAbi>::LAYOUT;
    check_layout_compatibility_with_globals(ours, layout, &CheckingGlobals::new())
        .or_else(|newer_plugin_check| {
            // abi_stable lets the library's prefix types have more fields than ours (a
            // plugin built against a later 1.x), never fewer. A plugin built against an
            // earlier 1.x has fewer (1.1 appended to `PluginMod`, `HostVTable` and
            // `MessageVTable`): checked the other way round, every common field must still
            // match exactly, and every accessor of a field it lacks returns `None`, which
            // the host reads as "an older plugin" (the evolution rule in plugind-api's
            // `abi`). A layout that differs otherwise fails both ways and is refused with
            // the first check's words.
            check_layout_compatibility_with_globals(layout, ours, &CheckingGlobals::new())
                .map_err(|_| newer_plugin_check)
        })
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

/// Copies `bytes` into a new memfd and seals it against every change.
pub(super) fn sealed_memfd(manifest: &Manifest, bytes: &[u8]) -> std::io::Result<OwnedFd> {
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
