//! The host side of the boundary: how a host offers deliveries and services to plugins and
//! calls plugin instances, turning everything a plugin returns into host-owned values.
//!
//! API boundary: the daemon (`plugind`) and `crate::testing` use this module; plugins never do.
//! It holds the host's `unsafe` so that the daemon needs none outside its loader.

use std::{
    fmt,
    marker::PhantomData,
    mem::{ManuallyDrop, MaybeUninit},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
};

use abi_stable::{
    marker_type::ErasedObject,
    prefix_type::WithMetadata,
    staticref,
    std_types::{ROption, RResult, RSlice, RStr, RString},
};

use crate::{
    abi::{
        HostVTable, HostVTableRef, KeyValue, LogLevel, MessageVTable, MessageVTableRef,
        OutcomeDetail, OutcomeKind, PluginError, PluginErrorKind, PluginModRef,
        PublishError as RawPublishError, RawHost, RawInstance, RawMessage,
    },
    sdk::{Level, MessageId, Outcome, PublishError},
};

/// A delivery as the host stores it; [`message_handle`] lends it to plugins without copying.
pub trait Delivery: Send + Sync + 'static {
    fn id(&self) -> u64;
    /// 1-based.
    fn attempt(&self) -> u32;
    fn topic(&self) -> &str;
    fn payload(&self) -> &[u8];
    fn publish_time_unix_nanos(&self) -> u64;
    fn header_count(&self) -> usize;
    /// The header at `index < header_count()`.
    fn header_at(&self, index: usize) -> (&str, &str);
    fn header(&self, name: &str) -> Option<&str> {
        (0..self.header_count())
            .map(|i| self.header_at(i))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }
}

/// A new message handle holding one strong reference to `delivery`.
#[inline]
pub fn message_handle<D: Delivery>(delivery: Arc<D>) -> RawMessage {
    RawMessage {
        ctx: Arc::into_raw(delivery).cast::<ErasedObject>(),
        vtable: DeliveryVTable::<D>::VTABLE_REF,
    }
}

/// The services a host offers one instance; [`host_handle`] lends them to the plugin.
pub trait Services: Send + Sync + 'static {
    fn instance_name(&self) -> &str;
    fn generation(&self) -> u64;
    fn log_enabled(&self, level: Level) -> bool;
    fn log(&self, level: Level, target: &str, message: &str, fields: &[KeyValue<'_>]);
    /// # Errors
    /// [`PublishError`] when the message is refused.
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError>;
}

/// A new services handle holding one strong reference to `services`.
pub fn host_handle<S: Services>(services: Arc<S>) -> RawHost {
    RawHost {
        ctx: Arc::into_raw(services).cast::<ErasedObject>(),
        vtable: ServicesVTable::<S>::VTABLE_REF,
    }
}

struct DeliveryVTable<D>(PhantomData<D>);

// Invariant for every function below: `ctx` is `Arc::into_raw` of an `Arc<D>` (made by
// `message_handle`) with at least one strong reference held by the caller's handle.
impl<D: Delivery> DeliveryVTable<D> {
    staticref! {
        const VTABLE: WithMetadata<MessageVTable> = WithMetadata::new(MessageVTable {
            clone_ctx: Self::clone_ctx,
            drop_ctx: Self::drop_ctx,
            id: Self::id,
            attempt: Self::attempt,
            topic: Self::topic,
            payload: Self::payload,
            publish_time_unix_nanos: Self::publish_time,
            header_count: Self::header_count,
            header_at: Self::header_at,
            header: Self::header,
        })
    }

    const VTABLE_REF: MessageVTableRef = MessageVTableRef(Self::VTABLE.as_prefix());

    #[inline]
    fn get(ctx: &ErasedObject) -> &D {
        // SAFETY: per the invariant above, `ctx` points at a live `D`.
        unsafe { &*(ctx as *const ErasedObject).cast::<D>() }
    }

    unsafe extern "C" fn clone_ctx(ctx: *const ErasedObject) -> *const ErasedObject {
        // SAFETY: per the invariant above; the new reference is owned by the new handle.
        unsafe { Arc::increment_strong_count(ctx.cast::<D>()) };
        ctx
    }

    unsafe extern "C" fn drop_ctx(ctx: *const ErasedObject) {
        // SAFETY: per the invariant above; the caller gives up its reference.
        unsafe { Arc::decrement_strong_count(ctx.cast::<D>()) };
    }

    unsafe extern "C" fn id(ctx: &ErasedObject) -> u64 {
        Self::get(ctx).id()
    }

    unsafe extern "C" fn attempt(ctx: &ErasedObject) -> u32 {
        Self::get(ctx).attempt()
    }

    unsafe extern "C" fn topic(ctx: &ErasedObject) -> RStr<'_> {
        RStr::from_str(Self::get(ctx).topic())
    }

    unsafe extern "C" fn payload(ctx: &ErasedObject) -> RSlice<'_, u8> {
        RSlice::from_slice(Self::get(ctx).payload())
    }

    unsafe extern "C" fn publish_time(ctx: &ErasedObject) -> u64 {
        Self::get(ctx).publish_time_unix_nanos()
    }

    unsafe extern "C" fn header_count(ctx: &ErasedObject) -> usize {
        Self::get(ctx).header_count()
    }

    unsafe extern "C" fn header_at(ctx: &ErasedObject, index: usize) -> KeyValue<'_> {
        let (key, value) = Self::get(ctx).header_at(index);
        KeyValue::new(key, value)
    }

    unsafe extern "C" fn header<'a>(ctx: &'a ErasedObject, name: RStr<'_>) -> ROption<RStr<'a>> {
        Self::get(ctx)
            .header(name.as_str())
            .map(RStr::from_str)
            .into()
    }
}

struct ServicesVTable<S>(PhantomData<S>);

// Invariant for every function below: `ctx` is `Arc::into_raw` of an `Arc<S>` (made by
// `host_handle`) with at least one strong reference held by the caller's handle.
// Host code may panic; a panic must not unwind into the plugin, so `log` and `publish` catch.
impl<S: Services> ServicesVTable<S> {
    staticref! {
        const VTABLE: WithMetadata<HostVTable> = WithMetadata::new(HostVTable {
            clone_ctx: Self::clone_ctx,
            drop_ctx: Self::drop_ctx,
            instance_name: Self::instance_name,
            generation: Self::generation,
            log_enabled: Self::log_enabled,
            log: Self::log,
            publish: Self::publish,
        })
    }

    const VTABLE_REF: HostVTableRef = HostVTableRef(Self::VTABLE.as_prefix());

    #[inline]
    fn get(ctx: &ErasedObject) -> &S {
        // SAFETY: per the invariant above, `ctx` points at a live `S`.
        unsafe { &*(ctx as *const ErasedObject).cast::<S>() }
    }

    unsafe extern "C" fn clone_ctx(ctx: *const ErasedObject) -> *const ErasedObject {
        // SAFETY: per the invariant above; the new reference is owned by the new handle.
        unsafe { Arc::increment_strong_count(ctx.cast::<S>()) };
        ctx
    }

    unsafe extern "C" fn drop_ctx(ctx: *const ErasedObject) {
        // SAFETY: per the invariant above; the caller gives up its reference.
        unsafe { Arc::decrement_strong_count(ctx.cast::<S>()) };
    }

    unsafe extern "C" fn instance_name(ctx: &ErasedObject) -> RStr<'_> {
        RStr::from_str(Self::get(ctx).instance_name())
    }

    unsafe extern "C" fn generation(ctx: &ErasedObject) -> u64 {
        Self::get(ctx).generation()
    }

    unsafe extern "C" fn log_enabled(ctx: &ErasedObject, level: LogLevel) -> bool {
        let services = Self::get(ctx);
        catch_unwind(AssertUnwindSafe(|| {
            services.log_enabled(Level::from_raw(level))
        }))
        .unwrap_or(false)
    }

    unsafe extern "C" fn log(
        ctx: &ErasedObject,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RSlice<'_, KeyValue<'_>>,
    ) {
        let services = Self::get(ctx);
        let _ = catch_unwind(AssertUnwindSafe(|| {
            services.log(
                Level::from_raw(level),
                target.as_str(),
                message.as_str(),
                fields.as_slice(),
            )
        }));
    }

    unsafe extern "C" fn publish(
        ctx: &ErasedObject,
        topic: RStr<'_>,
        payload: RSlice<'_, u8>,
        headers: RSlice<'_, KeyValue<'_>>,
    ) -> RResult<u64, RawPublishError> {
        let services = Self::get(ctx);
        let result = catch_unwind(AssertUnwindSafe(|| {
            services.publish(topic.as_str(), payload.as_slice(), headers.as_slice())
        }));
        match result {
            Ok(Ok(id)) => RResult::ROk(id.0),
            Ok(Err(e)) => RResult::RErr(RawPublishError {
                kind: e.kind.to_raw(),
                message: RString::from(e.message),
            }),
            Err(_) => RResult::RErr(RawPublishError {
                kind: crate::abi::PublishErrorKind::UNAVAILABLE,
                message: RString::from("the daemon failed while accepting the message"),
            }),
        }
    }
}

/// Why a call into a plugin failed, as host-owned values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub kind: CallErrorKind,
    pub message: String,
}

/// The class of a failed plugin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallErrorKind {
    /// The plugin returned an error.
    Error,
    /// Plugin code panicked; the message is the panic text.
    Panic,
    /// The instance's config did not deserialize.
    Config,
    /// The plugin answered with an outcome or error kind this host does not know (it was
    /// built against a newer `plugind-api`).
    Unknown,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            CallErrorKind::Error => write!(f, "{}", self.message),
            CallErrorKind::Panic => write!(f, "plugin {}", self.message),
            CallErrorKind::Config => write!(f, "{}", self.message),
            CallErrorKind::Unknown => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for CallError {}

impl From<PluginError> for CallError {
    /// Copies the plugin's message into host memory (the plugin's string is freed here, by
    /// plugin code, while the library is still loaded).
    fn from(e: PluginError) -> Self {
        let message = e.message.into_string();
        let kind = match e.kind {
            PluginErrorKind::ERROR => CallErrorKind::Error,
            PluginErrorKind::PANIC => CallErrorKind::Panic,
            PluginErrorKind::CONFIG => CallErrorKind::Config,
            PluginErrorKind(other) => {
                return Self {
                    kind: CallErrorKind::Unknown,
                    message: format!("plugin error of unknown kind {other}: {message}"),
                };
            }
        };
        Self { kind, message }
    }
}

/// Reads what `handle` wrote for an outcome other than Ack, copying every string into host
/// memory.
fn outcome_from_raw(kind: OutcomeKind, detail: OutcomeDetail) -> Result<Outcome, CallError> {
    let OutcomeDetail {
        retry_after,
        reason,
    } = detail;
    let reason = reason.into_string();
    match kind {
        OutcomeKind::ACK => Ok(Outcome::Ack),
        OutcomeKind::RETRY => Ok(Outcome::Retry {
            after: retry_after.into_option().map(Into::into),
            reason,
        }),
        OutcomeKind::REJECT => Ok(Outcome::Reject { reason }),
        OutcomeKind::PANICKED => Err(CallError {
            kind: CallErrorKind::Panic,
            message: reason,
        }),
        OutcomeKind(unknown) => Err(CallError {
            kind: CallErrorKind::Unknown,
            message: format!(
                "the plugin returned an outcome this daemon does not know ({unknown}); it was \
                 built against a newer plugind-api"
            ),
        }),
    }
}

/// One plugin instance, driven from the host. Not `Sync`: one caller at a time.
///
/// Dropping it without [`Instance::shutdown`] frees it without running the plugin's shutdown.
#[derive(Debug)]
pub struct Instance {
    // Invariant: live (not shut down or destroyed) for as long as `self` exists; `shutdown`
    // and `drop` consume it exactly once.
    raw: RawInstance,
    /// `raw.vtable.handle()`, read once: the per-call path loads one pointer, not two.
    handle: HandleFn,
}

type HandleFn =
    unsafe extern "C" fn(*mut ErasedObject, RawMessage, *mut OutcomeDetail) -> OutcomeKind;

impl Instance {
    /// Instantiates a plugin through its root module.
    ///
    /// # Safety
    /// The library behind `module` must stay loaded until the instance, and everything it
    /// returned, is gone.
    ///
    /// # Errors
    /// [`CallError`] with the plugin's config error, `new` error or panic text.
    pub unsafe fn create(
        module: PluginModRef,
        config_json: &str,
        host: RawHost,
    ) -> Result<Self, CallError> {
        match (module.instantiate())(RStr::from_str(config_json), host) {
            RResult::ROk(raw) => Ok(Self {
                handle: raw.vtable.handle(),
                raw,
            }),
            RResult::RErr(e) => Err(e.into()),
        }
    }

    /// Hands one delivery to the plugin.
    ///
    /// # Errors
    /// [`CallError`] when the plugin panicked or answered with an unknown outcome.
    #[inline]
    pub fn handle(&mut self, message: RawMessage) -> Result<Outcome, CallError> {
        let mut detail = MaybeUninit::<OutcomeDetail>::uninit();
        // SAFETY: `obj` is live (the struct invariant) and `&mut self` makes this the only
        // call into it; `detail` is valid for the write the plugin may make.
        let kind = unsafe { (self.handle)(self.raw.obj, message, detail.as_mut_ptr()) };
        if kind == OutcomeKind::ACK {
            // Ack leaves the detail untouched: nothing was written, nothing to drop.
            return Ok(Outcome::Ack);
        }
        // SAFETY: for every kind but ACK the plugin initialised the detail (ABI contract of
        // `OutcomeDetail`), and it is read exactly once.
        outcome_from_raw(kind, unsafe { detail.assume_init() })
    }

    /// Runs the plugin's shutdown and frees the instance.
    ///
    /// # Errors
    /// [`CallError`] when the plugin's shutdown panicked.
    pub fn shutdown(self) -> Result<(), CallError> {
        let this = ManuallyDrop::new(self);
        // SAFETY: `obj` is live and is consumed here; `this` is never dropped, so `destroy`
        // does not run on it afterwards.
        match unsafe { (this.raw.vtable.shutdown())(this.raw.obj) } {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(e) => Err(e.into()),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `obj` is live (`shutdown` forgets `self`) and is consumed here.
        unsafe { (self.raw.vtable.destroy())(self.raw.obj) }
    }
}
