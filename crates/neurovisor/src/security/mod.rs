//! Host-side defense in depth: the layers between untrusted guest code and
//! the host, outside the VM boundary itself.
//!
//! - [`caps`]: the daemon keeps only the capabilities it still needs and sets NoNewPrivs.
//! - [`seccomp`]: allowlist filters per thread role (data in `seccomp/*.json`).
//! - [`cgroups`]: one cgroup per VM (memory, CPU, pids), cgroup v1 or v2.
//! - [`jail`]: VMM processes run under their own uid, in new namespaces, in a private root.
//! - [`rate_limit`]: token buckets on everything a guest sends to the host over vsock.
//! - `ebpf` (cargo feature `ebpf`): BPF LSM `file_open` policy and per-VM syscall counts.

pub mod caps;
pub mod cgroups;
#[cfg(feature = "ebpf")]
pub mod ebpf;
pub mod jail;
pub mod lsm;
pub mod rate_limit;
pub mod seccomp;
pub mod vm_guard;
