//! Generates the gRPC code from `proto/plugind/v1/plugind.proto` with protox (a pure-Rust
//! protobuf compiler): no system `protoc` is needed. Every `bytes` field becomes
//! `bytes::Bytes`, so decoded payloads are slices of the receive buffer. The encoded
//! descriptor set is kept for server reflection. The codec is `control::codec`'s (prost's,
//! with undecodable messages answered INVALID_ARGUMENT).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["plugind/v1/plugind.proto"], ["proto"])?;
    // For server reflection: generic gRPC tools list and call the API.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("plugind_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_server(true)
        .build_client(true)
        // Undecodable requests are INVALID_ARGUMENT, not prost's INTERNAL.
        .codec_path("crate::control::codec::ProtoCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
