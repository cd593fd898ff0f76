//! Prometheus metrics of the daemon (text exposition on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
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
#[derive(Debug, Clone, Default)]
pub struct VmCounters {
    /// Reads or operations that had to wait, or connections refused, for lack of tokens.
    pub vsock_throttled: Family<KindLabel, Counter>,
    /// Guest connections closed because the ops bucket was empty.
    pub vsock_rejected_connections: Counter,
    /// Syscalls counted by the eBPF guard for VMs that have ended.
    pub vmm_syscalls: Counter,
}

impl VmCounters {
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

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~130 s: covers warm acquisitions and TCG cold boots.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 19,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub pool_warm_vms: Gauge,
    pub pool_active_vms: Gauge,
    pub pool_booting_vms: Gauge,
    pub vm_boot_seconds: Histogram,
    pub vm_boot_failures: Counter,
    /// Boots that exceeded their stall budget (also counted in `vm_boot_failures`).
    pub vm_boot_stalls: Counter,
    /// Failed boots retried on a fresh VM for a waiting request.
    pub vm_boot_retries: Counter,
    pub vm_acquire_seconds: Histogram,
    pub pool_exhausted: Counter,
    pub requests_in_flight: Gauge,
    pub code_execution_duration_seconds: HistogramFamily<LanguageLabel>,
    pub executions: Family<OutcomeLabel, Counter>,
    pub grpc_request_duration_seconds: HistogramFamily<MethodLabel>,
    pub inference_requests: Family<ModelLabel, Counter>,
    pub inference_duration_seconds: Histogram,
    pub agent_tasks: Family<StatusLabel, Counter>,
    pub agent_iterations_total: Histogram,
    pub llm_call_duration_seconds: HistogramFamily<ModelLabel>,
    pub model_load_duration_seconds: HistogramFamily<ModelLabel>,
    /// Counted by the VMs (see [`VmCounters`]).
    vm: VmCounters,
    /// Per live VM, read from its cgroup at every scrape.
    pub cgroup_memory_usage_bytes: Family<VmLabel, Gauge>,
    pub cgroup_cpu_throttled: Family<VmLabel, Counter>,
    pub cgroup_tasks: Family<VmLabel, Gauge>,
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
            vm_boot_seconds: latency_histogram(),
            vm_boot_failures: Counter::default(),
            vm_boot_stalls: Counter::default(),
            vm_boot_retries: Counter::default(),
            vm_acquire_seconds: latency_histogram(),
            pool_exhausted: Counter::default(),
            requests_in_flight: Gauge::default(),
            code_execution_duration_seconds: Family::new_with_constructor(latency_histogram),
            executions: Family::default(),
            grpc_request_duration_seconds: Family::new_with_constructor(latency_histogram),
            inference_requests: Family::default(),
            inference_duration_seconds: latency_histogram(),
            agent_tasks: Family::default(),
            agent_iterations_total: Histogram::new(prometheus_client::metrics::histogram::linear_buckets(
                1.0, 1.0, 20,
            )),
            llm_call_duration_seconds: Family::new_with_constructor(latency_histogram),
            model_load_duration_seconds: Family::new_with_constructor(latency_histogram),
            vm: VmCounters::default(),
            cgroup_memory_usage_bytes: Family::default(),
            cgroup_cpu_throttled: Family::default(),
            cgroup_tasks: Family::default(),
            registry: Registry::default(),
        };
        registry.register("pool_warm_vms", "Pre-warmed VMs ready", m.pool_warm_vms.clone());
        registry.register(
            "pool_active_vms",
            "VMs currently executing",
            m.pool_active_vms.clone(),
        );
        registry.register(
            "pool_booting_vms",
            "VMs booting for the pool",
            m.pool_booting_vms.clone(),
        );
        registry.register(
            "vm_boot_seconds",
            "VM boot latency until the agent answers",
            m.vm_boot_seconds.clone(),
        );
        registry.register(
            "vm_boot_failures",
            "VM boots that failed",
            m.vm_boot_failures.clone(),
        );
        registry.register(
            "vm_boot_stalls",
            "VM boots that exceeded their stall budget (derived from measured boot times)",
            m.vm_boot_stalls.clone(),
        );
        registry.register(
            "vm_boot_retries",
            "Failed VM boots retried on a fresh VM for a waiting request",
            m.vm_boot_retries.clone(),
        );
        registry.register(
            "vm_acquire_seconds",
            "Time to acquire a VM",
            m.vm_acquire_seconds.clone(),
        );
        registry.register(
            "pool_exhausted",
            "Requests refused because no VM was free",
            m.pool_exhausted.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Concurrent requests",
            m.requests_in_flight.clone(),
        );
        registry.register(
            "code_execution_duration_seconds",
            "Program run time by language (guest-measured)",
            m.code_execution_duration_seconds.clone(),
        );
        registry.register(
            "executions",
            "Executions by language and outcome",
            m.executions.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "gRPC method latency",
            m.grpc_request_duration_seconds.clone(),
        );
        registry.register(
            "requests",
            "Inference requests by model",
            m.inference_requests.clone(),
        );
        registry.register(
            "inference_duration_seconds",
            "Ollama inference time",
            m.inference_duration_seconds.clone(),
        );
        registry.register(
            "agent_tasks",
            "Agent tasks by how they ended (answer, max_iterations, llm_error)",
            m.agent_tasks.clone(),
        );
        registry.register(
            "agent_iterations_total",
            "LLM turns per agent task",
            m.agent_iterations_total.clone(),
        );
        registry.register(
            "llm_call_duration_seconds",
            "Per-call LLM latency (agent mode)",
            m.llm_call_duration_seconds.clone(),
        );
        registry.register(
            "model_load_duration_seconds",
            "Model load time reported by Ollama (cold starts)",
            m.model_load_duration_seconds.clone(),
        );
        registry.register(
            "vsock_throttled",
            "Guest vsock reads, operations or connections held back by the rate limiter, by bucket (bytes, ops)",
            m.vm.vsock_throttled.clone(),
        );
        registry.register(
            "vsock_rejected_connections",
            "Guest vsock connections closed because the ops rate limit was exhausted",
            m.vm.vsock_rejected_connections.clone(),
        );
        registry.register(
            "vmm_syscalls",
            "Syscalls made by the VMM processes of finished VMs (eBPF guard, feature ebpf)",
            m.vm.vmm_syscalls.clone(),
        );
        registry.register(
            "cgroup_memory_usage_bytes",
            "Memory charged to a live VM's cgroup (guest RAM in use + VMM)",
            m.cgroup_memory_usage_bytes.clone(),
        );
        registry.register(
            "cgroup_cpu_throttled",
            "CFS periods in which a live VM's cgroup hit its CPU quota",
            m.cgroup_cpu_throttled.clone(),
        );
        registry.register(
            "cgroup_tasks",
            "Processes and threads in a live VM's cgroup",
            m.cgroup_tasks.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> String {
        self.refresh_cgroups();
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
            .observe(0.1);
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
            .observe(0.5);
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
            "neurovisor_agent_iterations_total_count 1",
            "neurovisor_llm_call_duration_seconds_count{model=\"qwen3\"} 1",
            "neurovisor_vsock_throttled_total{kind=\"ops\"}",
            "neurovisor_vsock_rejected_connections_total",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
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
