//! Listening and serving: a Unix socket (a stale socket file is replaced, a live one is an
//! error; the mode is set explicitly after bind, whatever the umask) or, opt-in, TCP where
//! every call must carry `authorization: Bearer <token>` from `tcp_token_file`.

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

use super::publisher::PublisherService;
use crate::config::Endpoint;

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

/// Serves the API on `bound` until `shutdown` resolves; then stops accepting and lets calls
/// in progress finish.
///
/// # Errors
/// [`ServeError::Transport`] if serving fails.
pub async fn serve(
    bound: Bound,
    publisher: PublisherService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    match bound {
        Bound::Unix { listener, path } => {
            let result = Server::builder()
                .add_service(publisher.into_server())
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Bound::Tcp { listener, token } => {
            let expected: MetadataValue<Ascii> = format!("Bearer {token}")
                .parse()
                .expect("read_token admits only tokens that are valid header text");
            let check = move |request: Request<()>| match request.metadata().get("authorization") {
                Some(given) if given == expected => Ok(request),
                Some(_) => Err(Status::unauthenticated("wrong token")),
                None => Err(Status::unauthenticated(
                    "this TCP endpoint needs `authorization: Bearer <token>` (tcp_token_file)",
                )),
            };
            Server::builder()
                .add_service(tonic::service::interceptor::InterceptedService::new(
                    publisher.into_server(),
                    check,
                ))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await?;
        }
    }
    Ok(())
}
