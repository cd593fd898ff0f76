//! The `Contexts` service: stateful interpreters of a sandbox.
//!
//! A context is one interpreter process (`python3` or `node`) running a small
//! driver (`drivers/`), confined like every program (own session, rlimits,
//! the context's user). Code goes to it over a Unix socket on its fd 3, and
//! events come back on the same socket as JSON lines; what its child
//! processes write to fd 1 and 2 is read too and goes to the run in progress.
//! A run that outlives its time is interrupted (SIGINT), then the context is
//! killed and starts afresh on its next run; so does a context whose
//! interpreter died.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use neurovisor_proto::guest::contexts_server::Contexts;
use neurovisor_proto::v1::{
    code_event::Event, CodeError, CodeEvent, CodeResult, ContextAck, ContextInfo, ContextSelector,
    CreateContextRequest, ListContextsRequest, ListContextsResponse, RunCodeRequest,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::exec::{base_env, confine_child_as, kill_group, Limits};
use crate::files::Account;

const PYTHON_DRIVER: &str = include_str!("drivers/python.py");
const JAVASCRIPT_DRIVER: &str = include_str!("drivers/javascript.js");
/// Contexts alive at once in one sandbox.
pub const MAX_CONTEXTS: usize = 32;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// After SIGINT, how long a run may take to report and stop.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// The longest event line the host is sent (a huge repr is cut).
const MAX_LINE: usize = 1 << 20;

type EventTx = mpsc::Sender<Result<CodeEvent, Status>>;

/// The driver of each language, and how to start it.
fn driver(language: &str) -> Option<(&'static str, [&'static str; 1], &'static str)> {
    match language {
        "python" => Some(("python3", ["-c"], PYTHON_DRIVER)),
        "javascript" => Some(("node", ["-e"], JAVASCRIPT_DRIVER)),
        _ => None,
    }
}

/// One running interpreter.
struct Interp {
    child: Child,
    pid: u32,
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    requests: OwnedWriteHalf,
    /// Where fd 1/2 output goes: the run in progress, if any.
    sink: Arc<Mutex<Option<EventTx>>>,
}

impl Drop for Interp {
    fn drop(&mut self) {
        kill_group(Some(self.pid));
    }
}

struct Ctx {
    info: ContextInfo,
    account: Account,
    /// `None` until the first run, and after the interpreter died.
    interp: tokio::sync::Mutex<Option<Interp>>,
    /// The interpreter's pid (0: none), for killing it while a run holds `interp`.
    pid: std::sync::atomic::AtomicU32,
}

impl Ctx {
    fn start(&self) -> Result<Interp, Status> {
        let i = spawn(&self.info, self.account)?;
        self.pid.store(i.pid, std::sync::atomic::Ordering::Relaxed);
        Ok(i)
    }
}

/// Copies what the interpreter's own fd 1 or 2 gets into the run in progress.
async fn pump(mut pipe: impl AsyncRead + Unpin, sink: Arc<Mutex<Option<EventTx>>>, stdout: bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let tx = sink.lock().ok().and_then(|s| s.clone());
        if let Some(tx) = tx {
            let ev = if stdout {
                Event::Stdout(text)
            } else {
                Event::Stderr(text)
            };
            let _ = tx.send(Ok(CodeEvent { event: Some(ev) })).await;
        }
    }
}

fn spawn(info: &ContextInfo, account: Account) -> Result<Interp, Status> {
    let (program, flag, source) = driver(&info.language)
        .ok_or_else(|| Status::invalid_argument(format!("no context driver for '{}'", info.language)))?;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Status::internal(format!("socketpair: {e}")))?;
    ours.set_nonblocking(true)
        .map_err(|e| Status::internal(format!("socketpair: {e}")))?;
    let mut cmd = Command::new(program);
    cmd.args(flag)
        .arg(source)
        .current_dir(&info.cwd)
        .env_clear()
        .envs(base_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if account == Account::Root {
        cmd.envs([("HOME", "/root"), ("USER", "root"), ("LOGNAME", "root")]);
    }
    confine_child_as(
        &mut cmd,
        Limits::default(),
        Some(theirs.as_raw_fd()),
        account == Account::User,
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| Status::internal(format!("start {program} for a {} context: {e}", info.language)))?;
    drop(theirs);
    let pid = child
        .id()
        .ok_or_else(|| Status::internal("the interpreter ended at once"))?;
    let sink = Arc::new(Mutex::new(None));
    if let Some(p) = child.stdout.take() {
        tokio::spawn(pump(p, sink.clone(), true));
    }
    if let Some(p) = child.stderr.take() {
        tokio::spawn(pump(p, sink.clone(), false));
    }
    let sock =
        tokio::net::UnixStream::from_std(ours).map_err(|e| Status::internal(format!("socket: {e}")))?;
    let (rd, wr) = sock.into_split();
    Ok(Interp {
        child,
        pid,
        lines: BufReader::new(rd).lines(),
        requests: wr,
        sink,
    })
}

/// One line the driver sends.
#[derive(Deserialize)]
struct DriverEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    traceback: String,
    #[serde(default)]
    execution_count: u32,
    #[serde(default)]
    is_main_result: bool,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    markdown: Option<String>,
    #[serde(default)]
    svg: Option<String>,
    #[serde(default)]
    png: Option<String>,
    #[serde(default)]
    jpeg: Option<String>,
    #[serde(default)]
    latex: Option<String>,
    #[serde(default)]
    json: Option<String>,
    #[serde(default)]
    javascript: Option<String>,
}

fn to_event(d: DriverEvent) -> Option<Event> {
    Some(match d.kind.as_str() {
        "stdout" => Event::Stdout(d.text),
        "stderr" => Event::Stderr(d.text),
        "result" => Event::Result(CodeResult {
            text: d.text,
            html: d.html.unwrap_or_default(),
            markdown: d.markdown.unwrap_or_default(),
            svg: d.svg.unwrap_or_default(),
            png: d.png.unwrap_or_default(),
            jpeg: d.jpeg.unwrap_or_default(),
            latex: d.latex.unwrap_or_default(),
            json: d.json.unwrap_or_default(),
            javascript: d.javascript.unwrap_or_default(),
            is_main_result: d.is_main_result,
        }),
        "error" => Event::Error(CodeError {
            name: d.name,
            value: d.value,
            traceback: d.traceback,
        }),
        "done" => Event::ExecutionCount(d.execution_count),
        _ => return None,
    })
}

fn event(e: Event) -> Result<CodeEvent, Status> {
    Ok(CodeEvent { event: Some(e) })
}

fn died(why: &str) -> Event {
    Event::Error(CodeError {
        name: "ContextDied".into(),
        value: format!("{why}; its state is gone, the next run starts a fresh interpreter"),
        traceback: String::new(),
    })
}

/// Runs one request on the context's interpreter, sending events to `tx`.
async fn run(ctx: &Ctx, req: RunCodeRequest, tx: EventTx) {
    let mut slot = ctx.interp.lock().await;
    if let Some(i) = slot.as_mut() {
        if matches!(i.child.try_wait(), Ok(Some(_))) {
            *slot = None;
        }
    }
    if slot.is_none() {
        match ctx.start() {
            Ok(i) => *slot = Some(i),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    let Some(interp) = slot.as_mut() else { return };
    if let Ok(mut s) = interp.sink.lock() {
        *s = Some(tx.clone());
    }
    let line = serde_json::json!({"code": req.code, "env": req.env}).to_string() + "\n";
    if interp.requests.write_all(line.as_bytes()).await.is_err() {
        let _ = tx.send(event(died("the interpreter is gone"))).await;
        *slot = None;
        return;
    }
    let timeout = if req.timeout_ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(req.timeout_ms.into())
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // Set once the run is interrupted (its time is up, or nobody reads it):
    // it must still report "done" before the context takes the next run.
    let mut interrupted_at: Option<tokio::time::Instant> = None;
    let mut abandoned = false;
    let outcome: Result<(), String> = loop {
        let next = tokio::select! {
            l = interp.lines.next_line() => l,
            _ = tokio::time::sleep_until(deadline), if interrupted_at.is_none() => {
                interrupted_at = Some(tokio::time::Instant::now());
                let _ = killpg(Pid::from_raw(interp.pid as i32), Signal::SIGINT);
                continue;
            }
            _ = tx.closed(), if !abandoned => {
                abandoned = true;
                if interrupted_at.is_none() {
                    interrupted_at = Some(tokio::time::Instant::now());
                    let _ = killpg(Pid::from_raw(interp.pid as i32), Signal::SIGINT);
                }
                continue;
            }
            _ = tokio::time::sleep_until(interrupted_at.unwrap_or(deadline) + INTERRUPT_GRACE), if interrupted_at.is_some() => {
                break Err(format!("the run did not stop within {INTERRUPT_GRACE:?} of an interrupt and the interpreter was killed"));
            }
        };
        let line = match next {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => break Err("the interpreter exited".into()),
        };
        if abandoned {
            if line.contains("\"done\"")
                && serde_json::from_str::<DriverEvent>(&line).is_ok_and(|d| d.kind == "done")
            {
                break Ok(());
            }
            continue;
        }
        if line.len() > MAX_LINE {
            let _ = tx
                .send(event(Event::Stderr(format!(
                    "[an output of {} bytes was dropped: over the {MAX_LINE}-byte limit of one event]\n",
                    line.len()
                ))))
                .await;
            continue;
        }
        let Ok(d) = serde_json::from_str::<DriverEvent>(&line) else {
            continue;
        };
        let Some(ev) = to_event(d) else { continue };
        let done = matches!(ev, Event::ExecutionCount(_));
        let ev = match ev {
            Event::Error(e) if interrupted_at.is_some() => Event::Error(CodeError {
                name: "TimeoutError".into(),
                value: format!("the run was interrupted at its time limit ({timeout:?})"),
                traceback: e.traceback,
            }),
            ev => ev,
        };
        if tx.send(event(ev)).await.is_err() {
            abandoned = true;
            if done {
                break Ok(());
            }
            if interrupted_at.is_none() {
                interrupted_at = Some(tokio::time::Instant::now());
                let _ = killpg(Pid::from_raw(interp.pid as i32), Signal::SIGINT);
            }
            continue;
        }
        if done {
            break Ok(());
        }
    };
    // Output its child processes wrote just before the end.
    tokio::time::sleep(Duration::from_millis(10)).await;
    if let Ok(mut s) = interp.sink.lock() {
        *s = None;
    }
    if let Err(why) = outcome {
        let _ = tx.send(event(died(&why))).await;
        *slot = None;
    }
}

#[derive(Default)]
pub struct ContextsService {
    contexts: Mutex<HashMap<String, Arc<Ctx>>>,
    next: std::sync::atomic::AtomicU64,
}

impl ContextsService {
    fn find(&self, id: &str) -> Result<Arc<Ctx>, Status> {
        self.contexts
            .lock()
            .ok()
            .and_then(|c| c.get(id).cloned())
            .ok_or_else(|| Status::not_found(format!("no context '{id}' (removed, or never created)")))
    }

    fn create_ctx(
        &self,
        language: &str,
        cwd: &str,
        user: &str,
        id: Option<String>,
    ) -> Result<Arc<Ctx>, Status> {
        let language = if language.is_empty() { "python" } else { language };
        if driver(language).is_none() {
            return Err(Status::invalid_argument(format!(
                "language '{language}' has no code contexts; use \"python\" or \"javascript\""
            )));
        }
        let account = Account::parse(user)?;
        let cwd = if cwd.is_empty() {
            account.home().into()
        } else {
            account.resolve(cwd)?
        };
        if !cwd.is_dir() {
            return Err(Status::failed_precondition(format!(
                "cwd {}: not a directory",
                cwd.display()
            )));
        }
        let mut all = self
            .contexts
            .lock()
            .map_err(|_| Status::internal("context table poisoned"))?;
        if all.len() >= MAX_CONTEXTS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_CONTEXTS} contexts exist in this sandbox, the most it allows; remove one"
            )));
        }
        let id = id.unwrap_or_else(|| {
            format!(
                "ctx-{}",
                self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
            )
        });
        let ctx = Arc::new(Ctx {
            info: ContextInfo {
                id: id.clone(),
                language: language.into(),
                cwd: cwd.to_string_lossy().into_owned(),
                user: account.name().into(),
            },
            account,
            interp: tokio::sync::Mutex::new(None),
            pid: Default::default(),
        });
        all.insert(id, ctx.clone());
        Ok(ctx)
    }
}

type CodeStream = ReceiverStream<Result<CodeEvent, Status>>;

#[tonic::async_trait]
impl Contexts for ContextsService {
    type RunStream = CodeStream;

    async fn create(&self, request: Request<CreateContextRequest>) -> Result<Response<ContextInfo>, Status> {
        let r = request.into_inner();
        let ctx = self.create_ctx(&r.language, &r.cwd, &r.user, None)?;
        // Started now, so the first run does not wait for the interpreter.
        let started = ctx.start();
        match started {
            Ok(i) => *ctx.interp.lock().await = Some(i),
            Err(e) => {
                if let Ok(mut all) = self.contexts.lock() {
                    all.remove(&ctx.info.id);
                }
                return Err(e);
            }
        }
        Ok(Response::new(ctx.info.clone()))
    }

    async fn list(&self, _: Request<ListContextsRequest>) -> Result<Response<ListContextsResponse>, Status> {
        let mut contexts: Vec<ContextInfo> = self
            .contexts
            .lock()
            .map(|c| c.values().map(|c| c.info.clone()).collect())
            .unwrap_or_default();
        contexts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(ListContextsResponse { contexts }))
    }

    async fn restart(&self, request: Request<ContextSelector>) -> Result<Response<ContextInfo>, Status> {
        let ctx = self.find(&request.into_inner().context_id)?;
        let mut slot = ctx.interp.lock().await;
        *slot = None;
        *slot = Some(ctx.start()?);
        Ok(Response::new(ctx.info.clone()))
    }

    async fn remove(&self, request: Request<ContextSelector>) -> Result<Response<ContextAck>, Status> {
        let id = request.into_inner().context_id;
        let ctx = self
            .contexts
            .lock()
            .ok()
            .and_then(|mut c| c.remove(&id))
            .ok_or_else(|| Status::not_found(format!("no context '{id}'")))?;
        // A run in progress ends when its interpreter does.
        kill_group(Some(ctx.pid.load(std::sync::atomic::Ordering::Relaxed)).filter(|p| *p != 0));
        if let Ok(mut slot) = ctx.interp.try_lock() {
            *slot = None;
        }
        Ok(Response::new(ContextAck {}))
    }

    async fn run(&self, request: Request<RunCodeRequest>) -> Result<Response<CodeStream>, Status> {
        let r = request.into_inner();
        if r.code.trim().is_empty() {
            return Err(Status::invalid_argument("code is empty"));
        }
        let ctx = if r.context_id.is_empty() {
            let language = if r.language.is_empty() {
                "python"
            } else {
                r.language.as_str()
            };
            let id = format!("default-{language}");
            match self.find(&id) {
                Ok(c) => c,
                Err(_) => self.create_ctx(language, "", "", Some(id))?,
            }
        } else {
            self.find(&r.context_id)?
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move { run(&ctx, r, tx).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_lines_become_events() {
        let d: DriverEvent =
            serde_json::from_str(r#"{"type":"result","text":"2","is_main_result":true,"html":"<b>2</b>"}"#)
                .unwrap();
        match to_event(d) {
            Some(Event::Result(r)) => assert_eq!(
                (r.text.as_str(), r.html.as_str(), r.is_main_result),
                ("2", "<b>2</b>", true)
            ),
            other => panic!("{other:?}"),
        }
        let d: DriverEvent = serde_json::from_str(r#"{"type":"done","execution_count":3}"#).unwrap();
        assert_eq!(to_event(d), Some(Event::ExecutionCount(3)));
        let d: DriverEvent = serde_json::from_str(r#"{"type":"bogus"}"#).unwrap();
        assert_eq!(to_event(d), None);
        assert!(driver("python").is_some() && driver("bash").is_none());
    }
}
