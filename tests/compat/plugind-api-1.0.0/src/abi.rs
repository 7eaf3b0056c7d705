//! The stable ABI: every type that crosses the boundary between the host and a plugin library.
//!
//! Plugin authors never see these types; the SDK (`crate::sdk`) wraps them on the plugin side
//! and `crate::hosting` on the host side.
//!
//! # Evolution rule (binding for every change to this file)
//!
//! A plugin built against `plugind-api` 1.x must load into every host built against 1.y.
//! abi_stable checks the package name, the major version and the layout of every type
//! reachable from [`PluginMod`] when the host loads a library, so:
//!
//! - **Prefix types** ([`PluginMod`], [`MessageVTable`], [`HostVTable`], [`InstanceVTable`]) may
//!   only gain fields *appended after* the field marked `#[sabi(last_prefix_field)]`; that
//!   marker never moves. Accessors of appended fields return `Option`, and the reader of an
//!   appended field must handle its absence (an older peer).
//! - **Enums** that may grow are integer newtypes with associated constants ([`OutcomeKind`],
//!   [`LogLevel`], [`PluginErrorKind`], [`PublishErrorKind`]), abi_stable's documented form of
//!   a non-exhaustive enum; a reader meeting an unknown value reports it instead of guessing.
//!   (abi_stable's `NonExhaustive` wrapper was measured and rejected for the outcome: its
//!   64-byte storage and run-time size check cost 10+ ns per call, five times the target for
//!   the whole boundary; see BENCHMARKS.md.)
//! - **Plain `#[repr(C)]` structs** ([`RawMessage`], [`RawHost`], [`RawInstance`],
//!   [`OutcomeDetail`], [`PluginError`], [`PublishError`], [`KeyValue`]) never change; new data travels through
//!   new vtable entries.
//! - Nothing is removed, renamed or reordered. Minor releases only add; only a major release
//!   (a new ABI identity) may break plugins.
//!
//! # Ownership across the boundary
//!
//! Every handle carries the vtable of the side that owns its data: a [`RawMessage`] and a
//! [`RawHost`] point into the host and are cloned and dropped by host code; a [`RawInstance`]
//! points into the plugin and is driven and destroyed by plugin code. Strings returned by a
//! plugin ([`PluginError`], outcome reasons) are converted into host-owned values by
//! `crate::hosting` before the call returns, so nothing a plugin allocated outlives the call
//! that produced it.

// The generated `*_Prefix` items are abi_stable's naming, not ours.
#![allow(non_camel_case_types)]

use std::fmt;

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    marker_type::ErasedObject,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RDuration, ROption, RResult, RSlice, RStr, RString},
};

/// The root module every plugin library exports (through `export_plugin!`).
///
/// Evolution: append new entry points after `instantiate`; never move `last_prefix_field`.
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// The manifest bytes, identical to the `.plugind_manifest` section (magic + format
    /// version + length + JSON); the host cross-checks the two after loading.
    pub manifest: extern "C" fn() -> RSlice<'static, u8>,
    /// Creates one instance from its `config` table serialized as JSON. The host passes the
    /// instance's services; the instance keeps its own clone for as long as it needs it.
    #[sabi(last_prefix_field)]
    pub instantiate:
        extern "C" fn(config_json: RStr<'_>, host: RawHost) -> RResult<RawInstance, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plugind_plugin";
    const NAME: &'static str = "plugind plugin";
    // The package name and version of *this* crate: the ABI identity of every plugin.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A borrowed key/value pair: a message header or a structured log field.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct KeyValue<'a> {
    pub key: RStr<'a>,
    pub value: RStr<'a>,
}

impl<'a> KeyValue<'a> {
    /// Borrows a pair of strings.
    pub const fn new(key: &'a str, value: &'a str) -> Self {
        Self {
            key: RStr::from_str(key),
            value: RStr::from_str(value),
        }
    }
}

/// One refcounted handle to a host-owned delivery (a message as seen by one attempt).
///
/// Every accessor reads through the host's vtable without copying; clone and drop run host
/// code, so the handle stays valid after the plugin's library is gone.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawMessage {
    /// Host-owned context; only the vtable's functions interpret it.
    pub ctx: *const ErasedObject,
    pub vtable: MessageVTableRef,
}

// SAFETY: the host builds a `RawMessage` only over `Send + Sync` data (`hosting::Delivery`
// requires both) and its vtable functions are thread-safe refcount and read operations.
unsafe impl Send for RawMessage {}
// SAFETY: as above; every accessor takes `&self` and only reads immutable data.
unsafe impl Sync for RawMessage {}

/// The host functions behind a [`RawMessage`].
///
/// Evolution: append after `header`.
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = MessageVTableRef)))]
pub struct MessageVTable {
    /// Returns a new strong reference to the same delivery.
    pub clone_ctx: unsafe extern "C" fn(ctx: *const ErasedObject) -> *const ErasedObject,
    /// Releases one strong reference.
    pub drop_ctx: unsafe extern "C" fn(ctx: *const ErasedObject),
    /// The message id the host assigned at acceptance.
    pub id: unsafe extern "C" fn(ctx: &ErasedObject) -> u64,
    /// The 1-based attempt number of this delivery to this instance.
    pub attempt: unsafe extern "C" fn(ctx: &ErasedObject) -> u32,
    pub topic: unsafe extern "C" fn(ctx: &ErasedObject) -> RStr<'_>,
    pub payload: unsafe extern "C" fn(ctx: &ErasedObject) -> RSlice<'_, u8>,
    /// Acceptance time, nanoseconds since the Unix epoch.
    pub publish_time_unix_nanos: unsafe extern "C" fn(ctx: &ErasedObject) -> u64,
    pub header_count: unsafe extern "C" fn(ctx: &ErasedObject) -> usize,
    /// The header at `index` (`index < header_count`), in publish order.
    pub header_at: unsafe extern "C" fn(ctx: &ErasedObject, index: usize) -> KeyValue<'_>,
    /// The first header named `name`, if any.
    #[sabi(last_prefix_field)]
    pub header: for<'a, 'b> unsafe extern "C" fn(
        ctx: &'a ErasedObject,
        name: RStr<'b>,
    ) -> ROption<RStr<'a>>,
}

/// The host services handed to one plugin instance: logging, publishing, its identity.
///
/// Refcounted like [`RawMessage`]; a plugin may clone it to other threads.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawHost {
    pub ctx: *const ErasedObject,
    pub vtable: HostVTableRef,
}

// SAFETY: `hosting::Services` requires `Send + Sync`; the vtable's functions are thread-safe.
unsafe impl Send for RawHost {}
// SAFETY: as above.
unsafe impl Sync for RawHost {}

/// The host functions behind a [`RawHost`].
///
/// Evolution: append after `publish` (timers, async services and deferred completion come
/// this way).
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = HostVTableRef)))]
pub struct HostVTable {
    pub clone_ctx: unsafe extern "C" fn(ctx: *const ErasedObject) -> *const ErasedObject,
    pub drop_ctx: unsafe extern "C" fn(ctx: *const ErasedObject),
    /// The instance name from `plugins.toml` (the key of `[plugins.<name>]`).
    pub instance_name: unsafe extern "C" fn(ctx: &ErasedObject) -> RStr<'_>,
    /// The generation of this instance: it grows each time the host loads a new library
    /// version or re-instantiates the instance.
    pub generation: unsafe extern "C" fn(ctx: &ErasedObject) -> u64,
    /// Whether an event at `level` would be recorded (lets the plugin skip formatting).
    pub log_enabled: unsafe extern "C" fn(ctx: &ErasedObject, level: LogLevel) -> bool,
    /// Records one log event; the host tags it with the instance name, plugin version and
    /// generation.
    pub log: unsafe extern "C" fn(
        ctx: &ErasedObject,
        level: LogLevel,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RSlice<'_, KeyValue<'_>>,
    ),
    /// Publishes a message. Inside `handle` the message is staged with the attempt and
    /// committed only if the attempt ends in Ack; elsewhere it returns once accepted.
    #[sabi(last_prefix_field)]
    pub publish: unsafe extern "C" fn(
        ctx: &ErasedObject,
        topic: RStr<'_>,
        payload: RSlice<'_, u8>,
        headers: RSlice<'_, KeyValue<'_>>,
    ) -> RResult<u64, PublishError>,
}

/// One plugin instance, owned by the host and driven through plugin code.
#[repr(C)]
#[derive(StableAbi)]
pub struct RawInstance {
    /// Plugin-owned state; only the vtable's functions interpret it.
    pub obj: *mut ErasedObject,
    pub vtable: InstanceVTableRef,
}

// SAFETY: the SDK builds a `RawInstance` only over `Plugin` types, which are `Send`; the host
// calls it from one thread at a time (`&mut`/by-value entry points).
unsafe impl Send for RawInstance {}

/// The plugin functions behind a [`RawInstance`].
///
/// Every entry point catches unwinding inside the plugin and returns the panic as data
/// ([`OutcomeKind::PANICKED`], or a [`PluginError`] of kind [`PluginErrorKind::PANIC`]).
/// Evolution: append after `destroy`.
#[repr(C)]
#[derive(StableAbi, Debug)]
#[sabi(kind(Prefix(prefix_ref = InstanceVTableRef)))]
pub struct InstanceVTable {
    /// Handles one delivery; the message handle is moved into the plugin. Initialises
    /// `*detail` for every outcome other than Ack (see [`OutcomeDetail`]).
    pub handle: unsafe extern "C" fn(
        obj: *mut ErasedObject,
        message: RawMessage,
        detail: *mut OutcomeDetail,
    ) -> OutcomeKind,
    /// Runs the plugin's shutdown and frees the instance (`obj` is dangling afterwards).
    pub shutdown: unsafe extern "C" fn(obj: *mut ErasedObject) -> RResult<(), PluginError>,
    /// Frees the instance without running its shutdown (`obj` is dangling afterwards).
    #[sabi(last_prefix_field)]
    pub destroy: unsafe extern "C" fn(obj: *mut ErasedObject),
}

/// What `handle` decided: a non-exhaustive integer newtype (abi_stable's documented form of
/// an enum that may grow). Minor releases add constants (Defer is planned); a host that meets
/// a value it does not know counts the attempt as failed and says why.
///
/// It travels in a register: the common case, Ack, costs no memory traffic at all. The data
/// of the other outcomes goes into the host's [`OutcomeDetail`].
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutcomeKind(pub u8);

impl OutcomeKind {
    /// Done: the delivery is settled.
    pub const ACK: Self = Self(0);
    /// A failure to retry (`OutcomeDetail::retry_after`, else the backoff) with a reason.
    pub const RETRY: Self = Self(1);
    /// A permanent failure with a reason: dead-letter now.
    pub const REJECT: Self = Self(2);
    /// `handle` panicked; `OutcomeDetail::reason` is the panic text.
    pub const PANICKED: Self = Self(3);
}

/// Space the host lends to `handle` for the data of a non-Ack outcome.
///
/// Contract: the host passes it *uninitialised*; for every kind other than
/// [`OutcomeKind::ACK`] (including kinds added later) the plugin initialises it completely
/// before returning, and the host then owns it; for ACK the plugin leaves it untouched. The
/// Ack path therefore costs no memory traffic at all (an earlier layout that the host
/// initialised and moved cost ~10 ns per call in store-forwarding stalls; see BENCHMARKS.md).
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct OutcomeDetail {
    pub retry_after: ROption<RDuration>,
    pub reason: RString,
}

/// A failure of a plugin entry point: an error the plugin returned or a panic it raised.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct PluginError {
    pub kind: PluginErrorKind,
    pub message: RString,
}

/// Why a plugin entry point failed. Non-exhaustive: unknown values are reported as such.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PluginErrorKind(pub u8);

impl PluginErrorKind {
    /// The plugin returned an error (for example from `new`).
    pub const ERROR: Self = Self(0);
    /// Plugin code panicked; the message is the panic text.
    pub const PANIC: Self = Self(1);
    /// The instance's `config` table did not deserialize into the plugin's `Config`.
    pub const CONFIG: Self = Self(2);
}

/// Why the host refused a `publish`. Non-exhaustive: unknown values are reported as such.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct PublishError {
    pub kind: PublishErrorKind,
    pub message: RString,
}

/// The class of a refused publish, so a plugin can decide whether to retry.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishErrorKind(pub u8);

impl PublishErrorKind {
    /// The request itself is wrong (topic, size, headers); retrying cannot help.
    pub const INVALID: Self = Self(0);
    /// A limit was reached (backlog, disk); retrying later may help.
    pub const RESOURCE_EXHAUSTED: Self = Self(1);
    /// The message went through more pipeline hops than `hop_limit` allows.
    pub const HOP_LIMIT: Self = Self(2);
    /// The daemon is stopping.
    pub const SHUTTING_DOWN: Self = Self(3);
    /// The host could not accept it for another reason; the message says which.
    pub const UNAVAILABLE: Self = Self(4);
}

/// A log level, ordered from most to least severe. Non-exhaustive integer newtype.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogLevel(pub u8);

impl LogLevel {
    pub const ERROR: Self = Self(1);
    pub const WARN: Self = Self(2);
    pub const INFO: Self = Self(3);
    pub const DEBUG: Self = Self(4);
    pub const TRACE: Self = Self(5);
}

impl fmt::Debug for RawMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawMessage")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RawHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawHost")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RawInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawInstance")
            .field("obj", &self.obj)
            .finish_non_exhaustive()
    }
}
