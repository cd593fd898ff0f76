//! VMM backends behind one narrow trait.
//!
//! A [`VmmBackend`] starts VMs; a [`Vm`] is one running microVM that can be waited
//! on until its guest agent is ready, connected to over hybrid vsock, and shut
//! down or killed. Everything a VM owns on the host (processes, sockets, its
//! state directory) is released by [`Vm::kill`], and by `Drop` as a last resort,
//! so no error path, timeout or cancellation leaks it.

pub mod accel;
pub mod capped_log;
pub mod fc_api;
pub mod firecracker;
pub mod guest_memory;
pub mod jailer;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod select;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::channel::vsock::{GuestStream, VsockError};
use crate::channel::GuestIo;
use crate::config::VmSize;
use crate::security::rate_limit::RateLimitConfig;

pub use accel::{Accel, AccelChoice};
pub use firecracker::{FirecrackerBackend, FirecrackerOptions};
pub use guest_memory::{GuestMemory, GuestMemoryError};
pub use qemu::QemuBackend;
pub use select::{select_backend, BackendKind, BackendOptions};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what} not found: {hint}")]
    MissingBinary { what: String, hint: String },
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}){}", tail_suffix(.log_tail))]
    HelperExited {
        what: String,
        status: String,
        log_tail: String,
    },
    #[error("VM exited before its agent was ready ({status}); console log tail:\n{console_tail}")]
    DiedDuringBoot { status: String, console_tail: String },
    #[error("VM agent not ready after {timeout:?}; console log tail:\n{console_tail}")]
    BootTimeout { timeout: Duration, console_tail: String },
    #[error("guest channel: {0}")]
    Channel(#[from] VsockError),
    #[error("QMP: {0}")]
    Qmp(String),
    /// A Firecracker API call was refused (`fault` is Firecracker's `fault_message`)
    /// or got no answer (`status` is `None`).
    #[error("Firecracker API call {call} failed{}: {fault}{}", status_suffix(.status), tail_suffix(.log_tail))]
    FirecrackerApi {
        call: String,
        status: Option<u16>,
        fault: String,
        log_tail: String,
    },
    #[error("jailer: {0}")]
    Jail(String),
    /// A snapshot could not be made or restored (unreadable, corrupt, or
    /// made for another VM size, kernel or backend).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The backend does not implement this operation (e.g. snapshots on QEMU).
    #[error("not supported: {0}")]
    Unsupported(String),
}

fn status_suffix(status: &Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Unique id; also the name of the VM's state directory.
    pub id: String,
    pub size: VmSize,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    /// Parent of the per-VM state directories.
    pub state_dir: PathBuf,
    /// Extra guest kernel command line parameters.
    pub extra_cmdline: Vec<String>,
    /// Limits on what the guest sends over vsock (bytes read, connections).
    pub rate_limit: RateLimitConfig,
    /// Where the VM's guest bytes are read (the daemon's `nv-guest` runtime).
    pub guest_io: GuestIo,
    /// The owner's metrics and eBPF guard.
    pub hooks: crate::supervisor::VmHooks,
    /// Guest RAM that outlives the VM (QEMU). Unsealed in `spawn`: the VM is
    /// a snapshot template, its RAM is this memfd (shared) and its guest
    /// channel a virtio-serial port. Sealed in `restore`: the restored VM's
    /// RAM starts as this image, copy-on-write. Firecracker keeps RAM in its
    /// own snapshot memory file and ignores it.
    pub guest_memory: Option<std::sync::Arc<GuestMemory>>,
    /// `--network`: the VM gets a NIC behind its own gateway (see
    /// [`crate::net`]); `None`: no network device at all.
    pub network: Option<std::sync::Arc<crate::net::NetSettings>>,
}

impl VmConfig {
    pub fn vm_dir(&self) -> PathBuf {
        self.state_dir.join("vms").join(&self.id)
    }
}

/// VMs with a network are booted, never restored: their link (gateway,
/// namespace, TAP) is made at boot. Every backend's `restore` asks this first.
pub(crate) fn refuse_network_restore(cfg: &VmConfig) -> Result<(), VmmError> {
    match cfg.network {
        Some(_) => Err(VmmError::Unsupported(
            "restoring a VM with --network (its link is made at boot)".into(),
        )),
        None => Ok(()),
    }
}

/// Guest kernel command line shared by every backend.
pub fn base_cmdline(cfg: &VmConfig) -> Vec<String> {
    let mut args: Vec<String> = [
        "console=ttyS0",
        "8250.nr_uarts=1",
        "panic=-1",
        "root=/dev/vda",
        "ro",
        "rootfstype=ext4",
        "init=/sbin/neurovisor-agent",
        "quiet",
        "random.trust_cpu=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("nv.scratch_mb={}", cfg.size.scratch_mib()));
    if cfg.network.is_some() {
        args.push(crate::net::guest_cmdline());
    }
    args.extend(cfg.extra_cmdline.iter().cloned());
    args
}

/// Starts VMs.
#[async_trait]
pub trait VmmBackend: Send + Sync {
    /// Short name for logs and metrics ("qemu", "firecracker").
    fn name(&self) -> &'static str;
    /// The accelerator its VMs run on ("kvm", "tcg"), for `/metrics`.
    fn accel(&self) -> &'static str {
        "kvm"
    }
    /// What a snapshot made by this backend depends on besides the images
    /// (the VMM binary, the accelerator): part of a template's cache key.
    fn identity(&self) -> String {
        self.name().to_string()
    }
    /// Whether [`Vm::create_snapshot`] works on a VM that booted (not only
    /// on one restored from a snapshot).
    fn snapshots_booted_vms(&self) -> bool {
        false
    }
    /// The live VMs' cgroups, for `/metrics` (none without a supervisor).
    fn live_vms(&self) -> crate::supervisor::LiveVms {
        crate::supervisor::LiveVms::default()
    }
    /// Starts a VM. On error nothing of it is left behind.
    async fn spawn(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, VmmError>;
    /// Starts a VM from a full snapshot (made by [`Vm::create_snapshot`]) and
    /// resumes it. `cfg` gives the new VM's id and state directory; the guest
    /// agent is already serving, so `wait_ready` only checks that it answers.
    async fn restore(&self, cfg: &VmConfig, snapshot: &Path, mem: &Path) -> Result<Box<dyn Vm>, VmmError> {
        let _ = (cfg, snapshot, mem);
        Err(VmmError::Unsupported(format!(
            "the {} backend cannot restore snapshots",
            self.name()
        )))
    }
}

/// One running microVM.
#[async_trait]
pub trait Vm: Send + Sync {
    fn id(&self) -> &str;
    /// Waits until the guest agent announces that it is serving, or fails with the
    /// console log tail if the VM dies or the timeout passes first.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmmError>;
    /// Waits until the VMM process exits on its own (e.g. the guest powered off)
    /// and describes how; `None` if it is still running after `timeout`.
    async fn wait_exited(&mut self, timeout: Duration) -> Option<String>;
    /// Without blocking: `Some(how)` if the VM's VMM or a helper has exited.
    fn check_exited(&mut self) -> Option<String>;
    /// Opens a stream to a guest vsock port (reads paced by the VM's rate limiter).
    async fn connect(&self, port: u32) -> Result<GuestStream, VmmError>;
    /// Host process ids of the VM (VMM and helpers), for accounting and tests.
    fn pids(&self) -> Vec<u32>;
    /// The VM's state directory.
    fn dir(&self) -> &Path;
    /// The last lines of the guest console and the VMM's log (sanitized guest
    /// text), for diagnosing a guest that stopped answering.
    fn console_tail(&self) -> String {
        String::new()
    }
    /// Asks the VMM to stop, kills it after `grace`, and releases everything.
    async fn shutdown(self: Box<Self>, grace: Duration);
    /// Kills the VM at once and releases everything.
    async fn kill(self: Box<Self>);
    /// Pauses the guest's vCPUs (a snapshot needs a paused VM).
    async fn pause(&self) -> Result<(), VmmError> {
        Err(VmmError::Unsupported("this VMM backend cannot pause VMs".into()))
    }
    /// Resumes a paused VM.
    async fn resume(&self) -> Result<(), VmmError> {
        Err(VmmError::Unsupported("this VMM backend cannot resume VMs".into()))
    }
    /// Writes a full snapshot of a paused VM: device state to `snapshot_path`,
    /// guest memory to `mem_path`.
    async fn create_snapshot(&self, snapshot_path: &Path, mem_path: &Path) -> Result<(), VmmError> {
        let _ = (snapshot_path, mem_path);
        Err(VmmError::Unsupported(
            "this VMM backend cannot create snapshots".into(),
        ))
    }
}

/// Last lines of a log file, for error messages. The console is guest text:
/// each line is sanitized (controls escaped, at most 512 bytes; see
/// [`crate::channel::text`]), so only the line breaks of the tail itself remain.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => return String::new(),
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| crate::channel::text::sanitize_capped(l, 512))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Looks a binary up: an explicit path, else `PATH`, else `~/.cargo/bin`
/// (where `cargo install` puts `vhost-device-vsock`).
pub fn find_binary(explicit: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_carries_scratch_size_and_extras() {
        let cfg = VmConfig {
            id: "x".into(),
            size: VmSize::Small,
            kernel: "k".into(),
            rootfs: "r".into(),
            state_dir: "/s".into(),
            extra_cmdline: vec!["nv.mode=poweroff".into()],
            rate_limit: RateLimitConfig::default(),
            guest_io: GuestIo::inline(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        };
        let c = base_cmdline(&cfg).join(" ");
        assert!(
            c.contains("nv.scratch_mb=64") && c.ends_with("nv.mode=poweroff"),
            "{c}"
        );
        assert_eq!(cfg.vm_dir(), PathBuf::from("/s/vms/x"));
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&p, 2), "b\nc");
        std::fs::write(&p, "x\n\x1b[2Jy\rz\n").expect("write");
        assert_eq!(log_tail(&p, 5), "x\n\\u{1b}[2Jy\\u{d}z");
        assert_eq!(log_tail(&dir.path().join("none"), 2), "");
    }

    /// A backend and VM that implement only what is required: snapshots
    /// default to `Unsupported` (as on QEMU).
    struct Minimal;

    #[async_trait]
    impl VmmBackend for Minimal {
        fn name(&self) -> &'static str {
            "minimal"
        }
        async fn spawn(&self, _: &VmConfig) -> Result<Box<dyn Vm>, VmmError> {
            Ok(Box::new(Minimal))
        }
    }

    #[async_trait]
    impl Vm for Minimal {
        fn id(&self) -> &str {
            "m"
        }
        async fn wait_ready(&mut self, _: Duration) -> Result<(), VmmError> {
            Ok(())
        }
        async fn wait_exited(&mut self, _: Duration) -> Option<String> {
            None
        }
        fn check_exited(&mut self) -> Option<String> {
            None
        }
        async fn connect(&self, port: u32) -> Result<GuestStream, VmmError> {
            Err(VmmError::Unsupported(format!("connect {port}")))
        }
        fn pids(&self) -> Vec<u32> {
            Vec::new()
        }
        fn dir(&self) -> &Path {
            Path::new("/")
        }
        async fn shutdown(self: Box<Self>, _: Duration) {}
        async fn kill(self: Box<Self>) {}
    }

    #[tokio::test]
    async fn snapshots_default_to_unsupported() {
        let cfg = VmConfig {
            id: "x".into(),
            size: VmSize::Small,
            kernel: "k".into(),
            rootfs: "r".into(),
            state_dir: "/s".into(),
            extra_cmdline: vec![],
            rate_limit: RateLimitConfig::default(),
            guest_io: GuestIo::inline(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        };
        let vm = Minimal.spawn(&cfg).await.expect("spawn");
        let p = Path::new("/tmp/x");
        for r in [
            vm.pause().await,
            vm.resume().await,
            vm.create_snapshot(p, p).await,
        ] {
            assert!(matches!(r, Err(VmmError::Unsupported(_))), "{r:?}");
        }
        match Minimal.restore(&cfg, p, p).await {
            Err(e @ VmmError::Unsupported(_)) => assert!(e.to_string().contains("minimal"), "{e}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("restore must be unsupported by default"),
        }
    }
}
