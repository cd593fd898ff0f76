//! The files and processes of a sandbox (`neurovisor.v1.Sandboxes` `ReadFile`
//! ... `SignalProcess`): the daemon checks each request once, takes the
//! sandbox id off it and hands it to the sandbox's guest
//! ([`GuestSession`](crate::channel::GuestSession)); any number run at once,
//! also while an `Exec` runs. Streams end with ABORTED when the sandbox is
//! killed.

use std::pin::Pin;
use std::sync::Arc;

use neurovisor_proto::v1::{
    CodeEvent, ContextAck, ContextInfo, ContextSelector, CreateContextRequest, EntryInfo, FileChunk, FsEvent,
    ListContextsRequest, ListContextsResponse, ListDirRequest, ListDirResponse, ListProcessesRequest,
    ListProcessesResponse, MoveRequest, PathRequest, ProcessAck, ProcessEvent, ProcessSelector, PtySize,
    ReadFileRequest, ResizePtyRequest, RunCodeRequest, SendInputRequest, SignalProcessRequest,
    StartProcessRequest, WatchDirRequest, WriteFileRequest,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::sessions::{SandboxTable, Session};
use crate::channel::session::FILE_CHUNK;
use crate::channel::{GuestItems, GuestSession, SessionError};

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<FileChunk, Status>> + Send>>;
pub type CodeStream = Pin<Box<dyn Stream<Item = Result<CodeEvent, Status>> + Send>>;
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<FsEvent, Status>> + Send>>;
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ProcessEvent, Status>> + Send>>;

const MAX_PATH: usize = 4096;

fn status(e: SessionError) -> Status {
    Status::new(e.code(), e.to_string())
}

/// The checks every path and user get before a guest sees them.
fn check_path(field: &str, path: &str) -> Result<(), Status> {
    if path.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}: empty; give an absolute path or one relative to the user's home"
        )));
    }
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field}: must be at most {MAX_PATH} bytes without NUL"
        )));
    }
    Ok(())
}

fn check_user(user: &str) -> Result<(), Status> {
    match user {
        "" | "user" | "root" => Ok(()),
        other => Err(Status::invalid_argument(format!(
            "user: '{}' is not a sandbox user; use \"user\" (the default) or \"root\"",
            other.chars().take(40).collect::<String>()
        ))),
    }
}

/// The longest a run in a code context may be given.
const MAX_RUN_MS: u32 = 3_600_000;

fn check_language(language: &str) -> Result<(), Status> {
    match language {
        "" | "python" | "javascript" => Ok(()),
        other => Err(Status::invalid_argument(format!(
            "language: '{}' has no code contexts; use \"python\" (default) or \"javascript\"",
            other.chars().take(40).collect::<String>()
        ))),
    }
}

fn check_context_id(id: &str) -> Result<(), Status> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Status::invalid_argument(
            "context_id: give the id a context was created with (letters, digits, - and _)",
        ));
    }
    Ok(())
}

fn check_pty(size: Option<&PtySize>) -> Result<(), Status> {
    match size {
        Some(s) if (1..=1000).contains(&s.cols) && (1..=1000).contains(&s.rows) => Ok(()),
        _ => Err(Status::invalid_argument("pty: give cols and rows, each 1-1000")),
    }
}

fn check_selector(pid: u32, tag: &str) -> Result<(), Status> {
    if pid == 0 && tag.is_empty() {
        return Err(Status::invalid_argument("name the process: pid or tag"));
    }
    Ok(())
}

/// A guest stream as the client's, ending with ABORTED if the sandbox is
/// killed first.
fn relay<T: Unpin + Send + 'static>(
    items: GuestItems<T>,
    session: &Session,
) -> Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>> {
    let killed = session.killed.clone();
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut items = items;
        loop {
            let next = tokio::select! {
                n = items.next() => n,
                _ = killed.cancelled() => Some(Err(SessionError::Guest {
                    code: tonic::Code::Aborted,
                    message: "the sandbox was killed".into(),
                })),
                _ = tx.closed() => return,
            };
            let Some(item) = next else { return };
            let stop = item.is_err();
            if tx.send(item.map_err(status)).await.is_err() || stop {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

impl SandboxTable {
    /// The sandbox and its VM's services (FAILED_PRECONDITION while paused).
    /// Sandbox `id` and its VM's services (resumed first if it was paused
    /// with `auto_resume`).
    async fn live(&self, id: &str) -> Result<(Arc<Session>, GuestSession), Status> {
        let s = self.awake(id).await?;
        let g = s.guest()?;
        Ok((s, g))
    }

    pub(crate) async fn read_file(&self, r: ReadFileRequest) -> Result<ChunkStream, Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (s, g) = self.live(&r.sandbox_id).await?;
        let items = g.read_file(r).await.map_err(status)?;
        Ok(relay(items, &s))
    }

    /// The first message names the sandbox, the file and the user; the
    /// rest carry data.
    pub(crate) async fn write_file<S>(&self, mut input: S) -> Result<EntryInfo, Status>
    where
        S: Stream<Item = Result<WriteFileRequest, Status>> + Unpin + Send,
    {
        let first = input.next().await.transpose()?.ok_or_else(|| {
            Status::invalid_argument("empty stream: the first message names the sandbox and the file")
        })?;
        check_path("path", &first.path)?;
        check_user(&first.user)?;
        let (s, g) = self.live(&first.sandbox_id).await?;
        let (tx, rx) = mpsc::channel(4);
        let check = |m: &WriteFileRequest| {
            if m.data.len() > FILE_CHUNK {
                return Err(Status::invalid_argument(format!(
                    "data: a chunk of {} bytes; send at most {FILE_CHUNK} bytes per message",
                    m.data.len()
                )));
            }
            Ok(())
        };
        check(&first)?;
        // Only the daemon says an upload is complete.
        let first = WriteFileRequest {
            complete: false,
            ..first
        };
        let feed = async move {
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            while let Some(m) = input.next().await.transpose()? {
                check(&m)?;
                // Only the first message names the file.
                let m = WriteFileRequest {
                    data: m.data,
                    ..Default::default()
                };
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
            // The client's stream ended cleanly: the guest may put the file
            // in place.
            let _ = tx
                .send(WriteFileRequest {
                    complete: true,
                    ..Default::default()
                })
                .await;
            Ok::<(), Status>(())
        };
        let write = g.write_file(rx);
        // A client's stream that breaks ends the guest's call by dropping
        // it (a reset, not an end of stream): the guest then drops the part
        // it wrote instead of putting it in the file's place.
        let both = async {
            tokio::pin!(feed, write);
            let mut fed = false;
            loop {
                tokio::select! {
                    f = &mut feed, if !fed => {
                        f?;
                        fed = true;
                    }
                    w = &mut write => return w.map_err(status),
                }
            }
        };
        tokio::select! {
            r = both => r,
            _ = s.killed.cancelled() => Err(Status::aborted("the sandbox was killed")),
        }
    }

    pub(crate) async fn list_dir(&self, r: ListDirRequest) -> Result<ListDirResponse, Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        let entries = g.list_dir(r).await.map_err(status)?;
        Ok(ListDirResponse { entries })
    }

    pub(crate) async fn stat(&self, r: PathRequest) -> Result<EntryInfo, Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.stat(r).await.map_err(status)
    }

    pub(crate) async fn make_dir(&self, r: PathRequest) -> Result<EntryInfo, Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.make_dir(r).await.map_err(status)
    }

    pub(crate) async fn remove(&self, r: PathRequest) -> Result<(), Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.remove(r).await.map_err(status)
    }

    pub(crate) async fn rename(&self, r: MoveRequest) -> Result<EntryInfo, Status> {
        check_path("source", &r.source)?;
        check_path("destination", &r.destination)?;
        check_user(&r.user)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.rename(r).await.map_err(status)
    }

    pub(crate) async fn watch_dir(&self, r: WatchDirRequest) -> Result<WatchStream, Status> {
        check_path("path", &r.path)?;
        check_user(&r.user)?;
        let (s, g) = self.live(&r.sandbox_id).await?;
        let items = g.watch_dir(r).await.map_err(status)?;
        Ok(relay(items, &s))
    }

    pub(crate) async fn start_process(&self, mut r: StartProcessRequest) -> Result<EventStream, Status> {
        if r.cmd.trim().is_empty() {
            return Err(Status::invalid_argument(
                "cmd: empty; name the program to run (e.g. \"bash\")",
            ));
        }
        check_user(&r.user)?;
        if !r.cwd.is_empty() {
            check_path("cwd", &r.cwd)?;
        }
        if r.pty.is_some() {
            check_pty(r.pty.as_ref())?;
        }
        let (s, g) = self.live(&r.sandbox_id).await?;
        // The same checks as a program's arguments and environment, with
        // the sandbox's environment under the request's own.
        let own = std::mem::take(&mut r.env);
        r.env = s.env.clone().into_iter().collect();
        r.env.extend(own);
        let mut probe = crate::exec::ExecRequest::new("bash", "true");
        probe.args = r.args.clone();
        probe.env = r.env.clone().into_iter().collect();
        probe.validate(s.images()).map_err(super::sandbox::to_status)?;
        let items = g.start_process(r).await.map_err(status)?;
        Ok(relay(items, &s))
    }

    pub(crate) async fn connect_process(&self, r: ProcessSelector) -> Result<EventStream, Status> {
        check_selector(r.pid, &r.tag)?;
        let (s, g) = self.live(&r.sandbox_id).await?;
        let items = g.attach(r).await.map_err(status)?;
        Ok(relay(items, &s))
    }

    pub(crate) async fn list_processes(
        &self,
        r: ListProcessesRequest,
    ) -> Result<ListProcessesResponse, Status> {
        let (_, g) = self.live(&r.sandbox_id).await?;
        let processes = g.list_processes().await.map_err(status)?;
        Ok(ListProcessesResponse { processes })
    }

    pub(crate) async fn send_input(&self, r: SendInputRequest) -> Result<ProcessAck, Status> {
        check_selector(r.pid, &r.tag)?;
        if r.data.len() > FILE_CHUNK {
            return Err(Status::invalid_argument(format!(
                "data: {} bytes; send at most {FILE_CHUNK} bytes per call",
                r.data.len()
            )));
        }
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.send_input(r).await.map_err(status)?;
        Ok(ProcessAck {})
    }

    pub(crate) async fn resize_pty(&self, r: ResizePtyRequest) -> Result<ProcessAck, Status> {
        check_selector(r.pid, &r.tag)?;
        check_pty(r.size.as_ref())?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.resize_pty(r).await.map_err(status)?;
        Ok(ProcessAck {})
    }

    pub(crate) async fn close_stdin(&self, r: ProcessSelector) -> Result<ProcessAck, Status> {
        check_selector(r.pid, &r.tag)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.close_stdin(r).await.map_err(status)?;
        Ok(ProcessAck {})
    }

    pub(crate) async fn create_context(&self, r: CreateContextRequest) -> Result<ContextInfo, Status> {
        check_language(&r.language)?;
        check_user(&r.user)?;
        if !r.cwd.is_empty() {
            check_path("cwd", &r.cwd)?;
        }
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.create_context(r).await.map_err(status)
    }

    pub(crate) async fn list_contexts(&self, r: ListContextsRequest) -> Result<ListContextsResponse, Status> {
        let (_, g) = self.live(&r.sandbox_id).await?;
        let contexts = g.list_contexts().await.map_err(status)?;
        Ok(ListContextsResponse { contexts })
    }

    pub(crate) async fn restart_context(&self, r: ContextSelector) -> Result<ContextInfo, Status> {
        check_context_id(&r.context_id)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.restart_context(r).await.map_err(status)
    }

    pub(crate) async fn remove_context(&self, r: ContextSelector) -> Result<ContextAck, Status> {
        check_context_id(&r.context_id)?;
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.remove_context(r).await.map_err(status)?;
        Ok(ContextAck {})
    }

    pub(crate) async fn run_code(&self, mut r: RunCodeRequest) -> Result<CodeStream, Status> {
        if r.context_id.is_empty() {
            check_language(&r.language)?;
        } else {
            check_context_id(&r.context_id)?;
        }
        let (s, g) = self.live(&r.sandbox_id).await?;
        // The code, the environment (the sandbox's under the run's own) and
        // the time limit get the checks of every program.
        let own = std::mem::take(&mut r.env);
        r.env = s.env.clone().into_iter().collect();
        r.env.extend(own);
        let mut probe = crate::exec::ExecRequest::new("python", r.code.clone());
        probe.env = r.env.clone().into_iter().collect();
        probe.validate(s.images()).map_err(super::sandbox::to_status)?;
        if r.timeout_ms > MAX_RUN_MS {
            return Err(Status::invalid_argument(format!(
                "timeout_ms: at most {MAX_RUN_MS} (1 h); split the work into shorter runs"
            )));
        }
        let items = g.run_code(r).await.map_err(status)?;
        Ok(relay(items, &s))
    }

    pub(crate) async fn signal_process(&self, r: SignalProcessRequest) -> Result<ProcessAck, Status> {
        check_selector(r.pid, &r.tag)?;
        if !(1..=64).contains(&r.signal) {
            return Err(Status::invalid_argument(format!(
                "signal: {} is not a signal number; use e.g. 15 (SIGTERM), 9 (SIGKILL), 2 (SIGINT)",
                r.signal
            )));
        }
        let (_, g) = self.live(&r.sandbox_id).await?;
        g.signal(r).await.map_err(status)?;
        Ok(ProcessAck {})
    }
}
