//! Compiles `wq/v1/*.proto` with protox (pure Rust), so a build needs no system `protoc`, and
//! writes the encoded descriptor set that the server registers for reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let files = [
        root.join("wq/v1/work_queue.proto"),
        root.join("wq/v1/queue_admin.proto"),
    ];
    // protox keeps source info, so the proto comments reach reflection (grpcurl describe).
    let fds = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // compile_fds does not write a descriptor file itself.
    fs::write(out_dir.join("wq_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Payloads travel as reference-counted buffers: no copy between decode and Redis.
        .bytes(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.join("wq").display());
    Ok(())
}
