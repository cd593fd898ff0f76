//! Compiles the .proto files with protox (pure Rust), so building needs no `protoc`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/execution.proto",
        "proto/session.proto",
        "proto/sandbox.proto",
        "proto/inference.proto",
        "proto/agent.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("neurovisor_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
