//! Limits on what clients can make the daemon hold: connections at once (a
//! connection over the limit waits in the listen backlog until one closes).
//! Streams per connection, request size and buffered output are limited where
//! they are served (`server/mod.rs`, `server/sandbox.rs`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// Connections open at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Concurrent HTTP/2 streams (calls) per connection, by default.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Output the daemon buffers for slow clients, across all requests, by default.
pub const DEFAULT_OUTPUT_BUDGET: usize = 256 << 20;

/// A connection that holds one of the listener's slots while it is open.
pub struct Limited<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Slots for open connections, shared by every listener of the daemon.
#[derive(Clone)]
pub struct ConnectionSlots(Arc<Semaphore>);

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max.max(1))))
    }

    /// `incoming`, accepting a connection only while a slot is free; the
    /// connection holds its slot until it closes.
    pub fn limit<S, IO, E>(&self, incoming: S) -> impl Stream<Item = Result<Limited<IO>, E>>
    where
        S: Stream<Item = Result<IO, E>> + Unpin,
    {
        futures_util::stream::unfold((incoming, self.0.clone()), |(mut incoming, slots)| async move {
            let slot = slots.clone().acquire_owned().await.ok()?;
            let next = incoming.next().await?;
            Some((next.map(|io| Limited { io, _slot: slot }), (incoming, slots)))
        })
    }
}

/// An axum listener that accepts a connection only while one of the
/// daemon's slots is free (the MCP listener; gRPC uses [`ConnectionSlots::limit`]).
pub struct LimitedListener<L> {
    inner: L,
    slots: Arc<Semaphore>,
}

impl ConnectionSlots {
    pub fn limit_listener<L>(&self, inner: L) -> LimitedListener<L> {
        LimitedListener {
            inner,
            slots: self.0.clone(),
        }
    }
}

impl<L> axum::serve::Listener for LimitedListener<L>
where
    L: axum::serve::Listener,
{
    type Io = Limited<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed; if it were, accept nothing more.
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        let (io, addr) = self.inner.accept().await;
        (Limited { io, _slot: slot }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_over_the_limit_waits_for_one_to_close() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let mut limited = Box::pin(ConnectionSlots::new(2).limit(incoming));
        let _c: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(addr))).await;
        let a = limited.next().await.expect("first").expect("io");
        let _b = limited.next().await.expect("second").expect("io");
        let third = tokio::time::timeout(std::time::Duration::from_millis(200), limited.next()).await;
        assert!(third.is_err(), "a third connection was accepted over the limit");
        drop(a);
        let third = tokio::time::timeout(std::time::Duration::from_secs(2), limited.next()).await;
        assert!(
            matches!(third, Ok(Some(Ok(_)))),
            "the third connection was not accepted after one closed"
        );
    }
}
