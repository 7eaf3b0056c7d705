//! Routes a plugin's `tracing` events and panics to the host's log callback.
//!
//! A cdylib has its own copy of every static, so the daemon's tracing subscriber and panic
//! hook never see plugin code. `install` sets both, once per loaded library copy: a tracing
//! subscriber that forwards events (fields included) and a panic hook that forwards the panic
//! and keeps its text for the entry point that catches it.
//!
//! Which instance an event belongs to: the daemon loads a separate copy of the library for
//! every instance, so a copy normally has one live instance and every event goes to it, with
//! no per-call cost. When one copy serves several instances (a host that shares copies, or
//! in-process tests), each entry point marks the calling thread with its instance's host
//! ([`enter_if_shared`], one thread-local write: ~1.7 ns per call, measured); events of
//! other threads go to the most recently created live instance.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    fmt::{self, Write as _},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Mutex, Once,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use abi_stable::std_types::RString;
use tracing::{
    Event, Metadata, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
    subscriber::Interest,
};

use crate::{
    abi::{KeyValue, PluginError, PluginErrorKind},
    sdk::{Host, Level},
};

thread_local! {
    static CURRENT: Cell<*const Host> = const { Cell::new(std::ptr::null()) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Live instances of this library copy, newest last: the log target of foreign threads.
static LIVE: Mutex<Vec<(u64, Host)>> = Mutex::new(Vec::new());
/// `LIVE.len()`, readable without the lock on the hot path.
static LIVE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Whether the panic hook also runs the hook it replaced (in-process hosting: tests).
static CHAIN_PREVIOUS_HOOK: AtomicBool = AtomicBool::new(false);
static NEXT_LIVE_ID: AtomicU64 = AtomicU64::new(1);

/// Installs the panic hook and the tracing subscriber of this library copy (idempotent).
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // In a plugin library the previous hook is std's default, which would print every
        // panic to the daemon's stderr a second time; it runs only when no host would see the
        // panic, or when the plugin runs in-process (tests), so a test's own panics still print.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = payload_text(info.payload());
            let text = match info.location() {
                Some(at) => format!("panicked at {at}: {payload}"),
                None => format!("panicked: {payload}"),
            };
            let forwarded = with_host(|host| host.log_fields(Level::Error, "panic", &text, &[]));
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(text));
            if forwarded.is_none() || CHAIN_PREVIOUS_HOOK.load(Ordering::Relaxed) {
                previous(info);
            }
        }));
        // Fails only if the plugin installed a subscriber of its own; then it keeps it.
        let _ = tracing::subscriber::set_global_default(Bridge);
    });
}

/// For plugins hosted in-process (`testing`): the panic hook chains to the hook it replaced,
/// and every entry point marks its thread. In-process hosting shares one copy of these
/// statics among all instances and threads, so the single-instance shortcut of
/// [`enter_if_shared`] would race with instances created during a call.
pub(crate) fn hosted_in_process() {
    CHAIN_PREVIOUS_HOOK.store(true, Ordering::Relaxed);
}

/// Registers a live instance's host as a log target; returns its registration.
pub(crate) fn register(host: Host) -> u64 {
    let id = NEXT_LIVE_ID.fetch_add(1, Ordering::Relaxed);
    let mut live = lock_live();
    live.push((id, host));
    LIVE_COUNT.store(live.len(), Ordering::Relaxed);
    id
}

/// Removes a registration made by [`register`].
pub(crate) fn unregister(id: u64) {
    let removed = {
        let mut live = lock_live();
        let removed = live
            .iter()
            .position(|(live_id, _)| *live_id == id)
            .map(|at| live.remove(at));
        LIVE_COUNT.store(live.len(), Ordering::Relaxed);
        removed
    };
    // Dropped outside the lock: dropping a host runs host code.
    drop(removed);
}

fn lock_live() -> std::sync::MutexGuard<'static, Vec<(u64, Host)>> {
    // A panic while holding the lock leaves the list consistent (push/remove are atomic).
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes `host` the log target of this thread until the guard drops.
///
/// One thread-local lookup per entry point: in a `dlopen`ed library each lookup is a call to
/// `__tls_get_addr`, so the guard keeps the slot's address for its restore.
#[inline]
pub(crate) fn enter(host: &Host) -> Scope {
    CURRENT.with(|slot| Scope {
        prev: slot.replace(host),
        slot,
    })
}

/// [`enter`], but only when this library copy serves more than one instance; with one, the
/// fallback to the live list already names it.
#[inline]
pub(crate) fn enter_if_shared(host: &Host) -> Option<Scope> {
    let shared =
        LIVE_COUNT.load(Ordering::Relaxed) > 1 || CHAIN_PREVIOUS_HOOK.load(Ordering::Relaxed);
    shared.then(|| enter(host))
}

/// Restores the previous log target when dropped.
pub(crate) struct Scope {
    prev: *const Host,
    /// This thread's `CURRENT` slot; the raw pointer also keeps `Scope` on this thread.
    slot: *const Cell<*const Host>,
}

impl Drop for Scope {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `slot` is this thread's `CURRENT`, which lives as long as the thread; the
        // guard cannot leave the thread (`*const` is not `Send`).
        unsafe { (*self.slot).set(self.prev) };
    }
}

/// Runs `f` with this thread's log target, or the newest live instance's.
fn with_host<R>(f: impl FnOnce(&Host) -> R) -> Option<R> {
    let current = CURRENT.with(Cell::get);
    if !current.is_null() {
        // SAFETY: `CURRENT` is non-null only inside an `enter` scope, whose `Host` is borrowed
        // for the scope's whole life (the instance box outlives the entry point call).
        return Some(f(unsafe { &*current }));
    }
    let live = lock_live();
    live.last().map(|(_, host)| f(host))
}

/// Runs one entry point's body, turning a panic into a [`PluginError`] with its text.
#[inline]
pub(crate) fn catch<R>(body: impl FnOnce() -> R) -> Result<R, PluginError> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => Ok(value),
        Err(payload) => {
            let plain = payload_text(&*payload);
            // The hook recorded the text with its location; it is ours only if it describes
            // this payload (a plugin that replaced the hook leaves a stale or no record).
            let text = LAST_PANIC
                .with(|last| last.borrow_mut().take())
                .filter(|recorded| recorded.ends_with(&plain))
                .unwrap_or_else(|| format!("panicked: {plain}"));
            // A payload whose destructor panics must not unwind out of the entry point.
            if let Err(nested) = catch_unwind(AssertUnwindSafe(|| drop(payload))) {
                std::mem::forget(nested);
            }
            Err(PluginError {
                kind: PluginErrorKind::PANIC,
                message: RString::from(text),
            })
        }
    }
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic payload that is not a string".to_owned()
    }
}

fn level_of(level: &tracing::Level) -> Level {
    match *level {
        tracing::Level::ERROR => Level::Error,
        tracing::Level::WARN => Level::Warn,
        tracing::Level::INFO => Level::Info,
        tracing::Level::DEBUG => Level::Debug,
        _ => Level::Trace,
    }
}

/// The subscriber of a plugin library: forwards events to the host, ignores spans.
struct Bridge;

impl Subscriber for Bridge {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        // Ask `enabled` every time: the host's level can change at run time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        with_host(|host| host.log_enabled(level_of(metadata.level()))).unwrap_or(false)
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let pairs: Vec<KeyValue<'_>> = fields
            .pairs
            .iter()
            .map(|(key, value)| KeyValue::new(key, value))
            .collect();
        let metadata = event.metadata();
        with_host(|host| {
            host.log_fields(
                level_of(metadata.level()),
                metadata.target(),
                &fields.message,
                &pairs,
            )
        });
    }

    #[inline]
    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's message and its other fields, formatted.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs.push((field.name(), format!("{value:?}")));
        }
    }
}
