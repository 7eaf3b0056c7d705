//! The plugin ABI and SDK through real fixture libraries loaded by the daemon's loader: every
//! entry point's panic comes back as text, the manifest survives LTO + strip, incompatible
//! builds are refused by the layout check and compatible extensions load, and plugin logs
//! reach the host tagged.

use std::{sync::Arc, time::Duration};

use object::Object as _;
use plugind::loader::{self, Checked, Library, LoadError, Policy};
use plugind_api::{
    Level, Outcome,
    hosting::{self, CallErrorKind},
    testing::TestMessage,
};
use plugind_tests::{
    fixtures::{self, Profile, Variant},
    recording::Recorder,
};

/// Loads in this process without a probe: these fixtures are known not to crash at load.
fn load(path: &std::path::Path) -> Library {
    loader::load(path, &Policy::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn message(msg: TestMessage) -> plugind_api::abi::RawMessage {
    hosting::message_handle(Arc::new(msg))
}

#[test]
fn a_well_behaved_plugin_loads_acks_retries_and_rejects() {
    let lib = load(&fixtures::library("fx-echo", Profile::Dev));
    let manifest = lib.manifest();
    assert_eq!(manifest.name, "fx-echo");
    assert_eq!(manifest.version, "0.1.0");
    assert_eq!(manifest.api_version, plugind_api::API_VERSION);
    assert_eq!(manifest.topics, ["echo.>"]);
    assert_eq!(
        manifest.description,
        "test fixture: acks and reports what it saw"
    );

    let recorder = Recorder::new("echo", "0.1.0", 1);
    let mut instance = lib.instantiate("{}", recorder.handle()).unwrap();
    assert_eq!(
        instance.handle(message(TestMessage::new("echo.a", "x"))),
        Ok(Outcome::Ack)
    );
    assert_eq!(
        instance.handle(message(
            TestMessage::new("echo.a", "x")
                .id(77)
                .header("outcome", "retry")
        )),
        Ok(Outcome::Retry {
            after: Some(Duration::from_millis(250)),
            reason: "asked to retry 77".to_owned()
        })
    );
    assert_eq!(
        instance.handle(message(
            TestMessage::new("echo.a", "x").header("outcome", "reject")
        )),
        Ok(Outcome::reject("asked to reject"))
    );
    instance
        .handle(message(
            TestMessage::new("echo.a", "copy me").header("publish", "copies"),
        ))
        .unwrap();
    assert_eq!(
        recorder.published(),
        [("copies".to_owned(), b"copy me".to_vec())]
    );
    instance.shutdown().unwrap();
}

#[test]
fn a_panic_in_every_entry_point_comes_back_as_its_text() {
    let lib = load(&fixtures::library("fx-faulty", Profile::Dev));
    let recorder = Recorder::new("faulty", "0.1.0", 1);

    match lib.instantiate(r#"{"fail":"new-panic"}"#, recorder.handle()) {
        Err(LoadError::NewPanicked { message, .. }) => {
            assert!(message.contains("fx-faulty refuses to start"), "{message}");
            assert!(
                message.contains("src/lib.rs"),
                "the location is kept: {message}"
            );
        }
        other => panic!("expected NewPanicked, got {other:?}"),
    }
    match lib.instantiate(r#"{"fail":"new-error"}"#, recorder.handle()) {
        Err(LoadError::NewFailed { message, .. }) => {
            assert_eq!(message, "fx-faulty: no database at db.example:5432")
        }
        other => panic!("expected NewFailed, got {other:?}"),
    }
    match lib.instantiate(r#"{"fial":"typo"}"#, recorder.handle()) {
        Err(LoadError::ConfigRejected { message, .. }) => {
            assert!(message.contains("unknown field `fial`"), "{message}")
        }
        other => panic!("expected ConfigRejected, got {other:?}"),
    }

    let mut instance = lib
        .instantiate(r#"{"fail":"handle-panic"}"#, recorder.handle())
        .unwrap();
    for _ in 0..3 {
        let e = instance
            .handle(message(TestMessage::new("t", "ab")))
            .unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Panic);
        assert!(
            e.message
                .contains("index out of bounds: the len is 0 but the index is 5"),
            "{}",
            e.message
        );
    }
    instance.shutdown().unwrap();

    let instance = lib
        .instantiate(r#"{"fail":"shutdown-panic"}"#, recorder.handle())
        .unwrap();
    let e = instance.shutdown().unwrap_err();
    assert_eq!(e.kind, CallErrorKind::Panic);
    assert!(
        e.message.contains("fx-faulty cannot stop cleanly"),
        "{}",
        e.message
    );

    // The panic hook forwarded every panic to the host log as well.
    let panics = recorder
        .logs()
        .into_iter()
        .filter(|l| l.target == "panic")
        .count();
    assert_eq!(panics, 5);
}

#[test]
fn the_manifest_survives_lto_and_strip_and_matches_the_root_module() {
    let path = fixtures::library("fx-echo", Profile::Tiny);
    let bytes = std::fs::read(&path).unwrap();
    let elf = object::File::parse(&*bytes).unwrap();
    assert!(
        elf.section_by_name(".symtab").is_none(),
        "the tiny fixture is really stripped"
    );
    let checked = Checked::from_bytes(&path, bytes.clone()).unwrap();
    assert_eq!(checked.manifest().name, "fx-echo");
    // Loading cross-checks the section against the manifest the root module returns.
    let lib = load(&path);
    assert_eq!(lib.manifest(), checked.manifest());
    let recorder = Recorder::new("tiny", "0.1.0", 1);
    let mut instance = lib.instantiate("{}", recorder.handle()).unwrap();
    assert_eq!(
        instance.handle(message(TestMessage::new("echo.x", "y"))),
        Ok(Outcome::Ack)
    );
}

#[test]
fn an_incompatible_abi_is_refused_naming_the_difference() {
    let path = fixtures::variant(Variant::Incompatible);
    match loader::load(&path, &Policy::default()) {
        Err(LoadError::IncompatibleAbi { detail, .. }) => {
            assert!(
                detail.starts_with("incompatible type size (expected 1, found 2)"),
                "{detail}"
            );
            assert!(
                detail.ends_with("HostVTable.log_enabled(arg 2: LogLevel).field_0: u16"),
                "names the field trail down to the changed type: {detail}"
            );
        }
        other => panic!("expected IncompatibleAbi, got {other:?}"),
    }
}

#[test]
fn a_field_appended_after_the_last_prefix_field_still_loads() {
    let lib = load(&fixtures::variant(Variant::AppendedField));
    assert_eq!(lib.manifest().api_version, "1.2.0");
    let recorder = Recorder::new("appended", "0.1.0", 1);
    let mut instance = lib.instantiate("null", recorder.handle()).unwrap();
    assert_eq!(
        instance.handle(message(TestMessage::new("t", "p"))),
        Ok(Outcome::Ack)
    );
    instance.shutdown().unwrap();
}

#[test]
fn a_library_without_the_root_module_is_not_a_plugin() {
    match loader::load(
        &fixtures::library("fx-noroot", Profile::Dev),
        &Policy::default(),
    ) {
        Err(LoadError::NotAPlugin { detail, .. }) => {
            assert!(
                detail.contains("_1as_0lib_1header_0root_bmodule_bloader"),
                "{detail}"
            )
        }
        other => panic!("expected NotAPlugin, got {other:?}"),
    }
}

#[test]
fn plugin_tracing_events_reach_the_host_tagged_with_their_instance() {
    let lib = load(&fixtures::library("fx-echo", Profile::Dev));
    let recorder = Recorder::new("orders-sink", &lib.manifest().version, 7);
    let mut instance = lib
        .instantiate(r#"{"label":"blue"}"#, recorder.handle())
        .unwrap();
    instance
        .handle(message(TestMessage::new("echo.a", "12345").attempt(3)))
        .unwrap();
    instance.shutdown().unwrap();

    let logs = recorder.logs();
    let started = logs
        .iter()
        .find(|l| l.message == "started")
        .expect("new logged");
    assert_eq!(started.field("label"), Some("blue"));
    let handled = logs
        .iter()
        .find(|l| l.message == "handled")
        .expect("handle logged");
    assert_eq!(handled.level, Level::Info);
    assert_eq!(handled.target, "fx_echo");
    assert_eq!(handled.instance, "orders-sink");
    assert_eq!(handled.plugin_version, "0.1.0");
    assert_eq!(handled.generation, 7);
    assert_eq!(handled.field("label"), Some("blue"));
    assert_eq!(handled.field("payload_len"), Some("5"));
    assert_eq!(handled.field("attempt"), Some("3"));
}

#[test]
fn a_plugin_built_with_panic_abort_does_not_compile() {
    let output = fixtures::try_build("fx-noop", "abort");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the abort build must fail");
    assert!(
        stderr.contains("plugind plugins must be built with `panic = \"unwind\"`"),
        "{stderr}"
    );
}

#[test]
fn two_live_instances_in_one_library_copy_log_to_their_own_host() {
    // The daemon loads a copy per instance; a host that shares a copy still gets each
    // instance's events routed to that instance (the per-call thread mark).
    let lib = load(&fixtures::library("fx-echo", Profile::Dev));
    let (left, right) = (
        Recorder::new("left", "0.1.0", 1),
        Recorder::new("right", "0.1.0", 2),
    );
    let mut a = lib
        .instantiate(r#"{"label":"left"}"#, left.handle())
        .unwrap();
    let mut b = lib
        .instantiate(r#"{"label":"right"}"#, right.handle())
        .unwrap();
    for _ in 0..3 {
        a.handle(message(TestMessage::new("echo.a", "x"))).unwrap();
        b.handle(message(TestMessage::new("echo.b", "y"))).unwrap();
    }
    for (recorder, label) in [(&left, "left"), (&right, "right")] {
        let handled: Vec<_> = recorder
            .logs()
            .into_iter()
            .filter(|l| l.message == "handled")
            .collect();
        assert_eq!(handled.len(), 3, "{label}");
        assert!(
            handled.iter().all(|l| l.field("label") == Some(label)),
            "{handled:?}"
        );
    }
}
