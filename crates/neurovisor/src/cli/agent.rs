//! `neurovisor agent "task"` (and the seed form `neurovisor --agent "task"`):
//! an LLM solves the task by writing code that runs in fresh microVMs.
//!
//! The agent loop runs in this process, so the LLM settings of this shell
//! (`OLLAMA_HOST`, `OPENAI_API_KEY`, ...) apply. Executions go to the daemon's
//! pool when a daemon is reachable (`--addr`, or the one whose socket is in the state directory), like
//! `neurovisor run`; otherwise (or with `--local`) each boots a VM directly.
//!
//! Exit status: 0 with a final answer; 1 when the iteration cap was reached;
//! 2 for bad input; 3 when the LLM server is unreachable, lacks the model or
//! answered with an error; 125 when the sandbox cannot be set up; 130/143 on
//! Ctrl-C/SIGTERM.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use neurovisor::agent::{
    AgentConfig, AgentController, AgentEvent, AgentOutcome, AgentStats, CodeExecutor, DaemonExecutor,
    SandboxExecutor, StopReason, ToolCallRecord, ToolResultRecord, DEFAULT_MAX_ITERATIONS,
    DEFAULT_MAX_TOOL_CALLS, DEFAULT_MAX_TOOL_CALLS_PER_TURN, TOOL_EXECUTE_CODE, TOOL_LIST_LANGUAGES,
};
use neurovisor::exec::MAX_TIMEOUT;
use neurovisor::llm::ollama::DEFAULT_OLLAMA_HOST;
use neurovisor::llm::openai::DEFAULT_OPENAI_BASE_URL;
use neurovisor::llm::{self, LlmConfig, Provider, DEFAULT_MODEL};
use neurovisor::VmSize;
use serde_json::json;

use super::serve::ServeArgs;
use super::{parse_duration, VmArgs, EXIT_BAD_INPUT, EXIT_SANDBOX_ERROR};

/// No final answer within --max-iterations.
pub const EXIT_NO_ANSWER: u8 = 1;
/// The LLM server cannot be used (unreachable, model missing, error answer).
pub const EXIT_LLM_ERROR: u8 = 3;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// What the agent should do, e.g. "Find all prime numbers under 100".
    task: String,
    /// Model name (Ollama: e.g. qwen3, llama3.1; OpenAI-compatible: the server's model id).
    #[arg(long, env = "NEUROVISOR_MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    /// LLM API: `ollama` (native /api/chat, OLLAMA_HOST) or `openai` (any
    /// OpenAI-compatible /v1/chat/completions; OPENAI_BASE_URL, OPENAI_API_KEY).
    #[arg(long, value_enum, env = "NEUROVISOR_LLM", default_value = "ollama")]
    llm: Provider,
    /// Server URL [default: $OLLAMA_HOST or http://localhost:11434 for ollama;
    /// $OPENAI_BASE_URL or https://api.openai.com/v1 for openai].
    #[arg(long)]
    base_url: Option<String>,
    /// Environment variable holding the API key (sent as a bearer token; openai only).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// LLM turns at most; then the agent stops without an answer.
    #[arg(long, default_value_t = DEFAULT_MAX_ITERATIONS, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_iterations: u32,
    /// Tool calls the task may make in all; it stops after the turn that reaches this.
    #[arg(long, default_value_t = DEFAULT_MAX_TOOL_CALLS, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_tool_calls: u32,
    /// Tool calls run per model turn; further calls in that turn get an error result.
    #[arg(long, default_value_t = DEFAULT_MAX_TOOL_CALLS_PER_TURN, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_tool_calls_per_turn: u32,
    /// Wall-clock limit of each program the model runs (e.g. 30s, 2m)
    /// [default: the profile's, else 30s].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// VM size for direct runs: small, medium, large (the daemon uses its
    /// own) [default: the profile's, else medium].
    #[arg(long, value_enum)]
    size: Option<VmSize>,
    /// Print the whole transcript and stats as one JSON document at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: super::DaemonTarget,
    #[command(flatten)]
    vm: VmArgs,
}

/// The seed-style form, `neurovisor --agent "task" [--model M]`: flags on the
/// top-level command (with `--model`, `--size`, `--ollama-host` and the VM
/// flags of the daemon form).
#[derive(Debug, Args)]
pub struct SeedAgentArgs {
    /// Run one task in agent mode (same as `neurovisor agent TASK`) instead of the daemon.
    #[arg(long, value_name = "TASK")]
    pub agent: Option<String>,
    /// With --agent: the LLM API, `ollama` or `openai`.
    #[arg(long, value_enum, requires = "agent")]
    pub llm: Option<Provider>,
    /// With --agent: the LLM server's URL.
    #[arg(long, requires = "agent")]
    pub base_url: Option<String>,
    /// With --agent: LLM turns at most [default: 10].
    #[arg(long, requires = "agent", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_iterations: Option<u32>,
    /// With --agent: print the transcript as one JSON document.
    #[arg(long, requires = "agent")]
    pub json: bool,
}

/// `neurovisor --agent TASK ...`.
pub async fn run_seed(
    task: String,
    seed: SeedAgentArgs,
    serve: ServeArgs,
    pushgateway: Option<String>,
) -> u8 {
    let llm = seed.llm.unwrap_or(Provider::Ollama);
    // --ollama-host (or OLLAMA_HOST) of the daemon form points at Ollama here too.
    let base_url = seed.base_url.or(match llm {
        Provider::Ollama => serve.ollama_host,
        Provider::OpenAi => None,
    });
    run(
        AgentArgs {
            task,
            model: serve.model.unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            llm,
            base_url,
            api_key_env: "OPENAI_API_KEY".into(),
            max_iterations: seed.max_iterations.unwrap_or(DEFAULT_MAX_ITERATIONS),
            max_tool_calls: DEFAULT_MAX_TOOL_CALLS,
            max_tool_calls_per_turn: DEFAULT_MAX_TOOL_CALLS_PER_TURN,
            timeout: None,
            size: serve.size,
            json: seed.json,
            target: super::DaemonTarget {
                addr: env_nonempty("NEUROVISOR_ADDR"),
                local: env_nonempty("NEUROVISOR_LOCAL")
                    .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")),
                tls_ca: env_nonempty("NEUROVISOR_TLS_CA").map(Into::into),
            },
            vm: serve.vm,
        },
        pushgateway,
    )
    .await
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl AgentArgs {
    fn llm_config(&self) -> LlmConfig {
        let base_url = match self.llm {
            Provider::Ollama => self
                .base_url
                .clone()
                .or_else(|| env_nonempty("OLLAMA_HOST"))
                .unwrap_or_else(|| DEFAULT_OLLAMA_HOST.into()),
            Provider::OpenAi => self
                .base_url
                .clone()
                .or_else(|| env_nonempty("OPENAI_BASE_URL"))
                .unwrap_or_else(|| DEFAULT_OPENAI_BASE_URL.into()),
        };
        LlmConfig {
            provider: self.llm,
            base_url,
            model: self.model.clone(),
            api_key: match self.llm {
                Provider::OpenAi => env_nonempty(&self.api_key_env),
                Provider::Ollama => None,
            },
        }
    }
}

fn fail(json: bool, kind: &str, msg: &str, code: u8) -> u8 {
    if json {
        println!("{}", json!({ "ok": false, "kind": kind, "error": msg }));
    } else {
        eprintln!("neurovisor: {msg}");
    }
    code
}

/// `"first line of the code..."`, escaped, at most ~60 characters.
fn code_preview(code: &str) -> String {
    const MAX: usize = 60;
    let escaped: String = code.trim().chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() <= MAX {
        format!("\"{escaped}\"")
    } else {
        let cut: String = escaped.chars().take(MAX).collect();
        // Do not end in the middle of an escape sequence.
        let cut = match cut.rfind('\\') {
            Some(i) if cut.len() - i < 6 => cut[..i].to_string(),
            _ => cut,
        };
        format!("\"{cut}...\"")
    }
}

pub fn describe_call(c: &ToolCallRecord) -> String {
    match (c.name.as_str(), &c.language, &c.code) {
        (TOOL_EXECUTE_CODE, Some(lang), Some(code)) => format!("{}({lang}, {})", c.name, code_preview(code)),
        (TOOL_LIST_LANGUAGES, _, _) => format!("{}()", c.name),
        _ => {
            let args: String = c.arguments.chars().take(80).collect();
            let more = if args.len() < c.arguments.len() { "..." } else { "" };
            format!("{}({args}{more})", c.name)
        }
    }
}

fn ms(v: f64) -> String {
    format!("{}ms", v.round() as u64)
}

pub fn describe_result(r: &ToolResultRecord) -> String {
    if let Some(e) = &r.error {
        return format!("[Tool Error] {e}");
    }
    if let Some(langs) = &r.languages {
        let l: Vec<String> = langs
            .iter()
            .map(|l| format!("{} {}", l.name, l.version))
            .collect();
        return format!("[Languages] {}", l.join(", "));
    }
    let vm = match (r.warm, r.boot_ms, r.wait_ms) {
        (Some(true), Some(boot), Some(wait)) => {
            format!("VM booted in {} (pre-warmed, acquired in {})", ms(boot), ms(wait))
        }
        (Some(true), None, Some(wait)) => format!("warm VM acquired in {}", ms(wait)),
        (_, Some(boot), _) => format!("VM booted in {}", ms(boot)),
        (_, None, Some(wait)) => format!("VM booted in {}", ms(wait)),
        _ => "VM ready".to_string(),
    };
    let status = match (r.exit_code, r.signal) {
        (Some(c), _) => format!("exit_code={c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "no exit code".to_string(),
    };
    let mut line = format!(
        "[Execution] {vm}, {status}, duration={}",
        ms(r.duration_ms.unwrap_or(0.0))
    );
    if r.timed_out {
        line.push_str(", timed out");
    }
    if r.oom_killed {
        line.push_str(", out of memory");
    }
    if r.stdout_truncated || r.stderr_truncated {
        line.push_str(", output truncated");
    }
    line
}

fn seconds(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{}ms", ms.round() as u64)
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

pub fn describe_stats(s: &AgentStats) -> String {
    let load = match s.model_load_ms {
        Some(l) => format!("{}ms", l.round() as u64),
        None => "n/a (not reported by the server)".to_string(),
    };
    format!(
        "Stats:\n  - Iterations: {}\n  - Tool calls: {}\n  - Model load time: {load}\n  - Total duration: {}",
        s.iterations,
        s.tool_calls,
        seconds(s.total_ms)
    )
}

/// Prints events as they happen; the model's text is streamed as it arrives.
#[derive(Default)]
struct Human {
    /// The last thing written did not end with a newline.
    open_line: bool,
    /// The LLM failed: the error line says it all, no stats.
    llm_failed: bool,
}

impl Human {
    fn event(&mut self, ev: &AgentEvent) {
        let mut out = std::io::stdout().lock();
        // Write errors (a closed pipe) must not stop the session.
        let mut line = |s: &str, open: &mut bool| {
            if *open {
                let _ = writeln!(out);
                *open = false;
            }
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        };
        match ev {
            AgentEvent::Started { task, trace_id, .. } => line(
                &format!("Task: {task:?}\ntrace_id: {trace_id}"),
                &mut self.open_line,
            ),
            AgentEvent::Iteration { iteration, model } => line(
                &format!("[Iteration {iteration}] Calling {model}..."),
                &mut self.open_line,
            ),
            AgentEvent::TextDelta { text, .. } => {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                self.open_line = !text.ends_with('\n');
            }
            AgentEvent::ToolCall { call, .. } => line(
                &format!("[Tool Call] {}", describe_call(call)),
                &mut self.open_line,
            ),
            AgentEvent::ToolResult { result, .. } => line(&describe_result(result), &mut self.open_line),
            AgentEvent::Answer { text } => line(&format!("Result: {text}"), &mut self.open_line),
            AgentEvent::Stopped {
                reason: StopReason::MaxIterations,
                message,
            } => line(&format!("Stopped: {message}"), &mut self.open_line),
            AgentEvent::Stopped { .. } => {
                self.llm_failed = true;
                if self.open_line {
                    let _ = writeln!(out);
                    self.open_line = false;
                }
            }
            AgentEvent::Stats { .. } if self.llm_failed => {}
            AgentEvent::Stats { stats } => line(&describe_stats(stats), &mut self.open_line),
        }
    }
}

pub async fn run(a: AgentArgs, pushgateway: Option<String>) -> u8 {
    let metrics = match super::one_shot_metrics(pushgateway.as_deref()) {
        Ok(m) => m,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let code = run_counted(a, metrics.clone()).await;
    super::push_metrics(metrics.as_deref(), pushgateway.as_deref(), "agent").await;
    code
}

async fn run_counted(mut a: AgentArgs, metrics: Option<Arc<neurovisor::metrics::Metrics>>) -> u8 {
    let profile = match a.target.for_profile(&a.vm) {
        Ok(p) => p,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let size = a
        .size
        .or(profile.as_ref().and_then(|p| p.size))
        .unwrap_or_default();
    let timeout = a
        .timeout
        .or(profile.as_ref().and_then(|p| p.timeout))
        .unwrap_or(AgentConfig::default().exec_timeout);
    if a.task.trim().is_empty() {
        return fail(
            a.json,
            "invalid_request",
            "the task is empty: say what the agent should do",
            EXIT_BAD_INPUT,
        );
    }
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return fail(
            a.json,
            "invalid_request",
            &format!(
                "--timeout {:?} is out of range; it must be between 1 ms and {} s",
                timeout,
                MAX_TIMEOUT.as_secs()
            ),
            EXIT_BAD_INPUT,
        );
    }
    let llm_cfg = a.llm_config();
    let daemon = match a.target.resolve(a.vm.state_dir()).await {
        Ok(d) => d,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let executor: Arc<dyn CodeExecutor> = match &daemon {
        Some(ep) => {
            tracing::info!(daemon = %ep, "agent executions go through the daemon");
            Arc::new(DaemonExecutor::new(ep.clone()))
        }
        None => match a.vm.sandbox() {
            Ok(mut sb) => {
                if let Some(m) = &metrics {
                    sb.hooks.counters = m.vm_counters();
                    m.allow_languages(sb.images().languages.iter().map(|l| l.name.as_str()));
                }
                Arc::new(SandboxExecutor::new(sb, size))
            }
            Err(m) => return fail(a.json, "sandbox", &m, EXIT_SANDBOX_ERROR),
        },
    };
    let cfg = AgentConfig {
        max_iterations: a.max_iterations,
        exec_timeout: timeout,
        max_tool_calls: a.max_tool_calls,
        max_tool_calls_per_turn: a.max_tool_calls_per_turn,
        max_output_bytes: profile
            .as_ref()
            .and_then(|p| p.max_output_bytes)
            .unwrap_or(AgentConfig::default().max_output_bytes),
        env: profile.as_ref().map(|p| p.env.clone()).unwrap_or_default(),
        instructions: profile.as_ref().and_then(|p| p.prompt.clone()),
        ..AgentConfig::default()
    };
    let mut controller = AgentController::new(Arc::from(llm::client(&llm_cfg)), executor, cfg);
    if let Some(m) = metrics {
        m.allow_model(&a.model);
        controller = controller.with_metrics(m);
    }
    let mut human = Human::default();
    let json_mode = a.json;
    let mut sink = |ev: &AgentEvent| {
        if !json_mode {
            human.event(ev);
        }
    };
    // Registered before anything starts, so no signal can kill us mid-boot.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigterm, mut sigint) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            return fail(
                a.json,
                "sandbox",
                &format!("cannot handle signals: {e}"),
                EXIT_SANDBOX_ERROR,
            )
        }
    };
    let session = controller.run(&a.task, None, &mut sink);
    let report = tokio::select! {
        r = session => r,
        // Dropping the session destroys its VM (or cancels the daemon request).
        _ = sigint.recv() => {
            return fail(a.json, "interrupted", "interrupted; the VM was destroyed", 130);
        }
        _ = sigterm.recv() => {
            return fail(a.json, "interrupted", "terminated; the VM was destroyed", 143);
        }
    };
    if a.json {
        let mut doc = report.to_json();
        doc["sandbox"] = match &daemon {
            Some(ep) => json!({ "daemon": ep.to_string() }),
            None => json!("direct"),
        };
        println!("{doc}");
    }
    match &report.outcome {
        AgentOutcome::Answered(_) => 0,
        AgentOutcome::MaxIterations | AgentOutcome::ToolCallLimit => EXIT_NO_ANSWER,
        AgentOutcome::Failed(e) => {
            if !a.json {
                eprintln!("neurovisor: {e}");
            }
            EXIT_LLM_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neurovisor::agent::CallSource;

    #[test]
    fn tool_calls_are_shown_short() {
        let c = ToolCallRecord {
            id: "1".into(),
            name: TOOL_EXECUTE_CODE.into(),
            arguments: String::new(),
            source: CallSource::Native,
            language: Some("python".into()),
            code: Some(
                "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"
                    .into(),
            ),
        };
        let d = describe_call(&c);
        assert!(
            d.starts_with("execute_code(python, \"def fib(n):\\n    a, b = 0, 1"),
            "{d}"
        );
        assert!(d.ends_with("...\")"), "{d}");
        assert!(d.len() < 90, "{d}");
        let short = ToolCallRecord {
            code: Some("print(1)".into()),
            ..c
        };
        assert_eq!(describe_call(&short), "execute_code(python, \"print(1)\")");
    }

    #[test]
    fn results_and_stats_read_like_the_issue() {
        let r = ToolResultRecord {
            ok: true,
            exit_code: Some(0),
            duration_ms: Some(45.2),
            boot_ms: Some(287.4),
            wait_ms: Some(287.4),
            warm: Some(false),
            ..Default::default()
        };
        assert_eq!(
            describe_result(&r),
            "[Execution] VM booted in 287ms, exit_code=0, duration=45ms"
        );
        let s = AgentStats {
            iterations: 2,
            tool_calls: 1,
            model_load_ms: Some(1250.0),
            total_ms: 3210.0,
            ..Default::default()
        };
        assert_eq!(
            describe_stats(&s),
            "Stats:\n  - Iterations: 2\n  - Tool calls: 1\n  - Model load time: 1250ms\n  - Total duration: 3.2s"
        );
    }
}
