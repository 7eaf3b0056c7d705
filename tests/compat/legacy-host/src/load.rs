//! Loading a plugin library the way the daemon's loader did at plugind-api 1.0.0
//! (`host/src/loader/image.rs`), minus the file checks and the memfd: libloading, abi_stable's
//! library header, `AbiHeaderRef::upgrade`, the layout check against a fresh
//! `CheckingGlobals`, then the root module's init with its version check.

use std::path::Path;

use abi_stable::{
    StableAbi,
    abi_stability::abi_checking::{CheckingGlobals, check_layout_compatibility_with_globals},
    library::{AbiHeaderRef, ROOT_MODULE_LOADER_NAME_WITH_NUL},
};
use plugind_api::abi::PluginModRef;

/// Why a library was refused, and at which step.
#[derive(Debug)]
pub(crate) struct LoadFailure {
    pub(crate) stage: &'static str,
    pub(crate) message: String,
}

fn failure(stage: &'static str, message: impl ToString) -> LoadFailure {
    LoadFailure {
        stage,
        message: one_line(&message.to_string()),
    }
}

/// abi_stable's layout report (both layouts in full, hundreds of lines) cut down to its
/// `Error:` entries: `too many fields (expected 3, found 2)`.
fn summarize(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let mut kinds: Vec<String> = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(kind) = line.strip_prefix("Error:") else {
            continue;
        };
        let entry = match lines.get(at + 1..at + 5) {
            Some(["Expected:", expected, "Found:", found]) => {
                format!("{} (expected {expected}, found {found})", kind.trim())
            }
            _ => kind.trim().to_owned(),
        };
        if !kinds.contains(&entry) {
            kinds.push(entry);
        }
    }
    if kinds.is_empty() {
        report.to_owned()
    } else {
        kinds.join("; ")
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Loads `path` and returns its checked root module. The library is never closed: this
/// process ends after one plugin, and whatever came from it must stay mapped until then.
///
/// # Errors
/// [`LoadFailure`] naming the step that refused it.
pub(crate) fn load(path: &Path) -> Result<PluginModRef, LoadFailure> {
    // SAFETY: loading runs the library's constructors; the caller chose the file, as an
    // operator who installs a plugin does (this host is a test tool, not the daemon).
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| {
        failure(
            "dlopen",
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
        )
    })?;
    // SAFETY: the symbol is abi_stable's library header, an `AbiHeaderRef`-typed static; its
    // validity is checked by `upgrade` before anything else is read.
    let header: AbiHeaderRef = unsafe {
        lib.get::<AbiHeaderRef>(ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes())
            .map(|symbol| *symbol)
    }
    .map_err(|e| failure("symbol", e))?;
    let header = header.upgrade().map_err(|e| failure("header", e))?;
    let layout = header
        .layout()
        .ok_or_else(|| failure("layout", "the library carries no type layout to check"))?;
    // A fresh checker, as the daemon does: never abi_stable's process-global one.
    check_layout_compatibility_with_globals(
        <PluginModRef as StableAbi>::LAYOUT,
        layout,
        &CheckingGlobals::new(),
    )
    .map_err(|e| failure("layout", summarize(&e.to_string())))?;
    // SAFETY: the layout was checked just above; this checks the package name and version.
    let module = unsafe { header.init_root_module_with_unchecked_layout::<PluginModRef>() }
        .map_err(|e| failure("init", e))?;
    // Everything from the library (the module, its instances, its strings) lives until exit.
    std::mem::forget(lib);
    Ok(module)
}
