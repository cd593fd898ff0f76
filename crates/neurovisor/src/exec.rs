//! One execution end to end: validate, boot a fresh VM, run the code, stream
//! its output, destroy the VM.
//!
//! [`Sandbox::run`] is what `neurovisor run` uses; [`Sandbox::boot`] and
//! [`ReadyVm`] split it so callers (the benchmark, later the pool) can boot
//! ahead of time. A [`ReadyVm`] serves exactly one execution; dropping it at any
//! point (error, timeout, Ctrl-C) releases the VM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use hyper_util::rt::TokioIo;
use neurovisor_proto::guest::execution_service_client::ExecutionServiceClient;
use neurovisor_proto::guest::{
    execute_event::Event, ExecuteRequest, ExitStatus, HealthRequest, HealthResponse, Limits,
};
use neurovisor_proto::GUEST_AGENT_PORT;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::boot::{BootStats, Budget};
use crate::channel::text::sanitize_capped;
use crate::channel::vsock::GuestStream;
use crate::channel::{sanitize_guest_text, GuestError, GuestIo};
use crate::config::VmSize;
use crate::images::{ImageError, ImageSet};
use crate::security::rate_limit::RateLimitConfig;
use crate::vmm::{Vm, VmConfig, VmmBackend, VmmError};

pub use neurovisor_proto::limits::{
    MAX_ARGS, MAX_ARGS_BYTES, MAX_CODE_BYTES, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_REQUEST_BYTES, MAX_STDIN_BYTES,
};
/// The largest output cap a request may ask for (per stream).
pub const MAX_OUTPUT_CAP: u64 = 64 << 20;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;
/// Extra time the host allows past the guest's own deadline before it gives up
/// on an unresponsive guest (TCG guests can be slow to report).
const HOST_DEADLINE_SLACK: Duration = Duration::from_secs(15);
/// The largest gRPC message the host accepts from the guest agent. A real
/// agent sends output in chunks of at most 32 KiB (`guest-agent/src/exec.rs`
/// `pump`) and small Health/exit messages; 1 MiB + 64 KiB leaves room without
/// letting a guest make the host buffer big frames. A bigger frame is a
/// protocol error (the VM is destroyed).
pub const MAX_GUEST_MESSAGE: usize = (1 << 20) + (64 << 10);
/// The most output bytes (stdout and stderr together) the host reads and
/// discards past the output cap before it gives up on a guest that ignores
/// the cap: a real agent never sends more than the cap per stream.
pub const MAX_DISCARDED_OUTPUT: u64 = 1 << 20;
/// Output byte counts the guest reports beyond this (1 PiB) are refused.
pub const MAX_REPORTED_BYTES: u64 = 1 << 50;
/// The highest signal number a Linux guest can report (SIGRTMAX).
pub const MAX_SIGNAL: i32 = 64;
/// Decoded guest events in flight from the guest I/O task to the execution's
/// caller. Small: the reader waits when the caller's sink waits, so HTTP/2
/// flow control still holds the guest.
const GUEST_EVENT_QUEUE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("guest agent gave no result within {0:?} (the VM was destroyed)")]
    Unresponsive(Duration),
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    /// The boot took longer than its stall budget (see [`crate::boot`]).
    #[error("VM boot stalled: VM {vm_id} was not ready after {after:.1?} (stall budget: {basis}); console log tail:\n{console_tail}")]
    BootStalled {
        vm_id: String,
        after: Duration,
        basis: String,
        console_tail: String,
    },
    /// Every boot attempt for this request failed.
    #[error("VM boot failed {attempts} times; the last attempt: {last}")]
    BootFailed { attempts: u32, last: Box<ExecError> },
}

impl ExecError {
    /// True when the request itself was wrong (as opposed to a sandbox failure).
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::InvalidRequest(_) | Self::Guest(GuestError::Rejected(_))
        )
    }

    /// A boot failure that a fresh VM may not repeat (stall, guest died or did
    /// not answer), as opposed to a host problem (missing binary, state
    /// directory, jail set-up, bad image) that would fail again at once.
    pub fn is_retryable_boot_failure(&self) -> bool {
        match self {
            Self::BootStalled { .. } | Self::Guest(_) | Self::Unresponsive(_) | Self::Protocol(_) => true,
            Self::Vmm(e) => matches!(
                e,
                VmmError::DiedDuringBoot { .. }
                    | VmmError::BootTimeout { .. }
                    | VmmError::HelperExited { .. }
                    | VmmError::Channel(_)
                    | VmmError::Qmp(_)
            ),
            Self::InvalidRequest(_) | Self::Image(_) | Self::BootFailed { .. } => false,
        }
    }

    /// What kind of guest misbehaviour this is, if the guest is to blame
    /// (`protocol`, `unresponsive`, `channel`), as a bounded label value.
    pub fn guest_fault(&self) -> Option<&'static str> {
        match self {
            Self::Protocol(_) => Some("protocol"),
            Self::Unresponsive(_) => Some("unresponsive"),
            Self::Guest(_) => Some("channel"),
            _ => None,
        }
    }

    pub fn is_stall(&self) -> bool {
        match self {
            Self::BootStalled { .. } => true,
            Self::BootFailed { last, .. } => last.is_stall(),
            _ => false,
        }
    }
}

/// Test hook: the next `remaining` boots of a [`Sandbox`] get `cmdline` added to
/// their kernel command line (e.g. `root=/dev/nothing rootwait`, a boot that
/// never reaches init). Only reachable through [`Sandbox::inject_boot_fault`],
/// never from a request.
#[derive(Default)]
struct BootFault {
    remaining: AtomicUsize,
    cmdline: Mutex<Vec<String>>,
}

impl BootFault {
    fn take(&self) -> Vec<String> {
        let took = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match took {
            Ok(_) => self.cmdline.lock().map(|c| c.clone()).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

/// A request as a transport carries it: zeros mean "the default".
#[derive(Debug, Clone, Default)]
pub struct WireRequest {
    pub language: String,
    pub code: String,
    pub args: Vec<String>,
    pub stdin: Vec<u8>,
    pub env: Vec<(String, String)>,
    pub timeout_ms: u32,
    pub max_output_bytes: u64,
    pub trace_id: String,
    pub llm_bridge: bool,
}

/// A POSIX-portable environment variable name.
pub(crate) fn valid_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        && k.len() <= 256
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct ExecRequest {
    pub language: String,
    pub code: String,
    pub args: Vec<String>,
    #[serde(skip)]
    pub stdin: Vec<u8>,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub max_output_bytes: u64,
    pub trace_id: String,
    /// The program reaches the LLM server through the inference bridge
    /// ([`crate::llm::bridge`]); checked by [`Sandbox::check_bridge`].
    pub llm_bridge: bool,
}

impl ExecRequest {
    pub fn new(language: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            language: language.into(),
            code: code.into(),
            args: Vec::new(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
            trace_id: uuid::Uuid::now_v7().to_string(),
            llm_bridge: false,
        }
    }

    /// Builds a request from a transport's fields, resolving "0 means
    /// default" here and nowhere else, then validates it against the image.
    /// Every transport (CLI, gRPC, agent, MCP, ...) comes through here or
    /// [`ExecRequest::validate`].
    pub fn from_wire(w: WireRequest, image: &ImageSet) -> Result<Self, ExecError> {
        let req = Self {
            language: w.language,
            code: w.code,
            args: w.args,
            stdin: w.stdin,
            env: w.env.into_iter().collect(),
            timeout: if w.timeout_ms == 0 {
                DEFAULT_TIMEOUT
            } else {
                Duration::from_millis(u64::from(w.timeout_ms))
            },
            max_output_bytes: if w.max_output_bytes == 0 {
                DEFAULT_MAX_OUTPUT
            } else {
                w.max_output_bytes
            },
            trace_id: w.trace_id,
            llm_bridge: w.llm_bridge,
        };
        req.validate(image)?;
        Ok(req)
    }

    /// Checks the request against the image before any VM is booted: all the
    /// guest agent would refuse, and the host's own limits. The message starts
    /// with the field's name and says what would be accepted.
    pub fn validate(&self, image: &ImageSet) -> Result<(), ExecError> {
        let bad = |m: String| Err(ExecError::InvalidRequest(m));
        let available = if image.languages.is_empty() {
            "see the image's Health".to_string()
        } else {
            image.language_names()
        };
        if self.language.is_empty() {
            return bad(format!("language: none given; available: {available}"));
        }
        if !image.languages.is_empty() && !image.has_language(&self.language) {
            let mut msg = format!(
                "language: unknown language '{}'; available: {available}",
                sanitize_capped(&self.language, 64)
            );
            if matches!(self.language.as_str(), "go" | "rust") {
                msg.push_str(" (go and rust are in the full image: build it with `neurovisor images build --image full`, then pass --image full)");
            }
            return bad(msg);
        }
        if self.code.trim().is_empty() {
            return bad("code: empty; pass the program's source".into());
        }
        if self.code.len() > MAX_CODE_BYTES {
            return bad(format!(
                "code: {} bytes; the limit is {MAX_CODE_BYTES} bytes",
                self.code.len()
            ));
        }
        if self.code.contains('\0') {
            return bad("code: contains a NUL byte; source text cannot hold one".into());
        }
        if self.stdin.len() > MAX_STDIN_BYTES {
            return bad(format!(
                "stdin: {} bytes; the limit is {MAX_STDIN_BYTES} bytes",
                self.stdin.len()
            ));
        }
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return bad(format!(
                "timeout: {:?} is out of range; it must be between 1 ms and {} s",
                self.timeout,
                MAX_TIMEOUT.as_secs()
            ));
        }
        if self.max_output_bytes == 0 || self.max_output_bytes > MAX_OUTPUT_CAP {
            return bad(format!(
                "max_output_bytes: {} is out of range; it must be between 1 and {MAX_OUTPUT_CAP}",
                self.max_output_bytes
            ));
        }
        if self.args.len() > MAX_ARGS {
            return bad(format!(
                "args: {} arguments; the limit is {MAX_ARGS}",
                self.args.len()
            ));
        }
        let args_bytes: usize = self.args.iter().map(String::len).sum();
        if args_bytes > MAX_ARGS_BYTES {
            return bad(format!(
                "args: {args_bytes} bytes in all; the limit is {MAX_ARGS_BYTES}"
            ));
        }
        if let Some(i) = self.args.iter().position(|a| a.contains('\0')) {
            return bad(format!("args[{i}]: contains a NUL byte"));
        }
        if self.env.len() > MAX_ENV_VARS {
            return bad(format!(
                "env: {} variables; the limit is {MAX_ENV_VARS}",
                self.env.len()
            ));
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            return bad(format!(
                "env: {env_bytes} bytes in all; the limit is {MAX_ENV_BYTES}"
            ));
        }
        for (k, v) in &self.env {
            if !valid_env_name(k) {
                return bad(format!(
                    "env: invalid variable name '{}'; names are letters, digits and _, not starting with a digit",
                    sanitize_capped(k, 64)
                ));
            }
            if k == "NEUROVISOR_TRACE_ID" {
                return bad("env: NEUROVISOR_TRACE_ID is set by NeuroVisor; pass the trace id instead (x-trace-id, --trace-id)".into());
            }
            if v.contains('\0') {
                return bad(format!("env: the value of {k} contains a NUL byte"));
            }
        }
        if self.trace_id.len() > 128 || self.trace_id.chars().any(|c| c.is_control()) {
            return bad("trace_id: at most 128 characters, no control characters".into());
        }
        Ok(())
    }

    fn to_proto(&self) -> ExecuteRequest {
        ExecuteRequest {
            language: self.language.clone(),
            code: self.code.clone(),
            args: self.args.clone(),
            stdin: self.stdin.clone().into(),
            env: self.env.clone().into_iter().collect(),
            timeout_ms: u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX),
            limits: Some(Limits {
                max_output_bytes: self.max_output_bytes,
                ..Default::default()
            }),
            trace_id: self.trace_id.clone(),
        }
    }
}

/// A chunk of program output, delivered as soon as the guest sends it.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    Stdout(&'a [u8]),
    Stderr(&'a [u8]),
}

impl Output<'_> {
    pub fn len(&self) -> usize {
        match self {
            Output::Stdout(b) | Output::Stderr(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where output goes while an execution runs. `write` may wait (a bounded
/// channel to a slow client): the host then stops reading from the guest, and
/// HTTP/2 flow control holds the guest agent, which holds the program. Plain
/// closures are sinks that never wait.
#[async_trait::async_trait]
pub trait OutputSink: Send {
    async fn write(&mut self, out: Output<'_>);
}

#[async_trait::async_trait]
impl<F: FnMut(Output<'_>) + Send> OutputSink for F {
    async fn write(&mut self, out: Output<'_>) {
        self(out)
    }
}

/// How an execution ended.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExecOutcome {
    pub vm_id: String,
    pub trace_id: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// The program's wall time as measured in the guest.
    pub duration_ms: f64,
    /// Spawn until the guest agent answered Health.
    pub boot_ms: f64,
    /// Execute call until the final status arrived.
    pub execute_ms: f64,
    /// Everything, boot and teardown included.
    pub total_ms: f64,
    /// The program ran in an interpreter started before the request (false:
    /// one started for it; see the guest agent's `warm.rs`).
    pub warm_interpreter: bool,
    /// The VM was restored from a snapshot (`--snapshot`) instead of booted.
    pub restored: bool,
}

impl ExecOutcome {
    /// Exit status in shell convention: the exit code, or 128 + signal;
    /// always within 0..=255 (values out of range, which [`ReadyVm::execute`]
    /// never lets through, give 1).
    pub fn shell_status(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) if (0..=255).contains(&c) => c,
            (None, Some(s)) if (1..=MAX_SIGNAL).contains(&s) => 128 + s,
            _ => 1,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Boots VMs from one backend and image set.
pub struct Sandbox {
    backend: Arc<dyn VmmBackend>,
    images: ImageSet,
    state_dir: PathBuf,
    /// Boot times so far, and the stall budget derived from them.
    boot_stats: BootStats,
    /// Limits on what each VM's guest sends over vsock.
    pub rate_limit: RateLimitConfig,
    fault: BootFault,
    /// Where guest bytes are read (see [`GuestIo`]).
    guest_io: GuestIo,
    /// The owner's metrics and eBPF guard, handed to every VM.
    pub hooks: crate::supervisor::VmHooks,
    /// Languages whose interpreter each VM starts ahead of its request
    /// (`nv.warm=`; the guest skips those it cannot). [`Sandbox::run`]
    /// starts only the request's language, if it is one of them.
    pub warm_languages: Vec<String>,
    /// `--snapshot`: VMs are restored from a template instead of booted.
    pub snapshots: Option<Arc<crate::snapshot::Snapshots>>,
    /// The inference bridge, when this sandbox's programs may ask for it.
    pub llm_bridge: Option<Arc<crate::llm::bridge::LlmBridge>>,
    /// `--network`: every VM gets a NIC behind its own gateway with this
    /// policy (and is booted, never restored: its link is made at boot).
    pub network: Option<Arc<crate::net::NetSettings>>,
}

/// What the daemon's VMs start ahead by default: the interpreter whose
/// start-up dominates short executions.
pub const DEFAULT_WARM_LANGUAGES: &[&str] = &["python"];

impl Sandbox {
    pub fn new(backend: Arc<dyn VmmBackend>, images: ImageSet, state_dir: PathBuf) -> Self {
        Self {
            backend,
            images,
            state_dir,
            boot_stats: BootStats::default(),
            rate_limit: RateLimitConfig::default(),
            fault: BootFault::default(),
            guest_io: GuestIo::inline(),
            hooks: Default::default(),
            warm_languages: DEFAULT_WARM_LANGUAGES.iter().map(|l| l.to_string()).collect(),
            snapshots: None,
            llm_bridge: None,
            network: None,
        }
    }

    /// The same backend, state, limits, hooks, boot statistics, warm
    /// languages and snapshots, with other images (a sandbox created with
    /// its own image).
    pub fn sibling(&self, images: ImageSet) -> Self {
        Self {
            backend: self.backend.clone(),
            images,
            state_dir: self.state_dir.clone(),
            boot_stats: self.boot_stats.clone(),
            rate_limit: self.rate_limit,
            fault: BootFault::default(),
            guest_io: self.guest_io.clone(),
            hooks: self.hooks.clone(),
            warm_languages: self.warm_languages.clone(),
            snapshots: self.snapshots.clone(),
            llm_bridge: self.llm_bridge.clone(),
            network: self.network.clone(),
        }
    }

    /// Reads guest bytes (vsock handshake, READY, the agent's HTTP/2
    /// connection, Health and the Execute stream) on `io`'s runtime.
    pub fn with_guest_io(mut self, io: GuestIo) -> Self {
        self.guest_io = io;
        self
    }

    pub fn guest_io(&self) -> &GuestIo {
        &self.guest_io
    }

    /// Shares boot statistics (and their budget configuration) with others.
    pub fn with_boot_stats(mut self, stats: BootStats) -> Self {
        self.boot_stats = stats;
        self
    }

    pub fn boot_stats(&self) -> &BootStats {
        &self.boot_stats
    }

    /// The key boot times are kept under: backend and size.
    pub fn boot_key(&self, size: VmSize) -> String {
        format!("{}/{}", self.backend.name(), size.name())
    }

    /// Test hook (see `BootFault`): the next `boots` boots get `cmdline` on
    /// their kernel command line.
    #[doc(hidden)]
    pub fn inject_boot_fault(&self, boots: usize, cmdline: &[&str]) {
        if let Ok(mut c) = self.fault.cmdline.lock() {
            *c = cmdline.iter().map(|s| s.to_string()).collect();
        }
        self.fault.remaining.store(boots, Ordering::SeqCst);
    }

    pub fn images(&self) -> &ImageSet {
        &self.images
    }

    /// The backend and images, e.g. to rebuild a sandbox on another state dir.
    pub fn into_parts(self) -> (Arc<dyn VmmBackend>, ImageSet) {
        (self.backend, self.images)
    }

    /// A request for the inference bridge where there is none is refused
    /// (before a VM is taken).
    pub fn check_bridge(&self, req: &ExecRequest) -> Result<(), ExecError> {
        if req.llm_bridge && self.llm_bridge.is_none() {
            return Err(ExecError::InvalidRequest(
                "llm_bridge: this daemon has no inference bridge; start it with --llm-bridge (the LLM server: --llm-bridge-url or --ollama-host)".into(),
            ));
        }
        Ok(())
    }

    /// Whether its VMs can be paused to disk (a sandbox's `Pause`): every
    /// VM of a snapshot pool, or any VM where the backend snapshots booted
    /// ones.
    pub fn can_pause(&self) -> bool {
        self.snapshots.is_some() || self.backend.snapshots_booted_vms()
    }

    pub fn backend(&self) -> &dyn VmmBackend {
        self.backend.as_ref()
    }

    pub fn vm_config(&self, size: VmSize, extra_cmdline: Vec<String>) -> VmConfig {
        VmConfig {
            id: uuid::Uuid::now_v7().to_string(),
            size,
            kernel: self.images.kernel.clone(),
            rootfs: self.images.rootfs.clone(),
            state_dir: self.state_dir.clone(),
            extra_cmdline,
            rate_limit: self.rate_limit,
            guest_io: self.guest_io.clone(),
            hooks: self.hooks.clone(),
            guest_memory: None,
            network: self.network.clone(),
        }
    }

    /// Boots a fresh VM and waits until its agent answers Health; a boot that
    /// stalls or dies is retried on a fresh VM (up to the budget's `retries`).
    pub async fn boot(&self, size: VmSize) -> Result<ReadyVm, ExecError> {
        self.boot_warm(size, &self.warm_languages).await
    }

    /// [`Sandbox::boot`] with its own warm languages.
    pub async fn boot_warm(&self, size: VmSize, warm: &[String]) -> Result<ReadyVm, ExecError> {
        if let Some(vm) = self.try_restore(size, warm).await {
            return Ok(vm);
        }
        let retries = self.boot_stats.config().retries;
        let mut attempt = 0;
        loop {
            match self.boot_attempt_warm(size, attempt, warm).await {
                Ok(vm) => return Ok(vm),
                Err(e) if e.is_retryable_boot_failure() && attempt < retries => {
                    let vm_id = match &e {
                        ExecError::BootStalled { vm_id, .. } => vm_id.as_str(),
                        _ => "",
                    };
                    tracing::warn!(
                        attempt = attempt + 1,
                        "VM boot failed, retrying on a fresh VM: {e}"
                    );
                    self.boot_stats.record_retry(attempt, vm_id, &e.to_string());
                    attempt += 1;
                }
                Err(e) if attempt > 0 => {
                    return Err(ExecError::BootFailed {
                        attempts: attempt + 1,
                        last: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One boot attempt (`attempt` 0 is the first) under its stall budget.
    /// With `--snapshot` the VM is restored when its template restores
    /// (a failed restore falls through to the boot; see [`Sandbox::try_restore`]).
    pub async fn boot_attempt(&self, size: VmSize, attempt: u32) -> Result<ReadyVm, ExecError> {
        if let Some(vm) = self.try_restore(size, &self.warm_languages).await {
            return Ok(vm);
        }
        self.boot_attempt_warm(size, attempt, &self.warm_languages).await
    }

    /// A VM restored from the snapshot of `size` and `warm`, if snapshots
    /// are on and it restores. A restore that fails is logged and counted
    /// against its template ([`crate::snapshot::Snapshots::failed`]); the
    /// caller boots instead, so the request never sees the failure.
    pub async fn try_restore(&self, size: VmSize, warm: &[String]) -> Option<ReadyVm> {
        if self.network.is_some() {
            return None;
        }
        let snaps = self.snapshots.as_ref()?;
        let t = snaps.template(self, size, warm).await?;
        let span = tracing::info_span!("vm.restore", size = size.name(), vm_id = tracing::field::Empty);
        let counters = &self.hooks.counters;
        match crate::snapshot::restore(self, &t, size)
            .instrument(span.clone())
            .await
        {
            Ok(vm) => {
                span.record("vm_id", vm.id());
                t.restored();
                self.boot_stats
                    .record_ready(&format!("{}/restore", self.boot_key(size)), vm.boot_time);
                counters.restore("restored");
                counters
                    .snapshot_restore_seconds
                    .observe(vm.boot_time.as_secs_f64());
                Some(vm)
            }
            Err(e) => {
                counters.restore("failed");
                span.in_scope(|| tracing::warn!("restore failed, booting instead: {e}"));
                snaps.failed(&t, &e.to_string()).await;
                None
            }
        }
    }

    async fn boot_attempt_warm(
        &self,
        size: VmSize,
        attempt: u32,
        warm: &[String],
    ) -> Result<ReadyVm, ExecError> {
        let span = tracing::info_span!(
            "vm.boot",
            size = size.name(),
            attempt,
            vm_id = tracing::field::Empty,
            backend = self.backend.name()
        );
        self.boot_one(size, attempt, warm).instrument(span).await
    }

    async fn boot_one(&self, size: VmSize, attempt: u32, warm: &[String]) -> Result<ReadyVm, ExecError> {
        let key = self.boot_key(size);
        let budget = self.boot_stats.budget(&key, attempt);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + budget.timeout;
        let mut extra = self.fault.take();
        if !warm.is_empty() {
            extra.push(format!("nv.warm={}", warm.join(",")));
        }
        let cfg = self.vm_config(size, extra);
        let mut vm = self.backend.spawn(&cfg).await?;
        tracing::Span::current().record("vm_id", vm.id());
        let stalled = |vm: &dyn Vm, console_tail: String| {
            self.stalled(vm.id(), &key, started.elapsed(), &budget, console_tail)
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match vm.wait_ready(left).await {
            Ok(()) => {}
            Err(VmmError::BootTimeout { console_tail, .. }) => {
                let e = stalled(vm.as_ref(), console_tail);
                vm.kill().await;
                return Err(e);
            }
            Err(e) => {
                vm.kill().await;
                return Err(e.into());
            }
        }
        let io = self.guest_io.clone();
        let connected = tokio::time::timeout_at(deadline, async {
            let stream = vm.connect(GUEST_AGENT_PORT).await?;
            // The HTTP/2 connection task is spawned where `guest_client`
            // runs, and Health is decoded there: on the guest I/O runtime.
            io.run(async move {
                let channel = guest_channel(stream).await?;
                let mut client = execution_client(channel.clone());
                let health = client.health(HealthRequest {}).await.map_err(GuestError::from)?;
                Ok::<_, ExecError>((channel, sanitize_health(health.into_inner())))
            })
            .await
            .map_err(|e| GuestError::Connect(e.to_string()))?
        })
        .await
        .unwrap_or_else(|_| {
            Err(stalled(
                vm.as_ref(),
                "(the agent said READY but did not answer Health)".into(),
            ))
        });
        match connected {
            Ok((channel, health)) => {
                let boot_time = started.elapsed();
                self.boot_stats.record_ready(&key, boot_time);
                Ok(ReadyVm {
                    vm: Some(vm),
                    client: execution_client(channel.clone()),
                    channel,
                    io: self.guest_io.clone(),
                    boot_time,
                    health,
                    restored: false,
                    counters: self.hooks.counters.clone(),
                    ready_at: Instant::now(),
                    bridge: self.llm_bridge.clone(),
                })
            }
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }

    fn stalled(
        &self,
        vm_id: &str,
        key: &str,
        after: Duration,
        budget: &Budget,
        console_tail: String,
    ) -> ExecError {
        self.boot_stats.record_stall(key);
        let console =
            if console_tail.trim().is_empty() || console_tail.trim_start().starts_with("--- VMM log") {
                "empty: the guest kernel printed nothing"
            } else {
                "has output"
            };
        tracing::warn!(
            vm = vm_id,
            after_ms = after.as_millis() as u64,
            budget = %budget.basis,
            console,
            "VM boot stalled"
        );
        ExecError::BootStalled {
            vm_id: vm_id.to_string(),
            after,
            basis: budget.basis.clone(),
            console_tail,
        }
    }

    /// Validates, boots a fresh VM, runs the request, destroys the VM.
    pub async fn run(
        &self,
        req: &ExecRequest,
        size: VmSize,
        on_output: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, ExecError> {
        req.validate(&self.images)?;
        let started = Instant::now();
        // One execution: of the warm languages, only its own is worth starting.
        let warm: Vec<String> = self
            .warm_languages
            .iter()
            .filter(|l| **l == req.language)
            .cloned()
            .collect();
        let mut vm = self.boot_warm(size, &warm).await?;
        let result = vm.execute(req, on_output).await;
        vm.destroy().await;
        let mut outcome = result?;
        outcome.total_ms = ms(started.elapsed());
        Ok(outcome)
    }
}

/// One HTTP/2 connection over an already connected vsock stream. The VM is
/// ephemeral, so there is nothing to reconnect to: the connector hands out the
/// stream once. Its reads are paced by the VM's rate limiter, so a guest that
/// sends too fast meets HTTP/2 flow control.
pub(crate) async fn guest_client(stream: GuestStream) -> Result<ExecutionServiceClient<Channel>, GuestError> {
    guest_channel(stream).await.map(execution_client)
}

/// The agent's `ExecutionService` on an open channel, with the host's limits.
pub(crate) fn execution_client(channel: Channel) -> ExecutionServiceClient<Channel> {
    ExecutionServiceClient::new(channel)
        .max_decoding_message_size(MAX_GUEST_MESSAGE)
        .max_encoding_message_size(MAX_REQUEST_BYTES)
}

/// The HTTP/2 channel over one guest stream, on which every service of the
/// agent is called (see [`guest_client`]).
pub(crate) async fn guest_channel(stream: GuestStream) -> Result<Channel, GuestError> {
    let slot = Arc::new(Mutex::new(Some(stream)));
    Endpoint::from_static("http://guest-agent.vsock")
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            async move {
                taken
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("guest connection already used"))
            }
        }))
        .await
        .map_err(|e| GuestError::Connect(e.to_string()))
}

/// One decoded event of the Execute stream.
enum GuestEvent {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
    Exit(ExitStatus),
}

/// The Execute call and its stream decode loop, run on the guest I/O
/// runtime: sends each decoded event to `tx`, stops at the first exit status
/// (the stream is dropped: whatever follows is never read), at the first
/// error (sent on), or when the receiver is gone.
async fn read_execute_stream(
    mut client: ExecutionServiceClient<Channel>,
    req: ExecuteRequest,
    tx: tokio::sync::mpsc::Sender<Result<GuestEvent, ExecError>>,
) {
    let read = async {
        let mut stream = client.execute(req).await.map_err(GuestError::from)?.into_inner();
        while let Some(ev) = stream.message().await.map_err(stream_error)? {
            let ev = match ev.event {
                Some(Event::Stdout(b)) => GuestEvent::Stdout(b),
                Some(Event::Stderr(b)) => GuestEvent::Stderr(b),
                Some(Event::Exit(status)) => {
                    let _ = tx.send(Ok(GuestEvent::Exit(status))).await;
                    return Ok(());
                }
                None => continue,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(());
            }
        }
        Err(ExecError::Protocol(
            "the stream ended without an exit status".into(),
        ))
    };
    if let Err(e) = read.await {
        let _ = tx.send(Err(e)).await;
    }
}

/// Health as the host keeps it: every text field sanitized.
pub(crate) fn sanitize_health(mut h: HealthResponse) -> HealthResponse {
    for l in &mut h.languages {
        l.name = sanitize_guest_text(&l.name);
        l.version = sanitize_guest_text(&l.version);
    }
    h.agent_version = sanitize_guest_text(&h.agent_version);
    h.kernel = sanitize_guest_text(&h.kernel);
    h
}

/// A failed read of the execution stream. A frame over the host's decoder
/// limit is the guest breaking the protocol, not a call failure.
fn stream_error(s: tonic::Status) -> ExecError {
    if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
        return ExecError::Protocol(format!(
            "the guest sent a message over the {MAX_GUEST_MESSAGE}-byte limit ({})",
            sanitize_guest_text(s.message())
        ));
    }
    GuestError::from(s).into()
}

/// Bytes of one output stream as the host saw them.
#[derive(Debug, Default, Clone, Copy)]
struct StreamCount {
    /// Everything the guest sent.
    received: u64,
    /// What was handed on (at most the cap).
    forwarded: u64,
}

/// The host's own output cap: per stream, at most `cap` bytes are forwarded,
/// the chunk that crosses it is cut; past the cap the bytes are counted and
/// dropped, and more than [`MAX_DISCARDED_OUTPUT`] of them (both streams
/// together) end the execution with a protocol error.
#[derive(Debug)]
pub(crate) struct OutputMeter {
    cap: u64,
    stdout: StreamCount,
    stderr: StreamCount,
}

impl OutputMeter {
    pub(crate) fn new(cap: u64) -> Self {
        Self {
            cap,
            stdout: StreamCount::default(),
            stderr: StreamCount::default(),
        }
    }

    /// The part of `chunk` to forward (possibly empty).
    pub(crate) fn admit<'a>(&mut self, is_stdout: bool, chunk: &'a [u8]) -> Result<&'a [u8], ExecError> {
        let cap = self.cap;
        let s = if is_stdout {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        let len = chunk.len() as u64;
        s.received = s.received.saturating_add(len);
        let take = cap.saturating_sub(s.forwarded).min(len);
        s.forwarded += take;
        let discarded = self.discarded();
        if discarded > MAX_DISCARDED_OUTPUT {
            return Err(ExecError::Protocol(format!(
                "the guest ignored the output cap of {cap} bytes per stream and sent {discarded} bytes past it \
                 (stdout {} bytes, stderr {} bytes); the VM was destroyed",
                self.stdout.received, self.stderr.received
            )));
        }
        // `take` <= `chunk.len()`, so this fits in usize.
        Ok(&chunk[..take as usize])
    }

    fn discarded(&self) -> u64 {
        (self.stdout.received - self.stdout.forwarded) + (self.stderr.received - self.stderr.forwarded)
    }
}

/// Checks the guest's exit status and combines it with what the host saw.
///
/// - exit code in 0..=255, signal in 1..=[`MAX_SIGNAL`], exactly one of them
///   (neither only for a timeout); anything else is a protocol error;
/// - `stdout_bytes`/`stderr_bytes`: what the program wrote as the guest
///   reports it, never less than what the host received; counts over
///   [`MAX_REPORTED_BYTES`] are refused;
/// - truncated: the guest's flag, or more bytes than the cap (reported or
///   received);
/// - the program's duration is clamped to the host's own time for the call.
pub(crate) fn check_exit(
    status: &ExitStatus,
    meter: &OutputMeter,
    execute_time: Duration,
) -> Result<ExecOutcome, ExecError> {
    let invalid = |what: String| {
        Err(ExecError::Protocol(format!(
            "the guest sent an invalid value: {what}"
        )))
    };
    if let Some(c) = status.exit_code {
        if !(0..=255).contains(&c) {
            return invalid(format!("exit code {c} (must be 0..=255)"));
        }
    }
    if let Some(s) = status.signal {
        if !(1..=MAX_SIGNAL).contains(&s) {
            return invalid(format!("signal {s} (must be 1..={MAX_SIGNAL})"));
        }
    }
    match (status.exit_code, status.signal) {
        (Some(c), Some(s)) => return invalid(format!("both exit code {c} and signal {s}")),
        (None, None) if !status.timed_out => return invalid("neither an exit code nor a signal".into()),
        _ => {}
    }
    for (name, n) in [
        ("stdout_bytes", status.stdout_bytes),
        ("stderr_bytes", status.stderr_bytes),
    ] {
        if n > MAX_REPORTED_BYTES {
            return invalid(format!("{name} {n} (more than {MAX_REPORTED_BYTES})"));
        }
    }
    let cap = meter.cap;
    let stdout_bytes = status.stdout_bytes.max(meter.stdout.received);
    let stderr_bytes = status.stderr_bytes.max(meter.stderr.received);
    let host_us = u64::try_from(execute_time.as_micros()).unwrap_or(u64::MAX);
    Ok(ExecOutcome {
        exit_code: status.exit_code,
        signal: status.signal,
        timed_out: status.timed_out,
        oom_killed: status.oom_killed,
        stdout_truncated: status.stdout_truncated || stdout_bytes > cap,
        stderr_truncated: status.stderr_truncated || stderr_bytes > cap,
        stdout_bytes,
        stderr_bytes,
        duration_ms: status.duration_us.min(host_us) as f64 / 1000.0,
        warm_interpreter: status.warm_interpreter,
        ..Default::default()
    })
}

/// A booted VM whose agent is serving. Serves one execution.
pub struct ReadyVm {
    vm: Option<Box<dyn Vm>>,
    client: ExecutionServiceClient<Channel>,
    /// The connection `client` is on; the agent's other services share it.
    channel: Channel,
    /// Where the client's calls are made and their answers decoded.
    io: GuestIo,
    pub boot_time: Duration,
    pub health: HealthResponse,
    /// Restored from a snapshot (`boot_time` is then the restore's).
    pub restored: bool,
    /// Where its lifetime is counted when it is destroyed.
    counters: crate::metrics::VmCounters,
    ready_at: Instant,
    /// The inference bridge its programs may ask for (`llm_bridge`).
    pub(crate) bridge: Option<Arc<crate::llm::bridge::LlmBridge>>,
}

impl ReadyVm {
    pub(crate) fn new(
        vm: Box<dyn Vm>,
        channel: Channel,
        io: GuestIo,
        boot_time: Duration,
        health: HealthResponse,
        counters: crate::metrics::VmCounters,
    ) -> Self {
        Self {
            vm: Some(vm),
            client: execution_client(channel.clone()),
            channel,
            io,
            boot_time,
            health,
            restored: false,
            counters,
            ready_at: Instant::now(),
            bridge: None,
        }
    }

    pub fn id(&self) -> &str {
        self.vm.as_ref().map(|v| v.id()).unwrap_or("")
    }

    /// The agent's `Files` and `Processes` services, callable while an
    /// execution runs (they share its connection, not its `&mut`).
    pub fn session(&self) -> crate::channel::GuestSession {
        crate::channel::GuestSession::new(self.channel.clone(), self.io.clone())
    }

    /// Pauses the VM and writes its snapshot to `state` and `mem` (see
    /// [`Vm::create_snapshot`]); if that fails, the VM runs on. The caller
    /// destroys the VM afterwards; [`crate::snapshot::resume`] brings it back.
    pub async fn save(&self, state: &std::path::Path, mem: &std::path::Path) -> Result<(), VmmError> {
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| VmmError::Snapshot("the VM is already destroyed".into()))?;
        vm.pause().await?;
        let saved = vm.create_snapshot(state, mem).await;
        if saved.is_err() {
            if let Err(e) = vm.resume().await {
                tracing::warn!(vm = vm.id(), "the VM stays paused after a failed snapshot: {e}");
            }
        }
        saved
    }

    /// The VM's state directory (console log, sockets), while it runs.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.vm.as_ref().map(|v| v.dir())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.vm.as_ref().map(|v| v.pids()).unwrap_or_default()
    }

    /// Without blocking: `Some(how)` if the VM's processes have exited.
    pub fn check_exited(&mut self) -> Option<String> {
        match self.vm.as_mut() {
            Some(vm) => vm.check_exited(),
            None => Some("destroyed".into()),
        }
    }

    /// Asks the agent for Health again (a warm VM may have gone bad while idle).
    pub async fn check_health(&mut self, timeout: Duration) -> Result<(), ExecError> {
        let mut client = self.client.clone();
        let call = self.io.run(async move {
            client
                .health(HealthRequest {})
                .await
                .map(|h| h.get_ref().ready)
                .map_err(GuestError::from)
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(Ok(true))) => Ok(()),
            Ok(Ok(Ok(false))) => Err(ExecError::Protocol("agent reports not ready".into())),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => Err(GuestError::Connect(e.to_string()).into()),
            Err(_) => Err(ExecError::Unresponsive(timeout)),
        }
    }

    /// Runs the request, forwarding output as it arrives.
    ///
    /// The guest is not trusted to keep its side of the protocol: the host
    /// forwards at most `req.max_output_bytes` per stream whatever the guest
    /// sends (see [`OutputMeter`]), gives up with [`ExecError::Protocol`] on a
    /// guest that keeps sending past the cap ([`MAX_DISCARDED_OUTPUT`]), on a
    /// frame over [`MAX_GUEST_MESSAGE`] and on an exit status out of range
    /// ([`check_exit`]); it stops reading at the first exit status (anything
    /// after it is never read). On any error the caller destroys the VM.
    pub async fn execute(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, ExecError> {
        let span = tracing::info_span!(
            "vm.execute",
            language = %req.language,
            vm_id = self.id(),
            restored = self.restored,
            exit_code = tracing::field::Empty,
        );
        let result = self
            .execute_in(req, on_output, &span)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(o) => {
                if let Some(c) = o.exit_code {
                    span.record("exit_code", c);
                }
            }
            Err(e @ ExecError::Unresponsive(_)) => {
                let tail = self.vm.as_ref().map(|v| v.console_tail()).unwrap_or_default();
                span.in_scope(|| {
                    tracing::warn!(
                        restored = self.restored,
                        "execution failed: {e}; console log tail:\n{tail}"
                    )
                })
            }
            Err(e) => span.in_scope(|| tracing::warn!("execution failed: {e}")),
        }
        result
    }

    async fn execute_in(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn OutputSink,
        span: &tracing::Span,
    ) -> Result<ExecOutcome, ExecError> {
        let started = Instant::now();
        let sent = std::time::SystemTime::now();
        let deadline = req.timeout + HOST_DEADLINE_SLACK;
        // Listening before the program starts; gone when this call ends.
        let _bridge = match (&self.bridge, req.llm_bridge) {
            (Some(b), true) => Some(b.start(self.session(), req.trace_id.clone()).await.map_err(|e| {
                ExecError::InvalidRequest(format!(
                    "llm_bridge: the inference bridge did not start in the VM: {e}"
                ))
            })?),
            (None, true) => {
                return Err(ExecError::InvalidRequest(
                    "llm_bridge: this VM has no inference bridge".into(),
                ))
            }
            _ => None,
        };
        let mut meter = OutputMeter::new(req.max_output_bytes);
        // The guest's frames are decoded by a task on the guest I/O runtime;
        // decoded events come through a small bounded queue. The task is
        // aborted when this call ends or is dropped (`GuestTask`).
        let (tx, mut rx) = tokio::sync::mpsc::channel(GUEST_EVENT_QUEUE);
        let reader = self
            .io
            .spawn(read_execute_stream(self.client.clone(), req.to_proto(), tx));
        let run = async {
            while let Some(ev) = rx.recv().await {
                match ev? {
                    GuestEvent::Stdout(b) => {
                        let keep = meter.admit(true, &b)?;
                        if !keep.is_empty() {
                            on_output.write(Output::Stdout(keep)).await;
                        }
                    }
                    GuestEvent::Stderr(b) => {
                        let keep = meter.admit(false, &b)?;
                        if !keep.is_empty() {
                            on_output.write(Output::Stderr(keep)).await;
                        }
                    }
                    GuestEvent::Exit(status) => return Ok(status),
                }
            }
            Err(ExecError::Protocol(
                "the stream ended without an exit status".into(),
            ))
        };
        let status = tokio::time::timeout(deadline, run)
            .await
            .map_err(|_| ExecError::Unresponsive(deadline));
        drop(reader);
        let status = status??;
        let execute_time = started.elapsed();
        crate::telemetry::record_guest_spans(
            span,
            sent,
            std::time::SystemTime::now(),
            crate::telemetry::GuestTimings {
                start_delay: Duration::from_micros(status.start_delay_us),
                run: Duration::from_micros(status.duration_us),
            },
            vec![
                opentelemetry::KeyValue::new("language", req.language.clone()),
                opentelemetry::KeyValue::new("warm_interpreter", status.warm_interpreter),
            ],
        );
        let checked = check_exit(&status, &meter, execute_time)?;
        Ok(ExecOutcome {
            vm_id: self.id().to_string(),
            trace_id: req.trace_id.clone(),
            boot_ms: ms(self.boot_time),
            restored: self.restored,
            execute_ms: ms(execute_time),
            total_ms: 0.0,
            ..checked
        })
    }

    /// Destroys the VM (kill: it holds nothing worth a graceful stop).
    pub async fn destroy(mut self) {
        if let Some(vm) = self.vm.take() {
            vm.kill().await;
            self.counters
                .vm_lifetime_seconds
                .observe(self.ready_at.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::Language;

    fn image() -> ImageSet {
        ImageSet {
            name: "default".into(),
            kernel: "k".into(),
            rootfs: "r".into(),
            languages: vec![Language {
                name: "python".into(),
                version: "3.11.2".into(),
            }],
            desktop: None,
        }
    }

    fn err(req: &ExecRequest) -> String {
        req.validate(&image()).unwrap_err().to_string()
    }

    #[test]
    fn validation_names_the_problem_and_the_fix() {
        assert!(err(&ExecRequest::new("cobol", "x")).contains("unknown language 'cobol'; available: python"));
        assert!(err(&ExecRequest::new("go", "x")).contains("--image full"));
        assert!(err(&ExecRequest::new("python", " ")).contains("code: empty"));
        assert!(err(&ExecRequest::new("", "x")).contains("language: none given"));
        assert!(err(&ExecRequest::new("python", "x".repeat(MAX_CODE_BYTES + 1))).contains("limit"));
        let mut r = ExecRequest::new("python", "print(1)");
        r.timeout = Duration::from_secs(7200);
        assert!(err(&r).contains("timeout"));
        r.timeout = DEFAULT_TIMEOUT;
        r.env.insert("A=B".into(), "1".into());
        assert!(err(&r).contains("A=B"));
        assert!(ExecRequest::new("python", "print(1)").validate(&image()).is_ok());
        assert!(!ExecRequest::new("python", "x").trace_id.is_empty());
    }

    #[test]
    fn shell_status_mirrors_exit_and_signal() {
        let mut o = ExecOutcome {
            exit_code: Some(3),
            ..Default::default()
        };
        assert_eq!(o.shell_status(), 3);
        o.exit_code = None;
        o.signal = Some(9);
        assert_eq!(o.shell_status(), 137);
    }
    fn exit(code: Option<i32>, signal: Option<i32>) -> ExitStatus {
        ExitStatus {
            exit_code: code,
            signal,
            ..Default::default()
        }
    }

    fn check(status: &ExitStatus) -> Result<ExecOutcome, String> {
        check_exit(status, &OutputMeter::new(100), Duration::from_secs(1)).map_err(|e| e.to_string())
    }

    #[test]
    fn exit_status_out_of_range_is_a_protocol_error() {
        for (code, signal, want) in [
            (Some(-7), None, "exit code -7"),
            (Some(256), None, "exit code 256"),
            (Some(i32::MAX), None, "exit code 2147483647"),
            (None, Some(4096), "signal 4096"),
            (None, Some(0), "signal 0"),
            (None, Some(-1), "signal -1"),
            (None, Some(65), "signal 65"),
            (Some(0), Some(9), "both exit code 0 and signal 9"),
            (None, None, "neither"),
        ] {
            let e = check(&exit(code, signal)).unwrap_err();
            assert!(
                e.starts_with("guest agent protocol error: the guest sent an invalid value")
                    && e.contains(want),
                "{code:?}/{signal:?}: {e}"
            );
        }
        for (code, signal) in [
            (Some(0), None),
            (Some(255), None),
            (None, Some(1)),
            (None, Some(64)),
        ] {
            assert!(check(&exit(code, signal)).is_ok(), "{code:?}/{signal:?}");
        }
        // A timeout may come without either.
        let mut t = exit(None, None);
        t.timed_out = true;
        assert!(check(&t).is_ok());
        let mut big = exit(Some(0), None);
        big.stdout_bytes = u64::MAX;
        assert!(check(&big).unwrap_err().contains("stdout_bytes"));
    }

    #[test]
    fn exit_status_is_combined_with_what_the_host_saw() {
        let mut m = OutputMeter::new(10);
        assert_eq!(m.admit(true, b"0123456").unwrap(), b"0123456");
        assert_eq!(m.admit(true, b"789abc").unwrap(), b"789");
        assert_eq!(m.admit(true, b"def").unwrap(), b"");
        assert_eq!(m.admit(false, b"e").unwrap(), b"e");
        // The guest says it sent 5 bytes and nothing was truncated; the host saw 16.
        let mut s = exit(Some(0), None);
        s.stdout_bytes = 5;
        s.stderr_bytes = 3;
        s.duration_us = u64::MAX;
        let o = check_exit(&s, &m, Duration::from_millis(20)).expect("valid");
        assert_eq!((o.stdout_bytes, o.stdout_truncated), (16, true));
        assert_eq!((o.stderr_bytes, o.stderr_truncated), (3, false));
        // The program cannot have run longer than the call.
        assert_eq!(o.duration_ms, 20.0);
        // A guest reporting more than the cap is truncated even if it says not.
        s.stderr_bytes = 11;
        assert!(
            check_exit(&s, &m, Duration::from_millis(20))
                .expect("valid")
                .stderr_truncated
        );
    }

    #[test]
    fn a_guest_streaming_far_past_the_cap_is_stopped() {
        let mut m = OutputMeter::new(1000);
        let chunk = vec![b'x'; 32 << 10];
        let mut forwarded = 0;
        let mut sent = 0u64;
        let err = loop {
            match m.admit(sent.is_multiple_of(2), &chunk) {
                Ok(k) => forwarded += k.len(),
                Err(e) => break e.to_string(),
            }
            sent += 1;
            assert!(sent < 1000, "never stopped");
        };
        assert_eq!(forwarded, 2000);
        assert!(
            sent * (32 << 10) <= MAX_DISCARDED_OUTPUT + 2000 + (32 << 10),
            "{sent}"
        );
        assert!(err.contains("ignored the output cap of 1000 bytes"), "{err}");
    }

    #[test]
    fn shell_status_never_leaves_0_to_255() {
        for (code, signal) in [
            (Some(-7), None),
            (Some(300), None),
            (None, Some(4096)),
            (None, Some(i32::MAX)),
        ] {
            let o = ExecOutcome {
                exit_code: code,
                signal,
                ..Default::default()
            };
            assert_eq!(o.shell_status(), 1, "{code:?}/{signal:?}");
        }
    }

    #[test]
    fn health_text_is_sanitized() {
        let h = sanitize_health(HealthResponse {
            languages: vec![neurovisor_proto::guest::Language {
                name: "python".into(),
                version: "3.11\n\x1b[1mforged".into(),
            }],
            agent_version: "1\n2".into(),
            ..Default::default()
        });
        assert!(
            !h.languages[0].version.chars().any(char::is_control),
            "{:?}",
            h.languages[0].version
        );
        assert_eq!(h.agent_version, "1\\u{a}2");
    }
}
