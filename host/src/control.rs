//! The gRPC API (`plugind.v1`): the only module that knows protobuf types. An adapter on the
//! [front](crate::front): each call maps its request to a front call and the typed answer
//! (or error, through [`code`]) back; what is about the transport stays here: the endpoints,
//! permissions, tokens and peers, connections, request sizes, `Watch` streams per peer. It
//! serves over a Unix socket (mode set explicitly after bind) or, opt-in, TCP with a bearer
//! token on every call; `plugind publish` and `plugind ctl` use its client side.

pub mod client;
pub mod code;
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
