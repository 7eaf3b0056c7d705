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

mod access;
mod connections;
mod listen;

use access::Check;
pub use access::{Access, Peer, Permission, Tokens, read_token};
pub use connections::ConnectionLimits;
use connections::Connections;
pub use listen::{Bound, Weakness, bind, set_group, weaknesses};

/// What is served.
#[derive(Debug)]
pub struct Services {
    pub publisher: PublisherService,
    pub control: ControlService,
    pub health: HealthServer<HealthService>,
    /// For the Unix socket.
    pub access: Access,
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
