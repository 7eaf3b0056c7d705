//! The metrics endpoint on `[host] metrics`: plain HTTP/1.1, `GET /metrics` (the scrape,
//! [`render`](super::render)), `GET /healthz` (the process answers) and `GET /readyz` (the
//! daemon serves: started and not draining). No token: nothing here carries a payload or a
//! header value, and the shipped unit lets only localhost connect (README, Monitoring).
//! Bound before the daemon says it is ready (a taken port fails the start); stopped with it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::oneshot, task::JoinSet};

use super::render::{Format, render};
use crate::front::Front;

/// Connections served at once; more are closed at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A bound endpoint, not serving yet.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Whether the daemon serves (`/readyz`): set once it started, cleared when it drains.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready (`true`: started) or not (`false`: draining).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether `/readyz` answers 200.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Binds `addr`.
///
/// # Errors
/// [`BindError`] when the address cannot be bound (in use, not local, not permitted).
pub async fn bind(addr: SocketAddr) -> Result<Endpoint, BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    Ok(Endpoint { listener, addr })
}

impl Endpoint {
    /// The address it listens on (the port chosen, for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `front`'s metrics until [`Serving::stop`].
    pub fn serve(self, front: Front, readiness: Readiness) -> Serving {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(self.listener, front, readiness, stopped));
        Serving { task, stop }
    }
}

/// The endpoint serving.
#[derive(Debug)]
pub struct Serving {
    task: tokio::task::JoinHandle<()>,
    stop: oneshot::Sender<()>,
}

impl Serving {
    /// Stops listening and closes every connection.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn accept(
    listener: TcpListener,
    front: Front,
    readiness: Readiness,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: the API matters more; try again shortly.
                tracing::warn!(error = %e, "metrics endpoint: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let (front, readiness) = (front.clone(), readiness.clone());
        connections.spawn(async move {
            let service =
                service_fn(move |request| answer(request, front.clone(), readiness.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.abort_all();
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn answer(
    request: Request<Incoming>,
    front: Front,
    readiness: Readiness,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: this endpoint serves /metrics, /healthz and /readyz\n",
        ));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    Ok(match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.get() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or draining\n",
        ),
        _ => {
            let format = Format::accepting(
                request
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            // The status asks the dispatcher's thread (a blocking call).
            match tokio::task::spawn_blocking(move || render(front.observe(), format)).await {
                Ok(body) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static(format.content_type()),
                    );
                    response
                }
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "the scrape failed\n"),
            }
        }
    })
}
