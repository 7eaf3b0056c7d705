//! The real `plugind` daemon end to end: `plugind run` with real plugins, `plugind publish`
//! over the real API, precise refusals, idempotency keys, the socket's mode, TCP with a
//! token, a graceful SIGTERM, and configurations it must refuse.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::{Duration, Instant},
};

use plugind::control::pb;
use plugind_tests::{
    binary,
    daemon::Daemon,
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

fn sandbox(libraries: &[&str]) -> Sandbox {
    Sandbox::with_fixtures("daemon", libraries)
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
    use plugind::{config::Endpoint, control::client};
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

/// Runs `calls` with a client of `d`'s API, on a runtime of its own.
fn with_client<T>(
    d: &Daemon,
    calls: impl AsyncFnOnce(&mut plugind::control::client::Client) -> T,
) -> T {
    let endpoint = plugind::config::Endpoint::Unix(d.socket().to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = plugind::control::client::connect(&endpoint, None)
            .await
            .unwrap();
        calls(&mut client).await
    })
}

fn request(
    topic: &str,
    payload: Vec<u8>,
    headers: &[(&str, &str)],
    key: &str,
) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        payload: payload.into(),
        headers: headers
            .iter()
            .map(|(name, value)| pb::Header {
                name: (*name).into(),
                value: (*value).into(),
            })
            .collect(),
        key: key.into(),
    }
}

/// One unary `Publish` per request, in order.
fn publish_each(
    d: &Daemon,
    requests: Vec<pb::PublishRequest>,
) -> Vec<Result<pb::PublishResponse, tonic::Status>> {
    with_client(d, async |c| {
        let mut answers = Vec::new();
        for r in requests {
            let request = c.request(r);
            answers.push(
                c.publisher
                    .publish(request)
                    .await
                    .map(tonic::Response::into_inner),
            );
        }
        answers
    })
}

fn refused(answer: &Result<pb::PublishResponse, tonic::Status>) -> (tonic::Code, String) {
    match answer {
        Ok(r) => panic!("accepted: {r:?}"),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

#[test]
fn a_payload_of_exactly_max_message_size_is_accepted_and_the_transport_follows_the_limit() {
    // With the default limit (4 MiB), a payload of exactly 4 MiB was refused by gRPC's own
    // decoding limit (4 MiB for the whole request, OUT_OF_RANGE); above it every publish
    // failed whatever max_message_size said.
    for (limit, text) in [(4 << 20, "4MiB"), (9 << 20, "9MiB")] {
        let config = ECHO.replace(
            "max_message_size = \"1KiB\"",
            &format!("max_message_size = \"{text}\""),
        );
        let d = Daemon::start(sandbox(&["fx-echo"]), &config);
        let answers = publish_each(
            &d,
            vec![
                request("demo.big", vec![7; limit], &[], ""),
                request("demo.big", vec![7; limit + 1], &[], ""),
            ],
        );
        let accepted = answers[0]
            .as_ref()
            .unwrap_or_else(|s| panic!("{text}: {s:?}"));
        assert_eq!(accepted.instances, 1);
        let (code, message) = refused(&answers[1]);
        assert_eq!(code, tonic::Code::InvalidArgument, "{text}: {message}");
        assert!(
            message.contains(&format!(
                "payload of {} bytes is over max_message_size ({limit} bytes)",
                limit + 1
            )),
            "{message}"
        );
        d.wait_for_log(&format!("payload_len={limit}"), 1);
    }
}

#[test]
fn headers_and_keys_are_bounded_and_count_in_the_message_size_and_the_backlog() {
    // Headers and keys were outside every limit: 240 MB of headers went into an instance
    // whose max_backlog was 1 MiB.
    let config = "\
[host]
durability = \"memory\"
autoload = false

[plugins.echo]
plugin = \"fx-echo\"
topics = [\"demo.>\"]

[plugins.held]
plugin = \"fx-echo\"
topics = [\"held.>\"]
enabled = false
max_backlog = \"64KiB\"
";
    let d = Daemon::start(sandbox(&["fx-echo"]), config);
    let value = "v".repeat(16 << 10);
    let many: Vec<(&str, &str)> = (0..65).map(|_| ("h", "v")).collect();
    let answers = publish_each(
        &d,
        vec![
            request("demo.h", b"x".to_vec(), &many, ""),
            request("demo.h", b"x".to_vec(), &[("", "v")], ""),
            request("demo.h", b"x".to_vec(), &[("trace\u{1}id", "v")], ""),
            request("demo.h", b"x".to_vec(), &[("trace\u{202e}", "v")], ""),
            request(
                "demo.h",
                b"x".to_vec(),
                &[("big", &format!("{value}v"))],
                "",
            ),
            request("demo.h", b"x".to_vec(), &[], &"k".repeat(257)),
            request("demo.\u{200b}h", b"x".to_vec(), &[], ""),
        ],
    );
    let expected = [
        "65 headers, more than 64",
        "header 1: the name is empty",
        "header 1: the name \"trace\\u{1}id\" contains a control character",
        "contains an invisible format character",
        "header 1: the value of \"big\" is 16385 bytes, more than 16384",
        "the idempotency key is 257 bytes, more than 256",
        "contains an invisible format character",
    ];
    for (answer, expected) in answers.iter().zip(expected) {
        let (code, message) = refused(answer);
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        assert!(message.contains(expected), "{message} ≠ {expected}");
    }
    // Within their bounds, headers and keys count: 64 KiB of backlog holds three messages
    // of a 1-byte payload and a 16 KiB header, and refuses the fourth.
    let answers = publish_each(
        &d,
        (0..4)
            .map(|i| {
                request(
                    "held.x",
                    b"x".to_vec(),
                    &[("h", &value)],
                    &format!("key-{i}"),
                )
            })
            .collect(),
    );
    for answer in &answers[..3] {
        assert_eq!(answer.as_ref().unwrap().instances, 1);
    }
    let (code, message) = refused(&answers[3]);
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("instance `held` has 49197 bytes waiting"),
        "{message}"
    );
}

#[test]
fn error_texts_quote_at_most_200_characters_of_the_input_and_undecodable_requests_are_invalid() {
    // A 1 MiB topic was quoted whole: the status was too large for its header and the
    // client saw RESOURCE_EXHAUSTED (or a broken stream) instead of the reason.
    let d = Daemon::start(sandbox(&["fx-echo"]), ECHO);
    let long = "a".repeat(1 << 20);
    let answers = publish_each(&d, vec![request(&long, b"x".to_vec(), &[], "")]);
    let (code, message) = refused(&answers[0]);
    assert_eq!(
        code,
        tonic::Code::InvalidArgument,
        "{}",
        &message[..message.len().min(300)]
    );
    assert!(message.len() < 400, "{} bytes", message.len());
    assert!(
        message.contains(&format!("{}…\" (1048576 bytes)", "a".repeat(200))),
        "{message}"
    );
    // Operators' calls too.
    let name = "n".repeat(100_000);
    let status = with_client(&d, async |c| {
        let request = c.request(pb::InstanceRequest { name: name.clone() });
        c.control.pause(request).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(
        status.message().len() < 400,
        "{} bytes",
        status.message().len()
    );
    // A request that is not protobuf (a string field that is not UTF-8) is the sender's
    // fault: INVALID_ARGUMENT, not INTERNAL.
    let status = with_client(&d, async |c| {
        let mut grpc = tonic::client::Grpc::new(c.channel.clone());
        grpc.ready().await.unwrap();
        grpc.unary(
            tonic::Request::new(vec![0x0a, 0x02, 0xff, 0xfe]),
            tonic::codegen::http::uri::PathAndQuery::from_static("/plugind.v1.Publisher/Publish"),
            Raw,
        )
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("undecodable message: "),
        "{status:?}"
    );
    d.publish("demo.after", "still served", &[]).unwrap();
}

/// Bytes as they are, for requests the generated client would not send.
#[derive(Debug, Clone, Copy)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

#[test]
fn a_keyed_stream_batch_is_recorded_in_one_commit_and_its_repeats_are_duplicates() {
    // Keyed publishes went one message per submission, serialized daemon-wide (2.5k msgs/s
    // against 104k without keys): a batch of 200 keys took 200 commits.
    let config = "\
[host]
autoload = false

[plugins.held]
plugin = \"fx-echo\"
topics = [\"held.>\"]
enabled = false
";
    let d = Daemon::start(sandbox(&["fx-echo"]), config);
    let commits = || -> u64 {
        let out = d.cli(&["ctl", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status["ledger"]["commits"].as_u64().unwrap()
    };
    let before = commits();
    let results: Vec<pb::PublishBatchResult> = with_client(&d, async |c| {
        let batch = |correlation_id, keys: &[String]| pb::PublishBatch {
            correlation_id,
            messages: keys
                .iter()
                .map(|k| request("held.k", b"x".to_vec(), &[], k))
                .collect(),
        };
        let mut first: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
        first.push("key-7".into());
        // The second batch repeats keys of the first, still in flight.
        let second = vec!["key-3".to_owned(), "fresh".to_owned()];
        let request = c.request(tokio_stream::iter(vec![
            batch(1, &first),
            batch(2, &second),
        ]));
        let mut answers = c
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
    let id = |o: &pb::PublishOutcome| match o.outcome {
        Some(pb::publish_outcome::Outcome::Id(id)) => (id, o.duplicate),
        ref other => panic!("{other:?}"),
    };
    let first: Vec<(u64, bool)> = results[0].outcomes.iter().map(id).collect();
    let second: Vec<(u64, bool)> = results[1].outcomes.iter().map(id).collect();
    assert!(first[..200].iter().all(|(_, duplicate)| !duplicate));
    assert_eq!(first[200], (first[7].0, true));
    assert_eq!(second[0], (first[3].0, true));
    assert!(!second[1].1);
    let commits = commits() - before;
    assert!(
        commits < 20,
        "{commits} commits for 202 keyed messages in two batches"
    );
}

/// A SIGTERM while the daemon starts (an instance's `new` still running) stops it gracefully
/// once it is up. The handler used to be installed only when the daemon first waited for a
/// stop, after the start: a SIGTERM before that (or just after READY) took its default
/// action and killed the daemon.
#[test]
fn a_sigterm_during_the_start_stops_the_daemon_gracefully_once_it_is_up() {
    let s = sandbox(&["fx-block"]);
    let gate = s.path().join("gate");
    s.put(
        "plugins.toml",
        format!(
            "[host]\nautoload = false\n\n[plugins.slow]\nplugin = \"fx-block\"\n\
             topics = [\"t.>\"]\ninit_timeout = \"30s\"\n\n[plugins.slow.config]\n\
             gate = \"{}\"\nblock_new = true\n",
            gate.display()
        ),
    );
    let mut d = Daemon::restart_unwatched(s);
    // The API is bound before the instances start: `new` is waiting for the gate now.
    let started = Instant::now();
    while !d.socket().exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never bound:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&gate, b"").unwrap();
    let status = d
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("it did not stop:\n{}", d.log()));
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(d.log().contains("SIGTERM received"), "{}", d.log());
}
