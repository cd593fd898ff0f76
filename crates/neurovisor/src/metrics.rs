//! Prometheus metrics of the daemon (text exposition on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value. Every value is escaped on output (the text format's `\\`,
/// `\"` and newline escapes: prometheus-client writes values as they are),
/// and values that come from requests go through a bounded set first
/// ([`Metrics::language`], [`Metrics::model`]), so no client can forge a line
/// or grow the number of series without end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// A value from the program itself (a method, an outcome, a VM id).
    pub fn fixed(v: impl Into<String>) -> Self {
        Self(v.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The value every request-supplied label outside its bounded set becomes.
pub const OTHER: &str = "other";
/// Models with a series of their own; any further model is `other`.
pub const MAX_MODEL_LABELS: usize = 32;
/// Languages with a series of their own (the image's; unknown ones are `other`).
pub const MAX_LANGUAGE_LABELS: usize = 32;

impl prometheus_client::encoding::EncodeLabelValue for Label {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A request-supplied name fit to be a label value of its own: short, and
/// only the characters model and language names use.
fn plain_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 100
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '+'))
}

/// A bounded set of label values: names allowed up front (configured), plus
/// names confirmed later (a model the LLM server answered for), up to a cap.
#[derive(Debug, Default)]
struct LabelSet {
    names: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl LabelSet {
    fn admit(&self, v: &str, cap: usize) {
        if !plain_name(v) {
            return;
        }
        if let Ok(mut n) = self.names.lock() {
            if n.len() < cap || n.contains(v) {
                n.insert(v.to_string());
            }
        }
    }

    fn label(&self, v: &str) -> Label {
        let known = self.names.lock().map(|n| n.contains(v)).unwrap_or(false);
        Label(if known { v.to_string() } else { OTHER.to_string() })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanguageLabel {
    pub language: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// Agent tasks: answer | max_iterations | llm_error
    pub status: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub language: Label,
    /// ok | nonzero_exit | timeout | oom | error
    pub outcome: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabel {
    pub vm_id: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Boot failures: stall | exited | refused | error
    pub reason: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    /// stdout | stderr
    pub stream: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Snapshot restores: restored | failed
    pub result: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabel {
    /// An agent tool's name (the ones NeuroVisor offers, else `other`).
    pub tool: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// tcp | unix | mcp
    pub transport: Label,
    /// no_token | wrong_token | not_admitted
    pub reason: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub method: Label,
    /// The gRPC status code's name (OK, INVALID_ARGUMENT, ...).
    pub code: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: Label,
    pub backend: Label,
    pub accel: Label,
}

/// The exemplar of a histogram sample: the trace it belongs to (32 hex
/// digits, the id the trace is exported under; see [`crate::telemetry`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: Label,
}

impl TraceLabel {
    /// The trace of the current span, when traces are exported.
    pub fn current() -> Option<Self> {
        crate::telemetry::exported_trace_id(&tracing::Span::current()).map(|t| Self {
            trace_id: Label::fixed(t),
        })
    }

    pub fn of(trace_id: &str) -> Option<Self> {
        (!trace_id.is_empty()).then(|| Self {
            trace_id: Label::fixed(crate::telemetry::otel_trace_id(trace_id).to_string()),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmDecisionLabel {
    pub vm_id: Label,
    /// allowed | refused
    pub decision: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabel {
    /// dns | tcp
    pub kind: Label,
    /// allowed | refused
    pub decision: Label,
    /// Why (a fixed set chosen by the gateway, e.g. name_not_allowed, metadata).
    pub reason: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What ran out: bytes | ops
    pub kind: Label,
}

/// Counters of the guest channel's rate limiters. The vsock layer lives below
/// the daemon and has no handle on its [`Metrics`], so these are process-wide
/// and every [`Metrics`] registers the same counters.
/// The counters the VM layer adds to (the vsock rate limiters, the eBPF
/// guard's release of a VM). A handle: clones share the counts. The daemon's
/// [`Metrics`] registers one and hands it down to its VMs through
/// [`crate::supervisor::VmHooks`]; a default one (e.g. a `run`) counts unseen.
#[derive(Debug, Clone)]
pub struct VmCounters {
    /// Reads or operations that had to wait, or connections refused, for lack of tokens.
    pub vsock_throttled: Family<KindLabel, Counter>,
    /// Guest connections closed because the ops bucket was empty.
    pub vsock_rejected_connections: Counter,
    /// Syscalls counted by the eBPF guard for VMs that have ended.
    pub vmm_syscalls: Counter,
    /// Snapshot restores by result (`--snapshot`; a failed one boots instead).
    pub snapshot_restores: Family<ResultLabel, Counter>,
    /// Restore until the agent answered, for restores that worked.
    pub snapshot_restore_seconds: Histogram,
    /// Ready until destroyed, for every VM that became ready.
    pub vm_lifetime_seconds: Histogram,
    /// Decisions of the VMs' egress gateways (`--network`).
    pub egress_decisions: Family<EgressLabel, Counter>,
    /// The same, per live VM (series of ended VMs disappear).
    pub live_egress: LiveEgress,
}

/// Egress decisions of each live VM, allowed and refused (a handle: clones
/// share the table). A VM's gateway adds to its row and removes it at its end.
#[derive(Debug, Clone, Default)]
pub struct LiveEgress(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, [u64; 2]>>>);

impl LiveEgress {
    fn table(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, [u64; 2]>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A row for `vm`, counted from zero.
    pub fn open(&self, vm: &str) {
        self.table().insert(vm.to_string(), [0, 0]);
    }

    /// Counts on `vm`'s row; nothing once it was removed (a decision that
    /// arrives after its VM ended must not bring the row back).
    pub fn record(&self, vm: &str, allowed: bool) {
        if let Some(row) = self.table().get_mut(vm) {
            row[usize::from(!allowed)] += 1;
        }
    }

    pub fn remove(&self, vm: &str) {
        self.table().remove(vm);
    }

    /// VM id, allowed, refused.
    pub fn snapshot(&self) -> Vec<(String, u64, u64)> {
        self.table()
            .iter()
            .map(|(k, v)| (k.clone(), v[0], v[1]))
            .collect()
    }
}

impl Default for VmCounters {
    fn default() -> Self {
        Self {
            vsock_throttled: Default::default(),
            vsock_rejected_connections: Default::default(),
            vmm_syscalls: Default::default(),
            snapshot_restores: Default::default(),
            snapshot_restore_seconds: Histogram::new(BOOT_BUCKETS.iter().copied()),
            vm_lifetime_seconds: Histogram::new(LIFETIME_BUCKETS.iter().copied()),
            egress_decisions: Default::default(),
            live_egress: Default::default(),
        }
    }
}

impl VmCounters {
    pub fn restore(&self, result: &str) {
        self.snapshot_restores
            .get_or_create(&ResultLabel {
                result: Label::fixed(result),
            })
            .inc();
    }

    /// The `kind` counter of `neurovisor_vsock_throttled_total`.
    pub fn throttled(&self, kind: &str) -> Counter {
        self.vsock_throttled
            .get_or_create(&KindLabel {
                kind: Label::fixed(kind),
            })
            .clone()
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type ExemplarFamily<L> =
    Family<L, HistogramWithExemplars<TraceLabel>, fn() -> HistogramWithExemplars<TraceLabel>>;

/// Boots and restores: KVM boots take ~0.1 s, restores tens of ms, TCG
/// boots ~0.7-1.5 s; stalls reach the budget's tens of seconds.
const BOOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 90.0,
];
/// Acquisitions and queue waits: a warm VM in well under a millisecond, a
/// cold boot as above, a full pool up to its queue timeout.
const WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Programs (guest-measured), gRPC calls, LLM calls: milliseconds to minutes.
const RUN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// VM lifetimes: one execution (~0.1 s) to a warm VM idle for an hour.
const LIFETIME_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

fn buckets(b: &'static [f64]) -> Histogram {
    Histogram::new(b.iter().copied())
}

fn run_histogram() -> Histogram {
    buckets(RUN_BUCKETS)
}

fn run_exemplars() -> HistogramWithExemplars<TraceLabel> {
    HistogramWithExemplars::new(RUN_BUCKETS.iter().copied())
}

/// Registers each `name, help, metric;` (a clone of the metric) in `registry`.
macro_rules! register {
    ($registry:ident; $($name:literal, $help:literal, $metric:expr;)*) => {
        $($registry.register($name, $help, $metric.clone());)*
    };
}

pub struct Metrics {
    registry: Registry,
    pub pool_warm_vms: Gauge,
    pub pool_active_vms: Gauge,
    pub pool_booting_vms: Gauge,
    /// Requests waiting for a VM because the pool is at `max`.
    pub pool_queued_requests: Gauge,
    pub pool_queue_wait_seconds: Histogram,
    /// Sandboxes that live across calls, alive now.
    pub sandboxes: Gauge,
    /// Sandboxes ended, by reason (killed, expired, failed, shutdown).
    pub sandboxes_ended: Family<ReasonLabel, Counter>,
    /// Inference bridge requests, by reason (forwarded, rate_limited, upstream_error).
    pub llm_bridge_requests: Family<ReasonLabel, Counter>,
    pub vm_boot_seconds: Histogram,
    /// By reason ([`boot_failure_reason`]).
    pub vm_boot_failures: Family<ReasonLabel, Counter>,
    /// Boots that exceeded their stall budget (also counted in `vm_boot_failures`).
    pub vm_boot_stalls: Counter,
    /// Failed boots retried on a fresh VM for a waiting request, by reason.
    pub vm_boot_retries: Family<ReasonLabel, Counter>,
    pub vm_acquire_seconds: HistogramWithExemplars<TraceLabel>,
    pub pool_exhausted: Counter,
    pub requests_in_flight: Gauge,
    pub code_execution_duration_seconds: ExemplarFamily<LanguageLabel>,
    pub executions: Family<OutcomeLabel, Counter>,
    /// Output bytes forwarded to clients (after the cap), by stream.
    pub output_bytes: Family<StreamLabel, Counter>,
    /// Executions whose output hit its cap, by stream.
    pub output_truncations: Family<StreamLabel, Counter>,
    /// Guests that broke the protocol or stopped answering, by kind.
    pub guest_errors: Family<KindLabel, Counter>,
    pub grpc_request_duration_seconds: HistogramFamily<MethodLabel>,
    pub grpc_requests: Family<CodeLabel, Counter>,
    pub auth_failures: Family<AuthLabel, Counter>,
    pub inference_requests: Family<ModelLabel, Counter>,
    pub inference_duration_seconds: Histogram,
    /// Tokens the LLM generated (as its server reported them), by model.
    pub tokens_generated: Family<ModelLabel, Counter>,
    pub agent_tasks: Family<StatusLabel, Counter>,
    pub agent_iterations_total: Histogram,
    pub agent_tool_calls: Family<ToolLabel, Counter>,
    pub llm_call_duration_seconds: ExemplarFamily<ModelLabel>,
    pub model_load_duration_seconds: HistogramFamily<ModelLabel>,
    pub build_info: Family<BuildLabel, Gauge>,
    /// Unix time this registry was made (the daemon's start).
    pub start_time_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub uptime_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    /// Counted by the VMs (see [`VmCounters`]).
    vm: VmCounters,
    /// Per live VM, read from its cgroup at every scrape.
    pub cgroup_memory_usage_bytes: Family<VmLabel, Gauge>,
    pub cgroup_cpu_throttled: Family<VmLabel, Counter>,
    pub cgroup_tasks: Family<VmLabel, Gauge>,
    /// Egress decisions of each live VM's gateway (`--network`).
    pub vm_egress_decisions: Family<VmDecisionLabel, Counter>,
    /// Where the per-VM series come from (the backend's supervisor).
    live_vms: std::sync::Mutex<crate::supervisor::LiveVms>,
    models: LabelSet,
    languages: LabelSet,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("neurovisor");
        let m = Self {
            live_vms: Default::default(),
            models: LabelSet::default(),
            languages: LabelSet::default(),
            pool_warm_vms: Gauge::default(),
            pool_active_vms: Gauge::default(),
            pool_booting_vms: Gauge::default(),
            pool_queued_requests: Gauge::default(),
            pool_queue_wait_seconds: buckets(WAIT_BUCKETS),
            sandboxes: Gauge::default(),
            sandboxes_ended: Family::default(),
            llm_bridge_requests: Family::default(),
            vm_boot_seconds: buckets(BOOT_BUCKETS),
            vm_boot_failures: Family::default(),
            vm_boot_stalls: Counter::default(),
            vm_boot_retries: Family::default(),
            vm_acquire_seconds: HistogramWithExemplars::new(WAIT_BUCKETS.iter().copied()),
            pool_exhausted: Counter::default(),
            requests_in_flight: Gauge::default(),
            code_execution_duration_seconds: Family::new_with_constructor(run_exemplars),
            executions: Family::default(),
            output_bytes: Family::default(),
            output_truncations: Family::default(),
            guest_errors: Family::default(),
            grpc_request_duration_seconds: Family::new_with_constructor(run_histogram),
            grpc_requests: Family::default(),
            auth_failures: Family::default(),
            inference_requests: Family::default(),
            inference_duration_seconds: run_histogram(),
            tokens_generated: Family::default(),
            agent_tasks: Family::default(),
            agent_iterations_total: Histogram::new(prometheus_client::metrics::histogram::linear_buckets(
                1.0, 1.0, 20,
            )),
            agent_tool_calls: Family::default(),
            llm_call_duration_seconds: Family::new_with_constructor(run_exemplars),
            model_load_duration_seconds: Family::new_with_constructor(run_histogram),
            build_info: Family::default(),
            start_time_seconds: Gauge::default(),
            uptime_seconds: Gauge::default(),
            started: std::time::Instant::now(),
            vm: VmCounters::default(),
            cgroup_memory_usage_bytes: Family::default(),
            cgroup_cpu_throttled: Family::default(),
            cgroup_tasks: Family::default(),
            vm_egress_decisions: Family::default(),
            registry: Registry::default(),
        };
        // name (after the `neurovisor_` prefix), help, metric.
        register!(
            registry;
            "pool_warm_vms", "Pre-warmed VMs ready", m.pool_warm_vms;
            "pool_active_vms", "VMs currently executing", m.pool_active_vms;
            "pool_booting_vms", "VMs booting for the pool", m.pool_booting_vms;
            "pool_queued_requests", "Requests waiting for a VM because the pool is at --max", m.pool_queued_requests;
            "pool_queue_wait_seconds", "Time requests waited in the queue of a full pool", m.pool_queue_wait_seconds;
            "sandboxes", "Sandboxes (neurovisor sandbox create) alive", m.sandboxes;
            "sandboxes_ended", "Sandboxes ended, by reason (killed, expired, failed, shutdown)", m.sandboxes_ended;
            "llm_bridge_requests", "Requests from programs in VMs through the inference bridge, by reason (forwarded, rate_limited, upstream_error)", m.llm_bridge_requests;
            "vm_boot_seconds", "VM boot latency until the agent answers", m.vm_boot_seconds;
            "vm_boot_failures", "VM boots that failed, by reason (stall, exited, refused, error)", m.vm_boot_failures;
            "vm_boot_stalls", "VM boots that exceeded their stall budget (derived from measured boot times)", m.vm_boot_stalls;
            "vm_boot_retries", "Failed VM boots retried on a fresh VM for a waiting request, by reason", m.vm_boot_retries;
            "vm_acquire_seconds", "Time to acquire a VM (exemplar: the request's trace id)", m.vm_acquire_seconds;
            "pool_exhausted", "Requests refused because no VM was free", m.pool_exhausted;
            "requests_in_flight", "Concurrent requests", m.requests_in_flight;
            "code_execution_duration_seconds", "Program run time by language (guest-measured; exemplar: the request's trace id)", m.code_execution_duration_seconds;
            "executions", "Executions by language and outcome", m.executions;
            "output_bytes", "Program output bytes forwarded to clients (after the cap), by stream", m.output_bytes;
            "output_truncations", "Executions whose output reached its cap, by stream", m.output_truncations;
            "guest_errors", "Guest agents that broke the protocol or stopped answering, by kind", m.guest_errors;
            "grpc_requests", "gRPC calls by method and status code", m.grpc_requests;
            "auth_failures", "Requests refused for their credentials, by transport and reason", m.auth_failures;
            "tokens_generated", "Tokens generated by the LLM (as its server reports them), by model", m.tokens_generated;
            "agent_tool_calls", "Tool calls made by agent tasks, by tool", m.agent_tool_calls;
            "snapshot_restores", "VM restores from a snapshot, by result (a failed one boots instead)", m.vm.snapshot_restores;
            "snapshot_restore_seconds", "Restore until the guest agent answered", m.vm.snapshot_restore_seconds;
            "vm_lifetime_seconds", "Time from a VM being ready until it was destroyed", m.vm.vm_lifetime_seconds;
            "build_info", "The NeuroVisor version, VMM backend and accelerator (value 1)", m.build_info;
            "start_time_seconds", "Unix time the daemon started", m.start_time_seconds;
            "uptime_seconds", "Seconds since the daemon started", m.uptime_seconds;
            "grpc_request_duration_seconds", "gRPC method latency", m.grpc_request_duration_seconds;
            "requests", "Inference requests by model", m.inference_requests;
            "inference_duration_seconds", "Ollama inference time", m.inference_duration_seconds;
            "agent_tasks", "Agent tasks by how they ended (answer, max_iterations, llm_error)", m.agent_tasks;
            // The seed calls it `agent_iterations_total`; a histogram named
            // `_total` breaks the naming rules promtool checks (and reads as a
            // counter), so it is `agent_iterations`.
            "agent_iterations", "LLM turns per agent task", m.agent_iterations_total;
            "llm_call_duration_seconds", "Per-call LLM latency (agent mode; exemplar: the task's trace id)", m.llm_call_duration_seconds;
            "model_load_duration_seconds", "Model load time reported by Ollama (cold starts)", m.model_load_duration_seconds;
            "vsock_throttled", "Guest vsock reads, operations or connections held back by the rate limiter, by bucket (bytes, ops)", m.vm.vsock_throttled;
            "vsock_rejected_connections", "Guest vsock connections closed because the ops rate limit was exhausted", m.vm.vsock_rejected_connections;
            "egress_decisions", "Decisions of the VMs' egress gateways (--network) by kind (dns, tcp), decision and reason", m.vm.egress_decisions;
            "vmm_syscalls", "Syscalls made by the VMM processes of finished VMs (eBPF guard, feature ebpf)", m.vm.vmm_syscalls;
            "cgroup_memory_usage_bytes", "Memory charged to a live VM's cgroup (guest RAM in use + VMM)", m.cgroup_memory_usage_bytes;
            "cgroup_cpu_throttled", "CFS periods in which a live VM's cgroup hit its CPU quota", m.cgroup_cpu_throttled;
            "cgroup_tasks", "Processes and threads in a live VM's cgroup", m.cgroup_tasks;
            "vm_egress_decisions", "Egress decisions of a live VM's gateway (--network), allowed or refused", m.vm_egress_decisions;
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        m.start_time_seconds.set(now.as_secs_f64());
        Self { registry, ..m }
    }

    /// `neurovisor_build_info`: this version, the backend and accelerator.
    pub fn set_build(&self, backend: &str, accel: &str) {
        self.build_info.clear();
        self.build_info
            .get_or_create(&BuildLabel {
                version: Label::fixed(env!("CARGO_PKG_VERSION")),
                backend: Label::fixed(backend),
                accel: Label::fixed(accel),
            })
            .set(1);
    }

    /// Counts one execution: outcome, guest-measured run time (with the
    /// request's trace as exemplar), output, and a guest that misbehaved.
    pub fn record_execution(
        &self,
        language: &str,
        trace_id: &str,
        result: &Result<crate::exec::ExecOutcome, crate::exec::ExecError>,
    ) {
        match result {
            Ok(o) => self.record_outcome(language, trace_id, Ok(o)),
            Err(e) => self.record_outcome(language, trace_id, Err(e.guest_fault())),
        }
    }

    /// [`Metrics::record_execution`] for a result whose error is no
    /// [`crate::exec::ExecError`] (a daemon's answer): `Err(guest fault)`.
    pub fn record_outcome(
        &self,
        language: &str,
        trace_id: &str,
        result: Result<&crate::exec::ExecOutcome, Option<&'static str>>,
    ) {
        let language = self.language(language);
        let outcome = match result {
            Ok(o) if o.timed_out => "timeout",
            Ok(o) if o.oom_killed => "oom",
            Ok(o) if o.exit_code == Some(0) => "ok",
            Ok(_) => "nonzero_exit",
            Err(_) => "error",
        };
        match result {
            Ok(o) => {
                self.code_execution_duration_seconds
                    .get_or_create(&LanguageLabel {
                        language: language.clone(),
                    })
                    .observe(o.duration_ms / 1000.0, TraceLabel::of(trace_id));
                for (stream, bytes, truncated) in [
                    ("stdout", o.stdout_bytes, o.stdout_truncated),
                    ("stderr", o.stderr_bytes, o.stderr_truncated),
                ] {
                    let l = StreamLabel {
                        stream: Label::fixed(stream),
                    };
                    self.output_bytes.get_or_create(&l).inc_by(bytes);
                    if truncated {
                        self.output_truncations.get_or_create(&l).inc();
                    }
                }
            }
            Err(fault) => {
                if let Some(kind) = fault {
                    self.guest_errors
                        .get_or_create(&KindLabel {
                            kind: Label::fixed(kind),
                        })
                        .inc();
                }
            }
        }
        self.executions
            .get_or_create(&OutcomeLabel {
                language,
                outcome: Label::fixed(outcome),
            })
            .inc();
    }

    /// Counts a boot that failed (`retried`: for a waiting request, on a fresh VM).
    pub fn record_boot_failure(&self, e: &crate::exec::ExecError, retried: bool) {
        let l = ReasonLabel {
            reason: Label::fixed(boot_failure_reason(e)),
        };
        if retried {
            self.vm_boot_retries.get_or_create(&l).inc();
        } else {
            self.vm_boot_failures.get_or_create(&l).inc();
            if e.is_stall() {
                self.vm_boot_stalls.inc();
            }
        }
    }

    /// Counts a request refused for its credentials.
    pub fn auth_failure(&self, transport: &str, reason: &str) {
        self.auth_failures
            .get_or_create(&AuthLabel {
                transport: Label::fixed(transport),
                reason: Label::fixed(reason),
            })
            .inc();
    }

    /// Pushes these metrics to a Prometheus Pushgateway at `url`, replacing
    /// the group `job="neurovisor", command=<command>` (a one-shot command's
    /// metrics at its end).
    pub async fn push(&self, url: &str, command: &str) -> Result<(), PushError> {
        let base = check_pushgateway(url)?;
        let target = format!(
            "{}/metrics/job/neurovisor/command/{command}",
            base.as_str().trim_end_matches('/')
        );
        let err = |why: String| PushError::Failed {
            url: url.to_string(),
            why,
        };
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let resp = client
            .put(&target)
            .header("content-type", "text/plain; version=0.0.4")
            .body(self.encode_prometheus_text())
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(err(format!("{status}: {}", body.trim())));
        }
        Ok(())
    }

    /// The metrics in the Prometheus text format 0.0.4, which the
    /// Pushgateway reads (`/metrics` serves OpenMetrics: exemplars, `# EOF`).
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }

    /// The OpenMetrics text exposition format (with exemplars).
    pub fn encode(&self) -> String {
        self.refresh_cgroups();
        self.uptime_seconds.set(self.started.elapsed().as_secs_f64());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Reports the cgroups of `live`'s VMs (a backend's [`crate::supervisor::LiveVms`]).
    /// The counters this registry exposes, to hand down to the VMs.
    pub fn vm_counters(&self) -> VmCounters {
        self.vm.clone()
    }

    pub fn watch_vms(&self, live: crate::supervisor::LiveVms) {
        if let Ok(mut l) = self.live_vms.lock() {
            *l = live;
        }
    }

    /// Per-VM series for the VMs alive now; ended VMs' series disappear.
    fn refresh_cgroups(&self) {
        let live = self.live_vms.lock().map(|l| l.snapshot()).unwrap_or_default();
        self.cgroup_memory_usage_bytes.clear();
        self.cgroup_cpu_throttled.clear();
        self.cgroup_tasks.clear();
        self.vm_egress_decisions.clear();
        for (vm_id, allowed, refused) in self.vm.live_egress.snapshot() {
            for (decision, n) in [("allowed", allowed), ("refused", refused)] {
                self.vm_egress_decisions
                    .get_or_create(&VmDecisionLabel {
                        vm_id: Label::fixed(vm_id.clone()),
                        decision: Label::fixed(decision),
                    })
                    .inc_by(n);
            }
        }
        for (vm_id, st) in live {
            let l = VmLabel {
                vm_id: Label::fixed(vm_id),
            };
            if let Some(v) = st.memory_usage_bytes() {
                self.cgroup_memory_usage_bytes.get_or_create(&l).set(v as i64);
            }
            if let Some(v) = st.cpu_throttled() {
                self.cgroup_cpu_throttled.get_or_create(&l).inc_by(v);
            }
            if let Some(v) = st.pids_current() {
                self.cgroup_tasks.get_or_create(&l).set(v as i64);
            }
        }
    }

    /// Languages that get series of their own (the image's).
    pub fn allow_languages<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            self.languages.admit(n, MAX_LANGUAGE_LABELS);
        }
    }

    /// A model that gets series of its own: the configured one, or one the
    /// LLM server answered for (up to [`MAX_MODEL_LABELS`]).
    pub fn allow_model(&self, name: &str) {
        self.models.admit(name, MAX_MODEL_LABELS);
    }

    /// The label for a request's language: itself if the image has it, else `other`.
    pub fn language(&self, name: &str) -> Label {
        self.languages.label(name)
    }

    /// The label for a request's model: itself if allowed, else `other`.
    pub fn model(&self, name: &str) -> Label {
        self.models.label(name)
    }

    pub fn observe_grpc(&self, method: &str, started: std::time::Instant) {
        self.grpc_request_duration_seconds
            .get_or_create(&MethodLabel {
                method: Label::fixed(method),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a finished gRPC call by its status code.
    pub fn grpc_code(&self, method: &str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&CodeLabel {
                method: Label::fixed(method),
                code: Label::fixed(grpc_code_name(code)),
            })
            .inc();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("--pushgateway {url}: {why} (give the Pushgateway's base URL, e.g. http://localhost:9091)")]
    BadUrl { url: String, why: &'static str },
    #[error("--pushgateway {url}: pushing the metrics failed: {why}")]
    Failed { url: String, why: String },
}

/// Checks a Pushgateway URL (before any VM is taken).
pub fn check_pushgateway(url: &str) -> Result<reqwest::Url, PushError> {
    let bad = |why| PushError::BadUrl {
        url: url.to_string(),
        why,
    };
    let u = reqwest::Url::parse(url).map_err(|_| bad("not a URL"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("no query or fragment allowed"));
    }
    Ok(u)
}

/// Why a boot failed, as a bounded label value.
pub fn boot_failure_reason(e: &crate::exec::ExecError) -> &'static str {
    use crate::exec::ExecError;
    match e {
        ExecError::BootStalled { .. } => "stall",
        ExecError::BootFailed { last, .. } => boot_failure_reason(last),
        ExecError::Vmm(
            crate::vmm::VmmError::DiedDuringBoot { .. } | crate::vmm::VmmError::HelperExited { .. },
        ) => "exited",
        ExecError::Vmm(crate::vmm::VmmError::BootTimeout { .. }) => "stall",
        ExecError::Vmm(_) => "refused",
        _ => "error",
    }
}

fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// OpenMetrics text → Prometheus text 0.0.4: counters are named with their
/// `_total` in HELP/TYPE, `_created` samples, `# UNIT`, exemplars and `# EOF`
/// go (the 0.0.4 parser of the Pushgateway rejects them).
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_string());
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("# HELP ").or_else(|| l.strip_prefix("# TYPE ")) {
            let name = rest.split(' ').next().unwrap_or_default();
            if counters.contains(name) {
                out.push_str(&l[..7]);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
            out.push_str(l);
            out.push('\n');
            continue;
        }
        let name_end = l.find(['{', ' ']).unwrap_or(l.len());
        if l[..name_end].ends_with("_created") {
            continue;
        }
        // An exemplar follows the value after " # "; label values never
        // hold " # " unescaped... but they may: cut after the labels.
        let labels_end = if l[name_end..].starts_with('{') {
            l[name_end..]
                .find("} ")
                .map(|i| name_end + i + 1)
                .unwrap_or(name_end)
        } else {
            name_end
        };
        match l[labels_end..].find(" # ") {
            Some(i) => out.push_str(&l[..labels_end + i]),
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.allow_languages(["python"]);
        m.allow_model("qwen3");
        m.code_execution_duration_seconds
            .get_or_create(&LanguageLabel {
                language: m.language("python"),
            })
            .observe(0.1, TraceLabel::of("01941ab3-6d8c-7a2b-b4e1-9c1234567890"));
        m.observe_grpc("Execute", std::time::Instant::now());
        m.agent_tasks
            .get_or_create(&StatusLabel {
                status: Label::fixed("answer"),
            })
            .inc();
        m.agent_iterations_total.observe(2.0);
        m.llm_call_duration_seconds
            .get_or_create(&ModelLabel {
                model: m.model("qwen3"),
            })
            .observe(0.5, None);
        let limiter = crate::security::rate_limit::RateLimiter::new(
            crate::security::rate_limit::RateLimitConfig {
                bandwidth: None,
                ops: Some(crate::security::rate_limit::TokenBucketConfig {
                    size: 1,
                    one_time_burst: 0,
                    refill_time: 1_000_000,
                }),
            },
            &m.vm_counters(),
        );
        assert!(limiter.admit_connection());
        assert!(!limiter.admit_connection());
        let text = m.encode();
        for name in [
            "neurovisor_pool_warm_vms",
            "neurovisor_pool_active_vms",
            "neurovisor_vm_boot_seconds_bucket",
            "neurovisor_vm_acquire_seconds_count",
            "neurovisor_requests_in_flight",
            "neurovisor_code_execution_duration_seconds_count{language=\"python\"} 1",
            "neurovisor_grpc_request_duration_seconds_count{method=\"Execute\"}",
            "neurovisor_agent_tasks_total{status=\"answer\"} 1",
            "neurovisor_agent_iterations_count 1",
            "neurovisor_llm_call_duration_seconds_count{model=\"qwen3\"} 1",
            "neurovisor_vsock_throttled_total{kind=\"ops\"}",
            "neurovisor_vsock_rejected_connections_total",
            // The request's trace as the exemplar of its sample.
            r#"# {trace_id="01941ab36d8c7a2bb4e19c1234567890"} 0.1"#,
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert!(families >= 30, "{families} metric families");
    }

    #[test]
    fn pushgateway_text_is_prometheus_0_0_4() {
        let m = Metrics::new();
        m.allow_languages(["python"]);
        m.record_outcome(
            "python",
            "01941ab3-6d8c-7a2b-b4e1-9c1234567890",
            Ok(&crate::exec::ExecOutcome {
                exit_code: Some(0),
                stdout_bytes: 3,
                duration_ms: 20.0,
                ..Default::default()
            }),
        );
        let text = m.encode_prometheus_text();
        assert!(!text.contains("# EOF") && !text.contains("trace_id="), "{text}");
        assert!(
            text.contains("# TYPE neurovisor_executions_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("neurovisor_executions_total{language=\"python\",outcome=\"ok\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("neurovisor_output_bytes_total{stream=\"stdout\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "neurovisor_code_execution_duration_seconds_bucket{le=\"0.025\",language=\"python\"} 1\n"
            ) || text.contains(
                "neurovisor_code_execution_duration_seconds_bucket{language=\"python\",le=\"0.025\"} 1\n"
            ),
            "{text}"
        );
        assert!(check_pushgateway("localhost:9091").is_err());
        assert!(check_pushgateway("http://localhost:9091").is_ok());
    }

    #[test]
    fn request_supplied_labels_are_bounded_and_escaped() {
        let m = Metrics::new();
        m.allow_model("qwen3");
        let forged = "a\"} 1\nneurovisor_pool_warm_vms 1e9\n#";
        m.allow_model(forged); // not a plain name: never admitted
        for i in 0..100 {
            m.allow_model(&format!("model-{i}"));
        }
        m.allow_model(&"x".repeat(5000));
        for name in [
            forged.to_string(),
            "x".repeat(5000),
            "model-99".into(),
            "qwen3".into(),
            "model-0".into(),
        ] {
            m.inference_requests
                .get_or_create(&ModelLabel {
                    model: m.model(&name),
                })
                .inc();
        }
        // A label that did get through unbounded (a VM id is ours) is still escaped.
        m.executions
            .get_or_create(&OutcomeLabel {
                language: Label::fixed("a\"b\\c\nd"),
                outcome: Label::fixed("ok"),
            })
            .inc();
        let text = m.encode();
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("neurovisor_pool_warm_vms 1e9")),
            "{text}"
        );
        assert!(
            text.contains("neurovisor_requests_total{model=\"other\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("neurovisor_requests_total{model=\"qwen3\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("neurovisor_requests_total{model=\"model-0\"} 1"),
            "{text}"
        );
        assert!(text.contains(r#"language="a\"b\\c\nd""#), "{text}");
        let model_series = text
            .lines()
            .filter(|l| l.starts_with("neurovisor_requests_total{"))
            .count();
        assert_eq!(model_series, 3, "{text}");
        // The cap: 32 names in all, so model-31 and later are `other`.
        assert_eq!(m.model("model-30").as_str(), "model-30");
        assert_eq!(m.model("model-31").as_str(), OTHER);
    }
}
