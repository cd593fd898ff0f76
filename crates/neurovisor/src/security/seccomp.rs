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
    /// Calls answered with ENOSYS (a stacked filter) instead of killing.
    #[serde(default)]
    enosys: Vec<String>,
}

/// Filter `name` with inheritance resolved.
#[derive(Debug, Default)]
struct Resolved {
    /// Allowed unconditionally.
    plain: BTreeSet<String>,
    /// Argument-conditioned rules.
    cond: Vec<serde_json::Value>,
    /// Answered with ENOSYS.
    enosys: BTreeSet<String>,
}

/// The syscall names allowed unconditionally by filter `name`, its
/// argument-conditioned rules and its ENOSYS calls, with inheritance resolved.
fn resolve(
    specs: &BTreeMap<String, Spec>,
    name: &str,
    depth: usize,
) -> Result<(BTreeSet<String>, Vec<serde_json::Value>), SeccompError> {
    resolve_all(specs, name, depth).map(|r| (r.plain, r.cond))
}

fn resolve_all(specs: &BTreeMap<String, Spec>, name: &str, depth: usize) -> Result<Resolved, SeccompError> {
    let spec = specs
        .get(name)
        .ok_or_else(|| SeccompError::Data(format!("no filter named {name:?}")))?;
    if depth > 8 {
        return Err(SeccompError::Data(format!("inheritance loop at {name:?}")));
    }
    let own: BTreeSet<String> = spec.syscalls.iter().cloned().collect();
    let mut plain = own.clone();
    let mut cond = spec.conditional.clone();
    let mut enosys: BTreeSet<String> = spec.enosys.iter().cloned().collect();
    for parent in &spec.inherits {
        let r = resolve_all(specs, parent, depth + 1)?;
        plain.extend(r.plain);
        cond.extend(r.cond);
        enosys.extend(r.enosys);
    }
    // A filter's own list wins over what it inherits as ENOSYS.
    enosys.retain(|s| !own.contains(s));
    plain.retain(|s| !enosys.contains(s));
    // An unconditional allow wins over conditioned rules for the same call.
    cond.retain(|r| r["syscall"].as_str().is_none_or(|s| !plain.contains(s)));
    Ok(Resolved { plain, cond, enosys })
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

/// Compiles filter `name` to BPF (default action: kill the process). Its
/// ENOSYS calls pass this filter: [`compile_enosys`] answers them.
pub fn compile(name: &str) -> Result<BpfProgram, SeccompError> {
    let r = resolve_all(&specs()?, name, 0)?;
    build(name, r.plain.iter().chain(&r.enosys), r.cond)
}

/// Compiles filter `name` for one exec: `execve` is allowed only with
/// `path` as its pathname pointer (the exec call the caller is about to
/// make from a fork of this process), so the program cannot exec again.
pub fn compile_exec_once(name: &str, path: *const u8) -> Result<BpfProgram, SeccompError> {
    let mut r = resolve_all(&specs()?, name, 0)?;
    r.plain.remove("execve");
    r.cond.retain(|c| c["syscall"] != "execve");
    r.cond.push(serde_json::json!({
        "syscall": "execve",
        "args": [{"index": 0, "type": "qword", "op": "eq", "val": path as u64}]
    }));
    build(name, r.plain.iter().chain(&r.enosys), r.cond)
}

fn build<'a>(
    name: &str,
    plain: impl Iterator<Item = &'a String>,
    cond: Vec<serde_json::Value>,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: Vec<serde_json::Value> = plain.map(|s| serde_json::json!({ "syscall": s })).collect();
    rules.extend(cond);
    let json = serde_json::json!({
        name: { "mismatch_action": "kill_process", "match_action": "allow", "filter": rules }
    });
    let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch())
        .map_err(|e| SeccompError::Compile(format!("{name}: {e}")))?;
    map.remove(name)
        .ok_or_else(|| SeccompError::Compile(format!("{name}: missing from the output")))
}

/// The filter stacked under `name`'s (installed first) that answers its
/// `enosys` calls with ENOSYS and lets everything else through to it: glibc
/// falls back from `clone3` to `clone` (whose flags a filter can check),
/// QEMU from io_uring to epoll. `None` when `name` has none.
pub fn compile_enosys(name: &str) -> Result<Option<BpfProgram>, SeccompError> {
    let r = resolve_all(&specs()?, name, 0)?;
    if r.enosys.is_empty() {
        return Ok(None);
    }
    let label = format!("{name}-enosys");
    let rules: Vec<_> = r
        .enosys
        .iter()
        .map(|s| serde_json::json!({ "syscall": s }))
        .collect();
    let json = serde_json::json!({
        &label: { "mismatch_action": "allow", "match_action": { "errno": libc::ENOSYS }, "filter": rules }
    });
    let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch())
        .map_err(|e| SeccompError::Compile(format!("{label}: {e}")))?;
    map.remove(&label)
        .map(Some)
        .ok_or_else(|| SeccompError::Compile(format!("{label}: missing")))
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
    /// The ENOSYS filters stacked under each role's (see [`compile_enosys`]).
    api_enosys: Option<BpfProgram>,
    vm_enosys: Option<BpfProgram>,
    guest_enosys: Option<BpfProgram>,
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
            api_enosys: compile_enosys("api")?,
            vm_enosys: compile_enosys(vm_filter)?,
            guest_enosys: compile_enosys("guest")?,
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
        let (caps, enosys, filter) = match role {
            Role::Api => (&[][..], &self.api_enosys, &self.api),
            Role::Vm => (&self.vm_caps[..], &self.vm_enosys, &self.vm),
            Role::Guest => (&[][..], &self.guest_enosys, &self.guest),
        };
        caps::restrict_thread(caps)?;
        // First: the role filters (but vm's) forbid installing filters.
        if let Some(e) = enosys {
            install(e)?;
        }
        install(filter)?;
        Ok(())
    }
}

/// glibc's malloc reads two files lazily, once per process, on whichever
/// thread gets there first — under load that can be an `nv-guest` thread,
/// whose filter kills the daemon at the `openat` (seen in CI, `dmesg`:
/// `comm="nv-guest" syscall=257`, from `__open64_nocancel`):
/// - `/sys/devices/system/cpu/online`, for the arena limit, when a thread
///   needs a new arena while more than 8 exist: set the limit up front
///   (glibc's own default, 8 per CPU), so glibc never looks;
/// - `/proc/sys/vm/overcommit_memory`, the first time a thread arena's heap
///   shrinks (`check_may_shrink_heap`): make one shrink now, on a fresh
///   thread (which gets an arena of its own), while files may still be
///   opened.
fn settle_glibc_lazy_reads() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max = libc::c_int::try_from(8 * cpus).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc parameter.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, max) } != 1 {
            tracing::warn!("mallopt(M_ARENA_MAX) refused: a confined thread may still read /sys");
        }
        let shrink = std::thread::Builder::new()
            .name("nv-malloc-warm".into())
            .spawn(|| {
                // 8 MiB in blocks under the mmap threshold grow the thread
                // arena's heap; freeing them from the top shrinks it.
                let blocks: Vec<Vec<u8>> = (0..128).map(|_| vec![1u8; 64 << 10]).collect();
                for b in blocks.into_iter().rev() {
                    std::hint::black_box(&b);
                    drop(b);
                }
            });
        if let Ok(t) = shrink {
            let _ = t.join();
        }
    }
}

/// A panic on a confined thread is logged (thread, place, message) without a
/// backtrace: symbolizing one opens the binary and `/proc`, which the api
/// and guest filters forbid, so with `RUST_BACKTRACE` set the default hook
/// would get the whole daemon killed instead of failing one task.
fn log_panics_without_backtraces() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(thread = thread.name().unwrap_or("?"), "panic at {place}: {what}");
    }));
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
    log_panics_without_backtraces();
    settle_glibc_lazy_reads();
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
    let install = |prog: &BpfProgram| {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
            role: "custom",
            source,
        })
    };
    if let Some(e) = compile_enosys(name)? {
        install(&e)?;
    }
    install(&compile(name)?)
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
        let (plain, cond) = resolve(&specs().expect("specs"), "guest", 0).expect("resolve");
        let socket = cond
            .iter()
            .find(|r| r["syscall"] == "socket")
            .expect("socket rule");
        assert_eq!(socket["args"][0]["val"], libc::AF_UNIX);
        // What tokio's orphan reaping needs, and no more: SIGCHLD's
        // disposition, non-blocking reaps.
        for call in ["rt_sigaction", "wait4", "waitid"] {
            assert!(!plain.contains(call), "guest allows {call} unconditionally");
        }
        let rule = |name: &str| {
            cond.iter()
                .find(|r| r["syscall"] == name)
                .unwrap_or_else(|| panic!("{name} rule"))["args"][0]
                .clone()
        };
        assert_eq!(rule("rt_sigaction")["val"], libc::SIGCHLD);
        assert_eq!(rule("wait4")["op"]["masked_eq"], libc::WNOHANG);
        assert_eq!(rule("waitid")["op"]["masked_eq"], libc::WNOHANG);
    }

    /// Forks a child that installs `prog` and execs `/bin/true` through
    /// `path` (a pointer to that path); returns how the child ended.
    fn exec_under(prog: &BpfProgram, path: *const libc::c_char) -> nix::sys::wait::WaitStatus {
        let filter: Vec<libc::sock_filter> = prog
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let fprog = libc::sock_fprog {
            len: filter.len() as libc::c_ushort,
            filter: filter.as_ptr().cast_mut(),
        };
        let argv = [path, std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: the child makes raw syscalls on data prepared above only.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork");
            if pid == 0 {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
                {
                    libc::_exit(98);
                }
                libc::execve(path, argv.as_ptr(), envp.as_ptr());
                libc::_exit(99);
            }
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("waitpid")
        }
    }

    #[test]
    fn an_exec_once_filter_allows_that_exec_and_kills_any_other() {
        use nix::sys::wait::WaitStatus;
        let prepared = std::ffi::CString::new("/bin/true").expect("path");
        // The same text at another address: what a compromised helper would pass.
        let other = std::ffi::CString::new("/bin/true").expect("path");
        let prog = compile_exec_once("vhost-device-vsock", prepared.as_ptr().cast()).expect("compile");
        assert!(
            matches!(exec_under(&prog, prepared.as_ptr()), WaitStatus::Exited(_, 0)),
            "the prepared exec must run"
        );
        assert!(
            matches!(
                exec_under(&prog, other.as_ptr()),
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "any other exec must kill"
        );
        assert!(!allowed("vhost-device-vsock").expect("vhost").contains("execve"));
    }

    #[test]
    fn enosys_calls_pass_the_role_filter_and_are_answered_by_the_stacked_one() {
        let vm = resolve_all(&specs().expect("specs"), "vm", 0).expect("vm");
        for call in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "userfaultfd",
        ] {
            assert!(vm.enosys.contains(call) && !vm.plain.contains(call), "vm: {call}");
        }
        // vm lists clone3 itself (it forks), which beats api's ENOSYS.
        assert!(vm.plain.contains("clone3") && !vm.enosys.contains("clone3"));
        let api = resolve_all(&specs().expect("specs"), "api", 0).expect("api");
        assert!(api.enosys.contains("clone3") && !api.plain.contains("ioctl"));
        for name in ["api", "vm", "guest", "vm-ebpf"] {
            assert!(compile_enosys(name).expect("enosys").is_some(), "{name}");
        }
        assert!(compile_enosys("vhost-device-vsock").expect("enosys").is_none());
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
