//! Builds the fixture plugins of `tests/fixtures/` (once per process, cargo makes repeated
//! builds no-ops) and returns the paths of the built libraries.
//!
//! Everything is built into one shared target dir, `target/fixtures`, so the fixture crates
//! and their dependencies compile once for every test binary and for CI.
//!
//! Two fixtures need a *different* `plugind-api`: abi_stable compares package names, so a
//! renamed copy would only ever produce a package-name error. They are built against copies
//! of `plugin-api/` generated here, still named `plugind-api`, each with one deliberate edit
//! (see [`Variant`]). Generating the copies keeps them identical to the real crate except for
//! that edit; if the edit's anchor text disappears from the real crate, the build panics
//! saying so.
//!
//! The compatibility workspaces of `tests/compat/` — the frozen plugind-api 1.0.0 source and
//! what is built against it — go into the same target dir: [`legacy_plugin`], [`legacy_host`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the repository root")
        .to_owned()
}

/// The shared target dir of every fixture build.
pub fn target_dir() -> PathBuf {
    repo_root().join("target").join("fixtures")
}

/// A cargo profile the fixtures are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// The dev profile: fast to build, what most tests load.
    Dev,
    /// Optimised, for benchmarks.
    Release,
    /// `lto = "fat"`, `strip = true`, `opt-level = "z"`: the manifest must survive it.
    Tiny,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Release => "release",
            Self::Tiny => "tiny",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Dev => "debug",
            Self::Release => "release",
            Self::Tiny => "tiny",
        }
    }
}

/// The library file of fixture crate `name` (e.g. `"fx-echo"`) built with `profile`.
///
/// The path is cargo's output in the shared target dir: a build of the fixtures by another
/// process (any test binary of this checkout, after a source change) re-links it, unlink
/// then link, so for a moment there is no file, then maybe other bytes. A test that opens
/// it again and again over a long span loads a copy of its own instead ([`Sandbox::copy`]).
///
/// [`Sandbox::copy`]: crate::sandbox::Sandbox::copy
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn library(name: &str, profile: Profile) -> PathBuf {
    build_workspace(profile);
    let path = target_dir()
        .join(profile.dir())
        .join(format!("lib{}.so", name.replace('-', "_")));
    assert!(
        path.exists(),
        "fixture {name} was built but {} is missing",
        path.display()
    );
    path
}

fn build_workspace(profile: Profile) {
    static BUILT: Mutex<Vec<Profile>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if built.contains(&profile) {
        return;
    }
    cargo_build(&repo_root().join("tests/fixtures/Cargo.toml"), profile);
    built.push(profile);
}

fn cargo_build(manifest: &Path, profile: Profile) {
    let output = cargo_build_command(manifest, profile.name())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building the fixtures of {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn cargo_build_command(manifest: &Path, profile: &str) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--profile")
        .arg(profile)
        .arg("--target-dir")
        .arg(target_dir())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
}

/// Builds fixture crate `package` with the fixture workspace's profile `profile` and returns
/// cargo's output, success or not (for builds that must fail).
pub fn try_build(package: &str, profile: &str) -> std::process::Output {
    cargo_build_command(&repo_root().join("tests/fixtures/Cargo.toml"), profile)
        .arg("--package")
        .arg(package)
        .output()
        .expect("cargo runs")
}

/// A fixture built against a modified copy of `plugind-api`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `LogLevel` widened from `u8` to `u16`: the log entry points of the host vtable change
    /// signature, so the layout check must refuse it, naming the type.
    Incompatible,
    /// Version 1.2.0 with a field appended to the root module after the last one 1.1 has:
    /// the supported way to extend the ABI, so it must load.
    AppendedField,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Incompatible => "abi-incompatible",
            Self::AppendedField => "abi-appended",
        }
    }

    /// `(file under plugin-api/, anchor text, replacement)` edits and the copy's version.
    fn edits(
        self,
    ) -> (
        &'static str,
        Vec<(&'static str, &'static str, &'static str)>,
    ) {
        match self {
            Self::Incompatible => (
                "1.1.0",
                vec![(
                    "src/abi.rs",
                    "pub struct LogLevel(pub u8);",
                    "pub struct LogLevel(pub u16);",
                )],
            ),
            Self::AppendedField => (
                "1.2.0",
                vec![
                    (
                        "src/abi.rs",
                        "    pub check_config: extern \"C\" fn(config_json: RStr<'_>) -> RResult<(), ConfigError>,\n}",
                        "    pub check_config: extern \"C\" fn(config_json: RStr<'_>) -> RResult<(), ConfigError>,\n    /// Appended by the test fixture: a later addition.\n    pub fixture_extra: extern \"C\" fn() -> u32,\n}",
                    ),
                    (
                        "src/export.rs",
                        "        check_config: Entry::<P>::check_config,\n",
                        "        check_config: Entry::<P>::check_config,\n        fixture_extra: {\n            extern \"C\" fn extra() -> u32 {\n                42\n            }\n            extra\n        },\n",
                    ),
                ],
            ),
        }
    }
}

/// The library of the variant fixture `variant`, built with the dev profile. Like
/// [`library`], cargo's output, which a build by another process re-links.
///
/// # Panics
/// If an edit's anchor is missing from `plugin-api/` or the build fails.
pub fn variant(variant: Variant) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<Variant>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    let crate_name = format!("fx-{}", variant.name());
    let dir = target_dir().join("variants").join(variant.name());
    if !built.contains(&variant) {
        generate_variant(variant, &dir, &crate_name);
        cargo_build(&dir.join("Cargo.toml"), Profile::Dev);
        built.push(variant);
    }
    target_dir()
        .join("debug")
        .join(format!("lib{}.so", crate_name.replace('-', "_")))
}

fn generate_variant(variant: Variant, dir: &Path, crate_name: &str) {
    let root = repo_root();
    let api_src = root.join("plugin-api");
    let api_dst = dir.join("api");
    let (version, edits) = variant.edits();
    let mut sources = read_tree(&api_src.join("src"), Path::new("src"));
    for (file, anchor, replacement) in edits {
        let text = sources
            .iter_mut()
            .find(|(path, _)| path == Path::new(file))
            .map(|(_, text)| text)
            .unwrap_or_else(|| {
                panic!(
                    "fixture variant {}: plugin-api/{file} is gone",
                    variant.name()
                )
            });
        assert!(
            text.contains(anchor),
            "fixture variant {}: anchor not found in plugin-api/{file}; update \
             tests/src/fixtures.rs to the new source:\n{anchor}",
            variant.name()
        );
        *text = text.replacen(anchor, replacement, 1);
    }
    for (path, text) in &sources {
        write_if_changed(&api_dst.join(path), text);
    }
    // The copy's manifest: the real crate's dependencies, with workspace inheritance resolved.
    write_if_changed(
        &api_dst.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"plugind-api\"\nversion = \"{version}\"\nedition = \"2024\"\n\n\
             [lib]\nname = \"plugind_api\"\n\n[dependencies]\n\
             abi_stable = {{ version = \"0.11.3\", default-features = false }}\n\
             serde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\
             serde_path_to_error = \"0.1\"\n\
             tracing = {{ version = \"0.1\", default-features = false, features = [\"std\"] }}\n"
        ),
    );
    let fixture = root.join("tests/fixtures/fx-variant");
    write_if_changed(
        &dir.join("Cargo.toml"),
        &fs::read_to_string(fixture.join("Cargo.toml.in")).expect("the variant template exists"),
    );
    for (path, text) in read_tree(&fixture.join("src"), Path::new("src")) {
        write_if_changed(&dir.join("plugin").join(path), &text);
    }
    write_if_changed(
        &dir.join("plugin/Cargo.toml"),
        &format!(
            "[package]\nname = \"{crate_name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nplugind-api.workspace = true\n\
             serde = \"1\"\n"
        ),
    );
    // Reuse the fixture workspace's lock file so the copies build with the same versions.
    let lock = root.join("tests/fixtures/Cargo.lock");
    if lock.exists() && !dir.join("Cargo.lock").exists() {
        fs::copy(&lock, dir.join("Cargo.lock")).expect("the lock file copies");
    }
}

/// Every file below `dir` as (path under `prefix`, content).
fn read_tree(dir: &Path, prefix: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("the source dir is readable") {
        let entry = entry.expect("the source dir is readable");
        let relative = prefix.join(entry.file_name());
        if entry.file_type().expect("file type is readable").is_dir() {
            files.extend(read_tree(&entry.path(), &relative));
        } else {
            let text = fs::read_to_string(entry.path()).expect("sources are UTF-8");
            files.push((relative, text));
        }
    }
    files
}

/// Writes only when the content changed, so cargo sees unchanged mtimes and does not rebuild.
fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).ok().as_deref() == Some(text) {
        return;
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("the variant dir can be created");
    }
    fs::write(path, text).expect("the variant dir is writable");
}

/// Which build of `fx-swap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapBuild {
    /// The library cargo built: its embedded build label reads `A`.
    A,
    /// A patched copy of build A whose embedded build label reads `B`.
    B,
}

impl SwapBuild {
    fn file_name(self) -> &'static str {
        match self {
            Self::A => "libfx_swap_a.so",
            Self::B => "libfx_swap_b.so",
        }
    }

    /// The letter its output says it is.
    pub fn letter(self) -> char {
        match self {
            Self::A => 'A',
            Self::B => 'B',
        }
    }

    /// The build the `n`th swap (from 0) puts in place, starting from A: B, A, B, …
    pub fn nth_swap(n: usize) -> Self {
        if n % 2 == 0 { Self::B } else { Self::A }
    }

    /// The 16 label bytes embedded in this build (`fx-swap`'s `BUILD` static).
    fn label(self) -> &'static [u8; 16] {
        match self {
            Self::A => b"fx-swap-build:A\0",
            Self::B => b"fx-swap-build:B\0",
        }
    }
}

/// The `fx-swap` library as build `build`: build A is the library cargo built; build B is a
/// copy of it whose embedded build label reads `B` — same manifest, different bytes
/// (different sha256), visibly different output. Written once under target/fixtures/swap/.
///
/// Both builds are copies at stable paths outside cargo's output dir, so a later cargo build
/// never changes a file a test is holding. Each is written to a temporary name and renamed
/// into place, so concurrent test processes never see a partial file.
///
/// # Panics
/// If the build fails, or the built library does not contain build A's label.
pub fn swap_build(build: SwapBuild) -> PathBuf {
    static WRITTEN: OnceLock<Mutex<bool>> = OnceLock::new();
    let written = WRITTEN.get_or_init(Mutex::default);
    let mut written = written.lock().unwrap_or_else(|p| p.into_inner());
    let dir = target_dir().join("swap");
    if !*written {
        let built = library("fx-swap", Profile::Dev);
        let bytes =
            fs::read(&built).unwrap_or_else(|e| panic!("cannot read {}: {e}", built.display()));
        let (from, to) = (SwapBuild::A.label(), SwapBuild::B.label());
        let mut patched = bytes.clone();
        let mut found = 0;
        let mut at = 0;
        while let Some(offset) = patched[at..].windows(from.len()).position(|w| w == from) {
            let start = at + offset;
            patched[start..start + to.len()].copy_from_slice(to);
            found += 1;
            at = start + from.len();
        }
        assert!(
            found > 0,
            "fx-swap: the build label {:?} is not in {}; the fixture's `BUILD` static and \
             `SwapBuild::label` must agree, and the label must survive the build",
            String::from_utf8_lossy(from),
            built.display()
        );
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        write_atomically(&dir.join(SwapBuild::A.file_name()), &bytes);
        write_atomically(&dir.join(SwapBuild::B.file_name()), &patched);
        *written = true;
    }
    dir.join(build.file_name())
}

/// Writes `bytes` to a temporary file next to `path` and renames it into place: a reader
/// sees the old file or the whole new one, never a partial one. A file that already holds
/// `bytes` is left alone (no new inode, no new mtime for a watcher to notice).
fn write_atomically(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return;
    }
    let file_name = path
        .file_name()
        .expect("the path names a file")
        .to_string_lossy();
    let temp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    fs::write(&temp, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", temp.display()));
    fs::rename(&temp, path).unwrap_or_else(|e| {
        panic!(
            "cannot rename {} to {}: {e}",
            temp.display(),
            path.display()
        )
    });
}

/// Which build of the `fx-legacy` plugin (`tests/compat/fx-legacy/src/legacy.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegacyBuild {
    /// Built against the frozen plugind-api 1.0.0 source (`tests/compat/plugind-api-1.0.0`):
    /// a plugin as its author shipped it against 1.0.0.
    V1_0,
    /// The same source built against today's `plugin-api/` (`tests/compat/today`): same
    /// manifest name and version, the other side of a hot swap.
    Today,
}

impl LegacyBuild {
    fn workspace(self) -> &'static str {
        match self {
            Self::V1_0 => "tests/compat",
            Self::Today => "tests/compat/today",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Self::V1_0 => "libfx_legacy.so",
            Self::Today => "libfx_legacy_today.so",
        }
    }

    /// The `build` word its record lines and log events carry.
    pub fn word(self) -> &'static str {
        match self {
            Self::V1_0 => "legacy",
            Self::Today => "today",
        }
    }
}

/// The `fx-legacy` library as build `build`, built with the dev profile into the shared
/// target dir (once per process). Like [`library`], cargo's output, which a build by another
/// process re-links: copy it into a sandbox before loading it repeatedly.
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn legacy_plugin(build: LegacyBuild) -> PathBuf {
    build_compat(build.workspace());
    target_dir().join("debug").join(build.file_name())
}

/// The 1.0 host (`tests/compat/legacy-host`): a program built against the frozen
/// plugind-api 1.0.0 source's `hosting` that loads a plugin library and prints one JSON line
/// per event (see `tests/compat/README.md`). Built once per process.
///
/// # Panics
/// If the build fails (with cargo's output).
pub fn legacy_host() -> PathBuf {
    build_compat(LegacyBuild::V1_0.workspace());
    target_dir().join("debug").join("legacy-host")
}

/// Builds the compatibility workspace at `workspace` (relative to the repository root) once
/// per process, offline: its `Cargo.lock` holds the root lock file's versions.
fn build_compat(workspace: &'static str) {
    static BUILT: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if built.contains(&workspace) {
        return;
    }
    let manifest = repo_root().join(workspace).join("Cargo.toml");
    let output = cargo_build_command(&manifest, Profile::Dev.name())
        .arg("--offline")
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    built.push(workspace);
}
