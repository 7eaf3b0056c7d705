//! The control plane end to end: every `plugind ctl` command against a running daemon (text
//! and `--json`), an enable/disable round trip that keeps `plugins.toml`'s comments and
//! layout, the `Watch` stream (snapshot first, events in order, a slow subscriber ended with
//! RESOURCE_EXHAUSTED, UNAVAILABLE at shutdown), health checking (NOT_SERVING during the
//! drain), server reflection, a peer that is not allowed, and TCP with and without the token.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use plugind::{
    config::Endpoint,
    control::{client, pb},
};
use plugind_tests::{binary, daemon::Daemon, ledger_support::wait_until, sandbox::Sandbox};
use sha2::Digest as _;
use tokio_stream::StreamExt as _;

/// A sandbox with `fx-echo` (acks; the `outcome` header asks for `reject`) in `plugins.d`.
fn sandbox(label: &str) -> Sandbox {
    Sandbox::with_fixtures(label, &["fx-echo"])
}

/// Two echo instances, with comments and a layout `enable`/`disable` must keep.
const CONFIG: &str = "\
# The control-plane test deployment.
[host]
autoload = false   # only what is listed here
grace_period = \"3s\"

[defaults]
max_attempts = 2
backoff = { initial = \"10ms\", max = \"10ms\", jitter = 0.0 }

# The first instance.
[plugins.a]
plugin = \"fx-echo\"
topics = [\"echo.>\"]   # everything

[plugins.b]
plugin   = \"fx-echo\"
topics   = [\"echo.b\"]
";

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    d.cli(&all)
}

/// Runs a `ctl` command that must succeed; its stdout.
fn ok(d: &Daemon, args: &[&str]) -> String {
    let out = ctl(d, args);
    assert!(
        out.status.success(),
        "plugind ctl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = ok(d, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

fn instance(status: &serde_json::Value, name: &str) -> serde_json::Value {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .clone()
}

#[test]
fn status_plugins_show_pause_resume_dead_letters_replay_purge_forget_and_log_level() {
    let d = Daemon::start(sandbox("ctl-commands"), CONFIG);
    let status = ok(&d, &["status"]);
    assert!(status.contains("durability fsync"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["a", "running"])),
        "{status}"
    );
    let status = json(&d, &["status"]);
    assert_eq!(instance(&status, "a")["state"], "running");
    assert_eq!(status["durability"], "fsync");

    let plugins = json(&d, &["plugins"]);
    let a = instance(&plugins, "a");
    assert_eq!(
        (&a["plugin"], &a["generation"], &a["circuit"]),
        (&"fx-echo".into(), &1.into(), &"closed".into())
    );
    assert!(ok(&d, &["plugins"]).contains("fx-echo"));

    // A message both instances reject: two dead letters, each with its history.
    let id = d
        .publish("echo.b", "no", &["-H", "outcome=reject"])
        .unwrap();
    wait_until("two dead letters", &d, || {
        json(&d, &["dead-letters"])["dead_letters"]
            .as_array()
            .unwrap()
            .len()
            == 2
    });
    let shown = json(&d, &["show", &id.to_string()]);
    assert_eq!(shown["topic"], "echo.b");
    assert_eq!(shown["payload_preview"], "no");
    assert_eq!(shown["deliveries"][0]["state"], "dead_lettered");
    let text = ok(&d, &["show", &id.to_string()]);
    assert!(
        text.contains("a: dead lettered after 1 delivery: rejected: asked to reject"),
        "a reject is shown as the plugin's verdict, not as 0 failures: {text}"
    );
    assert!(!text.contains("rejected: rejected"), "{text}");
    assert!(!text.contains("0 failures"), "{text}");
    // Times to the millisecond: `published 2026-12-06 04:39:04.527`.
    let published = text.lines().next().unwrap();
    assert!(
        published
            .rsplit_once(':')
            .is_some_and(|(_, s)| s.len() == 6 && s.as_bytes()[2] == b'.'),
        "{published}"
    );
    // Paged: one at a time, the cursor printed.
    let page = json(&d, &["dead-letters", "--limit", "1"]);
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap().to_owned();
    let rest = json(&d, &["dead-letters", "--limit", "1", "--after", &next]);
    assert_eq!(rest["dead_letters"][0]["instance"], "b");
    assert!(rest["next"].is_null(), "{rest}");
    // Replay asks for confirmation without --yes (no terminal here: refused, exit 2).
    let refused = ctl(&d, &["replay", "--instance", "a"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let replayed = json(&d, &["replay", "--instance", "a", "--yes"]);
    assert_eq!(replayed["queued"], 1);
    // Rejected again (its header says so), and purged for good.
    wait_until("a's dead letter is back", &d, || {
        json(&d, &["dead-letters", "--instance", "a"])["dead_letters"]
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    assert_eq!(json(&d, &["purge", "--all", "--yes"])["purged"], 2);
    assert!(ok(&d, &["dead-letters"]).contains("no dead letters"));
    let gone = ctl(&d, &["show", &id.to_string()]);
    assert!(!gone.status.success(), "gone");
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("every delivery of it ended"),
        "a message that was accepted and settled is not called unknown: {gone:?}"
    );
    let never = ctl(&d, &["show", "999999"]);
    assert!(
        String::from_utf8_lossy(&never.stderr).contains("no message 999999 has been accepted"),
        "{never:?}"
    );

    // Pause: nothing more is handed out; resume: it flows again.
    assert!(ok(&d, &["pause", "a"]).contains("paused"));
    wait_until("a is paused", &d, || {
        instance(&json(&d, &["status"]), "a")["state"] == "paused"
    });
    d.publish("echo.x", "held", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(instance(&json(&d, &["status"]), "a")["backlog"], 1);
    ok(&d, &["resume", "a"]);
    wait_until("a's backlog drains", &d, || {
        instance(&json(&d, &["status"]), "a")["backlog"] == 0
    });
    // Forget is refused while plugins.toml configures the instance, naming the table…
    ok(&d, &["pause", "a"]);
    d.publish("echo.x", "waiting", &[]).unwrap();
    let refused = ctl(&d, &["forget", "a", "--purge", "--yes"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("plugind: ctl forget: instance `a` is configured by [plugins.a]"),
        "{stderr}"
    );
    // …its table removed, its subscription ends and what waits for it stays…
    let path = d.sandbox().path().join("plugins.toml");
    let without_a = CONFIG.replace(
        "# The first instance.\n[plugins.a]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]   # everything\n\n",
        "",
    );
    assert_ne!(without_a, CONFIG);
    fs::write(&path, &without_a).unwrap();
    ok(&d, &["reload"]);
    let a = instance(&json(&d, &["plugins"]), "a");
    assert_eq!(
        (&a["state"], &a["backlog"], &a["subscription"]),
        (&"removed".into(), &1.into(), &serde_json::Value::Null),
        "{a}"
    );
    assert!(ok(&d, &["plugins"]).contains("`plugind ctl forget a` drops them"));
    // (nothing more is routed to it: echo.x reaches no instance now)
    let unrouted = d.cli(&["publish", "echo.x", "nobody"]);
    assert!(unrouted.status.success());
    assert!(
        String::from_utf8_lossy(&unrouted.stderr).contains("no instance subscribes to this topic"),
        "{unrouted:?}"
    );
    assert_eq!(instance(&json(&d, &["plugins"]), "a")["backlog"], 1);
    // …until it is forgotten: its deliveries go, and so does the instance.
    let forgotten = json(&d, &["forget", "a", "--purge", "--yes"]);
    assert_eq!(forgotten["forgotten"], 1);
    assert!(
        json(&d, &["plugins"])["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["name"] != "a")
    );
    assert_eq!(json(&d, &["status"])["unrouted"], 1);
    // Unknown names and bad input are clear errors.
    let unknown = ctl(&d, &["pause", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .starts_with("plugind: ctl pause: no instance \"nope\""),
        "{unknown:?}"
    );
    assert_eq!(json(&d, &["log-level", "debug"])["level"], "debug");
    let bad = ctl(&d, &["log-level", "no such level!"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a log filter"));
    // Reload: nothing changed, said so; with a name, that instance anew, said so.
    assert!(ok(&d, &["reload"]).contains("nothing changed"));
    let renewed = ok(&d, &["reload", "b"]);
    assert!(renewed.contains("b instantiated anew"), "{renewed}");
    assert_eq!(instance(&json(&d, &["plugins"]), "b")["generation"], 2);
    // A refused configuration fails the command (ExecReload), naming the place.
    fs::write(&path, format!("{CONFIG}\n[plugins.c]\nplugin = 7\n")).unwrap();
    let refused = ctl(&d, &["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("plugind: ctl reload: ") && stderr.contains("plugins.toml:20:"),
        "{stderr}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn enable_and_disable_edit_plugins_toml_keeping_its_comments_and_layout() {
    let d = Daemon::start(sandbox("ctl-toggle"), CONFIG);
    let path = d.sandbox().path().join("plugins.toml");
    let out = ok(&d, &["disable", "b"]);
    assert!(
        out.contains("b: disabled") && out.contains("b stopped"),
        "{out}"
    );
    let edited = fs::read_to_string(&path).unwrap();
    assert_eq!(
        edited,
        CONFIG.replace(
            "topics   = [\"echo.b\"]\n",
            "topics   = [\"echo.b\"]\nenabled = false\n"
        ),
        "only the one key was added"
    );
    assert_eq!(instance(&json(&d, &["status"]), "b")["state"], "disabled");
    d.wait_for_log("instance stopped; its deliveries wait", 1);
    let out = json(&d, &["enable", "b"]);
    assert_eq!(out["changes"]["b"], "start", "{out}");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        CONFIG.replace(
            "topics   = [\"echo.b\"]\n",
            "topics   = [\"echo.b\"]\nenabled = true\n"
        )
    );
    assert_eq!(instance(&json(&d, &["status"]), "b")["state"], "running");
    let missing = ctl(&d, &["enable", "zzz"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no [plugins.zzz] table"));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn an_edit_the_watcher_applied_first_is_answered_with_what_it_changed() {
    // `ctl enable` writes the file and then asks for a reload of exactly those bytes; the
    // watcher may read the file first. The answer is still what applying them changed.
    let d = Daemon::start(sandbox("ctl-raced"), CONFIG);
    let path = d.sandbox().path().join("plugins.toml");
    let edited = CONFIG.replace(
        "topics   = [\"echo.b\"]\n",
        "topics   = [\"echo.b\"]\nenabled = false\n",
    );
    let temp = d.sandbox().path().join(".plugins.toml.new");
    fs::write(&temp, &edited).unwrap();
    fs::rename(&temp, &path).unwrap();
    d.wait_for_log("configuration applied", 1);
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let reload = |expected_sha256: String| {
        runtime().block_on(async {
            let mut c = client::connect(&endpoint, None).await.unwrap();
            c.control
                .reload(c.request(pb::ReloadRequest {
                    expected_sha256,
                    instance: String::new(),
                }))
                .await
                .unwrap()
                .into_inner()
        })
    };
    let change = |r: &pb::ReloadResponse, name: &str| {
        r.changes
            .iter()
            .find(|c| c.instance == name)
            .map(|c| c.change.clone())
    };
    let hash = sha2::Sha256::digest(edited.as_bytes());
    let raced = reload(hex::encode(hash));
    assert_eq!(change(&raced, "b").as_deref(), Some("stop"), "{raced:?}");
    assert_eq!(
        change(&raced, "a").as_deref(),
        Some("unchanged"),
        "{raced:?}"
    );
    // A plain reload of the same bytes changes nothing, and says so.
    let plain = reload(String::new());
    assert_eq!(
        change(&plain, "b").as_deref(),
        Some("unchanged"),
        "{plain:?}"
    );
    // `ctl disable` of what the file already says leaves the file alone and says so.
    let modified = fs::metadata(&path).unwrap().modified().unwrap();
    let out = ok(&d, &["disable", "b"]);
    assert!(out.starts_with("b: already disabled in "), "{out}");
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), modified);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `plugind ctl watch --json` in the background; its lines as they come.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn start(d: &Daemon, extra: &[&str]) -> Self {
        let mut child = Command::new(binary::plugind())
            .args(["ctl", "watch", "--json"])
            .args(extra)
            .arg("--connect")
            .arg(format!("unix:{}", d.socket().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines }
    }

    fn next(&self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("an event within 10 s");
        serde_json::from_str(&line).unwrap()
    }
}

#[test]
fn watch_starts_with_a_snapshot_then_streams_events_and_ends_with_unavailable_at_shutdown() {
    let d = Daemon::start(sandbox("ctl-watch"), CONFIG);
    let w = Watcher::start(&d, &[]);
    let first = w.next();
    assert_eq!(first["snapshot"], true, "{first}");
    assert_eq!(first["event"]["event"], "loaded");
    assert_eq!(w.next()["event"]["event"], "loaded");
    ok(&d, &["pause", "b"]);
    let event = w.next();
    assert_eq!(
        (
            &event["snapshot"],
            &event["event"]["event"],
            &event["event"]["state"]
        ),
        (&false.into(), &"circuit".into(), &"paused".into())
    );
    ok(&d, &["disable", "b"]);
    let mut kinds = Vec::new();
    let mut last_seq = event["seq"].as_u64().unwrap();
    while kinds.last() != Some(&"config_applied".to_owned()) {
        let e = w.next();
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "in order: {seq} after {last_seq}");
        last_seq = seq;
        kinds.push(e["event"]["event"].as_str().unwrap().to_owned());
    }
    assert!(kinds.contains(&"stopped".to_owned()), "{kinds:?}");
    // Shutdown ends the stream with UNAVAILABLE: the command says so and fails.
    let Watcher { child, .. } = w;
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the daemon is shutting down"),
        "{out:?}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_watcher_that_falls_behind_is_ended_with_resource_exhausted() {
    let d = Daemon::start(sandbox("ctl-slow-watch"), CONFIG);
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let socket = d.socket().to_owned();
    runtime().block_on(async {
        // A watcher with small HTTP/2 windows, on a connection of its own: what it does not
        // read stays in the daemon's buffers.
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024)
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        let mut watcher = pb::control_client::ControlClient::new(channel);
        let mut stream = watcher
            .watch(pb::WatchRequest {})
            .await
            .unwrap()
            .into_inner();
        // Not read while 3,000 dead letters are announced: far beyond what the buffers hold.
        let mut publisher = client::connect(&endpoint, None).await.unwrap();
        for chunk in 0..30 {
            let messages = (0..100)
                .map(|i| pb::PublishRequest {
                    topic: "echo.b".into(),
                    payload: format!("{chunk}-{i}").into_bytes().into(),
                    headers: vec![pb::Header {
                        name: "outcome".into(),
                        value: "reject".into(),
                    }],
                    key: String::new(),
                })
                .collect::<Vec<_>>();
            for message in messages {
                let request = publisher.request(message);
                publisher.publisher.publish(request).await.unwrap();
            }
        }
        let mut events = 0;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                Ok(Some(Ok(_))) => events += 1,
                Ok(Some(Err(status))) => break status,
                Ok(None) => panic!("the stream ended without a status after {events} events"),
                Err(_) => panic!("the stream neither lagged nor ended after {events} events"),
            }
        };
        assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
        assert!(end.message().contains("fell more than"), "{end:?}");
        assert!(events < 6_000, "{events} events before the end");
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn health_says_not_serving_while_draining_and_reflection_lists_the_services() {
    let (s, config, gate) = plugind_tests::ledger_support::block_sandbox("ctl-health");
    let d = Daemon::start(s, &config);
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let rt = runtime();
    let c = rt.block_on(client::connect(&endpoint, None)).unwrap();
    let check = |c: &client::Client, service: &str| {
        let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
        rt.block_on(health.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        }))
        .map(|r| r.into_inner().status)
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(check(&c, "").unwrap(), ServingStatus::Serving as i32);
    assert_eq!(
        check(&c, "plugind.v1.Control").unwrap(),
        ServingStatus::Serving as i32
    );
    // Reflection (v1): the services are listed for generic tools.
    let services = rt.block_on(async {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(c.channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(Ok(response)) = responses.next().await else {
            panic!("no reflection answer");
        };
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("not a service list");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
    });
    for name in [
        "plugind.v1.Publisher",
        "plugind.v1.Control",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{services:?}");
    }
    // A call in hand keeps the drain going; meanwhile health says NOT_SERVING.
    d.publish("t.x", "held", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    d.signal("TERM");
    let started = Instant::now();
    loop {
        if check(&c, "").ok() == Some(ServingStatus::NotServing as i32) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never NOT_SERVING during the drain:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    fs::write(&gate, "").unwrap();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `plugind ctl status` as uid/gid 65534 (nobody).
fn status_as_nobody(socket: &Path) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary::plugind())
        .args(["ctl", "status", "--connect"])
        .arg(format!("unix:{}", socket.display()))
        .output()
        .expect("setpriv runs")
}

#[test]
fn a_peer_that_is_not_allowed_is_refused_and_tcp_needs_its_token() {
    // The socket is open to everyone by its mode; allowed_users decides.
    let s = sandbox("ctl-peers");
    // Reachable by another user: the socket's own mode and allowed_users are what is tested.
    fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = s.path().join("api.sock");
    let config = format!(
        "[host]\nautoload = false\nlisten = \"unix:{}\"\nsocket_mode = \"0666\"\n\
         allowed_users = [\"daemon\"]\nsocket_group = \"daemon\"\n",
        socket.display()
    );
    let d = Daemon::start(s, &config);
    // The group is set explicitly after bind.
    let (daemon_gid, _) = plugind::loader::group_of("daemon").expect("Debian's daemon group");
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&fs::metadata(&socket).unwrap()),
        daemon_gid
    );
    let out = status_as_nobody(&socket);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("uid 65534 may not use this socket"),
        "{stderr}"
    );
    // Root (the daemon's own user here) is allowed.
    let ours = Command::new(binary::plugind())
        .args(["ctl", "status", "--connect"])
        .arg(format!("unix:{}", socket.display()))
        .output()
        .unwrap();
    assert!(ours.status.success(), "{ours:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");

    // TCP: refused without the token, served with it; enable/disable refused over it.
    let s = sandbox("ctl-tcp");
    let token = s.put("token", "publish-s3cret\n");
    let operator_token = s.put("operator-token", "s3cret\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "[host]\nautoload = false\nlisten = \"tcp:127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\n\
         tcp_operator_token_file = \"{}\"\n\n\
         [plugins.a]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]\n",
        token.display(),
        operator_token.display()
    );
    let d = Daemon::start(s, &config);
    let tcp = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(binary::plugind());
        command
            .arg("ctl")
            .args(args)
            .args(["--connect", &format!("tcp:127.0.0.1:{port}")])
            .env_remove("PLUGIND_CONFIG")
            .current_dir("/");
        match token {
            Some(t) => command.env("PLUGIND_TOKEN", t),
            None => command.env_remove("PLUGIND_TOKEN"),
        };
        command.output().unwrap()
    };
    let without = tcp(&["status"], None);
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("authorization"));
    let with = tcp(&["status"], Some("s3cret"));
    assert!(with.status.success(), "{with:?}");
    let toggle = tcp(&["disable", "a"], Some("s3cret"));
    assert!(!toggle.status.success());
    assert!(
        String::from_utf8_lossy(&toggle.stderr).contains("refused over tcp"),
        "{toggle:?}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn watchers_beyond_the_share_of_one_peer_are_refused_until_one_ends() {
    let d = Daemon::start(sandbox("ctl-watchers"), CONFIG);
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    runtime().block_on(async {
        let mut c = client::connect(&endpoint, None).await.unwrap();
        let mut open = Vec::new();
        for _ in 0..plugind::control::operator::WATCHERS_PER_PEER {
            let stream = c
                .control
                .watch(c.request(pb::WatchRequest {}))
                .await
                .expect("within the limit");
            open.push(stream.into_inner());
        }
        let refused = c
            .control
            .watch(c.request(pb::WatchRequest {}))
            .await
            .expect_err("one too many");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        // One ends: there is room again (its thread notices within half a second).
        open.pop();
        let started = Instant::now();
        loop {
            match c.control.watch(c.request(pb::WatchRequest {})).await {
                Ok(_) => break,
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                    assert!(started.elapsed() < Duration::from_secs(5), "no room again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn replay_and_purge_of_an_unknown_instance_are_not_found_pages_are_capped_and_forget_says_dead_lettered()
 {
    let d = Daemon::start(sandbox("ctl-rough-edges"), CONFIG);
    // Replay and purge answered "0" for a name no instance has (a typo looked like an
    // instance with nothing to do).
    for action in ["replay", "purge"] {
        let out = ctl(&d, &[action, "--instance", "nope", "--yes"]);
        assert_eq!(out.status.code(), Some(1), "{action}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!(
                "plugind: ctl {action}: no instance \"nope\" is subscribed, running or has dead letters"
            )),
            "{stderr}"
        );
    }
    // A known instance without dead letters is not an error.
    assert_eq!(
        json(&d, &["purge", "--instance", "b", "--yes"])["purged"],
        0
    );
    // A page holds at most 1000 dead letters, whatever the limit asked: 1001 rejected.
    let endpoint = Endpoint::Unix(d.socket().to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut c = client::connect(&endpoint, None).await.unwrap();
        let batch = pb::PublishBatch {
            correlation_id: 1,
            messages: (0..1001)
                .map(|i| pb::PublishRequest {
                    topic: "echo.x".into(),
                    payload: format!("{i}").into(),
                    headers: vec![pb::Header {
                        name: "outcome".into(),
                        value: "reject".into(),
                    }],
                    key: String::new(),
                })
                .collect(),
        };
        let request = c.request(tokio_stream::iter(vec![batch]));
        let mut answers = c
            .publisher
            .publish_stream(request)
            .await
            .unwrap()
            .into_inner();
        while let Some(answer) = answers.next().await {
            answer.unwrap();
        }
    });
    wait_until("1001 dead letters", &d, || {
        instance(&json(&d, &["plugins"]), "a")["dead_letters"] == 1001
    });
    let page = json(&d, &["dead-letters", "--limit", "5000"]);
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 1000);
    assert!(page["next"].is_string(), "the next page is offered");
    // Forget in text: "dead-lettered", not "dead-letterd".
    ok(&d, &["pause", "b"]);
    wait_until("b is paused", &d, || {
        instance(&json(&d, &["status"]), "b")["state"] == "paused"
    });
    d.publish("echo.b", "waiting", &[]).unwrap();
    let path = d.sandbox().path().join("plugins.toml");
    let without_b = CONFIG.replace(
        "[plugins.b]\nplugin   = \"fx-echo\"\ntopics   = [\"echo.b\"]\n",
        "",
    );
    assert_ne!(without_b, CONFIG);
    fs::write(&path, &without_b).unwrap();
    ok(&d, &["reload"]);
    let text = ok(&d, &["forget", "b", "--yes"]);
    assert_eq!(text, "b: 1 waiting deliveries forgotten (dead-lettered)\n");
}
