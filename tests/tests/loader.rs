//! The loader against malformed, hostile and incompatible files: every refusal is a typed
//! error whose fields name the cause, and the test process survives all of them. Also the
//! lifetime rules: side-by-side versions, unload and retention, memory over many cycles, and
//! a file changed during loading.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use plugind::loader::{self, LoadError, Policy, ProbeCommand};
use plugind_api::{Outcome, hosting, testing::TestMessage};
use plugind_tests::{
    binary,
    fixtures::{self, Profile, Variant},
    recording::Recorder,
    sandbox::Sandbox,
};

fn dir() -> Sandbox {
    Sandbox::new("loader")
}

fn no_probe() -> Policy {
    Policy::default()
}

fn probing() -> Policy {
    Policy {
        probe: Some(ProbeCommand::new(binary::plugind())),
        ..Policy::default()
    }
}

fn echo() -> PathBuf {
    fixtures::library("fx-echo", Profile::Dev)
}

#[test]
fn a_missing_file_is_not_found() {
    let d = dir();
    match loader::check(&d.path().join("nope.so"), &no_probe()) {
        Err(LoadError::NotFound { path }) => assert_eq!(path, d.path().join("nope.so")),
        other => panic!("{other:?}"),
    }
    match loader::check(Path::new("/no/such/dir/x.so"), &no_probe()) {
        Err(LoadError::NotFound { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_symlink_out_of_the_directory_is_refused() {
    let d = dir();
    let outside = dir();
    let target = outside.copy("real.so", &echo());
    let link = d.path().join("link.so");
    symlink(&target, &link).unwrap();
    match loader::check(&link, &no_probe()) {
        Err(LoadError::NotRegularFile { path, kind }) => {
            assert_eq!(path, link);
            assert!(kind.contains("symlink"), "{kind}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn directories_and_fifos_are_not_regular_files() {
    let d = dir();
    fs::create_dir(d.path().join("sub.so")).unwrap();
    match loader::check(&d.path().join("sub.so"), &no_probe()) {
        Err(LoadError::NotRegularFile { kind, .. }) => assert_eq!(kind, "a directory"),
        other => panic!("{other:?}"),
    }
    let fifo = d.path().join("pipe.so");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    match loader::check(&fifo, &no_probe()) {
        Err(LoadError::NotRegularFile { kind, .. }) => assert_eq!(kind, "a FIFO"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn writable_files_and_directories_are_refused_naming_the_bit() {
    let d = dir();
    let lib = d.copy("echo.so", &echo());
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o664)).unwrap();
    match loader::check(&lib, &no_probe()) {
        Err(LoadError::UnsafePermissions {
            path,
            what,
            bit,
            mode,
        }) => {
            assert_eq!((path, what, mode), (lib.clone(), "file", 0o664));
            assert!(bit.contains("g+w"), "{bit}");
        }
        other => panic!("{other:?}"),
    }
    fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    match loader::check(&lib, &no_probe()) {
        Err(LoadError::UnsafePermissions {
            path, what, bit, ..
        }) => {
            assert_eq!((path, what), (d.path().to_owned(), "directory"));
            assert!(bit.contains("o+w"), "{bit}");
        }
        other => panic!("{other:?}"),
    }
    // A sticky world-writable ancestor (like /tmp) is fine; the dir itself must not be.
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let nested = d.path().join("plugins");
    fs::create_dir(&nested).unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let inner = nested.join("echo.so");
    fs::copy(&lib, &inner).unwrap();
    assert!(loader::check(&inner, &no_probe()).is_ok());
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).unwrap();
    match loader::check(&inner, &no_probe()) {
        Err(LoadError::UnsafePermissions { path, what, .. }) => {
            assert_eq!((path, what), (d.path().to_owned(), "ancestor directory"))
        }
        other => panic!("{other:?}"),
    }
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn a_file_owned_by_an_untrusted_user_is_refused_until_trusted() {
    let root = effective_uid() == 0;
    if root {
        let d = dir();
        let lib = d.copy("echo.so", &echo());
        let status = Command::new("chown")
            .arg("4242")
            .arg(&lib)
            .status()
            .unwrap();
        assert!(status.success(), "chown as root works");
        match loader::check(&lib, &no_probe()) {
            Err(LoadError::UntrustedOwner { path, owner, .. }) => {
                assert_eq!(path, lib);
                assert!(owner.contains("4242"), "{owner}");
            }
            other => panic!("{other:?}"),
        }
        let trusting = Policy {
            trusted_owners: vec![4242],
            ..Policy::default()
        };
        assert!(loader::check(&lib, &trusting).is_ok());
    } else {
        // Without root no file can be given away; a root-owned one is untrusted to us.
        match loader::check(Path::new("/bin/true"), &no_probe()) {
            Err(LoadError::UntrustedOwner { owner, .. }) => assert!(owner.contains("root")),
            other => panic!("{other:?}"),
        }
    }
}

fn effective_uid() -> u32 {
    // The effective uid is the second field of the Uid line.
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn files_that_are_not_shared_libraries_are_refused() {
    let d = dir();
    let text = d.put("notes.so", b"these are not the bytes you are looking for\n");
    match loader::check(&text, &no_probe()) {
        Err(LoadError::NotSharedObject { reason, .. }) => assert_eq!(reason, "no ELF header"),
        other => panic!("{other:?}"),
    }
    let exe = d.copy("true.so", Path::new("/bin/true"));
    match loader::check(&exe, &no_probe()) {
        Err(LoadError::NotSharedObject { reason, .. }) => {
            assert!(reason.contains("executable"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let libc = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists())
    .expect("a system libc");
    let system = d.copy("libc.so", libc);
    match loader::check(&system, &no_probe()) {
        Err(LoadError::NoManifest { section, .. }) => assert_eq!(section, ".plugind_manifest"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_truncated_library_is_incomplete_at_every_size() {
    let d = dir();
    let bytes = fs::read(echo()).unwrap();
    for cut in [64, 4096, 65_536, 100_000, bytes.len() / 2, bytes.len() - 1] {
        let lib = d.put(&format!("cut-{cut}.so"), &bytes[..cut]);
        match loader::load(&lib, &probing()) {
            Err(LoadError::Incomplete { size, expected, .. }) => {
                assert_eq!(size, cut as u64);
                assert_eq!(expected, bytes.len() as u64);
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    let tiny = d.put("cut-10.so", &bytes[..10]);
    assert!(matches!(
        loader::load(&tiny, &probing()),
        Err(LoadError::NotSharedObject { .. })
    ));
}

/// Found by the hostile-input campaign: a library with bytes after its section headers was
/// refused as "incomplete". A file longer than its headers say is not a partial write: it
/// loads; one shorter than its section-header table still is one.
#[test]
fn a_library_with_bytes_after_its_section_headers_loads() {
    let d = dir();
    let mut bytes = fs::read(echo()).unwrap();
    let end = bytes.len();
    bytes.extend_from_slice(&[0x5a; 4096]);
    let long = d.put("long.so", &bytes);
    let library = loader::load(&long, &probing()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(library.manifest().name, "fx-echo");
    assert_eq!(library.size(), bytes.len() as u64);
    let short = d.put("short.so", &bytes[..end - 1]);
    match loader::check(&short, &no_probe()) {
        Err(LoadError::Incomplete { size, expected, .. }) => {
            assert_eq!((size, expected), (end as u64 - 1, end as u64))
        }
        other => panic!("{other:?}"),
    }
}

/// `bytes` with the first occurrence of `from` replaced by `to` (same length).
fn patched(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "a patch keeps the file size");
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the patched text is in the file");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn a_malformed_manifest_is_refused_with_its_defect() {
    let d = dir();
    let bytes = fs::read(echo()).unwrap();
    // Format version 1 → 9 in the section header.
    let lib = d.put(
        "newer.so",
        patched(&bytes, b"PLUGIND\0\x01\0\0\0", b"PLUGIND\0\x09\0\0\0"),
    );
    match loader::check(&lib, &no_probe()) {
        Err(LoadError::ManifestMalformed { error, .. }) => assert_eq!(
            error,
            plugind_api::manifest::ManifestError::UnsupportedFormat {
                found: 9,
                supported: 1
            }
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_declared_api_major_other_than_ours_is_refused_before_loading() {
    let d = dir();
    let bytes = fs::read(echo()).unwrap();
    let lib = d.put(
        "api2.so",
        patched(
            &bytes,
            format!("\"api_version\":\"{}\"", plugind_api::API_VERSION).as_bytes(),
            b"\"api_version\":\"2.0.0\"",
        ),
    );
    match loader::check(&lib, &no_probe()) {
        Err(LoadError::IncompatibleApiVersion {
            expected, found, ..
        }) => assert_eq!((expected.as_str(), found.as_str()), ("1.x", "2.0.0")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pin_refuses_any_other_bytes() {
    let d = dir();
    let lib = d.copy("echo.so", &echo());
    let actual = loader::check(&lib, &no_probe()).unwrap().sha256();
    let pinned = Policy {
        sha256: Some([0xab; 32]),
        ..Policy::default()
    };
    match loader::check(&lib, &pinned) {
        Err(LoadError::DigestMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected, "ab".repeat(32));
            assert_eq!(found, hex(&actual));
        }
        other => panic!("{other:?}"),
    }
    let right = Policy {
        sha256: Some(actual),
        ..Policy::default()
    };
    assert!(loader::load(&lib, &right).is_ok());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_library_whose_code_contradicts_its_manifest_is_refused() {
    let lib = fixtures::library("fx-liar", Profile::Dev);
    match loader::load(&lib, &probing()) {
        Err(LoadError::ManifestMismatch { path }) => assert_eq!(path, lib),
        other => panic!("{other:?}"),
    }
}

#[test]
fn not_a_plugin_and_incompatible_abi_are_refused_through_the_probe_too() {
    match loader::load(&fixtures::library("fx-noroot", Profile::Dev), &probing()) {
        Err(LoadError::NotAPlugin { detail, .. }) => {
            assert!(detail.contains("root module"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    match loader::load(&fixtures::variant(Variant::Incompatible), &probing()) {
        Err(LoadError::IncompatibleAbi { detail, .. }) => {
            assert!(detail.contains("LogLevel"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_constructor_that_crashes_is_caught_by_the_probe() {
    let lib = fixtures::library("fx-ctor-crash", Profile::Dev);
    // Everything that reads the file accepts it: only loading reveals it.
    assert!(loader::check(&lib, &no_probe()).is_ok());
    match loader::load(&lib, &probing()) {
        Err(LoadError::ProbeCrashed { signal, name, .. }) => {
            assert_eq!((signal, name.as_str()), (11, "SIGSEGV"))
        }
        other => panic!("{other:?}"),
    }
    // And the command-line view of the same verdicts.
    let declared = Command::new(binary::plugind())
        .args(["inspect", "--json"])
        .arg(&lib)
        .output()
        .unwrap();
    assert_eq!(declared.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&declared.stdout).unwrap();
    assert_eq!(report["verdict"], "accepted");
    assert_eq!(report["verdict_kind"], "declared");
    assert_eq!(report["manifest"]["name"], "fx-ctor-crash");

    let probed = Command::new(binary::plugind())
        .args(["inspect", "--probe"])
        .arg(&lib)
        .output()
        .unwrap();
    assert_eq!(
        probed.status.code(),
        Some(1),
        "refused, and inspect itself lived"
    );
    let text = String::from_utf8_lossy(&probed.stdout);
    assert!(text.contains("refused (probed"), "{text}");
    assert!(text.contains("SIGSEGV (signal 11)"), "{text}");
}

#[test]
fn inspect_shows_manifest_digest_size_and_the_probed_verdict() {
    let lib = echo();
    let output = Command::new(binary::plugind())
        .args(["inspect", "--probe", "--json"])
        .arg(&lib)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected_sha = hex(&loader::check(&lib, &no_probe()).unwrap().sha256());
    assert_eq!(report["manifest"]["name"], "fx-echo");
    assert_eq!(report["manifest"]["api_version"], plugind_api::API_VERSION);
    assert_eq!(report["sha256"], expected_sha);
    assert_eq!(report["size"], fs::metadata(&lib).unwrap().len());
    assert_eq!(report["verdict"], "accepted");
    assert_eq!(report["verdict_kind"], "probed");

    let text = Command::new(binary::plugind())
        .arg("inspect")
        .arg(&lib)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("name         fx-echo"), "{text}");
    assert!(
        text.contains(&format!("sha256       {expected_sha}")),
        "{text}"
    );
    assert!(text.contains("verdict      accepted (declared"), "{text}");

    let missing = Command::new(binary::plugind())
        .args(["inspect", "/nonexistent/lib.so"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("/nonexistent/lib.so: not found"));
    // Refused from the file alone, before any loading: a declared verdict, even with
    // --probe (no child process ever loaded it).
    let missing = Command::new(binary::plugind())
        .args(["inspect", "--probe", "/nonexistent/lib.so"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let text = String::from_utf8_lossy(&missing.stdout);
    assert!(
        text.contains("refused (declared: refused from the file alone, before any loading)"),
        "{text}"
    );
}

fn message(topic: &str) -> plugind_api::abi::RawMessage {
    hosting::message_handle(Arc::new(TestMessage::new(topic, "p")))
}

#[test]
fn two_versions_of_one_plugin_run_side_by_side() {
    let v1 = loader::load(&echo(), &probing()).unwrap();
    let v2 = loader::load(&fixtures::library("fx-echo2", Profile::Dev), &probing()).unwrap();
    assert_eq!(v1.manifest().name, v2.manifest().name);
    assert_eq!(
        (
            v1.manifest().version.as_str(),
            v2.manifest().version.as_str()
        ),
        ("0.1.0", "0.2.0")
    );
    let (r1, r2) = (
        Recorder::new("echo", "0.1.0", 1),
        Recorder::new("echo", "0.2.0", 2),
    );
    let mut a = v1.instantiate("{}", r1.handle()).unwrap();
    let mut b = v2.instantiate("{}", r2.handle()).unwrap();
    for _ in 0..5 {
        assert_eq!(a.handle(message("echo.x")), Ok(Outcome::Ack));
        assert_eq!(b.handle(message("echo.x")), Ok(Outcome::Ack));
    }
    let versions = |r: &Recorder| -> Vec<String> {
        r.logs()
            .into_iter()
            .filter(|l| l.message == "handled")
            .map(|l| l.field("version").unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        versions(&r1),
        vec!["0.1.0"; 5],
        "each call ran its own library's code"
    );
    assert_eq!(versions(&r2), vec!["0.2.0"; 5]);
}

#[test]
fn a_retry_reason_outlives_the_library_that_wrote_it() {
    let lib = loader::load(&echo(), &no_probe()).unwrap();
    let recorder = Recorder::new("echo", "0.1.0", 1);
    let mut instance = lib.instantiate("{}", recorder.handle()).unwrap();
    let outcome = instance
        .handle(hosting::message_handle(Arc::new(
            TestMessage::new("echo.x", "p")
                .id(31)
                .header("outcome", "retry"),
        )))
        .unwrap();
    instance.shutdown().unwrap();
    drop(lib);
    // The library is gone (fx-echo leaves nothing behind), the reason is host memory.
    assert!(!loader::retained().iter().any(|r| r.origin == echo()));
    assert_eq!(
        format!("{outcome:?}"),
        "Retry { after: Some(250ms), reason: \"asked to retry 31\" }"
    );
}

#[test]
fn a_library_pinned_by_a_thread_local_is_reported_retained() {
    let path = fixtures::library("fx-tls", Profile::Dev);
    let lib = loader::load(&path, &probing()).unwrap();
    let size = lib.size();
    let recorder = Recorder::new("tls", "0.1.0", 1);
    let mut instance = lib.instantiate("null", recorder.handle()).unwrap();
    assert_eq!(instance.handle(message("t")), Ok(Outcome::Ack));
    instance.shutdown().unwrap();
    drop(lib);
    let retained: Vec<_> = loader::retained()
        .into_iter()
        .filter(|r| r.origin == path)
        .collect();
    assert_eq!(retained.len(), 1, "{retained:?}");
    assert_eq!(
        (retained[0].name.as_str(), retained[0].size),
        ("fx-tls", size)
    );
}

fn rss_bytes() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// One load, instantiate, call, shutdown and unload of `path`; a failing step names the
/// cycle and the error.
fn cycle(path: &Path, policy: &Policy, i: usize) {
    let lib = loader::load(path, policy)
        .unwrap_or_else(|e| panic!("cycle {i}: loading failed: {e} ({e:?})"));
    let recorder = Recorder::new("cycle", "0", 1);
    let mut instance = lib
        .instantiate("{}", recorder.handle())
        .unwrap_or_else(|e| panic!("cycle {i}: instantiating failed: {e} ({e:?})"));
    assert_eq!(
        instance.handle(message("echo.x")),
        Ok(Outcome::Ack),
        "cycle {i}"
    );
    instance
        .shutdown()
        .unwrap_or_else(|e| panic!("cycle {i}: shutdown failed: {e:?}"));
}

#[test]
fn five_hundred_load_unload_cycles_neither_crash_nor_grow() {
    // The cycles load private copies. The fixtures' own paths are cargo's output in the
    // shared `target/fixtures`, which a fixture build by another test process of this
    // checkout (after a source change) re-links, unlink then link: one of the thousand opens
    // below falling into that gap failed with `NotFound` (and new bytes would fail the pin).
    let d = dir();
    let libraries = [
        d.copy("echo.so", &echo()),
        d.copy("appended.so", &fixtures::variant(Variant::AppendedField)),
    ];
    for path in libraries {
        // Pinned: these cycles exercise this process's loading, not the probe.
        let policy = Policy {
            sha256: Some(loader::check(&path, &no_probe()).unwrap().sha256()),
            ..Policy::default()
        };
        for i in 0..50 {
            cycle(&path, &policy, i);
        }
        let after_50 = rss_bytes();
        for i in 50..500 {
            cycle(&path, &policy, i);
        }
        let after_500 = rss_bytes();
        eprintln!(
            "{}: RSS after 50 cycles {after_50} B, after 500 {after_500} B",
            path.display()
        );
        assert!(
            after_500 <= after_50 + 16 * 1024 * 1024,
            "{}: RSS {after_50} after 50 cycles, {after_500} after 500",
            path.display()
        );
        assert!(
            !loader::retained().iter().any(|r| r.origin == path),
            "every cycle unloaded its library"
        );
    }
}

#[test]
fn the_code_loaded_is_the_bytes_that_were_checked() {
    let d = dir();
    let lib_path = d.copy("echo.so", &echo());
    let checked = loader::check(&lib_path, &no_probe()).unwrap();
    // Between the check and the load, the file is rewritten in place with another version,
    // then truncated: what gets loaded is still what was checked.
    fs::write(
        &lib_path,
        fs::read(fixtures::library("fx-echo2", Profile::Dev)).unwrap(),
    )
    .unwrap();
    let lib = checked.load(&no_probe()).unwrap();
    fs::write(&lib_path, b"").unwrap();
    assert_eq!(lib.manifest().version, "0.1.0");
    let recorder = Recorder::new("echo", "0.1.0", 1);
    let mut instance = lib.instantiate("{}", recorder.handle()).unwrap();
    assert_eq!(instance.handle(message("echo.x")), Ok(Outcome::Ack));
    let handled = recorder
        .logs()
        .into_iter()
        .find(|l| l.message == "handled")
        .unwrap();
    assert_eq!(handled.field("version"), Some("0.1.0"));
}

#[test]
fn a_constructor_that_hangs_is_killed_after_the_probe_timeout() {
    let lib = fixtures::library("fx-ctor-hang", Profile::Dev);
    let policy = Policy {
        probe: Some(ProbeCommand {
            timeout: std::time::Duration::from_millis(500),
            ..ProbeCommand::new(binary::plugind())
        }),
        ..Policy::default()
    };
    match loader::load(&lib, &policy) {
        Err(LoadError::ProbeTimedOut { timeout, .. }) => {
            assert_eq!(timeout, std::time::Duration::from_millis(500))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_constructor_that_exits_fails_the_probe() {
    let lib = fixtures::library("fx-ctor-exit", Profile::Dev);
    match loader::load(&lib, &probing()) {
        Err(LoadError::ProbeFailed { detail, .. }) => {
            assert!(detail.contains("exit status: 3"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}
