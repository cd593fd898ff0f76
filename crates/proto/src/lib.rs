//! Protocol definitions shared by the NeuroVisor host and the guest agent.
//!
//! The `.proto` files under `proto/` are the source of truth; they are compiled
//! at build time with `protox`, so no `protoc` binary is needed.

/// Host <-> guest execution protocol (served by the guest agent on vsock port 6000).
pub mod guest {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("neurovisor.guest.v1");
}

/// The daemon's public API (`neurovisor serve`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("neurovisor.v1");
}

/// LLM inference proxied to Ollama.
pub mod inference {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("neurovisor_descriptor");

/// The guest agent's vsock port.
pub const GUEST_AGENT_PORT: u32 = 6000;
/// The host port the guest agent connects to once it is ready to serve
/// (reaches the host as `<uds_path>_6001` through hybrid vsock).
pub const GUEST_READY_PORT: u32 = 6001;
