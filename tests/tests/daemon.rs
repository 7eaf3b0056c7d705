//! The real `plugind` daemon end to end: `plugind run` with real plugins, `plugind publish`
//! over the real API, precise refusals, idempotency keys, the socket's mode, TCP with a
//! token, a graceful SIGTERM, and configurations it must refuse.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::{Duration, Instant},
};

use plugind_tests::{
    binary,
    daemon::Daemon,
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

fn sandbox(libraries: &[&str]) -> Sandbox {
    let sandbox = Sandbox::new("daemon");
    sandbox.dir("plugins.d");
    for fixture in libraries {
        sandbox.copy(
            &format!("plugins.d/{fixture}.so"),
            &fixtures::library(fixture, Profile::Dev),
        );
    }
    sandbox
}

const ECHO: &str = "\
[host]
durability = \"memory\"
autoload = false
max_message_size = \"1KiB\"

[plugins.echo]
plugin = \"fx-echo\"
topics = [\"demo.>\"]
";

#[test]
fn published_messages_reach_the_plugin_and_get_increasing_ids() {
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let first = d.publish("demo.hello", "hi", &[]).unwrap();
    let second = d
        .publish("demo.hello", "again", &["-H", "trace=abc"])
        .unwrap();
    assert!(second > first);
    d.wait_for_log("handled", 2);
    let log = d.log();
    assert!(
        log.contains("instance=echo plugin=fx-echo version=0.1.0 generation=1"),
        "{log}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        log.contains("SIGTERM received") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn invalid_requests_get_precise_statuses() {
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let e = d.publish("", "x", &[]).unwrap_err();
    assert!(
        e.starts_with("plugind: publish : InvalidArgument: invalid message: topic \"\" is empty"),
        "{e}"
    );
    let e = d.publish("demo..x", "x", &[]).unwrap_err();
    assert!(
        e.contains("InvalidArgument") && e.contains("empty token at position 2"),
        "{e}"
    );
    let e = d.publish("demo.big", &"x".repeat(2000), &[]).unwrap_err();
    assert!(
        e.contains("InvalidArgument") && e.contains("over max_message_size (1024 bytes)"),
        "{e}"
    );
    let e = d.publish("demo.x", "x", &["-H", "novalue"]).unwrap_err();
    assert!(e.contains("-H novalue: expected NAME=VALUE"), "{e}");
}

#[test]
fn past_max_backlog_publishing_is_refused_naming_the_instance() {
    let s = sandbox(&["fx-block"]);
    let gate = s.path().join("never");
    let config = format!(
        "[host]\ndurability = \"memory\"\nautoload = false\n\n[plugins.slow]\nplugin = \"fx-block\"\ntopics = [\"t.>\"]\nmax_backlog = \"1KiB\"\n[plugins.slow.config]\ngate = \"{}\"\n",
        gate.display()
    );
    let d = Daemon::start(s, &config);
    let payload = "x".repeat(600);
    d.publish("t.a", &payload, &[]).unwrap();
    let e = d.publish("t.a", &payload, &[]).unwrap_err();
    assert!(
        e.contains("ResourceExhausted") && e.contains("instance `slow`"),
        "{e}"
    );
}

#[test]
fn an_idempotency_key_returns_the_first_id() {
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let a = d.publish("demo.order", "1", &["--key", "order-1"]).unwrap();
    let b = d.publish("demo.order", "1", &["--key", "order-1"]).unwrap();
    let c = d.publish("demo.order", "2", &["--key", "order-2"]).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    d.wait_for_log("handled", 2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        d.log().matches("handled").count(),
        2,
        "the duplicate was not delivered"
    );
}

#[test]
fn json_output_and_stdin_payloads() {
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let out = d.cli(&["publish", "demo.json", "x", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["topic"], "demo.json");
    assert!(report["id"].as_u64().is_some());
    let mut child = Command::new(binary::plugind())
        .args(["publish", "demo.stdin", "-", "--connect"])
        .arg(format!("unix:{}", d.socket().display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"from stdin").unwrap();
    drop(child.stdin.take());
    assert!(child.wait_with_output().unwrap().status.success());
    d.wait_for_log("payload_len=10", 1);
}

#[test]
fn the_socket_mode_is_set_explicitly_whatever_the_umask() {
    let config = ECHO.replace(
        "autoload = false",
        "autoload = false\nsocket_mode = \"0600\"",
    );
    let d = Daemon::start(sandbox(&["fx-echo"]), &config);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn over_tcp_every_call_needs_the_token() {
    let s = sandbox(&["fx-echo"]);
    s.put("token", "s3cret\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = ECHO.replace(
        "autoload = false",
        &format!("autoload = false\nlisten = \"tcp:127.0.0.1:{port}\"\ntcp_token_file = \"token\""),
    );
    let d = Daemon::start(s, &config);
    let connect = format!("tcp:127.0.0.1:{port}");
    let publish = |token: Option<&str>| {
        let mut command = Command::new(binary::plugind());
        command
            .args(["publish", "demo.tcp", "x", "--connect", &connect])
            .env_remove("PLUGIND_CONFIG")
            .current_dir("/");
        match token {
            Some(token) => command.env("PLUGIND_TOKEN", token),
            None => command.env_remove("PLUGIND_TOKEN"),
        };
        command.output().unwrap()
    };
    let refused = publish(None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let wrong = publish(Some("guess"));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong token"));
    let accepted = publish(Some("s3cret"));
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    d.wait_for_log("handled", 1);
}

#[test]
fn sigterm_lets_the_call_in_hand_finish_and_exits_zero_within_the_grace_period() {
    let s = sandbox(&["fx-block"]);
    let gate = s.path().join("open");
    let config = format!(
        "[host]\ndurability = \"memory\"\nautoload = false\ngrace_period = \"5s\"\n\n[plugins.slow]\nplugin = \"fx-block\"\ntopics = [\"t.>\"]\n[plugins.slow.config]\ngate = \"{}\"\n",
        gate.display()
    );
    let d = Daemon::start(s, &config);
    for i in 0..3 {
        d.publish("t.a", &i.to_string(), &[]).unwrap();
    }
    // One call in hand, two behind it in the actor's mailbox (a fixed sleep here was too
    // short on a loaded machine: fewer were handed out, and fewer released).
    let started = Instant::now();
    loop {
        let out = d.cli(&["ctl", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let slow = &status["instances"][0];
        if slow["in_flight"] == 3 && slow["calling"] == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not 3 handed out with 1 call in hand: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(gate, b"").unwrap();
    });
    let started = Instant::now();
    let (status, log) = d.stop();
    opener.join().unwrap();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the grace period"
    );
    assert!(
        log.contains("stopped released=2"),
        "the call in hand finished, 2 released:\n{log}"
    );
}

#[test]
fn configurations_it_cannot_honour_are_refused_with_exit_78() {
    let run = |config: &str| {
        let s = sandbox(&[]);
        let path = s.put("plugins.toml", config);
        let out = Command::new(binary::plugind())
            .args(["run", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("[host]\ndurabilty = \"memory\"\n");
    assert_eq!(code, Some(78));
    assert!(err.contains("unknown field `durabilty`"), "{err}");
    let (code, err) = run("[host]\nstate_dir = \"plugins.toml\"\n");
    assert_eq!(code, Some(78));
    assert!(
        err.contains("not a directory") || err.contains("File exists"),
        "a state_dir that is a file: {err}"
    );
}

#[test]
fn publish_stream_answers_every_batch_by_correlation_id_with_many_in_flight() {
    use plugind::{
        config::Endpoint,
        control::{client, pb},
    };
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<pb::PublishBatchResult> = runtime.block_on(async {
        let mut client = client::connect(&endpoint, None).await.unwrap();
        // Every batch is sent before any answer is read.
        let batches: Vec<pb::PublishBatch> = (0..20u64)
            .map(|n| pb::PublishBatch {
                correlation_id: 1000 + n,
                messages: (0..64)
                    .map(|i| pb::PublishRequest {
                        topic: if n == 7 && i == 5 {
                            "bad..topic".into()
                        } else {
                            "demo.stream".into()
                        },
                        payload: format!("{n}/{i}").into(),
                        headers: vec![],
                        key: String::new(),
                    })
                    .collect(),
            })
            .collect();
        let request = client.request(tokio_stream::iter(batches));
        let mut answers = client
            .publisher
            .publish_stream(request)
            .await
            .unwrap()
            .into_inner();
        let mut results = Vec::new();
        while let Some(answer) = tokio_stream::StreamExt::next(&mut answers).await {
            results.push(answer.unwrap());
        }
        results
    });
    assert_eq!(
        results.iter().map(|r| r.correlation_id).collect::<Vec<_>>(),
        (1000..1020).collect::<Vec<_>>()
    );
    let mut ids = Vec::new();
    for result in &results {
        assert_eq!(result.outcomes.len(), 64);
        for (i, outcome) in result.outcomes.iter().enumerate() {
            match &outcome.outcome {
                Some(pb::publish_outcome::Outcome::Id(id)) => ids.push(*id),
                Some(pb::publish_outcome::Outcome::Refused(refusal)) => {
                    assert_eq!((result.correlation_id, i), (1007, 5), "only the bad one");
                    assert_eq!(refusal.code, 3, "INVALID_ARGUMENT");
                    assert!(
                        refusal.message.contains("empty token"),
                        "{}",
                        refusal.message
                    );
                }
                None => panic!("an empty outcome"),
            }
        }
    }
    assert_eq!(ids.len(), 20 * 64 - 1);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids grow in acceptance order"
    );
    d.wait_for_log("handled", 20 * 64 - 1);
}

#[test]
fn a_bad_library_is_refused_while_the_rest_runs() {
    let s = sandbox(&["fx-echo"]);
    let bytes = std::fs::read(fixtures::library("fx-faulty", Profile::Dev)).unwrap();
    s.put("plugins.d/faulty.so", &bytes[..bytes.len() / 3]);
    let config =
        format!("{ECHO}\n[plugins.broken]\nplugin = \"fx-faulty\"\ntopics = [\"demo.>\"]\n");
    let d = Daemon::start(s, &config);
    let log = d.log();
    assert!(
        log.contains("incomplete file"),
        "the loader's reason is logged:\n{log}"
    );
    assert!(
        log.contains("instance not started") && log.contains("instance=broken"),
        "{log}"
    );
    assert!(log.contains("instances=2 failed=1"), "{log}");
    d.publish("demo.hello", "still served", &[]).unwrap();
    d.wait_for_log("handled", 1);
    let (status, _) = d.stop();
    assert!(status.success());
}

#[test]
fn a_payload_can_come_from_a_file() {
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let file = d.sandbox().put("payload.bin", vec![0u8, 159, 146, 150]);
    let out = d.cli(&["publish", "demo.file", "--file", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_for_log("payload_len=4", 1);
    let both = d.cli(&[
        "publish",
        "demo.file",
        "inline",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("give DATA or --file, not both"));
}
