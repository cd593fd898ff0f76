//! Seccomp allowlists for the daemon's threads and the VMM helpers.
//!
//! The lists are data (`seccomp.json`, embedded): one per thread role of the
//! daemon ([`Role::Api`]: gRPC/HTTP server threads; [`Role::Vm`]: VM
//! management threads that fork the VMMs; [`Role::Guest`]: the threads that
//! read and decode guest bytes) and one per helper process
//! (`vhost-device-vsock`). Anything not listed kills the whole process.
//!
//! Filters are per thread and inherited by every thread and child a thread
//! creates. The daemon therefore runs its API, its VM management and its
//! guest I/O on three tokio runtimes and installs each role's filter on each of their threads
//! once start-up is done ([`arm`]): worker threads pick it up when they next
//! park, threads started later when they start. Together with the filter each
//! thread also drops to its role's capabilities ([`super::caps`]) and sets
//! NoNewPrivs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use seccompiler::{BpfProgram, TargetArch};
use serde::Deserialize;

use super::caps;

const FILTERS_JSON: &str = include_str!("seccomp.json");

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter data: {0}")]
    Data(String),
    #[error("cannot compile the seccomp filters: {0}")]
    Compile(String),
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error(transparent)]
    Caps(#[from] caps::CapsError),
    #[error("{0} thread(s) still run without a seccomp filter: {1}")]
    Unfiltered(usize, String),
}

/// What a daemon thread does, and so which filter and capabilities it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves gRPC and HTTP; creates no processes.
    Api,
    /// Boots VMs: forks and execs the VMM processes.
    Vm,
    /// Reads what guests send (vsock handshake, READY, the agent's HTTP/2
    /// connection, Health and Execute decoding): socket I/O only, no
    /// capabilities, no files, no processes.
    Guest,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Vm => "vm",
            Role::Guest => "guest",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Spec {
    #[serde(default)]
    inherits: Vec<String>,
    #[serde(default)]
    syscalls: Vec<String>,
    #[serde(default)]
    conditional: Vec<serde_json::Value>,
}

/// The syscall names allowed unconditionally by filter `name`, and its
/// argument-conditioned rules, with inheritance resolved.
fn resolve(
    specs: &BTreeMap<String, Spec>,
    name: &str,
    depth: usize,
) -> Result<(BTreeSet<String>, Vec<serde_json::Value>), SeccompError> {
    let spec = specs
        .get(name)
        .ok_or_else(|| SeccompError::Data(format!("no filter named {name:?}")))?;
    if depth > 8 {
        return Err(SeccompError::Data(format!("inheritance loop at {name:?}")));
    }
    let mut plain: BTreeSet<String> = spec.syscalls.iter().cloned().collect();
    let mut cond = spec.conditional.clone();
    for parent in &spec.inherits {
        let (p, c) = resolve(specs, parent, depth + 1)?;
        plain.extend(p);
        cond.extend(c);
    }
    // An unconditional allow wins over conditioned rules for the same call.
    cond.retain(|r| r["syscall"].as_str().is_none_or(|s| !plain.contains(s)));
    Ok((plain, cond))
}

fn specs() -> Result<BTreeMap<String, Spec>, SeccompError> {
    let mut raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(FILTERS_JSON).map_err(|e| SeccompError::Data(e.to_string()))?;
    raw.retain(|k, _| !k.starts_with('_'));
    raw.into_iter()
        .map(|(k, v)| {
            serde_json::from_value(v)
                .map(|s| (k.clone(), s))
                .map_err(|e| SeccompError::Data(format!("{k}: {e}")))
        })
        .collect()
}

/// The syscalls filter `name` allows (conditioned ones included), for review and tests.
pub fn allowed(name: &str) -> Result<BTreeSet<String>, SeccompError> {
    let (mut plain, cond) = resolve(&specs()?, name, 0)?;
    plain.extend(
        cond.iter()
            .filter_map(|r| r["syscall"].as_str().map(str::to_string)),
    );
    Ok(plain)
}

/// Compiles filter `name` to BPF (default action: kill the process).
pub fn compile(name: &str) -> Result<BpfProgram, SeccompError> {
    let (plain, cond) = resolve(&specs()?, name, 0)?;
    let mut rules: Vec<serde_json::Value> = plain
        .iter()
        .map(|s| serde_json::json!({ "syscall": s }))
        .collect();
    rules.extend(cond);
    let json = serde_json::json!({
        name: { "mismatch_action": "kill_process", "match_action": "allow", "filter": rules }
    });
    let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch())
        .map_err(|e| SeccompError::Compile(format!("{name}: {e}")))?;
    map.remove(name)
        .ok_or_else(|| SeccompError::Compile(format!("{name}: missing from the output")))
}

/// `clone3` answers ENOSYS (everything else passes), so glibc creates threads
/// with `clone`, whose flags a filter can check; the role filter allows
/// `clone3` only for this one to take effect (a stacked ERRNO beats ALLOW).
fn no_clone3() -> Result<BpfProgram, SeccompError> {
    let json = serde_json::json!({
        "no_clone3": {
            "mismatch_action": "allow",
            "match_action": { "errno": libc::ENOSYS },
            "filter": [ { "syscall": "clone3" } ]
        }
    });
    let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch())
        .map_err(|e| SeccompError::Compile(format!("no_clone3: {e}")))?;
    map.remove("no_clone3")
        .ok_or_else(|| SeccompError::Compile("no_clone3: missing".into()))
}

fn arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

/// The compiled filters for the daemon's thread roles.
#[derive(Debug)]
pub struct RoleFilters {
    api: BpfProgram,
    vm: BpfProgram,
    guest: BpfProgram,
    no_clone3: BpfProgram,
    vm_caps: Vec<::caps::Capability>,
}

impl RoleFilters {
    /// `vm_caps`: what VM management threads keep (see [`caps::vm_role_caps`]);
    /// `vm_filter`: `vm`, or `vm-ebpf` when an eBPF guard is loaded.
    pub fn new(vm_caps: Vec<::caps::Capability>, vm_filter: &str) -> Result<Self, SeccompError> {
        Ok(Self {
            api: compile("api")?,
            vm: compile(vm_filter)?,
            guest: compile("guest")?,
            no_clone3: no_clone3()?,
            vm_caps,
        })
    }

    /// Confines the calling thread to `role`: capabilities, NoNewPrivs, filter.
    pub fn install(&self, role: Role) -> Result<(), SeccompError> {
        let install = |prog: &BpfProgram| {
            seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
                role: role.name(),
                source,
            })
        };
        match role {
            Role::Api => {
                caps::restrict_thread(&[])?;
                // First: the api filter forbids installing filters.
                install(&self.no_clone3)?;
                install(&self.api)?;
            }
            Role::Vm => {
                caps::restrict_thread(&self.vm_caps)?;
                install(&self.vm)?;
            }
            Role::Guest => {
                caps::restrict_thread(&[])?;
                install(&self.no_clone3)?;
                install(&self.guest)?;
            }
        }
        Ok(())
    }
}

static ARMED: OnceLock<Arc<RoleFilters>> = OnceLock::new();
static FAILED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A hook for a runtime's `on_thread_start` and `on_thread_park`: confines
/// the thread to `role` once [`arm`] was called (once per thread).
pub fn thread_hook(role: Role) -> impl Fn() + Send + Sync + 'static {
    move || {
        let Some(filters) = ARMED.get() else { return };
        if CONFINED.with(|c| c.replace(true)) {
            return;
        }
        // A thread started by a thread of the same runtime inherited its filter.
        // SAFETY: PR_GET_SECCOMP only reads the calling thread's mode.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } == 2 {
            return;
        }
        if let Err(e) = filters.install(role) {
            FAILED.store(true, Ordering::SeqCst);
            tracing::error!("{e}");
        }
    }
}

/// Arms the filters: the calling thread (which serves the API) is confined
/// now, the runtimes' threads as they park or start. Then waits until no
/// thread of the process is unfiltered (idle blocking threads started before
/// arming exit after their keep-alive), poking the runtimes meanwhile.
pub async fn arm(
    filters: RoleFilters,
    runtimes: &[tokio::runtime::Handle],
    deadline: Duration,
) -> Result<(), SeccompError> {
    let filters = ARMED.get_or_init(|| Arc::new(filters)).clone();
    CONFINED.with(|c| c.set(true));
    filters.install(Role::Api)?;
    let until = Instant::now() + deadline;
    loop {
        let open = unfiltered_threads();
        if FAILED.load(Ordering::SeqCst) {
            return Err(SeccompError::Unfiltered(
                open.len(),
                "a thread failed to install its filter".into(),
            ));
        }
        if open.is_empty() {
            return Ok(());
        }
        if Instant::now() >= until {
            return Err(SeccompError::Unfiltered(open.len(), open.join(", ")));
        }
        // Blocking each worker briefly makes the others pick up tasks: every
        // worker wakes, runs, parks, and so runs the park hook.
        for h in runtimes {
            for _ in 0..8 {
                h.spawn(async { std::thread::sleep(Duration::from_millis(2)) });
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Threads of this process without a seccomp filter, as "tid (name)".
pub fn unfiltered_threads() -> Vec<String> {
    let mut open = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        if field("Seccomp:") != "2" {
            open.push(format!(
                "{} ({})",
                t.file_name().to_string_lossy(),
                field("Name:")
            ));
        }
    }
    open
}

/// Applies filter `name` to the calling thread (for proofs and tests).
pub fn apply_to_current_thread(name: &str) -> Result<(), SeccompError> {
    let prog = compile(name)?;
    seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Install {
        role: "custom",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_roles_differ() {
        for name in ["api", "vm", "vhost-device-vsock"] {
            compile(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let api = allowed("api").expect("api");
        let vm = allowed("vm").expect("vm");
        for forbidden in [
            "execve",
            "mount",
            "unshare",
            "ptrace",
            "bpf",
            "init_module",
            "kexec_load",
            "reboot",
            "setuid",
        ] {
            assert!(!api.contains(forbidden), "api allows {forbidden}");
        }
        for needed in [
            "execve",
            "mount",
            "unshare",
            "pivot_root",
            "setresuid",
            "memfd_create",
            "seccomp",
        ] {
            assert!(vm.contains(needed), "vm lacks {needed}");
        }
        assert!(api.is_subset(&vm), "vm must hold everything api does");
        for never in [
            "ptrace",
            "bpf",
            "init_module",
            "finit_module",
            "kexec_load",
            "reboot",
            "swapon",
            "open_by_handle_at",
        ] {
            assert!(!vm.contains(never), "vm allows {never}");
        }
        assert!(!allowed("vhost-device-vsock").expect("vhost").contains("mount"));
    }

    #[test]
    fn the_guest_role_is_the_narrowest() {
        compile("guest").expect("guest");
        let guest = allowed("guest").expect("guest");
        let api = allowed("api").expect("api");
        for forbidden in [
            "execve",
            "execveat",
            "fork",
            "vfork",
            "mount",
            "unshare",
            "setns",
            "open",
            "openat",
            "ioctl",
            "io_uring_setup",
            "userfaultfd",
            "ptrace",
            "bpf",
            "seccomp",
            "capset",
            "kill",
            "bind",
            "listen",
            "socketpair",
        ] {
            assert!(!guest.contains(forbidden), "guest allows {forbidden}");
        }
        assert!(
            guest.is_subset(&api),
            "guest must be narrower than api: {:?}",
            guest.difference(&api)
        );
        let (_, cond) = resolve(&specs().expect("specs"), "guest", 0).expect("resolve");
        let socket = cond
            .iter()
            .find(|r| r["syscall"] == "socket")
            .expect("socket rule");
        assert_eq!(socket["args"][0]["val"], libc::AF_UNIX);
    }

    #[test]
    fn unknown_syscall_names_are_an_error() {
        let specs: BTreeMap<String, Spec> =
            serde_json::from_str(r#"{"x": {"syscalls": ["no_such_call"]}}"#).expect("json");
        let (plain, _) = resolve(&specs, "x", 0).expect("resolve");
        let json = serde_json::json!({"x": {"mismatch_action": "kill_process", "match_action": "allow",
            "filter": plain.iter().map(|s| serde_json::json!({"syscall": s})).collect::<Vec<_>>() }});
        assert!(seccompiler::compile_from_json(json.to_string().as_bytes(), arch()).is_err());
    }
}
