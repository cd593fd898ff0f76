//! The eBPF guard as the VM layer sees it: a handle the daemon loads once
//! (cargo feature `ebpf`) and passes down to its VMs through
//! [`crate::supervisor::VmHooks`], so the supervisor can put each VM's
//! cgroup under the file policy and syscall counting without knowing whether
//! a guard is loaded. Without the feature, or when none was loaded (every
//! `run`), every call is a no-op.

#[cfg(feature = "ebpf")]
use std::sync::{Arc, Mutex};

/// A loaded guard, or none. Clones share it.
#[derive(Clone, Default)]
pub struct VmGuard {
    #[cfg(feature = "ebpf")]
    inner: Option<Arc<Mutex<super::ebpf::EbpfGuard>>>,
}

impl std::fmt::Debug for VmGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGuard").field("loaded", &self.loaded()).finish()
    }
}

impl VmGuard {
    /// The handle on a loaded guard.
    #[cfg(feature = "ebpf")]
    pub fn new(guard: super::ebpf::EbpfGuard) -> Self {
        Self {
            inner: Some(Arc::new(Mutex::new(guard))),
        }
    }

    /// Whether a guard is loaded (the VM management threads then need `bpf()`).
    pub fn loaded(&self) -> bool {
        #[cfg(feature = "ebpf")]
        {
            self.inner.is_some()
        }
        #[cfg(not(feature = "ebpf"))]
        {
            false
        }
    }

    /// Puts a new VM's cgroup (v2 id) under the file policy and syscall counting.
    pub fn vm_started(&self, vm: &str, cgroup_v2_id: Option<u64>) {
        #[cfg(feature = "ebpf")]
        if let (Some(g), Some(id)) = (&self.inner, cgroup_v2_id) {
            if let Ok(mut g) = g.lock() {
                if let Err(e) = g.confine_cgroup(id) {
                    tracing::warn!(vm, "eBPF: cannot confine cgroup {id}: {e}");
                }
            }
        }
        let _ = (vm, cgroup_v2_id);
    }

    /// Releases a VM's cgroup; returns how many syscalls its processes made.
    pub fn vm_stopped(&self, vm: &str, cgroup_v2_id: Option<u64>) -> Option<u64> {
        #[cfg(feature = "ebpf")]
        if let (Some(g), Some(id)) = (&self.inner, cgroup_v2_id) {
            if let Ok(mut g) = g.lock() {
                match g.release_cgroup(id) {
                    Ok(n) => {
                        tracing::debug!(vm, syscalls = n, "eBPF: VM released");
                        return Some(n);
                    }
                    Err(e) => tracing::warn!(vm, "eBPF: cannot release cgroup {id}: {e}"),
                }
            }
        }
        let _ = (vm, cgroup_v2_id);
        None
    }
}
