//! The API against hostile or careless peers, end to end with the real daemon: connections
//! that say nothing or stay idle are closed, a connection beyond `max_connections` is
//! refused with a status that says so, accepting at the file-descriptor limit backs off
//! instead of spinning, publishing does not allow operating (Unix socket and TCP tokens), one
//! uid cannot take every `Watch` stream, TLS on the TCP listener, and weak settings warned of
//! at start.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use plugind_tests::{binary, daemon::Daemon, ledger_support::wait_until, sandbox::Sandbox};

/// A sandbox with `fx-echo` in `plugins.d`, reachable by other users (its folder 0755).
fn sandbox(label: &str) -> Sandbox {
    let sandbox = Sandbox::with_fixtures(label, &["fx-echo"]);
    fs::set_permissions(sandbox.path(), fs::Permissions::from_mode(0o755)).unwrap();
    sandbox
}

const ECHO: &str = "[plugins.echo]\nplugin = \"fx-echo\"\ntopics = [\"echo.>\"]\n";

/// A `[host]` section listening on `api.sock` in the sandbox, with `more`, and one instance.
fn unix_config(s: &Sandbox, more: &str) -> String {
    format!(
        "[host]\nautoload = false\nlisten = \"unix:{}\"\n{more}\n{ECHO}",
        s.path().join("api.sock").display()
    )
}

/// `plugind ARGS --connect ENDPOINT` as `uid` (65534 is nobody), with `env`.
fn plugind_as(uid: Option<u32>, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ])
            .arg(binary::plugind());
            c
        }
        None => Command::new(binary::plugind()),
    };
    command
        .args(args)
        .args(["--connect", endpoint])
        .current_dir("/")
        .env_remove("PLUGIND_CONFIG")
        .env_remove("PLUGIND_CONNECT")
        .env_remove("PLUGIND_TOKEN")
        .env_remove("PLUGIND_TLS_CA")
        .envs(env.iter().copied());
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("plugind runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn unix(s: &Path) -> String {
    format!("unix:{}", s.join("api.sock").display())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Bug: idle connections were never closed, nor connections that never sent anything.
#[test]
fn a_silent_connection_and_an_idle_one_are_closed() {
    let s = sandbox("api-idle");
    let config = unix_config(&s, "idle_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n");
    let socket = s.path().join("api.sock");
    let d = Daemon::start(s, &config);

    // Connected, and never a byte: closed after handshake_timeout (EOF), not held for ever.
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // (The daemon's SETTINGS frame comes first, then the end.)
    let mut received = Vec::new();
    let read = silent.read_to_end(&mut received);
    assert!(
        read.is_ok(),
        "a silent connection was not closed: {read:?} after {} bytes",
        received.len()
    );

    // One call, then nothing: the daemon closes the connection (GOAWAY) after idle_timeout,
    // while the client still holds it open.
    runtime().block_on(async {
        let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
        let mut connection = tokio::spawn(connection);
        let request = http::Request::post("http://localhost/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        client = client.ready().await.unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        // An empty HealthCheckRequest: no compression, length 0.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut answer = response.into_body();
        while answer.data().await.is_some() {}
        let trailers = answer.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
        // `client` stays alive: only the daemon can end the connection now.
        let ended = tokio::time::timeout(Duration::from_secs(30), &mut connection).await;
        assert!(
            ended.is_ok(),
            "an idle connection was still open 30 s after idle_timeout = 1s"
        );
        drop(client);
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Bug: there was no connection limit (new clients hung at the descriptor limit instead).
#[test]
fn a_connection_beyond_max_connections_is_refused_with_a_status_that_says_so() {
    let s = sandbox("api-maxconn");
    let config = unix_config(&s, "max_connections = 3\nhandshake_timeout = \"5m\"\n");
    let socket = s.path().join("api.sock");
    let endpoint = unix(s.path());
    let d = Daemon::start(s, &config);
    let held: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    // The daemon has accepted them (they hold the slots) once a fourth is refused.
    let mut refused = None;
    wait_until("a refusal at max_connections", &d, || {
        let out = run(&mut plugind_as(None, &endpoint, &["ctl", "status"], &[]));
        let failed = !out.status.success();
        if failed {
            refused = Some(out);
        }
        failed
    });
    let refused = refused.unwrap();
    let text = stderr(&refused);
    assert!(
        text.contains("serves 3 connections already (max_connections)"),
        "{text}"
    );
    drop(held);
    wait_until("room again", &d, || {
        run(&mut plugind_as(None, &endpoint, &["ctl", "status"], &[]))
            .status
            .success()
    });
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// User and system CPU time of process `pid`, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: fields 3 onwards; utime and stime are 14, 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Bug: at the file-descriptor limit the accept loop retried at once, spinning a core with
/// nothing logged, and clients hung.
#[test]
fn at_the_descriptor_limit_accepting_backs_off_says_so_once_and_recovers() {
    let s = sandbox("api-emfile");
    let config = unix_config(&s, "handshake_timeout = \"5m\"\n");
    let socket = s.path().join("api.sock");
    let endpoint = unix(s.path());
    let d = Daemon::start(s, &config);
    let pid = d.pid();
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 8;
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit failed");
    // More connections than descriptors left: the kernel queues the rest, accept fails.
    let held: Vec<UnixStream> = (0..30)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    wait_until("the daemon at its descriptor limit", &d, || {
        fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count) >= limit - 1
    });
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(pid) - before;
    // 100 ticks a second: spinning takes close to 300 of a core; backing off, a few.
    assert!(
        used < 100,
        "the daemon used {used} ticks of CPU in 3 s while it could not accept"
    );
    let log = d.log();
    assert_eq!(log.matches("cannot accept connections").count(), 1, "{log}");
    drop(held);
    wait_until("clients served again", &d, || {
        run(&mut plugind_as(None, &endpoint, &["ctl", "status"], &[]))
            .status
            .success()
    });
    assert!(d.log().contains("accepting connections again"));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Bug: any peer allowed to publish could purge, forget or set the log level.
#[test]
fn on_the_unix_socket_a_publisher_may_not_operate_until_made_an_operator() {
    let s = sandbox("api-operators");
    let config = unix_config(&s, "socket_mode = \"0666\"\nallowed_users = [\"nobody\"]\n");
    let endpoint = unix(s.path());
    let d = Daemon::start(s, &config);
    let nobody = |args: &[&str]| run(&mut plugind_as(Some(65534), &endpoint, args, &[]));
    let published = nobody(&["publish", "echo.x", "hi"]);
    assert!(published.status.success(), "{published:?}");
    for args in [
        &["ctl", "status"][..],
        &["ctl", "purge", "--all", "--yes"],
        &["ctl", "forget", "echo", "--yes"],
        &["ctl", "log-level", "trace"],
    ] {
        let out = nobody(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let text = stderr(&out);
        assert!(
            text.contains("permission denied: uid 65534 lacks the operate permission")
                && text.contains("(it may publish only)")
                && text.contains("operator_users"),
            "{args:?}: {text}"
        );
    }
    // The daemon's own user (root here) operates.
    let ours = run(&mut plugind_as(None, &endpoint, &["ctl", "status"], &[]));
    assert!(ours.status.success(), "{ours:?}");
    let (status, sandbox) = d.stop_keeping_state();
    assert!(status.success());

    // Made an operator: it may.
    let config = unix_config(
        &sandbox,
        "socket_mode = \"0666\"\nallowed_users = [\"nobody\"]\noperator_users = [\"nobody\"]\n",
    );
    let d = Daemon::start(sandbox, &config);
    let out = nobody(&["ctl", "status"]);
    assert!(out.status.success(), "{out:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Bug: over TCP the one token allowed publishing and operating alike.
#[test]
fn over_tcp_the_publish_token_does_not_operate_and_the_operator_token_does() {
    let s = sandbox("api-tokens");
    let publish_token = s.put("publish.token", "pub-secret\n");
    let operator_token = s.put("operator.token", "ops-secret\n");
    for file in [&publish_token, &operator_token] {
        fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let endpoint = format!("tcp:127.0.0.1:{port}");
    let host = format!(
        "[host]\nautoload = false\nlisten = \"{endpoint}\"\ntcp_token_file = \"{}\"\n",
        publish_token.display()
    );
    let d = Daemon::start(s, &format!("{host}\n{ECHO}"));
    let with = |token: &str, args: &[&str]| {
        run(&mut plugind_as(
            None,
            &endpoint,
            args,
            &[("PLUGIND_TOKEN", token)],
        ))
    };
    assert!(
        with("pub-secret", &["publish", "echo.x", "hi"])
            .status
            .success()
    );
    // No operator token configured: nobody operates over TCP, and the answer says how.
    let out = with("pub-secret", &["ctl", "status"]);
    assert!(
        stderr(&out).contains("permission denied")
            && stderr(&out).contains("set [host] tcp_operator_token_file"),
        "{out:?}"
    );
    let (status, sandbox) = d.stop_keeping_state();
    assert!(status.success());

    let config = format!(
        "{host}tcp_operator_token_file = \"{}\"\n\n{ECHO}",
        operator_token.display()
    );
    let d = Daemon::start(sandbox, &config);
    let out = with("pub-secret", &["ctl", "forget", "echo", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("the token given is the publish token (tcp_token_file)"),
        "{out:?}"
    );
    assert!(with("ops-secret", &["ctl", "status"]).status.success());
    // The operator token publishes too; a wrong one does neither.
    assert!(
        with("ops-secret", &["publish", "echo.x", "hi"])
            .status
            .success()
    );
    let wrong = with("ops-secreT", &["publish", "echo.x", "hi"]);
    assert!(stderr(&wrong).contains("wrong token"), "{wrong:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `plugind ctl watch` as `uid`, its first line read (so its stream is open).
fn watcher(uid: Option<u32>, endpoint: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = plugind_as(uid, endpoint, &["ctl", "watch"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "ctl watch printed nothing");
    (child, out)
}

/// Bug: one peer could open all 64 `Watch` streams and shut every operator out.
#[test]
fn one_uid_holds_at_most_its_share_of_the_watch_streams() {
    let s = sandbox("api-watch-share");
    let config = unix_config(
        &s,
        "socket_mode = \"0666\"\noperator_users = [\"nobody\"]\n",
    );
    let endpoint = unix(s.path());
    let d = Daemon::start(s, &config);
    let share = plugind::control::operator::WATCHERS_PER_PEER;
    let mut open: Vec<_> = (0..share)
        .map(|_| watcher(Some(65534), &endpoint))
        .collect();
    let more = run(&mut plugind_as(
        Some(65534),
        &endpoint,
        &["ctl", "watch", "--count", "1"],
        &[],
    ));
    assert!(!more.status.success(), "{more:?}");
    assert!(
        stderr(&more).contains(&format!(
            "uid 65534 has {share} Watch streams open, the most one peer may hold"
        )),
        "{more:?}"
    );
    // Another uid still gets one.
    let root = run(&mut plugind_as(
        None,
        &endpoint,
        &["ctl", "watch", "--count", "1"],
        &[],
    ));
    assert!(root.status.success(), "{root:?}");
    for (child, _) in &mut open {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Weak settings are said at start (they were silent).
#[test]
fn weak_settings_are_warned_of_at_start() {
    let s = sandbox("api-weak");
    let config = unix_config(&s, "socket_mode = \"0666\"\n");
    let d = Daemon::start(s, &config);
    let log = d.log();
    assert!(
        log.contains("weak setting: socket_mode 0666 lets every local user connect"),
        "{log}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Bug: a TCP listener carried its token in plaintext; there was no TLS.
#[test]
fn a_tls_listener_serves_clients_that_trust_its_certificate_and_no_others() {
    let s = sandbox("api-tls");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = s.put("cert.pem", certified.cert.pem());
    let key = s.put("key.pem", certified.signing_key.serialize_pem());
    let publish_token = s.put("publish.token", "pub-secret\n");
    let operator_token = s.put("operator.token", "ops-secret\n");
    for file in [&key, &publish_token, &operator_token] {
        fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let config = format!(
        "[host]\nautoload = false\nlisten = \"tcps:127.0.0.1:{port}\"\n\
         tcp_token_file = \"{}\"\ntcp_operator_token_file = \"{}\"\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\n{ECHO}",
        publish_token.display(),
        operator_token.display(),
        cert.display(),
        key.display()
    );
    let d = Daemon::start(s, &config);
    let ca = cert.display().to_string();
    let tls = format!("tcps:127.0.0.1:{port}");
    let status = run(&mut plugind_as(
        None,
        &tls,
        &["ctl", "status", "--tls-ca", &ca],
        &[("PLUGIND_TOKEN", "ops-secret")],
    ));
    assert!(status.status.success(), "{status:?}");
    let published = run(&mut plugind_as(
        None,
        &format!("tcps:localhost:{port}"),
        &["publish", "echo.x", "hi"],
        &[("PLUGIND_TOKEN", "pub-secret"), ("PLUGIND_TLS_CA", &ca)],
    ));
    assert!(published.status.success(), "{published:?}");
    // Without the CA: refused before anything is sent.
    let no_ca = run(&mut plugind_as(
        None,
        &tls,
        &["ctl", "status"],
        &[("PLUGIND_TOKEN", "ops-secret")],
    ));
    assert!(
        stderr(&no_ca).contains("TLS needs the CA certificate"),
        "{no_ca:?}"
    );
    // Trusting another CA: the handshake fails.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other_ca = d.sandbox().put("other.pem", other.cert.pem());
    let untrusted = run(&mut plugind_as(
        None,
        &tls,
        &["ctl", "status", "--tls-ca", &other_ca.display().to_string()],
        &[("PLUGIND_TOKEN", "ops-secret")],
    ));
    assert!(!untrusted.status.success(), "{untrusted:?}");
    // Plaintext to a TLS listener: no answer is served.
    let plain = run(&mut plugind_as(
        None,
        &format!("tcp:127.0.0.1:{port}"),
        &["ctl", "status"],
        &[("PLUGIND_TOKEN", "ops-secret")],
    ));
    assert!(!plain.status.success(), "{plain:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
