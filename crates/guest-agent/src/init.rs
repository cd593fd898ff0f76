//! PID 1 duties inside the microVM.
//!
//! The kernel mounts the shared base image read-only. Before anything runs, PID 1
//! builds a throwaway root: an overlay whose upper layer lives on a size-capped
//! tmpfs, so a program can write anywhere it is allowed to, no VM sees another's
//! writes, and nothing survives the VM. PID 1 then forks the agent server and
//! stays behind as the reaper of orphaned processes; when the server exits the
//! VM is shut down, which the host sees as the VMM process exiting.

use std::fs;
use std::io;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, pivot_root, Pid};

/// Mount point (an empty directory in the image) for the scratch tmpfs.
const SCRATCH: &str = "/overlay";

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

/// What the host asked for on the kernel command line (`nv.*` parameters; dotted
/// parameters are not forwarded to init by the kernel, so they are read from
/// `/proc/cmdline`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// `nv.mode=poweroff` boots and shuts down at once (the benchmark baseline).
    pub poweroff_only: bool,
    /// `nv.scratch_mb=N`: size cap of the writable layer.
    pub scratch_mb: u64,
    /// `nv.log=LEVEL`: agent log level on the console.
    pub log: String,
    /// `nv.shutdown=poweroff|reboot`: how to stop the VM. QEMU (with `-no-reboot`)
    /// and Firecracker both exit on a reboot, so that is the default.
    pub shutdown_with_poweroff: bool,
    /// `nv.warm=python,javascript`: interpreters to start ahead of requests.
    pub warm: Vec<String>,
}

impl Default for BootParams {
    fn default() -> Self {
        Self {
            poweroff_only: false,
            scratch_mb: 256,
            log: "warn".to_string(),
            shutdown_with_poweroff: false,
            warm: Vec::new(),
        }
    }
}

impl BootParams {
    pub fn parse(cmdline: &str) -> Self {
        let mut p = Self::default();
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            match k {
                "nv.mode" => p.poweroff_only = v == "poweroff",
                "nv.scratch_mb" => {
                    if let Ok(n) = v.parse::<u64>() {
                        if n > 0 {
                            p.scratch_mb = n;
                        }
                    }
                }
                "nv.log" => p.log = v.to_string(),
                "nv.shutdown" => p.shutdown_with_poweroff = v == "poweroff",
                "nv.warm" => {
                    p.warm = v
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                _ => {}
            }
        }
        p
    }
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mount(Some(src), target, Some(fstype), flags, data).map_err(sys(format!("mount {fstype} on {target}")))
}

fn mkdir(path: &str) -> Result<(), InitError> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(format!("mkdir {path}"))(e)),
        _ => Ok(()),
    }
}

fn is_mount_point(path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let parent = Path::new(path).parent().unwrap_or(Path::new("/"));
    match (fs::metadata(path), fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Reads the boot parameters; `/proc` must be mounted first.
pub fn read_boot_params() -> BootParams {
    if !Path::new("/proc/self").exists() {
        let _ = mount_fs(
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        );
    }
    BootParams::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default())
}

/// Builds the overlay root and switches into it, then mounts what programs expect.
pub fn setup_root(params: &BootParams) -> Result<(), InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs(
        "scratch",
        SCRATCH,
        "tmpfs",
        nosuid,
        Some(&format!("size={}m,mode=0755", params.scratch_mb)),
    )?;
    for d in ["upper", "work", "root"] {
        mkdir(&format!("{SCRATCH}/{d}"))?;
    }
    let new_root = format!("{SCRATCH}/root");
    mount_fs(
        "overlay",
        &new_root,
        "overlay",
        MsFlags::empty(),
        Some(&format!(
            "lowerdir=/,upperdir={SCRATCH}/upper,workdir={SCRATCH}/work"
        )),
    )?;
    // /proc was mounted on the old root to read the cmdline; it is remounted below.
    let _ = umount2("/proc", MntFlags::MNT_DETACH);
    if is_mount_point("/dev") {
        mount(
            Some("/dev"),
            format!("{new_root}/dev").as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys("move /dev into the overlay root"))?;
    }
    chdir(new_root.as_str()).map_err(sys("chdir into the overlay root"))?;
    pivot_root(".", ".").map_err(sys("pivot_root into the overlay root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the old root"))?;
    chdir("/").map_err(sys("chdir /"))?;

    mount_fs("proc", "/proc", "proc", nosuid | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NOEXEC, None)?;
    if !Path::new("/dev/null").exists() {
        mount_fs(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    mkdir("/dev/pts")?;
    // Not `nodev`: its nodes are the terminals; programs that open their
    // terminal by name (xterm, `tty` redirections) would get EACCES.
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mkdir("/dev/shm")?;
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777,size=64m"))?;
    mkdir("/run")?;
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        nosuid | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=16m"),
    )?;
    mkdir("/tmp")?;
    fs::set_permissions("/tmp", std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .map_err(io_err("chmod /tmp"))?;
    // cgroup v2 is optional: a kernel without it still serves executions.
    let _ = mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid | MsFlags::MS_NOEXEC,
        None,
    );
    let _ = nix::unistd::sethostname("sandbox");
    // The agent (and PID 1) must survive a program's memory bomb to report it;
    // programs raise their own score back (see exec.rs).
    if let Err(e) = fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!("cannot protect the agent from the OOM killer: {e}");
    }
    if let Err(e) = loopback_up() {
        tracing::warn!("loopback not available: {e}");
    }
    if let Err(e) = resolver_from_pnp() {
        tracing::warn!("cannot write /etc/resolv.conf: {e}");
    }
    Ok(())
}

/// A VM started with `--network` has its address from the kernel (`ip=` on
/// the command line), which lists the gateway's resolver in `/proc/net/pnp`:
/// that becomes the VM's only resolver. Without a NIC the file is absent and
/// `/etc/resolv.conf` names nothing.
fn resolver_from_pnp() -> io::Result<()> {
    let pnp = match fs::read_to_string("/proc/net/pnp") {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return fs::write("/etc/resolv.conf", ""),
        Err(e) => return Err(e),
    };
    let servers: String = pnp
        .lines()
        .filter(|l| l.starts_with("nameserver ") && !l.ends_with(" 0.0.0.0"))
        .map(|l| format!("{l}\n"))
        .collect();
    // A symlink in the image would otherwise send the write elsewhere.
    let _ = fs::remove_file("/etc/resolv.conf");
    fs::write(
        "/etc/resolv.conf",
        format!("{servers}options timeout:2 attempts:2\n"),
    )
}

/// Brings `lo` up so programs can talk to themselves over 127.0.0.1 (the
/// kernel brings up a VM's NIC itself, from `ip=`).
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed `ifreq` with a NUL-terminated name;
    // the descriptor is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut res = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if res == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            res = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if res < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Reaps every child (PID 1 inherits all orphans) until `agent` exits.
pub fn reap_until(agent: Pid) {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                eprintln!("neurovisor-agent: server exited with status {code}");
                return;
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                eprintln!("neurovisor-agent: server killed by {sig}");
                return;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("neurovisor-agent: waitpid: {e}");
                return;
            }
        }
    }
}

/// Stops the VM. Never returns.
pub fn shutdown(params: &BootParams) -> ! {
    nix::unistd::sync();
    let mode = if params.shutdown_with_poweroff {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    };
    let err = reboot(mode);
    eprintln!("neurovisor-agent: reboot({mode:?}) failed: {err:?}");
    // PID 1 must not exit (that panics the kernel, which also ends the VM with
    // `panic=-1`, but with a misleading message).
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cmdline() {
        let p =
            BootParams::parse("console=ttyS0 nv.mode=poweroff nv.scratch_mb=64 quiet nv.shutdown=poweroff");
        assert!(p.poweroff_only);
        assert_eq!(p.scratch_mb, 64);
        assert!(p.shutdown_with_poweroff);
        let d = BootParams::parse("nv.scratch_mb=abc nv.scratch_mb=0");
        assert_eq!(d, BootParams::default());
    }
}
