//! The real `plugind` binary, built once per test process (a no-op when it is current):
//! the debug build for tests, the release build for benchmarks.

use std::{path::PathBuf, process::Command, sync::OnceLock};

use crate::fixtures::repo_root;

/// The path of `target/debug/plugind`, built from the workspace.
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn plugind() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build(false)).clone()
}

/// The path of `target/release/plugind`, built from the workspace (for benchmarks).
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn plugind_release() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build(true)).clone()
}

/// The library of the example plugin `package` (`"file-sink"`, `"transform"`, `"bench"`,
/// `"webhook"`), as
/// `cargo test --workspace` builds it (its cdylib, debug build), built once per process.
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn example_plugin(package: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(repo_root())
            .args([
                "build",
                "--quiet",
                "-p",
                "file-sink",
                "-p",
                "transform",
                "-p",
                "bench",
                "-p",
                "webhook",
            ])
            .output()
            .expect("cargo runs");
        assert!(
            output.status.success(),
            "building the example plugins failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from)
        .join("debug")
        .join(format!("lib{}.so", package.replace('-', "_")))
}

/// The release build of example plugin `package`, built once per process (for benchmarks).
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn example_plugin_release(package: &str) -> PathBuf {
    let output = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(repo_root())
        .args(["build", "--quiet", "--release", "-p", package])
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building {package} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from)
        .join("release")
        .join(format!("lib{}.so", package.replace('-', "_")))
}

fn build(release: bool) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(repo_root()).args([
        "build",
        "--quiet",
        "--package",
        "plugind",
        "--bin",
        "plugind",
    ]);
    if release {
        command.arg("--release");
    }
    let output = command.output().expect("cargo runs");
    assert!(
        output.status.success(),
        "building plugind failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    target
        .join(if release { "release" } else { "debug" })
        .join("plugind")
}
