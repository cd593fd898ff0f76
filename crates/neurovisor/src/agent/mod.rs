//! Agent mode: an LLM solves a task by writing code that runs in microVMs.
//!
//! [`AgentController::run`] is one session: a UUIDv7 trace id (also the
//! guest's `NEUROVISOR_TRACE_ID`), the tools `execute_code(language, code)` and
//! `list_languages`, and a multi-turn context in which every tool result (stdout,
//! stderr, exit code, truncation, timeout) goes back to the model as a `tool`
//! message, until the model answers in plain text or `max_iterations` turns
//! have passed. Tool calls come natively or written in the text
//! ([`toolcall`]). Whatever goes wrong with a tool call (unknown language,
//! malformed arguments, a timeout, a sandbox failure) becomes a tool result the
//! model can react to; only LLM failures end a session early.
//!
//! Everything that happens is an [`AgentEvent`] sent to a sink as it happens
//! (text deltas included), so the CLI and the gRPC `Agent/RunTask` stream
//! render the same session; the [`AgentReport`] is the whole transcript.

pub mod executor;
pub mod toolcall;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

pub use executor::{
    CodeExecutor, DaemonExecutor, Execution, ExecutorError, OutputProgress, PoolExecutor, SandboxExecutor,
};
pub use toolcall::{parse_text_calls, strip_think, CallSource};

use crate::exec::ExecRequest;
use crate::images::Language;
use crate::llm::{ChatMessage, ChatRequest, LlmClient, LlmError, Provider, ToolCall, ToolSpec};
use crate::metrics::{Label, Metrics, ModelLabel, StatusLabel, TraceLabel};
use tracing::Instrument;

pub const DEFAULT_MAX_ITERATIONS: u32 = 10;
/// The most iterations a session may be given.
pub const MAX_ITERATIONS_LIMIT: u32 = 100;
pub const TOOL_EXECUTE_CODE: &str = "execute_code";
pub const TOOL_LIST_LANGUAGES: &str = "list_languages";
const TOOLS: &[&str] = &[TOOL_EXECUTE_CODE, TOOL_LIST_LANGUAGES];

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// LLM turns per task.
    pub max_iterations: u32,
    /// Wall-clock limit of each program.
    pub exec_timeout: Duration,
    /// Output cap per stream in the guest.
    pub max_output_bytes: u64,
    /// Characters of each output stream sent back to the model (head and tail
    /// are kept, the middle is cut and flagged).
    pub result_chars: usize,
    /// Tool calls run per model turn; the rest of that turn's calls get an
    /// error result (each VM costs a boot: a model must not fan out freely).
    pub max_tool_calls_per_turn: u32,
    /// Tool calls run per task; the task stops after the turn that reaches it.
    pub max_tool_calls: u32,
    /// Environment of every program the model runs (a profile's `env`).
    pub env: std::collections::BTreeMap<String, String>,
    /// What the system prompt adds after its own rules: a profile's role and
    /// prompt presets.
    pub instructions: Option<String>,
}

pub const DEFAULT_MAX_TOOL_CALLS_PER_TURN: u32 = 8;
pub const DEFAULT_MAX_TOOL_CALLS: u32 = 50;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            max_iterations: DEFAULT_MAX_ITERATIONS,
            exec_timeout: Duration::from_secs(30),
            max_output_bytes: 256 << 10,
            result_chars: 8000,
            max_tool_calls_per_turn: DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            max_tool_calls: DEFAULT_MAX_TOOL_CALLS,
            env: Default::default(),
            instructions: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model gave a final answer.
    Answer,
    /// `max_iterations` turns passed without a final answer.
    MaxIterations,
    /// The LLM server could not be used.
    LlmError,
    /// The model made more tool calls than a task may.
    ToolCallLimit,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answer => "answer",
            Self::MaxIterations => "max_iterations",
            Self::LlmError => "llm_error",
            Self::ToolCallLimit => "tool_call_limit",
        }
    }
}

/// One tool call as the model made it.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallRecord {
    pub id: String,
    pub name: String,
    /// The arguments' JSON text as the model wrote it.
    pub arguments: String,
    pub source: CallSource,
    /// `execute_code`'s arguments, when readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// Why a tool call produced no execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolErrorKind {
    UnknownTool,
    InvalidArguments,
    /// The sandbox refused the request (unknown language, code too large...).
    InvalidRequest,
    /// The sandbox itself failed (VM did not boot, pool exhausted...).
    Sandbox,
    /// Not run: over the cap of tool calls per turn or per task.
    Limit,
}

/// What a tool call gave back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ToolResultRecord {
    pub id: String,
    pub name: String,
    /// The tool did its job (for `execute_code`: the program ran, whatever its exit code).
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ToolErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The program's run time (guest-measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// How long the VM took to boot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<f64>,
    /// Time until a VM was there for this call (pool acquisition or boot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<f64>,
    /// The VM came pre-booted from the daemon's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub languages: Option<Vec<Language>>,
    /// Exactly what the model was sent.
    pub content: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentStats {
    pub iterations: u32,
    pub tool_calls: u32,
    pub executions: u32,
    /// Time the server spent loading the model (Ollama reports it).
    pub model_load_ms: Option<f64>,
    /// Time spent waiting for the model.
    pub llm_ms: f64,
    /// Time spent in tool calls (VMs included).
    pub tools_ms: f64,
    pub total_ms: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Everything that happens in a session, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentEvent {
    Started {
        task: String,
        trace_id: String,
        provider: Provider,
        model: String,
        max_iterations: u32,
    },
    /// An LLM call begins.
    Iteration {
        iteration: u32,
        model: String,
    },
    /// A piece of the model's text, as it arrives.
    TextDelta {
        iteration: u32,
        text: String,
    },
    ToolCall {
        iteration: u32,
        call: ToolCallRecord,
    },
    ToolResult {
        iteration: u32,
        result: ToolResultRecord,
    },
    /// The final answer (`<think>` blocks removed).
    Answer {
        text: String,
    },
    Stopped {
        reason: StopReason,
        message: String,
    },
    Stats {
        stats: AgentStats,
    },
}

/// A call and its result.
#[derive(Debug, Clone, Serialize)]
pub struct ToolExchange {
    pub call: ToolCallRecord,
    pub result: ToolResultRecord,
}

/// One LLM turn of the transcript.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub iteration: u32,
    /// The model's whole text in this turn.
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_load_ms: Option<f64>,
    pub llm_ms: f64,
    pub tool_calls: Vec<ToolExchange>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Llm(#[from] LlmError),
}

#[derive(Debug)]
pub enum AgentOutcome {
    Answered(String),
    MaxIterations,
    /// Stopped after the turn that reached `max_tool_calls`.
    ToolCallLimit,
    Failed(AgentError),
}

/// A finished session: the outcome and the whole transcript.
#[derive(Debug)]
pub struct AgentReport {
    pub task: String,
    pub trace_id: String,
    pub provider: Provider,
    pub model: String,
    pub max_iterations: u32,
    pub max_tool_calls: u32,
    pub outcome: AgentOutcome,
    pub turns: Vec<Turn>,
    pub stats: AgentStats,
}

impl AgentReport {
    pub fn answer(&self) -> Option<&str> {
        match &self.outcome {
            AgentOutcome::Answered(a) => Some(a),
            _ => None,
        }
    }

    pub fn stop_reason(&self) -> StopReason {
        match self.outcome {
            AgentOutcome::Answered(_) => StopReason::Answer,
            AgentOutcome::MaxIterations => StopReason::MaxIterations,
            AgentOutcome::ToolCallLimit => StopReason::ToolCallLimit,
            AgentOutcome::Failed(_) => StopReason::LlmError,
        }
    }

    /// The transcript and stats as one JSON document.
    pub fn to_json(&self) -> Value {
        let error = match &self.outcome {
            AgentOutcome::Failed(AgentError::Llm(e)) => json!({"kind": e.kind(), "message": e.to_string()}),
            AgentOutcome::MaxIterations => json!({
                "kind": "max_iterations",
                "message": max_iterations_message(self.max_iterations),
            }),
            AgentOutcome::ToolCallLimit => json!({
                "kind": "tool_call_limit",
                "message": tool_call_limit_message(self.max_tool_calls),
            }),
            AgentOutcome::Answered(_) => Value::Null,
        };
        json!({
            "ok": matches!(self.outcome, AgentOutcome::Answered(_)),
            "task": self.task,
            "trace_id": self.trace_id,
            "llm": self.provider,
            "model": self.model,
            "max_iterations": self.max_iterations,
            "stop_reason": self.stop_reason(),
            "answer": self.answer(),
            "error": error,
            "turns": self.turns,
            "stats": self.stats,
        })
    }
}

pub fn tool_call_limit_message(n: u32) -> String {
    format!("stopped after {n} tool calls, the most a task may make (raise --max-tool-calls)")
}

pub fn max_iterations_message(n: u32) -> String {
    format!("no final answer after {n} iterations: the model kept calling tools (raise --max-iterations)")
}

fn failed(mut r: ToolResultRecord, kind: ToolErrorKind, msg: String) -> ToolResultRecord {
    r.content = json!({"error": msg, "error_kind": kind}).to_string();
    r.error = Some(msg);
    r.error_kind = Some(kind);
    r
}

/// The result of a call that was not run.
fn refused(call: &ToolCall, kind: ToolErrorKind, msg: String) -> ToolResultRecord {
    let r = ToolResultRecord {
        id: call.id.clone(),
        name: call.name.clone(),
        ..Default::default()
    };
    failed(r, kind, msg)
}

/// Runs sessions: one LLM, one place to execute code.
pub struct AgentController {
    llm: Arc<dyn LlmClient>,
    executor: Arc<dyn CodeExecutor>,
    cfg: AgentConfig,
    metrics: Option<Arc<Metrics>>,
}

/// Keeps the head and the tail of `s` within `max` characters.
fn clip_middle(s: &str, max: usize) -> (String, bool) {
    let n = s.chars().count();
    if n <= max {
        return (s.to_string(), false);
    }
    let head_n = max * 2 / 3;
    let tail_n = max - head_n;
    let head: String = s.chars().take(head_n).collect();
    let tail: String = s.chars().skip(n - tail_n).collect();
    (
        format!("{head}\n[... {} characters cut ...]\n{tail}", n - head_n - tail_n),
        true,
    )
}

/// Common names models use for a language.
fn canonical_language(lang: &str, languages: &[Language]) -> String {
    let l = lang.trim().to_ascii_lowercase();
    let alias = match l.as_str() {
        "py" | "python3" => "python",
        "js" | "node" | "nodejs" => "javascript",
        "sh" | "shell" => "bash",
        "golang" => "go",
        "rs" => "rust",
        other => other,
    };
    if languages.iter().any(|x| x.name == alias) {
        alias.to_string()
    } else {
        l
    }
}

struct Session<'a> {
    trace_id: String,
    languages: Vec<Language>,
    stats: AgentStats,
    sink: &'a mut (dyn FnMut(&AgentEvent) + Send),
}

impl Session<'_> {
    fn emit(&mut self, ev: AgentEvent) {
        (self.sink)(&ev);
    }
}

impl AgentController {
    pub fn new(llm: Arc<dyn LlmClient>, executor: Arc<dyn CodeExecutor>, cfg: AgentConfig) -> Self {
        Self {
            llm,
            executor,
            cfg,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn llm(&self) -> &dyn LlmClient {
        self.llm.as_ref()
    }

    fn tools(&self, languages: &[Language]) -> Vec<ToolSpec> {
        let mut language = json!({
            "type": "string",
            "description": "The programming language of the code.",
        });
        if !languages.is_empty() {
            language["enum"] = languages.iter().map(|l| l.name.clone()).collect();
        }
        vec![
            ToolSpec {
                name: TOOL_EXECUTE_CODE.into(),
                description: format!(
                    "Run a program in a fresh, isolated microVM and get its stdout, stderr and exit code. \
                     No network; nothing is kept between calls; time limit {} s. Print what you need to see.",
                    self.cfg.exec_timeout.as_secs().max(1)
                ),
                parameters: json!({
                    "type": "object",
                    "properties": {
                        "language": language,
                        "code": {"type": "string", "description": "The complete program."},
                    },
                    "required": ["language", "code"],
                }),
            },
            ToolSpec {
                name: TOOL_LIST_LANGUAGES.into(),
                description: "List the programming languages (and versions) execute_code can run.".into(),
                parameters: json!({"type": "object", "properties": {}}),
            },
        ]
    }

    fn system_prompt(&self, languages: &[Language]) -> String {
        let base = self.base_system_prompt(languages);
        match &self.cfg.instructions {
            Some(extra) => format!("{base}\n\n{extra}"),
            None => base,
        }
    }

    fn base_system_prompt(&self, languages: &[Language]) -> String {
        let langs = if languages.is_empty() {
            "call list_languages to see them".to_string()
        } else {
            languages
                .iter()
                .map(|l| format!("{} {}", l.name, l.version))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "You are a coding agent. Solve the user's task by writing programs and running them with the \
             execute_code tool. Each call runs in a fresh, isolated microVM: no network, no files kept between \
             calls, a time limit of {timeout} s. Languages: {langs}.\n\
             The tool answers with JSON: exit_code, stdout, stderr, and flags for timeouts and truncated output. \
             Print the values you need. If a program fails, read its stderr, fix the code and run it again.\n\
             When you know the answer, reply with the final answer in plain text without calling a tool.\n\
             If you cannot call tools natively, write one call as \
             <tool_call>{{\"name\": \"execute_code\", \"arguments\": {{\"language\": \"python\", \"code\": \"print(1)\"}}}}</tool_call>",
            timeout = self.cfg.exec_timeout.as_secs().max(1),
        )
    }

    /// Runs one task to its end. `trace_id`: the session's id (a new UUIDv7
    /// when `None`). Events go to `sink` as they happen.
    pub async fn run(
        &self,
        task: &str,
        trace_id: Option<String>,
        sink: &mut (dyn FnMut(&AgentEvent) + Send),
    ) -> AgentReport {
        let trace_id = trace_id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        // The task's span: the trace's root for a CLI task, a child of the
        // request's span in the daemon.
        let span = tracing::info_span!(
            "agent.task",
            %trace_id,
            model = self.llm.model(),
            iterations = tracing::field::Empty,
            stop = tracing::field::Empty,
        );
        crate::telemetry::start_trace(&span, &trace_id);
        let report = self.run_task(task, trace_id, sink).instrument(span.clone()).await;
        span.record("iterations", report.stats.iterations);
        span.record("stop", report.stop_reason().as_str());
        report
    }

    async fn run_task(
        &self,
        task: &str,
        trace_id: String,
        sink: &mut (dyn FnMut(&AgentEvent) + Send),
    ) -> AgentReport {
        let started = Instant::now();
        let model = self.llm.model().to_string();
        let provider = self.llm.provider();
        let max_iterations = self.cfg.max_iterations.clamp(1, MAX_ITERATIONS_LIMIT);
        tracing::info!(%trace_id, %provider, %model, "agent task started");
        sink(&AgentEvent::Started {
            task: task.to_string(),
            trace_id: trace_id.clone(),
            provider,
            model: model.clone(),
            max_iterations,
        });
        let languages = match self.executor.languages().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%trace_id, "cannot list the sandbox's languages: {e}");
                Vec::new()
            }
        };
        let tools = self.tools(&languages);
        let mut messages = vec![
            ChatMessage::system(self.system_prompt(&languages)),
            ChatMessage::user(task),
        ];
        let mut s = Session {
            trace_id: trace_id.clone(),
            languages,
            stats: AgentStats::default(),
            sink,
        };
        let mut turns = Vec::new();
        let mut outcome = AgentOutcome::MaxIterations;
        let mut call_seq = 0u32;

        for iteration in 1..=max_iterations {
            s.stats.iterations = iteration;
            s.emit(AgentEvent::Iteration {
                iteration,
                model: model.clone(),
            });
            let llm_started = Instant::now();
            let llm_span = tracing::info_span!(
                "llm.call",
                model = %model,
                %provider,
                iteration,
                prompt_tokens = tracing::field::Empty,
                completion_tokens = tracing::field::Empty,
            );
            let result = {
                let sink = &mut *s.sink;
                let mut on_text = |t: &str| {
                    sink(&AgentEvent::TextDelta {
                        iteration,
                        text: t.to_string(),
                    })
                };
                self.llm
                    .chat(
                        ChatRequest {
                            messages: &messages,
                            tools: &tools,
                            trace_id: Some(&trace_id),
                        },
                        &mut on_text,
                    )
                    .instrument(llm_span.clone())
                    .await
            };
            let llm_time = llm_started.elapsed();
            s.stats.llm_ms += ms(llm_time);
            if let Some(m) = &self.metrics {
                if result.is_ok() {
                    m.allow_model(&model);
                }
                m.llm_call_duration_seconds
                    .get_or_create(&ModelLabel {
                        model: m.model(&model),
                    })
                    .observe(llm_time.as_secs_f64(), TraceLabel::of(&trace_id));
            }
            let turn = match result {
                Ok(t) => t,
                Err(e) => {
                    // The caller reports it (one line for the user); logged at info.
                    tracing::info!(%trace_id, iteration, "LLM call failed: {e}");
                    s.emit(AgentEvent::Stopped {
                        reason: StopReason::LlmError,
                        message: e.to_string(),
                    });
                    outcome = AgentOutcome::Failed(e.into());
                    break;
                }
            };
            let load_ms = turn.model_load.filter(|d| !d.is_zero()).map(ms);
            if let Some(load) = turn.model_load.filter(|d| !d.is_zero()) {
                *s.stats.model_load_ms.get_or_insert(0.0) += ms(load);
                if let Some(m) = &self.metrics {
                    m.model_load_duration_seconds
                        .get_or_create(&ModelLabel {
                            model: m.model(&model),
                        })
                        .observe(load.as_secs_f64());
                }
            }
            s.stats.prompt_tokens += turn.prompt_tokens.unwrap_or(0);
            s.stats.completion_tokens += turn.completion_tokens.unwrap_or(0);
            if let Some(t) = turn.prompt_tokens {
                llm_span.record("prompt_tokens", t);
            }
            if let Some(t) = turn.completion_tokens {
                llm_span.record("completion_tokens", t);
                if let Some(m) = &self.metrics {
                    m.tokens_generated
                        .get_or_create(&ModelLabel {
                            model: m.model(&model),
                        })
                        .inc_by(t);
                }
            }

            // Native calls first; otherwise calls written in the text.
            let mut calls: Vec<(ToolCall, CallSource, Option<String>)> = Vec::new();
            for c in turn.tool_calls {
                calls.push((c, CallSource::Native, None));
            }
            if calls.is_empty() {
                for c in parse_text_calls(&turn.content, TOOLS) {
                    call_seq += 1;
                    calls.push((
                        ToolCall {
                            id: format!("call_text_{call_seq}"),
                            name: c.name,
                            arguments: c.arguments,
                        },
                        c.source,
                        c.error,
                    ));
                }
            }
            let mut record = Turn {
                iteration,
                text: turn.content.clone(),
                model_load_ms: load_ms,
                llm_ms: ms(llm_time),
                tool_calls: Vec::new(),
            };
            if calls.is_empty() {
                let answer = strip_think(&turn.content).trim().to_string();
                tracing::info!(%trace_id, iteration, "agent answered");
                s.emit(AgentEvent::Answer { text: answer.clone() });
                turns.push(record);
                outcome = AgentOutcome::Answered(answer);
                break;
            }
            messages.push(ChatMessage::assistant(
                turn.content.clone(),
                calls.iter().map(|(c, _, _)| c.clone()).collect(),
            ));
            let per_turn = self.cfg.max_tool_calls_per_turn.max(1) as usize;
            let per_task = self.cfg.max_tool_calls.max(1);
            let mut task_cap_reached = false;
            for (i, (call, source, parse_error)) in calls.into_iter().enumerate() {
                let limit = if s.stats.tool_calls >= per_task {
                    task_cap_reached = true;
                    Some(format!("not run: this task has made {per_task} tool calls, the most it may; give your final answer now"))
                } else if i >= per_turn {
                    Some(format!("not run: at most {per_turn} tool calls are run per turn; make fewer calls, one after another"))
                } else {
                    s.stats.tool_calls += 1;
                    None
                };
                let mut rec = ToolCallRecord {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                    source,
                    language: None,
                    code: None,
                };
                if let Ok(args) = call.arguments_object() {
                    rec.language = args.get("language").and_then(Value::as_str).map(str::to_string);
                    rec.code = args.get("code").and_then(Value::as_str).map(str::to_string);
                }
                s.emit(AgentEvent::ToolCall {
                    iteration,
                    call: rec.clone(),
                });
                let tool_started = Instant::now();
                if let Some(m) = &self.metrics {
                    let tool = if TOOLS.contains(&call.name.as_str()) {
                        call.name.as_str()
                    } else {
                        crate::metrics::OTHER
                    };
                    m.agent_tool_calls
                        .get_or_create(&crate::metrics::ToolLabel {
                            tool: Label::fixed(tool),
                        })
                        .inc();
                }
                let result = match limit {
                    Some(why) => refused(&call, ToolErrorKind::Limit, why),
                    None => {
                        let span = tracing::info_span!("tool.call", tool = %call.name, iteration);
                        self.dispatch(&mut s, &call, parse_error).instrument(span).await
                    }
                };
                s.stats.tools_ms += ms(tool_started.elapsed());
                messages.push(ChatMessage::tool(&call, result.content.clone()));
                s.emit(AgentEvent::ToolResult {
                    iteration,
                    result: result.clone(),
                });
                record.tool_calls.push(ToolExchange { call: rec, result });
            }
            turns.push(record);
            if task_cap_reached || s.stats.tool_calls >= per_task {
                tracing::info!(%trace_id, "agent stopped at the tool call cap");
                s.emit(AgentEvent::Stopped {
                    reason: StopReason::ToolCallLimit,
                    message: tool_call_limit_message(per_task),
                });
                outcome = AgentOutcome::ToolCallLimit;
                break;
            }
        }

        if matches!(outcome, AgentOutcome::MaxIterations) {
            tracing::info!(%trace_id, "agent stopped at the iteration cap");
            s.emit(AgentEvent::Stopped {
                reason: StopReason::MaxIterations,
                message: max_iterations_message(max_iterations),
            });
        }
        s.stats.total_ms = ms(started.elapsed());
        let stats = s.stats.clone();
        s.emit(AgentEvent::Stats { stats: stats.clone() });
        let report = AgentReport {
            task: task.to_string(),
            trace_id,
            provider,
            model,
            max_iterations,
            max_tool_calls: self.cfg.max_tool_calls.max(1),
            outcome,
            turns,
            stats,
        };
        if let Some(m) = &self.metrics {
            m.agent_tasks
                .get_or_create(&StatusLabel {
                    status: Label::fixed(report.stop_reason().as_str()),
                })
                .inc();
            m.agent_iterations_total
                .observe(f64::from(report.stats.iterations));
        }
        report
    }

    /// Runs one tool call; every failure becomes a result for the model.
    async fn dispatch(
        &self,
        s: &mut Session<'_>,
        call: &ToolCall,
        parse_error: Option<String>,
    ) -> ToolResultRecord {
        let mut r = ToolResultRecord {
            id: call.id.clone(),
            name: call.name.clone(),
            ..Default::default()
        };
        let fail = |r: ToolResultRecord, kind: ToolErrorKind, msg: String| failed(r, kind, msg);
        if let Some(e) = parse_error {
            return fail(r, ToolErrorKind::InvalidArguments, e);
        }
        match call.name.as_str() {
            TOOL_LIST_LANGUAGES => {
                r.ok = true;
                r.content = json!({"languages": s.languages}).to_string();
                r.languages = Some(s.languages.clone());
                r
            }
            TOOL_EXECUTE_CODE => {
                let args = match execute_args(call, &s.languages) {
                    Ok(a) => a,
                    Err(e) => return fail(r, ToolErrorKind::InvalidArguments, e),
                };
                let mut req = ExecRequest::new(args.0, args.1);
                req.trace_id = s.trace_id.clone();
                req.timeout = self.cfg.exec_timeout;
                req.max_output_bytes = self.cfg.max_output_bytes;
                req.env = self.cfg.env.clone();
                s.stats.executions += 1;
                let done = self
                    .executor
                    .execute(&req, &executor::OutputProgress::default())
                    .await;
                if let Some(m) = &self.metrics {
                    match &done {
                        Ok(exec) => m.record_outcome(&req.language, &req.trace_id, Ok(&exec.outcome)),
                        Err(e) if e.is_invalid_request() => {}
                        Err(_) => m.record_outcome(&req.language, &req.trace_id, Err(None)),
                    }
                }
                match done {
                    Ok(exec) => self.execution_result(r, &req, exec),
                    Err(e) if e.is_invalid_request() => fail(r, ToolErrorKind::InvalidRequest, e.to_string()),
                    Err(e) => {
                        tracing::warn!(trace_id = %s.trace_id, "sandbox failure in a tool call: {e}");
                        fail(
                            r,
                            ToolErrorKind::Sandbox,
                            format!("the sandbox failed (not your program): {e}"),
                        )
                    }
                }
            }
            other => fail(
                r,
                ToolErrorKind::UnknownTool,
                format!("unknown tool '{other}'; the tools are: {}", TOOLS.join(", ")),
            ),
        }
    }

    fn execution_result(
        &self,
        mut r: ToolResultRecord,
        req: &ExecRequest,
        exec: Execution,
    ) -> ToolResultRecord {
        let o = &exec.outcome;
        let (stdout, cut_out) = clip_middle(&String::from_utf8_lossy(&exec.stdout), self.cfg.result_chars);
        let (stderr, cut_err) = clip_middle(&String::from_utf8_lossy(&exec.stderr), self.cfg.result_chars);
        r.ok = true;
        r.exit_code = o.exit_code;
        r.signal = o.signal;
        r.timed_out = o.timed_out;
        r.oom_killed = o.oom_killed;
        r.stdout_truncated = o.stdout_truncated || cut_out;
        r.stderr_truncated = o.stderr_truncated || cut_err;
        r.duration_ms = Some(o.duration_ms);
        r.boot_ms = (o.boot_ms > 0.0).then_some(o.boot_ms);
        r.wait_ms = exec.wait_ms;
        r.warm = exec.warm;
        r.vm_id = (!o.vm_id.is_empty()).then(|| o.vm_id.clone());
        let mut m = Map::new();
        m.insert("exit_code".into(), json!(o.exit_code));
        if let Some(sig) = o.signal {
            m.insert("signal".into(), json!(sig));
        }
        m.insert("stdout".into(), json!(stdout));
        m.insert("stderr".into(), json!(stderr));
        if o.timed_out {
            m.insert("timed_out".into(), json!(true));
            m.insert(
                "note".into(),
                json!(format!(
                    "the program was killed after the time limit of {} s",
                    req.timeout.as_secs_f64()
                )),
            );
        }
        if o.oom_killed {
            m.insert("oom_killed".into(), json!(true));
        }
        if r.stdout_truncated {
            m.insert("stdout_truncated".into(), json!(true));
        }
        if r.stderr_truncated {
            m.insert("stderr_truncated".into(), json!(true));
        }
        m.insert("duration_ms".into(), json!((o.duration_ms * 10.0).round() / 10.0));
        r.content = Value::Object(m).to_string();
        r.stdout = stdout;
        r.stderr = stderr;
        r
    }
}

/// `execute_code`'s (language, code), or what is wrong with them.
fn execute_args(call: &ToolCall, languages: &[Language]) -> Result<(String, String), String> {
    let usage = "expected {\"language\": string, \"code\": string}";
    let args = call
        .arguments_object()
        .map_err(|e| format!("malformed arguments for execute_code: {e}; {usage}"))?;
    let field = |name: &str| match args.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "malformed arguments for execute_code: \"{name}\" must be a string, got {other}; {usage}"
        )),
        None => Err(format!(
            "malformed arguments for execute_code: \"{name}\" is missing; {usage}"
        )),
    };
    let language = field("language")?;
    let code = field("code")?;
    Ok((canonical_language(&language, languages), code))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn langs() -> Vec<Language> {
        ["python", "bash", "javascript"]
            .iter()
            .map(|n| Language {
                name: n.to_string(),
                version: "1".into(),
            })
            .collect()
    }

    fn call(args: &str) -> ToolCall {
        ToolCall {
            id: "c".into(),
            name: TOOL_EXECUTE_CODE.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn execute_arguments_are_checked_and_named() {
        assert_eq!(
            execute_args(&call(r#"{"language":"py","code":"print(1)"}"#), &langs()),
            Ok(("python".into(), "print(1)".into()))
        );
        assert_eq!(
            execute_args(&call(r#"{"language":"cobol","code":"x"}"#), &langs()),
            Ok(("cobol".into(), "x".into()))
        );
        let e = execute_args(&call(r#"{"language":"python"}"#), &langs()).unwrap_err();
        assert!(e.contains("\"code\" is missing"), "{e}");
        let e = execute_args(&call(r#"{"language":"python","code":5}"#), &langs()).unwrap_err();
        assert!(e.contains("must be a string"), "{e}");
        let e = execute_args(&call(r#"{"language": "#), &langs()).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn long_output_keeps_head_and_tail() {
        let s: String = (0..1000).map(|i| format!("{i}\n")).collect();
        let (c, cut) = clip_middle(&s, 300);
        assert!(cut);
        assert!(c.starts_with("0\n1\n") && c.ends_with("999\n"), "{c}");
        assert!(c.contains("characters cut"));
        assert_eq!(clip_middle("short", 10), ("short".to_string(), false));
    }

    /// An LLM that makes `calls` native tool calls every turn, forever.
    struct FanOut {
        calls: usize,
    }

    #[async_trait::async_trait]
    impl LlmClient for FanOut {
        fn provider(&self) -> Provider {
            Provider::Ollama
        }
        fn model(&self) -> &str {
            "fan-out"
        }
        fn base_url(&self) -> &str {
            "http://test"
        }
        async fn chat(
            &self,
            _req: ChatRequest<'_>,
            _on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
        ) -> Result<crate::llm::ChatTurn, LlmError> {
            Ok(crate::llm::ChatTurn {
                tool_calls: (0..self.calls)
                    .map(|i| ToolCall {
                        id: format!("c{i}"),
                        name: TOOL_EXECUTE_CODE.into(),
                        arguments: r#"{"language":"python","code":"print(1)"}"#.into(),
                    })
                    .collect(),
                ..Default::default()
            })
        }
    }

    /// Counts executions; never boots anything.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl CodeExecutor for Counting {
        async fn languages(&self) -> Result<Vec<Language>, executor::ExecutorError> {
            Ok(langs())
        }
        async fn execute(
            &self,
            _req: &ExecRequest,
            _progress: &executor::OutputProgress,
        ) -> Result<executor::Execution, executor::ExecutorError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(executor::Execution {
                outcome: crate::exec::ExecOutcome {
                    exit_code: Some(0),
                    ..Default::default()
                },
                stdout: b"1\n".to_vec(),
                stderr: Vec::new(),
                wait_ms: None,
                warm: None,
            })
        }
    }

    /// Records the system prompt and the executed requests' environment.
    #[derive(Default)]
    struct Recording {
        system: std::sync::Mutex<Vec<String>>,
        env: std::sync::Mutex<Vec<std::collections::BTreeMap<String, String>>>,
    }

    #[async_trait::async_trait]
    impl LlmClient for Recording {
        fn provider(&self) -> Provider {
            Provider::Ollama
        }
        fn model(&self) -> &str {
            "recording"
        }
        fn base_url(&self) -> &str {
            "http://test"
        }
        async fn chat(
            &self,
            req: ChatRequest<'_>,
            _on_text: &mut (dyn for<'s> FnMut(&'s str) + Send),
        ) -> Result<crate::llm::ChatTurn, LlmError> {
            let mut seen = self.system.lock().unwrap();
            seen.push(req.messages[0].content.clone());
            if seen.len() > 1 {
                return Ok(crate::llm::ChatTurn {
                    content: "done".into(),
                    ..Default::default()
                });
            }
            Ok(crate::llm::ChatTurn {
                tool_calls: vec![ToolCall {
                    id: "c0".into(),
                    name: TOOL_EXECUTE_CODE.into(),
                    arguments: r#"{"language":"python","code":"print(1)"}"#.into(),
                }],
                ..Default::default()
            })
        }
    }

    #[async_trait::async_trait]
    impl CodeExecutor for Recording {
        async fn languages(&self) -> Result<Vec<Language>, executor::ExecutorError> {
            Ok(langs())
        }
        async fn execute(
            &self,
            req: &ExecRequest,
            _progress: &executor::OutputProgress,
        ) -> Result<executor::Execution, executor::ExecutorError> {
            self.env.lock().unwrap().push(req.env.clone());
            Ok(executor::Execution {
                outcome: crate::exec::ExecOutcome {
                    exit_code: Some(0),
                    ..Default::default()
                },
                stdout: Vec::new(),
                stderr: Vec::new(),
                wait_ms: None,
                warm: None,
            })
        }
    }

    #[tokio::test]
    async fn a_profile_s_instructions_and_environment_reach_the_model_and_the_programs() {
        let rec = Arc::new(Recording::default());
        let cfg = AgentConfig {
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            instructions: Some("You are a careful data analyst.".into()),
            ..AgentConfig::default()
        };
        let controller = AgentController::new(rec.clone(), rec.clone(), cfg);
        let report = controller.run("task", None, &mut |_: &AgentEvent| {}).await;
        assert_eq!(report.stop_reason(), StopReason::Answer);
        let system = rec.system.lock().unwrap();
        assert!(system[0].starts_with("You are a coding agent."), "{}", system[0]);
        assert!(
            system[0].ends_with("</tool_call>\n\nYou are a careful data analyst."),
            "{}",
            system[0]
        );
        assert_eq!(rec.env.lock().unwrap()[0]["GREETING"], "hi");
    }

    #[tokio::test]
    async fn tool_calls_are_capped_per_turn_and_per_task() {
        let exec = Arc::new(Counting::default());
        let cfg = AgentConfig {
            max_iterations: 100,
            max_tool_calls_per_turn: 3,
            max_tool_calls: 7,
            ..AgentConfig::default()
        };
        let controller = AgentController::new(Arc::new(FanOut { calls: 20 }), exec.clone(), cfg);
        let mut events = Vec::new();
        let report = controller
            .run("fan out", None, &mut |e: &AgentEvent| {
                events.push(format!("{e:?}"))
            })
            .await;
        // 3 + 3 run, then 1 of the third turn's: 7 in all, then the task stops.
        assert_eq!(exec.0.load(std::sync::atomic::Ordering::SeqCst), 7);
        assert!(
            matches!(report.outcome, AgentOutcome::ToolCallLimit),
            "{:?}",
            report.outcome
        );
        assert_eq!(report.stop_reason(), StopReason::ToolCallLimit);
        assert_eq!(report.turns.len(), 3);
        // Every call the model made got a result (the protocol needs one per id);
        // those not run say why.
        let first = &report.turns[0].tool_calls;
        assert_eq!(first.len(), 20);
        assert!(first[..3].iter().all(|x| x.result.ok));
        assert!(first[3..]
            .iter()
            .all(|x| x.result.error_kind == Some(ToolErrorKind::Limit)));
        assert!(first[3]
            .result
            .content
            .contains("at most 3 tool calls are run per turn"));
        let last = &report.turns[2].tool_calls;
        assert!(
            last[1].result.content.contains("made 7 tool calls"),
            "{}",
            last[1].result.content
        );
        assert_eq!(report.to_json()["error"]["kind"], "tool_call_limit");
    }
}
