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
//! A hang-up is final for a registration: tokio keeps the closed state it
//! once saw as readiness for good, so a read or write that would block on
//! a registration that saw one means "the host this connection belonged to
//! left (another may be there now)", never "try again". Each connection and
//! each handshake therefore gets a registration of its own.
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
                if guard.ready().is_read_closed() {
                    // The host hung up and one is connected again: whatever
                    // comes next starts a new connection (with its hello).
                    return Poll::Ready(Ok(()));
                }
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
                if guard.ready().is_write_closed() {
                    return Poll::Ready(Err(host_left()));
                }
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

/// A hang-up seen on a registration whose port is connected again.
fn host_left() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "the host hung up (and may have connected again)",
    )
}

/// Reads what is there; 0 at a hang-up, [`host_left`] if the host came back.
async fn read_some(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        if guard.ready().is_read_closed() {
            return Err(host_left());
        }
        guard.clear_ready();
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        // SAFETY: writes from a valid slice.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        if guard.ready().is_write_closed() {
            return Err(host_left());
        }
        guard.clear_ready();
    }
    Ok(())
}

/// A registration of its own for `fd` (see the module doc).
fn register(fd: &OwnedFd) -> io::Result<Arc<AsyncFd<OwnedFd>>> {
    // SAFETY: the clone is owned by the AsyncFd, open and the same
    // descriptor for its lifetime.
    let clone = fd.try_clone()?;
    Ok(Arc::new(
        unsafe { AsyncFd::register(clone) }.map_err(io::Error::from)?,
    ))
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
            // A registration for the handshake and a new one for the
            // connection: a host that leaves and comes back while the agent
            // waits for its hello poisons the first (seen after restores of
            // a paused sandbox: the host's first hello went to the agent's
            // connection from before the pause, the host connected again,
            // and the next connection spun on EAGAIN without ever writing).
            let shake = match register(&fd) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            if let Err(e) = handshake(&shake).await {
                tracing::warn!("virtio-serial: handshake failed: {e}");
                continue;
            }
            drop(shake);
            let conn_fd = match register(&fd) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
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
    use tokio::io::AsyncReadExt;

    /// A pty stands in for the port: its master reports a hang-up while no
    /// slave is open (the host gone) and would block once one is open again
    /// (a host back, nothing sent yet), as a virtio-serial port does.
    struct FakePort {
        master: OwnedFd,
        slave: Option<OwnedFd>,
        slave_path: std::ffi::CString,
    }

    impl FakePort {
        fn new() -> Self {
            let (mut m, mut s) = (0, 0);
            // SAFETY: out-pointers to two ints; no name, default settings.
            let rc = unsafe {
                libc::openpty(
                    &mut m,
                    &mut s,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
            // SAFETY: both are new fds owned here.
            let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
            let mut name = [0 as libc::c_char; 128];
            // SAFETY: a buffer of the given length.
            let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
            assert_eq!(rc, 0, "ptsname_r");
            // SAFETY: ptsname_r wrote a NUL-terminated name.
            let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
            // SAFETY: fcntl on our own fd.
            unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK) };
            let port = Self {
                master,
                slave: Some(slave),
                slave_path,
            };
            port.raw();
            port
        }

        fn raw(&self) {
            let fd = self.slave.as_ref().expect("slave").as_raw_fd();
            // SAFETY: termios of our own tty.
            unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                assert_eq!(libc::tcgetattr(fd, &mut t), 0);
                libc::cfmakeraw(&mut t);
                assert_eq!(libc::tcsetattr(fd, libc::TCSANOW, &t), 0);
            }
        }

        fn host_leaves(&mut self) {
            self.slave = None;
        }

        fn host_comes_back(&mut self) {
            // SAFETY: a valid C string; the fd is owned at once.
            let fd = unsafe { libc::open(self.slave_path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            assert!(fd >= 0, "reopen the pty: {}", io::Error::last_os_error());
            // SAFETY: a new fd owned here.
            self.slave = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            self.raw();
        }

        fn host_writes(&self, data: &[u8]) {
            let fd = self.slave.as_ref().expect("slave").as_raw_fd();
            // SAFETY: writes from a valid slice.
            let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
            assert_eq!(n, data.len() as isize);
        }

        fn host_reads(&self) -> Vec<u8> {
            let fd = self.slave.as_ref().expect("slave").as_raw_fd();
            let mut buf = [0u8; 256];
            // SAFETY: reads into a valid buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            assert!(n >= 0, "read: {}", io::Error::last_os_error());
            buf[..n as usize].to_vec()
        }

        /// A registration that has seen the host leave, with the host back.
        async fn poisoned(&mut self) -> Arc<AsyncFd<OwnedFd>> {
            let fd = register(&self.master).expect("register");
            self.host_leaves();
            let seen = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let guard = fd.readable().await.expect("readable");
                    if guard.ready().is_read_closed() {
                        return;
                    }
                }
            })
            .await;
            assert!(seen.is_ok(), "the hang-up was never reported");
            self.host_comes_back();
            fd
        }
    }

    /// Runs `body` on a runtime of its own, on a thread of its own: the bug
    /// these tests catch spins inside one poll, where no timer can fire.
    fn within<T: Send + 'static>(
        what: &str,
        body: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _ = tx.send(rt.block_on(body));
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(v) => v,
            Err(_) => panic!("{what} did not finish within 5s (a task spinning on a hang-up)"),
        }
    }

    #[test]
    fn a_connection_whose_host_left_and_came_back_ends_instead_of_spinning() {
        let read = within("a read on a connection whose host left", async {
            let mut port = FakePort::new();
            let fd = port.poisoned().await;
            let (done, ended) = oneshot::channel();
            let mut conn = SerialConn { fd, _done: done };
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).await.map_err(|e| e.to_string());
            drop(conn);
            (n, ended.await.is_err())
        });
        assert_eq!(
            read,
            (Ok(0), true),
            "the connection must end (EOF) and let the next one be served"
        );
    }

    #[test]
    fn a_handshake_the_host_left_is_refused_and_a_new_registration_answers() {
        let (first, second, reply) = within("a handshake whose host left", async {
            let mut port = FakePort::new();
            let poisoned = port.poisoned().await;
            let first = handshake(&poisoned).await.map_err(|e| e.kind());
            let fresh = register(&port.master).expect("register");
            port.host_writes(b"stale bytes NVHELLO abc123\n");
            let second = handshake(&fresh).await.map_err(|e| e.kind());
            (first, second, port.host_reads())
        });
        assert_eq!(first, Err(io::ErrorKind::ConnectionReset), "refused at once");
        assert_eq!(second, Ok(()));
        assert_eq!(reply, b"NVOLLEH abc123\n");
    }

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
