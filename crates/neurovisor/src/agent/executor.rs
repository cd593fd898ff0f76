//! Where the agent's `execute_code` calls run: each in a fresh VM, through one
//! small trait with three implementations: the daemon's pool ([`PoolExecutor`]),
//! a VM booted directly ([`SandboxExecutor`], the CLI without a daemon), and a
//! running daemon's `neurovisor.v1.Sandbox/Execute` ([`DaemonExecutor`], the CLI
//! when a daemon is reachable). The agent loop and the MCP server both run
//! their `execute_code` calls through it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::VmSize;
use crate::daemon_client::{DaemonClient, DaemonEndpoint, DaemonError};
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
    /// Runs `req` in a fresh VM that is destroyed afterwards (also when the
    /// returned future is dropped). Output bytes are counted into `progress`
    /// as they arrive.
    async fn execute(&self, req: &ExecRequest, progress: &OutputProgress)
        -> Result<Execution, ExecutorError>;
}

/// Bytes of output an execution has produced so far, readable while it runs
/// (the MCP server's progress notifications).
#[derive(Debug, Default)]
pub struct OutputProgress(AtomicU64);

impl OutputProgress {
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Collects output (already capped at `max_output_bytes`).
struct Collected<'p> {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    progress: &'p OutputProgress,
}

impl<'p> Collected<'p> {
    fn new(progress: &'p OutputProgress) -> Self {
        Self {
            stdout: Vec::new(),
            stderr: Vec::new(),
            progress,
        }
    }

    fn push(&mut self, o: Output<'_>) {
        let b = match o {
            Output::Stdout(b) => {
                self.stdout.extend_from_slice(b);
                b
            }
            Output::Stderr(b) => {
                self.stderr.extend_from_slice(b);
                b
            }
        };
        self.progress.0.fetch_add(b.len() as u64, Ordering::Relaxed);
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

    async fn execute(
        &self,
        req: &ExecRequest,
        progress: &OutputProgress,
    ) -> Result<Execution, ExecutorError> {
        let mut out = Collected::new(progress);
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

    async fn execute(
        &self,
        req: &ExecRequest,
        progress: &OutputProgress,
    ) -> Result<Execution, ExecutorError> {
        // Checked before a VM is taken from the pool.
        req.validate(self.pool.sandbox().images())?;
        let mut lease = self.pool.acquire().await?;
        let mut out = Collected::new(progress);
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
    endpoint: DaemonEndpoint,
    client: tokio::sync::OnceCell<DaemonClient>,
}

impl DaemonExecutor {
    pub fn new(endpoint: DaemonEndpoint) -> Self {
        Self {
            endpoint,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<DaemonClient, ExecutorError> {
        self.daemon().await.map_err(daemon_error)
    }

    /// The daemon's client, connected on first use.
    pub async fn daemon(&self) -> Result<DaemonClient, DaemonError> {
        let c = self
            .client
            .get_or_try_init(|| DaemonClient::connect(&self.endpoint))
            .await?;
        Ok(c.clone())
    }
}

fn daemon_error(e: DaemonError) -> ExecutorError {
    match e {
        DaemonError::Invalid(m) => ExecutorError::Invalid(m),
        DaemonError::Other(m) | DaemonError::BadAddress(m) | DaemonError::NotFound(m) => {
            ExecutorError::Daemon(m)
        }
    }
}

#[async_trait::async_trait]
impl CodeExecutor for DaemonExecutor {
    async fn languages(&self) -> Result<Vec<Language>, ExecutorError> {
        self.client().await?.languages().await.map_err(daemon_error)
    }

    async fn execute(
        &self,
        req: &ExecRequest,
        progress: &OutputProgress,
    ) -> Result<Execution, ExecutorError> {
        let mut out = Collected::new(progress);
        let mut sink = |o: Output<'_>| out.push(o);
        let r = self
            .client()
            .await?
            .execute(req, &mut sink)
            .await
            .map_err(daemon_error)?;
        Ok(Execution {
            outcome: r.outcome,
            stdout: out.stdout,
            stderr: out.stderr,
            wait_ms: Some(r.wait_ms),
            warm: Some(r.warm),
        })
    }
}
