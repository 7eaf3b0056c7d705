//! From text to a validated [`Config`]: parse, deserialize each section on its own, merge
//! defaults and overrides, check every value; collect every problem instead of stopping at
//! the first.

use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use toml::{
    Spanned,
    de::{DeTable, DeValue, ValueDeserializer},
};

use super::{
    Backoff, Circuit, Config, Endpoint, HostSettings, Instance, Problem, Settings,
    raw::{self, Durability, HumanDuration, LogFormat, Size, Unrouted, WatchMode},
};
use crate::{quote::quote, topic::Pattern};

/// Collects problems against the text they point into.
struct Problems<'t> {
    text: &'t str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        self.list.push(Problem::at(self.text, span, message));
    }

    fn toml_error(&mut self, e: &toml::de::Error) {
        self.at(e.span(), e.message().trim_end().to_owned());
    }
}

/// `state_dir` when the file does not say (relative to the file's folder).
pub(super) const DEFAULT_STATE_DIR: &str = "state";

pub(super) fn resolve(path: &Path, text: &str) -> Result<Config, Vec<Problem>> {
    let mut problems = Problems {
        text,
        list: Vec::new(),
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            problems.toml_error(&e);
            return Err(problems.list);
        }
    };
    let mut host = raw::Host::default();
    let mut defaults = raw::Settings::default();
    let mut instances: Vec<(Spanned<String>, raw::Instance)> = Vec::new();
    for (key, value) in root.into_inner() {
        let span = value.span();
        match key.get_ref().as_ref() {
            "host" => {
                if let Some(h) = section(&mut problems, value) {
                    host = h;
                }
            }
            "defaults" => {
                if let Some(d) = section(&mut problems, value) {
                    defaults = d;
                }
            }
            "plugins" => match value.into_inner() {
                DeValue::Table(table) => {
                    for (name, entry) in table {
                        let name = Spanned::new(name.span(), name.into_inner().into_owned());
                        if let Some(instance) = section(&mut problems, entry) {
                            instances.push((name, instance));
                        }
                    }
                }
                _ => problems.at(
                    Some(span),
                    "`plugins` must be a table of instances, e.g. [plugins.orders-sink]",
                ),
            },
            other => problems.at(
                Some(key.span()),
                format!("unknown section `{other}`, expected one of `host`, `defaults`, `plugins`"),
            ),
        }
    }
    // Relative paths resolve against the file's folder, made absolute once so that they
    // keep their meaning whatever the daemon's working directory becomes.
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(folder).unwrap_or_else(|_| folder.to_owned());
    let host = host_settings(&mut problems, host, &base);
    let defaults = settings(&mut problems, &Settings::default(), &defaults);
    let mut resolved = BTreeMap::new();
    for (name, raw) in instances {
        if let Some(instance) = instance(&mut problems, &name, raw, &defaults) {
            resolved.insert(instance.name.clone(), instance);
        }
    }
    if !problems.list.is_empty() {
        // In file order, as a reader goes through the file; placeless ones last.
        problems
            .list
            .sort_by_key(|p| (p.span.is_none(), p.span.as_ref().map(|s| s.start)));
        return Err(problems.list);
    }
    Ok(Config {
        source: path.to_owned(),
        hash: Sha256::digest(text.as_bytes()).into(),
        host: host.expect("no problems means the host section resolved"),
        defaults,
        instances: resolved,
    })
}

/// Deserializes one section, reporting its first schema error (with its span).
fn section<T: for<'de> Deserialize<'de>>(
    problems: &mut Problems<'_>,
    value: Spanned<DeValue<'_>>,
) -> Option<T> {
    T::deserialize(ValueDeserializer::from(value))
        .map_err(|e| problems.toml_error(&e))
        .ok()
}

fn path_in(base: &Path, value: &str) -> PathBuf {
    base.join(value)
}

fn duration_in(
    problems: &mut Problems<'_>,
    value: &Option<Spanned<HumanDuration>>,
    key: &str,
    default: Duration,
    range: (Duration, Duration),
) -> Duration {
    let Some(value) = value else {
        return default;
    };
    let d = value.get_ref().0;
    if d < range.0 || d > range.1 {
        problems.at(
            Some(value.span()),
            format!(
                "`{key}` is {}, expected between {} and {}",
                humantime::format_duration(d),
                humantime::format_duration(range.0),
                humantime::format_duration(range.1)
            ),
        );
    }
    d
}

fn number_in<T: Copy + PartialOrd + std::fmt::Display>(
    problems: &mut Problems<'_>,
    value: &Option<Spanned<T>>,
    key: &str,
    default: T,
    range: (T, T),
) -> T {
    let Some(value) = value else {
        return default;
    };
    let n = *value.get_ref();
    // `contains`, not `n < min || n > max`: NaN is neither, and `backoff.jitter = nan` passed
    // (and made every backoff 0).
    if !(range.0..=range.1).contains(&n) {
        problems.at(
            Some(value.span()),
            format!(
                "`{key}` is {n}, expected between {} and {}",
                range.0, range.1
            ),
        );
    }
    n
}

fn size_in(
    problems: &mut Problems<'_>,
    value: &Option<Spanned<Size>>,
    key: &str,
    default: u64,
    range: (u64, u64),
) -> u64 {
    let Some(value) = value else {
        return default;
    };
    let n = value.get_ref().0;
    if n < range.0 || n > range.1 {
        problems.at(
            Some(value.span()),
            format!(
                "`{key}` is {n} bytes, expected between {} and {} bytes",
                range.0, range.1
            ),
        );
    }
    n
}

const MS: Duration = Duration::from_millis(1);
const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);
const GIB: u64 = 1 << 30;

fn host_settings(problems: &mut Problems<'_>, raw: raw::Host, base: &Path) -> Option<HostSettings> {
    let before = problems.list.len();
    let plugin_dir = path_in(
        base,
        raw.plugin_dir.as_ref().map_or("plugins.d", |p| p.get_ref()),
    );
    let state_dir = path_in(
        base,
        raw.state_dir
            .as_ref()
            .map_or(DEFAULT_STATE_DIR, |p| p.get_ref()),
    );
    if plugin_dir.starts_with(&state_dir) || state_dir.starts_with(&plugin_dir) {
        let span = raw
            .state_dir
            .as_ref()
            .or(raw.plugin_dir.as_ref())
            .map(Spanned::span);
        problems.at(
            span,
            format!(
                "`state_dir` ({}) and `plugin_dir` ({}) overlap; code is never loaded from \
                 the state directory, keep them apart",
                state_dir.display(),
                plugin_dir.display()
            ),
        );
    }
    let listen = match &raw.listen {
        Some(text) => Endpoint::parse(text.get_ref(), base)
            .map_err(|e| problems.at(Some(text.span()), format!("`listen`: {e}")))
            .ok(),
        None => {
            // The default: the socket in the state directory (already absolute).
            let default = format!("unix:{}", state_dir.join("plugind.sock").display());
            Endpoint::parse(&default, Path::new("/"))
                .map_err(|e| problems.at(None, format!("the default `listen` {default}: {e}")))
                .ok()
        }
    };
    let tcp_token_file = raw
        .tcp_token_file
        .as_ref()
        .map(|p| path_in(base, p.get_ref()));
    if let (Some(tcp), None) = (
        listen.as_ref().filter(|l| l.tcp_address().is_some()),
        &tcp_token_file,
    ) {
        problems.at(
            raw.listen.as_ref().map(Spanned::span),
            format!(
                "`listen` is TCP ({tcp}) but there is no `tcp_token_file`: a TCP listener \
                 needs a token every client must send"
            ),
        );
    }
    let access = access(problems, &raw, listen.as_ref(), base);
    let metrics = raw.metrics.as_ref().and_then(|text| {
        text.get_ref()
            .parse()
            .map_err(|_| {
                problems.at(
                    Some(text.span()),
                    format!(
                        "`metrics` {} is not an address such as \"127.0.0.1:9464\"",
                        quote(text.get_ref())
                    ),
                )
            })
            .ok()
    });
    let trusted_owners: Vec<Spanned<String>> = raw
        .trusted_owners
        .unwrap_or_else(|| vec![Spanned::new(0..0, "root".to_owned())]);
    let mut trusted_owner_uids = Vec::new();
    for owner in &trusted_owners {
        match crate::loader::uid_of(owner.get_ref()) {
            Some(uid) => trusted_owner_uids.push(uid),
            None => problems.at(
                Some(owner.span()),
                format!(
                    "`trusted_owners`: no user named `{}` on this system",
                    owner.get_ref()
                ),
            ),
        }
    }
    let socket_mode = match &raw.socket_mode {
        None => 0o660,
        Some(text) => match u32::from_str_radix(text.get_ref().trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                problems.at(
                    Some(text.span()),
                    format!(
                        "`socket_mode` {} is not an octal mode such as \"0660\"",
                        quote(text.get_ref())
                    ),
                );
                0
            }
        },
    };
    let grace_period = duration_in(
        problems,
        &raw.grace_period,
        "grace_period",
        Duration::from_secs(10),
        (Duration::ZERO, HOUR),
    );
    let max_message_size = size_in(
        problems,
        &raw.max_message_size,
        "max_message_size",
        4 << 20,
        (1, GIB),
    );
    let max_ledger_bytes = raw.max_ledger_bytes.as_ref().map(|_| {
        size_in(
            problems,
            &raw.max_ledger_bytes,
            "max_ledger_bytes",
            0,
            (1 << 20, u64::MAX),
        )
    });
    let dedupe_window = duration_in(
        problems,
        &raw.dedupe_window,
        "dedupe_window",
        Duration::from_secs(120),
        (Duration::ZERO, 7 * DAY),
    );
    let dead_letter_retention = duration_in(
        problems,
        &raw.dead_letter_retention,
        "dead_letter_retention",
        7 * DAY,
        (Duration::from_secs(60), 3650 * DAY),
    );
    let hop_limit = number_in(problems, &raw.hop_limit, "hop_limit", 16, (1, 255));
    if problems.list.len() != before {
        return None;
    }
    Some(HostSettings {
        plugin_dir,
        state_dir,
        listen: listen?,
        metrics,
        durability: raw.durability.unwrap_or(Durability::Fsync),
        autoload: raw.autoload.unwrap_or(true),
        grace_period,
        max_message_size,
        watch: raw.watch.unwrap_or(WatchMode::Auto),
        trusted_owners: trusted_owners
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        trusted_owner_uids,
        socket_mode,
        socket_group: raw.socket_group,
        allowed_users: raw.allowed_users.unwrap_or_default(),
        tcp_token_file,
        operator_users: access.operator_users,
        operator_groups: access.operator_groups,
        tcp_operator_token_file: access.tcp_operator_token_file,
        tls_cert_file: access.tls_cert_file,
        tls_key_file: access.tls_key_file,
        max_connections: access.max_connections,
        idle_timeout: access.idle_timeout,
        handshake_timeout: access.handshake_timeout,
        log_format: raw.log_format.unwrap_or(LogFormat::Text),
        max_ledger_bytes,
        dedupe_window,
        dead_letter_retention,
        hop_limit,
        unrouted: raw.unrouted.unwrap_or(Unrouted::Accept),
    })
}

/// The `[host]` keys of who may call and how connections are bounded, checked.
struct AccessKeys {
    operator_users: Vec<String>,
    operator_groups: Vec<String>,
    tcp_operator_token_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    max_connections: u32,
    idle_timeout: Duration,
    handshake_timeout: Duration,
}

fn access(
    problems: &mut Problems<'_>,
    raw: &raw::Host,
    listen: Option<&Endpoint>,
    base: &Path,
) -> AccessKeys {
    let unix = matches!(listen, Some(Endpoint::Unix(_)));
    let names = |problems: &mut Problems<'_>,
                 list: &Option<Vec<Spanned<String>>>,
                 key: &str,
                 known: fn(&str) -> bool,
                 what: &str| {
        let list = list.as_deref().unwrap_or_default();
        if !unix && let (Some(first), Some(listen)) = (list.first(), listen) {
            problems.at(
                Some(first.span()),
                format!(
                    "`{key}` names who may operate over the Unix socket, but `listen` is \
                     {listen}: over TCP the operator is whoever sends the token of \
                     `tcp_operator_token_file`"
                ),
            );
        }
        for name in list {
            if !known(name.get_ref()) {
                problems.at(
                    Some(name.span()),
                    format!(
                        "`{key}`: no {what} named `{}` on this system",
                        name.get_ref()
                    ),
                );
            }
        }
        list.iter().map(|n| n.get_ref().clone()).collect::<Vec<_>>()
    };
    let operator_users = names(
        problems,
        &raw.operator_users,
        "operator_users",
        |n| crate::loader::uid_of(n).is_some(),
        "user",
    );
    let operator_groups = names(
        problems,
        &raw.operator_groups,
        "operator_groups",
        |n| crate::loader::group_of(n).is_some(),
        "group",
    );
    let file = |key: &Option<Spanned<String>>| key.as_ref().map(|p| path_in(base, p.get_ref()));
    let tcp_operator_token_file = file(&raw.tcp_operator_token_file);
    if let Some(key) = &raw.tcp_operator_token_file {
        if listen.is_some_and(|l| l.tcp_address().is_none()) {
            problems.at(
                Some(key.span()),
                "`tcp_operator_token_file` is for a TCP `listen`; on the Unix socket, \
                 `operator_users` and `operator_groups` say who may operate",
            );
        } else if tcp_operator_token_file == file(&raw.tcp_token_file) {
            problems.at(
                Some(key.span()),
                "`tcp_operator_token_file` is the same file as `tcp_token_file`: the operator \
                 token must differ from the publish token, or every publisher could operate",
            );
        }
    }
    let tls_cert_file = file(&raw.tls_cert_file);
    let tls_key_file = file(&raw.tls_key_file);
    let tls = matches!(listen, Some(Endpoint::Tls(_)));
    match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert), Some(_)) if !tls && listen.is_some() => problems.at(
            Some(cert.span()),
            "`tls_cert_file` and `tls_key_file` serve a TLS listener: write `listen` as \
             \"tcps:HOST:PORT\"",
        ),
        (Some(cert), None) => problems.at(
            Some(cert.span()),
            "`tls_cert_file` needs `tls_key_file` (the certificate's private key)",
        ),
        (None, Some(key)) => problems.at(
            Some(key.span()),
            "`tls_key_file` needs `tls_cert_file` (the certificate chain)",
        ),
        (None, None) if tls => problems.at(
            raw.listen.as_ref().map(Spanned::span),
            "`listen` is tcps: (TLS) but there is no `tls_cert_file` and `tls_key_file`",
        ),
        _ => {}
    }
    AccessKeys {
        operator_users,
        operator_groups,
        tcp_operator_token_file,
        tls_cert_file,
        tls_key_file,
        max_connections: number_in(
            problems,
            &raw.max_connections,
            "max_connections",
            1024,
            (1, 1_000_000),
        ),
        idle_timeout: duration_in(
            problems,
            &raw.idle_timeout,
            "idle_timeout",
            Duration::from_secs(300),
            (Duration::from_secs(1), 7 * DAY),
        ),
        handshake_timeout: duration_in(
            problems,
            &raw.handshake_timeout,
            "handshake_timeout",
            Duration::from_secs(10),
            (Duration::from_millis(100), Duration::from_secs(600)),
        ),
    }
}

/// `raw` merged over `base`, field by field, every value range-checked.
fn settings(problems: &mut Problems<'_>, base: &Settings, raw: &raw::Settings) -> Settings {
    let backoff = raw.backoff.clone().unwrap_or_default();
    let circuit = raw.circuit.clone().unwrap_or_default();
    let merged = Settings {
        queue_capacity: number_in(
            problems,
            &raw.queue_capacity,
            "queue_capacity",
            base.queue_capacity,
            (1, 1_000_000),
        ),
        max_in_flight: number_in(
            problems,
            &raw.max_in_flight,
            "max_in_flight",
            base.max_in_flight,
            (1, 1_000_000),
        ),
        ack_timeout: duration_in(
            problems,
            &raw.ack_timeout,
            "ack_timeout",
            base.ack_timeout,
            (MS, DAY),
        ),
        max_attempts: number_in(
            problems,
            &raw.max_attempts,
            "max_attempts",
            base.max_attempts,
            (1, 10_000),
        ),
        backoff: Backoff {
            initial: duration_in(
                problems,
                &backoff.initial,
                "backoff.initial",
                base.backoff.initial,
                (Duration::ZERO, DAY),
            ),
            max: duration_in(
                problems,
                &backoff.max,
                "backoff.max",
                base.backoff.max,
                (Duration::ZERO, 7 * DAY),
            ),
            multiplier: number_in(
                problems,
                &backoff.multiplier,
                "backoff.multiplier",
                base.backoff.multiplier,
                (1.0, 100.0),
            ),
            jitter: number_in(
                problems,
                &backoff.jitter,
                "backoff.jitter",
                base.backoff.jitter,
                (0.0, 1.0),
            ),
        },
        max_backlog: size_in(
            problems,
            &raw.max_backlog,
            "max_backlog",
            base.max_backlog,
            (1 << 10, u64::MAX),
        ),
        circuit: Circuit {
            failures: number_in(
                problems,
                &circuit.failures,
                "circuit.failures",
                base.circuit.failures,
                (1, 1_000_000),
            ),
            window: duration_in(
                problems,
                &circuit.window,
                "circuit.window",
                base.circuit.window,
                (MS, DAY),
            ),
            probe: duration_in(
                problems,
                &circuit.probe,
                "circuit.probe",
                base.circuit.probe,
                (MS, DAY),
            ),
        },
        init_timeout: duration_in(
            problems,
            &raw.init_timeout,
            "init_timeout",
            base.init_timeout,
            (MS, HOUR),
        ),
        shutdown_timeout: duration_in(
            problems,
            &raw.shutdown_timeout,
            "shutdown_timeout",
            base.shutdown_timeout,
            (MS, HOUR),
        ),
        hang_grace: duration_in(
            problems,
            &raw.hang_grace,
            "hang_grace",
            base.hang_grace,
            (Duration::ZERO, HOUR),
        ),
        max_age: match &raw.max_age {
            None => base.max_age,
            Some(value) => {
                let age = value.get_ref().0;
                if let Some(d) = age
                    && !(Duration::from_secs(1)..=3650 * DAY).contains(&d)
                {
                    problems.at(
                        Some(value.span()),
                        format!(
                            "`max_age` is {}, expected between 1s and 3650days, or \"off\"",
                            humantime::format_duration(d)
                        ),
                    );
                }
                age
            }
        },
        workers: number_in(problems, &raw.workers, "workers", base.workers, (0, 256)),
        rate_limit: match &raw.rate_limit {
            None => base.rate_limit,
            Some(value) => {
                let limit = value.get_ref().0;
                if let Some(n) = limit
                    && !(0.001..=1_000_000.0).contains(&n)
                {
                    problems.at(
                        Some(value.span()),
                        format!("`rate_limit` is {n}, expected between 0.001 and 1000000 deliveries per second, or \"off\""),
                    );
                }
                limit
            }
        },
        ordering_key: match &raw.ordering_key {
            None => base.ordering_key.clone(),
            Some(value) if value.get_ref().is_empty() => None,
            Some(value) => {
                let name = value.get_ref();
                if let Err(e) = crate::message::validate(
                    "t",
                    0,
                    &[(name.clone(), String::new())],
                    None,
                    u64::MAX,
                ) {
                    problems.at(
                        Some(value.span()),
                        format!("`ordering_key` must name a header: {e}"),
                    );
                }
                Some(name.clone())
            }
        },
    };
    if merged.backoff.initial > merged.backoff.max {
        let span = backoff
            .initial
            .as_ref()
            .or(backoff.max.as_ref())
            .map(Spanned::span);
        problems.at(span, "`backoff.initial` is longer than `backoff.max`");
    }
    merged
}

/// A valid instance name: also a metric label value and a file name.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn instance(
    problems: &mut Problems<'_>,
    name: &Spanned<String>,
    raw: raw::Instance,
    defaults: &Settings,
) -> Option<Instance> {
    let before = problems.list.len();
    if !valid_name(name.get_ref()) {
        problems.at(
            Some(name.span()),
            format!(
                "instance name `{}` must be 1 to 64 ASCII letters, digits, `-` or `_`, starting \
                 with a letter or digit (it names logs, metrics and files)",
                name.get_ref()
            ),
        );
    }
    let plugin = match &raw.plugin {
        Some(plugin) if plugin.get_ref().is_empty() => {
            problems.at(
                Some(plugin.span()),
                "`plugin` is empty; name a plugin's manifest name",
            );
            String::new()
        }
        Some(plugin) => plugin.get_ref().clone(),
        None => name.get_ref().clone(),
    };
    let topics = raw.topics.as_ref().map(|topics| {
        if topics.get_ref().is_empty() {
            problems.at(
                Some(topics.span()),
                "`topics` is empty: the instance would receive nothing (remove the key to use \
                 the plugin's default topics)",
            );
        }
        topics
            .get_ref()
            .iter()
            .filter_map(|topic| {
                Pattern::parse(topic.get_ref())
                    .map_err(|e| {
                        problems.at(
                            Some(topic.span()),
                            format!("topic pattern {}: {e}", quote(topic.get_ref())),
                        )
                    })
                    .ok()
            })
            .collect::<Vec<_>>()
    });
    let sha256 = raw.sha256.as_ref().and_then(|pin| {
        let text = pin.get_ref();
        let parsed = (text.len() == 64)
            .then(|| hex::decode(text).ok())
            .flatten()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
        if parsed.is_none() {
            problems.at(
                Some(pin.span()),
                format!(
                    "`sha256` must be 64 hexadecimal digits (the output of `sha256sum` or \
                     `plugind inspect`), found {} characters",
                    text.chars().count()
                ),
            );
        }
        parsed
    });
    let settings = settings(problems, defaults, &raw.overrides());
    let config = match raw.config {
        Some(table) => match serde_json::to_value(&table) {
            Ok(value) => value,
            Err(e) => {
                problems.at(
                    Some(name.span()),
                    format!("`config` cannot be passed on as JSON: {e}"),
                );
                serde_json::Value::Null
            }
        },
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    if problems.list.len() != before {
        return None;
    }
    Some(Instance {
        name: name.get_ref().clone(),
        plugin,
        enabled: raw.enabled.unwrap_or(true),
        topics,
        sha256,
        settings,
        config,
    })
}
