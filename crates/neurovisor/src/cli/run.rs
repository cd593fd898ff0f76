//! `neurovisor run`: one execution in a fresh microVM, output streamed live.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use neurovisor::daemon_client::{DaemonClient, DaemonEndpoint, DaemonError};
use neurovisor::exec::DEFAULT_MAX_OUTPUT;
use neurovisor::metrics::Metrics;
use neurovisor::profile::Profile;
use neurovisor::{ExecOutcome, ExecRequest, Output, VmSize};
use serde_json::json;
use std::sync::Arc;
use tracing::Instrument;

use super::{parse_duration, VmArgs, EXIT_BAD_INPUT, EXIT_SANDBOX_ERROR, EXIT_TIMEOUT};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    program: ProgramArgs,
    /// VM size: small (1 vCPU, 256 MiB), medium (2, 512), large (4, 1024)
    /// [default: the profile's, else medium].
    #[arg(long, value_enum)]
    size: Option<VmSize>,
    /// Print one JSON object with the output and the result instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: super::DaemonTarget,
    #[command(flatten)]
    vm: VmArgs,
}

impl RunArgs {
    /// A program the CLI wrote itself (`install`, `repo`), run exactly as
    /// `run` runs one: validated, booted here or by a daemon, streamed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scripted(
        language: &str,
        code: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        timeout: Option<Duration>,
        size: Option<VmSize>,
        json: bool,
        target: super::DaemonTarget,
        vm: VmArgs,
    ) -> Self {
        Self {
            program: ProgramArgs {
                lang: Some(language.to_string()),
                code: Some(code),
                file: None,
                args,
                timeout,
                env,
                stdin: None,
                max_output: None,
                trace_id: None,
            },
            size,
            json,
            target,
            vm,
        }
    }
}

/// What to run: shared by `run` and `sandbox exec`.
#[derive(Debug, Args)]
pub struct ProgramArgs {
    /// Language: python, bash, javascript (go and rust with --image full).
    /// Inferred from the file extension when a file is given.
    #[arg(short, long = "lang")]
    lang: Option<String>,
    /// The code to run.
    #[arg(short, long, conflicts_with = "file")]
    code: Option<String>,
    /// A file with the code to run, or `-` to read it from stdin.
    file: Option<PathBuf>,
    /// Arguments for the program (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
    /// Wall-clock limit for the program (e.g. 30, 30s, 500ms, 2m) [default:
    /// the profile's, else 30s].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment variable for the program (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Feed this file (or `-` for this process's stdin) to the program's stdin.
    #[arg(long, value_name = "FILE")]
    stdin: Option<PathBuf>,
    /// Cap on each output stream in bytes; the rest is dropped and flagged
    /// [default: the profile's, else 1048576].
    #[arg(long)]
    max_output: Option<u64>,
    /// Trace id passed to the program as NEUROVISOR_TRACE_ID (default: a new UUIDv7).
    #[arg(long)]
    trace_id: Option<String>,
}

pub(super) fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

fn language_from_extension(path: &Path) -> Option<&'static str> {
    Some(match path.extension()?.to_str()? {
        "py" => "python",
        "sh" | "bash" => "bash",
        "js" | "mjs" | "cjs" => "javascript",
        "go" => "go",
        "rs" => "rust",
        _ => return None,
    })
}

fn read_all(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let limit = 64 << 20;
    let mut buf = Vec::new();
    let res = if path == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut buf))
    };
    res.map_err(|e| format!("cannot read {what} from {}: {e}", path.display()))?;
    Ok(buf)
}

impl ProgramArgs {
    /// The request these options describe (validated against an image later).
    pub(super) fn request(&self) -> Result<ExecRequest, String> {
        self.request_with(None)
    }

    /// The same, with a profile's environment and limits under the flags.
    pub(super) fn request_with(&self, profile: Option<&Profile>) -> Result<ExecRequest, String> {
        let code = match (&self.code, &self.file) {
            (Some(c), _) => c.clone(),
            (None, Some(f)) => String::from_utf8(read_all(f, "the code")?)
                .map_err(|_| format!("the code in {} is not UTF-8 text", f.display()))?,
            (None, None) => {
                return Err("no code given: pass -c CODE, a file, or - to read it from stdin".into())
            }
        };
        if self.file.as_deref() == Some(Path::new("-")) && self.stdin.as_deref() == Some(Path::new("-")) {
            return Err("stdin cannot be both the code (-) and the program's input (--stdin -)".into());
        }
        let lang = match (&self.lang, &self.file) {
            (Some(l), _) => l.clone(),
            (None, Some(f)) => language_from_extension(f)
                .ok_or_else(|| format!("cannot tell the language of {}: pass --lang", f.display()))?
                .to_string(),
            (None, None) => {
                return Err("no language given: pass --lang (python, bash, javascript, ...)".into())
            }
        };
        let mut req = ExecRequest::new(lang, code);
        req.args = self.args.clone();
        req.env = profile.map(|p| p.env.clone()).unwrap_or_default();
        req.env.extend(self.env.iter().cloned());
        req.timeout = self
            .timeout
            .or(profile.and_then(|p| p.timeout))
            .unwrap_or(DEFAULT_TIMEOUT);
        req.max_output_bytes = self
            .max_output
            .or(profile.and_then(|p| p.max_output_bytes))
            .unwrap_or(DEFAULT_MAX_OUTPUT);
        if let Some(t) = &self.trace_id {
            req.trace_id = t.clone();
        }
        if let Some(p) = &self.stdin {
            req.stdin = read_all(p, "stdin")?;
        }
        Ok(req)
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

/// The time limit of a program when neither a flag nor a profile sets one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn notes(o: &ExecOutcome, req: &ExecRequest, size: VmSize) -> Vec<String> {
    let mut n = Vec::new();
    if o.timed_out {
        n.push(format!(
            "time limit of {:?} reached; the program was killed (raise it with --timeout)",
            req.timeout
        ));
    }
    if o.oom_killed {
        n.push(format!(
            "the guest's OOM killer killed the program (VM size {size}: {} MiB; try a larger --size)",
            size.memory_mib()
        ));
    }
    for (name, truncated, bytes) in [
        ("stdout", o.stdout_truncated, o.stdout_bytes),
        ("stderr", o.stderr_truncated, o.stderr_bytes),
    ] {
        if truncated {
            n.push(format!(
                "{name} truncated: the program wrote {bytes} bytes, the first {} were kept (--max-output)",
                req.max_output_bytes
            ));
        }
    }
    n
}

pub async fn run(mut a: RunArgs, pushgateway: Option<String>) -> u8 {
    let profile = match a.target.for_profile(&a.vm) {
        Ok(p) => p,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    if a.size.is_none() {
        a.size = profile.as_ref().and_then(|p| p.size);
    }
    let req = match a.program.request_with(profile.as_ref()) {
        Ok(mut r) => {
            r.llm_bridge = a.vm.llm_bridge();
            r
        }
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let metrics = match super::one_shot_metrics(pushgateway.as_deref()) {
        Ok(m) => m,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let code = run_counted(&a, req, metrics.clone()).await;
    super::push_metrics(metrics.as_deref(), pushgateway.as_deref(), "run").await;
    code
}

async fn run_counted(a: &RunArgs, req: ExecRequest, metrics: Option<Arc<Metrics>>) -> u8 {
    // The trace of this run: its root span carries the request's trace id.
    let span = tracing::info_span!("run", trace_id = %req.trace_id, language = %req.language);
    neurovisor::telemetry::start_trace(&span, &req.trace_id);
    let daemon = match a.target.resolve(a.vm.state_dir()).await {
        Ok(d) => d,
        Err(m) => return fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
    };
    let sandbox = match &daemon {
        Some(_) => None,
        None => match a.vm.sandbox() {
            Ok(mut s) => {
                if let Some(m) = &metrics {
                    s.hooks.counters = m.vm_counters();
                }
                Some(s)
            }
            Err(m) => return fail(a.json, "sandbox", &m, EXIT_SANDBOX_ERROR),
        },
    };
    if let Some(m) = &metrics {
        m.allow_languages([req.language.as_str()]);
    }
    if let Some(sb) = &sandbox {
        if let Err(e) = req.validate(sb.images()).and_then(|()| sb.check_bridge(&req)) {
            return fail(a.json, "invalid_request", &e.to_string(), EXIT_BAD_INPUT);
        }
    }
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let json_mode = a.json;
    let mut sink = |o: Output<'_>| {
        // Write errors (a closed pipe) must not stop the execution.
        match (o, json_mode) {
            (Output::Stdout(b), false) => {
                let mut s = std::io::stdout().lock();
                let _ = s.write_all(b).and_then(|_| s.flush());
            }
            (Output::Stderr(b), false) => {
                let _ = std::io::stderr().lock().write_all(b);
            }
            (Output::Stdout(b), true) => out_buf.extend_from_slice(b),
            (Output::Stderr(b), true) => err_buf.extend_from_slice(b),
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
    let mut execution = Box::pin(
        async {
            match (&sandbox, &daemon) {
                (Some(sb), _) => sb.run(&req, a.size(), &mut sink).await.map_err(|e| {
                    let kind = if e.is_invalid_request() {
                        Kind::Invalid
                    } else {
                        Kind::Sandbox
                    };
                    (kind, e.to_string())
                }),
                (None, Some(ep)) => {
                    tracing::info!(daemon = %ep, "executing through the daemon");
                    let remote = async { DaemonClient::connect(ep).await?.execute(&req, &mut sink).await };
                    remote.await.map(|r| r.outcome).map_err(|e| match e {
                        DaemonError::Invalid(m) | DaemonError::BadAddress(m) => (Kind::Invalid, m),
                        DaemonError::Other(m) | DaemonError::NotFound(m) => (Kind::Sandbox, m),
                    })
                }
                (None, None) => Err((Kind::Sandbox, "no sandbox".to_string())),
            }
        }
        .instrument(span.clone()),
    );
    let result = tokio::select! {
        r = &mut execution => r,
        _ = sigint.recv() => {
            drop(execution); // kills the VM (or cancels the daemon request, which frees it)
            return fail(a.json, "interrupted", "interrupted; the VM was destroyed", 130);
        }
        _ = sigterm.recv() => {
            drop(execution);
            return fail(a.json, "interrupted", "terminated; the VM was destroyed", 143);
        }
    };
    drop(execution);
    span.in_scope(|| match &result {
        Ok(o) => tracing::info!(
            vm_id = %o.vm_id,
            exit_code = ?o.exit_code,
            restored = o.restored,
            boot_ms = o.boot_ms,
            execute_ms = o.execute_ms,
            "execution finished"
        ),
        Err((_, m)) => tracing::info!("execution failed: {m}"),
    });
    if let Some(m) = &metrics {
        match &result {
            Ok(o) => {
                m.record_outcome(&req.language, &req.trace_id, Ok(o));
                if !o.restored && o.boot_ms > 0.0 {
                    m.vm_boot_seconds.observe(o.boot_ms / 1000.0);
                }
            }
            Err((Kind::Invalid, _)) => {}
            Err((Kind::Sandbox, _)) => m.record_outcome(&req.language, &req.trace_id, Err(None)),
        }
    }
    finish(a, &req, daemon.as_ref(), result, &out_buf, &err_buf)
}

impl RunArgs {
    fn size(&self) -> VmSize {
        self.size.unwrap_or_default()
    }
}

enum Kind {
    Invalid,
    Sandbox,
}

fn finish(
    a: &RunArgs,
    req: &ExecRequest,
    daemon: Option<&DaemonEndpoint>,
    result: Result<ExecOutcome, (Kind, String)>,
    out_buf: &[u8],
    err_buf: &[u8],
) -> u8 {
    match result {
        Ok(o) => {
            let notes = notes(&o, req, a.size());
            if a.json {
                let mut v = serde_json::to_value(&o).unwrap_or_default();
                v["ok"] = json!(true);
                v["language"] = json!(req.language);
                v["size"] = json!(a.size());
                v["stdout"] = json!(String::from_utf8_lossy(out_buf));
                v["stderr"] = json!(String::from_utf8_lossy(err_buf));
                v["notes"] = json!(notes);
                v["sandbox"] = match daemon {
                    Some(ep) => json!({ "daemon": ep.to_string() }),
                    None => json!("direct"),
                };
                println!("{v}");
            } else {
                for n in &notes {
                    eprintln!("neurovisor: {n}");
                }
            }
            if o.timed_out {
                EXIT_TIMEOUT
            } else {
                u8::try_from(o.shell_status().clamp(0, 255)).unwrap_or(1)
            }
        }
        Err((Kind::Invalid, m)) => fail(a.json, "invalid_request", &m, EXIT_BAD_INPUT),
        Err((Kind::Sandbox, m)) => fail(a.json, "sandbox", &m, EXIT_SANDBOX_ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_inference_and_env_parsing() {
        assert_eq!(language_from_extension(Path::new("a/b.py")), Some("python"));
        assert_eq!(language_from_extension(Path::new("x.rs")), Some("rust"));
        assert_eq!(language_from_extension(Path::new("x.txt")), None);
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err() && parse_env("x").is_err());
    }
}
