//! The guest channel over a virtio-serial port, host side: the transport of
//! VMs that are snapshotted or restored (QEMU cannot migrate a vhost-user
//! vsock device; a virtio-serial port migrates with the VM).
//!
//! The port's host end is a Unix socket QEMU listens on. A port has no
//! connections of its own: one host connection carries one HTTP/2
//! connection, and the guest agent serves a new one each time the host
//! connects. A snapshot keeps bytes that were in flight, so every
//! connection starts with a handshake: the host sends `NVHELLO <nonce>\n`,
//! the agent drops whatever it reads before it and answers
//! `NVOLLEH <nonce>\n`; the host drops whatever it reads before the answer.
//!
//! Reads are paced by the VM's [`RateLimiter`], as over vsock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::guest_io::GuestIo;
use super::vsock::{GuestStream, VsockError};
use crate::security::rate_limit::{RateLimitConfig, RateLimitedStream, RateLimiter};

/// The name the guest agent looks for (`virtserialport,name=`).
pub const PORT_NAME: &str = "org.neurovisor.agent";
const HELLO: &str = "NVHELLO";
const OLLEH: &str = "NVOLLEH";
/// Stale bytes the host drops before the answer, at most: a snapshot holds
/// at most a few virtqueues' worth; more is a guest that talks instead.
const MAX_STALE: usize = 1 << 20;
/// How long one connection waits for the answer. A hello the agent never
/// saw (its HTTP/2 connection from before a snapshot took it) is not
/// answered: the caller connects again, which ends that connection.
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// The first connection to a VM resumed from a paused sandbox's snapshot
/// usually loses its hello to the agent's connection from before the
/// pause (the port's close and the new host's open reach the guest before
/// that connection reads again): waits start this short and double up to
/// [`ANSWER_WAIT`], so that a loaded guest still gets time to answer.
pub const FIRST_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// The answer wait of connection attempt `n` (from 0) to a VM.
pub fn answer_wait(attempt: u32) -> std::time::Duration {
    FIRST_ANSWER_WAIT
        .saturating_mul(1u32 << attempt.min(8))
        .min(ANSWER_WAIT)
}

/// One VM's virtio-serial endpoint. Clones share the VM's rate limiter.
#[derive(Debug, Clone)]
pub struct SerialPort {
    path: PathBuf,
    limiter: Arc<RateLimiter>,
    io: GuestIo,
}

impl SerialPort {
    pub fn new(
        path: impl Into<PathBuf>,
        limits: RateLimitConfig,
        counters: &crate::metrics::VmCounters,
        io: GuestIo,
    ) -> Self {
        Self {
            path: path.into(),
            limiter: Arc::new(RateLimiter::new(limits, counters)),
            io,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    /// Connects and shakes hands (on the guest I/O runtime): the stream is
    /// the agent's, starting at a fresh HTTP/2 connection.
    pub async fn connect(&self) -> Result<GuestStream, VsockError> {
        self.connect_waiting(ANSWER_WAIT).await
    }

    /// [`SerialPort::connect`], waiting up to `wait` for the answer.
    pub async fn connect_waiting(&self, wait: std::time::Duration) -> Result<GuestStream, VsockError> {
        // Made here: the guest I/O threads may not ask for randomness.
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        if !self.io.is_separate() {
            return self.connect_here(nonce, wait).await;
        }
        let this = self.clone();
        self.io
            .run(async move { this.connect_here(nonce, wait).await })
            .await?
    }

    async fn connect_here(
        &self,
        nonce: String,
        wait: std::time::Duration,
    ) -> Result<GuestStream, VsockError> {
        let mut s = UnixStream::connect(&self.path)
            .await
            .map_err(|source| VsockError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let hs = |source| VsockError::Handshake { port: 0, source };
        s.write_all(format!("{HELLO} {nonce}\n").as_bytes())
            .await
            .map_err(hs)?;
        let want = format!("{OLLEH} {nonce}\n");
        match tokio::time::timeout(wait, Self::await_answer(&mut s, &want)).await {
            Ok(r) => r?,
            Err(_) => return Err(VsockError::Timeout(wait)),
        }
        Ok(RateLimitedStream::new(s, self.limiter.clone()))
    }

    async fn await_answer(s: &mut UnixStream, want: &str) -> Result<(), VsockError> {
        let hs = |source| VsockError::Handshake { port: 0, source };
        let mut seen: Vec<u8> = Vec::with_capacity(want.len());
        let mut stale = 0usize;
        let mut byte = [0u8; 1];
        // Byte by byte: what follows the answer is the agent's HTTP/2.
        while !seen.ends_with(want.as_bytes()) {
            if s.read(&mut byte).await.map_err(hs)? == 0 {
                return Err(VsockError::Refused {
                    port: 0,
                    reply: "the virtio-serial port closed before the agent answered".into(),
                });
            }
            seen.push(byte[0]);
            if seen.len() > want.len() {
                seen.remove(0);
                stale += 1;
                if stale > MAX_STALE {
                    return Err(VsockError::Refused {
                        port: 0,
                        reply: format!("more than {MAX_STALE} bytes before the agent's answer"),
                    });
                }
            }
        }
        if stale > 0 {
            tracing::debug!(stale, "dropped bytes left in the port from before a snapshot");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn stale_bytes_before_the_answer_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = SerialPort::new(
            dir.path().join("agent.sock"),
            RateLimitConfig::default(),
            &Default::default(),
            GuestIo::inline(),
        );
        let l = UnixListener::bind(port.path()).expect("bind");
        let agent = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\n") {
                s.read_exact(&mut b).await.expect("read");
                line.push(b[0]);
            }
            let nonce = String::from_utf8(line).expect("utf8");
            let nonce = nonce.trim().strip_prefix("NVHELLO ").expect("hello").to_string();
            // A stale answer with another nonce and some HTTP/2 bytes come first.
            let reply = format!("\0\0\x08\x06NVOLLEH other\nNVOLLEH {nonce}\nhttp2");
            s.write_all(reply.as_bytes()).await.expect("write");
        });
        let mut s = port.connect().await.expect("connect");
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.expect("rest");
        assert_eq!(rest, "http2");
        agent.await.expect("agent");
    }

    #[tokio::test]
    async fn a_port_that_closes_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = SerialPort::new(
            dir.path().join("agent.sock"),
            RateLimitConfig::default(),
            &Default::default(),
            GuestIo::inline(),
        );
        let l = UnixListener::bind(port.path()).expect("bind");
        let agent = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            drop(s);
        });
        let e = port.connect().await.unwrap_err();
        // Closed before or after the hello was written.
        assert!(
            matches!(e, VsockError::Refused { .. } | VsockError::Handshake { .. }),
            "{e}"
        );
        agent.await.expect("agent");
    }
}
