//! `plugins.toml`: where it is found, what it may say, and the validated [`Config`] the rest
//! of the daemon uses.
//!
//! Three layers, each reporting every problem it finds with file:line:column and a caret
//! snippet ([`Problem`]): syntax (the TOML parser), schema (each section deserialized on its
//! own with unknown keys refused, so one mistake does not hide the next), semantics (ranges,
//! paths, patterns, pins, users: `resolve`). A config with any problem is refused whole;
//! [`plan`] compares two valid configs for the supervisor.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use crate::topic::Pattern;

mod diagnostic;
mod plan;
mod plugin_config;
mod raw;
mod resolve;

pub use diagnostic::Problem;
pub use plan::{Change, Plan, Reason, keep_restart_only, plan};
pub use plugin_config::plugin_config_problem;
pub use raw::{Durability, LogFormat, Unrouted, WatchMode};

#[cfg(test)]
mod tests;

/// The environment variable naming the config file (after `-c`).
pub const CONFIG_ENV: &str = "PLUGIND_CONFIG";
/// The system-wide config file, last in the search order.
pub const SYSTEM_CONFIG: &str = "/etc/plugind/plugins.toml";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// SHA-256 of the file's bytes: `Reload` takes the hash it expects to apply.
    #[serde(serialize_with = "as_hex")]
    pub hash: [u8; 32],
    pub host: HostSettings,
    /// `[defaults]` merged over the built-in defaults.
    pub defaults: Settings,
    /// `[plugins.<name>]`, by instance name.
    pub instances: BTreeMap<String, Instance>,
}

fn as_hex<S: serde::Serializer>(hash: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(hash))
}

/// `[host]`, with relative paths resolved against the config file's folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostSettings {
    pub plugin_dir: PathBuf,
    /// The ledger; never loadable code.
    pub state_dir: PathBuf,
    pub listen: Endpoint,
    pub metrics: Option<SocketAddr>,
    pub durability: Durability,
    /// Whether a library in `plugin_dir` with no config entry starts with the defaults.
    pub autoload: bool,
    pub grace_period: Duration,
    pub max_message_size: u64,
    pub watch: WatchMode,
    /// User names trusted to own plugin files, besides the daemon's own user.
    pub trusted_owners: Vec<String>,
    /// Their uids, resolved when the config was validated.
    pub trusted_owner_uids: Vec<u32>,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub allowed_users: Vec<String>,
    /// The publish token of a TCP listener (publishing, health, reflection).
    pub tcp_token_file: Option<PathBuf>,
    /// Users who may operate (the `Control` service) over the Unix socket, besides root and
    /// the daemon's own user.
    pub operator_users: Vec<String>,
    /// Groups whose members may operate over the Unix socket.
    pub operator_groups: Vec<String>,
    /// The operator token of a TCP listener (`Control`, and publishing).
    pub tcp_operator_token_file: Option<PathBuf>,
    /// The certificate chain (PEM) a `tcps:` listener presents.
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Connections served at once; one more is answered RESOURCE_EXHAUSTED and closed.
    pub max_connections: u32,
    /// A connection with no call open for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A new connection must complete its TLS handshake (`tcps:`) and send its first call
    /// within this.
    pub handshake_timeout: Duration,
    pub log_format: LogFormat,
    pub max_ledger_bytes: Option<u64>,
    pub dedupe_window: Duration,
    pub dead_letter_retention: Duration,
    pub hop_limit: u32,
    /// What a publish that matches no instance gets.
    pub unrouted: Unrouted,
}

/// Where the daemon listens and where clients connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "address", rename_all = "snake_case")]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    /// TCP with TLS: `tcps:HOST:PORT`.
    Tls(String),
}

impl Endpoint {
    /// The longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with NUL).
    pub const MAX_UNIX_PATH: usize = 107;

    /// Parses `unix:PATH`, `tcp:HOST:PORT` or `tcps:HOST:PORT` (TLS); a relative Unix path
    /// is resolved against `base`.
    ///
    /// # Errors
    /// A message saying what was expected.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path, e.g. \"unix:state/plugind.sock\"".into());
            }
            let path = base.join(path);
            let len = path.as_os_str().len();
            if len > Self::MAX_UNIX_PATH {
                return Err(format!(
                    "the socket path {} is {len} bytes, over the {}-byte limit of Unix \
                     sockets; use a shorter path",
                    path.display(),
                    Self::MAX_UNIX_PATH
                ));
            }
            Ok(Self::Unix(path))
        } else if let Some((scheme, address)) = text
            .strip_prefix("tcp:")
            .map(|a| ("tcp", a))
            .or_else(|| text.strip_prefix("tcps:").map(|a| ("tcps", a)))
        {
            let port_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!(
                    "`{scheme}:{address}` is not HOST:PORT, e.g. \"{scheme}:127.0.0.1:7070\""
                ));
            }
            Ok(if scheme == "tcp" {
                Self::Tcp(address.to_owned())
            } else {
                Self::Tls(address.to_owned())
            })
        } else {
            Err(format!(
                "`{text}` is not an endpoint; expected \"unix:PATH\", \"tcp:HOST:PORT\" or \
                 \"tcps:HOST:PORT\" (TLS)"
            ))
        }
    }

    /// The `HOST:PORT` of a TCP endpoint (with or without TLS).
    pub fn tcp_address(&self) -> Option<&str> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp(address) | Self::Tls(address) => Some(address),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(address) => write!(f, "tcp:{address}"),
            Self::Tls(address) => write!(f, "tcps:{address}"),
        }
    }
}

/// The delivery settings of one instance (`[defaults]`, overridable per instance).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Actor mailbox size.
    pub queue_capacity: u32,
    /// Deferred or async deliveries outstanding.
    pub max_in_flight: u32,
    /// The lease of one attempt.
    pub ack_timeout: Duration,
    /// Dead-lettered when failures reach this.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Beyond it, Publish to topics routed here is refused.
    pub max_backlog: u64,
    pub circuit: Circuit,
    pub init_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub hang_grace: Duration,
    /// Waiting deliveries older than this (since acceptance) are dead-lettered with reason
    /// `expired`; `None`: never.
    pub max_age: Option<Duration>,
    /// Worker threads of an async plugin's runtime (0: the SDK's default).
    pub workers: u32,
    /// Deliveries handed out per second at most (first deliveries and retries); `None`:
    /// unlimited.
    pub rate_limit: Option<f64>,
    /// A header naming each message's ordering key: deliveries with the same key go out one
    /// at a time, in acceptance order (the next once the previous one ended); `None`: no
    /// ordering beyond first deliveries in acceptance order.
    pub ordering_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of the delay added or removed at random (0 to 1).
    pub jitter: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Circuit {
    /// Failures on this many distinct messages within `window` pause the instance.
    pub failures: u32,
    pub window: Duration,
    /// A paused instance gets one probe message this often.
    pub probe: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_in_flight: 64,
            ack_timeout: Duration::from_secs(30),
            max_attempts: 5,
            backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: 0.2,
            },
            max_backlog: 1 << 30,
            circuit: Circuit {
                failures: 20,
                window: Duration::from_secs(30),
                probe: Duration::from_secs(10),
            },
            init_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            hang_grace: Duration::from_secs(5),
            max_age: None,
            workers: 0,
            rate_limit: None,
            ordering_key: None,
        }
    }
}

/// One `[plugins.<name>]` entry, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub name: String,
    /// The manifest name of the library it runs (default: the instance name).
    pub plugin: String,
    pub enabled: bool,
    /// Patterns it subscribes to; `None`: the library's default topics.
    pub topics: Option<Vec<Pattern>>,
    /// The pin: refuse any other bytes.
    #[serde(serialize_with = "opt_hex")]
    pub sha256: Option<[u8; 32]>,
    pub settings: Settings,
    /// The `config` table, as JSON for the plugin.
    pub config: serde_json::Value,
}

fn opt_hex<S: serde::Serializer>(pin: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match pin {
        Some(pin) => s.serialize_str(&hex::encode(pin)),
        None => s.serialize_none(),
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A configuration that was refused, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub path: PathBuf,
    pub text: String,
    pub problems: Vec<Problem>,
}

impl Invalid {
    /// Every problem, `file:line:column: message` with its snippet, separated by blank lines.
    pub fn render(&self) -> String {
        self.problems
            .iter()
            .map(|p| p.render(&self.path, &self.text))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid configuration ({} problem{})", .0.path.display(), .0.problems.len(), if .0.problems.len() == 1 { "" } else { "s" })]
    Invalid(Invalid),
    #[error(
        "no configuration file: not given with -c, ${CONFIG_ENV} is not set, and neither \
         ./plugins.toml nor {SYSTEM_CONFIG} exists"
    )]
    NotFound,
}

/// Parses and validates `text` as the config file `path`.
///
/// # Errors
/// [`Invalid`] with every problem found.
pub fn parse(path: &Path, text: &str) -> Result<Config, Invalid> {
    resolve::resolve(path, text).map_err(|problems| Invalid {
        path: path.to_owned(),
        text: text.to_owned(),
        problems,
    })
}

/// The largest configuration file read (a guard against a runaway file in its place).
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Reads the configuration file at `path` (through symlinks: a Kubernetes ConfigMap is
/// one), opened non-blocking and judged by `fstat` of the open file before any read: a FIFO
/// or a device in its place is refused at once instead of blocking the reader (the
/// supervisor, the watcher) for ever or never ending.
///
/// # Errors
/// The open's or the read's error; `InvalidInput` for a file that is not a regular file or
/// is larger than 16 MiB.
pub fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", file_kind(&meta.file_type())),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {} MiB", MAX_CONFIG_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// [`read_bytes`] as UTF-8 text.
///
/// # Errors
/// As [`read_bytes`]; `InvalidData` for bytes that are not UTF-8.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Reads and validates the config file at `path`.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Invalid`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_text(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text).map_err(ConfigError::Invalid)
}

/// The environment variable naming the daemon a client command talks to (after `--connect`).
pub const CONNECT_ENV: &str = "PLUGIND_CONNECT";
/// Where a client connects when nothing else says: the packaged service's socket.
pub const DEFAULT_CONNECT: &str = "unix:/run/plugind/plugind.sock";

/// How a client command chose its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectOrigin {
    /// `--connect`.
    Flag,
    /// `$PLUGIND_CONNECT`.
    Env,
    /// The `listen` of the configuration found by [`locate`].
    Config,
    /// [`DEFAULT_CONNECT`].
    Default,
}

/// Where a client command connects, and what is wrong with the local configuration if
/// anything is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub endpoint: Endpoint,
    pub origin: ConnectOrigin,
    /// The configuration [`locate`] found cannot be used: what is wrong with it (the daemon
    /// keeps running its last good one; the endpoint came from elsewhere, or from the
    /// broken file's `listen`).
    pub config_problem: Option<String>,
}

/// Where a client command connects: `--connect`, then `$PLUGIND_CONNECT`, then the `listen`
/// of the configuration [`locate`] finds (with `-c` if given), then [`DEFAULT_CONNECT`]. A
/// configuration that does not validate still gives its `[host] listen` when that can be
/// read from it (the daemon runs its last good configuration meanwhile), and its problem is
/// reported.
///
/// # Errors
/// A message naming the bad endpoint, or the configuration that cannot be read.
pub fn client_endpoint(flag: Option<&str>, config_flag: Option<&Path>) -> Result<Connect, String> {
    let env = std::env::var(CONNECT_ENV).ok();
    client_endpoint_in(flag, env, locate(config_flag).ok().map(|(path, _)| path))
}

fn client_endpoint_in(
    flag: Option<&str>,
    env: Option<String>,
    config: Option<PathBuf>,
) -> Result<Connect, String> {
    let cwd = Path::new(".");
    let loaded = config.as_ref().map(|path| (path, load(path)));
    let config_problem = match &loaded {
        Some((_, Err(e))) => Some(problem_summary(e)),
        _ => None,
    };
    let connect = |endpoint, origin| Connect {
        endpoint,
        origin,
        config_problem: config_problem.clone(),
    };
    if let Some(flag) = flag {
        return Endpoint::parse(flag, cwd)
            .map(|e| connect(e, ConnectOrigin::Flag))
            .map_err(|e| format!("--connect: {e}"));
    }
    if let Some(env) = env.filter(|e| !e.is_empty()) {
        return Endpoint::parse(&env, cwd)
            .map(|e| connect(e, ConnectOrigin::Env))
            .map_err(|e| format!("${CONNECT_ENV}: {e}"));
    }
    match loaded {
        Some((_, Ok(config))) => Ok(connect(config.host.listen, ConnectOrigin::Config)),
        Some((path, Err(e))) => match listen_of_broken(path) {
            Some(endpoint) => Ok(connect(endpoint, ConnectOrigin::Config)),
            None => Err(format!(
                "{e}, and its [host] listen cannot be read from it; fix it, or pass --connect \
                 (or set ${CONNECT_ENV})"
            )),
        },
        None => Endpoint::parse(DEFAULT_CONNECT, cwd)
            .map(|e| connect(e, ConnectOrigin::Default))
            .map_err(|e| format!("the default endpoint: {e}")),
    }
}

/// One line on what is wrong with a configuration: its first problem (and how many more).
fn problem_summary(e: &ConfigError) -> String {
    match e {
        ConfigError::Invalid(invalid) => {
            let first = invalid
                .problems
                .first()
                .map(|p| p.render(&invalid.path, &invalid.text))
                .and_then(|r| r.lines().next().map(str::to_owned))
                .unwrap_or_default();
            let more = invalid.problems.len().saturating_sub(1);
            if more == 0 {
                format!("invalid configuration: {first}")
            } else {
                format!("invalid configuration: {first} (and {more} more problems)")
            }
        }
        other => other.to_string(),
    }
}

/// The `[host] listen` of a configuration file that does not validate, as the daemon would
/// have taken it (without one: the socket in its `state_dir`): read from its TOML when that
/// parses, else from the `key = "…"` lines of its `[host]` section. `None` when the file
/// cannot be read or its TOML is broken before `[host]` says anything.
fn listen_of_broken(path: &Path) -> Option<Endpoint> {
    let text = read_text(path).ok()?;
    let host_key = |key: &str| -> Option<String> {
        if let Ok(table) = text.parse::<toml::Table>() {
            return Some(table.get("host")?.get(key)?.as_str()?.to_owned());
        }
        let mut in_host = false;
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_host = line.trim_end_matches(|c| c != ']') == "[host]";
            } else if in_host
                && let Some((name, value)) = line.split_once('=')
                && name.trim() == key
                && let Some(value) = value.trim().strip_prefix('"')
                && let Some(end) = value.find('"')
            {
                found = Some(value[..end].to_owned());
            }
        }
        found
    };
    // Parsed, and without a `listen` key at all (one of another type says nothing usable).
    let parsed = text
        .parse::<toml::Table>()
        .is_ok_and(|t| t.get("host").and_then(|h| h.get("listen")).is_none());
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match host_key("listen") {
        Some(listen) => Endpoint::parse(&listen, base).ok(),
        // A broken TOML file may say anything after the point it breaks: only a listen it
        // states is trusted. A parsed one without `listen` has the default.
        None if parsed => {
            let state_dir = host_key("state_dir");
            let state_dir = base.join(state_dir.as_deref().unwrap_or(resolve::DEFAULT_STATE_DIR));
            Some(Endpoint::Unix(state_dir.join("plugind.sock")))
        }
        None => None,
    }
}

/// Where a config file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigOrigin {
    /// `-c FILE`.
    Flag,
    /// `$PLUGIND_CONFIG`.
    Env,
    /// `./plugins.toml`.
    WorkingDir,
    /// `/etc/plugind/plugins.toml`.
    System,
}

/// Finds the config file: `-c`, then `$PLUGIND_CONFIG`, then `./plugins.toml`, then
/// `/etc/plugind/plugins.toml`. An explicit choice (flag or variable) is returned even if the
/// file does not exist, so that reading it reports the right path.
///
/// # Errors
/// [`ConfigError::NotFound`] when nothing was given and no default file exists.
pub fn locate(flag: Option<&Path>) -> Result<(PathBuf, ConfigOrigin), ConfigError> {
    locate_in(
        flag,
        std::env::var_os(CONFIG_ENV).map(PathBuf::from),
        Path::new("plugins.toml"),
        Path::new(SYSTEM_CONFIG),
    )
}

fn locate_in(
    flag: Option<&Path>,
    env: Option<PathBuf>,
    working: &Path,
    system: &Path,
) -> Result<(PathBuf, ConfigOrigin), ConfigError> {
    if let Some(flag) = flag {
        return Ok((flag.to_owned(), ConfigOrigin::Flag));
    }
    if let Some(env) = env.filter(|e| !e.as_os_str().is_empty()) {
        return Ok((env, ConfigOrigin::Env));
    }
    if working.exists() {
        return Ok((working.to_owned(), ConfigOrigin::WorkingDir));
    }
    if system.exists() {
        return Ok((system.to_owned(), ConfigOrigin::System));
    }
    Err(ConfigError::NotFound)
}

#[cfg(test)]
mod locate_tests {
    use super::*;

    #[test]
    fn the_search_order_is_flag_env_working_dir_system() {
        let dir = std::env::temp_dir().join(format!("plugind-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let working = dir.join("plugins.toml");
        let system = dir.join("etc.toml");
        let env = Some(PathBuf::from("/from/env.toml"));
        let flag = Path::new("/from/flag.toml");
        let found = |flag, env: Option<PathBuf>| {
            locate_in(flag, env, &working, &system).map_err(|e| e.to_string())
        };
        assert_eq!(
            found(Some(flag), env.clone()),
            Ok((flag.to_owned(), ConfigOrigin::Flag))
        );
        assert_eq!(
            found(None, env.clone()),
            Ok((env.clone().unwrap(), ConfigOrigin::Env))
        );
        assert!(
            found(None, None)
                .unwrap_err()
                .contains("no configuration file")
        );
        std::fs::write(&system, "").unwrap();
        assert_eq!(
            found(None, None),
            Ok((system.clone(), ConfigOrigin::System))
        );
        std::fs::write(&working, "").unwrap();
        assert_eq!(
            found(None, None),
            Ok((working.clone(), ConfigOrigin::WorkingDir))
        );
        assert_eq!(
            found(None, Some(PathBuf::new())),
            Ok((working, ConfigOrigin::WorkingDir))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clients_connect_by_flag_env_config_then_default() {
        let dir = std::env::temp_dir().join(format!("plugind-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("plugins.toml");
        std::fs::write(&config, "[host]\nlisten = \"unix:run/d.sock\"\n").unwrap();
        let env = Some("tcp:127.0.0.1:7000".to_owned());
        let resolve = |flag, env, config| {
            client_endpoint_in(flag, env, config).map(|c| (c.endpoint, c.origin))
        };
        assert_eq!(
            resolve(Some("unix:/x.sock"), env.clone(), Some(config.clone())),
            Ok((Endpoint::Unix("/x.sock".into()), ConnectOrigin::Flag))
        );
        assert_eq!(
            resolve(None, env.clone(), Some(config.clone())),
            Ok((Endpoint::Tcp("127.0.0.1:7000".into()), ConnectOrigin::Env))
        );
        assert_eq!(
            resolve(None, None, Some(config.clone())),
            Ok((
                Endpoint::Unix(dir.join("run/d.sock")),
                ConnectOrigin::Config
            ))
        );
        assert_eq!(
            resolve(None, None, None),
            Ok((
                Endpoint::Unix("/run/plugind/plugind.sock".into()),
                ConnectOrigin::Default
            ))
        );
        assert!(
            resolve(Some("nope"), None, None)
                .unwrap_err()
                .starts_with("--connect: ")
        );
        std::fs::write(&config, "[host]\nlisten = 3\n").unwrap();
        let e = resolve(None, None, Some(config.clone())).unwrap_err();
        assert!(
            e.contains("invalid configuration") && e.contains("--connect"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_configuration_still_names_its_socket_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("plugins.toml");
        // Valid TOML, invalid configuration: the listen comes from the parsed table.
        std::fs::write(
            &config,
            "[host]\nlisten = \"unix:run/d.sock\"  # x\nretries = 3\n",
        )
        .unwrap();
        let c = client_endpoint_in(None, None, Some(config.clone())).unwrap();
        assert_eq!(c.endpoint, Endpoint::Unix(dir.path().join("run/d.sock")));
        let problem = c.config_problem.unwrap();
        assert!(
            problem.contains("plugins.toml:3:1") && problem.contains("retries"),
            "{problem}"
        );
        // Broken TOML: the listen line of [host] is still found.
        std::fs::write(
            &config,
            "[host]\nlisten = \"unix:run/e.sock\"\n[plugins.a\nplugin = \n",
        )
        .unwrap();
        let c = client_endpoint_in(None, None, Some(config.clone())).unwrap();
        assert_eq!(c.endpoint, Endpoint::Unix(dir.path().join("run/e.sock")));
        assert!(c.config_problem.is_some());
        // $PLUGIND_CONNECT wins, and the problem is still told.
        let c =
            client_endpoint_in(None, Some("unix:/x.sock".into()), Some(config.clone())).unwrap();
        assert_eq!(
            (c.endpoint, c.origin),
            (Endpoint::Unix("/x.sock".into()), ConnectOrigin::Env)
        );
        assert!(c.config_problem.is_some());
        // No listen to be read: refused, saying how to get on.
        std::fs::write(&config, "[host\n").unwrap();
        let e = client_endpoint_in(None, None, Some(config)).unwrap_err();
        assert!(e.contains("--connect"), "{e}");
    }

    #[test]
    fn endpoints_parse_and_name_the_socket_path_limit() {
        let base = Path::new("/etc/plugind");
        assert_eq!(
            Endpoint::parse("unix:run/p.sock", base),
            Ok(Endpoint::Unix(PathBuf::from("/etc/plugind/run/p.sock")))
        );
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:7070", base),
            Ok(Endpoint::Tcp("127.0.0.1:7070".into()))
        );
        let long = format!("unix:/{}", "x".repeat(120));
        assert!(
            Endpoint::parse(&long, base)
                .unwrap_err()
                .contains("107-byte limit")
        );
        assert!(
            Endpoint::parse("tcp:7070", base)
                .unwrap_err()
                .contains("HOST:PORT")
        );
        assert!(
            Endpoint::parse("http://x", base)
                .unwrap_err()
                .contains("unix:PATH")
        );
    }
}
