//! The `Processes` service: processes of a sandbox that outlive the call that
//! started them.
//!
//! Each process runs in a session of its own (signals go to its whole group),
//! as the request's user, with the default rlimits. Its output goes to every
//! caller attached at the time (the one that started it, and any `Attach`
//! since); with nobody attached it is read and dropped, so a background
//! process never blocks on a full pipe. An attached caller that stops reading
//! for [`SUBSCRIBER_STALL`] is detached (its stream ends without `end`) rather
//! than stopping the process and every other caller.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use neurovisor_proto::guest::processes_server::Processes;
use neurovisor_proto::v1::{
    process_event::Event, ListProcessesRequest, ListProcessesResponse, ProcessAck, ProcessEnd, ProcessEvent,
    ProcessInfo, ProcessSelector, PtySize, ResizePtyRequest, SendInputRequest, SignalProcessRequest,
    StartProcessRequest,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::exec::{base_env, confine_child_as, kill_group, Limits, DRAIN_GRACE};
use crate::files::Account;

/// Processes alive at once.
pub const MAX_PROCESSES: usize = 256;
/// An attached caller that has not taken an event for this long is detached.
pub const SUBSCRIBER_STALL: Duration = Duration::from_secs(10);
/// The most a `SendInput` waits for the process to read.
const INPUT_STALL: Duration = Duration::from_secs(10);
const MAX_INPUT: usize = 1 << 20;

type EventTx = mpsc::Sender<Result<ProcessEvent, Status>>;

struct Attached {
    /// `None` once the process ended (no new callers attach).
    subscribers: Option<Vec<EventTx>>,
}

type Input = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

struct Proc {
    info: ProcessInfo,
    attached: Mutex<Attached>,
    /// Its stdin pipe, or its terminal.
    stdin: tokio::sync::Mutex<Option<Input>>,
    /// The terminal's controller side, for resizing.
    pty: Option<std::os::fd::OwnedFd>,
}

impl Proc {
    /// A new caller, or `None` if the process already ended.
    fn attach(&self) -> Option<mpsc::Receiver<Result<ProcessEvent, Status>>> {
        let (tx, rx) = mpsc::channel(16);
        tx.try_send(Ok(event(Event::Started(self.info.pid)))).ok()?;
        let mut a = self.attached.lock().ok()?;
        a.subscribers.as_mut()?.push(tx);
        Some(rx)
    }

    /// Gives `ev` to every caller attached now; drops those gone or stalled.
    async fn publish(&self, ev: Event, last: bool) {
        let subs = match self.attached.lock() {
            Ok(mut a) if last => a.subscribers.take().unwrap_or_default(),
            Ok(a) => a.subscribers.clone().unwrap_or_default(),
            Err(_) => return,
        };
        if subs.is_empty() {
            return;
        }
        let mut dead = Vec::new();
        for tx in &subs {
            let sent = tx.send_timeout(Ok(event(ev.clone())), SUBSCRIBER_STALL).await;
            if sent.is_err() {
                dead.push(tx.clone());
            }
        }
        if !dead.is_empty() && !last {
            if let Ok(mut a) = self.attached.lock() {
                if let Some(s) = a.subscribers.as_mut() {
                    s.retain(|t| !dead.iter().any(|d| d.same_channel(t)));
                }
            }
        }
    }
}

fn event(e: Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}

#[derive(Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl ProcessTable {
    fn find(&self, pid: u32, tag: &str) -> Result<Arc<Proc>, Status> {
        let procs = self
            .procs
            .lock()
            .map_err(|_| Status::internal("process table poisoned"))?;
        let found = if pid != 0 {
            procs.get(&pid).cloned()
        } else if !tag.is_empty() {
            procs.values().find(|p| p.info.tag == tag).cloned()
        } else {
            return Err(Status::invalid_argument("name the process: its pid or its tag"));
        };
        found.ok_or_else(|| {
            Status::not_found(if pid != 0 {
                format!("no running process with pid {pid} (it ended, or was never started here)")
            } else {
                format!("no running process tagged '{tag}'")
            })
        })
    }

    fn remove(&self, pid: u32) {
        if let Ok(mut p) = self.procs.lock() {
            p.remove(&pid);
        }
    }
}

fn check_start(r: &StartProcessRequest) -> Result<(), Status> {
    if r.cmd.trim().is_empty() {
        return Err(Status::invalid_argument("cmd is empty; name the program to run"));
    }
    if r.cmd.contains('\0') || r.args.iter().any(|a| a.contains('\0')) || r.cwd.contains('\0') {
        return Err(Status::invalid_argument("cmd, args or cwd contains a NUL byte"));
    }
    for (k, v) in &r.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "env: invalid variable name or value for '{k}'"
            )));
        }
    }
    Ok(())
}

fn end_of(status: &std::process::ExitStatus, timed_out: bool) -> ProcessEnd {
    let text = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("signal: {}", sig.as_str()),
            Err(_) => format!("signal: {s}"),
        },
        _ => "ended".into(),
    };
    ProcessEnd {
        exit_code: status.code(),
        signal: status.signal(),
        status: text,
        timed_out,
    }
}

/// How long a pump gathers more output after a short read before it
/// publishes: a program printing line by line becomes a few events per
/// `BATCH`, not one per line. Small HTTP/2 DATA frames that a reader has not
/// taken yet count against its connection's budget (h2 answers a flood of
/// them with GOAWAY), so events stay few and large.
const BATCH: Duration = Duration::from_millis(10);
const BATCH_BYTES: usize = 32 * 1024;

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
}

/// Reads one pipe to its end, publishing what it reads in batches.
async fn pump(mut pipe: impl AsyncRead + Unpin, proc: Arc<Proc>, stream: Stream) {
    let mut buf = vec![0u8; BATCH_BYTES];
    loop {
        let mut n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut ended = false;
        let until = tokio::time::Instant::now() + BATCH;
        while n < BATCH_BYTES {
            match tokio::time::timeout_at(until, pipe.read(&mut buf[n..])).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    ended = true;
                    break;
                }
                Ok(Ok(more)) => n += more,
                Err(_) => break,
            }
        }
        let data = Bytes::copy_from_slice(&buf[..n]);
        let ev = match stream {
            Stream::Stdout => Event::Stdout(data),
            Stream::Stderr => Event::Stderr(data),
            Stream::Pty => Event::Pty(data),
        };
        proc.publish(ev, false).await;
        if ended {
            return;
        }
    }
}

pub struct ProcessesService {
    table: Arc<ProcessTable>,
}

impl Default for ProcessesService {
    fn default() -> Self {
        Self {
            table: Arc::new(ProcessTable::default()),
        }
    }
}

type EventStream = ReceiverStream<Result<ProcessEvent, Status>>;

#[tonic::async_trait]
impl Processes for ProcessesService {
    type StartStream = EventStream;
    type AttachStream = EventStream;

    async fn start(&self, request: Request<StartProcessRequest>) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        check_start(&r)?;
        let account = Account::parse(&r.user)?;
        if self.table.procs.lock().map(|p| p.len()).unwrap_or(0) >= MAX_PROCESSES {
            return Err(Status::resource_exhausted(format!(
                "{MAX_PROCESSES} processes are running in this sandbox, the most it allows; signal some first"
            )));
        }
        let cwd = if r.cwd.is_empty() {
            account.home().into()
        } else {
            account.resolve(&r.cwd)?
        };
        let mut cmd = Command::new(&r.cmd);
        cmd.args(&r.args)
            .current_dir(&cwd)
            .env_clear()
            .envs(base_env())
            .envs(account_env(account))
            .envs(&r.env);
        let terminal = match &r.pty {
            Some(size) => Some(Terminal::open(size)?),
            None => None,
        };
        match &terminal {
            Some(t) => {
                cmd.stdin(t.follower()?)
                    .stdout(t.follower()?)
                    .stderr(t.follower()?);
            }
            None => {
                cmd.stdin(if r.stdin { Stdio::piped() } else { Stdio::null() })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        confine_child_as(&mut cmd, Limits::default(), None, account == Account::User);
        if terminal.is_some() {
            // After `setsid` (in confine_child_as): the terminal on fd 0
            // becomes the new session's controlling terminal.
            // SAFETY: one ioctl on the child's own fd 0; async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            let msg = format!("start {} (in {}): {e}", r.cmd, cwd.display());
            match e.kind() {
                std::io::ErrorKind::NotFound => Status::not_found(msg),
                std::io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                _ => Status::internal(msg),
            }
        })?;
        // The parent's copies of the follower side go with `cmd`.
        drop(cmd);
        let pid = child
            .id()
            .ok_or_else(|| Status::internal("the process ended before it had a pid"))?;
        let (input, output, pty): (Option<Input>, Option<tokio::fs::File>, _) = match terminal {
            Some(t) => {
                let (writer, reader, control) = t.into_parts()?;
                (Some(Box::new(writer)), Some(reader), Some(control))
            }
            None => (child.stdin.take().map(|s| Box::new(s) as Input), None, None),
        };
        let proc = Arc::new(Proc {
            info: ProcessInfo {
                pid,
                tag: r.tag,
                cmd: r.cmd,
                args: r.args,
                cwd: cwd.to_string_lossy().into_owned(),
                user: account.name().into(),
                started_at_ms: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            },
            attached: Mutex::new(Attached {
                subscribers: Some(Vec::new()),
            }),
            stdin: tokio::sync::Mutex::new(input),
            pty,
        });
        let rx = proc
            .attach()
            .ok_or_else(|| Status::internal("cannot follow the new process"))?;
        if let Ok(mut p) = self.table.procs.lock() {
            p.insert(pid, proc.clone());
        }
        let out = match output {
            Some(terminal) => Some(tokio::spawn(pump(terminal, proc.clone(), Stream::Pty))),
            None => child
                .stdout
                .take()
                .map(|p| tokio::spawn(pump(p, proc.clone(), Stream::Stdout))),
        };
        let err = child
            .stderr
            .take()
            .map(|p| tokio::spawn(pump(p, proc.clone(), Stream::Stderr)));
        let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms.into()));
        let table = self.table.clone();
        tokio::spawn(async move {
            let (status, timed_out) = match timeout {
                Some(t) => match tokio::time::timeout(t, child.wait()).await {
                    Ok(s) => (s, false),
                    Err(_) => {
                        kill_group(Some(pid));
                        (child.wait().await, true)
                    }
                },
                None => (child.wait().await, false),
            };
            // Output still in the pipes comes before the end; a background
            // child holding them open is not waited for (its output is read
            // and dropped).
            let drain = async {
                for h in [out, err].into_iter().flatten() {
                    let _ = h.await;
                }
            };
            let _ = tokio::time::timeout(DRAIN_GRACE, drain).await;
            table.remove(pid);
            if let Ok(mut stdin) = proc.stdin.try_lock() {
                stdin.take();
            }
            let end = match status {
                Ok(s) => end_of(&s, timed_out),
                Err(e) => ProcessEnd {
                    status: format!("cannot wait for it: {e}"),
                    ..Default::default()
                },
            };
            proc.publish(Event::End(end), true).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn attach(&self, request: Request<ProcessSelector>) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let proc = self.table.find(r.pid, &r.tag)?;
        let rx = proc
            .attach()
            .ok_or_else(|| Status::not_found(format!("process {} has ended", proc.info.pid)))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list(
        &self,
        _: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let mut processes: Vec<ProcessInfo> = self
            .table
            .procs
            .lock()
            .map(|p| p.values().map(|p| p.info.clone()).collect())
            .unwrap_or_default();
        processes.sort_by_key(|p| p.pid);
        Ok(Response::new(ListProcessesResponse { processes }))
    }

    async fn send_input(&self, request: Request<SendInputRequest>) -> Result<Response<ProcessAck>, Status> {
        let r = request.into_inner();
        if r.data.len() > MAX_INPUT {
            return Err(Status::invalid_argument(format!(
                "input of {} bytes is over the {MAX_INPUT}-byte limit of one call; send it in pieces",
                r.data.len()
            )));
        }
        let proc = self.table.find(r.pid, &r.tag)?;
        let mut stdin = proc.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| {
            Status::failed_precondition(format!(
                "stdin of process {} is closed (start it with stdin set to keep it open)",
                proc.info.pid
            ))
        })?;
        match tokio::time::timeout(INPUT_STALL, pipe.write_all(&r.data)).await {
            Ok(Ok(())) => Ok(Response::new(ProcessAck {})),
            Ok(Err(e)) => Err(Status::failed_precondition(format!(
                "process {} does not take input any more: {e}",
                proc.info.pid
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "process {} has not read its input for {INPUT_STALL:?}",
                proc.info.pid
            ))),
        }
    }

    async fn resize_pty(&self, request: Request<ResizePtyRequest>) -> Result<Response<ProcessAck>, Status> {
        let r = request.into_inner();
        let size = r
            .size
            .ok_or_else(|| Status::invalid_argument("size: missing; give cols and rows"))?;
        let proc = self.table.find(r.pid, &r.tag)?;
        let fd = proc.pty.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "process {} has no terminal (start it with pty)",
                proc.info.pid
            ))
        })?;
        set_size(fd, &size)?;
        Ok(Response::new(ProcessAck {}))
    }

    async fn close_stdin(&self, request: Request<ProcessSelector>) -> Result<Response<ProcessAck>, Status> {
        let r = request.into_inner();
        let proc = self.table.find(r.pid, &r.tag)?;
        proc.stdin.lock().await.take();
        Ok(Response::new(ProcessAck {}))
    }

    async fn signal(&self, request: Request<SignalProcessRequest>) -> Result<Response<ProcessAck>, Status> {
        let r = request.into_inner();
        let sig = Signal::try_from(r.signal).map_err(|_| {
            Status::invalid_argument(format!(
                "unknown signal {}; use a number such as 15 (SIGTERM), 9 (SIGKILL) or 2 (SIGINT)",
                r.signal
            ))
        })?;
        let proc = self.table.find(r.pid, &r.tag)?;
        killpg(Pid::from_raw(proc.info.pid as i32), sig)
            .map_err(|e| Status::internal(format!("signal process {}: {e}", proc.info.pid)))?;
        Ok(Response::new(ProcessAck {}))
    }
}

/// A pseudo-terminal for one process.
struct Terminal {
    controller: std::os::fd::OwnedFd,
    follower: std::os::fd::OwnedFd,
}

fn winsize(size: &PtySize) -> Result<nix::pty::Winsize, Status> {
    if size.cols == 0 || size.rows == 0 || size.cols > 1000 || size.rows > 1000 {
        return Err(Status::invalid_argument(format!(
            "pty size {}x{}: cols and rows must be 1-1000",
            size.cols, size.rows
        )));
    }
    Ok(nix::pty::Winsize {
        ws_row: size.rows as u16,
        ws_col: size.cols as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

fn set_size(fd: &std::os::fd::OwnedFd, size: &PtySize) -> Result<(), Status> {
    use std::os::fd::AsRawFd;
    let ws = winsize(size)?;
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(Status::internal(format!(
            "resize the terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

impl Terminal {
    fn open(size: &PtySize) -> Result<Self, Status> {
        let ws = winsize(size)?;
        let pty = nix::pty::openpty(Some(&ws), None)
            .map_err(|e| Status::internal(format!("open a pseudo-terminal: {e}")))?;
        Ok(Self {
            controller: pty.master,
            follower: pty.slave,
        })
    }

    /// A copy of the follower side for one of the child's standard streams.
    fn follower(&self) -> Result<Stdio, Status> {
        self.follower
            .try_clone()
            .map(Stdio::from)
            .map_err(|e| Status::internal(format!("pseudo-terminal: {e}")))
    }

    /// (writer, reader, the controller kept for resizing).
    fn into_parts(self) -> Result<(tokio::fs::File, tokio::fs::File, std::os::fd::OwnedFd), Status> {
        let dup = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone()
                .map_err(|e| Status::internal(format!("pseudo-terminal: {e}")))
        };
        let writer = tokio::fs::File::from_std(std::fs::File::from(dup(&self.controller)?));
        let reader = tokio::fs::File::from_std(std::fs::File::from(dup(&self.controller)?));
        drop(self.follower);
        Ok((writer, reader, self.controller))
    }
}

/// What differs from the sandbox user's environment for `account`.
fn account_env(account: Account) -> Vec<(&'static str, String)> {
    match account {
        Account::User => Vec::new(),
        Account::Root => vec![
            ("HOME", account.home().into()),
            ("USER", "root".into()),
            ("LOGNAME", "root".into()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_read_like_go_and_e2b_print_them() {
        let exited = std::process::ExitStatus::from_raw(3 << 8);
        let e = end_of(&exited, false);
        assert_eq!(
            (e.exit_code, e.signal, e.status.as_str()),
            (Some(3), None, "exit status 3")
        );
        let killed = std::process::ExitStatus::from_raw(9);
        let e = end_of(&killed, true);
        assert_eq!((e.exit_code, e.signal), (None, Some(9)));
        assert_eq!(e.status, "signal: SIGKILL");
        assert!(e.timed_out);
    }

    #[test]
    fn start_requests_are_checked() {
        let mut r = StartProcessRequest {
            cmd: " ".into(),
            ..Default::default()
        };
        assert!(check_start(&r).unwrap_err().message().contains("cmd is empty"));
        r.cmd = "ls".into();
        r.env.insert("A=B".into(), "1".into());
        assert!(check_start(&r).unwrap_err().message().starts_with("env:"));
    }

    /// The pty output of a stream until its end.
    async fn terminal_output(mut s: EventStream) -> (String, Option<ProcessEnd>) {
        use tokio_stream::StreamExt;
        let mut out = Vec::new();
        while let Some(Ok(ev)) = s.next().await {
            match ev.event {
                Some(Event::Pty(b)) => out.extend_from_slice(&b),
                Some(Event::End(e)) => return (String::from_utf8_lossy(&out).into_owned(), Some(e)),
                _ => {}
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), None)
    }

    #[tokio::test]
    async fn a_process_on_a_terminal_sees_its_size_input_and_resizes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (as the guest agent is)");
            return;
        }
        let svc = ProcessesService::default();
        let start = |script: &str| StartProcessRequest {
            cmd: "bash".into(),
            args: vec!["-c".into(), script.into()],
            cwd: "/tmp".into(),
            user: "root".into(),
            pty: Some(PtySize { cols: 100, rows: 30 }),
            ..Default::default()
        };
        let s = svc
            .start(Request::new(start("stty size; tty")))
            .await
            .unwrap()
            .into_inner();
        let (out, end) = terminal_output(s).await;
        assert!(out.contains("30 100") && out.contains("/dev/pts/"), "{out:?}");
        assert_eq!(end.and_then(|e| e.exit_code), Some(0));

        let mut s = svc
            .start(Request::new(start("read line; echo \"got $line\"; stty size")))
            .await
            .unwrap()
            .into_inner();
        let pid = match tokio_stream::StreamExt::next(&mut s).await {
            Some(Ok(ProcessEvent {
                event: Some(Event::Started(pid)),
            })) => pid,
            other => panic!("{other:?}"),
        };
        svc.resize_pty(Request::new(ResizePtyRequest {
            pid,
            size: Some(PtySize { cols: 120, rows: 40 }),
            ..Default::default()
        }))
        .await
        .unwrap();
        svc.send_input(Request::new(SendInputRequest {
            pid,
            data: b"hello\n".to_vec().into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        let (out, _) = terminal_output(s).await;
        assert!(out.contains("got hello") && out.contains("40 120"), "{out:?}");
        let e = svc
            .resize_pty(Request::new(ResizePtyRequest {
                pid: 1,
                size: Some(PtySize { cols: 0, rows: 1 }),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok);
    }

    #[tokio::test]
    async fn a_stalled_caller_is_dropped_and_the_others_keep_their_events() {
        let proc = Proc {
            info: ProcessInfo {
                pid: 7,
                ..Default::default()
            },
            attached: Mutex::new(Attached {
                subscribers: Some(Vec::new()),
            }),
            stdin: tokio::sync::Mutex::new(None),
            pty: None,
        };
        let mut reader = proc.attach().unwrap();
        let _stalled = proc.attach().unwrap();
        tokio::time::pause();
        let read_all = async {
            let mut n = 0;
            while let Some(Ok(ev)) = reader.recv().await {
                if matches!(ev.event, Some(Event::End(_))) {
                    return n;
                }
                n += 1;
            }
            n
        };
        let publish = async {
            for _ in 0..40 {
                proc.publish(Event::Stdout(Bytes::from_static(b"x")), false).await;
            }
            proc.publish(Event::End(ProcessEnd::default()), true).await;
        };
        let (n, ()) = tokio::join!(read_all, publish);
        // `started` plus all 40 chunks reached the reader.
        assert_eq!(n, 41);
        assert!(proc.attach().is_none(), "no attaching after the end");
    }
}
