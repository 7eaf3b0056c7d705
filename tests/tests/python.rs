//! The API from another language: a stock Python grpcio client (stubs generated from
//! `host/proto` at test time) publishes and calls `Control.Status` over the Unix socket.
//!
//! Python with `grpcio` and `grpcio-tools` is required, never skipped: `.ci/run` (and the
//! README's test prerequisites) install them in the virtual environment `target/python`;
//! `$PLUGIND_TEST_PYTHON` names another interpreter.

use std::process::Command;

use plugind_tests::{daemon::Daemon, fixtures, sandbox::Sandbox};

/// `$PLUGIND_TEST_PYTHON`, else the repository's `target/python` environment, else `python3`.
fn python() -> String {
    if let Ok(python) = std::env::var("PLUGIND_TEST_PYTHON") {
        return python;
    }
    let venv = fixtures::repo_root().join("target/python/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".to_owned()
}

/// The interpreter, checked: it runs and has grpcio and grpcio-tools.
fn checked_python() -> String {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output();
    match probe {
        Ok(out) if out.status.success() => python,
        outcome => panic!(
            "the Python smoke test needs Python 3 with grpcio and grpcio-tools ({python}: \
             {}). Install them as .ci/run does: python3 -m venv target/python && \
             target/python/bin/pip install grpcio grpcio-tools (found there by default)",
            match outcome {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            }
        ),
    }
}

#[test]
fn a_stock_python_grpcio_client_publishes_and_operates_over_the_unix_socket() {
    let python = checked_python();
    let repo = fixtures::repo_root();
    let s = Sandbox::with_fixtures("python", &["fx-echo"]);
    let stubs = s.dir("stubs");
    let generated = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("host/proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg("plugind/v1/plugind.proto")
        .output()
        .unwrap();
    assert!(generated.status.success(), "protoc: {generated:?}");
    let d = Daemon::start(
        s,
        "[host]\nautoload = false\n\n[plugins.echo]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]\n",
    );
    let out = Command::new(&python)
        .arg(repo.join("tests/python/smoke.py"))
        .arg(d.socket())
        .arg(&stubs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "smoke.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // With `grpc.default_authority` (documented in the README and the proto): served.
    assert!(result["id"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["reached"], 1, "{result}");
    assert!(
        result["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{result}"
    );
    assert_eq!(result["instances"], serde_json::json!(["echo"]), "{result}");
    // Without it, C-core's percent-encoded socket path as `:authority` is refused by the
    // HTTP/2 layer (h2) before the daemon sees the call: the documented limitation. When
    // this changes, the README's and the proto's note on `grpc.default_authority` can go.
    assert_eq!(result["stock"], "INTERNAL", "{result}");
    d.wait_for_log("handled", 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
