//! Process-wide registration of VM cgroups with the eBPF guard (cargo feature
//! `ebpf`), so the VMM backends can confine each VM's processes without
//! knowing whether a guard is loaded. Without the feature, or before a guard
//! is installed, every call is a no-op.

#[cfg(feature = "ebpf")]
use std::sync::{Mutex, OnceLock};

#[cfg(feature = "ebpf")]
static GUARD: OnceLock<Mutex<super::ebpf::EbpfGuard>> = OnceLock::new();

/// Makes `guard` the one VMs register with (the first call wins).
#[cfg(feature = "ebpf")]
pub fn install(guard: super::ebpf::EbpfGuard) {
    let _ = GUARD.set(Mutex::new(guard));
}

/// Whether a guard is loaded (the VM management threads then need `bpf()`).
pub fn loaded() -> bool {
    #[cfg(feature = "ebpf")]
    {
        GUARD.get().is_some()
    }
    #[cfg(not(feature = "ebpf"))]
    {
        false
    }
}

/// Puts a new VM's cgroup (v2 id) under the file policy and syscall counting.
pub fn vm_started(vm: &str, cgroup_v2_id: Option<u64>) {
    #[cfg(feature = "ebpf")]
    if let (Some(g), Some(id)) = (GUARD.get(), cgroup_v2_id) {
        if let Ok(mut g) = g.lock() {
            if let Err(e) = g.confine_cgroup(id) {
                tracing::warn!(vm, "eBPF: cannot confine cgroup {id}: {e}");
            }
        }
    }
    let _ = (vm, cgroup_v2_id);
}

/// Releases a VM's cgroup; returns how many syscalls its processes made.
pub fn vm_stopped(vm: &str, cgroup_v2_id: Option<u64>) -> Option<u64> {
    #[cfg(feature = "ebpf")]
    if let (Some(g), Some(id)) = (GUARD.get(), cgroup_v2_id) {
        if let Ok(mut g) = g.lock() {
            match g.release_cgroup(id) {
                Ok(n) => {
                    tracing::debug!(vm, syscalls = n, "eBPF: VM released");
                    crate::metrics::vmm_syscalls().inc_by(n);
                    return Some(n);
                }
                Err(e) => tracing::warn!(vm, "eBPF: cannot release cgroup {id}: {e}"),
            }
        }
    }
    let _ = (vm, cgroup_v2_id);
    None
}
