//! The guest channel over a virtio-serial port, for VMs that must migrate.
//!
//! QEMU cannot migrate (snapshot) a VM with a vhost-user vsock device, so a
//! VM meant to be snapshotted gets a virtio-serial port named
//! [`PORT_NAME`] instead, whose host end is a Unix socket. A port is one
//! byte stream with no connections of its own; the host's socket connection
//! stands in for one: while the host is connected, the agent serves one
//! HTTP/2 connection over the port; when the host goes away its reads end
//! (EOF) and that connection ends; when a host connects again (the same VM
//! after a restore, in a new QEMU process), the kernel raises SIGIO and the
//! agent serves a new one. Nothing polls while the VM sits idle.
//!
//! Used by QEMU snapshot templates and the VMs restored from them (the
//! host's `channel/serial.rs`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// The name the host gives the agent's port (`virtserialport,name=...`).
pub const PORT_NAME: &str = "org.neurovisor.agent";

/// The device of the port named [`PORT_NAME`], if the VM has one.
pub fn find_port(sys_ports: &Path) -> Option<PathBuf> {
    std::fs::read_dir(sys_ports).ok()?.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// One host connection over the port. Reads end when the host disconnects;
/// dropping it lets the next connection be served.
pub struct SerialConn {
    fd: Arc<AsyncFd<OwnedFd>>,
    _done: oneshot::Sender<()>,
}

impl tonic::transport::server::Connected for SerialConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SerialConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // SAFETY: reads into the initialized, unfilled part of `buf`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
            if n >= 0 {
                // 0: the host disconnected (end of this connection).
                buf.advance(n as usize);
                return Poll::Ready(Ok(()));
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Poll::Ready(Err(e));
        }
    }
}

impl AsyncWrite for SerialConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            // SAFETY: writes from a valid slice.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return Poll::Ready(Ok(n as usize));
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Poll::Ready(Err(e));
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn host_connected(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n >= 0 && p.revents & libc::POLLHUP == 0
}

/// What a host sends first on every connection: `NVHELLO <nonce>\n`; the
/// agent answers `NVOLLEH <nonce>\n`. Bytes before either are left over from
/// an earlier connection (a snapshot keeps what was in flight, in both
/// directions) and are dropped, so each HTTP/2 connection starts clean.
pub const HELLO: &[u8] = b"NVHELLO ";
pub const OLLEH: &[u8] = b"NVOLLEH ";
const MAX_NONCE: usize = 64;

async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // SAFETY: reads into a valid buffer.
        match guard.try_io(|f| {
            let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        // SAFETY: writes from a valid slice.
        if let Ok(r) = guard.try_io(|f| {
            let n = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            data = &data[r?..];
        }
    }
    Ok(())
}

/// Waits for the host's hello (dropping what comes before it) and answers.
/// Reads one byte at a time so nothing after the hello's newline is taken.
async fn handshake(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    let mut line: Vec<u8> = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if read_some(fd, &mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host left before its hello",
            ));
        }
        line.push(b[0]);
        if let Some(at) = line.windows(HELLO.len()).position(|w| w == HELLO) {
            line.drain(..at);
        } else if line.len() > HELLO.len() {
            line.drain(..line.len() - HELLO.len());
        }
        if line.starts_with(HELLO) && b[0] == b'\n' {
            let nonce = &line[HELLO.len()..line.len() - 1];
            let mut reply = OLLEH.to_vec();
            reply.extend_from_slice(nonce);
            reply.push(b'\n');
            return write_all(fd, &reply).await;
        }
        if line.len() > HELLO.len() + MAX_NONCE + 1 {
            line.clear();
        }
    }
}

/// The connections of hosts to the port, one at a time, for
/// `serve_with_incoming`.
pub fn incoming(port: &Path) -> io::Result<ReceiverStream<io::Result<SerialConn>>> {
    // SIGIO's default action ends the process: handle it before asking for it.
    let mut sigio = signal(SignalKind::io())?;
    let path = std::ffi::CString::new(port.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("port path has a NUL byte"))?;
    // SAFETY: a valid C string; the fd is owned at once.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fcntl on our own fd.
    unsafe {
        if libc::fcntl(raw, libc::F_SETOWN, libc::getpid()) < 0
            || libc::fcntl(
                raw,
                libc::F_SETFL,
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_ASYNC,
            ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tracing::info!("virtio-serial: waiting for the host");
            while !host_connected(&fd) {
                // SIGIO on connect; the timeout only guards a lost signal.
                let _ = tokio::time::timeout(Duration::from_secs(1), sigio.recv()).await;
            }
            tracing::info!("virtio-serial: host connected");
            // A registration of its own for each connection: tokio keeps a
            // hang-up it once saw (the previous host leaving) as readiness
            // for good, so a reused one would spin on EAGAIN after the next
            // host connects (seen after restores: the agent stopped
            // answering after its first reply).
            // SAFETY: the clone is owned by the AsyncFd, open and the same
            // descriptor for its lifetime.
            let conn_fd = match fd
                .try_clone()
                .and_then(|f| unsafe { AsyncFd::register(f) }.map_err(io::Error::from))
            {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if let Err(e) = handshake(&conn_fd).await {
                tracing::warn!("virtio-serial: handshake failed: {e}");
                continue;
            }
            let (done, ended) = oneshot::channel();
            let conn = SerialConn {
                fd: conn_fd,
                _done: done,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            let _ = ended.await;
            tracing::info!("virtio-serial: connection ended");
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_its_name() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (dev, name) in [("vport0p1", "other"), ("vport0p2", PORT_NAME)] {
            std::fs::create_dir_all(sys.path().join(dev)).expect("mkdir");
            std::fs::write(sys.path().join(dev).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(find_port(sys.path()), Some(PathBuf::from("/dev/vport0p2")));
        assert_eq!(find_port(&sys.path().join("missing")), None);
    }
}
