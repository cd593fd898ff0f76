//! Firecracker's hybrid vsock, host side.
//!
//! Host -> guest: connect to `uds_path`, send `CONNECT <port>\n`, read
//! `OK <host_port>\n`; the stream is then the guest's port.
//! Guest -> host: a guest connecting to CID 2 port P reaches a listener on
//! `<uds_path>_P`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

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
}

/// The longest handshake reply: "OK 4294967295\n".
const MAX_REPLY: usize = 32;

#[derive(Debug, Clone)]
pub struct HybridVsock {
    uds_path: PathBuf,
}

impl HybridVsock {
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        Self {
            uds_path: uds_path.into(),
        }
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

    /// Opens a stream to guest port `port`.
    pub async fn connect(&self, port: u32) -> Result<UnixStream, VsockError> {
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
            Ok(s)
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
}

/// Waits for the guest agent's readiness announcement (`READY`) on the
/// listener of [`neurovisor_proto::GUEST_READY_PORT`].
pub async fn accept_ready(listener: &UnixListener) -> std::io::Result<()> {
    let (mut s, _) = listener.accept().await?;
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
        let hv = HybridVsock::new(dir.path().join("v.sock"));
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
        let hv = HybridVsock::new(dir.path().join("v.sock"));
        let l = UnixListener::bind(hv.uds_path()).expect("bind");
        let server = tokio::spawn(fake_mux(l, ""));
        let e = hv.connect(6000).await.unwrap_err();
        assert!(matches!(e, VsockError::Refused { port: 6000, .. }), "{e}");
        server.await.expect("server");
    }
}
