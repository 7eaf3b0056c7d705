//! Table tests of the configuration: each kind of mistake with its exact position and a
//! message naming the key; merging; the plan between two configurations.

use std::{path::Path, time::Duration};

use super::*;

fn problems(text: &str) -> Vec<(usize, usize, String)> {
    match parse(Path::new("/etc/plugind/plugins.toml"), text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(invalid) => invalid
            .problems
            .into_iter()
            .map(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0), p.message))
            .collect(),
    }
}

fn one(text: &str) -> (usize, usize, String) {
    let mut all = problems(text);
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

fn ok(text: &str) -> Config {
    parse(Path::new("/etc/plugind/plugins.toml"), text)
        .unwrap_or_else(|e| panic!("refused:\n{}", e.render()))
}

#[test]
fn each_kind_of_mistake_is_reported_where_it_is() {
    // (config, line, column, words the message must contain)
    let cases: &[(&str, usize, usize, &[&str])] = &[
        (
            "[host\nplugin_dir = \"p\"\n",
            1,
            6,
            &["unclosed table", "expected `]`"],
        ),
        (
            "[host]\nplugin_dri = \"p\"\n",
            2,
            1,
            &[
                "unknown field `plugin_dri`",
                "expected one of",
                "`plugin_dir`",
            ],
        ),
        (
            "[defaults]\nmax_attempts = \"ten\"\n",
            2,
            16,
            &["invalid type: string \"ten\"", "expected u32"],
        ),
        (
            "[defaults]\nack_timeout = \"10x\"\n",
            2,
            15,
            &["invalid duration \"10x\"", "\"250ms\""],
        ),
        (
            "[defaults]\nmax_backlog = \"lots\"\n",
            2,
            15,
            &["invalid size \"lots\"", "\"4MiB\""],
        ),
        (
            "[plugins.sink]\ntopics = [\"orders..eu\"]\n",
            2,
            11,
            &["topic pattern \"orders..eu\"", "empty token at position 2"],
        ),
        (
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\n",
            2,
            10,
            &["`listen` is TCP", "no `tcp_token_file`"],
        ),
        (
            "[plugins.sink]\nsha256 = \"abc\"\n",
            2,
            10,
            &["`sha256` must be 64 hexadecimal digits", "found 3"],
        ),
        (
            "[defaults]\nmax_attempts = 0\n",
            2,
            16,
            &["`max_attempts` is 0", "between 1 and"],
        ),
        (
            "[defaults]\nbackoff = { jitter = 1.5 }\n",
            2,
            22,
            &["`backoff.jitter` is 1.5", "between 0 and 1"],
        ),
        (
            "[plugins.\"bad name\"]\n",
            1,
            10,
            &["instance name `bad name`"],
        ),
        (
            "[plugins.sink]\nbackoff = { initial = \"2m\", max = \"1m\" }\n",
            2,
            23,
            &["`backoff.initial` is longer than `backoff.max`"],
        ),
        (
            "[plugins.sink]\nretries = 3\n",
            2,
            1,
            &["unknown field `retries`", "`max_attempts`"],
        ),
        ("[hosts]\n", 1, 2, &["unknown section `hosts`", "`host`"]),
        (
            "[host]\nwatch = \"fanotify\"\n",
            2,
            9,
            &["unknown variant `fanotify`", "`inotify`", "`poll`"],
        ),
        (
            "[host]\ntrusted_owners = [\"root\", \"no-such-user-xyz\"]\n",
            2,
            27,
            &["no user named `no-such-user-xyz`"],
        ),
        (
            "[host]\nsocket_mode = \"0999\"\n",
            2,
            15,
            &["`socket_mode` \"0999\"", "octal"],
        ),
        (
            "[host]\nstate_dir = \"plugins.d/state\"\n",
            2,
            13,
            &["overlap"],
        ),
    ];
    for (text, line, column, words) in cases {
        let (l, c, message) = one(text);
        for word in *words {
            assert!(
                message.contains(word),
                "{text:?}: `{word}` not in: {message}"
            );
        }
        assert_eq!((l, c), (*line, *column), "{text:?}: {message}");
    }
}

#[test]
fn every_problem_is_listed_not_only_the_first() {
    let text = "\
[host]
listen = \"tcp:0.0.0.0:7070\"

[defaults]
ack_timeout = \"soon\"

[plugins.sink]
topics = [\"a.>.b\"]
max_attempts = 0
";
    let found = problems(text);
    let positions: Vec<(usize, usize)> = found.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(positions, [(2, 10), (5, 15), (8, 11), (9, 16)], "{found:?}");
}

#[test]
fn the_rendered_error_has_the_file_the_position_and_a_caret() {
    let text = "[host]\nplugin_dri = \"p\"\n";
    let invalid = parse(Path::new("plugins.toml"), text).unwrap_err();
    let rendered = invalid.render();
    assert!(
        rendered.starts_with("plugins.toml:2:1: unknown field `plugin_dri`"),
        "{rendered}"
    );
    assert!(
        rendered.ends_with("2 | plugin_dri = \"p\"\n  | ^^^^^^^^^^"),
        "{rendered}"
    );
}

#[test]
fn defaults_and_overrides_merge_field_by_field_and_paths_resolve() {
    let config = ok("\
[host]
plugin_dir = \"plugins.d\"
state_dir = \"/var/lib/plugind\"
max_message_size = \"8MiB\"

[defaults]
max_attempts = 7
backoff = { initial = \"1s\", max = \"5m\" }

[plugins.orders-sink]
plugin = \"file-sink\"
topics = [\"orders.>\"]
backoff = { multiplier = 3.0 }
[plugins.orders-sink.config]
path = \"out/orders.jsonl\"
fsync = true

[plugins.file-sink]
enabled = false
");
    assert_eq!(config.host.plugin_dir, Path::new("/etc/plugind/plugins.d"));
    assert_eq!(config.host.state_dir, Path::new("/var/lib/plugind"));
    assert_eq!(
        config.host.listen,
        Endpoint::Unix("/var/lib/plugind/plugind.sock".into())
    );
    assert_eq!(config.host.max_message_size, 8 << 20);
    let sink = &config.instances["orders-sink"];
    assert_eq!(sink.plugin, "file-sink");
    assert_eq!(sink.settings.max_attempts, 7, "from [defaults]");
    assert_eq!(
        sink.settings.backoff.initial,
        Duration::from_secs(1),
        "from [defaults]"
    );
    assert_eq!(
        sink.settings.backoff.max,
        Duration::from_secs(300),
        "from [defaults]"
    );
    assert_eq!(sink.settings.backoff.multiplier, 3.0, "its own");
    assert_eq!(sink.settings.backoff.jitter, 0.2, "built in");
    assert_eq!(sink.settings.queue_capacity, 1024, "built in");
    assert_eq!(
        sink.config,
        serde_json::json!({"path": "out/orders.jsonl", "fsync": true})
    );
    assert_eq!(sink.topics.as_ref().unwrap()[0].as_str(), "orders.>");
    let other = &config.instances["file-sink"];
    assert_eq!((other.plugin.as_str(), other.enabled), ("file-sink", false));
    assert_eq!(other.topics, None, "the plugin's default topics");
}

#[test]
fn the_hash_is_of_the_bytes() {
    let a = ok("[host]\n");
    let b = ok("[host]\n# a comment\n");
    assert_ne!(a.hash, b.hash);
    assert_eq!(a.hash, ok("[host]\n").hash);
}

fn plan_of(old: &str, new: &str) -> Plan {
    plan(&ok(old), &ok(new))
}

#[test]
fn the_plan_names_what_happens_to_each_instance() {
    let old = "\
[plugins.keep]
[plugins.gone]
[plugins.off]
enabled = false
[plugins.conf]
[plugins.conf.config]
level = 1
[plugins.route]
topics = [\"a.>\"]
[plugins.tune]
[plugins.swap]
plugin = \"one\"
";
    let new = "\
[plugins.keep]
[plugins.off]
[plugins.new]
[plugins.conf]
topics = [\"b.>\"]
[plugins.conf.config]
level = 2
[plugins.route]
topics = [\"a.>\", \"b.*\"]
[plugins.tune]
max_attempts = 9
[plugins.swap]
plugin = \"two\"
";
    let plan = plan_of(old, new);
    let expect = [
        (
            "conf",
            Change::Reinstantiate {
                reasons: vec![Reason::Config],
            },
        ),
        ("gone", Change::Stop),
        ("keep", Change::Unchanged),
        ("new", Change::Start),
        ("off", Change::Start),
        (
            "route",
            Change::Update {
                reroute: true,
                retune: false,
            },
        ),
        (
            "swap",
            Change::Reinstantiate {
                reasons: vec![Reason::Plugin],
            },
        ),
        (
            "tune",
            Change::Update {
                reroute: false,
                retune: true,
            },
        ),
    ];
    assert_eq!(plan.instances.len(), expect.len());
    for (name, change) in expect {
        assert_eq!(plan.instances[name], change, "{name}");
    }
    assert!(plan.restart_required.is_empty());
}

#[test]
fn disabling_stops_and_identical_configs_plan_nothing() {
    let on = "[plugins.a]\n";
    let off = "[plugins.a]\nenabled = false\n";
    assert_eq!(plan_of(on, off).instances["a"], Change::Stop);
    assert_eq!(plan_of(off, on).instances["a"], Change::Start);
    assert!(plan_of(on, "[plugins.a]\n# comment\n").is_empty());
    let pin = format!("[plugins.a]\nsha256 = \"{}\"\n", "ab".repeat(32));
    assert_eq!(
        plan_of(on, &pin).instances["a"],
        Change::Reinstantiate {
            reasons: vec![Reason::Pin]
        }
    );
    let moved = plan_of("[host]\n", "[host]\nlisten = \"unix:/run/x.sock\"\n");
    assert_eq!(moved.restart_required, ["listen"]);
}

/// Keys read only at the start (the API's message limit, the drain, the ledger's options,
/// the log format, the watcher) were neither applied by a reload nor reported as needing a
/// restart; and a plugin generation started after the reload used the new
/// `max_message_size` while the API kept the old one.
#[test]
fn keys_read_only_at_the_start_are_reported_and_keep_running_as_they_were() {
    let old = ok("[host]\nautoload = true\n");
    let changed = "[host]\nautoload = false\nunrouted = \"refuse\"\n\
                   max_message_size = \"2MiB\"\ngrace_period = \"9s\"\nhop_limit = 3\n\
                   dedupe_window = \"9m\"\ndead_letter_retention = \"9d\"\n\
                   max_ledger_bytes = \"1GiB\"\nlog_format = \"json\"\nwatch = \"poll\"\n";
    let mut new = ok(changed);
    let p = plan(&old, &new);
    assert_eq!(
        p.restart_required,
        [
            "grace_period",
            "max_message_size",
            "watch",
            "log_format",
            "max_ledger_bytes",
            "dedupe_window",
            "dead_letter_retention",
            "hop_limit"
        ]
    );
    crate::config::keep_restart_only(&old.host, &mut new.host);
    assert_eq!(new.host.max_message_size, old.host.max_message_size);
    assert_eq!(new.host.hop_limit, old.host.hop_limit);
    assert_eq!(new.host.grace_period, old.host.grace_period);
    // Applied by the reload: kept as written.
    assert!(!new.host.autoload);
    assert_eq!(new.host.unrouted, crate::config::Unrouted::Refuse);
    assert!(
        plan(&new, &ok(changed)).restart_required.len() == 8,
        "still pending"
    );
}

#[test]
fn access_and_connection_keys_are_checked_where_they_are_written() {
    // (config, line, column, words the message must contain)
    let cases: &[(&str, usize, usize, &[&str])] = &[
        (
            "[host]\noperator_users = [\"no-such-user-here\"]\n",
            2,
            19,
            &["`operator_users`: no user named `no-such-user-here`"],
        ),
        (
            "[host]\noperator_groups = [\"no-such-group-here\"]\n",
            2,
            20,
            &["`operator_groups`: no group named `no-such-group-here`"],
        ),
        (
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\ntcp_token_file = \"t\"\n\
             operator_users = [\"root\"]\n",
            4,
            19,
            &["`operator_users`", "over TCP", "tcp_operator_token_file"],
        ),
        (
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\ntcp_token_file = \"t\"\n\
             tcp_operator_token_file = \"t\"\n",
            4,
            27,
            &["same file as `tcp_token_file`"],
        ),
        (
            "[host]\ntcp_operator_token_file = \"t\"\n",
            2,
            27,
            &["for a TCP `listen`", "operator_users"],
        ),
        (
            "[host]\nlisten = \"tcps:127.0.0.1:7070\"\ntcp_token_file = \"t\"\n",
            2,
            10,
            &["tcps: (TLS)", "tls_cert_file"],
        ),
        (
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\ntcp_token_file = \"t\"\n\
             tls_cert_file = \"c\"\ntls_key_file = \"k\"\n",
            4,
            17,
            &["\"tcps:HOST:PORT\""],
        ),
        (
            "[host]\ntls_key_file = \"k\"\n",
            2,
            16,
            &["`tls_key_file` needs `tls_cert_file`"],
        ),
        (
            "[host]\nmax_connections = 0\n",
            2,
            19,
            &["`max_connections` is 0, expected between 1 and 1000000"],
        ),
        (
            "[host]\nidle_timeout = \"10ms\"\n",
            2,
            16,
            &["`idle_timeout` is 10ms, expected between 1s and 7days"],
        ),
        (
            "[host]\nhandshake_timeout = \"1h\"\n",
            2,
            21,
            &["`handshake_timeout` is 1h, expected between 100ms and 10m"],
        ),
    ];
    for (text, line, column, words) in cases {
        let (l, c, message) = one(text);
        assert_eq!((l, c), (*line, *column), "{text}: {message}");
        for word in *words {
            assert!(message.contains(word), "{text}: {message} lacks {word}");
        }
    }
    let config = ok(
        "[host]\nlisten = \"tcps:127.0.0.1:7070\"\ntcp_token_file = \"t\"\n\
         tcp_operator_token_file = \"o\"\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\n\
         max_connections = 10\nidle_timeout = \"1m\"\nhandshake_timeout = \"2s\"\n",
    );
    assert_eq!(config.host.listen, Endpoint::Tls("127.0.0.1:7070".into()));
    assert_eq!(config.host.max_connections, 10);
    assert_eq!(config.host.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.host.handshake_timeout, Duration::from_secs(2));
    assert_eq!(
        config.host.tls_cert_file.as_deref(),
        Some(Path::new("/etc/plugind/c"))
    );
    let config = ok("[host]\noperator_users = [\"root\"]\noperator_groups = [\"root\"]\n");
    assert_eq!(config.host.operator_users, ["root"]);
    assert_eq!(config.host.max_connections, 1024);
}

/// Found by the hostile-input campaign (the watcher's and the supervisor's reads of the
/// config file): a FIFO or a device in the config file's place is refused at once, never
/// waited on or read for ever; a symlink to a regular file is followed (a ConfigMap).
#[test]
fn the_config_file_is_read_only_when_it_is_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let zero = dir.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for (path, kind) in [(&fifo, "a FIFO"), (&zero, "a character device")] {
        let error = read_text(path).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
        assert!(error.to_string().contains(kind), "{error}");
        let ConfigError::Read { .. } = load(path).unwrap_err() else {
            panic!("{}: not a read error", path.display());
        };
    }
    let real = dir.path().join("real.toml");
    std::fs::write(&real, "[host]\n").unwrap();
    let link = dir.path().join("plugins.toml");
    std::os::unix::fs::symlink("real.toml", &link).unwrap();
    assert_eq!(read_text(&link).unwrap(), "[host]\n");
}

#[test]
fn float_settings_refuse_nan_and_infinities() {
    // `backoff.jitter = nan` passed the range check (NaN compares false both ways) and made
    // every backoff 0.
    for (line, value) in [
        ("jitter = nan", "NaN"),
        ("jitter = -nan", "NaN"),
        ("jitter = inf", "inf"),
        ("multiplier = nan", "NaN"),
        ("multiplier = inf", "inf"),
        ("multiplier = -inf", "-inf"),
    ] {
        let key = line.split(' ').next().unwrap();
        let (l, _, message) = one(&format!("[defaults.backoff]\n{line}\n"));
        assert_eq!(l, 2, "{line}");
        assert!(
            message.starts_with(&format!("`backoff.{key}` is {value}, expected between")),
            "{line}: {message}"
        );
        // In an instance's table too.
        let (_, _, message) = one(&format!("[plugins.a.backoff]\n{line}\n"));
        assert!(
            message.contains(&format!("`backoff.{key}`")),
            "{line}: {message}"
        );
    }
}

#[test]
fn pacing_and_runtime_keys_merge_and_refuse_bad_values() {
    let config = ok(
        "[defaults]\nrate_limit = 50\nordering_key = \"customer\"\nworkers = 4\n\n\
                     [plugins.a]\n\n\
                     [plugins.b]\nrate_limit = \"off\"\nordering_key = \"\"\nworkers = 0\n\n\
                     [plugins.c]\nrate_limit = 0.5\n",
    );
    let a = &config.instances["a"].settings;
    assert_eq!(
        (a.rate_limit, a.ordering_key.as_deref(), a.workers),
        (Some(50.0), Some("customer"), 4)
    );
    let b = &config.instances["b"].settings;
    assert_eq!(
        (b.rate_limit, b.ordering_key.as_deref(), b.workers),
        (None, None, 0)
    );
    assert_eq!(config.instances["c"].settings.rate_limit, Some(0.5));
    let (line, _, message) = one("[defaults]\nrate_limit = 0\n");
    assert_eq!(line, 2);
    assert!(message.contains("`rate_limit` is 0"), "{message}");
    let (_, _, message) = one("[defaults]\nrate_limit = \"fast\"\n");
    assert!(message.contains("invalid rate_limit \"fast\""), "{message}");
    let (_, _, message) = one("[defaults]\nordering_key = \"bad\\rname\"\n");
    assert!(
        message.contains("`ordering_key` must name a header"),
        "{message}"
    );
    let (_, _, message) = one("[defaults]\nworkers = 1000\n");
    assert!(message.contains("`workers` is 1000"), "{message}");
}
