//! Async plugins (feature `async`): `async fn handle(&self, msg) -> Outcome`, run on a tokio
//! runtime that lives inside the plugin library.
//!
//! A plugin library has its own copy of tokio's statics and cannot use the daemon's runtime,
//! so the SDK starts one of its own for each instance, on threads the plugin owns: a *feeder*
//! thread builds it, runs the plugin's `new` on it, then spawns one task per delivery; the
//! runtime's workers (a small default, or `workers` in `plugins.toml`) poll them. Each
//! delivery's task owns the attempt's [`Token`] and settles it when the handler's future
//! completes; a panic inside the future fails the attempt with the panic text.
//!
//! The daemon's actor thread only takes the token and pushes it onto the feeder's queue (a
//! mutex and a condition variable): it never touches tokio, nor any thread-local with a
//! destructor, so no thread of the daemon is left pinning the library — after a swap the old
//! generation's library can be unloaded. `shutdown` runs the plugin's own `shutdown` on the
//! runtime, shuts the runtime down (dropping any task left) and joins the feeder.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    task::{Context, Poll},
    thread::JoinHandle,
    time::Duration,
};

use serde::de::DeserializeOwned;

use crate::{
    BoxError, Host, Message, Outcome, Plugin, bridge,
    token::{Token, settle_panicked},
};

/// How long `shutdown` waits for the runtime's tasks and threads to end.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// An async plugin: one instance per `[plugins.<name>]` entry, its deliveries handled
/// concurrently (at most `max_in_flight` at once) on a runtime inside the plugin.
///
/// ```
/// use plugind_api::{AsyncPlugin, Host, Message, Outcome};
///
/// pub struct Slow;
///
/// impl AsyncPlugin for Slow {
///     const NAME: &'static str = "slow";
///     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
///     type Config = ();
///
///     async fn new(_config: (), _host: Host) -> Result<Self, plugind_api::BoxError> {
///         Ok(Slow)
///     }
///
///     async fn handle(&self, msg: Message) -> Outcome {
///         // Any tokio-based library works here (an HTTP client, a database driver): the
///         // runtime is the plugin's own. `tokio::time::sleep(..).await`, say.
///         tracing::info!(id = msg.id().0, "done");
///         Outcome::Ack
///     }
/// }
/// // In the plugin crate: plugind_api::export_async_plugin!(Slow);
/// ```
pub trait AsyncPlugin: Sized + Send + Sync + 'static {
    /// The manifest name; `plugin = "…"` in `plugins.toml` refers to it.
    const NAME: &'static str;
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// Topic patterns an instance subscribes to unless its config says otherwise.
    const TOPICS: &'static [&'static str] = &[];
    /// One line for operators (`plugind inspect` shows it).
    const DESCRIPTION: &'static str = "";
    /// Worker threads of the runtime unless `workers` in `plugins.toml` says otherwise.
    const WORKERS: usize = 2;

    /// The instance's `[plugins.<name>.config]` table, deserialized (on the daemon's thread,
    /// then handed to the runtime's).
    type Config: DeserializeOwned + Send + 'static;

    /// Creates an instance, on its runtime (tokio-based clients can be built here).
    ///
    /// # Errors
    /// Any error refuses the instance; its text reaches the operator.
    fn new(config: Self::Config, host: Host)
    -> impl Future<Output = Result<Self, BoxError>> + Send;

    /// Handles one delivery. Messages published through `Host::publish` while this future
    /// runs are its children (committed only if it acks). A panic fails the attempt.
    fn handle(&self, msg: Message) -> impl Future<Output = Outcome> + Send;

    /// Runs once before the runtime stops.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The [`Plugin`] that runs an [`AsyncPlugin`] (what `export_async_plugin!` exports).
pub struct AsyncAdapter<P: AsyncPlugin> {
    queue: Arc<Queue>,
    feeder: Option<JoinHandle<()>>,
    _plugin: std::marker::PhantomData<fn() -> P>,
}

impl<P: AsyncPlugin> std::fmt::Debug for AsyncAdapter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncAdapter")
            .field("plugin", &P::NAME)
            .finish_non_exhaustive()
    }
}

/// Deliveries on their way from the actor to the feeder.
#[derive(Default)]
struct Queue {
    state: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    tokens: VecDeque<Token>,
    stop: bool,
    /// The answer of `new`: `None` until it ran.
    started: Option<Result<(), String>>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<P: AsyncPlugin> Plugin for AsyncAdapter<P> {
    const NAME: &'static str = P::NAME;
    const VERSION: &'static str = P::VERSION;
    const TOPICS: &'static [&'static str] = P::TOPICS;
    const DESCRIPTION: &'static str = P::DESCRIPTION;
    const DEFERS: bool = true;
    type Config = P::Config;

    fn new(config: P::Config, host: Host) -> Result<Self, BoxError> {
        let queue = Arc::new(Queue::default());
        let workers = host.workers().unwrap_or(P::WORKERS).max(1);
        let feeder = std::thread::Builder::new()
            .name(format!("{}-feeder", P::NAME))
            .spawn({
                let queue = queue.clone();
                move || feed::<P>(&queue, config, host, workers)
            })?;
        let mut state = queue.lock();
        while state.started.is_none() {
            state = queue
                .wake
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let started = state.started.clone().expect("checked above");
        drop(state);
        if let Err(e) = started {
            let _ = feeder.join();
            return Err(e.into());
        }
        Ok(Self {
            queue,
            feeder: Some(feeder),
            _plugin: std::marker::PhantomData,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        let token = match msg.try_defer() {
            Ok(token) => token,
            Err(e) => return Outcome::retry(e.to_string()),
        };
        self.queue.lock().tokens.push_back(token);
        self.queue.wake.notify_all();
        Outcome::Defer
    }

    fn shutdown(mut self) {
        self.queue.lock().stop = true;
        self.queue.wake.notify_all();
        if let Some(feeder) = self.feeder.take() {
            let _ = feeder.join();
        }
    }
}

/// The feeder thread: builds the runtime, runs `new` on it, then spawns a task per delivery
/// until told to stop.
fn feed<P: AsyncPlugin>(queue: &Queue, config: P::Config, host: Host, workers: usize) {
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(format!("{}-worker", P::NAME))
        .enable_all()
        .build();
    let answer = |result: Result<(), String>| {
        queue.lock().started = Some(result);
        queue.wake.notify_all();
    };
    let runtime = match built {
        Ok(runtime) => runtime,
        Err(e) => return answer(Err(format!("cannot start the plugin's runtime: {e}"))),
    };
    let created = {
        let _scope = bridge::enter(&host);
        bridge::catch(|| runtime.block_on(P::new(config, host.clone())))
    };
    let plugin = match created {
        Ok(Ok(plugin)) => Arc::new(plugin),
        Ok(Err(e)) => return answer(Err(e.to_string())),
        Err(panic) => return answer(Err(panic.message.into_string())),
    };
    answer(Ok(()));
    let host = Arc::new(host);
    loop {
        let mut state = queue.lock();
        while state.tokens.is_empty() && !state.stop {
            state = queue
                .wake
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if state.stop {
            break;
        }
        let tokens: Vec<Token> = state.tokens.drain(..).collect();
        drop(state);
        for token in tokens {
            let message = token.message().clone();
            let plugin = plugin.clone();
            runtime.spawn(Attempt {
                token: Some(token),
                host: host.clone(),
                future: Box::pin(async move { plugin.handle(message).await }),
            });
        }
    }
    {
        let _scope = bridge::enter(&host);
        let _ = bridge::catch(|| runtime.block_on(plugin.shutdown()));
    }
    // Tasks still running are dropped (their tokens with them); the workers are joined.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
}

/// One delivery's task: the handler's future, and the token it settles.
struct Attempt<F> {
    token: Option<Token>,
    host: Arc<Host>,
    future: Pin<Box<F>>,
}

impl<F: Future<Output = Outcome>> Future for Attempt<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(token) = &this.token else {
            return Poll::Ready(());
        };
        let polled = {
            let _log = bridge::enter(&this.host);
            let _current = token.enter();
            bridge::catch(|| this.future.as_mut().poll(cx))
        };
        let settled = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(outcome)) => this.token.take().map(|t| t.settle(outcome)),
            Err(panic) => this
                .token
                .take()
                .map(|t| settle_panicked(t, panic.message.into_string())),
        };
        if let Some(Err(e)) = settled {
            tracing::debug!(error = %e, "settlement refused");
        }
        Poll::Ready(())
    }
}

/// Exports an [`AsyncPlugin`] type from a `cdylib` (the async form of `export_plugin!`).
#[macro_export]
macro_rules! export_async_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($crate::AsyncAdapter<$plugin>);
    };
}
