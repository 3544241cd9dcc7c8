//! The `wq.v1` gRPC API of the wq work-queue broker.
//!
//! The `.proto` files under `proto/wq/v1/` are the public contract; this crate holds the Rust
//! types and tonic stubs generated from them, plus the encoded file descriptor set that the
//! broker serves through gRPC reflection.

/// Package `wq.v1`: messages, enums, and the client and server stubs of its services.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("wq.v1");

    /// The encoded `FileDescriptorSet` of every `wq.v1` file, for tonic-reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/wq_descriptor.bin"));
}
