//! Firecracker's hybrid vsock, host side.
//!
//! Host -> guest: connect to `uds_path`, send `CONNECT <port>\n`, read
//! `OK <host_port>\n`; the stream is then the guest's port.
//! Guest -> host: a guest connecting to CID 2 port P reaches a listener on
//! `<uds_path>_P`.
//!
//! Everything the guest sends passes through the VM's [`RateLimiter`]: streams
//! are [`GuestStream`]s whose reads are paced by the byte bucket, and every
//! connection the guest opens to a host port costs an op token (connections
//! over the limit are closed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::guest_io::{GuestIo, GuestIoError};
use crate::security::rate_limit::{RateLimitConfig, RateLimitedStream, RateLimiter};

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest port {port} refused the connection (reply {reply:?})")]
    Refused { port: u32, reply: String },
    #[error("hybrid vsock handshake for port {port}: {source}")]
    Handshake {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    GuestIo(#[from] GuestIoError),
}

/// The longest handshake reply: "OK 4294967295\n".
const MAX_REPLY: usize = 32;

/// A stream to or from the guest; reads are paced by the VM's byte bucket.
pub type GuestStream = RateLimitedStream<UnixStream>;

/// One VM's hybrid-vsock endpoint. Clones share the VM's rate limiter.
#[derive(Debug, Clone)]
pub struct HybridVsock {
    uds_path: PathBuf,
    limiter: Arc<RateLimiter>,
    /// Where the handshake and the READY read run (see [`GuestIo`]).
    io: GuestIo,
}

impl HybridVsock {
    /// What the limiter holds back is counted into `counters`.
    pub fn new(
        uds_path: impl Into<PathBuf>,
        limits: RateLimitConfig,
        counters: &crate::metrics::VmCounters,
    ) -> Self {
        Self {
            uds_path: uds_path.into(),
            limiter: Arc::new(RateLimiter::new(limits, counters)),
            io: GuestIo::inline(),
        }
    }

    /// Reads guest bytes (handshake, READY) on `io`'s runtime.
    pub fn with_guest_io(mut self, io: GuestIo) -> Self {
        self.io = io;
        self
    }

    pub fn guest_io(&self) -> &GuestIo {
        &self.io
    }

    /// The VM's rate limiter (shared by all its streams and listeners).
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Where guest connections to host port `port` arrive.
    pub fn host_port_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    /// Opens a stream to guest port `port`: the connect and the handshake run
    /// on the guest I/O runtime, which the stream stays registered with.
    pub async fn connect(&self, port: u32) -> Result<GuestStream, VsockError> {
        if !self.io.is_separate() {
            return self.connect_here(port).await;
        }
        let this = self.clone();
        self.io.run(async move { this.connect_here(port).await }).await?
    }

    async fn connect_here(&self, port: u32) -> Result<GuestStream, VsockError> {
        let mut s = UnixStream::connect(&self.uds_path)
            .await
            .map_err(|source| VsockError::Connect {
                path: self.uds_path.clone(),
                source,
            })?;
        let hs = |source| VsockError::Handshake { port, source };
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(hs)?;
        // Byte by byte: whatever follows the newline already belongs to the guest.
        let mut reply = Vec::with_capacity(16);
        let mut byte = [0u8; 1];
        loop {
            let n = s.read(&mut byte).await.map_err(hs)?;
            if n == 0 || reply.len() >= MAX_REPLY {
                break;
            }
            if byte[0] == b'\n' {
                break;
            }
            reply.push(byte[0]);
        }
        let reply = String::from_utf8_lossy(&reply).into_owned();
        if reply.starts_with("OK ") {
            Ok(RateLimitedStream::new(s, self.limiter.clone()))
        } else {
            Err(VsockError::Refused { port, reply })
        }
    }

    /// Listens for guest connections to host port `port`.
    pub fn listen(&self, port: u32) -> Result<UnixListener, VsockError> {
        let path = self.host_port_path(port);
        let _ = std::fs::remove_file(&path);
        UnixListener::bind(&path).map_err(|source| VsockError::Listen { path, source })
    }

    /// Accepts the next guest connection on `listener` (made by [`Self::listen`])
    /// that the ops bucket admits; connections over the limit are closed at once.
    pub async fn accept(&self, listener: &UnixListener) -> std::io::Result<GuestStream> {
        loop {
            let (s, _) = listener.accept().await?;
            if self.limiter.admit_connection() {
                return Ok(RateLimitedStream::new(s, self.limiter.clone()));
            }
            tracing::debug!(path = %self.uds_path.display(), "guest connection over the ops rate limit closed");
            drop(s);
        }
    }

    /// Waits for the guest agent's readiness announcement (`READY`) on the
    /// listener of [`neurovisor_proto::GUEST_READY_PORT`]; the accept and the
    /// read run on the guest I/O runtime (the listener moves there).
    pub async fn accept_ready(&self, listener: UnixListener) -> std::io::Result<()> {
        if !self.io.is_separate() {
            return self.accept_ready_here(&listener).await;
        }
        let std_listener = listener.into_std()?;
        let this = self.clone();
        self.io
            .run(async move {
                let listener = UnixListener::from_std(std_listener)?;
                this.accept_ready_here(&listener).await
            })
            .await
            .map_err(std::io::Error::other)?
    }

    async fn accept_ready_here(&self, listener: &UnixListener) -> std::io::Result<()> {
        let mut s = self.accept(listener).await?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await?;
        if buf[..n].starts_with(b"READY") {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "unexpected readiness message {:?}",
                String::from_utf8_lossy(&buf[..n])
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the VMM's side of the protocol, to test the client's parsing.
    async fn fake_mux(listener: UnixListener, reply: &'static str) {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"CONNECT 6000\n");
        s.write_all(reply.as_bytes()).await.expect("write");
    }

    #[tokio::test]
    async fn handshake_ok_keeps_following_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = HybridVsock::new(
            dir.path().join("v.sock"),
            RateLimitConfig::default(),
            &Default::default(),
        );
        let l = UnixListener::bind(hv.uds_path()).expect("bind");
        let server = tokio::spawn(fake_mux(l, "OK 1073741824\nhello"));
        let mut s = hv.connect(6000).await.expect("connect");
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.expect("read");
        assert_eq!(rest, "hello");
        server.await.expect("server");
        assert_eq!(hv.host_port_path(6001), dir.path().join("v.sock_6001"));
    }

    #[tokio::test]
    async fn refused_port_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = HybridVsock::new(
            dir.path().join("v.sock"),
            RateLimitConfig::default(),
            &Default::default(),
        );
        let l = UnixListener::bind(hv.uds_path()).expect("bind");
        let server = tokio::spawn(fake_mux(l, ""));
        let e = hv.connect(6000).await.unwrap_err();
        assert!(matches!(e, VsockError::Refused { port: 6000, .. }), "{e}");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn guest_connections_beyond_the_ops_limit_are_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = RateLimitConfig {
            bandwidth: None,
            // 3 connections, then one per hour: the rest must be refused.
            ops: Some(crate::security::rate_limit::TokenBucketConfig {
                size: 3,
                one_time_burst: 0,
                refill_time: 3_600_000,
            }),
        };
        let hv = HybridVsock::new(dir.path().join("v.sock"), limits, &Default::default());
        let l = hv.listen(6001).expect("listen");
        let path = hv.host_port_path(6001);
        // The guest side: 5 connections, each says hello and reads the reply.
        let guest = tokio::spawn(async move {
            let mut replies = Vec::new();
            for _ in 0..5 {
                let mut s = UnixStream::connect(&path).await.expect("connect");
                // A refused connection may already be closed: write errors are expected.
                let _ = s.write_all(b"hi").await;
                let mut r = Vec::new();
                // A closed connection reads as EOF (or a reset).
                let _ = s.read_to_end(&mut r).await;
                replies.push(r);
            }
            replies
        });
        // The host side: the first 3 are admitted and answered, then the 4th and
        // 5th are closed inside `accept`, which keeps waiting.
        for _ in 0..3 {
            let mut s = hv.accept(&l).await.expect("accept");
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(b"ok").await.expect("write");
        }
        let pending = tokio::time::timeout(Duration::from_millis(500), hv.accept(&l)).await;
        assert!(pending.is_err(), "a fourth connection was admitted");
        let replies = guest.await.expect("guest");
        assert_eq!(
            replies.iter().filter(|r| r.as_slice() == b"ok").count(),
            3,
            "{replies:?}"
        );
        assert_eq!(replies.iter().filter(|r| r.is_empty()).count(), 2, "{replies:?}");
        let s = hv.limiter().stats();
        assert_eq!((s.ops, s.rejected_connections), (3, 2));
    }

    #[tokio::test]
    async fn accept_ready_reads_the_announcement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = HybridVsock::new(
            dir.path().join("v.sock"),
            RateLimitConfig::default(),
            &Default::default(),
        );
        let l = hv.listen(6001).expect("listen");
        let path = hv.host_port_path(6001);
        let guest = tokio::spawn(async move {
            let mut s = UnixStream::connect(&path).await.expect("connect");
            s.write_all(b"READY\n").await.expect("write");
        });
        hv.accept_ready(l).await.expect("ready");
        guest.await.expect("guest");
        assert_eq!(hv.limiter().stats().ops, 1);
    }
}
