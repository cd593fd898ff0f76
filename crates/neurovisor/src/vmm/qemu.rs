//! QEMU `microvm` backend.
//!
//! One VM is two processes: `qemu-system-x86_64 -M microvm` (KVM where usable,
//! TCG otherwise) and a `vhost-device-vsock` daemon that implements the guest's
//! virtio-vsock device and exposes it as hybrid vsock on a host Unix socket.
//! The base image is attached read-only and shared by every VM; the guest keeps
//! its writes in a tmpfs overlay. Control goes through QMP.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UnixListener;
use tokio::process::Command;

use super::accel::{choose, host_tsc_khz, Accel, AccelChoice, KvmProbe};
use super::capped_log::{CappedLog, CONSOLE_LOG_CAP};
use super::guest_memory::GuestMemory;
use super::jailer::{IdPool, IdRange};
use super::process::{wait_for_path, Helper};
use super::qmp::Qmp;
use super::{base_cmdline, find_binary, log_tail, Vm, VmConfig, VmmBackend, VmmError};
use crate::channel::serial::{self, SerialPort};
use crate::channel::vsock::VsockError;
use crate::channel::{vsock, HybridVsock};
use crate::security::jail::{self, Bind, JailLimits, JailSpec};
use crate::security::seccomp;
use crate::supervisor::keeper::KeeperSpec;
use crate::supervisor::{Confinement, Supervisor};
use neurovisor_proto::GUEST_READY_PORT;

/// The guest's vsock CID; every VM has its own vsock daemon, so it can be the same.
const GUEST_CID: u32 = 3;
const CONSOLE_TAIL_LINES: usize = 40;
/// TCG translation cache, MiB (within `cgroups::VMM_MEMORY_OVERHEAD` with
/// QEMU's heap and binary).
const TCG_TB_MIB: u32 = 128;

#[derive(Debug, Clone, Default)]
pub struct QemuOptions {
    pub qemu_bin: Option<PathBuf>,
    pub vhost_vsock_bin: Option<PathBuf>,
    /// Force an accelerator instead of detecting one.
    pub accel: Option<Accel>,
    /// Run QEMU under its own seccomp sandbox (`-sandbox on,...`). On by default.
    pub no_sandbox: bool,
    /// Jail the VMM processes (own uid, namespaces, private root; see
    /// [`crate::security::jail`]). `None`: when running as root.
    pub jail: Option<bool>,
    /// uids/gids for jailed VMs (each VM gets its own).
    pub jail_ids: IdRange,
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    accel: AccelChoice,
    sandbox: bool,
    /// Cgroups, jail uids, owner locks: the same for every backend.
    supervisor: Supervisor,
}

/// Files of one VM inside its state directory.
#[derive(Debug, Clone)]
struct VmPaths {
    dir: PathBuf,
    vhost_sock: PathBuf,
    vsock: PathBuf,
    qmp: PathBuf,
    console: PathBuf,
    vmm_log: PathBuf,
    /// The agent's virtio-serial port (snapshot templates and restored VMs).
    agent: PathBuf,
    /// Where the template's device state is migrated out through, and a
    /// restored VM's migrated in.
    migrate: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        Self {
            vhost_sock: dir.join("vhost.sock"),
            vsock: dir.join("vsock.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            agent: dir.join("agent.sock"),
            migrate: dir.join("migrate.sock"),
            dir,
        }
    }
}

/// QEMU option values use ',' as separator; a literal comma is doubled.
fn q(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

pub const QEMU_HINT: &str = "install it with `apt-get install qemu-system-x86`";
pub const VHOST_VSOCK_HINT: &str = "install it with `cargo install vhost-device-vsock`";

impl QemuBackend {
    pub fn new(opts: &QemuOptions) -> Result<Self, VmmError> {
        let qemu = find_binary(opts.qemu_bin.as_deref(), "qemu-system-x86_64").ok_or_else(|| {
            VmmError::MissingBinary {
                what: "qemu-system-x86_64".into(),
                hint: QEMU_HINT.into(),
            }
        })?;
        let vhost_vsock =
            find_binary(opts.vhost_vsock_bin.as_deref(), "vhost-device-vsock").ok_or_else(|| {
                VmmError::MissingBinary {
                    what: "vhost-device-vsock".into(),
                    hint: VHOST_VSOCK_HINT.into(),
                }
            })?;
        let accel = choose(opts.accel, &KvmProbe::host());
        tracing::info!(accel = ?accel.accel, "{}", accel.reason);
        let root = nix::unistd::geteuid().is_root();
        let jail = match opts.jail {
            Some(true) if !root => {
                return Err(VmmError::Jail(
                    "jailing VMs needs root (run as root, or pass --no-jail)".into(),
                ))
            }
            Some(true) => true,
            Some(false) => false,
            None => root,
        };
        if !jail {
            tracing::warn!("VMM processes run unjailed (not root, or --no-jail)");
        }
        Ok(Self {
            qemu,
            vhost_vsock,
            accel,
            sandbox: !opts.no_sandbox,
            supervisor: Supervisor::new(jail.then(|| IdPool::new(opts.jail_ids))),
        })
    }

    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// `p`, `kernel` and `rootfs` are paths as QEMU sees them (inside its jail).
    fn qemu_args(&self, cfg: &VmConfig, p: &VmPaths, kernel: &Path, rootfs: &Path, ram: &Ram) -> Vec<String> {
        let mem = cfg.size.memory_mib();
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        push(&["-name", &format!("neurovisor-{}", cfg.id)]);
        push(&[
            "-M",
            "microvm,acpi=on,pcie=off,rtc=on,x-option-roms=off,memory-backend=mem",
        ]);
        match self.accel.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            // A bounded translation cache: QEMU's default (1 GiB) lets a
            // guest running much code (a browser) grow QEMU past the VM
            // cgroup's overhead allowance and be OOM-killed there.
            Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_MIB}"), "-cpu", "max"]),
        }
        push(&["-m", &format!("{mem}M"), "-smp", &cfg.size.vcpus().to_string()]);
        match ram {
            // vhost-user needs guest memory the daemon can map.
            Ram::Memfd => push(&[
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ]),
            // The inherited memfd (see `GuestMemory`): shared by the template
            // so that its RAM is the memfd, private in a restored VM.
            Ram::Snapshot { mem_path, share } => push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=mem,size={mem}M,mem-path={mem_path},share={}",
                    if *share { "on" } else { "off" }
                ),
            ]),
        }
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        push(&["-kernel", &kernel.display().to_string()]);
        let mut cmdline = base_cmdline(cfg);
        // Triple-fault reboot + -no-reboot: a guest reboot ends the QEMU process.
        cmdline.push("reboot=t".into());
        if self.accel.accel == Accel::Tcg {
            cmdline.extend(tcg_timer_cmdline(host_tsc_khz()));
        }
        push(&["-append", &cmdline.join(" ")]);
        // The console goes to QEMU's stdout, a pipe the host copies into the
        // capped console.log (see `super::capped_log`).
        push(&[
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ]);
        push(&[
            "-drive",
            &format!("id=root,file={},format=raw,if=none,readonly=on", q(rootfs)),
            "-device",
            "virtio-blk-device,drive=root",
        ]);
        push(&["-device", "virtio-rng-device"]);
        match ram {
            Ram::Memfd => push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", q(&p.vhost_sock)),
                "-device",
                "vhost-user-vsock-device,chardev=vsock",
            ]),
            // vhost-user devices cannot migrate; a virtio-serial port can.
            Ram::Snapshot { share, .. } => {
                push(&[
                    "-device",
                    "virtio-serial-device,max_ports=2",
                    "-chardev",
                    &format!("socket,id=agent,path={},server=on,wait=off", q(&p.agent)),
                    "-device",
                    &format!("virtserialport,chardev=agent,name={}", serial::PORT_NAME),
                ]);
                if !share {
                    push(&["-incoming", "defer"]);
                }
            }
        }
        push(&["-qmp", &format!("unix:{},server=on,wait=off", q(&p.qmp))]);
        if self.sandbox {
            push(&[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]);
        }
        a
    }
}

/// Where a VM's RAM lives.
enum Ram {
    /// An anonymous memfd of QEMU's own (cold boots; vhost-user maps it).
    Memfd,
    /// A [`GuestMemory`] the VM inherits, reached at `mem_path`.
    Snapshot { mem_path: String, share: bool },
}

/// `CONFIG_HZ` of the guest kernel (`CONFIG_HZ_100=y` in
/// `images/kernel/microvm.config`; a unit test keeps the two in step).
pub const GUEST_HZ: u64 = 100;

/// Kernel parameters that keep a TCG guest from calibrating its timers against
/// each other at boot (issue 9: ~1 % of 2-vCPU boots on a loaded host hung
/// before the first console line, both vCPUs spinning).
///
/// Under TCG the vCPUs are host threads that the host scheduler preempts at
/// will, and `jiffies` only moves when the boot CPU's emulated timer interrupt
/// gets through. microvm's TCG CPU (AuthenticAMD family 0xf) has no
/// `constant_tsc`, so a secondary CPU cannot copy the boot CPU's loops per
/// jiffy (`calibrate_delay_is_known()`); in `smp_callin()` it runs
/// `calibrate_delay_direct()`, which on these hosts fails ("failed to get a
/// good estimate ... Consider using lpj="), then `calibrate_delay_converge()`:
/// loops with interrupts off that end only when `jiffies` moves, while the
/// boot CPU spins in `schedule()` (hence `native_sched_clock`) in
/// `native_cpu_up()` waiting for the secondary's call-in. Each SMP boot took
/// ~270 ms in that handshake (31 ms with the preset) and came out with a wrong
/// BogoMIPS value; the rare boot that never came out is the hang.
/// - `tsc_early_khz=`: the host's TSC rate (the guest's `rdtsc` is the host's)
///   instead of a PIT calibration on the boot CPU,
/// - `lpj=`: loops per jiffy of the TSC delay loop (`tsc_khz * 1000 / HZ`), so
///   no CPU runs `calibrate_delay()`'s jiffies-driven loops,
/// - `no_timer_check`: skip the boot CPU's `timer_irq_works()` (another busy
///   wait on `jiffies` in `check_timer()`; KVM guests set it themselves in
///   `paravirt_ops_setup()`),
/// - `tsc=reliable`: keep the TSC clocksource with several vCPUs (TCG vCPUs'
///   TSCs look unsynchronized).
///
/// Not used with KVM (QEMU or Firecracker): there kvmclock/CPUID give the TSC
/// rate and `constant_tsc`, the KVM paravirt setup sets `no_timer_check`, and
/// vCPUs run on hardware rather than racing emulated timers.
pub fn tcg_timer_cmdline(tsc_khz: Option<u64>) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(khz) = tsc_khz {
        args.push(format!("tsc_early_khz={khz}"));
        args.push(format!("lpj={}", khz * 1000 / GUEST_HZ));
    }
    args.push("no_timer_check".into());
    args.push("tsc=reliable".into());
    args
}

impl QemuBackend {
    /// A command for one of the VM's processes, jailed when `ids` is given.
    /// `argv[0]` names the VM's host directory, so the processes of a VM can be
    /// found (and, after a crash, killed) by it even though their arguments
    /// only name paths inside the jail.
    fn command(
        &self,
        bin: &Path,
        cfg: &VmConfig,
        paths: &VmPaths,
        conf: &Confinement,
        is_vmm: bool,
    ) -> Result<(Command, KeeperSpec), VmmError> {
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vmm".into());
        let Some(ids) = conf.ids() else {
            let mut cmd = Command::new(bin);
            cmd.arg0(format!("{name}:{}", paths.dir.display()));
            return Ok((cmd, conf.keeper_spec(None)));
        };
        // A binary under /usr keeps its path (QEMU finds its firmware relative
        // to it); others are bound in on their own.
        let in_usr = bin.starts_with("/usr/");
        let inside = if in_usr {
            bin.to_path_buf()
        } else {
            PathBuf::from(jail::JAIL_BIN_DIR).join(&name)
        };
        let kvm = is_vmm && self.accel.accel == Accel::Kvm;
        let mut binds = jail::system_binds();
        binds.extend(jail::device_binds(kvm));
        let bind = |host: &Path, jail: PathBuf, writable| Bind {
            host: host.to_path_buf(),
            jail,
            writable,
        };
        if !in_usr {
            binds.push(bind(bin, inside.clone(), false));
        }
        binds.push(bind(&paths.dir, jail::JAIL_VM_DIR.into(), true));
        if is_vmm {
            binds.push(bind(&cfg.kernel, jail::JAIL_KERNEL.into(), false));
            binds.push(bind(&cfg.rootfs, jail::JAIL_ROOTFS.into(), false));
        }
        let mut groups = Vec::new();
        if kvm {
            if let Ok(m) = std::fs::metadata("/dev/kvm") {
                groups.push(std::os::unix::fs::MetadataExt::gid(&m));
            }
        }
        let root = paths.dir.join(if is_vmm { "root-vmm" } else { "root-helper" });
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(|source| VmmError::StateDir {
                path: root.clone(),
                source,
            })?;
        let mut jail_spec = JailSpec {
            root,
            uid: ids.uid,
            gid: ids.gid,
            groups,
            binds,
            limits: JailLimits::for_vmm(cfg.size.memory_mib()),
            hostname: format!("nv-{}", cfg.id.get(..8).unwrap_or(&cfg.id)),
            seccomp: None,
        };
        let mut cmd = Command::new(&inside);
        cmd.arg0(format!("{name}:{}", paths.dir.display()));
        if !is_vmm {
            // The program's path as std's exec will pass it (`get_program`
            // is a view of the very C string it hands to execve): the
            // helper's filter allows that one exec and no other.
            let path = cmd.as_std().get_program().as_encoded_bytes().as_ptr();
            jail_spec.seccomp = Some(to_libc(
                seccomp::compile_exec_once("vhost-device-vsock", path)
                    .map_err(|e| VmmError::Jail(e.to_string()))?,
            ));
        }
        let prepared = jail_spec.prepare().map_err(|e| VmmError::Jail(e.to_string()))?;
        Ok((cmd, conf.keeper_spec(Some(prepared))))
    }
}

/// seccompiler's BPF instructions as the kernel's (same layout).
fn to_libc(prog: seccompiler::BpfProgram) -> Vec<libc::sock_filter> {
    prog.into_iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Makes a socket in the VM directory root's and the VM's group's only:
/// `root:<gid>`, 0660. The daemon's threads that connect to it hold no
/// CAP_DAC_OVERRIDE (nv-guest holds nothing), so they reach it as its owner;
/// the jailed processes (uid and gid of the VM) as its group.
fn share_with_jail(path: &Path, gid: u32) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| VmmError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    std::os::unix::fs::lchown(path, Some(0), Some(gid)).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)
}

/// Lets the jailed processes (uid/gid of the VM) into the VM directory: group
/// access for the jail's gid, and the daemon's listening sockets reachable by
/// that group (root:<gid>, 0660).
fn open_to_jail(paths: &VmPaths, gid: u32) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::StateDir { path, source }
    };
    std::os::unix::fs::chown(&paths.dir, Some(0), Some(gid)).map_err(err(&paths.dir))?;
    std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o770)).map_err(err(&paths.dir))?;
    for entry in std::fs::read_dir(&paths.dir).map_err(err(&paths.dir))?.flatten() {
        // Logs are written by the host only (capped, 0600).
        let name = entry.file_name();
        if name == crate::supervisor::OWNER_FILE || name.to_string_lossy().ends_with(".log") {
            continue;
        }
        share_with_jail(&entry.path(), gid)?;
    }
    Ok(())
}

#[async_trait]
impl VmmBackend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &'static str {
        match self.accel.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn identity(&self) -> String {
        let m = std::fs::metadata(&self.qemu).ok();
        format!(
            "{} len={} mtime={:?} accel={:?}",
            self.qemu.display(),
            m.as_ref().map(|m| m.len()).unwrap_or(0),
            m.and_then(|m| m.modified().ok()),
            self.accel.accel
        )
    }

    fn live_vms(&self) -> crate::supervisor::LiveVms {
        self.supervisor.live().clone()
    }

    async fn spawn(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>, VmmError> {
        let memory = match &cfg.guest_memory {
            Some(m) if m.is_sealed() => {
                return Err(VmmError::Unsupported(
                    "a sealed guest memory image can only be restored".into(),
                ))
            }
            m => m.clone(),
        };
        Ok(Box::new(self.start(cfg, memory, false).await?))
    }

    /// A new QEMU that migrates in the device state of `snapshot` (written
    /// by [`Vm::create_snapshot`] of a template) over the template's RAM:
    /// `cfg.guest_memory` if the caller holds it sealed (the pool), else
    /// loaded from `mem`. With `x-ignore-shared` the RAM is not in the
    /// stream, so the restore costs the device state only.
    async fn restore(&self, cfg: &VmConfig, snapshot: &Path, mem: &Path) -> Result<Box<dyn Vm>, VmmError> {
        super::refuse_network_restore(cfg)?;
        let size = u64::from(cfg.size.memory_mib()) << 20;
        let blank = std::fs::metadata(mem).is_ok_and(|m| m.len() == 0);
        let memory = match &cfg.guest_memory {
            Some(m) if m.is_sealed() => m.clone(),
            // The snapshot of a restored VM: all of its RAM is in `snapshot`.
            _ if blank => {
                let m = GuestMemory::create(size)
                    .and_then(|m| m.seal().map(|_| m))
                    .map_err(|e| VmmError::Snapshot(e.to_string()))?;
                std::sync::Arc::new(m)
            }
            _ => std::sync::Arc::new(
                GuestMemory::load(mem, size).map_err(|e| VmmError::Snapshot(e.to_string()))?,
            ),
        };
        let state = tokio::fs::File::open(snapshot)
            .await
            .map_err(|source| VmmError::StateDir {
                path: snapshot.to_path_buf(),
                source,
            })?;
        let t = std::time::Instant::now();
        let mut vm = self.start(cfg, Some(memory), true).await?;
        let started = t.elapsed();
        vm.migrate_in(state, size).await?;
        tracing::debug!(
            started_ms = started.as_secs_f64() * 1e3,
            migrated_ms = t.elapsed().as_secs_f64() * 1e3,
            "QEMU restored"
        );
        Ok(Box::new(vm))
    }
}

impl QemuBackend {
    /// Starts the VM's processes. `memory`: RAM from a [`GuestMemory`] and
    /// the agent on a virtio-serial port (a template, or with `incoming` a
    /// VM waiting for its device state); `None`: a cold boot over vsock.
    async fn start(
        &self,
        cfg: &VmConfig,
        memory: Option<std::sync::Arc<GuestMemory>>,
        incoming: bool,
    ) -> Result<QemuVm, VmmError> {
        let paths = VmPaths::new(cfg.vm_dir());
        // From here on, dropping `vm` releases whatever was started.
        let conf = self.supervisor.confine(cfg)?;
        let log = |path: &Path| {
            CappedLog::create(path, CONSOLE_LOG_CAP).map_err(|source| VmmError::StateDir {
                path: path.to_path_buf(),
                source,
            })
        };
        let (console, vmm_log) = (log(&paths.console)?, log(&paths.vmm_log)?);
        let channel = match memory {
            None => Channel::Vsock(
                HybridVsock::new(&paths.vsock, cfg.rate_limit, &cfg.hooks.counters)
                    .with_guest_io(cfg.guest_io.clone()),
            ),
            Some(_) => Channel::Serial(SerialPort::new(
                &paths.agent,
                cfg.rate_limit,
                &cfg.hooks.counters,
                cfg.guest_io.clone(),
            )),
        };
        let mut vm = QemuVm {
            id: cfg.id.clone(),
            ready: None,
            channel,
            pending: std::sync::Mutex::new(None),
            restored: incoming,
            memory: memory.clone(),
            vhost: None,
            qemu: None,
            gateway: None,
            paths: paths.clone(),
            conf,
        };
        if let Channel::Vsock(vsock) = &vm.channel {
            vm.ready = Some(vsock.listen(GUEST_READY_PORT)?);
        }
        if let Some(ids) = vm.conf.ids() {
            open_to_jail(&paths, ids.gid)?;
        }
        // Paths as the VMM processes see them.
        let (inner, kernel, rootfs) = match vm.conf.ids() {
            Some(_) => (
                VmPaths::new(jail::JAIL_VM_DIR.into()),
                PathBuf::from(jail::JAIL_KERNEL),
                PathBuf::from(jail::JAIL_ROOTFS),
            ),
            None => (paths.clone(), cfg.kernel.clone(), cfg.rootfs.clone()),
        };
        let jail_gid = vm.conf.ids().map(|ids| ids.gid);

        if let Channel::Vsock(_) = &vm.channel {
            let (mut vhost_cmd, vhost_spec) =
                self.command(&self.vhost_vsock, cfg, &paths, &vm.conf, false)?;
            vhost_cmd
                .arg("--guest-cid")
                .arg(GUEST_CID.to_string())
                .arg("--socket")
                .arg(&inner.vhost_sock)
                .arg("--uds-path")
                .arg(&inner.vsock)
                // A group of its own: no sibling guest can ever be reached.
                .arg("--groups")
                .arg(&cfg.id);
            let vhost = vm.vhost.insert(Helper::spawn(
                "vhost-device-vsock",
                vhost_cmd,
                &vmm_log,
                &vmm_log,
                vhost_spec,
            )?);
            wait_for_path(&paths.vhost_sock, vhost, Duration::from_secs(5), &paths.vmm_log).await?;
            if let Some(gid) = jail_gid {
                // The helper made vsock.sock 0700 (its jail's umask): the
                // daemon's guest I/O threads connect to it as its owner.
                wait_for_path(&paths.vsock, vhost, Duration::from_secs(5), &paths.vmm_log).await?;
                share_with_jail(&paths.vsock, gid)?;
            }
        }

        let (mut qemu_cmd, mut qemu_spec) = self.command(&self.qemu, cfg, &paths, &vm.conf, true)?;
        // TCG's code buffer asks for huge pages; KVM guests keep them (their
        // RAM is where huge pages pay off).
        qemu_spec.no_huge_pages = self.accel.accel == Accel::Tcg;
        let ram = match &memory {
            None => Ram::Memfd,
            Some(m) => {
                qemu_spec.inherit_fds.push(m.raw_fd());
                Ram::Snapshot {
                    mem_path: m.proc_path(),
                    share: !incoming,
                }
            }
        };
        qemu_cmd.args(self.qemu_args(cfg, &inner, &kernel, &rootfs, &ram));
        // Kept until QEMU has its own copy (fork), closed right after.
        let mut tap = None;
        if let Some(net) = &cfg.network {
            let (gateway, fd) = crate::net::host::Gateway::spawn(
                &cfg.id,
                net,
                &vm.conf,
                None,
                &paths.dir,
                &vmm_log,
                &paths.vmm_log,
                &cfg.hooks.counters,
            )
            .await?;
            vm.gateway = Some(gateway);
            let fd = fd.ok_or_else(|| VmmError::Unsupported("a gateway without a TAP descriptor".into()))?;
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            qemu_spec.inherit_fds.push(raw);
            qemu_cmd.args(net_args(raw));
            tap = Some(fd);
        }
        let qemu = vm
            .qemu
            .insert(Helper::spawn("qemu", qemu_cmd, &console, &vmm_log, qemu_spec)?);
        drop(tap);
        if let Some(gid) = jail_gid {
            // QMP likewise (the daemon's `quit` at shutdown), and the
            // agent's port, which QEMU listens on.
            wait_for_path(&paths.qmp, qemu, Duration::from_secs(10), &paths.vmm_log).await?;
            share_with_jail(&paths.qmp, gid)?;
            if memory.is_some() {
                wait_for_path(&paths.agent, qemu, Duration::from_secs(10), &paths.vmm_log).await?;
                share_with_jail(&paths.agent, gid)?;
            }
        }
        tracing::debug!(vm = %cfg.id, pid = ?vm.pids(), restored = incoming, "VM started");
        Ok(vm)
    }
}

/// The VM's NIC: virtio-net on the TAP its gateway made (an inherited
/// descriptor, so QEMU needs no rights in the gateway's namespace).
fn net_args(tap_fd: i32) -> [String; 4] {
    [
        "-netdev".into(),
        format!("tap,id=net0,fd={tap_fd},vhost=off"),
        "-device".into(),
        format!("virtio-net-device,netdev=net0,mac={}", crate::net::GUEST_MAC),
    ]
}

/// How the host reaches the agent of one VM.
enum Channel {
    Vsock(HybridVsock),
    Serial(SerialPort),
}

pub struct QemuVm {
    id: String,
    /// Cold boots: the listener the agent's READY arrives on.
    ready: Option<UnixListener>,
    channel: Channel,
    /// Over virtio-serial, the connection `wait_ready` made, for the first
    /// `connect` (a port serves one connection at a time).
    pending: std::sync::Mutex<Option<vsock::GuestStream>>,
    /// Started from a snapshot.
    restored: bool,
    /// The RAM image (templates and restored VMs): kept alive with the VM.
    memory: Option<std::sync::Arc<GuestMemory>>,
    vhost: Option<Helper>,
    qemu: Option<Helper>,
    /// `--network`: the VM's gateway (its namespace, TAP and rules).
    gateway: Option<crate::net::host::Gateway>,
    paths: VmPaths,
    /// Directory, cgroup, uid lease: released once the processes are stopped.
    conf: Confinement,
}

impl QemuVm {
    async fn release(&mut self, grace: Duration) {
        if let Some(q) = self.qemu.take() {
            q.stop(grace).await;
        }
        if let Some(v) = self.vhost.take() {
            v.stop(Duration::ZERO).await;
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        self.ready = None;
        self.conf.release().await;
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), VmmError> {
        if let Channel::Serial(port) = &self.channel {
            return self.wait_serial(port.clone(), timeout).await;
        }
        let Channel::Vsock(vsock) = &self.channel else {
            unreachable!("the serial channel returned above")
        };
        let Some(listener) = self.ready.take() else {
            return Ok(());
        };
        let (Some(qemu), Some(vhost)) = (self.qemu.as_mut(), self.vhost.as_mut()) else {
            return Err(VmmError::Qmp("VM already stopped".into()));
        };
        let outcome = tokio::select! {
            r = vsock.accept_ready(listener) => r.map_err(|e| e.to_string()),
            status = qemu.exited() => Err(format!("qemu: {status}")),
            status = vhost.exited() => Err(format!("vhost-device-vsock: {status}")),
            _ = tokio::time::sleep(timeout) => {
                return Err(VmmError::BootTimeout { timeout, console_tail: self.console_tail() });
            }
        };
        let _ = std::fs::remove_file(vsock.host_port_path(GUEST_READY_PORT));
        outcome.map_err(|status| VmmError::DiedDuringBoot {
            status,
            console_tail: self.console_tail(),
        })
    }

    async fn wait_exited(&mut self, timeout: Duration) -> Option<String> {
        let qemu = self.qemu.as_mut()?;
        tokio::time::timeout(timeout, qemu.exited()).await.ok()
    }

    fn check_exited(&mut self) -> Option<String> {
        // A VM on a virtio-serial port has no vsock helper.
        let has_vhost = matches!(self.channel, Channel::Vsock(_));
        if let Some(status) = self.gateway.as_mut().and_then(|g| g.check_exited()) {
            return Some(format!("net-gateway: {status}"));
        }
        for (name, helper) in [("qemu", &mut self.qemu), ("vhost-device-vsock", &mut self.vhost)] {
            if name == "vhost-device-vsock" && !has_vhost {
                continue;
            }
            match helper.as_mut() {
                None => return Some(format!("{name}: stopped")),
                Some(h) => {
                    if let Some(status) = h.try_exited() {
                        return Some(format!("{name}: {status}"));
                    }
                }
            }
        }
        None
    }

    async fn connect(&self, port: u32) -> Result<vsock::GuestStream, VmmError> {
        match &self.channel {
            Channel::Vsock(v) => Ok(v.connect(port).await?),
            Channel::Serial(p) => {
                if port != neurovisor_proto::GUEST_AGENT_PORT {
                    return Err(VmmError::Unsupported(format!(
                        "guest port {port}: a virtio-serial VM has only the agent's"
                    )));
                }
                let pending = self.pending.lock().ok().and_then(|mut p| p.take());
                match pending {
                    Some(s) => Ok(s),
                    None => Ok(p.connect().await?),
                }
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        [&self.qemu, &self.vhost]
            .iter()
            .filter_map(|h| h.as_ref().and_then(Helper::vm_pid))
            .chain(self.gateway.as_ref().and_then(|g| g.pid()))
            .collect()
    }

    fn dir(&self) -> &Path {
        &self.paths.dir
    }
    fn console_tail(&self) -> String {
        let mut tail = log_tail(&self.paths.console, CONSOLE_TAIL_LINES);
        let vmm = log_tail(&self.paths.vmm_log, 10);
        if !vmm.trim().is_empty() {
            tail.push_str("\n--- VMM log ---\n");
            tail.push_str(&vmm);
        }
        tail
    }

    async fn shutdown(mut self: Box<Self>, grace: Duration) {
        if let Ok(mut qmp) = Qmp::connect(&self.paths.qmp).await {
            let _ = qmp.execute("quit", None).await;
        }
        self.release(grace).await;
    }

    async fn kill(mut self: Box<Self>) {
        self.release(Duration::ZERO).await;
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qmp().await?.execute("stop", None).await.map(drop)
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.qmp().await?.execute("cont", None).await.map(drop)
    }

    /// A template (spawned with an unsealed `guest_memory`): device state
    /// only (`x-ignore-shared`: the RAM is the shared [`GuestMemory`]) to
    /// `snapshot_path`, the RAM image to `mem_path`. A VM restored from a
    /// template (a paused sandbox): its RAM is private (`share=off`), so it
    /// travels in the stream with the device state, and `mem_path` is left
    /// empty (its restore starts from blank RAM). A cold-booted VM cannot:
    /// its vhost-user vsock device blocks migration.
    async fn create_snapshot(&self, snapshot_path: &Path, mem_path: &Path) -> Result<(), VmmError> {
        let Some(memory) = self.memory.as_ref() else {
            return Err(VmmError::Unsupported(
                "this VM booted with a vhost-user vsock device, which QEMU cannot migrate; only VMs of a \
                 snapshot pool (--snapshot) can be snapshotted on QEMU"
                    .into(),
            ));
        };
        let snap = |what: &str, e: &dyn std::fmt::Display| VmmError::Snapshot(format!("{what}: {e}"));
        let _ = std::fs::remove_file(&self.paths.migrate);
        let listener =
            UnixListener::bind(&self.paths.migrate).map_err(|e| snap("bind the migration socket", &e))?;
        if let Some(ids) = self.conf.ids() {
            share_with_jail(&self.paths.migrate, ids.gid)?;
        }
        let mut qmp = self.qmp().await?;
        qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": self.migrate_uri() })))
            .await?;
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .map_err(|e| snap("QEMU did not connect to the migration socket", &e))?
            .map_err(|e| snap("accept the migration", &e))?;
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(snapshot_path)
            .await
            .map_err(|source| VmmError::StateDir {
                path: snapshot_path.to_path_buf(),
                source,
            })?;
        // A restored VM's whole RAM may be in the stream.
        let limit = Duration::from_secs(30 + memory.size() / (32 << 20));
        tokio::time::timeout(limit, tokio::io::copy(&mut s, &mut out))
            .await
            .map_err(|e| snap("the migration did not end", &e))?
            .map_err(|e| snap("write the migration", &e))?;
        out.sync_all()
            .await
            .map_err(|e| snap("write the migration", &e))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = qmp.execute("query-migrate", None).await?;
            match m.get("status").and_then(|s| s.as_str()) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Snapshot(format!("migration failed: {m}")));
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(VmmError::Snapshot(format!("migration did not complete: {m}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&self.paths.migrate);
        if self.restored {
            return std::fs::File::create(mem_path)
                .map(drop)
                .map_err(|source| VmmError::StateDir {
                    path: mem_path.to_path_buf(),
                    source,
                });
        }
        memory
            .save(mem_path)
            .map_err(|e| VmmError::Snapshot(e.to_string()))
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        // Helpers ask their keepers to kill and reap the VM processes (Drop),
        // the runtime reaps the keepers; then `conf`'s Drop empties and
        // removes the cgroup and the directory.
        self.qemu = None;
        self.vhost = None;
    }
}

impl QemuVm {
    /// The hybrid-vsock endpoint of this VM (cold-booted VMs).
    pub fn vsock(&self) -> Option<&HybridVsock> {
        match &self.channel {
            Channel::Vsock(v) => Some(v),
            Channel::Serial(_) => None,
        }
    }

    /// Readiness over virtio-serial: the agent answers the handshake only
    /// once it serves (a restored one at once). The connection is kept for
    /// the first `connect`.
    async fn wait_serial(&mut self, port: SerialPort, timeout: Duration) -> Result<(), VmmError> {
        let Some(qemu) = self.qemu.as_mut() else {
            return Err(VmmError::Qmp("VM already stopped".into()));
        };
        let connect = async {
            let started = tokio::time::Instant::now();
            let mut attempt = 0;
            loop {
                let wait = serial::answer_wait(attempt);
                attempt += 1;
                match port.connect_waiting(wait).await {
                    Ok(s) => return Ok(s),
                    // QEMU has not bound the port yet, or the agent did
                    // not answer this connection (see `serial::ANSWER_WAIT`).
                    Err(VsockError::Connect { .. } | VsockError::Timeout(_)) => {
                        tokio::time::sleep(super::process::poll_pause(started)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let outcome = tokio::select! {
            r = connect => r,
            status = qemu.exited() => Err(format!("qemu: {status}")),
            _ = tokio::time::sleep(timeout) => {
                return Err(VmmError::BootTimeout { timeout, console_tail: self.console_tail() });
            }
        };
        match outcome {
            Ok(s) => {
                if let Ok(mut p) = self.pending.lock() {
                    *p = Some(s);
                }
                Ok(())
            }
            Err(status) => Err(VmmError::DiedDuringBoot {
                status,
                console_tail: self.console_tail(),
            }),
        }
    }

    async fn qmp(&self) -> Result<Qmp, VmmError> {
        Qmp::connect(&self.paths.qmp).await
    }

    /// The path of the migration socket as QEMU sees it.
    fn migrate_uri(&self) -> String {
        let inner = match self.conf.ids() {
            Some(_) => VmPaths::new(jail::JAIL_VM_DIR.into()),
            None => self.paths.clone(),
        };
        format!("unix:{}", inner.migrate.display())
    }

    /// Feeds `state` (a snapshot's migration stream) into a QEMU started
    /// with `-incoming defer`, then runs the VM.
    async fn migrate_in(&mut self, mut state: tokio::fs::File, ram: u64) -> Result<(), VmmError> {
        use tokio::io::AsyncWriteExt;
        let snap = |what: &str, e: &dyn std::fmt::Display| VmmError::Snapshot(format!("{what}: {e}"));
        let qemu = self
            .qemu
            .as_mut()
            .ok_or_else(|| VmmError::Qmp("VM already stopped".into()))?;
        wait_for_path(
            &self.paths.qmp,
            qemu,
            Duration::from_secs(10),
            &self.paths.vmm_log,
        )
        .await?;
        // QEMU binds the socket before it listens: a connect in between is
        // refused (seen in CI as a failed restore). Retry briefly.
        let started = tokio::time::Instant::now();
        let mut qmp = loop {
            match Qmp::connect(&self.paths.qmp).await {
                Err(_) if started.elapsed() < Duration::from_secs(2) => {
                    tokio::time::sleep(super::process::poll_pause(started)).await;
                }
                r => break r?,
            }
        };
        qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": self.migrate_uri() })),
        )
        .await?;
        let qemu = self
            .qemu
            .as_mut()
            .ok_or_else(|| VmmError::Qmp("VM already stopped".into()))?;
        wait_for_path(
            &self.paths.migrate,
            qemu,
            Duration::from_secs(10),
            &self.paths.vmm_log,
        )
        .await?;
        if let Some(ids) = self.conf.ids() {
            share_with_jail(&self.paths.migrate, ids.gid)?;
        }
        let mut s = tokio::net::UnixStream::connect(&self.paths.migrate)
            .await
            .map_err(|e| snap("connect to the incoming migration", &e))?;
        // A corrupt state makes QEMU exit: its log says why.
        let fed = async {
            tokio::io::copy(&mut state, &mut s).await?;
            s.shutdown().await
        };
        let limit = Duration::from_secs(30 + ram / (32 << 20));
        let fed = tokio::time::timeout(limit, fed)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other(format!("not taken within {limit:?}"))));
        if let Err(e) = fed {
            return Err(self.restore_failed(&format!("send the device state: {e}")).await);
        }
        drop(s);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = match qmp.execute("query-status", None).await {
                Ok(v) => v,
                Err(e) => return Err(self.restore_failed(&e.to_string()).await),
            };
            match status.get("status").and_then(|s| s.as_str()) {
                Some("paused") | Some("postmigrate") => break,
                Some("running") => return Ok(()),
                Some("inmigrate") if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                other => {
                    return Err(self
                        .restore_failed(&format!("the VM is {other:?} after the migration"))
                        .await)
                }
            }
        }
        qmp.execute("cont", None).await?;
        let _ = std::fs::remove_file(&self.paths.migrate);
        Ok(())
    }

    async fn restore_failed(&mut self, what: &str) -> VmmError {
        if let Some(q) = self.qemu.as_mut() {
            // Give a dying QEMU the moment it needs to write why.
            let _ = tokio::time::timeout(Duration::from_millis(500), q.exited()).await;
        }
        VmmError::Snapshot(format!(
            "QEMU refused the snapshot ({what}); its log:\n{}",
            log_tail(&self.paths.vmm_log, 10)
        ))
    }
}

fn ignore_shared() -> serde_json::Value {
    serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmSize;

    #[test]
    fn command_line_has_the_devices_and_limits() {
        let backend = QemuBackend {
            qemu: "qemu".into(),
            vhost_vsock: "v".into(),
            accel: AccelChoice {
                accel: Accel::Tcg,
                reason: String::new(),
            },
            sandbox: true,
            supervisor: Supervisor::default(),
        };
        let cfg = VmConfig {
            id: "abc".into(),
            size: VmSize::Large,
            kernel: "/k/vmlinux".into(),
            rootfs: "/r,x/rootfs.ext4".into(),
            state_dir: "/s".into(),
            extra_cmdline: vec![],
            rate_limit: Default::default(),
            guest_io: Default::default(),
            hooks: Default::default(),
            guest_memory: None,
            network: None,
        };
        let a = backend
            .qemu_args(
                &cfg,
                &VmPaths::new(cfg.vm_dir()),
                &cfg.kernel,
                &cfg.rootfs,
                &Ram::Memfd,
            )
            .join(" ");
        for want in [
            "-accel tcg",
            "-m 1024M -smp 4",
            "size=1024M,share=on",
            "file=/r,,x/rootfs.ext4,format=raw,if=none,readonly=on",
            "vhost-user-vsock-device",
            "-no-reboot",
            "spawn=deny",
            "-chardev stdio,id=console,signal=off -serial chardev:console",
            "init=/sbin/neurovisor-agent",
            "tsc_early_khz=",
            " lpj=",
            " no_timer_check",
            "tsc=reliable",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        // KVM guests need none of the TCG timer parameters.
        let kvm = QemuBackend {
            accel: AccelChoice {
                accel: Accel::Kvm,
                reason: String::new(),
            },
            ..backend
        };
        let k = kvm
            .qemu_args(
                &cfg,
                &VmPaths::new(cfg.vm_dir()),
                &cfg.kernel,
                &cfg.rootfs,
                &Ram::Memfd,
            )
            .join(" ");
        for unwanted in ["lpj=", "no_timer_check", "tsc_early_khz="] {
            assert!(!k.contains(unwanted), "{unwanted:?} on a KVM command line: {k}");
        }
    }

    /// The boot-hang fix (issue 9): on TCG no CPU may calibrate its delay loop
    /// or the timer against jiffies; lpj must match the TSC rate and the HZ the
    /// guest kernel is built with.
    #[test]
    fn tcg_boots_preset_lpj_from_the_tsc_and_skip_the_timer_check() {
        let a = tcg_timer_cmdline(Some(2_100_000));
        assert_eq!(
            a,
            [
                "tsc_early_khz=2100000",
                "lpj=21000000",
                "no_timer_check",
                "tsc=reliable"
            ]
        );
        // Without a TSC rate there is no lpj to preset, but the timer check is
        // still skipped.
        assert!(tcg_timer_cmdline(None).contains(&"no_timer_check".to_string()));
        let config = include_str!("../../../../images/kernel/microvm.config");
        let hz_option = format!("CONFIG_HZ_{GUEST_HZ}=y");
        assert!(
            config.lines().any(|l| l.trim() == hz_option),
            "GUEST_HZ ({GUEST_HZ}) must match the kernel config's CONFIG_HZ_*"
        );
    }
}
