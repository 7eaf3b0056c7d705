//! `LD_PRELOAD` shims written in C (`tests/shims/`), compiled with gcc once per test process
//! into the shared target dir.
//!
//! A shim interposes only the libc calls the dynamic linker resolves: the `plugind` binary
//! links libc dynamically, and SQLite's unix VFS reaches libc through a table of function
//! pointers filled by relocations, so preloading works for the ledger's files too.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    process::Command,
    sync::{Mutex, PoisonError},
};

use crate::fixtures;

/// Builds the C source `source` into `target/fixtures/<name>/lib<name>.so` (once per process;
/// each build replaces the library by a rename, so test processes building it at the same
/// time never load a half-written file) and returns that path.
///
/// # Panics
/// If gcc is missing or refuses the source (with its output).
pub fn build(name: &str, source: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let dir = fixtures::target_dir().join(name);
    fs::create_dir_all(&dir).expect("the target dir is writable");
    let pid = std::process::id();
    let c_file = dir.join(format!("{name}.{pid}.c"));
    let so_file = dir.join(format!("lib{name}.so.{pid}"));
    fs::write(&c_file, source).expect("the target dir is writable");
    let out = Command::new("gcc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&so_file)
        .arg(&c_file)
        .args(["-ldl", "-lpthread"])
        .output();
    let _ = fs::remove_file(&c_file);
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "gcc cannot build the {name} shim:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("this machine has no working gcc to build the {name} shim: {e}"),
    }
    let path = dir.join(format!("lib{name}.so"));
    fs::rename(&so_file, &path).expect("the target dir is writable");
    built.insert(name.to_owned(), path.clone());
    path
}
