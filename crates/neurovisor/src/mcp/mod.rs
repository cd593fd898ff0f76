//! The Model Context Protocol server: any MCP client (desktop agents, IDEs,
//! agent frameworks) can run code in NeuroVisor microVMs.
//!
//! One handler ([`NeuroVisorMcp`]) serves every MCP transport: stdio
//! (`neurovisor mcp`, executions through a running daemon or VMs booted
//! directly) and Streamable HTTP (`neurovisor serve --mcp-listen`, the
//! daemon's pool; see [`http`]). It speaks every protocol revision rmcp knows,
//! the stateless 2026-07-28 (`server/discover`, no session) as well as
//! 2025-11-25 clients (`initialize`).
//!
//! Its tools run on a [`CodeExecutor`], like the agent loop's, so a request
//! is validated the same way whatever the transport ([`ExecRequest::validate`],
//! where the executor runs it: before a VM is taken). Tools are data
//! ([`tools`]): adding one (sessions, later) is one more entry and one more
//! match arm in [`NeuroVisorMcp::call`], not a second server.
//!
//! Everything a model can get wrong (unknown language, empty code, limits, a
//! busy pool, a sandbox failure) comes back as a tool result with
//! `isError: true` and a message the model can act on, never as a protocol
//! error. Executions longer than a second report progress (bytes of output
//! so far); a cancelled call drops its execution, which destroys its VM.

pub mod desktop;
pub mod http;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, Tool, ToolAnnotations,
};
use rmcp::schemars::{self, JsonSchema};
use rmcp::service::RequestContext;
use rmcp::{RoleServer, ServerHandler};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agent::{CodeExecutor, Execution, ExecutorError, OutputProgress};
use crate::exec::{ExecRequest, DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::images::Language;

pub const TOOL_EXECUTE_CODE: &str = "execute_code";
pub const TOOL_LIST_LANGUAGES: &str = "list_languages";

/// Output kept per stream in a tool result, by default: what a model can use,
/// not a log file.
pub const DEFAULT_MAX_OUTPUT: u64 = 256 << 10;
/// How often a running execution reports progress (the first after this long).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("cannot learn the image's languages: {0}")]
    Languages(#[source] ExecutorError),
    #[error("MCP over stdio failed: {0}")]
    Stdio(String),
    #[error("cannot serve MCP on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Limits and facts the server applies and tells models about.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// `timeout_seconds` when a call gives none.
    pub default_timeout: Duration,
    /// Output kept per stream; beyond it the result is cut and flagged.
    pub max_output_bytes: u64,
    /// Guest memory of each VM, for the instructions.
    pub memory_mib: Option<u64>,
}

impl Default for McpSettings {
    fn default() -> Self {
        Self {
            default_timeout: DEFAULT_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
            memory_mib: None,
        }
    }
}

/// `execute_code`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteCodeArgs {
    /// The language to run, one of list_languages' names.
    pub language: String,
    /// The whole program, as the contents of one source file (e.g. main.py).
    pub code: String,
    /// Wall-clock limit in seconds; the program and all its children are killed at it.
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u64>,
    /// Text given to the program on standard input.
    pub stdin: Option<String>,
    /// Environment variables for the program.
    pub env: Option<BTreeMap<String, String>>,
}

/// `execute_code`'s structured result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ExecuteCodeResult {
    /// Standard output (UTF-8; invalid bytes replaced), at most the server's cap.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// The exit code, when the program exited by itself (null if killed by a signal).
    pub exit_code: Option<i32>,
    /// The signal that killed the program, if one did.
    pub signal: Option<i32>,
    /// The program hit its time limit and was killed.
    pub timed_out: bool,
    /// The VM ran out of memory while the program ran.
    pub oom_killed: bool,
    /// stdout was longer than the cap and was cut.
    pub stdout_truncated: bool,
    /// stderr was longer than the cap and was cut.
    pub stderr_truncated: bool,
    /// Bytes the program wrote to stdout (also those cut).
    pub stdout_bytes: u64,
    /// Bytes the program wrote to stderr (also those cut).
    pub stderr_bytes: u64,
    /// The program's run time in milliseconds.
    pub duration_ms: f64,
    /// The microVM that ran it (destroyed since).
    pub vm_id: String,
    /// The interpreter was started before the call (false: started for it).
    pub warm_interpreter: bool,
    /// The trace id of this execution (UUIDv7), also the program's NEUROVISOR_TRACE_ID.
    pub trace_id: String,
}

/// `list_languages`' structured result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ListLanguagesResult {
    pub languages: Vec<LanguageInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LanguageInfo {
    /// The name execute_code takes.
    pub name: String,
    /// The interpreter's or compiler's version.
    pub version: String,
}

/// No arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// The MCP server's handler; cheap to clone (one per HTTP request or session).
#[derive(Clone)]
pub struct NeuroVisorMcp {
    inner: Arc<Inner>,
}

struct Inner {
    executor: Arc<dyn CodeExecutor>,
    languages: Vec<Language>,
    settings: McpSettings,
    tools: Vec<Tool>,
    instructions: String,
    /// The desktop tools' sandboxes (the daemon's; none without one).
    desktops: Option<Arc<dyn desktop::DesktopHost>>,
}

impl NeuroVisorMcp {
    /// Asks `executor` once for the image's languages (they go into the tool
    /// schema and the instructions).
    pub async fn new(executor: Arc<dyn CodeExecutor>, settings: McpSettings) -> Result<Self, McpError> {
        let languages = executor.languages().await.map_err(McpError::Languages)?;
        Ok(Self::with_languages(executor, languages, settings))
    }

    pub fn with_languages(
        executor: Arc<dyn CodeExecutor>,
        languages: Vec<Language>,
        settings: McpSettings,
    ) -> Self {
        let tools = tools(&languages);
        let instructions = instructions(&languages, &settings);
        Self {
            inner: Arc::new(Inner {
                executor,
                languages,
                settings,
                tools,
                instructions,
                desktops: None,
            }),
        }
    }

    /// Adds the desktop tools, acting on `host`'s sandboxes.
    pub fn with_desktops(self, host: Arc<dyn desktop::DesktopHost>) -> Self {
        let i = &self.inner;
        let mut tools = i.tools.clone();
        tools.extend(desktop::tools());
        Self {
            inner: Arc::new(Inner {
                executor: i.executor.clone(),
                languages: i.languages.clone(),
                settings: i.settings.clone(),
                tools,
                instructions: format!(
                    "{} Desktop sandboxes (desktop_create, then desktop_screenshot and desktop_action, \
                     finally desktop_kill) keep a desktop with a terminal and Chromium between calls.",
                    i.instructions
                ),
                desktops: Some(host),
            }),
        }
    }

    pub fn tools(&self) -> &[Tool] {
        &self.inner.tools
    }

    /// Runs one tool call. `Err` only for an unknown tool (a protocol error,
    /// as the MCP spec wants); everything else is a result.
    async fn call(
        &self,
        request: CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let args = Value::Object(request.arguments.unwrap_or_default());
        match request.name.as_ref() {
            TOOL_LIST_LANGUAGES => Ok(match serde_json::from_value::<NoArgs>(args) {
                Ok(_) => self.list_languages(),
                Err(e) => error_result(format!("invalid arguments for list_languages: {e}; it takes none")),
            }),
            TOOL_EXECUTE_CODE => Ok(match serde_json::from_value::<ExecuteCodeArgs>(args) {
                Ok(a) => self.execute_code(a, ctx).await,
                Err(e) => error_result(format!(
                    "invalid arguments for execute_code: {e}; it takes language (string), code (string) and optionally timeout_seconds (integer), stdin (string), env (object of strings)"
                )),
            }),
            other => {
                if let Some(host) = &self.inner.desktops {
                    if let Some(r) = desktop::call(host.as_ref(), other, args).await {
                        return Ok(r);
                    }
                }
                Err(ErrorData::invalid_params(
                format!(
                    "unknown tool '{}'; the tools are {TOOL_EXECUTE_CODE} and {TOOL_LIST_LANGUAGES}",
                    crate::channel::sanitize_guest_text(other)
                ),
                None,
            ))
            }
        }
    }

    fn list_languages(&self) -> CallToolResult {
        let langs: Vec<LanguageInfo> = self
            .inner
            .languages
            .iter()
            .map(|l| LanguageInfo {
                name: l.name.clone(),
                version: l.version.clone(),
            })
            .collect();
        let text = langs
            .iter()
            .map(|l| format!("{} {}", l.name, l.version))
            .collect::<Vec<_>>()
            .join("\n");
        structured_result(text, &ListLanguagesResult { languages: langs })
    }

    async fn execute_code(&self, a: ExecuteCodeArgs, ctx: &RequestContext<RoleServer>) -> CallToolResult {
        let req = self.request(a);
        let progress = OutputProgress::default();
        let token = ctx.meta.get_progress_token();
        let run = self.inner.executor.execute(&req, &progress);
        tokio::pin!(run);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut reported = 0;
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                // Dropping `run` destroys the VM at once.
                () = ctx.ct.cancelled() => {
                    tracing::info!(trace_id = %req.trace_id, "MCP call cancelled; its VM is destroyed");
                    return error_result("the call was cancelled; its VM was destroyed".into());
                }
                _ = tick.tick(), if token.is_some() => {
                    // The spec wants progress to increase with every notification.
                    let bytes = progress.bytes();
                    if let (Some(token), true) = (&token, bytes > reported) {
                        reported = bytes;
                        let msg = format!(
                            "running for {:.0} s, {bytes} bytes of output so far",
                            started.elapsed().as_secs_f64()
                        );
                        let p = ProgressNotificationParam::new(token.clone(), bytes as f64).with_message(msg);
                        if let Err(e) = ctx.peer.notify_progress(p).await {
                            tracing::debug!("progress notification not sent: {e}");
                        }
                    }
                }
            }
        };
        match result {
            Ok(exec) => execution_result(exec),
            Err(e) if e.is_invalid_request() => error_result(format!("invalid request: {e}")),
            Err(e @ ExecutorError::Pool(_)) => error_result(format!("no VM for this call: {e}")),
            Err(e) => {
                tracing::warn!(trace_id = %req.trace_id, "sandbox failure in an MCP call: {e}");
                error_result(format!(
                    "the sandbox failed (not your program); retrying may help: {e}"
                ))
            }
        }
    }

    /// The one request type every transport builds; the executor validates it.
    fn request(&self, a: ExecuteCodeArgs) -> ExecRequest {
        let mut req = ExecRequest::new(a.language, a.code);
        // Out-of-range values are kept, so that validation names them.
        req.timeout = a
            .timeout_seconds
            .map_or(self.inner.settings.default_timeout, Duration::from_secs);
        req.stdin = a.stdin.map(String::into_bytes).unwrap_or_default();
        req.env = a.env.unwrap_or_default();
        req.max_output_bytes = self.inner.settings.max_output_bytes;
        req
    }
}

fn structured_result<T: Serialize>(text: String, value: &T) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = serde_json::to_value(value).ok();
    r
}

fn error_result(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

fn execution_result(exec: Execution) -> CallToolResult {
    let o = exec.outcome;
    let r = ExecuteCodeResult {
        stdout: String::from_utf8_lossy(&exec.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&exec.stderr).into_owned(),
        exit_code: o.exit_code,
        signal: o.signal,
        timed_out: o.timed_out,
        oom_killed: o.oom_killed,
        stdout_truncated: o.stdout_truncated,
        stderr_truncated: o.stderr_truncated,
        stdout_bytes: o.stdout_bytes,
        stderr_bytes: o.stderr_bytes,
        duration_ms: o.duration_ms,
        vm_id: o.vm_id,
        warm_interpreter: o.warm_interpreter,
        trace_id: o.trace_id,
    };
    structured_result(render(&r), &r)
}

/// The text rendering of a result, for clients that show only text.
fn render(r: &ExecuteCodeResult) -> String {
    let status = match (r.exit_code, r.signal) {
        _ if r.timed_out => "timed out (killed)".to_string(),
        _ if r.oom_killed => "out of memory (killed)".to_string(),
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "no exit status".to_string(),
    };
    let mut s = format!("{status}, {:.0} ms\n", r.duration_ms);
    for (name, text, cut) in [
        ("stdout", &r.stdout, r.stdout_truncated),
        ("stderr", &r.stderr, r.stderr_truncated),
    ] {
        if text.is_empty() && !cut {
            continue;
        }
        s.push_str(&format!("--- {name} ---\n{text}"));
        if !text.ends_with('\n') {
            s.push('\n');
        }
        if cut {
            s.push_str(&format!("[{name} cut at the output limit]\n"));
        }
    }
    s
}

fn schema<T: JsonSchema>() -> Arc<JsonObject> {
    let settings = schemars::generate::SchemaSettings::draft2020_12();
    let v = serde_json::to_value(settings.into_generator().into_root_schema_for::<T>()).unwrap_or_default();
    match v {
        Value::Object(m) => Arc::new(m),
        _ => Arc::new(JsonObject::new()),
    }
}

/// The tools, with their schemas and annotations; `language` is an enum of
/// the image's languages.
pub fn tools(languages: &[Language]) -> Vec<Tool> {
    let mut exec_input = schema::<ExecuteCodeArgs>();
    if !languages.is_empty() {
        let names: Vec<Value> = languages.iter().map(|l| json!(l.name)).collect();
        if let Some(Value::Object(lang)) = Arc::make_mut(&mut exec_input)
            .get_mut("properties")
            .and_then(|p| p.get_mut("language"))
        {
            lang.insert("enum".into(), Value::Array(names));
        }
    }
    let names = languages
        .iter()
        .map(|l| l.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        Tool::new(
            TOOL_EXECUTE_CODE,
            format!(
                "Run a program in a fresh, isolated microVM and return its stdout, stderr and exit status. \
                 The VM has no network and is destroyed after the call: nothing (files, installed packages, \
                 processes) carries over to the next call. Languages: {names}."
            ),
            exec_input,
        )
        .with_title("Run code in a microVM")
        .with_raw_output_schema(schema::<ExecuteCodeResult>())
        .with_annotations(
            ToolAnnotations::with_title("Run code in a microVM")
                .read_only(false)
                .destructive(false)
                .idempotent(false)
                // Closed world: the VM reaches nothing outside itself.
                .open_world(false),
        ),
        Tool::new(
            TOOL_LIST_LANGUAGES,
            "List the languages (and their versions) execute_code can run.",
            schema::<NoArgs>(),
        )
        .with_title("List languages")
        .with_raw_output_schema(schema::<ListLanguagesResult>())
        .with_annotations(
            ToolAnnotations::with_title("List languages")
                .read_only(true)
                .destructive(false)
                .idempotent(true)
                .open_world(false),
        ),
    ]
}

/// What a model is told about the sandbox.
fn instructions(languages: &[Language], s: &McpSettings) -> String {
    let langs = languages
        .iter()
        .map(|l| format!("{} {}", l.name, l.version))
        .collect::<Vec<_>>()
        .join(", ");
    let memory = s
        .memory_mib
        .map(|m| format!(" and {m} MiB of memory"))
        .unwrap_or_default();
    format!(
        "NeuroVisor runs code in microVMs. Each execute_code call gets a fresh VM that is destroyed afterwards: \
         files, installed packages and processes do not carry over between calls, so send each program whole. \
         The VM has no network access. Limits per call: timeout_seconds defaults to {} s (at most {} s; the \
         program and its children are killed at the limit){memory}; at most {} KiB of stdout and of stderr are \
         returned (the rest is cut and flagged). A non-zero exit code is the program's result, not a tool \
         error. Languages: {langs}.",
        s.default_timeout.as_secs(),
        MAX_TIMEOUT.as_secs(),
        s.max_output_bytes / 1024,
    )
}

impl ServerHandler for NeuroVisorMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("neurovisor", env!("CARGO_PKG_VERSION")).with_title("NeuroVisor"),
            )
            .with_instructions(self.inner.instructions.clone())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.inner.tools.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.inner.tools.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.call(request, &context).await.map(Into::into)
    }
}

/// Serves MCP on this process's stdin/stdout until the client closes stdin
/// or `shutdown` resolves; in-flight executions are dropped (their VMs
/// destroyed) before it returns.
pub async fn serve_stdio(
    server: NeuroVisorMcp,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), McpError> {
    use rmcp::ServiceExt;
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| McpError::Stdio(e.to_string()))?;
    let stop = running.cancellation_token();
    let waiting = running.waiting();
    tokio::pin!(waiting);
    tokio::select! {
        r = &mut waiting => {
            r.map_err(|e| McpError::Stdio(e.to_string()))?;
        }
        () = shutdown => {
            stop.cancel();
            let _ = waiting.await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn langs() -> Vec<Language> {
        vec![
            Language {
                name: "python".into(),
                version: "3.11".into(),
            },
            Language {
                name: "bash".into(),
                version: "5.2".into(),
            },
        ]
    }

    #[test]
    fn schemas_name_the_fields_and_the_languages() {
        let t = tools(&langs());
        let exec = &t[0];
        let props = &exec.input_schema["properties"];
        assert_eq!(props["language"]["enum"], json!(["python", "bash"]));
        assert_eq!(exec.input_schema["required"], json!(["language", "code"]));
        assert_eq!(props["timeout_seconds"]["maximum"], json!(3600));
        let out = exec.output_schema.as_ref().expect("output schema");
        assert_eq!(out["type"], json!("object"));
        assert!(out["properties"]["exit_code"].is_object());
        let ann = exec.annotations.as_ref().expect("annotations");
        assert_eq!(ann.read_only_hint, Some(false));
        assert_eq!(ann.destructive_hint, Some(false));
        assert_eq!(ann.open_world_hint, Some(false));
        assert_eq!(
            t[1].annotations.as_ref().and_then(|a| a.read_only_hint),
            Some(true)
        );
    }

    #[test]
    fn the_text_rendering_says_how_it_ended_and_what_was_cut() {
        let r = ExecuteCodeResult {
            stdout: "42".into(),
            stderr: String::new(),
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            oom_killed: false,
            stdout_truncated: true,
            stderr_truncated: false,
            stdout_bytes: 9000,
            stderr_bytes: 0,
            duration_ms: 12.0,
            vm_id: "vm".into(),
            warm_interpreter: false,
            trace_id: "t".into(),
        };
        let s = render(&r);
        assert!(s.starts_with("exit code 3, 12 ms\n--- stdout ---\n42\n"), "{s}");
        assert!(s.contains("[stdout cut at the output limit]"), "{s}");
        assert!(!s.contains("stderr"), "{s}");
    }

    #[test]
    fn instructions_tell_a_model_what_the_sandbox_is() {
        let s = instructions(&langs(), &McpSettings::default());
        for needle in [
            "fresh VM",
            "no network",
            "30 s",
            "256 KiB",
            "python 3.11",
            "bash 5.2",
        ] {
            assert!(s.contains(needle), "{needle} missing in {s}");
        }
    }
}
