//! The `webhook` example plugin end to end: the real daemon posts to a local HTTP server
//! started by each test; 2xx acks, 5xx (honouring Retry-After) and timeouts retry, other
//! 4xx dead-letter at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use plugind_tests::{
    binary,
    daemon::Daemon,
    http_server::{Answer, HttpServer},
    ledger_support::wait_until,
    sandbox::Sandbox,
};

fn deploy(label: &str, url: &str, extra_config: &str) -> (Sandbox, String) {
    let s = Sandbox::new(label);
    s.dir("plugins.d");
    s.copy(
        "plugins.d/libwebhook.so",
        &binary::example_plugin("webhook"),
    );
    let config = format!(
        "[host]\nautoload = false\ngrace_period = \"3s\"\n\n\
         [defaults]\nmax_attempts = 3\nbackoff = {{ initial = \"50ms\", max = \"50ms\", \
         jitter = 0.0 }}\n\n\
         [plugins.hook]\nplugin = \"webhook\"\ntopics = [\"orders.>\"]\nmax_in_flight = 64\n\
         [plugins.hook.config]\nurl = \"{url}/in\"\n{extra_config}\n"
    );
    (s, config)
}

fn instance(d: &Daemon) -> serde_json::Value {
    let out = d.cli(&["ctl", "plugins", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "hook")
        .cloned()
        .unwrap()
}

fn show(d: &Daemon, id: u64) -> serde_json::Value {
    let out = d.cli(&["ctl", "show", &id.to_string(), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    shown["deliveries"][0].clone()
}

#[test]
fn each_message_is_posted_with_its_headers_and_a_2xx_acks_it() {
    let server = HttpServer::start(|_| Answer::status(204));
    let (s, config) = deploy(
        "webhook-ack",
        &server.url(),
        "timeout = \"5s\"\nheaders = { authorization = \"Bearer t0ken\" }",
    );
    let d = Daemon::start(s, &config);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            d.publish("orders.new", &format!("order {i}"), &["-H", "customer=c42"])
                .unwrap(),
        );
    }
    wait_until("5 acks", &d, || instance(&d)["acked"] == 5);
    let received = server.received();
    assert_eq!(received.len(), 5, "{received:?}");
    for request in &received {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/in")
        );
        assert_eq!(request.header("x-plugind-topic"), Some("orders.new"));
        assert_eq!(request.header("x-plugind-attempt"), Some("1"));
        assert_eq!(request.header("customer"), Some("c42"));
        assert_eq!(request.header("authorization"), Some("Bearer t0ken"));
        let id: u64 = request.header("x-plugind-id").unwrap().parse().unwrap();
        let i = ids.iter().position(|x| *x == id).unwrap();
        assert_eq!(request.body, format!("order {i}").into_bytes());
    }
    assert_eq!(instance(&d)["failures"], 0);
    d.stop();
}

#[test]
fn a_5xx_is_retried_after_its_retry_after_then_acked() {
    let calls = Arc::new(AtomicUsize::new(0));
    let server = HttpServer::start({
        let calls = calls.clone();
        move |_| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Answer {
                    status: 503,
                    headers: vec![("retry-after".into(), "1".into())],
                    delay: Duration::ZERO,
                }
            } else {
                Answer::status(200)
            }
        }
    });
    let (s, config) = deploy("webhook-retry", &server.url(), "");
    let d = Daemon::start(s, &config);
    d.publish("orders.new", "x", &[]).unwrap();
    wait_until("an ack", &d, || instance(&d)["acked"] == 1);
    let received = server.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].header("x-plugind-attempt"), Some("2"));
    // Retry-After: 1 s, not the instance's 50 ms backoff.
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    assert_eq!(instance(&d)["failures"], 1);
    d.stop();
}

#[test]
fn another_4xx_dead_letters_at_once_and_a_timeout_retries() {
    let server = HttpServer::start(|request| match request.header("x-plugind-topic") {
        Some("orders.bad") => Answer::status(422),
        // The first attempt answers too late for the 300 ms timeout.
        _ if request.header("x-plugind-attempt") == Some("1") => Answer {
            status: 200,
            headers: Vec::new(),
            delay: Duration::from_secs(3),
        },
        _ => Answer::status(200),
    });
    let (s, config) = deploy("webhook-4xx", &server.url(), "timeout = \"300ms\"");
    let d = Daemon::start(s, &config);
    let bad = d.publish("orders.bad", "x", &[]).unwrap();
    let slow = d.publish("orders.slow", "y", &[]).unwrap();
    wait_until("a dead letter and an ack", &d, || {
        let i = instance(&d);
        i["dead_lettered"] == 1 && i["acked"] == 1
    });
    let dead = show(&d, bad);
    assert_eq!(dead["deliveries"], 1, "{dead}");
    let reason = dead["last_reason"].as_str().unwrap();
    assert!(reason.contains("422"), "{reason}");
    let _ = slow;
    assert_eq!(instance(&d)["failures"], 1, "the timeout");
    d.stop();
}
