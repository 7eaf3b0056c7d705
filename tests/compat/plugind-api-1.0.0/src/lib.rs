//! `plugind-api`: the stable ABI between the plugind daemon and its native plugins, and the
//! SDK that hides it.
//!
//! A plugin is a `cdylib` crate that implements [`Plugin`] and calls [`export_plugin!`]; it
//! writes no `unsafe`, no `extern` and sees no abi_stable type:
//!
//! ```
//! use plugind_api::{Host, Message, Outcome, Plugin};
//!
//! pub struct Echo;
//!
//! impl Plugin for Echo {
//!     const NAME: &'static str = "echo";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const TOPICS: &'static [&'static str] = &["echo.>"];
//!     type Config = ();
//!
//!     fn new(_config: (), _host: Host) -> Result<Self, plugind_api::BoxError> {
//!         Ok(Echo)
//!     }
//!
//!     fn handle(&mut self, msg: Message) -> Outcome {
//!         tracing::info!(topic = msg.topic(), bytes = msg.payload().len(), "echo");
//!         Outcome::Ack
//!     }
//! }
//!
//! plugind_api::export_plugin!(Echo);
//! # fn main() {}
//! ```
//!
//! # Layout
//!
//! - [`abi`]: every type that crosses the boundary, with the evolution rule.
//! - `sdk` (re-exported at the root): [`Plugin`], [`Message`], [`Outcome`], [`Host`].
//! - `export` and `bridge`: the plugin side of the boundary behind [`export_plugin!`] — entry
//!   points that catch panics, the tracing bridge and the panic hook.
//! - [`hosting`]: the host side — building message and service handles, calling instances.
//! - [`manifest`]: the manifest section, encoded at compile time and decoded by the host.
//! - [`testing`]: unit-testing a plugin without a daemon.
//!
//! # Rules for plugin code
//!
//! - Build with `panic = "unwind"` (the default); `export_plugin!` refuses `panic = "abort"`.
//! - Log with `tracing` (events reach the daemon's log tagged with the instance; spans are
//!   not forwarded) or [`Host::log`].
//! - Do not use a runtime with global state of its own (tokio timers, IO) expecting the
//!   daemon's: a plugin library has its own copy of every static.
//! - Join every thread you start in [`Plugin::shutdown`], and leave no thread-local with a
//!   destructor behind, or the daemon cannot unload the old library after a hot swap (it
//!   keeps it mapped and counts it as retained).

pub mod abi;
mod bridge;
#[doc(hidden)]
pub mod export;
pub mod hosting;
pub mod manifest;
mod sdk;
pub mod testing;

pub use sdk::{
    BoxError, Headers, Host, Level, Message, MessageId, Outcome, Plugin, PublishError,
    PublishErrorKind,
};

/// The version of this crate, which every plugin records in its manifest.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Re-exports for the code `export_plugin!` generates. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
    pub use abi_stable::std_types::RSlice;

    pub use crate::abi::PluginModRef;
    pub use crate::export::root_module;
    pub use crate::manifest::{ManifestSource, encode, encoded_len};

    /// The manifest source of plugin type `P`.
    pub const fn manifest_source<P: crate::Plugin>() -> ManifestSource {
        ManifestSource {
            name: P::NAME,
            version: P::VERSION,
            api_version: crate::API_VERSION,
            topics: P::TOPICS,
            description: P::DESCRIPTION,
        }
    }
}

/// Exports a [`Plugin`] type from a `cdylib`: the root module the daemon loads and the
/// manifest section it reads without running plugin code. Use it once per library.
///
/// It refuses to compile with `panic = "abort"`: a panic in plugin code must become a failed
/// attempt, never abort the daemon.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "plugind plugins must be built with `panic = \"unwind\"`: a panic in plugin code \
             has to become a failed attempt, not abort the daemon. Remove `panic = \"abort\"` \
             from the profile that builds this crate."
        );

        const _: () = {
            const SOURCE: $crate::__private::ManifestSource =
                $crate::__private::manifest_source::<$plugin>();
            const LEN: usize = $crate::__private::encoded_len(&SOURCE);

            /// The manifest, read by the daemon from the `.plugind_manifest` section before
            /// anything is loaded. Exported, so LTO and `strip` keep it.
            #[unsafe(no_mangle)]
            #[unsafe(link_section = ".plugind_manifest")]
            #[used]
            pub static PLUGIND_MANIFEST: [u8; LEN] = $crate::__private::encode::<LEN>(&SOURCE);

            extern "C" fn manifest() -> $crate::__private::RSlice<'static, u8> {
                $crate::__private::RSlice::from_slice(&PLUGIND_MANIFEST)
            }

            fn root_module() -> $crate::__private::PluginModRef {
                $crate::__private::root_module::<$plugin>(manifest)
            }

            extern "C" fn erased_root_module() -> $crate::__private::RootModuleResult {
                $crate::__private::__call_root_module_loader(root_module)
            }

            /// The abi_stable library header: what the daemon looks up to load this library.
            /// Its name is abi_stable's `ROOT_MODULE_LOADER_NAME` (checked by plugind-api's
            /// tests).
            #[unsafe(no_mangle)]
            #[allow(non_upper_case_globals)]
            pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader =
                // SAFETY: the constructor returns the root module of this very type, as
                // `from_constructor` requires.
                unsafe {
                    $crate::__private::LibHeader::from_constructor::<
                        $crate::__private::PluginModRef,
                    >(
                        erased_root_module,
                        $crate::__private::CheckTypeLayout::Yes,
                    )
                };
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_header_symbol_is_abi_stables_root_module_loader() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
