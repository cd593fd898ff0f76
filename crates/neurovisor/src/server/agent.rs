//! `neurovisor.v1.Agent/RunTask`: agent mode in the daemon. The model is
//! Ollama's (the daemon's `--ollama-host`); every `execute_code` gets a fresh
//! VM from the pool. The session's events stream to the client as they happen.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use futures_util::{Stream, StreamExt};
use prost::Message as _;

use neurovisor_proto::v1::agent_event::Event;
use neurovisor_proto::v1::agent_server::Agent as AgentApi;
use neurovisor_proto::v1::{
    AgentEvent as PbEvent, AgentStats as PbStats, AgentToolCall, AgentToolResult, FinalAnswer,
    IterationStarted, RunTaskRequest, TaskStarted, TaskStopped, TextDelta,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::trace::{trace_id_of, with_trace_id};
use crate::agent::{
    AgentConfig, AgentController, AgentError, AgentEvent, AgentOutcome, PoolExecutor, DEFAULT_MAX_ITERATIONS,
    MAX_ITERATIONS_LIMIT,
};
use crate::exec::MAX_TIMEOUT;
use crate::llm::{LlmError, OllamaClient};
use crate::metrics::Metrics;
use crate::pool::Pool;

/// Event bytes a session may have queued that its client has not taken: a
/// client reading along never comes near it (a whole task's events are
/// usually a few KiB); past it the client is not reading, and the session
/// is cancelled (its VM destroyed) instead of buffering without bound.
pub const MAX_QUEUED_EVENT_BYTES: usize = 4 << 20;

/// Tasks longer than this are refused (they go into every LLM request).
pub const MAX_TASK_BYTES: usize = 64 << 10;

pub struct AgentService {
    pool: Pool,
    metrics: Arc<Metrics>,
    ollama_host: String,
    default_model: String,
}

impl AgentService {
    pub fn new(pool: Pool, metrics: Arc<Metrics>, ollama_host: String, default_model: String) -> Self {
        Self {
            pool,
            metrics,
            ollama_host,
            default_model,
        }
    }
}

fn us(ms: f64) -> u64 {
    (ms * 1000.0).max(0.0) as u64
}

/// The library's event in the wire format.
pub fn to_proto(ev: &AgentEvent) -> PbEvent {
    let event = match ev {
        AgentEvent::Started {
            task,
            trace_id,
            provider,
            model,
            max_iterations,
        } => Event::Started(TaskStarted {
            task: task.clone(),
            trace_id: trace_id.clone(),
            llm: provider.as_str().into(),
            model: model.clone(),
            max_iterations: *max_iterations,
        }),
        AgentEvent::Iteration { iteration, model } => Event::Iteration(IterationStarted {
            iteration: *iteration,
            model: model.clone(),
        }),
        AgentEvent::TextDelta { iteration, text } => Event::Text(TextDelta {
            iteration: *iteration,
            text: text.clone(),
        }),
        AgentEvent::ToolCall { iteration, call } => Event::ToolCall(AgentToolCall {
            iteration: *iteration,
            id: call.id.clone(),
            name: call.name.clone(),
            arguments: call.arguments.clone(),
            source: serde_json::to_value(call.source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            language: call.language.clone().unwrap_or_default(),
            code: call.code.clone().unwrap_or_default(),
        }),
        AgentEvent::ToolResult { iteration, result: r } => Event::ToolResult(AgentToolResult {
            iteration: *iteration,
            id: r.id.clone(),
            name: r.name.clone(),
            ok: r.ok,
            error: r.error.clone().unwrap_or_default(),
            error_kind: r
                .error_kind
                .and_then(|k| serde_json::to_value(k).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            exit_code: r.exit_code,
            signal: r.signal,
            timed_out: r.timed_out,
            oom_killed: r.oom_killed,
            stdout: r.stdout.clone(),
            stderr: r.stderr.clone(),
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            duration_us: r.duration_ms.map(us).unwrap_or(0),
            boot_us: r.boot_ms.map(us).unwrap_or(0),
            wait_us: r.wait_ms.map(us).unwrap_or(0),
            warm: r.warm.unwrap_or(false),
            vm_id: r.vm_id.clone().unwrap_or_default(),
            content: r.content.clone(),
        }),
        AgentEvent::Answer { text } => Event::Answer(FinalAnswer { text: text.clone() }),
        AgentEvent::Stopped { reason, message } => Event::Stopped(TaskStopped {
            reason: reason.as_str().into(),
            message: message.clone(),
        }),
        AgentEvent::Stats { stats: s } => Event::Stats(PbStats {
            iterations: s.iterations,
            tool_calls: s.tool_calls,
            executions: s.executions,
            model_load_ms: s.model_load_ms.map(|m| m as u64),
            llm_ms: s.llm_ms as u64,
            tools_ms: s.tools_ms as u64,
            total_ms: s.total_ms as u64,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
        }),
    };
    PbEvent { event: Some(event) }
}

fn llm_status(e: &LlmError) -> Status {
    match e {
        LlmError::Unreachable { .. } => Status::unavailable(e.to_string()),
        LlmError::ModelMissing { .. } => Status::not_found(e.to_string()),
        LlmError::Server { .. } | LlmError::Protocol { .. } => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    type RunTaskStream = Pin<Box<dyn Stream<Item = Result<PbEvent, Status>> + Send>>;

    async fn run_task(
        &self,
        request: Request<RunTaskRequest>,
    ) -> Result<Response<Self::RunTaskStream>, Status> {
        let started = Instant::now();
        let trace_id = trace_id_of(&request);
        let r = request.into_inner();
        if r.task.trim().is_empty() {
            return Err(Status::invalid_argument(
                "task: empty; send what the agent should do",
            ));
        }
        if r.task.len() > MAX_TASK_BYTES {
            return Err(Status::invalid_argument(format!(
                "task: {} bytes; the limit is {MAX_TASK_BYTES}",
                r.task.len()
            )));
        }
        if r.max_iterations > MAX_ITERATIONS_LIMIT {
            return Err(Status::invalid_argument(format!(
                "max_iterations: {} is over the limit of {MAX_ITERATIONS_LIMIT}",
                r.max_iterations
            )));
        }
        let exec_timeout = match r.exec_timeout_ms {
            0 => AgentConfig::default().exec_timeout,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if exec_timeout > MAX_TIMEOUT {
            return Err(Status::invalid_argument(format!(
                "exec_timeout_ms: {} is over the limit of {} s",
                r.exec_timeout_ms,
                MAX_TIMEOUT.as_secs()
            )));
        }
        let model = if r.model.trim().is_empty() {
            self.default_model.clone()
        } else {
            r.model.trim().to_string()
        };
        let cfg = AgentConfig {
            max_iterations: if r.max_iterations == 0 {
                DEFAULT_MAX_ITERATIONS
            } else {
                r.max_iterations
            },
            exec_timeout,
            ..AgentConfig::default()
        };
        let llm = Arc::new(OllamaClient::new(&self.ollama_host).with_model(&model));
        let controller = AgentController::new(llm, Arc::new(PoolExecutor::new(self.pool.clone())), cfg)
            .with_metrics(self.metrics.clone());
        let (tx, rx) = mpsc::unbounded_channel::<(Result<PbEvent, Status>, usize)>();
        // Bytes sent but not yet taken by tonic (whose own buffers HTTP/2
        // flow control bounds).
        let queued = Arc::new(AtomicUsize::new(0));
        let overflow = Arc::new(tokio::sync::Notify::new());
        let metrics = self.metrics.clone();
        let task = r.task;
        let session_trace = trace_id.clone();
        let (q, over) = (queued.clone(), overflow.clone());
        // Set with the first event dropped: however the task ends after it,
        // the client is told instead of seeing a stream that looks complete.
        let overflowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = overflowed.clone();
        tokio::spawn(async move {
            metrics.requests_in_flight.inc();
            let events = tx.clone();
            let mut sink = |ev: &AgentEvent| {
                let pb = to_proto(ev);
                let n = pb.encoded_len();
                if dropped.load(Ordering::SeqCst) || q.fetch_add(n, Ordering::SeqCst) + n > MAX_QUEUED_EVENT_BYTES {
                    dropped.store(true, Ordering::SeqCst);
                    over.notify_one();
                    return;
                }
                let _ = events.send((Ok(pb), n));
            };
            let report = tokio::select! {
                biased;
                _ = over.notified() => None,
                // The client went away: dropping the session destroys its VM.
                _ = tx.closed() => None,
                r = controller.run(&task, Some(session_trace), &mut sink) => Some(r),
            };
            // The task may have ended in the same step that overflowed.
            let report = report.filter(|_| !overflowed.load(Ordering::SeqCst));
            if overflowed.load(Ordering::SeqCst) {
                tracing::warn!("agent client reads nothing; session cancelled");
                let _ = tx.send((
                    Err(Status::resource_exhausted(format!(
                        "the client took none of {} MiB of events: session cancelled; read the stream as it arrives",
                        MAX_QUEUED_EVENT_BYTES >> 20
                    ))),
                    0,
                ));
            }
            metrics.requests_in_flight.dec();
            match report {
                Some(report) => {
                    if let AgentOutcome::Failed(AgentError::Llm(e)) = &report.outcome {
                        let _ = tx.send((Err(llm_status(e)), 0));
                    }
                    metrics.observe_grpc("RunTask", started);
                }
                None => tracing::info!("agent session ended early (client gone or not reading)"),
            }
        }
        // The request's span lives on in the session's task.
        .in_current_span());
        let stream = UnboundedReceiverStream::new(rx).map(move |(ev, n)| {
            queued.fetch_sub(n, Ordering::SeqCst);
            ev
        });
        Ok(with_trace_id(Response::new(Box::pin(stream)), &trace_id))
    }
}
