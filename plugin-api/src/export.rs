//! The plugin side of the boundary: the entry points `export_plugin!` puts behind the root
//! module. Every entry point catches unwinding (see `bridge::catch`), so no panic ever crosses
//! into the host.

use std::marker::PhantomData;

use abi_stable::{
    marker_type::ErasedObject,
    prefix_type::{PrefixTypeTrait, WithMetadata},
    staticref,
    std_types::{RResult, RSlice, RStr, RString},
};

use crate::{
    abi::{
        ConfigError, InstanceVTable, InstanceVTableRef, OutcomeDetail, OutcomeKind, PluginError,
        PluginErrorKind, PluginMod, PluginModRef, RawHost, RawInstance, RawMessage,
    },
    bridge,
    sdk::{Host, Message, Plugin},
};

/// Builds the root module of a library exporting `P` (abi_stable calls this once per load).
#[doc(hidden)]
pub fn root_module<P: Plugin>(manifest: extern "C" fn() -> RSlice<'static, u8>) -> PluginModRef {
    PluginMod {
        manifest,
        instantiate: Entry::<P>::instantiate,
        check_config: Entry::<P>::check_config,
    }
    .leak_into_prefix()
}

/// Deserializes an instance's config into `C`, naming the offending key on failure.
///
/// An instance without a `config` table gets an empty one (`{}`): a plugin whose config
/// type takes nothing (`()`, an `Option`) reads it as no config (`null`).
fn parse_config<C: serde::de::DeserializeOwned>(config_json: &str) -> Result<C, ConfigError> {
    let parsed = parse_config_text(config_json);
    if parsed.is_err()
        && config_json.trim() == "{}"
        && let Ok(nothing) = parse_config_text("null")
    {
        return Ok(nothing);
    }
    parsed
}

fn parse_config_text<C: serde::de::DeserializeOwned>(config_json: &str) -> Result<C, ConfigError> {
    let mut json = serde_json::Deserializer::from_str(config_json);
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends the position in the JSON the host generated; the host points
        // into plugins.toml instead.
        let message = inner.to_string();
        let message = match message.rfind(" at line ") {
            Some(at) if inner.line() > 0 => message[..at].to_owned(),
            _ => message,
        };
        ConfigError {
            path: RString::from(if path == "." { String::new() } else { path }),
            message: RString::from(message),
        }
    })
}

/// The error a plugin that needs 1.1 gives a host older than 1.1 (before `new`).
fn needs_newer_host<P: Plugin>() -> PluginError {
    PluginError {
        kind: PluginErrorKind::ERROR,
        message: RString::from(format!(
            "plugin {} {} defers acks, which needs a daemon built with plugind-api 1.1 or \
             later; it was built with plugind-api {}, and this daemon's plugind-api is older \
             than 1.1 (1.0): upgrade the daemon, or use a build of the plugin that does not \
             defer",
            P::NAME,
            P::VERSION,
            crate::API_VERSION
        )),
    }
}

/// What the host owns through a `RawInstance`: the plugin value and its services.
struct InstanceBox<P> {
    plugin: P,
    host: Host,
    /// The fallback-log registration of this instance (`bridge::register`).
    live: u64,
}

/// The entry points for plugin type `P`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Entry<P>(PhantomData<P>);

impl<P: Plugin> Entry<P> {
    staticref! {
        const VTABLE: WithMetadata<InstanceVTable> = WithMetadata::new(InstanceVTable {
            handle: Self::handle,
            shutdown: Self::shutdown,
            destroy: Self::destroy,
        })
    }

    const VTABLE_REF: InstanceVTableRef = InstanceVTableRef(Self::VTABLE.as_prefix());

    /// `PluginMod::instantiate` for `P`.
    pub extern "C" fn instantiate(
        config_json: RStr<'_>,
        host: RawHost,
    ) -> RResult<RawInstance, PluginError> {
        bridge::install();
        let host = Host::from_raw(host);
        if P::DEFERS && host.api_version().is_none() {
            return RResult::RErr(needs_newer_host::<P>());
        }
        let created = {
            let _scope = bridge::enter(&host);
            bridge::catch(|| -> Result<P, PluginError> {
                let config: P::Config =
                    parse_config(config_json.as_str()).map_err(|e| PluginError {
                        kind: PluginErrorKind::CONFIG,
                        message: RString::from(if e.path.is_empty() {
                            format!("invalid config: {}", e.message)
                        } else {
                            format!("invalid config: {}: {}", e.path, e.message)
                        }),
                    })?;
                P::new(config, host.clone()).map_err(|e| PluginError {
                    kind: PluginErrorKind::ERROR,
                    message: RString::from(e.to_string()),
                })
            })
        };
        match created.and_then(|inner| inner) {
            Ok(plugin) => {
                let live = bridge::register(host.clone());
                let boxed = Box::new(InstanceBox { plugin, host, live });
                RResult::ROk(RawInstance {
                    obj: Box::into_raw(boxed).cast::<ErasedObject>(),
                    vtable: Self::VTABLE_REF,
                })
            }
            Err(e) => RResult::RErr(e),
        }
    }

    /// `PluginMod::check_config` for `P`: deserializes the config and nothing else.
    pub extern "C" fn check_config(config_json: RStr<'_>) -> RResult<(), ConfigError> {
        bridge::install();
        match bridge::catch(|| parse_config::<P::Config>(config_json.as_str()).map(drop)) {
            Ok(Ok(())) => RResult::ROk(()),
            Ok(Err(e)) => RResult::RErr(e),
            Err(panic) => RResult::RErr(ConfigError {
                path: RString::new(),
                message: RString::from(format!(
                    "the plugin's config type panicked: {}",
                    panic.message
                )),
            }),
        }
    }

    /// `InstanceVTable::handle` for `P`.
    ///
    /// # Safety
    /// `obj` is a live instance made by `instantiate` for `P`, not used concurrently;
    /// `detail` is valid for writing an `OutcomeDetail`.
    unsafe extern "C" fn handle(
        obj: *mut ErasedObject,
        message: RawMessage,
        detail: *mut OutcomeDetail,
    ) -> OutcomeKind {
        // SAFETY: per this function's contract `obj` is an exclusive `InstanceBox<P>`.
        let this = unsafe { &mut *obj.cast::<InstanceBox<P>>() };
        let _scope = bridge::enter_if_shared(&this.host);
        let message = Message::from_raw(message);
        match bridge::catch(|| this.plugin.handle(message)) {
            // SAFETY: `detail` is writable, per this function's contract.
            Ok(outcome) => unsafe { outcome.into_raw(detail) },
            Err(panic) => {
                // SAFETY: as above; every non-Ack kind initialises the whole detail.
                unsafe {
                    detail.write(OutcomeDetail {
                        retry_after: None.into(),
                        reason: panic.message,
                    })
                };
                OutcomeKind::PANICKED
            }
        }
    }

    /// `InstanceVTable::shutdown` for `P`.
    ///
    /// # Safety
    /// `obj` is a live instance made by `instantiate` for `P`; it is freed here.
    unsafe extern "C" fn shutdown(obj: *mut ErasedObject) -> RResult<(), PluginError> {
        // SAFETY: per this function's contract we own `obj`, a boxed `InstanceBox<P>`.
        let this = unsafe { Box::from_raw(obj.cast::<InstanceBox<P>>()) };
        let InstanceBox { plugin, host, live } = *this;
        let result = {
            let _scope = bridge::enter(&host);
            bridge::catch(|| plugin.shutdown())
        };
        bridge::unregister(live);
        drop(host);
        result.into()
    }

    /// `InstanceVTable::destroy` for `P`: drops the instance without its shutdown.
    ///
    /// # Safety
    /// `obj` is a live instance made by `instantiate` for `P`; it is freed here.
    unsafe extern "C" fn destroy(obj: *mut ErasedObject) {
        // SAFETY: per this function's contract we own `obj`, a boxed `InstanceBox<P>`.
        let this = unsafe { Box::from_raw(obj.cast::<InstanceBox<P>>()) };
        let InstanceBox { plugin, host, live } = *this;
        {
            let _scope = bridge::enter(&host);
            // A panicking destructor is reported by the panic hook and goes no further.
            let _ = bridge::catch(move || drop(plugin));
        }
        bridge::unregister(live);
        drop(host);
    }
}
