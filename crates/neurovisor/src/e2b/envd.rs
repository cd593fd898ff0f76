//! envd's `process.Process` and `filesystem.Filesystem` over the Connect
//! protocol with the JSON codec: unary calls are `POST /<service>/<method>`
//! with a JSON body (errors: an HTTP status and `{"code", "message"}`);
//! server streams carry envelopes (1 flag byte, a 4-byte big-endian length,
//! the JSON) and end with an end-of-stream envelope (flag 2) holding `{}` or
//! `{"error": ...}`. `bytes` fields are base64, enums are names, 64-bit
//! integers are strings.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use neurovisor_proto::v1::{
    process_event::Event, EntryInfo, FileType, FsEvent, FsEventType, ListDirRequest, ListProcessesRequest,
    MoveRequest, PathRequest, ProcessEvent, ProcessSelector, PtySize, ResizePtyRequest, SendInputRequest,
    SignalProcessRequest, StartProcessRequest, WatchDirRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::Code;

use super::{check_sandbox, rfc3339, user_of, E2bState};

/// Streams send a keepalive at least this often (or as the client's
/// `Keepalive-Ping-Interval` asks, if sooner).
const KEEPALIVE: Duration = Duration::from_secs(30);
/// The largest request envelope or body of a call here (file contents
/// travel through `/files`, not here).
const MAX_BODY: usize = 2 << 20;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub fn router() -> axum::Router<E2bState> {
    axum::Router::new()
        .route("/process.Process/{method}", post(process))
        .route("/filesystem.Filesystem/{method}", post(filesystem))
        .route("/health", get(health))
}

async fn health(State(st): State<E2bState>, headers: HeaderMap) -> Response {
    match check_sandbox(&st, &headers) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => super::files::refused(e).into_response(),
    }
}

/// A Connect error.
struct ConnectError(Code, String);

impl From<tonic::Status> for ConnectError {
    fn from(s: tonic::Status) -> Self {
        Self(s.code(), s.message().to_string())
    }
}

impl From<(Code, String)> for ConnectError {
    fn from((c, m): (Code, String)) -> Self {
        Self(c, m)
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
        Code::Ok => "ok",
    }
}

impl ConnectError {
    fn json(&self) -> Value {
        json!({"code": code_name(self.0), "message": self.1})
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (
            super::http_status(self.0),
            [(header::CONTENT_TYPE, "application/json")],
            self.json().to_string(),
        )
            .into_response()
    }
}

fn bad(msg: impl Into<String>) -> ConnectError {
    ConnectError(Code::InvalidArgument, msg.into())
}

fn unimplemented(what: &str) -> ConnectError {
    ConnectError(
        Code::Unimplemented,
        format!("{what} is not supported by this daemon yet"),
    )
}

/// The request message: a JSON body (unary) or its one envelope (stream).
fn message<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    streaming: bool,
) -> Result<T, ConnectError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let want = if streaming {
        "application/connect+json"
    } else {
        "application/json"
    };
    if !ct.starts_with(want) {
        return Err(bad(format!(
            "Content-Type '{ct}': this server speaks Connect with the JSON codec ({want})"
        )));
    }
    if body.len() > MAX_BODY {
        return Err(bad(format!(
            "a request of {} bytes is over the {MAX_BODY}-byte limit",
            body.len()
        )));
    }
    let json = if streaming {
        if body.len() < 5 {
            return Err(bad("a stream request needs one envelope"));
        }
        if body[0] & 1 != 0 {
            return Err(bad(
                "compressed envelopes are not accepted; send them uncompressed",
            ));
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.get(5..5 + len)
            .ok_or_else(|| bad("the envelope is shorter than its length"))?
    } else {
        body
    };
    let json = if json.is_empty() { b"{}".as_slice() } else { json };
    serde_json::from_slice(json).map_err(|e| bad(format!("invalid request: {e}")))
}

fn envelope(flags: u8, v: &Value) -> Bytes {
    let json = v.to_string();
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    out.into()
}

fn ok_json(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

#[derive(Deserialize, Default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

impl Selector {
    fn parts(self) -> Result<(u32, String), ConnectError> {
        match (self.pid, self.tag) {
            (Some(pid), _) if pid > 0 => Ok((pid, String::new())),
            (_, Some(tag)) if !tag.is_empty() => Ok((0, tag)),
            _ => Err(bad("process: give its pid or its tag")),
        }
    }
}

#[derive(Deserialize, Default)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: Option<std::collections::HashMap<String, String>>,
    cwd: Option<String>,
}

#[derive(Deserialize, Default)]
struct StartBody {
    process: Option<ProcessConfig>,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Deserialize, Default)]
struct UpdateBody {
    process: Option<Selector>,
    pty: Option<Value>,
}

/// envd's `PTY {size: {cols, rows}}`.
fn pty_size(v: Value) -> Result<PtySize, ConnectError> {
    let size = &v["size"];
    let dim = |k: &str| size[k].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    let (cols, rows) = (dim("cols"), dim("rows"));
    if cols == 0 || rows == 0 {
        return Err(bad("pty.size: give cols and rows"));
    }
    Ok(PtySize { cols, rows })
}

#[derive(Deserialize, Default)]
struct SelectorBody {
    process: Option<Selector>,
}

#[derive(Deserialize, Default)]
struct InputBody {
    process: Option<Selector>,
    input: Option<Input>,
}

#[derive(Deserialize, Default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Deserialize, Default)]
struct SignalBody {
    process: Option<Selector>,
    signal: Option<Value>,
}

fn signal_number(v: Option<Value>) -> Result<i32, ConnectError> {
    match v {
        Some(Value::String(s)) => match s.as_str() {
            "SIGNAL_SIGKILL" => Ok(9),
            "SIGNAL_SIGTERM" => Ok(15),
            other => Err(bad(format!(
                "signal '{other}': use SIGNAL_SIGTERM or SIGNAL_SIGKILL"
            ))),
        },
        Some(Value::Number(n)) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
            Ok(n.as_i64().unwrap_or(15) as i32)
        }
        _ => Err(bad("signal: use SIGNAL_SIGTERM or SIGNAL_SIGKILL")),
    }
}

fn keepalive_of(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(KEEPALIVE)
        .min(KEEPALIVE)
}

fn event_json(ev: &ProcessEvent) -> Option<Value> {
    let e = match ev.event.as_ref()? {
        Event::Started(pid) => json!({"start": {"pid": pid}}),
        Event::Stdout(b) => json!({"data": {"stdout": B64.encode(b)}}),
        Event::Stderr(b) => json!({"data": {"stderr": B64.encode(b)}}),
        Event::End(end) => json!({"end": {
            "exitCode": end.exit_code.unwrap_or(-1),
            "exited": end.exit_code.is_some(),
            "status": end.status,
        }}),
        Event::Keepalive(_) => json!({"keepalive": {}}),
        Event::Pty(b) => json!({"data": {"pty": B64.encode(b)}}),
    };
    Some(json!({"event": e}))
}

/// How one kind of stream's items become Connect messages.
trait StreamItem: Send + 'static {
    /// The message, and whether it is the last one.
    fn message(&self) -> Option<(Value, bool)>;
    fn keepalive() -> Value;
    /// Why the stream ended without its last message.
    const CUT_SHORT: &'static str;
}

impl StreamItem for ProcessEvent {
    fn message(&self) -> Option<(Value, bool)> {
        event_json(self).map(|v| (v, matches!(self.event, Some(Event::End(_)))))
    }
    fn keepalive() -> Value {
        json!({"event": {"keepalive": {}}})
    }
    const CUT_SHORT: &'static str =
        "the output stream ended before the process did (it was not read for too long); connect again by pid";
}

impl StreamItem for FsEvent {
    fn message(&self) -> Option<(Value, bool)> {
        Some((watch_json(self), false))
    }
    fn keepalive() -> Value {
        json!({"keepalive": {}})
    }
    const CUT_SHORT: &'static str = "the watch ended";
}

/// envd's `WatchDirResponse` (and, without the wrapper, a watcher's event).
fn fs_event_json(e: &FsEvent) -> Value {
    let t = match e.r#type() {
        FsEventType::Create => "EVENT_TYPE_CREATE",
        FsEventType::Write => "EVENT_TYPE_WRITE",
        FsEventType::Remove => "EVENT_TYPE_REMOVE",
        FsEventType::Rename => "EVENT_TYPE_RENAME",
        FsEventType::Chmod => "EVENT_TYPE_CHMOD",
        FsEventType::Unspecified => "EVENT_TYPE_UNSPECIFIED",
    };
    json!({"name": e.name, "type": t})
}

fn watch_json(e: &FsEvent) -> Value {
    if e.started {
        json!({"start": {}})
    } else {
        json!({"filesystem": fs_event_json(e)})
    }
}

type Items<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// A stream of events as a Connect server stream, with keepalives.
fn stream_response<T: StreamItem>(events: Result<Items<T>, ConnectError>, keepalive: Duration) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(async move {
        let mut events = match events {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.send(Ok(envelope(2, &json!({"error": e.json()})))).await;
                return;
            }
        };
        let mut tick = tokio::time::interval(keepalive);
        tick.reset();
        let end = loop {
            let next = tokio::select! {
                ev = events.next() => ev,
                _ = tick.tick() => {
                    if tx.send(Ok(envelope(0, &T::keepalive()))).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return,
            };
            match next {
                Some(Ok(ev)) => {
                    let Some((v, last)) = ev.message() else { continue };
                    if tx.send(Ok(envelope(0, &v))).await.is_err() {
                        return;
                    }
                    if last {
                        break json!({});
                    }
                }
                Some(Err(s)) => break json!({"error": ConnectError::from(s).json()}),
                None => break json!({"error": ConnectError(Code::Aborted, T::CUT_SHORT.into()).json()}),
            }
        };
        let _ = tx.send(Ok(envelope(2, &end))).await;
    });
    (
        [(header::CONTENT_TYPE, "application/connect+json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}

async fn process(
    State(st): State<E2bState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let keepalive = keepalive_of(&headers);
    match method.as_str() {
        "Start" | "Connect" => {
            let events = async {
                let id = check_sandbox(&st, &headers)?;
                if method == "Start" {
                    let b: StartBody = message(&headers, &body, true)?;
                    let pty = b.pty.map(pty_size).transpose()?;
                    let p = b
                        .process
                        .ok_or_else(|| bad("process: missing; give cmd and args"))?;
                    let r = StartProcessRequest {
                        sandbox_id: id,
                        cmd: p.cmd,
                        args: p.args,
                        env: p.envs.unwrap_or_default(),
                        cwd: p.cwd.unwrap_or_default(),
                        user: user_of(&headers)?,
                        stdin: b.stdin.unwrap_or(false),
                        tag: b.tag.unwrap_or_default(),
                        timeout_ms: 0,
                        pty,
                    };
                    Ok(st.table.start_process(r).await?)
                } else {
                    let b: SelectorBody = message(&headers, &body, true)?;
                    let (pid, tag) = b.process.unwrap_or_default().parts()?;
                    let r = ProcessSelector {
                        sandbox_id: id,
                        pid,
                        tag,
                    };
                    Ok(st.table.connect_process(r).await?)
                }
            }
            .await;
            stream_response(events, keepalive)
        }
        _ => unary_process(&st, &method, &headers, &body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
    }
}

async fn unary_process(
    st: &E2bState,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ConnectError> {
    let id = check_sandbox(st, headers)?;
    match method {
        "List" => {
            let list = st
                .table
                .list_processes(ListProcessesRequest { sandbox_id: id })
                .await?;
            let processes: Vec<Value> = list
                .processes
                .iter()
                .map(|p| {
                    let mut v = json!({
                        "config": {"cmd": p.cmd, "args": p.args, "envs": {}, "cwd": p.cwd},
                        "pid": p.pid,
                    });
                    if !p.tag.is_empty() {
                        v["tag"] = Value::String(p.tag.clone());
                    }
                    v
                })
                .collect();
            Ok(ok_json(json!({ "processes": processes })))
        }
        "SendInput" => {
            let b: InputBody = message(headers, body, false)?;
            let (pid, tag) = b.process.unwrap_or_default().parts()?;
            // Input for a terminal goes to it whichever field carries it.
            let input = b.input.unwrap_or_default();
            let data = B64
                .decode(input.stdin.or(input.pty).unwrap_or_default())
                .map_err(|e| bad(format!("input: not base64: {e}")))?;
            st.table
                .send_input(SendInputRequest {
                    sandbox_id: id,
                    pid,
                    tag,
                    data: data.into(),
                })
                .await?;
            Ok(ok_json(json!({})))
        }
        "SendSignal" => {
            let b: SignalBody = message(headers, body, false)?;
            let (pid, tag) = b.process.unwrap_or_default().parts()?;
            let signal = signal_number(b.signal)?;
            st.table
                .signal_process(SignalProcessRequest {
                    sandbox_id: id,
                    pid,
                    tag,
                    signal,
                })
                .await?;
            Ok(ok_json(json!({})))
        }
        "CloseStdin" => {
            let b: SelectorBody = message(headers, body, false)?;
            let (pid, tag) = b.process.unwrap_or_default().parts()?;
            st.table
                .close_stdin(ProcessSelector {
                    sandbox_id: id,
                    pid,
                    tag,
                })
                .await?;
            Ok(ok_json(json!({})))
        }
        "Update" => {
            let b: UpdateBody = message(headers, body, false)?;
            let (pid, tag) = b.process.unwrap_or_default().parts()?;
            let size = pty_size(
                b.pty
                    .ok_or_else(|| bad("pty: missing; give size.cols and size.rows"))?,
            )?;
            st.table
                .resize_pty(ResizePtyRequest {
                    sandbox_id: id,
                    pid,
                    tag,
                    size: Some(size),
                })
                .await?;
            Ok(ok_json(json!({})))
        }
        "StreamInput" => Err(unimplemented("StreamInput (use SendInput)")),
        other => Err(ConnectError(
            Code::Unimplemented,
            format!("process.Process/{other} does not exist"),
        )),
    }
}

/// envd's `EntryInfo`.
pub fn entry_json(e: &EntryInfo) -> Value {
    let t = match e.r#type() {
        FileType::File => "FILE_TYPE_FILE",
        FileType::Directory => "FILE_TYPE_DIRECTORY",
        FileType::Symlink => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let mut v = json!({
        "name": e.name,
        "type": t,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode,
        "permissions": e.permissions,
        "owner": e.owner,
        "group": e.group,
        "modifiedTime": rfc3339((e.modified_unix_ns.max(0) / 1_000_000) as u64),
        "isSymlink": e.r#type() == FileType::Symlink,
    });
    if !e.symlink_target.is_empty() {
        v["symlinkTarget"] = Value::String(e.symlink_target.clone());
    }
    v
}

#[derive(Deserialize, Default)]
struct PathBody {
    #[serde(default)]
    path: String,
    #[serde(default)]
    depth: Option<u32>,
}

#[derive(Deserialize, Default)]
struct MoveBody {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

async fn filesystem(
    State(st): State<E2bState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == "WatchDir" {
        let keepalive = keepalive_of(&headers);
        let events = async {
            let id = check_sandbox(&st, &headers)?;
            let b: WatchBody = message(&headers, &body, true)?;
            let r = WatchDirRequest {
                sandbox_id: id,
                path: b.path,
                user: user_of(&headers)?,
                recursive: b.recursive,
            };
            Ok(st.table.watch_dir(r).await?)
        }
        .await;
        return stream_response(events, keepalive);
    }
    unary_fs(&st, &method, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize, Default)]
struct WatchBody {
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WatcherBody {
    #[serde(default)]
    watcher_id: String,
}

async fn unary_fs(
    st: &E2bState,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ConnectError> {
    let id = check_sandbox(st, headers)?;
    let user = user_of(headers)?;
    let path_req = |b: PathBody| PathRequest {
        sandbox_id: id.clone(),
        path: b.path,
        user: user.clone(),
    };
    match method {
        "Stat" => {
            let b: PathBody = message(headers, body, false)?;
            let e = st.table.stat(path_req(b)).await?;
            Ok(ok_json(json!({"entry": entry_json(&e)})))
        }
        "MakeDir" => {
            let b: PathBody = message(headers, body, false)?;
            let e = st.table.make_dir(path_req(b)).await?;
            Ok(ok_json(json!({"entry": entry_json(&e)})))
        }
        "Remove" => {
            let b: PathBody = message(headers, body, false)?;
            st.table.remove(path_req(b)).await?;
            Ok(ok_json(json!({})))
        }
        "ListDir" => {
            let b: PathBody = message(headers, body, false)?;
            let depth = b.depth.unwrap_or(1);
            let r = ListDirRequest {
                sandbox_id: id.clone(),
                path: b.path,
                user: user.clone(),
                depth,
            };
            let list = st.table.list_dir(r).await?;
            let entries: Vec<Value> = list.entries.iter().map(entry_json).collect();
            Ok(ok_json(json!({ "entries": entries })))
        }
        "Move" => {
            let b: MoveBody = message(headers, body, false)?;
            let e = st
                .table
                .rename(MoveRequest {
                    sandbox_id: id.clone(),
                    source: b.source,
                    destination: b.destination,
                    user: user.clone(),
                })
                .await?;
            Ok(ok_json(json!({"entry": entry_json(&e)})))
        }
        "CreateWatcher" => {
            let b: WatchBody = message(headers, body, false)?;
            let r = WatchDirRequest {
                sandbox_id: id.clone(),
                path: b.path,
                user: user.clone(),
                recursive: b.recursive,
            };
            let events = st.table.watch_dir(r).await?;
            let watcher = st.watchers.start(&id, events)?;
            Ok(ok_json(json!({ "watcherId": watcher })))
        }
        "GetWatcherEvents" => {
            let b: WatcherBody = message(headers, body, false)?;
            let events = st.watchers.take(&id, &b.watcher_id)?;
            let events: Vec<Value> = events.iter().map(fs_event_json).collect();
            Ok(ok_json(json!({ "events": events })))
        }
        "RemoveWatcher" => {
            let b: WatcherBody = message(headers, body, false)?;
            st.watchers.remove(&id, &b.watcher_id)?;
            Ok(ok_json(json!({})))
        }
        other => Err(ConnectError(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} does not exist"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neurovisor_proto::v1::ProcessEnd;

    #[test]
    fn envelopes_and_events_are_connect_json() {
        let e = envelope(2, &json!({}));
        assert_eq!(&e[..], &[2, 0, 0, 0, 2, b'{', b'}']);
        let end = ProcessEvent {
            event: Some(Event::End(ProcessEnd {
                exit_code: None,
                signal: Some(9),
                status: "signal: SIGKILL".into(),
                timed_out: false,
            })),
        };
        assert_eq!(
            event_json(&end).unwrap(),
            json!({"event": {"end": {"exitCode": -1, "exited": false, "status": "signal: SIGKILL"}}})
        );
        let out = ProcessEvent {
            event: Some(Event::Stdout(Bytes::from_static(b"hi\n"))),
        };
        assert_eq!(event_json(&out).unwrap()["event"]["data"]["stdout"], "aGkK");
    }

    #[test]
    fn requests_are_parsed_from_envelopes_and_checked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/connect+json".parse().unwrap());
        let body = envelope(0, &json!({"process": {"pid": 7}}));
        let b: SelectorBody = message(&h, &body, true).map_err(|e| e.1).unwrap();
        assert_eq!(
            b.process.unwrap().parts().map_err(|e| e.1).unwrap(),
            (7, String::new())
        );
        let e = message::<SelectorBody>(&h, &body[..3], true).err().unwrap();
        assert_eq!(e.0, Code::InvalidArgument);
        h.insert(header::CONTENT_TYPE, "application/proto".parse().unwrap());
        assert!(message::<SelectorBody>(&h, b"{}", false)
            .err()
            .unwrap()
            .1
            .contains("JSON codec"));
        assert_eq!(
            signal_number(Some(json!("SIGNAL_SIGKILL")))
                .map_err(|e| e.1)
                .unwrap(),
            9
        );
        assert!(signal_number(Some(json!("SIGNAL_SIGHUP"))).is_err());
    }
}
