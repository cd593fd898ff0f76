//! What a sandbox that lives across calls asks of its guest besides
//! programs: files and processes (the agent's `Files` and `Processes`
//! services, on the VM's existing HTTP/2 connection).
//!
//! Every call runs on the guest I/O runtime ([`GuestIo`]); streams come back
//! through small bounded queues, so a caller that stops reading holds the
//! guest back (HTTP/2 flow control) instead of growing a buffer here. What the
//! guest answers is checked before it goes on: chunk sizes, event kinds, and
//! its error messages are sanitized ([`sanitize_guest_text`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use neurovisor_proto::guest::bridge_client::BridgeClient;
use neurovisor_proto::guest::contexts_client::ContextsClient;
use neurovisor_proto::guest::files_client::FilesClient;
use neurovisor_proto::guest::processes_client::ProcessesClient;
use neurovisor_proto::guest::{BridgeAccepted, BridgeData, BridgeListenRequest};
use neurovisor_proto::v1::{
    CodeEvent, ContextInfo, ContextSelector, CreateContextRequest, EntryInfo, FileChunk, FsEvent,
    ListContextsRequest, ListDirRequest, ListProcessesRequest, MoveRequest, PathRequest, ProcessEvent,
    ProcessInfo, ProcessSelector, ReadFileRequest, ResizePtyRequest, RunCodeRequest, SendInputRequest,
    SignalProcessRequest, StartProcessRequest, WatchDirRequest, WriteFileRequest,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::transport::Channel;

use super::guest_io::{GuestIo, GuestTask};
use super::text::sanitize_guest_text;

/// The largest piece of a file in one message, either way.
pub const FILE_CHUNK: usize = 1 << 20;
/// The largest answer the host decodes from `Files` (a directory listing).
const MAX_LISTING: usize = 16 << 20;
/// The largest event (or file chunk) the host decodes.
const MAX_EVENT: usize = FILE_CHUNK + (64 << 10);
/// The most a bridge message carries either way.
pub const BRIDGE_CHUNK: usize = 64 << 10;
/// Events or chunks decoded ahead of the caller.
const QUEUE: usize = 4;

/// A failed file or process call.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The guest answered with an error (its code kept, its text sanitized).
    #[error("{message}")]
    Guest { code: tonic::Code, message: String },
    #[error("the guest I/O runtime is gone: {0}")]
    Io(#[from] super::guest_io::GuestIoError),
    /// The guest broke the protocol (e.g. an oversized chunk).
    #[error("the guest broke the protocol: {0}")]
    Protocol(String),
}

impl SessionError {
    /// The gRPC code a client should see.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Guest { code, .. } => *code,
            Self::Io(_) => tonic::Code::Unavailable,
            Self::Protocol(_) => tonic::Code::Internal,
        }
    }
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        Self::Guest {
            code: s.code(),
            message: sanitize_guest_text(s.message()),
        }
    }
}

/// Items of a guest stream, decoded on the guest I/O runtime. Dropping it
/// ends the call.
pub struct GuestItems<T> {
    /// The item read to see that the call was accepted.
    first: Option<T>,
    rx: mpsc::Receiver<Result<T, SessionError>>,
    _task: GuestTask<()>,
}

impl<T: Unpin> Stream for GuestItems<T> {
    type Item = Result<T, SessionError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        self.rx.poll_recv(cx)
    }
}

/// The files and processes of one VM (a handle: clones share the connection).
#[derive(Clone)]
pub struct GuestSession {
    channel: Channel,
    io: GuestIo,
}

fn check_bridge_data(d: &BridgeData) -> Result<(), SessionError> {
    if d.data.len() > BRIDGE_CHUNK {
        return Err(SessionError::Protocol(format!(
            "a bridge message of {} bytes (the limit is {BRIDGE_CHUNK})",
            d.data.len()
        )));
    }
    Ok(())
}

fn check_chunk(c: &FileChunk) -> Result<(), SessionError> {
    if c.data.len() > FILE_CHUNK {
        return Err(SessionError::Protocol(format!(
            "a file chunk of {} bytes (the limit is {FILE_CHUNK})",
            c.data.len()
        )));
    }
    Ok(())
}

fn check_code_event(e: &CodeEvent) -> Result<(), SessionError> {
    use neurovisor_proto::v1::code_event::Event;
    let size = match &e.event {
        Some(Event::Stdout(t) | Event::Stderr(t)) => t.len(),
        Some(Event::Result(r)) => {
            r.text.len()
                + r.html.len()
                + r.markdown.len()
                + r.svg.len()
                + r.png.len()
                + r.jpeg.len()
                + r.latex.len()
                + r.json.len()
                + r.javascript.len()
        }
        Some(Event::Error(e)) => e.name.len() + e.value.len() + e.traceback.len(),
        Some(Event::ExecutionCount(_)) => 0,
        None => return Err(SessionError::Protocol("an empty code event".into())),
    };
    if size > MAX_EVENT {
        return Err(SessionError::Protocol(format!("a code event of {size} bytes")));
    }
    Ok(())
}

fn check_fs_event(e: &FsEvent) -> Result<(), SessionError> {
    if e.name.len() > 4096 {
        return Err(SessionError::Protocol(format!(
            "a watch event naming {} bytes",
            e.name.len()
        )));
    }
    Ok(())
}

fn check_event(e: &ProcessEvent) -> Result<(), SessionError> {
    use neurovisor_proto::v1::process_event::Event;
    match &e.event {
        Some(Event::Stdout(b) | Event::Stderr(b) | Event::Pty(b)) if b.len() > FILE_CHUNK => Err(
            SessionError::Protocol(format!("an output chunk of {} bytes", b.len())),
        ),
        Some(Event::End(end)) if end.exit_code.is_none() && end.signal.is_none() => Err(
            SessionError::Protocol("a process end with neither an exit code nor a signal".into()),
        ),
        Some(Event::End(end)) if end.signal.is_some_and(|s| !(1..=64).contains(&s)) => Err(
            SessionError::Protocol(format!("a process end with signal {:?}", end.signal)),
        ),
        Some(_) => Ok(()),
        None => Err(SessionError::Protocol("an empty process event".into())),
    }
}

impl GuestSession {
    pub fn new(channel: Channel, io: GuestIo) -> Self {
        Self { channel, io }
    }

    fn files(&self) -> FilesClient<Channel> {
        FilesClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_LISTING)
            .max_encoding_message_size(MAX_EVENT)
    }

    fn processes(&self) -> ProcessesClient<Channel> {
        ProcessesClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_EVENT)
            .max_encoding_message_size(crate::exec::MAX_REQUEST_BYTES)
    }

    fn contexts(&self) -> ContextsClient<Channel> {
        ContextsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_EVENT + (64 << 10))
            .max_encoding_message_size(crate::exec::MAX_REQUEST_BYTES)
    }

    fn bridge(&self) -> BridgeClient<Channel> {
        BridgeClient::new(self.channel.clone())
            .max_decoding_message_size(BRIDGE_CHUNK + (4 << 10))
            .max_encoding_message_size(BRIDGE_CHUNK + (4 << 10))
    }

    /// Runs a unary call on the guest I/O runtime.
    async fn unary<T, F>(&self, call: F) -> Result<T, SessionError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        Ok(self.io.run(call).await??.into_inner())
    }

    /// Opens a server stream on the guest I/O runtime and forwards its
    /// checked items. The first item (or the call's error) has arrived when
    /// this returns, so a refused call fails here, not in the stream.
    async fn stream<T, F>(
        &self,
        open: F,
        check: fn(&T) -> Result<(), SessionError>,
    ) -> Result<GuestItems<T>, SessionError>
    where
        F: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let task = self.io.spawn(async move {
            let mut stream = match open.await {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            loop {
                let item = match stream.message().await {
                    Ok(Some(item)) => check(&item).map(|()| item),
                    Ok(None) => return,
                    Err(e) => Err(e.into()),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        // A call the guest refused is an error of this call, not of its stream.
        let first = match rx.recv().await {
            Some(Err(e)) => return Err(e),
            Some(Ok(item)) => Some(item),
            None => None,
        };
        Ok(GuestItems {
            first,
            rx,
            _task: task,
        })
    }

    /// The guest listens on `127.0.0.1:port` (the inference bridge) until
    /// the items are dropped; each item is a connection a program made (see
    /// [`GuestSession::bridge_pipe`]).
    pub async fn bridge_listen(&self, port: u16) -> Result<GuestItems<BridgeAccepted>, SessionError> {
        let mut c = self.bridge();
        let r = BridgeListenRequest {
            port: u32::from(port),
        };
        let mut items = self.stream(async move { c.listen(r).await }, |_| Ok(())).await?;
        // The first says it listens.
        match tokio_stream::StreamExt::next(&mut items).await {
            Some(Ok(a)) if a.conn_id == 0 => Ok(items),
            Some(Err(e)) => Err(e),
            _ => Err(SessionError::Protocol("the bridge did not say it listens".into())),
        }
    }

    /// The bytes of connection `conn_id`: `input` to the program (its first
    /// message must name the connection), the items from it. Dropping the
    /// items ends the call (the guest closes the connection).
    pub async fn bridge_pipe(
        &self,
        input: mpsc::Receiver<BridgeData>,
    ) -> Result<GuestItems<BridgeData>, SessionError> {
        let mut c = self.bridge();
        let input = tokio_stream::wrappers::ReceiverStream::new(input);
        self.stream(async move { c.pipe(input).await }, check_bridge_data)
            .await
    }

    /// A connection to `127.0.0.1:port` in the guest: `input` to it (its
    /// first message must carry `dial_port`), the items from it (an empty one
    /// first: connected). Dropping the items closes it.
    pub async fn dial(
        &self,
        input: mpsc::Receiver<BridgeData>,
    ) -> Result<GuestItems<BridgeData>, SessionError> {
        let mut c = self.bridge();
        let input = tokio_stream::wrappers::ReceiverStream::new(input);
        let mut items = self
            .stream(async move { c.dial(input).await }, check_bridge_data)
            .await?;
        match tokio_stream::StreamExt::next(&mut items).await {
            Some(Ok(d)) if d.data.is_empty() => Ok(items),
            Some(Err(e)) => Err(e),
            _ => Err(SessionError::Protocol(
                "the guest did not say it connected".into(),
            )),
        }
    }

    pub async fn read_file(&self, r: ReadFileRequest) -> Result<GuestItems<FileChunk>, SessionError> {
        let mut c = self.files();
        self.stream(async move { c.read(r).await }, check_chunk).await
    }

    /// Writes one file from `chunks` (the first names it).
    pub async fn write_file(
        &self,
        chunks: mpsc::Receiver<WriteFileRequest>,
    ) -> Result<EntryInfo, SessionError> {
        let mut c = self.files();
        let input = tokio_stream::wrappers::ReceiverStream::new(chunks);
        self.unary(async move { c.write(input).await }).await
    }

    pub async fn list_dir(&self, r: ListDirRequest) -> Result<Vec<EntryInfo>, SessionError> {
        let mut c = self.files();
        Ok(self.unary(async move { c.list_dir(r).await }).await?.entries)
    }

    pub async fn stat(&self, r: PathRequest) -> Result<EntryInfo, SessionError> {
        let mut c = self.files();
        self.unary(async move { c.stat(r).await }).await
    }

    pub async fn make_dir(&self, r: PathRequest) -> Result<EntryInfo, SessionError> {
        let mut c = self.files();
        self.unary(async move { c.make_dir(r).await }).await
    }

    pub async fn remove(&self, r: PathRequest) -> Result<(), SessionError> {
        let mut c = self.files();
        self.unary(async move { c.remove(r).await }).await.map(drop)
    }

    pub async fn rename(&self, r: MoveRequest) -> Result<EntryInfo, SessionError> {
        let mut c = self.files();
        self.unary(async move { c.r#move(r).await }).await
    }

    /// Changes in a directory; the stream's first event is `started`.
    pub async fn watch_dir(&self, r: WatchDirRequest) -> Result<GuestItems<FsEvent>, SessionError> {
        let mut c = self.files();
        self.stream(async move { c.watch_dir(r).await }, check_fs_event)
            .await
    }

    /// Starts a process; the stream's first event is `started` with its pid.
    pub async fn start_process(
        &self,
        r: StartProcessRequest,
    ) -> Result<GuestItems<ProcessEvent>, SessionError> {
        let mut c = self.processes();
        self.stream(async move { c.start(r).await }, check_event).await
    }

    /// Follows a running process's output from now on.
    pub async fn attach(&self, r: ProcessSelector) -> Result<GuestItems<ProcessEvent>, SessionError> {
        let mut c = self.processes();
        self.stream(async move { c.attach(r).await }, check_event).await
    }

    pub async fn create_context(&self, r: CreateContextRequest) -> Result<ContextInfo, SessionError> {
        let mut c = self.contexts();
        self.unary(async move { c.create(r).await }).await
    }

    pub async fn list_contexts(&self) -> Result<Vec<ContextInfo>, SessionError> {
        let mut c = self.contexts();
        let r = ListContextsRequest::default();
        Ok(self.unary(async move { c.list(r).await }).await?.contexts)
    }

    pub async fn restart_context(&self, r: ContextSelector) -> Result<ContextInfo, SessionError> {
        let mut c = self.contexts();
        self.unary(async move { c.restart(r).await }).await
    }

    pub async fn remove_context(&self, r: ContextSelector) -> Result<(), SessionError> {
        let mut c = self.contexts();
        self.unary(async move { c.remove(r).await }).await.map(drop)
    }

    /// Runs code in a context: output, results, an error, then the count.
    pub async fn run_code(&self, r: RunCodeRequest) -> Result<GuestItems<CodeEvent>, SessionError> {
        let mut c = self.contexts();
        self.stream(async move { c.run(r).await }, check_code_event).await
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, SessionError> {
        let mut c = self.processes();
        let r = ListProcessesRequest::default();
        Ok(self.unary(async move { c.list(r).await }).await?.processes)
    }

    pub async fn send_input(&self, r: SendInputRequest) -> Result<(), SessionError> {
        let mut c = self.processes();
        self.unary(async move { c.send_input(r).await }).await.map(drop)
    }

    pub async fn resize_pty(&self, r: ResizePtyRequest) -> Result<(), SessionError> {
        let mut c = self.processes();
        self.unary(async move { c.resize_pty(r).await }).await.map(drop)
    }

    pub async fn close_stdin(&self, r: ProcessSelector) -> Result<(), SessionError> {
        let mut c = self.processes();
        self.unary(async move { c.close_stdin(r).await }).await.map(drop)
    }

    pub async fn signal(&self, r: SignalProcessRequest) -> Result<(), SessionError> {
        let mut c = self.processes();
        self.unary(async move { c.signal(r).await }).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neurovisor_proto::v1::{process_event::Event, ProcessEnd};

    #[test]
    fn guest_events_are_checked() {
        let ev = |e| ProcessEvent { event: Some(e) };
        assert!(check_event(&ev(Event::Started(3))).is_ok());
        assert!(check_event(&ev(Event::Stdout(vec![0; FILE_CHUNK + 1].into()))).is_err());
        assert!(check_event(&ev(Event::End(ProcessEnd::default()))).is_err());
        let bad_signal = ProcessEnd {
            signal: Some(1000),
            ..Default::default()
        };
        assert!(check_event(&ev(Event::End(bad_signal))).is_err());
        assert!(check_event(&ProcessEvent { event: None }).is_err());
        let e = SessionError::from(tonic::Status::not_found("no\x1b[2J file"));
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(!e.to_string().contains('\x1b'));
    }
}
