//! Where the agent's `execute_code` calls run: each in a fresh VM, through one
//! small trait with three implementations: the daemon's pool ([`PoolExecutor`]),
//! a VM booted directly ([`SandboxExecutor`], the CLI without a daemon), and a
//! running daemon's `neurovisor.v1.Sandbox/Execute` ([`DaemonExecutor`], the CLI
//! when a daemon is reachable).

use std::time::Duration;

use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::{execute_response::Event, ExecuteRequest, LanguagesRequest};
use tonic::transport::{Channel, Endpoint};

use crate::config::VmSize;
use crate::exec::{ExecError, ExecOutcome, ExecRequest, Output, Sandbox};
use crate::images::Language;
use crate::pool::{Pool, PoolError};

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The request itself was wrong (unknown language, empty code...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Exec(ExecError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Daemon(String),
}

impl From<ExecError> for ExecutorError {
    fn from(e: ExecError) -> Self {
        if e.is_invalid_request() {
            Self::Invalid(e.to_string())
        } else {
            Self::Exec(e)
        }
    }
}

impl ExecutorError {
    /// True when the program's request was at fault, not the sandbox.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, Self::Invalid(_))
    }
}

/// One finished execution with its output.
#[derive(Debug, Clone, Default)]
pub struct Execution {
    pub outcome: ExecOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Time until a VM was there for this execution (pool acquisition, or the
    /// whole boot for a direct run).
    pub wait_ms: Option<f64>,
    /// The VM came pre-booted from a pool.
    pub warm: Option<bool>,
}

#[async_trait::async_trait]
pub trait CodeExecutor: Send + Sync {
    /// What the image can run.
    async fn languages(&self) -> Result<Vec<Language>, ExecutorError>;
    /// Runs `req` in a fresh VM that is destroyed afterwards.
    async fn execute(&self, req: &ExecRequest) -> Result<Execution, ExecutorError>;
}

/// Collects output (already capped by the guest at `max_output_bytes`).
#[derive(Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Collected {
    fn push(&mut self, o: Output<'_>) {
        match o {
            Output::Stdout(b) => self.stdout.extend_from_slice(b),
            Output::Stderr(b) => self.stderr.extend_from_slice(b),
        }
    }
}

/// A VM booted directly for each execution (no daemon).
pub struct SandboxExecutor {
    sandbox: Sandbox,
    size: VmSize,
}

impl SandboxExecutor {
    pub fn new(sandbox: Sandbox, size: VmSize) -> Self {
        Self { sandbox, size }
    }
}

#[async_trait::async_trait]
impl CodeExecutor for SandboxExecutor {
    async fn languages(&self) -> Result<Vec<Language>, ExecutorError> {
        Ok(self.sandbox.images().languages.clone())
    }

    async fn execute(&self, req: &ExecRequest) -> Result<Execution, ExecutorError> {
        let mut out = Collected::default();
        let mut sink = |o: Output<'_>| out.push(o);
        let outcome = self.sandbox.run(req, self.size, &mut sink).await?;
        Ok(Execution {
            wait_ms: Some(outcome.boot_ms),
            warm: Some(false),
            outcome,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// A VM from the daemon's pre-warmed pool for each execution.
pub struct PoolExecutor {
    pool: Pool,
}

impl PoolExecutor {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

#[async_trait::async_trait]
impl CodeExecutor for PoolExecutor {
    async fn languages(&self) -> Result<Vec<Language>, ExecutorError> {
        Ok(self.pool.sandbox().images().languages.clone())
    }

    async fn execute(&self, req: &ExecRequest) -> Result<Execution, ExecutorError> {
        // Checked before a VM is taken from the pool.
        req.validate(self.pool.sandbox().images())?;
        let mut lease = self.pool.acquire().await?;
        let mut out = Collected::default();
        let mut sink = |o: Output<'_>| out.push(o);
        let result = lease.execute(req, &mut sink).await;
        let (warm, waited) = (lease.warm, lease.waited);
        drop(lease); // destroys the VM
        let outcome = result?;
        Ok(Execution {
            outcome,
            stdout: out.stdout,
            stderr: out.stderr,
            wait_ms: Some(waited.as_secs_f64() * 1000.0),
            warm: Some(warm),
        })
    }
}

/// Executions through a running daemon (`neurovisor.v1.Sandbox/Execute`).
pub struct DaemonExecutor {
    addr: String,
    channel: tokio::sync::OnceCell<Channel>,
}

impl DaemonExecutor {
    /// `addr`: `host:port` or a URL.
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            channel: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<SandboxClient<Channel>, ExecutorError> {
        let channel = self
            .channel
            .get_or_try_init(|| async {
                let url = if self.addr.contains("://") {
                    self.addr.clone()
                } else {
                    format!("http://{}", self.addr)
                };
                Endpoint::from_shared(url)
                    .map_err(|e| ExecutorError::Daemon(format!("invalid daemon address {}: {e}", self.addr)))?
                    .connect_timeout(Duration::from_secs(3))
                    .connect()
                    .await
                    .map_err(|e| {
                        ExecutorError::Daemon(format!(
                            "cannot reach the daemon at {} ({e}); start it with `neurovisor serve`",
                            self.addr
                        ))
                    })
            })
            .await?;
        Ok(SandboxClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    fn status(&self, s: tonic::Status) -> ExecutorError {
        match s.code() {
            tonic::Code::InvalidArgument => ExecutorError::Invalid(s.message().to_string()),
            _ => ExecutorError::Daemon(format!("daemon at {}: {}", self.addr, s.message())),
        }
    }
}

#[async_trait::async_trait]
impl CodeExecutor for DaemonExecutor {
    async fn languages(&self) -> Result<Vec<Language>, ExecutorError> {
        let mut c = self.client().await?;
        let r = c
            .languages(LanguagesRequest {})
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        Ok(r.languages
            .into_iter()
            .map(|l| Language {
                name: l.name,
                version: l.version,
            })
            .collect())
    }

    async fn execute(&self, req: &ExecRequest) -> Result<Execution, ExecutorError> {
        let mut c = self.client().await?;
        let mut request = tonic::Request::new(ExecuteRequest {
            language: req.language.clone(),
            code: req.code.clone(),
            args: req.args.clone(),
            stdin: req.stdin.clone().into(),
            env: req.env.clone().into_iter().collect(),
            timeout_ms: u32::try_from(req.timeout.as_millis()).unwrap_or(u32::MAX),
            max_output_bytes: req.max_output_bytes,
        });
        if let Ok(v) = req.trace_id.parse() {
            request
                .metadata_mut()
                .insert(crate::server::trace::TRACE_HEADER, v);
        }
        let mut stream = c.execute(request).await.map_err(|s| self.status(s))?.into_inner();
        let mut out = Collected::default();
        while let Some(msg) = stream.message().await.map_err(|s| self.status(s))? {
            match msg.event {
                Some(Event::Stdout(b)) => out.stdout.extend_from_slice(&b),
                Some(Event::Stderr(b)) => out.stderr.extend_from_slice(&b),
                Some(Event::Result(r)) => {
                    return Ok(Execution {
                        outcome: ExecOutcome {
                            vm_id: r.vm_id,
                            trace_id: r.trace_id,
                            exit_code: r.exit_code,
                            signal: r.signal,
                            timed_out: r.timed_out,
                            oom_killed: r.oom_killed,
                            stdout_truncated: r.stdout_truncated,
                            stderr_truncated: r.stderr_truncated,
                            stdout_bytes: r.stdout_bytes,
                            stderr_bytes: r.stderr_bytes,
                            duration_ms: r.duration_us as f64 / 1000.0,
                            ..Default::default()
                        },
                        stdout: out.stdout,
                        stderr: out.stderr,
                        wait_ms: Some(r.wait_us as f64 / 1000.0),
                        warm: Some(r.warm),
                    });
                }
                None => {}
            }
        }
        Err(ExecutorError::Daemon(format!(
            "daemon at {} ended the stream without a result",
            self.addr
        )))
    }
}
