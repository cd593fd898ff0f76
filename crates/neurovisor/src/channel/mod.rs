//! The host <-> guest channel.
//!
//! Both backends expose the guest's AF_VSOCK through Firecracker's hybrid-vsock
//! protocol on a host Unix socket (QEMU via the `vhost-device-vsock` daemon), so
//! the code here is shared: [`vsock`] speaks the protocol, [`client`] holds the
//! errors of the gRPC conversation that `exec` runs over it, [`text`] makes
//! guest text (error messages, Health fields, console lines) safe for host logs
//! and errors; [`guest_io`] says on which runtime the code that reads guest
//! bytes runs (the daemon's unprivileged `nv-guest`). VMs that are
//! snapshotted or restored on QEMU talk over a virtio-serial port instead
//! ([`serial`]: one host connection at a time, a handshake that drops bytes
//! left from before the snapshot), with the same rate limiter.

pub mod client;
pub mod guest_io;
pub mod serial;
pub mod session;
pub mod text;
pub mod vsock;

pub use client::GuestError;
pub use guest_io::{GuestIo, GuestIoError, GuestTask};
pub use session::{GuestItems, GuestSession, SessionError};
pub use text::{sanitize_guest_bytes, sanitize_guest_text};
pub use vsock::{HybridVsock, VsockError};
