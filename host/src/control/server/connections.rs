//! The connections served: a slot of `max_connections` each, the first call within
//! `handshake_timeout`, GOAWAY after `idle_timeout`, and a back-off when `accept` fails for
//! want of descriptors or memory.

#[allow(clippy::wildcard_imports)]
use super::*;

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

/// The connections of one listener.
pub(super) struct Connections {
    routes: Routes,
    limits: ConnectionLimits,
    http: auto::Builder<TokioExecutor>,
}

impl Connections {
    pub(super) fn new(routes: Routes, limits: ConnectionLimits) -> Self {
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
    pub(super) async fn run<S, A, F>(
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
pub(super) async fn refuse<S>(http: auto::Builder<TokioExecutor>, stream: S, max: usize)
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
pub(super) struct AcceptBackoff {
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
pub(super) struct Connection {
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
pub(super) struct Activity {
    started: Instant,
    calls: AtomicU64,
    open: AtomicUsize,
    /// Milliseconds after `started` that the last call ended.
    last_ms: AtomicU64,
}

/// What a connection's activity calls for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
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
pub(super) struct Call(Arc<Activity>);

impl Drop for Call {
    fn drop(&mut self) {
        let since = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(since, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its call open until it is dropped (sent, or reset).
pub(super) struct Tracked {
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
}
