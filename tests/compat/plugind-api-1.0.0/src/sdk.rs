//! The types a plugin author writes against: [`Plugin`], [`Message`], [`Outcome`], [`Host`].

use std::{fmt, time::Duration, time::SystemTime};

use abi_stable::std_types::{RResult, RSlice, RStr};
use serde::de::DeserializeOwned;

use crate::abi::{
    self, KeyValue, LogLevel, PublishErrorKind as RawPublishErrorKind, RawHost, RawMessage,
};

/// The error type `Plugin::new` returns: anything that can be displayed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A plugin: one instance per `[plugins.<name>]` entry, driven by the host from one thread at a
/// time.
///
/// ```
/// use plugind_api::{Host, Message, Outcome, Plugin};
///
/// #[derive(serde::Deserialize)]
/// struct Config { prefix: String }
///
/// struct Greeter { prefix: String }
///
/// impl Plugin for Greeter {
///     const NAME: &'static str = "greeter";
///     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
///     const TOPICS: &'static [&'static str] = &["greetings.>"];
///     type Config = Config;
///
///     fn new(config: Config, _host: Host) -> Result<Self, plugind_api::BoxError> {
///         Ok(Greeter { prefix: config.prefix })
///     }
///
///     fn handle(&mut self, msg: Message) -> Outcome {
///         match std::str::from_utf8(msg.payload()) {
///             Ok(name) => {
///                 tracing::info!(attempt = msg.attempt(), "{} {name}", self.prefix);
///                 Outcome::Ack
///             }
///             Err(_) => Outcome::reject("payload is not UTF-8"),
///         }
///     }
/// }
/// // In the plugin crate (crate-type = ["cdylib"]): plugind_api::export_plugin!(Greeter);
/// ```
pub trait Plugin: Sized + Send + 'static {
    /// The manifest name; `plugin = "…"` in `plugins.toml` refers to it.
    const NAME: &'static str;
    /// The plugin's version, usually `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;
    /// Topic patterns an instance subscribes to unless its config says otherwise.
    const TOPICS: &'static [&'static str] = &[];
    /// One line for operators (`plugind inspect` shows it).
    const DESCRIPTION: &'static str = "";

    /// The instance's `[plugins.<name>.config]` table, deserialized.
    type Config: DeserializeOwned;

    /// Creates an instance. Runs off the daemon's control loop; an error or a panic here
    /// keeps the instance from starting and is reported with its message.
    ///
    /// # Errors
    /// Any error refuses the instance; its text reaches the operator.
    fn new(config: Self::Config, host: Host) -> Result<Self, BoxError>;

    /// Handles one delivery. A panic counts as a failed attempt carrying the panic text.
    fn handle(&mut self, msg: Message) -> Outcome;

    /// Called once before the instance is dropped; join any thread the plugin started here.
    fn shutdown(self) {}
}

/// What a plugin decided about one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done: the delivery is settled.
    Ack,
    /// A failure: deliver again after `after` (or the instance's backoff), until
    /// `max_attempts` failures dead-letter it.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// A permanent failure: dead-letter now.
    Reject { reason: String },
}

impl Outcome {
    /// A failure to retry with the instance's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    /// A failure to retry after `after` instead of the backoff.
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        Self::Retry {
            after: Some(after),
            reason: reason.into(),
        }
    }

    /// A permanent failure.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject {
            reason: reason.into(),
        }
    }

    /// Writes this outcome across the boundary: the kind, and unless it is Ack, the detail.
    ///
    /// # Safety
    /// `detail` is valid for a write of an `OutcomeDetail` (it may be uninitialised).
    #[inline]
    pub(crate) unsafe fn into_raw(self, detail: *mut abi::OutcomeDetail) -> abi::OutcomeKind {
        let (kind, retry_after, reason) = match self {
            Self::Ack => return abi::OutcomeKind::ACK,
            Self::Retry { after, reason } => (abi::OutcomeKind::RETRY, after, reason),
            Self::Reject { reason } => (abi::OutcomeKind::REJECT, None, reason),
        };
        let written = abi::OutcomeDetail {
            retry_after: retry_after.map(Into::into).into(),
            reason: reason.into(),
        };
        // SAFETY: per this function's contract; `write` does not drop the uninitialised old
        // value.
        unsafe { detail.write(written) };
        kind
    }
}

/// A message id, unique within one daemon's ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One delivery of a message to this instance: a refcounted handle to host-owned data.
///
/// Reading it copies nothing: `payload()` is the host's buffer. Cloning it is a refcount
/// increment; it may be sent to other threads.
pub struct Message {
    raw: RawMessage,
}

impl Message {
    /// Wraps a handle received from the host.
    #[inline]
    pub(crate) fn from_raw(raw: RawMessage) -> Self {
        Self { raw }
    }

    #[inline]
    fn ctx(&self) -> &abi_stable::marker_type::ErasedObject {
        // SAFETY: `ctx` came from the host's `Delivery` vtable constructor and stays valid
        // while this handle holds its strong reference.
        unsafe { &*self.raw.ctx }
    }

    /// The id the host assigned when it accepted the message.
    #[inline]
    pub fn id(&self) -> MessageId {
        // SAFETY: the vtable belongs to `ctx` (built together by `hosting`).
        MessageId(unsafe { (self.raw.vtable.id())(self.ctx()) })
    }

    /// The 1-based attempt number of this delivery to this instance.
    #[inline]
    pub fn attempt(&self) -> u32 {
        // SAFETY: as in `id`.
        unsafe { (self.raw.vtable.attempt())(self.ctx()) }
    }

    /// The topic it was published to.
    #[inline]
    pub fn topic(&self) -> &str {
        // SAFETY: as in `id`; the host hands out valid UTF-8 that lives as long as `ctx`.
        unsafe { (self.raw.vtable.topic())(self.ctx()) }.as_str()
    }

    /// The payload, borrowed from the host's buffer.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        // SAFETY: as in `id`.
        unsafe { (self.raw.vtable.payload())(self.ctx()) }.as_slice()
    }

    /// When the host accepted the message.
    #[inline]
    pub fn publish_time(&self) -> SystemTime {
        // SAFETY: as in `id`.
        let nanos = unsafe { (self.raw.vtable.publish_time_unix_nanos())(self.ctx()) };
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    /// The first header named `name`.
    #[inline]
    pub fn header(&self, name: &str) -> Option<&str> {
        // SAFETY: as in `id`; the returned string borrows `ctx`, not `name`.
        let found = unsafe { (self.raw.vtable.header())(self.ctx(), RStr::from_str(name)) };
        found.into_option().map(|v| v.as_str())
    }

    /// Every header, in publish order.
    #[inline]
    pub fn headers(&self) -> Headers<'_> {
        // SAFETY: as in `id`.
        let len = unsafe { (self.raw.vtable.header_count())(self.ctx()) };
        Headers {
            message: self,
            next: 0,
            len,
        }
    }
}

impl Clone for Message {
    #[inline]
    fn clone(&self) -> Self {
        // SAFETY: `clone_ctx` returns a new strong reference to the same delivery.
        let ctx = unsafe { (self.raw.vtable.clone_ctx())(self.raw.ctx) };
        Self {
            raw: RawMessage {
                ctx,
                vtable: self.raw.vtable,
            },
        }
    }
}

impl Drop for Message {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this handle owns one strong reference and never uses `ctx` again.
        unsafe { (self.raw.vtable.drop_ctx())(self.raw.ctx) }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id())
            .field("attempt", &self.attempt())
            .field("topic", &self.topic())
            .field("payload_len", &self.payload().len())
            .finish_non_exhaustive()
    }
}

/// The headers of a [`Message`], in publish order.
#[derive(Debug, Clone)]
pub struct Headers<'m> {
    message: &'m Message,
    next: usize,
    len: usize,
}

impl<'m> Iterator for Headers<'m> {
    type Item = (&'m str, &'m str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.len {
            return None;
        }
        let message = self.message;
        // SAFETY: `next < header_count`, as the vtable requires.
        let kv = unsafe { (message.raw.vtable.header_at())(message.ctx(), self.next) };
        self.next += 1;
        Some((kv.key.as_str(), kv.value.as_str()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.len - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Headers<'_> {}

/// A log level for [`Host::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub(crate) fn to_raw(self) -> LogLevel {
        match self {
            Self::Error => LogLevel::ERROR,
            Self::Warn => LogLevel::WARN,
            Self::Info => LogLevel::INFO,
            Self::Debug => LogLevel::DEBUG,
            Self::Trace => LogLevel::TRACE,
        }
    }

    /// The level of a raw value; unknown (newer) values read as `Trace`.
    #[inline]
    pub fn from_raw(raw: LogLevel) -> Self {
        match raw {
            LogLevel::ERROR => Self::Error,
            LogLevel::WARN => Self::Warn,
            LogLevel::INFO => Self::Info,
            LogLevel::DEBUG => Self::Debug,
            _ => Self::Trace,
        }
    }
}

/// Why the host refused a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError {
    pub kind: PublishErrorKind,
    pub message: String,
}

/// The class of a refused publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The request is wrong (topic, size, headers); retrying cannot help.
    Invalid,
    /// A limit was reached (backlog, disk); retrying later may help.
    ResourceExhausted,
    /// Too many pipeline hops (`hop_limit`).
    HopLimit,
    /// The daemon is stopping.
    ShuttingDown,
    /// Another reason; the message says which.
    Unavailable,
    /// A kind this SDK version does not know (the host is newer).
    Other(u8),
}

impl PublishErrorKind {
    #[inline]
    pub(crate) fn from_raw(raw: RawPublishErrorKind) -> Self {
        match raw {
            RawPublishErrorKind::INVALID => Self::Invalid,
            RawPublishErrorKind::RESOURCE_EXHAUSTED => Self::ResourceExhausted,
            RawPublishErrorKind::HOP_LIMIT => Self::HopLimit,
            RawPublishErrorKind::SHUTTING_DOWN => Self::ShuttingDown,
            RawPublishErrorKind::UNAVAILABLE => Self::Unavailable,
            RawPublishErrorKind(other) => Self::Other(other),
        }
    }

    pub(crate) fn to_raw(self) -> RawPublishErrorKind {
        match self {
            Self::Invalid => RawPublishErrorKind::INVALID,
            Self::ResourceExhausted => RawPublishErrorKind::RESOURCE_EXHAUSTED,
            Self::HopLimit => RawPublishErrorKind::HOP_LIMIT,
            Self::ShuttingDown => RawPublishErrorKind::SHUTTING_DOWN,
            Self::Unavailable => RawPublishErrorKind::UNAVAILABLE,
            Self::Other(other) => RawPublishErrorKind(other),
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "publish refused ({:?}): {}", self.kind, self.message)
    }
}

impl std::error::Error for PublishError {}

/// The daemon's services for one instance: publishing, logging, identity.
///
/// Cheap to clone (a refcount) and usable from any thread. A plugin's `tracing` events reach
/// the same log without going through this type.
pub struct Host {
    raw: RawHost,
}

impl Host {
    #[inline]
    pub(crate) fn from_raw(raw: RawHost) -> Self {
        Self { raw }
    }

    #[inline]
    fn ctx(&self) -> &abi_stable::marker_type::ErasedObject {
        // SAFETY: `ctx` came from the host's `Services` vtable constructor and stays valid
        // while this handle holds its strong reference.
        unsafe { &*self.raw.ctx }
    }

    /// The instance name from `plugins.toml`.
    #[inline]
    pub fn instance_name(&self) -> &str {
        // SAFETY: the vtable belongs to `ctx`; the string lives as long as `ctx`.
        unsafe { (self.raw.vtable.instance_name())(self.ctx()) }.as_str()
    }

    /// The generation of this instance (grows with every new library version or
    /// re-instantiation).
    #[inline]
    pub fn generation(&self) -> u64 {
        // SAFETY: as in `instance_name`.
        unsafe { (self.raw.vtable.generation())(self.ctx()) }
    }

    /// Publishes `payload` to `topic`. Inside `handle` the message is committed only if the
    /// attempt ends in [`Outcome::Ack`]; elsewhere this returns once the daemon accepted it.
    ///
    /// # Errors
    /// [`PublishError`] when the daemon refuses the message.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> Result<MessageId, PublishError> {
        self.publish_with_headers(topic, payload, &[])
    }

    /// [`Host::publish`] with headers.
    ///
    /// # Errors
    /// [`PublishError`] when the daemon refuses the message.
    pub fn publish_with_headers(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<MessageId, PublishError> {
        let headers: Vec<KeyValue<'_>> = headers.iter().map(|(k, v)| KeyValue::new(k, v)).collect();
        // SAFETY: as in `instance_name`; every borrowed argument outlives the call.
        let result = unsafe {
            (self.raw.vtable.publish())(
                self.ctx(),
                RStr::from_str(topic),
                RSlice::from_slice(payload),
                RSlice::from_slice(&headers),
            )
        };
        match result {
            RResult::ROk(id) => Ok(MessageId(id)),
            RResult::RErr(e) => Err(PublishError {
                kind: PublishErrorKind::from_raw(e.kind),
                message: e.message.into_string(),
            }),
        }
    }

    /// Whether an event at `level` would be recorded.
    pub fn log_enabled(&self, level: Level) -> bool {
        // SAFETY: as in `instance_name`.
        unsafe { (self.raw.vtable.log_enabled())(self.ctx(), level.to_raw()) }
    }

    /// Records a log line directly (the `tracing` macros are usually nicer).
    pub fn log(&self, level: Level, message: &str) {
        self.log_fields(level, "plugin", message, &[]);
    }

    pub(crate) fn log_fields(
        &self,
        level: Level,
        target: &str,
        message: &str,
        fields: &[KeyValue<'_>],
    ) {
        // SAFETY: as in `instance_name`; every borrowed argument outlives the call.
        unsafe {
            (self.raw.vtable.log())(
                self.ctx(),
                level.to_raw(),
                RStr::from_str(target),
                RStr::from_str(message),
                RSlice::from_slice(fields),
            )
        }
    }
}

impl Clone for Host {
    #[inline]
    fn clone(&self) -> Self {
        // SAFETY: `clone_ctx` returns a new strong reference to the same services.
        let ctx = unsafe { (self.raw.vtable.clone_ctx())(self.raw.ctx) };
        Self::from_raw(RawHost {
            ctx,
            vtable: self.raw.vtable,
        })
    }
}

impl Drop for Host {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this handle owns one strong reference and never uses `ctx` again.
        unsafe { (self.raw.vtable.drop_ctx())(self.raw.ctx) }
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("instance", &self.instance_name())
            .field("generation", &self.generation())
            .finish()
    }
}
