//! Running Firecracker under its `jailer`.
//!
//! Per VM the jailer gets: its own uid/gid (one slot of a configured range,
//! handed out by [`IdPool`]), a chroot at
//! `<state>/j/<firecracker file name>/<vm id>/root`, a cgroup
//! `<cgroup root>/neurovisor/<vm id>` with a memory limit (cgroup v1 or v2, as
//! mounted), and a fresh, empty network namespace created with `ip netns add`
//! (the guest has no network device; the namespace only keeps Firecracker off
//! the host's network). Before the jailer starts, the kernel and rootfs are
//! hard-linked into the chroot (copied when they live on another filesystem or
//! are not readable by the jail's user) and Firecracker's log files are
//! created there. [`Jail::cleanup`] removes the chroot, the cgroup and the
//! namespace once the VM has exited.
//!
//! The kernel and rootfs (and snapshot files on restore) are resolved through
//! symlinks first ([`Jail::place`]): the default kernel path is a symlink, and
//! a hard link to a symlink points at a path that does not exist in the chroot.
//!
//! The jailer execs Firecracker in place (no `--daemonize`, no `--new-pid-ns`),
//! so the process we spawn *is* the VMM and is killed and reaped like any
//! other. Its parent-death signal does not survive the jailer's switch of uid,
//! though: if the daemon is killed with SIGKILL, jailed VMs outlive it until
//! their guest stops.
//!
//! Observed with the real jailer (v1.17.0-dev, the one
//! `shared/firecracker/build-firecracker.sh` builds): the pid we spawn keeps
//! its pid through the jailer's setup (chroot by `pivot_root` in its own mount
//! namespace, `setns` into `--netns`, cgroup, `mknod` of `/dev/kvm` etc.) and
//! then, after `setgid`/`setuid` to the VM's ids, `execve`s `/firecracker`
//! inside the chroot: `/proc/<pid>/comm` becomes `firecracker`, its Uid/Gid
//! lines show the VM's ids in all four fields, and the jailer passes
//! `--id <id> --start-time-us ... --parent-cpu-time-us ...` ahead of our
//! arguments. It also writes `/firecracker.pid` into the chroot. With
//! `PR_SET_PDEATHSIG(SIGKILL)` set before the jailer starts, SIGKILLing its
//! parent leaves Firecracker running (reparented to the nearest subreaper or
//! init), while a control child without a uid switch (`sleep`) is killed:
//! the kernel clears the death signal when the effective uid changes (see
//! prctl(2)), and nothing sets it again after the switch. The death signal
//! therefore cannot protect jailed VMs; a parent that outlives the daemon's
//! crash (or [`clean_leftover_jails`] at the next start) has to.

use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::VmmError;

/// The chroot base under the state directory (short: socket paths are limited to 108 bytes).
pub const CHROOT_DIR: &str = "j";
/// Parent cgroup of every jailed VM.
pub const PARENT_CGROUP: &str = "neurovisor";
/// First uid and gid handed to jailed VMs, unless configured: far above
/// distribution users and the usual subordinate-id ranges (100000+).
pub const DEFAULT_ID_BASE: u32 = 1_000_000_000;
pub const DEFAULT_ID_COUNT: u32 = 65_536;

/// File names inside the chroot, as Firecracker sees them (`/<name>`).
pub const API_SOCK: &str = "firecracker.sock";
pub const KERNEL: &str = "vmlinux";
pub const ROOTFS: &str = "rootfs.ext4";

/// A range of uids/gids: slot `n` runs as `uid_base + n` / `gid_base + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub uid_base: u32,
    pub gid_base: u32,
    pub count: u32,
}

impl Default for IdRange {
    fn default() -> Self {
        Self {
            uid_base: DEFAULT_ID_BASE,
            gid_base: DEFAULT_ID_BASE,
            count: DEFAULT_ID_COUNT,
        }
    }
}

impl std::str::FromStr for IdRange {
    type Err = String;

    /// `FIRST-LAST` (the same numbers for uids and gids) or `FIRST+COUNT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("invalid id range '{s}' (use FIRST-LAST, e.g. 1000000000-1000065535)"))
        };
        let (first, count) = if let Some((a, b)) = s.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if b < a {
                return Err(format!("invalid id range '{s}': LAST is below FIRST"));
            }
            (a, b - a + 1)
        } else if let Some((a, n)) = s.split_once('+') {
            (num(a)?, num(n)?)
        } else {
            return Err(format!("invalid id range '{s}' (use FIRST-LAST)"));
        };
        if first == 0 || count == 0 || first.checked_add(count - 1).is_none_or(|l| l == u32::MAX) {
            return Err(format!(
                "invalid id range '{s}': must be non-empty, exclude root and fit in 32 bits"
            ));
        }
        Ok(Self {
            uid_base: first,
            gid_base: first,
            count,
        })
    }
}

/// Where uid leases are locked, host-wide: every `neurovisor` process on the
/// host (daemon or CLI) takes its slots from the same lock files, so two
/// processes never give their VMs the same uid.
pub const ID_LOCK_DIR: &str = "/run/neurovisor-ids";

/// Hands out uid/gid slots to concurrent VMs, unique across processes: a slot
/// is taken by an flock on `<lock dir>/<uid>`, held by its [`IdLease`]
/// (released by the kernel if the holder dies).
#[derive(Debug, Clone)]
pub struct IdPool {
    range: IdRange,
    lock_dir: PathBuf,
    used: Arc<Mutex<BTreeSet<u32>>>,
}

/// One VM's uid and gid; returns its slot to the pool when dropped.
#[derive(Debug)]
pub struct IdLease {
    pub uid: u32,
    pub gid: u32,
    slot: u32,
    used: Arc<Mutex<BTreeSet<u32>>>,
    _lock: crate::supervisor::FileLock,
}

impl Drop for IdLease {
    fn drop(&mut self) {
        if let Ok(mut used) = self.used.lock() {
            used.remove(&self.slot);
        }
    }
}

impl IdPool {
    pub fn new(range: IdRange) -> Self {
        Self::with_lock_dir(range, ID_LOCK_DIR)
    }

    /// A pool whose leases are locked under `lock_dir` (tests).
    pub fn with_lock_dir(range: IdRange, lock_dir: impl Into<PathBuf>) -> Self {
        Self {
            range,
            lock_dir: lock_dir.into(),
            used: Arc::default(),
        }
    }

    pub fn range(&self) -> IdRange {
        self.range
    }

    /// The lowest slot free in this process and not locked by another.
    pub fn lease(&self) -> Result<IdLease, VmmError> {
        let mut used = self
            .used
            .lock()
            .map_err(|_| VmmError::Jail("uid pool lock poisoned".into()))?;
        let io = |source: std::io::Error| VmmError::StateDir {
            path: self.lock_dir.clone(),
            source,
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&self.lock_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(e)),
            _ => {}
        }
        // Lock files of other users' making must not steer our uids.
        let meta = std::fs::symlink_metadata(&self.lock_dir).map_err(io)?;
        if !meta.is_dir() || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw() {
            return Err(VmmError::Jail(format!(
                "{} must be a directory owned by this user (remove it and retry)",
                self.lock_dir.display()
            )));
        }
        for slot in (0..self.range.count).filter(|s| !used.contains(s)) {
            let uid = self.range.uid_base + slot;
            let Some(lock) =
                crate::supervisor::FileLock::try_acquire(&self.lock_dir.join(uid.to_string())).map_err(io)?
            else {
                continue;
            };
            used.insert(slot);
            return Ok(IdLease {
                uid,
                gid: self.range.gid_base + slot,
                slot,
                used: self.used.clone(),
                _lock: lock,
            });
        }
        Err(VmmError::Jail(format!(
            "all {} jail uids are in use (by this and other neurovisor processes)",
            self.range.count
        )))
    }
}

/// The cgroup hierarchy the jailer should use: 2 when `/sys/fs/cgroup` is
/// cgroup2 (unified), else 1 (v1 or hybrid, whose controllers are v1).
pub fn cgroup_version() -> u8 {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    match statfs("/sys/fs/cgroup") {
        Ok(s) if s.filesystem_type() == CGROUP2_SUPER_MAGIC => 2,
        _ => 1,
    }
}

/// Everything the jailer's command line is made of.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub cgroup_version: u8,
    /// The VM's cgroup (`neurovisor/vm-<id>`, made by the supervisor), which
    /// the jailer already runs in: its keeper put it there.
    pub vm_cgroup: Option<String>,
    pub netns: Option<PathBuf>,
}

impl JailSpec {
    /// The jailer's arguments; after `--` come Firecracker's (the jailer adds `--id`).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |k: &str, v: String| {
            a.push(k.to_string());
            a.push(v);
        };
        push("--id", self.id.clone());
        push("--exec-file", self.exec_file.display().to_string());
        push("--uid", self.uid.to_string());
        push("--gid", self.gid.to_string());
        push("--chroot-base-dir", self.chroot_base.display().to_string());
        push("--cgroup-version", self.cgroup_version.to_string());
        // No `--cgroup`: the jailer then makes no cgroup of its own. On v2 it
        // moves itself into `<root>/<parent cgroup>` (default: the exec
        // file's name) if that exists; naming the VM's cgroup keeps it there.
        if let Some(cg) = &self.vm_cgroup {
            push("--parent-cgroup", cg.clone());
        }
        if let Some(ns) = &self.netns {
            push("--netns", ns.display().to_string());
        }
        a.push("--".into());
        a.push("--api-sock".into());
        a.push(format!("/{API_SOCK}"));
        a
    }
}

/// Checks the jailer's rule for VM ids: alphanumerics and hyphens, at most 64.
pub fn valid_jail_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The file name of the Firecracker binary, which names the jail's directory.
/// The jailer only accepts names that contain "firecracker".
pub fn exec_file_name(firecracker: &Path) -> Result<String, VmmError> {
    let name = firecracker
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if name.contains("firecracker") {
        Ok(name)
    } else {
        Err(VmmError::Jail(format!(
            "the jailer only runs binaries whose file name contains \"firecracker\", not {}",
            firecracker.display()
        )))
    }
}

/// One VM's chroot and the host resources created for it.
#[derive(Debug)]
pub struct Jail {
    /// `<chroot_base>/<exec name>/<id>`: removed as a whole.
    jail_dir: PathBuf,
    /// `<jail_dir>/root`: `/` as Firecracker sees it.
    root: PathBuf,
    uid: u32,
    gid: u32,
    netns: Option<NetNs>,
    cleaned: bool,
}

impl Jail {
    /// Where the jailer will put the VM's chroot.
    pub fn new(chroot_base: &Path, exec_name: &str, id: &str, uid: u32, gid: u32) -> Self {
        let jail_dir = chroot_base.join(exec_name).join(id);
        Self {
            root: jail_dir.join("root"),
            jail_dir,
            uid,
            gid,
            netns: None,
            cleaned: false,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host path of `/<name>` inside the jail.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.root.join(name.trim_start_matches('/'))
    }

    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns.as_ref().map(NetNs::path)
    }

    /// Creates the chroot, places the kernel and rootfs in it and creates
    /// Firecracker's log files (it does not create them itself).
    pub fn prepare(&self, kernel: &Path, rootfs: &Path, log_files: &[&str]) -> Result<(), VmmError> {
        let io = |what: String| move |e: std::io::Error| VmmError::Jail(format!("{what}: {e}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(self.jail_dir.parent().unwrap_or(Path::new("/")))
            .map_err(io(format!("create {}", self.jail_dir.display())))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.jail_dir)
            .map_err(io(format!("create {}", self.jail_dir.display())))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.root)
            .map_err(io(format!("create {}", self.root.display())))?;
        self.chown(&self.root)?;
        self.place(kernel, KERNEL)?;
        self.place(rootfs, ROOTFS)?;
        for name in log_files {
            let p = self.host_path(name);
            std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&p)
                .map_err(io(format!("create {}", p.display())))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {}", p.display())))?;
            self.chown(&p)?;
        }
        Ok(())
    }

    /// Hard-links `src` into the jail, or copies it when that is impossible
    /// (another filesystem) or would not let the jail's user read it.
    ///
    /// `src` is resolved first: `link(2)` does not follow symlinks, so a
    /// symlinked image (the default kernel, `~/.cache/neurovisor/vmlinux`, is
    /// one) would otherwise become a link to the symlink, whose target does not
    /// exist inside the chroot.
    pub fn place(&self, src: &Path, name: &str) -> Result<Placed, VmmError> {
        let dst = self.host_path(name);
        let err = |what: &str, e: std::io::Error| {
            VmmError::Jail(format!("{what} {} to {}: {e}", src.display(), dst.display()))
        };
        let src = &std::fs::canonicalize(src).map_err(|e| err("resolve", e))?;
        let meta = std::fs::metadata(src).map_err(|e| err("stat", e))?;
        if !meta.is_file() {
            return Err(VmmError::Jail(format!(
                "{} is not a regular file; only files can be placed into the jail",
                src.display()
            )));
        }
        let world_readable = meta.permissions().mode() & 0o004 != 0;
        if world_readable {
            match std::fs::hard_link(src, &dst) {
                Ok(()) => return Ok(Placed::Linked),
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => return Err(err("hard-link", e)),
            }
        }
        if meta.len() >= 64 << 20 {
            tracing::warn!(
                "copying {} ({} MiB) into the jail: hard links need the state directory on the same \
                 filesystem as the images (and the image readable by others)",
                src.display(),
                meta.len() >> 20
            );
        }
        std::fs::copy(src, &dst).map_err(|e| err("copy", e))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o400))
            .map_err(|e| err("chmod", e))?;
        self.chown(&dst)?;
        Ok(Placed::Copied)
    }

    /// Gives `path` to the jail's user (Firecracker must connect to sockets we bind).
    pub fn chown(&self, path: &Path) -> Result<(), VmmError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| {
            VmmError::Jail(format!(
                "chown {} to {}:{}: {e}",
                path.display(),
                self.uid,
                self.gid
            ))
        })
    }

    /// Creates the VM's network namespace with `ip netns add`.
    pub async fn create_netns(&mut self, ip: &Path, name: &str) -> Result<(), VmmError> {
        self.netns = Some(NetNs::create(ip, name).await?);
        Ok(())
    }

    /// Removes the chroot (with everything linked or copied into it) and the
    /// network namespace (the cgroup is the supervisor's). Call after the VMM has exited.
    pub fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        if let Err(e) = std::fs::remove_dir_all(&self.jail_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove jail {}: {e}", self.jail_dir.display());
            }
        }
        // The exec-name directory is shared by all VMs; remove it when it is the last.
        if let Some(parent) = self.jail_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        if let Some(ns) = self.netns.take() {
            ns.delete();
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Removes what jailed VMs of a previous daemon left behind (it was killed
/// with SIGKILL: jailed VMs lose their parent-death signal, see the module
/// docs): kills each `firecracker --id=<id>`, then removes its chroot, cgroup
/// and network namespace. Returns how many jails were removed.
pub fn clean_leftover_jails(state_dir: &Path) -> usize {
    let base = state_dir.join(CHROOT_DIR);
    let mut n = 0;
    for exec_dir in std::fs::read_dir(&base).into_iter().flatten().flatten() {
        let exec_name = exec_dir.file_name().to_string_lossy().into_owned();
        for vm in std::fs::read_dir(exec_dir.path()).into_iter().flatten().flatten() {
            let id = vm.file_name().to_string_lossy().into_owned();
            if !valid_jail_id(&id) {
                continue;
            }
            let killed = super::process::kill_processes_mentioning(&format!("--id={id}"));
            if killed > 0 {
                // Let the kill land before the cgroup is removed.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let mut jail = Jail::new(&base, &exec_name, &id, 0, 0);
            if Path::new("/run/netns").join(format!("nv-{id}")).exists() {
                jail.netns = find_ip().map(|ip| NetNs {
                    ip,
                    name: format!("nv-{id}"),
                    deleted: false,
                });
            }
            jail.cleanup();
            tracing::info!(processes = killed, "removed leftover jail of VM {id}");
            n += 1;
        }
    }
    let _ = std::fs::remove_dir(&base);
    n
}

/// `ip` (iproute2): on PATH, else in the usual sbin directories.
pub fn find_ip() -> Option<PathBuf> {
    super::find_binary(None, "ip").or_else(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// How a file got into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Linked,
    Copied,
}

/// A named network namespace (`/run/netns/<name>`), deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    ip: PathBuf,
    name: String,
    deleted: bool,
}

pub const IP_HINT: &str = "install it with `apt-get install iproute2`";

impl NetNs {
    pub async fn create(ip: &Path, name: &str) -> Result<Self, VmmError> {
        let out = tokio::process::Command::new(ip)
            .args(["netns", "add", name])
            .output()
            .await
            .map_err(|source| VmmError::Spawn {
                what: format!("{} netns add", ip.display()),
                source,
            })?;
        if !out.status.success() {
            return Err(VmmError::Jail(format!(
                "ip netns add {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Self {
            ip: ip.to_path_buf(),
            name: name.to_string(),
            deleted: false,
        })
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Deletes the namespace (synchronously: it also runs from `Drop`).
    pub fn delete(mut self) {
        self.delete_now();
    }

    fn delete_now(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        match std::process::Command::new(&self.ip)
            .args(["netns", "delete", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                "ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::warn!("ip netns delete {}: {e}", self.name),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.delete_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: u8) -> JailSpec {
        JailSpec {
            id: "0190e1e2-aaaa-7bbb-8ccc-123456789abc".into(),
            exec_file: "/usr/local/bin/firecracker".into(),
            uid: 1_000_000_007,
            gid: 1_000_000_007,
            chroot_base: "/run/neurovisor/j".into(),
            cgroup_version: version,
            vm_cgroup: Some("neurovisor/vm-0190e1e2-aaaa-7bbb-8ccc-123456789abc".into()),
            netns: Some("/run/netns/nv-0190e1e2".into()),
        }
    }

    #[test]
    fn jailer_arguments() {
        let a = spec(2).args().join(" ");
        assert_eq!(
            a,
            "--id 0190e1e2-aaaa-7bbb-8ccc-123456789abc --exec-file /usr/local/bin/firecracker \
             --uid 1000000007 --gid 1000000007 --chroot-base-dir /run/neurovisor/j \
             --cgroup-version 2 --parent-cgroup neurovisor/vm-0190e1e2-aaaa-7bbb-8ccc-123456789abc \
             --netns /run/netns/nv-0190e1e2 -- --api-sock /firecracker.sock"
        );
        let v1 = spec(1).args().join(" ");
        assert!(v1.contains("--cgroup-version 1 "), "{v1}");
        assert!(
            !v1.contains("--cgroup "),
            "the jailer makes no cgroup of its own: {v1}"
        );
        let no_ns = JailSpec {
            netns: None,
            ..spec(2)
        }
        .args();
        assert!(!no_ns.iter().any(|a| a == "--netns"), "{no_ns:?}");
    }

    #[test]
    fn ids_and_names_follow_the_jailer_rules() {
        assert!(valid_jail_id("0190e1e2-aaaa-7bbb-8ccc-123456789abc"));
        assert!(!valid_jail_id("a/b"));
        assert!(!valid_jail_id(&"x".repeat(65)));
        assert_eq!(
            exec_file_name(Path::new("/opt/firecracker-v1.17")).expect("name"),
            "firecracker-v1.17"
        );
        assert!(exec_file_name(Path::new("/usr/bin/fc")).is_err());
    }

    #[test]
    fn id_ranges_parse_and_slots_are_reused() {
        let r: IdRange = "2000-2001".parse().expect("range");
        assert_eq!((r.uid_base, r.gid_base, r.count), (2000, 2000, 2));
        assert_eq!("5000+10".parse::<IdRange>().expect("range").count, 10);
        assert!("0-10".parse::<IdRange>().is_err());
        assert!("10-5".parse::<IdRange>().is_err());
        assert!("x".parse::<IdRange>().is_err());
        let locks = tempfile::tempdir().expect("tempdir");
        let pool = IdPool::with_lock_dir(r, locks.path().join("ids"));
        let a = pool.lease().expect("a");
        let b = pool.lease().expect("b");
        assert_eq!((a.uid, b.uid, b.gid), (2000, 2001, 2001));
        assert!(pool.lease().is_err(), "the range has two slots");
        drop(a);
        assert_eq!(pool.lease().expect("again").uid, 2000);
    }

    #[test]
    fn pools_sharing_a_lock_dir_never_lease_the_same_uid() {
        // Two pools stand for two processes: flocks on separate open files
        // exclude each other even within one process.
        let locks = tempfile::tempdir().expect("tempdir");
        let r: IdRange = "3000-3003".parse().expect("range");
        let (p1, p2) = (
            IdPool::with_lock_dir(r, locks.path()),
            IdPool::with_lock_dir(r, locks.path()),
        );
        let a = [p1.lease().expect("a1"), p1.lease().expect("a2")];
        let b = [p2.lease().expect("b1"), p2.lease().expect("b2")];
        let mut uids: Vec<u32> = a.iter().chain(&b).map(|l| l.uid).collect();
        uids.sort_unstable();
        assert_eq!(uids, vec![3000, 3001, 3002, 3003]);
        assert!(p2.lease().is_err(), "every uid is leased by one of them");
        drop(a);
        assert_eq!(p2.lease().expect("freed by the other").uid, 3000);
    }

    fn me() -> (u32, u32) {
        (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw())
    }

    #[test]
    fn chroot_is_prepared_and_removed() {
        let state = tempfile::tempdir().expect("tempdir");
        let src = tempfile::tempdir().expect("tempdir");
        let kernel = src.path().join("vmlinux");
        let rootfs = src.path().join("rootfs.ext4");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::write(&rootfs, b"rootfs").expect("write");
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        // Not readable by others: must be copied, not linked.
        std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (uid, gid) = me();
        let base = state.path().join(CHROOT_DIR);
        let mut jail = Jail::new(&base, "firecracker", "vm-1", uid, gid);
        assert_eq!(jail.root(), base.join("firecracker/vm-1/root"));
        jail.prepare(&kernel, &rootfs, &["firecracker.log", "metrics.json"])
            .expect("prepare");

        use std::os::unix::fs::MetadataExt;
        let k = std::fs::metadata(jail.host_path("/vmlinux")).expect("kernel in jail");
        assert_eq!(
            k.ino(),
            std::fs::metadata(&kernel).expect("kernel").ino(),
            "hard link"
        );
        let r = std::fs::metadata(jail.host_path(ROOTFS)).expect("rootfs in jail");
        assert_ne!(r.ino(), std::fs::metadata(&rootfs).expect("rootfs").ino(), "copy");
        assert_eq!((r.uid(), r.mode() & 0o777), (uid, 0o400));
        assert_eq!(std::fs::read(jail.host_path(ROOTFS)).expect("read"), b"rootfs");
        let log = std::fs::metadata(jail.host_path("firecracker.log")).expect("log");
        assert_eq!((log.len(), log.mode() & 0o777), (0, 0o600));
        assert!(jail.place(&kernel, KERNEL).is_err(), "the name is taken");

        jail.cleanup();
        assert!(!base.join("firecracker").exists(), "jail left behind");
        assert!(kernel.is_file() && rootfs.is_file(), "sources must stay");
        assert_eq!(std::fs::read(&kernel).expect("read"), b"kernel");
    }

    /// The default kernel is a symlink (`~/.cache/neurovisor/vmlinux` ->
    /// `kernel/<key>/vmlinux`): the jail must get the file it points to, since
    /// the symlink's target does not exist inside the chroot.
    #[test]
    fn symlinked_images_are_resolved_before_placing() {
        use std::os::unix::fs::MetadataExt;
        let state = tempfile::tempdir().expect("tempdir");
        let src = tempfile::tempdir().expect("tempdir");
        let keyed = src.path().join("kernel/abc");
        std::fs::create_dir_all(&keyed).expect("mkdir");
        let kernel = keyed.join("vmlinux");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        // A symlink to the file (absolute, like `ln -sfn`), and a symlinked directory.
        let link = src.path().join("vmlinux");
        std::os::unix::fs::symlink(&kernel, &link).expect("symlink");
        std::os::unix::fs::symlink(&keyed, src.path().join("images")).expect("symlink");
        let rootfs = src.path().join("images/vmlinux");
        let (uid, gid) = me();
        let base = state.path().join(CHROOT_DIR);
        let jail = Jail::new(&base, "firecracker", "vm-s", uid, gid);
        jail.prepare(&link, &rootfs, &[]).expect("prepare");
        for name in [KERNEL, ROOTFS] {
            let placed = jail.host_path(name);
            let m = std::fs::symlink_metadata(&placed).expect("placed");
            assert!(
                m.file_type().is_file(),
                "{name} in the jail is not a regular file: {m:?}"
            );
            assert_eq!(
                m.ino(),
                std::fs::metadata(&kernel).expect("kernel").ino(),
                "{name}"
            );
            assert_eq!(std::fs::read(&placed).expect("read"), b"kernel");
        }
        // A dangling symlink or a directory is an error, not a broken jail.
        let dangling = src.path().join("dangling");
        std::os::unix::fs::symlink(src.path().join("nothing"), &dangling).expect("symlink");
        assert!(jail.place(&dangling, "x").is_err());
        assert!(jail.place(src.path(), "y").is_err());
        drop(jail);
        assert!(link.is_symlink() && kernel.is_file(), "sources must stay");
    }

    #[test]
    fn leftover_jails_are_removed() {
        let state = tempfile::tempdir().expect("tempdir");
        let src = state.path().join("k");
        std::fs::write(&src, b"k").expect("write");
        let (uid, gid) = me();
        let base = state.path().join(CHROOT_DIR);
        for id in ["a-1", "b-2"] {
            let mut j = Jail::new(&base, "firecracker", id, uid, gid);
            j.prepare(&src, &src, &["firecracker.log"]).expect("prepare");
            // As if the daemon had died: nothing cleaned.
            j.cleaned = true;
        }
        assert_eq!(clean_leftover_jails(state.path()), 2);
        assert!(!base.exists(), "jails left behind");
        assert!(src.is_file());
        assert_eq!(clean_leftover_jails(state.path()), 0);
    }

    #[test]
    fn a_second_jail_keeps_the_shared_directory() {
        let state = tempfile::tempdir().expect("tempdir");
        let src = state.path().join("k");
        std::fs::write(&src, b"k").expect("write");
        let (uid, gid) = me();
        let base = state.path().join(CHROOT_DIR);
        let a = Jail::new(&base, "firecracker", "a", uid, gid);
        let b = Jail::new(&base, "firecracker", "b", uid, gid);
        a.prepare(&src, &src, &[]).expect("a");
        b.prepare(&src, &src, &[]).expect("b");
        drop(a);
        assert!(b.root().join(KERNEL).is_file());
        drop(b);
        assert!(!base.join("firecracker").exists());
    }
}
