//! Listening and serving: a Unix socket (a stale socket file is replaced, a live one is an
//! error; the mode and group are set explicitly after bind, whatever the umask, and peers
//! are checked against `allowed_users` and `socket_group`) or, opt-in, TCP where every call
//! must carry `authorization: Bearer <token>` from `tcp_token_file`. Served: `Publisher`,
//! `Control`, standard health checking and server reflection (v1 and v1alpha).

use std::{
    future::Future,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::Server,
};

use tonic::{service::interceptor::InterceptedService, transport::server::UdsConnectInfo};
use tonic_health::{
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::{operator::ControlService, pb, publisher::PublisherService};
use crate::{config::Endpoint, loader};

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
    #[error("tcp_token_file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tcp_token_file {}: the file is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error(
        "tcp_token_file {}: the token must be visible ASCII (it travels in a header)",
        path.display()
    )]
    InvalidToken { path: PathBuf },
    #[error("serving the API: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: TcpListener,
        token: String,
    },
}

impl Bound {
    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Unix { path, .. } => format!("unix:{}", path.display()),
            Self::Tcp { listener, .. } => listener
                .local_addr()
                .map_or_else(|_| "tcp:?".to_owned(), |a| format!("tcp:{a}")),
        }
    }
}

/// Reads the bearer token of a TCP listener.
///
/// # Errors
/// [`ServeError::Token`] or [`ServeError::EmptyToken`].
pub fn read_token(path: &Path) -> Result<String, ServeError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| ServeError::Token {
            path: path.to_owned(),
            source,
        })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(ServeError::EmptyToken {
            path: path.to_owned(),
        });
    }
    if format!("Bearer {token}")
        .parse::<MetadataValue<Ascii>>()
        .is_err()
    {
        return Err(ServeError::InvalidToken {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

/// Binds `endpoint`.
///
/// # Errors
/// [`ServeError`] naming the endpoint and the cause.
pub async fn bind(
    endpoint: &Endpoint,
    socket_mode: u32,
    token_file: Option<&Path>,
) -> Result<Bound, ServeError> {
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
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))
                .map_err(bind_error)?;
            Ok(Bound::Unix {
                listener,
                path: path.clone(),
            })
        }
        Endpoint::Tcp(address) => {
            let token = match token_file {
                Some(file) => read_token(file)?,
                None => {
                    return Err(bind_error(std::io::Error::other(
                        "a TCP listener needs tcp_token_file",
                    )));
                }
            };
            let listener = TcpListener::bind(address).await.map_err(bind_error)?;
            Ok(Bound::Tcp { listener, token })
        }
    }
}

/// Who may call over the Unix socket, beyond what the socket file's mode and group allow:
/// with `allowed_users` or `socket_group` set, a peer must be root, the daemon's own user,
/// one of `allowed_users`, or in `socket_group` (its primary group, or a listed member).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `None`: whoever can open the socket.
    allowed: Option<(Vec<u32>, Option<u32>)>,
}

impl Access {
    /// From the configuration's `allowed_users` and `socket_group` (names resolved now).
    pub fn new(allowed_users: &[String], socket_group: Option<&str>) -> Self {
        if allowed_users.is_empty() && socket_group.is_none() {
            return Self::default();
        }
        let mut uids: Vec<u32> = vec![0, rustix::process::geteuid().as_raw()];
        uids.extend(allowed_users.iter().filter_map(|u| loader::uid_of(u)));
        let gid = socket_group
            .and_then(loader::group_of)
            .map(|(gid, members)| {
                uids.extend(members.iter().filter_map(|m| loader::uid_of(m)));
                gid
            });
        Self {
            allowed: Some((uids, gid)),
        }
    }

    /// Refuses a peer that is not allowed (PERMISSION_DENIED naming its uid).
    #[allow(clippy::result_large_err)]
    fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let Some((uids, gid)) = &self.allowed else {
            return Ok(request);
        };
        let credentials = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        match credentials {
            Some(c) if uids.contains(&c.uid()) || Some(c.gid()) == *gid => Ok(request),
            Some(c) => Err(Status::permission_denied(format!(
                "uid {} may not use this socket (allowed_users, socket_group)",
                c.uid()
            ))),
            None => Err(Status::permission_denied(
                "the peer's credentials are unknown; refused",
            )),
        }
    }
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

/// Serves the API on `bound` until `shutdown` resolves; then stops accepting and lets calls
/// in progress finish.
///
/// # Errors
/// [`ServeError::Transport`] if serving fails.
pub async fn serve(
    bound: Bound,
    services: Services,
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
    // Every service behind the one check of this listener.
    macro_rules! routes {
        ($check:expr) => {{
            let check = $check;
            Server::builder()
                .add_service(InterceptedService::new(
                    publisher.into_server(),
                    check.clone(),
                ))
                .add_service(InterceptedService::new(
                    control.into_server(),
                    check.clone(),
                ))
                .add_service(InterceptedService::new(health, check.clone()))
                .add_service(InterceptedService::new(v1, check.clone()))
                .add_service(InterceptedService::new(v1alpha, check))
        }};
    }
    match bound {
        Bound::Unix { listener, path } => {
            let result = routes!(move |request: Request<()>| access.check(request))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Bound::Tcp { listener, token } => {
            let expected: MetadataValue<Ascii> = format!("Bearer {token}")
                .parse()
                .expect("read_token admits only tokens that are valid header text");
            routes!(
                move |request: Request<()>| match request.metadata().get("authorization") {
                    Some(given) if given == expected => Ok(request),
                    Some(_) => Err(Status::unauthenticated("wrong token")),
                    None => Err(Status::unauthenticated(
                        "this TCP endpoint needs `authorization: Bearer <token>` (tcp_token_file)",
                    )),
                }
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
        }
    }
    Ok(())
}
