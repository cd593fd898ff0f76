//! Firecracker backend.
//!
//! One VM is one `firecracker` process (optionally started by its `jailer`,
//! see [`super::jailer`]), configured through its API socket
//! ([`super::fc_api`]): logger and metrics files, machine config from the size
//! tier, the same `vmlinux` as QEMU with a Firecracker command line, the
//! shared read-only rootfs (the guest keeps its writes in a tmpfs overlay), a
//! vsock device whose hybrid-vsock socket is the same [`HybridVsock`] the QEMU
//! backend uses, an entropy device; then `InstanceStart`.
//!
//! Files of one VM: `<state>/vms/<id>/vmm.log` (Firecracker's stdout and
//! stderr: the serial console and early errors; written by the host through
//! a pipe, capped at [`CONSOLE_LOG_CAP`], see [`super::capped_log`]) and, in that directory or in
//! the VM's chroot when jailed, `firecracker.sock` (API), `firecracker.log`
//! (Firecracker's logger), `metrics.json`, `vsock.sock` and `vsock.sock_6001`
//! (the readiness listener, bound before Firecracker starts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UnixListener;
use tokio::process::Command;

use super::capped_log::{CappedLog, CONSOLE_LOG_CAP};
use super::fc_api::{self, ApiClient, RateLimiter};
use super::jailer::{self, IdPool, IdRange, Jail, JailSpec};
use super::process::{wait_for_path, Helper};
use super::{base_cmdline, find_binary, log_tail, Vm, VmConfig, VmmBackend, VmmError};
use crate::channel::{vsock, HybridVsock};
use crate::supervisor::{Confinement, Supervisor};
use neurovisor_proto::{GUEST_AGENT_PORT, GUEST_READY_PORT};

/// The guest's vsock CID (each VM has its own vsock device and socket).
pub const GUEST_CID: u32 = 3;
const CONSOLE_TAIL_LINES: usize = 40;
const LOG_TAIL_LINES: usize = 10;

const API_SOCK: &str = jailer::API_SOCK;
const LOG: &str = "firecracker.log";
const METRICS: &str = "metrics.json";
const VSOCK: &str = "vsock.sock";
const SNAPSHOT_STATE: &str = "snapshot.state";
const SNAPSHOT_MEM: &str = "snapshot.mem";
/// The guest's one NIC (`eth0` inside).
const NET_IFACE: &str = "eth0";

pub const FIRECRACKER_HINT: &str = "get `firecracker` (and `jailer`) from a Firecracker release \
    (github.com/firecracker-microvm/firecracker/releases), put them on PATH or pass --firecracker-bin";
pub const JAILER_HINT: &str =
    "the jailer ships with Firecracker releases; put it on PATH or pass --jailer-bin";

#[derive(Debug, Clone)]
pub struct FirecrackerOptions {
    /// `firecracker` binary (default: on PATH).
    pub firecracker_bin: Option<PathBuf>,
    /// `jailer` binary (default: on PATH).
    pub jailer_bin: Option<PathBuf>,
    /// Run under the jailer: `None` = when its binary is found and we are root.
    pub jailer: Option<bool>,
    /// The uids/gids jailed VMs run as.
    pub jail_ids: IdRange,
    /// `ip` (iproute2), for the jailed VMs' network namespaces (default: on PATH or /usr/sbin).
    pub ip_bin: Option<PathBuf>,
    /// Firecracker's rate limiter on the root drive.
    pub drive_rate_limiter: Option<RateLimiter>,
    /// How long Firecracker may take to create its API socket.
    pub socket_timeout: Duration,
}

impl Default for FirecrackerOptions {
    fn default() -> Self {
        Self {
            firecracker_bin: None,
            jailer_bin: None,
            jailer: None,
            jail_ids: IdRange::default(),
            ip_bin: None,
            drive_rate_limiter: None,
            socket_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether to use the jailer, and why.
pub fn decide_jailer(
    requested: Option<bool>,
    jailer: Option<&Path>,
    is_root: bool,
) -> Result<(Option<PathBuf>, String), VmmError> {
    match (requested, jailer) {
        (Some(false), _) => Ok((None, "jailer disabled (--no-jailer)".into())),
        (Some(true), None) => Err(VmmError::MissingBinary {
            what: "jailer".into(),
            hint: JAILER_HINT.into(),
        }),
        (Some(true), Some(_)) if !is_root => Err(VmmError::Jail(
            "the jailer must run as root (it creates a chroot, cgroups and switches uid)".into(),
        )),
        (_, Some(j)) if is_root => Ok((Some(j.to_path_buf()), format!("jailer at {}", j.display()))),
        (_, Some(j)) => Ok((
            None,
            format!(
                "jailer at {} not used: it needs root; Firecracker runs unjailed",
                j.display()
            ),
        )),
        (None, None) => Ok((None, "no jailer binary found; Firecracker runs unjailed".into())),
    }
}

/// Everything needed to jail VMs.
#[derive(Debug, Clone)]
struct JailSetup {
    jailer: PathBuf,
    /// The Firecracker binary, resolved: the jailer canonicalizes `--exec-file`
    /// and names the chroot's directory after the resolved file.
    exec_file: PathBuf,
    ip: PathBuf,
    exec_name: String,
    cgroup_version: u8,
}

#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    firecracker: PathBuf,
    /// Cgroups, jail uids, owner locks: the same for every backend.
    supervisor: Supervisor,
    jail: Option<JailSetup>,
    jailer_reason: String,
    drive_rate_limiter: Option<RateLimiter>,
    socket_timeout: Duration,
}

fn find_ip(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => find_binary(Some(p), "ip"),
        None => jailer::find_ip(),
    }
}

impl FirecrackerBackend {
    pub fn new(opts: &FirecrackerOptions) -> Result<Self, VmmError> {
        let firecracker = find_binary(opts.firecracker_bin.as_deref(), "firecracker").ok_or_else(|| {
            VmmError::MissingBinary {
                what: "firecracker".into(),
                hint: FIRECRACKER_HINT.into(),
            }
        })?;
        let found_jailer = match opts.jailer {
            Some(false) => None,
            _ => find_binary(opts.jailer_bin.as_deref(), "jailer"),
        };
        let is_root = nix::unistd::geteuid().is_root();
        let (jailer, jailer_reason) = decide_jailer(opts.jailer, found_jailer.as_deref(), is_root)?;
        let exec_file = match jailer {
            None => firecracker.clone(),
            Some(_) => std::fs::canonicalize(&firecracker)
                .map_err(|e| VmmError::Jail(format!("cannot resolve {}: {e}", firecracker.display())))?,
        };
        let jail = match jailer {
            None => None,
            Some(jailer) => Some(JailSetup {
                exec_name: jailer::exec_file_name(&exec_file)?,
                exec_file,
                ip: find_ip(opts.ip_bin.as_deref()).ok_or_else(|| VmmError::MissingBinary {
                    what: "ip (iproute2, for the jailed VMs' network namespaces)".into(),
                    hint: jailer::IP_HINT.into(),
                })?,
                cgroup_version: jailer::cgroup_version(),
                jailer,
            }),
        };
        tracing::info!(firecracker = %firecracker.display(), "{jailer_reason}");
        let ids = jail.is_some().then(|| IdPool::new(opts.jail_ids));
        Ok(Self {
            supervisor: Supervisor::new(ids),
            firecracker,
            jail,
            jailer_reason,
            drive_rate_limiter: opts.drive_rate_limiter,
            socket_timeout: opts.socket_timeout,
        })
    }

    pub fn firecracker(&self) -> &Path {
        &self.firecracker
    }

    pub fn jailed(&self) -> bool {
        self.jail.is_some()
    }

    /// Why the jailer is (not) used.
    pub fn jailer_reason(&self) -> &str {
        &self.jailer_reason
    }

    /// Creates the VM's directory (and jail), binds the readiness listener if
    /// asked, starts Firecracker and waits for its API socket.
    async fn start(&self, cfg: &VmConfig, readiness: bool) -> Result<FirecrackerVm, VmmError> {
        if self.jail.is_some() && !jailer::valid_jail_id(&cfg.id) {
            return Err(VmmError::Jail(format!(
                "VM id '{}' is not a valid jailer id (alphanumerics and '-', at most 64)",
                cfg.id
            )));
        }
        let dir = cfg.vm_dir();
        // Directory, cgroup (the keeper puts Firecracker, or its jailer, into
        // it), uid lease: dropping it releases them.
        let conf = self.supervisor.confine(cfg)?;
        let layout = match &self.jail {
            None => Layout::Direct(dir.clone()),
            Some(j) => Layout::Jailed(
                cfg.state_dir
                    .join(jailer::CHROOT_DIR)
                    .join(&j.exec_name)
                    .join(&cfg.id)
                    .join("root"),
            ),
        };
        // From here on, dropping `vm` releases whatever was created.
        let mut vm = FirecrackerVm {
            id: cfg.id.clone(),
            vmm_log: dir.join("vmm.log"),
            dir,
            api: ApiClient::new(layout.host(API_SOCK)).with_log(layout.host(LOG)),
            vsock: HybridVsock::new(layout.host(VSOCK), cfg.rate_limit, &cfg.hooks.counters)
                .with_guest_io(cfg.guest_io.clone()),
            layout,
            ready: Readiness::Done,
            process: None,
            gateway: None,
            jail: None,
            conf,
        };
        // Firecracker's stdout is the guest's serial console: capped.
        let out = CappedLog::create(&vm.vmm_log, CONSOLE_LOG_CAP).map_err(|source| VmmError::StateDir {
            path: vm.vmm_log.clone(),
            source,
        })?;
        let mut cmd;
        let what;
        match &self.jail {
            None => {
                for name in [LOG, METRICS] {
                    let p = vm.layout.host(name);
                    std::fs::File::create(&p).map_err(|source| VmmError::StateDir { path: p, source })?;
                }
                cmd = Command::new(&self.firecracker);
                cmd.arg("--api-sock")
                    .arg(vm.layout.host(API_SOCK))
                    .arg("--id")
                    .arg(&cfg.id);
                what = "firecracker";
            }
            Some(setup) => {
                let ids = vm
                    .conf
                    .ids()
                    .ok_or_else(|| VmmError::Jail("jailed VM without a uid lease".into()))?;
                let (uid, gid) = (ids.uid, ids.gid);
                let jail = vm.jail.insert(Jail::new(
                    &cfg.state_dir.join(jailer::CHROOT_DIR),
                    &setup.exec_name,
                    &cfg.id,
                    uid,
                    gid,
                ));
                jail.prepare(&cfg.kernel, &cfg.rootfs, &[LOG, METRICS])?;
                jail.create_netns(&setup.ip, &format!("nv-{}", cfg.id)).await?;
                if let (Some(net), Some(ns)) = (&cfg.network, jail.netns_path()) {
                    let (gateway, _) = crate::net::host::Gateway::spawn(
                        &cfg.id,
                        net,
                        &vm.conf,
                        Some(&ns),
                        &vm.dir,
                        &out,
                        &vm.vmm_log,
                        &cfg.hooks.counters,
                    )
                    .await?;
                    vm.gateway = Some(gateway);
                }
                let spec = JailSpec {
                    id: cfg.id.clone(),
                    exec_file: setup.exec_file.clone(),
                    uid,
                    gid,
                    chroot_base: cfg.state_dir.join(jailer::CHROOT_DIR),
                    cgroup_version: setup.cgroup_version,
                    vm_cgroup: vm
                        .conf
                        .cgroup()
                        .map(|c| format!("{}/{}", jailer::PARENT_CGROUP, c.name())),
                    netns: jail.netns_path(),
                };
                cmd = Command::new(&setup.jailer);
                cmd.args(spec.args());
                what = "jailer";
            }
        }
        if readiness {
            let listener = vm.vsock.listen(GUEST_READY_PORT)?;
            if let Some(jail) = &vm.jail {
                // Firecracker runs as the jail's user and must be able to connect.
                jail.chown(&vm.vsock.host_port_path(GUEST_READY_PORT))?;
            }
            vm.ready = Readiness::Listener(listener);
        } else {
            vm.ready = Readiness::AgentProbe;
        }
        let process = vm
            .process
            .insert(Helper::spawn(what, cmd, &out, &out, vm.conf.keeper_spec(None))?);
        wait_for_path(
            &vm.layout.host(API_SOCK),
            process,
            self.socket_timeout,
            &vm.vmm_log,
        )
        .await?;
        tracing::debug!(vm = %cfg.id, pid = ?vm.pids(), jailed = vm.jail.is_some(), "Firecracker started");
        Ok(vm)
    }

    /// The kernel command line for Firecracker guests.
    pub fn boot_args(cfg: &VmConfig) -> String {
        let mut args: Vec<String> = base_cmdline(cfg)
            .into_iter()
            // A panic reboots after 1 s; a reboot ends the Firecracker process.
            .map(|a| if a == "panic=-1" { "panic=1".to_string() } else { a })
            .collect();
        // reboot=k: reset through the i8042 (Firecracker exits on it); no PCI bus
        // (virtio-mmio devices come as virtio_mmio.device= entries Firecracker appends);
        // the i8042 options skip probing what Firecracker's minimal i8042 lacks.
        for a in [
            "reboot=k",
            "pci=off",
            "i8042.noaux",
            "i8042.nomux",
            "i8042.dumbkbd",
        ] {
            args.push(a.to_string());
        }
        args.join(" ")
    }

    async fn configure_boot(&self, vm: &FirecrackerVm, cfg: &VmConfig) -> Result<(), VmmError> {
        vm.configure_telemetry().await?;
        let api = &vm.api;
        api.put(
            "/machine-config",
            &fc_api::MachineConfiguration {
                vcpu_count: cfg.size.vcpus(),
                mem_size_mib: cfg.size.memory_mib(),
                smt: false,
            },
        )
        .await?;
        let (kernel, rootfs) = match &vm.layout {
            Layout::Direct(_) => (
                absolute(&cfg.kernel).display().to_string(),
                absolute(&cfg.rootfs).display().to_string(),
            ),
            Layout::Jailed(_) => (vm.layout.vmm(jailer::KERNEL), vm.layout.vmm(jailer::ROOTFS)),
        };
        api.put(
            "/boot-source",
            &fc_api::BootSource {
                kernel_image_path: kernel,
                boot_args: Self::boot_args(cfg),
            },
        )
        .await?;
        api.put(
            "/drives/rootfs",
            &fc_api::Drive {
                drive_id: "rootfs".into(),
                path_on_host: rootfs,
                is_root_device: true,
                is_read_only: true,
                rate_limiter: self.drive_rate_limiter,
            },
        )
        .await?;
        api.put(
            "/vsock",
            &fc_api::Vsock {
                guest_cid: GUEST_CID,
                uds_path: vm.layout.vmm(VSOCK),
            },
        )
        .await?;
        api.put("/entropy", &fc_api::EntropyDevice::default()).await?;
        if let Some(net) = &cfg.network {
            // The TAP its gateway left in the VM's namespace, where the
            // jailer put Firecracker; the gateway's filter has a bucket of
            // its own, this one holds the raw frames to the same rate.
            api.put(
                &format!("/network-interfaces/{NET_IFACE}"),
                &fc_api::NetworkInterface {
                    iface_id: NET_IFACE.into(),
                    host_dev_name: crate::net::gateway::TAP.into(),
                    guest_mac: crate::net::GUEST_MAC.into(),
                    tx_rate_limiter: net
                        .policy
                        .bandwidth
                        .and_then(|b| RateLimiter::from_rates(Some(b), None)),
                },
            )
            .await?;
        }
        api.put("/actions", &fc_api::INSTANCE_START).await
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[async_trait]
impl VmmBackend for FirecrackerBackend {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn snapshots_booted_vms(&self) -> bool {
        true
    }

    fn live_vms(&self) -> crate::supervisor::LiveVms {
        self.supervisor.live().clone()
    }

    async fn spawn(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, VmmError> {
        if cfg.network.is_some() && self.jail.is_none() {
            // The TAP lives in the VM's own namespace, which only the
            // jailer puts Firecracker in.
            return Err(VmmError::Unsupported(format!(
                "--network on the Firecracker backend needs its jailer ({}); run as root with \
                 `jailer` on PATH (or --jailer-bin), or use --backend qemu",
                self.jailer_reason
            )));
        }
        let vm = self.start(cfg, true).await?;
        self.configure_boot(&vm, cfg).await?;
        Ok(Box::new(vm))
    }

    async fn restore(&self, cfg: &VmConfig, snapshot: &Path, mem: &Path) -> Result<Box<dyn Vm>, VmmError> {
        super::refuse_network_restore(cfg)?;
        let vm = self.start(cfg, false).await?;
        vm.configure_telemetry().await?;
        let (snapshot_path, mem_path) = match &vm.jail {
            None => (
                absolute(snapshot).display().to_string(),
                absolute(mem).display().to_string(),
            ),
            Some(jail) => {
                jail.place(snapshot, SNAPSHOT_STATE)?;
                jail.place(mem, SNAPSHOT_MEM)?;
                (vm.layout.vmm(SNAPSHOT_STATE), vm.layout.vmm(SNAPSHOT_MEM))
            }
        };
        vm.api
            .put(
                "/snapshot/load",
                &fc_api::SnapshotLoad {
                    snapshot_path,
                    mem_backend: fc_api::MemoryBackend {
                        backend_type: "File",
                        backend_path: mem_path,
                    },
                    resume_vm: true,
                    // The snapshot names the original VM's socket.
                    vsock_override: Some(fc_api::VsockOverride {
                        uds_path: vm.layout.vmm(VSOCK),
                    }),
                },
            )
            .await?;
        Ok(Box::new(vm))
    }
}

/// Where Firecracker's files are, for us (`host`) and for Firecracker (`vmm`).
#[derive(Debug, Clone)]
enum Layout {
    /// Unjailed: everything in the VM directory, same paths for both.
    Direct(PathBuf),
    /// Jailed: in the chroot; Firecracker sees `/<name>`.
    Jailed(PathBuf),
}

impl Layout {
    fn host(&self, name: &str) -> PathBuf {
        match self {
            Self::Direct(d) | Self::Jailed(d) => d.join(name),
        }
    }

    fn vmm(&self, name: &str) -> String {
        match self {
            Self::Direct(d) => d.join(name).display().to_string(),
            Self::Jailed(_) => format!("/{name}"),
        }
    }
}

enum Readiness {
    /// Waiting for the agent's `READY` on host port 6001.
    Listener(UnixListener),
    /// Restored from a snapshot: the agent already serves; check it answers.
    AgentProbe,
    Done,
}

/// One Firecracker microVM.
pub struct FirecrackerVm {
    id: String,
    dir: PathBuf,
    vmm_log: PathBuf,
    layout: Layout,
    api: ApiClient,
    vsock: HybridVsock,
    ready: Readiness,
    process: Option<Helper>,
    /// `--network`: the VM's gateway (its resolver and filter; the TAP and
    /// rules are in the jail's namespace).
    gateway: Option<crate::net::host::Gateway>,
    jail: Option<Jail>,
    /// Directory, cgroup, uid lease: released once the process is stopped.
    conf: Confinement,
}

/// Waits until the guest agent's port accepts a hybrid-vsock connection.
async fn probe_agent(vsock: &HybridVsock) -> std::io::Result<()> {
    loop {
        if vsock.connect(GUEST_AGENT_PORT).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl FirecrackerVm {
    /// The hybrid-vsock endpoint of this VM.
    pub fn vsock(&self) -> &HybridVsock {
        &self.vsock
    }

    /// The API client of this VM's Firecracker.
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    async fn configure_telemetry(&self) -> Result<(), VmmError> {
        self.api
            .put(
                "/logger",
                &fc_api::Logger {
                    log_path: self.layout.vmm(LOG),
                    level: "Info",
                    show_level: true,
                    show_log_origin: false,
                },
            )
            .await?;
        self.api
            .put(
                "/metrics",
                &fc_api::Metrics {
                    metrics_path: self.layout.vmm(METRICS),
                },
            )
            .await
    }

    async fn release(&mut self, grace: Duration) {
        if let Some(p) = self.process.take() {
            p.stop(grace).await;
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        self.ready = Readiness::Done;
        if let Some(mut jail) = self.jail.take() {
            jail.cleanup();
        }
        self.conf.release().await;
    }

    /// Moves a file Firecracker wrote inside the jail to where the caller wants it.
    fn move_out(&self, name: &str, to: &Path) -> Result<(), VmmError> {
        let from = self.layout.host(name);
        let err =
            |e: std::io::Error| VmmError::Jail(format!("move {} to {}: {e}", from.display(), to.display()));
        match std::fs::rename(&from, to) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                std::fs::copy(&from, to).map_err(err)?;
                std::fs::remove_file(&from).map_err(err)
            }
            Err(e) => Err(err(e)),
        }
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    fn id(&self) -> &str {
        &self.id
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let ready = std::mem::replace(&mut self.ready, Readiness::Done);
        if matches!(ready, Readiness::Done) {
            return Ok(());
        }
        let Some(process) = self.process.as_mut() else {
            return Err(VmmError::DiedDuringBoot {
                status: "VM already stopped".into(),
                console_tail: String::new(),
            });
        };
        let what = process.what;
        let vsock = self.vsock.clone();
        let outcome = tokio::select! {
            r = async move {
                match ready {
                    Readiness::Listener(l) => vsock.accept_ready(l).await,
                    _ => probe_agent(&vsock).await,
                }
            } => r.map_err(|e| e.to_string()),
            status = process.exited() => Err(format!("{what}: {status}")),
            _ = tokio::time::sleep(timeout) => {
                return Err(VmmError::BootTimeout { timeout, console_tail: self.console_tail() });
            }
        };
        let _ = std::fs::remove_file(self.vsock.host_port_path(GUEST_READY_PORT));
        outcome.map_err(|status| VmmError::DiedDuringBoot {
            status,
            console_tail: self.console_tail(),
        })
    }

    async fn wait_exited(&mut self, timeout: Duration) -> Option<String> {
        let p = self.process.as_mut()?;
        tokio::time::timeout(timeout, p.exited()).await.ok()
    }

    fn check_exited(&mut self) -> Option<String> {
        match self.process.as_mut() {
            None => Some("firecracker: stopped".into()),
            Some(p) => p
                .try_exited()
                .map(|status| format!("{}: {status}", p.what))
                .or_else(|| {
                    self.gateway
                        .as_mut()
                        .and_then(|g| g.check_exited())
                        .map(|status| format!("net-gateway: {status}"))
                }),
        }
    }

    async fn connect(&self, port: u32) -> Result<vsock::GuestStream, VmmError> {
        Ok(self.vsock.connect(port).await?)
    }

    fn pids(&self) -> Vec<u32> {
        self.process
            .iter()
            .filter_map(Helper::vm_pid)
            .chain(self.gateway.as_ref().and_then(|g| g.pid()))
            .collect()
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
    /// Serial console (Firecracker's stdout) and the tail of Firecracker's log.
    fn console_tail(&self) -> String {
        let mut tail = log_tail(&self.vmm_log, CONSOLE_TAIL_LINES);
        let fc = log_tail(&self.layout.host(LOG), LOG_TAIL_LINES);
        if !fc.trim().is_empty() {
            tail.push_str("\n--- Firecracker log ---\n");
            tail.push_str(&fc);
        }
        tail
    }

    async fn shutdown(mut self: Box<Self>, grace: Duration) {
        let running = self.process.as_mut().is_some_and(|p| p.try_exited().is_none());
        if running {
            // Ctrl+Alt+Del through the i8042: the guest reboots, which ends Firecracker.
            let api = self
                .api
                .clone()
                .with_timeout(grace.clamp(Duration::from_millis(100), Duration::from_secs(2)));
            if let Err(e) = api.put("/actions", &fc_api::SEND_CTRL_ALT_DEL).await {
                tracing::debug!(vm = %self.id, "SendCtrlAltDel: {e}");
            }
        }
        self.release(grace).await;
    }

    async fn kill(mut self: Box<Self>) {
        self.release(Duration::ZERO).await;
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.api.patch("/vm", &fc_api::PAUSED).await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.api.patch("/vm", &fc_api::RESUMED).await
    }

    async fn create_snapshot(&self, snapshot_path: &Path, mem_path: &Path) -> Result<(), VmmError> {
        let (state, mem) = match &self.layout {
            Layout::Direct(_) => (
                absolute(snapshot_path).display().to_string(),
                absolute(mem_path).display().to_string(),
            ),
            Layout::Jailed(_) => (self.layout.vmm(SNAPSHOT_STATE), self.layout.vmm(SNAPSHOT_MEM)),
        };
        self.api
            .put(
                "/snapshot/create",
                &fc_api::SnapshotCreate {
                    snapshot_path: state,
                    mem_file_path: mem,
                    snapshot_type: "Full",
                },
            )
            .await?;
        if self.jail.is_some() {
            self.move_out(SNAPSHOT_STATE, snapshot_path)?;
            self.move_out(SNAPSHOT_MEM, mem_path)?;
        }
        Ok(())
    }
}

impl Drop for FirecrackerVm {
    fn drop(&mut self) {
        // The process is killed by its own Drop (kill_on_drop) and reaped by tokio.
        // (`pid` is `None` once it has been reaped.)
        let pid = self.process.as_ref().and_then(Helper::pid);
        self.process = None;
        if let (Some(pid), Some(_)) = (pid, &self.jail) {
            // The jail's cgroup can be removed only once the VMM has left it,
            // i.e. has exited (a zombie no longer counts); SIGKILL takes milliseconds.
            if !wait_until_exited(pid, Duration::from_secs(1)) {
                tracing::warn!(vm = %self.id, pid, "Firecracker still running 1 s after SIGKILL");
            }
        }
        if let Some(mut jail) = self.jail.take() {
            jail.cleanup();
        }
        // `conf`'s Drop removes the cgroup and the directory.
    }
}

/// Polls `/proc` until every thread of `pid` has exited (the leader a zombie
/// or gone; its other threads may still be exiting when the leader is a
/// zombie already), for at most `timeout`.
fn wait_until_exited(pid: u32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let exited = |stat: &str| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
    };
    loop {
        let all_exited = match std::fs::read_dir(format!("/proc/{pid}/task")) {
            Err(_) => true,
            Ok(tasks) => tasks
                .flatten()
                .all(|t| std::fs::read_to_string(t.path().join("stat")).map_or(true, |s| exited(&s))),
        };
        if all_exited {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmSize;

    #[test]
    fn boot_args_suit_firecracker() {
        let cfg = VmConfig {
            id: "x".into(),
            size: VmSize::Small,
            kernel: "k".into(),
            rootfs: "r".into(),
            state_dir: "/s".into(),
            extra_cmdline: vec!["nv.mode=poweroff".into()],
            rate_limit: Default::default(),
            guest_io: Default::default(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        };
        let a = FirecrackerBackend::boot_args(&cfg);
        for want in [
            "console=ttyS0",
            "init=/sbin/neurovisor-agent",
            "panic=1 ",
            "reboot=k",
            "pci=off",
            "nv.scratch_mb=64",
            "nv.mode=poweroff",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(!a.contains("panic=-1"), "{a}");
    }

    #[test]
    fn jailer_is_used_when_found_and_root_unless_disabled() {
        let j = Path::new("/usr/bin/jailer");
        assert!(decide_jailer(None, Some(j), true).expect("ok").0.is_some());
        let (none, why) = decide_jailer(None, Some(j), false).expect("ok");
        assert!(none.is_none() && why.contains("root"), "{why}");
        assert!(decide_jailer(None, None, true).expect("ok").0.is_none());
        assert!(decide_jailer(Some(false), Some(j), true).expect("ok").0.is_none());
        assert!(matches!(
            decide_jailer(Some(true), None, true),
            Err(VmmError::MissingBinary { .. })
        ));
        assert!(matches!(
            decide_jailer(Some(true), Some(j), false),
            Err(VmmError::Jail(_))
        ));
    }

    #[test]
    fn layouts_map_names() {
        let d = Layout::Direct("/s/vms/a".into());
        assert_eq!(d.host(VSOCK), PathBuf::from("/s/vms/a/vsock.sock"));
        assert_eq!(d.vmm(VSOCK), "/s/vms/a/vsock.sock");
        let j = Layout::Jailed("/s/j/firecracker/a/root".into());
        assert_eq!(
            j.host(LOG),
            PathBuf::from("/s/j/firecracker/a/root/firecracker.log")
        );
        assert_eq!(j.vmm(LOG), "/firecracker.log");
    }
}
