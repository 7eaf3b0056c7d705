//! `LD_PRELOAD` shims written in C (`tests/shims/`) and small C programs (`tests/programs/`),
//! compiled with gcc once per test process into the shared target dir.
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
    compile(
        name,
        source,
        &format!("lib{name}.so"),
        &["-shared", "-fPIC"],
    )
}

/// Builds the C source `source` into the program `target/fixtures/<name>/<name>` (once per
/// process, replaced by a rename as [`build`] does) and returns its path.
///
/// # Panics
/// If gcc is missing or refuses the source (with its output).
pub fn build_program(name: &str, source: &str) -> PathBuf {
    compile(name, source, name, &[])
}

/// Builds a shared library from `source` with extra linker flags (`-z execstack`, say).
///
/// # Panics
/// As [`build`].
pub fn build_with(name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let mut args = vec!["-shared", "-fPIC"];
    args.extend_from_slice(flags);
    compile(name, source, &format!("lib{name}.so"), &args)
}

fn compile(name: &str, source: &str, output: &str, flags: &[&str]) -> PathBuf {
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
    let temp = dir.join(format!("{output}.{pid}"));
    fs::write(&c_file, source).expect("the target dir is writable");
    let out = Command::new("gcc")
        .args(flags)
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&temp)
        .arg(&c_file)
        .args(["-ldl", "-lpthread"])
        .output();
    let _ = fs::remove_file(&c_file);
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "gcc cannot build {name}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("this machine has no working gcc to build {name}: {e}"),
    }
    let path = dir.join(output);
    fs::rename(&temp, &path).expect("the target dir is writable");
    built.insert(name.to_owned(), path.clone());
    path
}
