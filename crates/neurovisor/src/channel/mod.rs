//! The host <-> guest channel.
//!
//! Both backends expose the guest's AF_VSOCK through Firecracker's hybrid-vsock
//! protocol on a host Unix socket (QEMU via the `vhost-device-vsock` daemon), so
//! the code here is shared: [`vsock`] speaks the protocol, [`client`] holds the
//! errors of the gRPC conversation that `exec` runs over it.

pub mod client;
pub mod vsock;

pub use client::GuestError;
pub use vsock::{HybridVsock, VsockError};
