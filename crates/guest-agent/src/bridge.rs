//! The guest side of the inference bridge: a loopback listener whose
//! connections the host picks up and carries over the agent's connection;
//! and the other way, `Dial`: the host's connection to a guest loopback port
//! (a desktop's VNC server), with no network device either.
//!
//! The host calls `Listen` when a program may use the bridge; each
//! connection a program makes to `127.0.0.1:port` waits in a small table
//! until the host opens a `Pipe` for it. Nothing here speaks HTTP: the host
//! parses, limits and forwards (the guest is not trusted to).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use neurovisor_proto::guest::bridge_server::Bridge;
use neurovisor_proto::guest::{BridgeAccepted, BridgeData, BridgeListenRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Connections accepted and not yet piped, at most; older ones are closed.
const MAX_WAITING: usize = 64;
/// One read from a program's connection.
const CHUNK: usize = 64 << 10;
/// Messages from the host: one `BridgeData` carries at most this.
pub const MAX_MESSAGE: usize = CHUNK + (4 << 10);

#[derive(Default)]
pub struct BridgeService {
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, TcpStream>>>,
}

type Items<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Bridge for BridgeService {
    type ListenStream = Items<BridgeAccepted>;
    type PipeStream = Items<BridgeData>;

    async fn listen(
        &self,
        request: Request<BridgeListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        let port = u16::try_from(request.into_inner().port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument("port: give 1-65535"))?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| Status::failed_precondition(format!("listen on 127.0.0.1:{port}: {e}")))?;
        let (tx, rx) = mpsc::channel(8);
        // Connection 0: listening now (the host starts the program after it).
        let _ = tx.send(Ok(BridgeAccepted { conn_id: 0 })).await;
        let waiting = self.waiting.clone();
        let first = self.next.fetch_add(1 << 32, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut n = first;
            let mut mine = Vec::new();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                n += 1;
                if let Ok(mut w) = waiting.lock() {
                    if w.len() >= MAX_WAITING {
                        // The host is not picking them up: the oldest go.
                        if let Some(old) = w.keys().min().copied() {
                            w.remove(&old);
                        }
                    }
                    w.insert(n, stream);
                }
                mine.push(n);
                if tx.send(Ok(BridgeAccepted { conn_id: n })).await.is_err() {
                    break;
                }
            }
            // The caller left: what it did not pick up is closed.
            if let Ok(mut w) = waiting.lock() {
                for id in mine {
                    w.remove(&id);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn pipe(
        &self,
        request: Request<Streaming<BridgeData>>,
    ) -> Result<Response<Self::PipeStream>, Status> {
        let mut input = request.into_inner();
        let first = input.next().await.ok_or_else(|| {
            Status::invalid_argument("empty pipe: the first message names the connection")
        })??;
        let id = first.conn_id;
        let stream = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&id))
            .ok_or_else(|| Status::not_found(format!("no waiting connection {id}")))?;
        Ok(Response::new(splice(id, stream, first.data, input)))
    }

    type DialStream = Items<BridgeData>;

    async fn dial(
        &self,
        request: Request<Streaming<BridgeData>>,
    ) -> Result<Response<Self::DialStream>, Status> {
        let mut input = request.into_inner();
        let first = input
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty dial: the first message names the port"))??;
        let port = u16::try_from(first.dial_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument("dial_port: give 1-65535"))?;
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| Status::failed_precondition(format!("connect to 127.0.0.1:{port}: {e}")))?;
        Ok(Response::new(splice(0, stream, first.data, input)))
    }
}

/// One connection's bytes both ways: `first` and what follows on `input`
/// go to `stream`, what it sends comes back as the answer stream (an empty
/// message first).
fn splice(id: u64, stream: TcpStream, first: Bytes, mut input: Streaming<BridgeData>) -> Items<BridgeData> {
    // Answers go out as they come (no Nagle wait on small writes).
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    // Host to program: written as it comes; the host's end closes the
    // write side, a broken stream the whole connection.
    tokio::spawn(async move {
        let mut next = Some(first);
        loop {
            if let Some(data) = next.take() {
                if !data.is_empty() && wr.write_all(&data).await.is_err() {
                    return;
                }
            }
            match input.next().await {
                Some(Ok(m)) => next = Some(m.data),
                Some(Err(_)) => return,
                None => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    // Program to host, until it closes its side; an empty message
    // first says the connection was taken.
    let (tx, rx) = mpsc::channel(4);
    let _ = tx.try_send(Ok(BridgeData {
        conn_id: id,
        ..Default::default()
    }));
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            quick_ack(rd.as_ref());
            let n = tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = tx.closed() => return,
            };
            let msg = BridgeData {
                conn_id: id,
                data: Bytes::copy_from_slice(&buf[..n]),
                ..Default::default()
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Acknowledges what arrives at once. A client that writes a request in
/// two pieces (headers, then body: Python's `http.client`) waits for the
/// first one's ACK before sending the second (Nagle); once a kept-alive
/// connection looks interactive the kernel may delay that ACK by 40 ms. The
/// option is one-shot, so it is set before every read.
fn quick_ack(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option of its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program's connection is announced, piped both ways, and its close
    /// ends the pipe; when the caller leaves, the port is free again.
    #[tokio::test]
    async fn a_connection_is_announced_and_piped_both_ways() {
        let svc = BridgeService::default();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut accepted = svc
            .listen(Request::new(BridgeListenRequest {
                port: u32::from(port),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(accepted.next().await.unwrap().unwrap().conn_id, 0, "listening");
        let mut program = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let id = accepted.next().await.unwrap().unwrap().conn_id;
        assert_ne!(id, 0);
        assert!(svc.waiting.lock().unwrap().contains_key(&id));
        program.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        program.shutdown().await.unwrap();
        // A Streaming<BridgeData> needs a transport; the pipe is driven
        // through its two halves directly instead.
        let stream = svc.waiting.lock().unwrap().remove(&id).unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
        wr.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        drop(wr);
        drop(rd);
        let mut answer = Vec::new();
        program.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n\r\n");
        drop(accepted);
        // The listener goes once the task sees the caller leave.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < until, "the port stays taken");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
