//! The gRPC API (`plugind.v1`): the only module that knows protobuf types. It serves the
//! `Publisher` service over a Unix socket (mode set explicitly after bind) or, opt-in, TCP
//! with a bearer token on every call; `plugind publish` uses its client side.

pub mod client;
pub mod codec;
pub mod operator;
pub mod publisher;
pub mod server;

/// The generated protobuf and gRPC types.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("plugind.v1");
}
