//! Protocol definitions shared by the NeuroVisor host and the guest agent.
//!
//! The `.proto` files under `proto/` are the source of truth; they are compiled
//! at build time with `protox`, so no `protoc` binary is needed.

/// The generated code, nested as the packages are (`neurovisor.guest.v1`
/// refers to messages of `neurovisor.v1` by relative path).
mod generated {
    pub mod neurovisor {
        pub mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("neurovisor.v1");
        }
        pub mod guest {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("neurovisor.guest.v1");
            }
        }
    }
}

/// Host <-> guest protocol (served by the guest agent on vsock port 6000).
pub mod guest {
    pub use crate::generated::neurovisor::guest::v1::*;
}

/// The daemon's public API (`neurovisor serve`), and the file and process
/// messages the guest's `Files`/`Processes` services take too.
pub mod v1 {
    pub use crate::generated::neurovisor::v1::*;
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

/// Request size limits shared by the host (which validates) and the guest
/// agent (whose gRPC decoder must accept every request the host lets through).
pub mod limits {
    pub const MAX_CODE_BYTES: usize = 1 << 20;
    pub const MAX_STDIN_BYTES: usize = 8 << 20;
    pub const MAX_ARGS: usize = 256;
    /// All arguments together.
    pub const MAX_ARGS_BYTES: usize = 64 << 10;
    pub const MAX_ENV_VARS: usize = 256;
    /// All names and values together.
    pub const MAX_ENV_BYTES: usize = 64 << 10;
    /// The largest encoded request: every field at its limit, plus framing.
    pub const MAX_REQUEST_BYTES: usize =
        MAX_CODE_BYTES + MAX_STDIN_BYTES + MAX_ARGS_BYTES + MAX_ENV_BYTES + (64 << 10);
}
