//! VM size tiers and host paths, with defaults that work for root and non-root users.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The size tiers of the product: vCPUs and guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VmSize {
    /// 1 vCPU, 256 MiB
    Small,
    /// 2 vCPUs, 512 MiB
    #[default]
    Medium,
    /// 4 vCPUs, 1024 MiB
    Large,
}

impl VmSize {
    pub fn vcpus(self) -> u32 {
        match self {
            Self::Small => 1,
            Self::Medium => 2,
            Self::Large => 4,
        }
    }

    pub fn memory_mib(self) -> u32 {
        match self {
            Self::Small => 256,
            Self::Medium => 512,
            Self::Large => 1024,
        }
    }

    /// Size cap of the guest's writable layer (a tmpfs, so it also counts
    /// against guest memory): a quarter of RAM.
    pub fn scratch_mib(self) -> u32 {
        self.memory_mib() / 4
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Medium => "medium",
            Self::Large => "large",
        }
    }
}

impl std::fmt::Display for VmSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Where built images live: `NEUROVISOR_CACHE_DIR`, else `$XDG_CACHE_HOME/neurovisor`,
/// else `~/.cache/neurovisor` (the image build scripts use the same rule).
pub fn cache_dir() -> PathBuf {
    env_path("NEUROVISOR_CACHE_DIR")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|p| p.join("neurovisor")))
        .or_else(|| env_path("HOME").map(|p| p.join(".cache/neurovisor")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/neurovisor"))
}

/// Where per-VM runtime state (sockets, console logs) lives. Unix socket paths
/// are limited to 108 bytes, so this must stay short.
pub fn default_state_dir() -> PathBuf {
    if let Some(p) = env_path("NEUROVISOR_STATE_DIR") {
        return p;
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/neurovisor");
    }
    env_path("XDG_RUNTIME_DIR")
        .map(|p| p.join("neurovisor"))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/neurovisor-{}", nix::unistd::geteuid())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_match_the_product() {
        assert_eq!((VmSize::Small.vcpus(), VmSize::Small.memory_mib()), (1, 256));
        assert_eq!((VmSize::Medium.vcpus(), VmSize::Medium.memory_mib()), (2, 512));
        assert_eq!((VmSize::Large.vcpus(), VmSize::Large.memory_mib()), (4, 1024));
        assert_eq!(VmSize::default(), VmSize::Medium);
    }
}
