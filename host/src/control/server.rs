//! Listening and serving: a Unix socket (a stale socket file is replaced, a live one is an
//! error; the mode and group are set explicitly after bind, whatever the umask) or, opt-in,
//! TCP where every call must carry `authorization: Bearer <token>` (`tcp:`, or `tcps:` with
//! TLS from `tls_cert_file` and `tls_key_file`). Served: `Publisher`, `Control`, standard
//! health checking and server reflection (v1 and v1alpha).
//!
//! Two permissions: **publish** (`Publisher`, health, reflection) and **operate**
//! (`Control`, which includes publishing). On the Unix socket the peer's credentials decide
//! ([`Access`]); over TCP the token does ([`Tokens`]: the publish token of `tcp_token_file`,
//! the operator token of `tcp_operator_token_file`), compared in constant time.
//!
//! Connections are served here rather than by tonic's `Server`, which retries a failed
//! `accept` at once (at the file-descriptor limit the listening socket stays readable: a
//! core spun and nothing was logged) and closes no idle connection. Each connection has a
//! slot of `max_connections` (one more is answered RESOURCE_EXHAUSTED and closed), must
//! send its first call within `handshake_timeout` (a TLS handshake included), and is closed
//! with GOAWAY once no call has been open for `idle_timeout`. A failed accept for want of
//! descriptors or memory is logged once and retried with a back-off of up to a second.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use subtle::ConstantTimeEq as _;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};
use tonic::{
    Request, Status, metadata::MetadataValue, service::Routes,
    service::interceptor::InterceptedService,
};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tower::Service as _;

use super::{operator::ControlService, pb, publisher::PublisherService};
use crate::{
    config::{Endpoint, HostSettings},
    loader,
};

/// Why the API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("listen unix:{}: another process is listening on this socket", path.display())]
    InUse { path: PathBuf },
    #[error("{key} {}: {source}", path.display())]
    Token {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {}: the file is empty", path.display())]
    EmptyToken { key: &'static str, path: PathBuf },
    #[error(
        "{key} {}: the token must be visible ASCII (it travels in a header)",
        path.display()
    )]
    InvalidToken { key: &'static str, path: PathBuf },
    #[error("tcp_operator_token_file holds the same token as tcp_token_file; they must differ")]
    SameTokens,
    #[error("{key} {}: {cause}", path.display())]
    Tls {
        key: &'static str,
        path: PathBuf,
        cause: String,
    },
    #[error("serving the API: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// A bound listener, ready to serve.
pub enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: TcpListener,
        tokens: Tokens,
        /// `tcps:`.
        tls: Option<TlsAcceptor>,
    },
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Bound {
    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Unix { path, .. } => format!("unix:{}", path.display()),
            Self::Tcp { listener, tls, .. } => {
                let scheme = if tls.is_some() { "tcps" } else { "tcp" };
                listener
                    .local_addr()
                    .map_or_else(|_| format!("{scheme}:?"), |a| format!("{scheme}:{a}"))
            }
        }
    }
}

/// Reads the bearer token of a TCP listener from `path` (the file of `key`).
///
/// # Errors
/// [`ServeError::Token`], [`ServeError::EmptyToken`] or [`ServeError::InvalidToken`].
pub fn read_token(key: &'static str, path: &Path) -> Result<String, ServeError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| ServeError::Token {
            key,
            path: path.to_owned(),
            source,
        })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(ServeError::EmptyToken {
            key,
            path: path.to_owned(),
        });
    }
    if format!("Bearer {token}")
        .parse::<MetadataValue<tonic::metadata::Ascii>>()
        .is_err()
    {
        return Err(ServeError::InvalidToken {
            key,
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// The tokens of a TCP listener: `authorization: Bearer <token>` as sent.
#[derive(Clone)]
pub struct Tokens {
    publish: Vec<u8>,
    operate: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("operate", &self.operate.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// The publish token and, if any, the operator token.
    ///
    /// # Errors
    /// [`ServeError::SameTokens`] when they are equal.
    pub fn new(publish: &str, operate: Option<&str>) -> Result<Self, ServeError> {
        if operate == Some(publish) {
            return Err(ServeError::SameTokens);
        }
        let header = |token: &str| format!("Bearer {token}").into_bytes();
        Ok(Self {
            publish: header(publish),
            operate: operate.map(header),
        })
    }

    /// What the `authorization` header `given` grants. Compared in constant time: how long
    /// the comparison takes says nothing about how much of a guess was right.
    fn grant(&self, given: Option<&[u8]>) -> Result<Permission, Status> {
        let Some(given) = given else {
            return Err(Status::unauthenticated(
                "this TCP endpoint needs `authorization: Bearer <token>` (tcp_token_file, or \
                 tcp_operator_token_file to operate)",
            ));
        };
        let operate = self
            .operate
            .as_ref()
            .is_some_and(|token| bool::from(token.as_slice().ct_eq(given)));
        let publish = bool::from(self.publish.as_slice().ct_eq(given));
        if operate {
            Ok(Permission::Operate)
        } else if publish {
            Ok(Permission::Publish)
        } else {
            Err(Status::unauthenticated("wrong token"))
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    /// `Publisher`, health checking, reflection.
    Publish,
    /// `Control` (and everything `Publish` allows).
    Operate,
}

/// Who called, as the connection knows it: put in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A Unix socket peer and its credentials (`SO_PEERCRED`), when known.
    Unix(Option<(u32, u32)>),
    /// A TCP peer.
    Tcp(SocketAddr),
}

impl Peer {
    /// The peer's identity for shares of a limit: its uid, or its IP address.
    pub fn identity(&self) -> String {
        match self {
            Self::Unix(Some((uid, _))) => format!("uid {uid}"),
            Self::Unix(None) => "an unknown Unix peer".to_owned(),
            Self::Tcp(address) => format!("{}", address.ip()),
        }
    }
}

/// A set of users and groups, resolved.
#[derive(Debug, Clone, Default)]
struct Members {
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl Members {
    fn new(users: &[String], groups: &[&str]) -> Self {
        let mut uids: Vec<u32> = vec![0, rustix::process::geteuid().as_raw()];
        uids.extend(users.iter().filter_map(|u| loader::uid_of(u)));
        let mut gids = Vec::new();
        for (gid, members) in groups.iter().filter_map(|g| loader::group_of(g)) {
            gids.push(gid);
            uids.extend(members.iter().filter_map(|m| loader::uid_of(m)));
        }
        Self { uids, gids }
    }

    /// Whether `(uid, gid)` is one of them (the gid is the peer's primary group).
    fn contains(&self, (uid, gid): (u32, u32)) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Who may call over the Unix socket, beyond what the socket file's mode and group allow.
/// Publish: with `allowed_users` or `socket_group` set, root, the daemon's own user, one of
/// `allowed_users`, or a member of `socket_group` (its primary group, or a listed member);
/// else whoever can open the socket. Operate: root, the daemon's own user, one of
/// `operator_users`, or a member of one of `operator_groups`.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `None`: whoever can open the socket.
    publishers: Option<Members>,
    operators: Members,
}

impl Access {
    /// From the configuration (names resolved now).
    pub fn new(host: &HostSettings) -> Self {
        let publishers =
            (!host.allowed_users.is_empty() || host.socket_group.is_some()).then(|| {
                Members::new(
                    &host.allowed_users,
                    &host.socket_group.as_deref().into_iter().collect::<Vec<_>>(),
                )
            });
        let groups: Vec<&str> = host.operator_groups.iter().map(String::as_str).collect();
        Self {
            publishers,
            operators: Members::new(&host.operator_users, &groups),
        }
    }

    /// Refuses a peer that lacks `needed` (PERMISSION_DENIED naming its uid, the permission
    /// and how to grant it).
    fn check(&self, peer: Option<&Peer>, needed: Permission) -> Result<(), Status> {
        let credentials = match peer {
            Some(Peer::Unix(Some(credentials))) => *credentials,
            _ if self.publishers.is_none() && needed == Permission::Publish => return Ok(()),
            _ => {
                return Err(Status::permission_denied(
                    "the peer's credentials are unknown; refused",
                ));
            }
        };
        let uid = credentials.0;
        let publisher = self
            .publishers
            .as_ref()
            .is_none_or(|p| p.contains(credentials));
        let operator = self.operators.contains(credentials);
        match needed {
            _ if !publisher && !operator => Err(Status::permission_denied(format!(
                "uid {uid} may not use this socket (allowed_users, socket_group; \
                 operator_users, operator_groups)"
            ))),
            Permission::Operate if !operator => Err(Status::permission_denied(format!(
                "uid {uid} lacks the operate permission that plugind.v1.Control needs (it \
                 may publish only): add the user to [host] operator_users, or to a group \
                 of operator_groups, and restart the daemon"
            ))),
            _ => Ok(()),
        }
    }
}

/// The permission check of one listener.
#[derive(Debug, Clone)]
enum Check {
    Unix(Arc<Access>),
    Tcp(Arc<Tokens>),
}

impl Check {
    #[allow(clippy::result_large_err)]
    fn check(&self, request: Request<()>, needed: Permission) -> Result<Request<()>, Status> {
        match self {
            Self::Unix(access) => access
                .check(request.extensions().get::<Peer>(), needed)
                .map(|()| request),
            Self::Tcp(tokens) => {
                let given = request
                    .metadata()
                    .get("authorization")
                    .map(MetadataValue::as_bytes);
                match tokens.grant(given)? {
                    granted if granted >= needed => Ok(request),
                    _ if tokens.operate.is_none() => Err(Status::permission_denied(
                        "plugind.v1.Control needs the operate permission, and this daemon has \
                         no operator token: set [host] tcp_operator_token_file and restart it \
                         (the token of tcp_token_file allows publishing only)",
                    )),
                    _ => Err(Status::permission_denied(
                        "plugind.v1.Control needs the operate permission: the token given is \
                         the publish token (tcp_token_file); send the operator token \
                         (tcp_operator_token_file)",
                    )),
                }
            }
        }
    }
}

/// Binds the endpoint of `host` (`listen`), with its tokens and TLS certificate.
///
/// # Errors
/// [`ServeError`] naming the endpoint or file and the cause.
pub async fn bind(host: &HostSettings) -> Result<Bound, ServeError> {
    let endpoint = &host.listen;
    let bind_error = |source| ServeError::Bind {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServeError::InUse { path: path.clone() });
                }
                std::fs::remove_file(path).map_err(bind_error)?;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(bind_error)?;
            }
            let listener = UnixListener::bind(path).map_err(bind_error)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(host.socket_mode))
                .map_err(bind_error)?;
            Ok(Bound::Unix {
                listener,
                path: path.clone(),
            })
        }
        Endpoint::Tcp(address) | Endpoint::Tls(address) => {
            let publish = match &host.tcp_token_file {
                Some(file) => read_token("tcp_token_file", file)?,
                None => {
                    return Err(bind_error(std::io::Error::other(
                        "a TCP listener needs tcp_token_file",
                    )));
                }
            };
            let operate = match &host.tcp_operator_token_file {
                Some(file) => Some(read_token("tcp_operator_token_file", file)?),
                None => None,
            };
            let tokens = Tokens::new(&publish, operate.as_deref())?;
            let tls = match (endpoint, &host.tls_cert_file, &host.tls_key_file) {
                (Endpoint::Tls(_), Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
                (Endpoint::Tls(_), _, _) => {
                    return Err(bind_error(std::io::Error::other(
                        "a tcps: listener needs tls_cert_file and tls_key_file",
                    )));
                }
                _ => None,
            };
            let listener = TcpListener::bind(address).await.map_err(bind_error)?;
            Ok(Bound::Tcp {
                listener,
                tokens,
                tls,
            })
        }
    }
}

/// The TLS configuration of a `tcps:` listener: the certificate chain and key (PEM).
fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServeError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| ServeError::Tls {
            key: "tls_cert_file",
            path: cert.to_owned(),
            cause: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(ServeError::Tls {
            key: "tls_cert_file",
            path: cert.to_owned(),
            cause: "no certificate in the file".to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| ServeError::Tls {
        key: "tls_key_file",
        path: key.to_owned(),
        cause: format!("not a PEM private key: {e}"),
    })?;
    // ring, as tonic's client side (`tls-ring`) uses: no C toolchain beyond what the build
    // has; rustls deprecates it for want of post-quantum key exchange, which aws-lc-rs has.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|e| ServeError::Tls {
            key: "tls_key_file",
            path: key.to_owned(),
            cause: format!("the key does not fit the certificate: {e}"),
        })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Sets the socket file's group (`socket_group`) explicitly after bind.
///
/// # Errors
/// [`ServeError::Bind`] naming the socket when the group is unknown or cannot be set.
pub fn set_group(bound: &Bound, group: &str) -> Result<(), ServeError> {
    let Bound::Unix { path, .. } = bound else {
        return Ok(());
    };
    let error = |source| ServeError::Bind {
        endpoint: format!("unix:{}", path.display()),
        source,
    };
    let (gid, _) = loader::group_of(group).ok_or_else(|| {
        error(std::io::Error::other(format!(
            "socket_group `{group}` is not a known group"
        )))
    })?;
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(error)
}

/// A setting that leaves the API weaker than it could be, said at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weakness {
    /// `socket_mode` lets every local user connect.
    SocketWritableByOthers { mode: u32 },
    /// A token file other users can read.
    TokenReadableByOthers {
        key: &'static str,
        path: PathBuf,
        mode: u32,
    },
    /// Tokens cross a network in plaintext.
    PlaintextTcp { address: String },
    /// `max_connections` leaves too few descriptors for the rest of the daemon.
    ConnectionsNearDescriptorLimit { max_connections: u32, limit: u64 },
}

impl std::fmt::Display for Weakness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SocketWritableByOthers { mode } => write!(
                f,
                "socket_mode {mode:04o} lets every local user connect to the API; use 0660 \
                 with socket_group (or allowed_users) to say who may"
            ),
            Self::TokenReadableByOthers { key, path, mode } => write!(
                f,
                "{key} {} (mode {mode:04o}) can be read by other users, who can then use \
                 the API; chmod o-rwx it",
                path.display()
            ),
            Self::PlaintextTcp { address } => write!(
                f,
                "listen tcp:{address} is not a loopback address: tokens and messages cross \
                 the network in plaintext; listen on tcps: with tls_cert_file and \
                 tls_key_file"
            ),
            Self::ConnectionsNearDescriptorLimit {
                max_connections,
                limit,
            } => write!(
                f,
                "max_connections = {max_connections} leaves fewer than {RESERVED_DESCRIPTORS} \
                 of the {limit} file descriptors (RLIMIT_NOFILE) for the ledger and plugins; \
                 lower it or raise LimitNOFILE"
            ),
        }
    }
}

/// Descriptors kept for everything but connections (ledger, libraries, watches, pipes).
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// What in `host` leaves the API weaker than it could be (`descriptors`: the soft
/// RLIMIT_NOFILE the daemon runs with).
pub fn weaknesses(host: &HostSettings, descriptors: Option<u64>) -> Vec<Weakness> {
    let mut found = Vec::new();
    if matches!(host.listen, Endpoint::Unix(_)) && host.socket_mode & 0o002 != 0 {
        found.push(Weakness::SocketWritableByOthers {
            mode: host.socket_mode,
        });
    }
    let files = [
        ("tcp_token_file", &host.tcp_token_file),
        ("tcp_operator_token_file", &host.tcp_operator_token_file),
    ];
    for (key, path) in files {
        if let Some(path) = path
            && let Ok(meta) = std::fs::metadata(path)
            && meta.mode() & 0o007 != 0
        {
            found.push(Weakness::TokenReadableByOthers {
                key,
                path: path.clone(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    if let Endpoint::Tcp(address) = &host.listen
        && !loopback(address)
    {
        found.push(Weakness::PlaintextTcp {
            address: address.clone(),
        });
    }
    if let Some(limit) = descriptors
        && u64::from(host.max_connections) + RESERVED_DESCRIPTORS > limit
    {
        found.push(Weakness::ConnectionsNearDescriptorLimit {
            max_connections: host.max_connections,
            limit,
        });
    }
    found
}

/// Whether `HOST:PORT` names only this machine (a loopback address, or `localhost`).
fn loopback(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What is served.
#[derive(Debug)]
pub struct Services {
    pub publisher: PublisherService,
    pub control: ControlService,
    pub health: HealthServer<HealthService>,
    /// For the Unix socket.
    pub access: Access,
}

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl ConnectionLimits {
    pub fn new(host: &HostSettings) -> Self {
        Self {
            max_connections: host.max_connections as usize,
            idle_timeout: host.idle_timeout,
            handshake_timeout: host.handshake_timeout,
        }
    }
}

/// The health reporter of the served services: SERVING once started, NOT_SERVING while the
/// daemon drains.
pub async fn health() -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
    reporter
        .set_serving::<pb::publisher_server::PublisherServer<PublisherService>>()
        .await;
    reporter
        .set_serving::<pb::control_server::ControlServer<ControlService>>()
        .await;
    (reporter, server)
}

/// Reports the daemon draining: every service NOT_SERVING.
pub async fn draining(reporter: &HealthReporter) {
    reporter
        .set_not_serving::<pb::publisher_server::PublisherServer<PublisherService>>()
        .await;
    reporter
        .set_not_serving::<pb::control_server::ControlServer<ControlService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

/// The descriptors generic tools read through server reflection.
const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("plugind_descriptor");

/// Connections refused at once (each answered RESOURCE_EXHAUSTED, then closed); more are
/// closed without an answer.
const REFUSING: usize = 32;
/// How long a refused connection is kept for its answer.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// How long a connection asked to close (idle) may take before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// The longest wait between two accepts that failed for want of descriptors or memory.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// HTTP/2 pings on a connection with calls open: a peer that vanished is noticed.
const KEEPALIVE: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves the API on `bound` until `shutdown` resolves; then stops accepting, asks every
/// connection to close (GOAWAY) and waits for the calls in progress to finish.
///
/// # Errors
/// [`ServeError::Reflection`] if the reflection service cannot be built.
pub async fn serve(
    bound: Bound,
    services: Services,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let Services {
        publisher,
        control,
        health,
        access,
    } = services;
    let check = match &bound {
        Bound::Unix { .. } => Check::Unix(Arc::new(access)),
        Bound::Tcp { tokens, .. } => Check::Tcp(Arc::new(tokens.clone())),
    };
    let needs = |needed: Permission| {
        let check = check.clone();
        move |request: Request<()>| check.check(request, needed)
    };
    let routes = Routes::new(InterceptedService::new(
        publisher.into_server(),
        needs(Permission::Publish),
    ))
    .add_service(InterceptedService::new(
        control.into_server(),
        needs(Permission::Operate),
    ))
    .add_service(InterceptedService::new(health, needs(Permission::Publish)))
    .add_service(InterceptedService::new(v1, needs(Permission::Publish)))
    .add_service(InterceptedService::new(v1alpha, needs(Permission::Publish)))
    .prepare();
    let server = Connections::new(routes, limits);
    match bound {
        Bound::Unix { listener, path } => {
            server
                .run(
                    || async {
                        let (stream, _) = listener.accept().await?;
                        let credentials = stream.peer_cred().ok().map(|c| (c.uid(), c.gid()));
                        Ok((stream, Peer::Unix(credentials)))
                    },
                    None,
                    shutdown,
                )
                .await;
            let _ = std::fs::remove_file(&path);
        }
        Bound::Tcp { listener, tls, .. } => {
            server
                .run(
                    || async {
                        let (stream, address) = listener.accept().await?;
                        let _ = stream.set_nodelay(true);
                        Ok((stream, Peer::Tcp(address)))
                    },
                    tls,
                    shutdown,
                )
                .await;
        }
    }
    Ok(())
}

/// The connections of one listener.
struct Connections {
    routes: Routes,
    limits: ConnectionLimits,
    http: auto::Builder<TokioExecutor>,
}

impl Connections {
    fn new(routes: Routes, limits: ConnectionLimits) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new()).http2_only();
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(KEEPALIVE))
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        Self {
            routes,
            limits,
            http,
        }
    }

    /// Accepts with `accept` until `shutdown`, each connection on a task of its own; then
    /// asks them to close and waits until they did.
    async fn run<S, A, F>(
        &self,
        accept: A,
        tls: Option<TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        A: Fn() -> F,
        F: Future<Output = std::io::Result<(S, Peer)>>,
    {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let refusing = Arc::new(Semaphore::new(REFUSING));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut backoff = AcceptBackoff::default();
        tokio::pin!(shutdown);
        loop {
            while tasks.try_join_next().is_some() {}
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff.accepted();
                    accepted
                }
                Err(e) => {
                    if let Some(wait) = backoff.failed(&e) {
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // At the limit: an answer that says so, to as many as `REFUSING` at once.
                // (Over TLS it is closed: a handshake would cost more than the answer is worth.)
                if tls.is_none()
                    && let Ok(refusal) = refusing.clone().try_acquire_owned()
                {
                    let http = self.http.clone();
                    let max = self.limits.max_connections;
                    tasks.spawn(async move {
                        refuse(http, stream, max).await;
                        drop(refusal);
                    });
                }
                continue;
            };
            let connection = Connection {
                routes: self.routes.clone(),
                http: self.http.clone(),
                limits: self.limits,
                peer,
                stop: stopped.clone(),
            };
            let tls = tls.clone();
            tasks.spawn(async move {
                match tls {
                    None => connection.serve(stream, Instant::now()).await,
                    Some(acceptor) => {
                        let started = Instant::now();
                        match tokio::time::timeout(
                            connection.limits.handshake_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(stream)) => connection.serve(stream, started).await,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %connection.peer.identity(), error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                tracing::debug!(peer = %connection.peer.identity(), "no TLS handshake within handshake_timeout; closed");
                            }
                        }
                    }
                }
                drop(slot);
            });
        }
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

/// Answers every call on `stream` with RESOURCE_EXHAUSTED naming the limit, for a moment.
async fn refuse<S>(http: auto::Builder<TokioExecutor>, stream: S, max: usize)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::service_fn(move |_: http::Request<hyper::body::Incoming>| async move {
        Ok::<_, Infallible>(
            Status::resource_exhausted(format!(
                "the daemon serves {max} connections already (max_connections); try again \
                 when one closes"
            ))
            .into_http::<tonic::body::Body>(),
        )
    });
    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    let _ = tokio::time::timeout(REFUSAL_TIME, connection).await;
}

/// The back-off of an accept loop whose accepts fail for want of descriptors or memory: one
/// log line when it starts, one when accepting works again.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// The wait after the last failure; `None` while accepts succeed.
    wait: Option<Duration>,
    failures: u64,
}

impl AcceptBackoff {
    /// After a failed accept: how long to wait before the next (`None`: at once, the error
    /// was the peer's).
    fn failed(&mut self, e: &std::io::Error) -> Option<Duration> {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            tracing::debug!(error = %e, "accept failed");
            return None;
        }
        self.failures += 1;
        let wait = match self.wait {
            None => {
                let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                    .current
                    .map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
                tracing::warn!(
                    error = %e,
                    nofile = %limit,
                    "cannot accept connections: out of file descriptors or memory; new \
                     clients wait while accepting is retried (backing off up to 1 s)"
                );
                Duration::from_millis(10)
            }
            Some(wait) => (wait * 2).min(MAX_ACCEPT_BACKOFF),
        };
        self.wait = Some(wait);
        Some(wait)
    }

    fn accepted(&mut self) {
        if self.wait.take().is_some() {
            tracing::info!(failures = self.failures, "accepting connections again");
            self.failures = 0;
        }
    }
}

/// One connection being served.
struct Connection {
    routes: Routes,
    http: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    peer: Peer,
    stop: watch::Receiver<bool>,
}

impl Connection {
    /// Serves HTTP/2 on `stream` until the peer closes, the connection is idle or silent too
    /// long, or the daemon stops.
    async fn serve<S>(mut self, stream: S, started: Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new(started));
        let routes = self.routes.clone();
        let peer = self.peer;
        let tracked = activity.clone();
        let service = tower::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let mut request = request.map(tonic::body::Body::new);
            request.extensions_mut().insert(peer);
            let call = tracked.open();
            let mut routes = routes.clone();
            async move {
                let response = routes.call(request).await?;
                Ok::<_, Infallible>(
                    response.map(|body| tonic::body::Body::new(Tracked { body, _call: call })),
                )
            }
        });
        let connection = self
            .http
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let mut closing: Option<Instant> = None;
        loop {
            let wake = match closing {
                Some(since) => since + CLOSE_GRACE,
                None => activity.deadline(&self.limits),
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %self.peer.identity(), error = %e, "connection ended");
                    }
                    return;
                }
                _ = self.stop.changed(), if closing.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    if closing.is_some() {
                        tracing::debug!(peer = %self.peer.identity(), "connection did not close in time; dropped");
                        return;
                    }
                    match activity.verdict(&self.limits, Instant::now()) {
                        Verdict::Silent => {
                            tracing::debug!(peer = %self.peer.identity(), "no call within handshake_timeout; closed");
                            return;
                        }
                        Verdict::Idle => {
                            tracing::debug!(peer = %self.peer.identity(), "idle for idle_timeout; closing");
                            connection.as_mut().graceful_shutdown();
                            closing = Some(Instant::now());
                        }
                        Verdict::Busy => {}
                    }
                }
            }
        }
    }
}

/// The calls of one connection: how many ever, how many open, when the last ended.
#[derive(Debug)]
struct Activity {
    started: Instant,
    calls: AtomicU64,
    open: AtomicUsize,
    /// Milliseconds after `started` that the last call ended.
    last_ms: AtomicU64,
}

/// What a connection's activity calls for.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// No call within `handshake_timeout`: closed at once.
    Silent,
    /// No call open for `idle_timeout`: asked to close.
    Idle,
    Busy,
}

impl Activity {
    fn new(started: Instant) -> Self {
        Self {
            started,
            calls: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    /// A call starts; it ends when the guard (kept by its response body) is dropped.
    fn open(self: &Arc<Self>) -> Call {
        self.calls.fetch_add(1, Ordering::AcqRel);
        self.open.fetch_add(1, Ordering::AcqRel);
        Call(self.clone())
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Acquire))
    }

    /// When to look again.
    fn deadline(&self, limits: &ConnectionLimits) -> Instant {
        if self.calls.load(Ordering::Acquire) == 0 {
            self.started + limits.handshake_timeout
        } else if self.open.load(Ordering::Acquire) > 0 {
            Instant::now() + limits.idle_timeout
        } else {
            self.last() + limits.idle_timeout
        }
    }

    fn verdict(&self, limits: &ConnectionLimits, now: Instant) -> Verdict {
        if self.calls.load(Ordering::Acquire) == 0 {
            if now >= self.started + limits.handshake_timeout {
                return Verdict::Silent;
            }
            return Verdict::Busy;
        }
        if self.open.load(Ordering::Acquire) == 0 && now >= self.last() + limits.idle_timeout {
            Verdict::Idle
        } else {
            Verdict::Busy
        }
    }
}

/// An open call: ended when dropped.
#[derive(Debug)]
struct Call(Arc<Activity>);

impl Drop for Call {
    fn drop(&mut self) {
        let since = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(since, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its call open until it is dropped (sent, or reset).
struct Tracked {
    body: tonic::body::Body,
    _call: Call,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_grants_its_permission_and_nothing_else() {
        let tokens = Tokens::new("pub", Some("ops")).unwrap();
        assert_eq!(
            tokens.grant(Some(b"Bearer pub")).unwrap(),
            Permission::Publish
        );
        assert_eq!(
            tokens.grant(Some(b"Bearer ops")).unwrap(),
            Permission::Operate
        );
        for wrong in [&b"Bearer pu"[..], b"Bearer pubx", b"", b"pub"] {
            assert_eq!(
                tokens.grant(Some(wrong)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(Tokens::new("same", Some("same")).is_err());
    }

    #[test]
    fn a_connection_is_silent_then_busy_then_idle() {
        let limits = ConnectionLimits {
            max_connections: 1,
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(1),
        };
        let start = Instant::now();
        let activity = Arc::new(Activity::new(start));
        assert_eq!(activity.verdict(&limits, start), Verdict::Busy);
        assert_eq!(
            activity.verdict(&limits, start + Duration::from_secs(1)),
            Verdict::Silent
        );
        let call = activity.open();
        let later = start + Duration::from_secs(100);
        assert_eq!(activity.verdict(&limits, later), Verdict::Busy);
        drop(call);
        let ended = activity.last();
        assert_eq!(activity.verdict(&limits, ended), Verdict::Busy);
        assert_eq!(
            activity.verdict(&limits, ended + Duration::from_secs(10)),
            Verdict::Idle
        );
    }

    #[test]
    fn weak_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[host]\nlisten = \"tcp:0.0.0.0:7070\"\ntcp_token_file = \"{}\"\n",
            token.display()
        );
        let config = crate::config::parse(&dir.path().join("p.toml"), &text).unwrap();
        let found = weaknesses(&config.host, Some(512));
        assert!(found.contains(&Weakness::PlaintextTcp {
            address: "0.0.0.0:7070".into()
        }));
        assert!(
            found
                .iter()
                .any(|w| matches!(w, Weakness::TokenReadableByOthers { mode: 0o644, .. }))
        );
        assert!(found.iter().any(|w| matches!(
            w,
            Weakness::ConnectionsNearDescriptorLimit { limit: 512, .. }
        )));
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\ntcp_token_file = \"{}\"\n",
            token.display()
        );
        let config = crate::config::parse(&dir.path().join("p.toml"), &text).unwrap();
        assert_eq!(weaknesses(&config.host, Some(65536)), vec![]);
        let text = "[host]\nsocket_mode = \"0666\"\n";
        let config = crate::config::parse(&dir.path().join("p.toml"), text).unwrap();
        assert_eq!(
            weaknesses(&config.host, None),
            vec![Weakness::SocketWritableByOthers { mode: 0o666 }]
        );
    }
}
