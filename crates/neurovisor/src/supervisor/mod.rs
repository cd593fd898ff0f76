//! The VM supervisor: what every backend's VMs get from the host, whatever
//! the VMM.
//!
//! - [`keeper`]: every VM process starts under a keeper, which carries the
//!   owner's death (SIGKILL included) to it, reaps it, and removes the VM's
//!   cgroup when the owner is gone.
//! - [`OwnerLock`]: a VM directory is locked (flock) by the process that owns
//!   the VM for as long as the VM lives. A directory nobody holds is stale:
//!   [`clean_stale_vms`] (run at the start of every `run` and `serve`) kills
//!   what is left of it and removes it, without touching live VMs of other
//!   processes.
//! - Per-VM cgroups are [`crate::security::cgroups::VmCgroup`]s (locked the
//!   same way; [`crate::security::cgroups::clean_leftovers`] removes unheld
//!   ones), jail uids come from host-wide leases
//!   ([`crate::vmm::jailer::IdPool`]).

pub mod keeper;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the host's VM layer reports to, handed down from whoever owns the
/// VMs (the daemon: its metrics registry and eBPF guard) in every
/// [`crate::vmm::VmConfig`]. The default counts unseen and has no guard.
#[derive(Debug, Clone, Default)]
pub struct VmHooks {
    pub counters: crate::metrics::VmCounters,
    pub guard: crate::security::vm_guard::VmGuard,
}

/// The lock file in every VM directory.
pub const OWNER_FILE: &str = "owner.lock";

/// An exclusive flock held on a file while this value lives.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Creates (mode 0600, not following symlinks) and locks `path` without
    /// waiting; `Ok(None)` when another open file holds the lock.
    pub fn try_acquire(path: &Path) -> std::io::Result<Option<Self>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(Self { file }))
    }

    /// The locked file (e.g. to write the holder's pid into it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The owner's lock on one VM directory.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: FileLock,
}

impl OwnerLock {
    /// Locks a VM directory just created by its owner.
    pub fn take(vm_dir: &Path) -> std::io::Result<Self> {
        match FileLock::try_acquire(&vm_dir.join(OWNER_FILE))? {
            Some(l) => Ok(Self { _lock: l }),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!("{} is locked by another process", vm_dir.display()),
            )),
        }
    }
}

/// Confines VMs the same way for every backend: per-VM cgroups (v1, hybrid
/// or v2, when running as root), jail uids from host-wide leases, the eBPF
/// guard's registration, and the owner lock on the VM directory.
#[derive(Debug, Clone, Default)]
pub struct Supervisor {
    cgroups: Option<crate::security::cgroups::CgroupLayout>,
    ids: Option<crate::vmm::jailer::IdPool>,
    live: LiveVms,
}

/// The cgroups of the live VMs of one supervisor, by VM id (read by `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct LiveVms(Arc<Mutex<BTreeMap<String, crate::security::cgroups::CgroupStats>>>);

impl LiveVms {
    /// A snapshot: VM id and its cgroup's figures.
    pub fn snapshot(&self) -> Vec<(String, crate::security::cgroups::CgroupStats)> {
        self.0
            .lock()
            .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn insert(&self, id: &str, stats: crate::security::cgroups::CgroupStats) {
        if let Ok(mut l) = self.0.lock() {
            l.insert(id.to_string(), stats);
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut l) = self.0.lock() {
            l.remove(id);
        }
    }
}

impl Supervisor {
    /// Detects the cgroup layout when running as root; `ids` gives jailed
    /// VMs their uids (`None`: VMs run unjailed).
    pub fn new(ids: Option<crate::vmm::jailer::IdPool>) -> Self {
        let cgroups = if nix::unistd::geteuid().is_root() {
            match crate::security::cgroups::CgroupLayout::detect() {
                Ok(layout) => Some(layout),
                Err(e) => {
                    tracing::warn!("VMs run without per-VM cgroups: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            cgroups,
            ids,
            live: LiveVms::default(),
        }
    }

    /// The live VMs' cgroups (for `/metrics`).
    pub fn live(&self) -> &LiveVms {
        &self.live
    }

    /// A supervisor with exactly these parts (tests, or callers that detected them).
    pub fn with_parts(
        cgroups: Option<crate::security::cgroups::CgroupLayout>,
        ids: Option<crate::vmm::jailer::IdPool>,
    ) -> Self {
        Self {
            cgroups,
            ids,
            live: LiveVms::default(),
        }
    }

    pub fn jailed(&self) -> bool {
        self.ids.is_some()
    }

    /// Creates the VM's directory (0700, locked by this process), its cgroup
    /// with the size's limits, and its uid lease when jailed. On error
    /// nothing is left behind.
    pub fn confine(&self, cfg: &crate::vmm::VmConfig) -> Result<Confinement, crate::vmm::VmmError> {
        use crate::vmm::VmmError;
        let dir = cfg.vm_dir();
        let state_err = |source| VmmError::StateDir {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.parent().unwrap_or(Path::new("/")))
            .and_then(|_| std::fs::DirBuilder::new().mode(0o700).create(&dir))
            .map_err(state_err)?;
        // From here on, dropping the confinement removes the directory.
        let mut c = Confinement {
            vm_id: cfg.id.clone(),
            dir: dir.clone(),
            cgroup: None,
            ids: None,
            owner: None,
            live: self.live.clone(),
            hooks: cfg.hooks.clone(),
        };
        c.owner = Some(OwnerLock::take(&dir).map_err(state_err)?);
        if let Some(layout) = &self.cgroups {
            let limits = crate::security::cgroups::CgroupLimits::for_vm(
                u64::from(cfg.size.memory_mib()),
                cfg.size.vcpus(),
            );
            let cg = crate::security::cgroups::VmCgroup::create(layout, &cfg.id, &limits)
                .map_err(|e| VmmError::Jail(e.to_string()))?;
            c.hooks.guard.vm_started(&cfg.id, cg.cgroup_v2_id());
            self.live.insert(&cfg.id, cg.stats());
            c.cgroup = Some(cg);
        }
        if let Some(pool) = &self.ids {
            c.ids = Some(pool.lease()?);
        }
        Ok(c)
    }
}

/// What one VM holds on the host beyond its processes: its directory (and
/// the owner lock on it), cgroup and uid lease. Released by
/// [`Confinement::release`] once the VM's processes are stopped, or by `Drop`.
#[derive(Debug)]
pub struct Confinement {
    vm_id: String,
    dir: PathBuf,
    cgroup: Option<crate::security::cgroups::VmCgroup>,
    ids: Option<crate::vmm::jailer::IdLease>,
    owner: Option<OwnerLock>,
    live: LiveVms,
    hooks: VmHooks,
}

impl Confinement {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The jail's uid and gid, when the VM is jailed.
    pub fn ids(&self) -> Option<&crate::vmm::jailer::IdLease> {
        self.ids.as_ref()
    }

    pub fn cgroup(&self) -> Option<&crate::security::cgroups::VmCgroup> {
        self.cgroup.as_ref()
    }

    /// What a keeper needs to put a VM process into this VM's cgroup (and,
    /// with `jail`, into a jail), and to remove the cgroup if we die.
    pub fn keeper_spec(
        &self,
        jail: Option<std::sync::Arc<crate::security::jail::Prepared>>,
    ) -> keeper::KeeperSpec {
        keeper::KeeperSpec {
            cgroup_procs: self.cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default(),
            cgroup_join: self.cgroup.as_ref().map(|c| c.join()).unwrap_or_default(),
            cgroup_dirs: self
                .cgroup
                .as_ref()
                .map(|c| c.removal_order())
                .unwrap_or_default(),
            jail,
            no_huge_pages: false,
            inherit_fds: Vec::new(),
        }
    }

    /// After the VM's processes are stopped: kills whatever is left in the
    /// cgroup and removes it (off the async threads), then the directory.
    pub async fn release(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            self.unregister(&cg);
            let id = self.vm_id.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || cg.remove()).await {
                tracing::warn!(vm = %id, "cgroup: {e}");
            }
        }
        self.remove_dir();
    }

    /// Takes the VM off the live list and the eBPF guard, counting its syscalls.
    fn unregister(&self, cg: &crate::security::cgroups::VmCgroup) {
        self.live.remove(&self.vm_id);
        if let Some(n) = self.hooks.guard.vm_stopped(&self.vm_id, cg.cgroup_v2_id()) {
            self.hooks.counters.vmm_syscalls.inc_by(n);
        }
    }

    fn remove_dir(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %self.vm_id, "cannot remove {}: {e}", self.dir.display());
            }
        }
        // Unlocked only once gone: a cleaner never sees it unowned before.
        self.owner = None;
        self.ids = None;
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            self.unregister(&cg);
            drop(cg); // kills what is left in it, removes it
        }
        if self.owner.is_some() {
            self.remove_dir();
        }
    }
}

/// Whether the VM directory `dir` has an owner alive. A directory without a
/// lock file is being created right now, unless it is older than a few
/// seconds (then its creator died before locking it).
fn owned(dir: &Path) -> bool {
    let lock = dir.join(OWNER_FILE);
    if !lock.exists() {
        let young = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < std::time::Duration::from_secs(10));
        return young;
    }
    // A lock file seconds old: its creator had time to lock it.
    let settled = std::fs::metadata(&lock)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= std::time::Duration::from_millis(500));
    match FileLock::try_acquire(&lock) {
        Ok(Some(_held_while_checking)) => !settled,
        Ok(None) => true,
        // Unreadable: leave it alone rather than guess.
        Err(_) => true,
    }
}

/// Removes the VM directories under `vms_dir` whose owner is gone, killing
/// any process still running from one. Returns the directories removed.
pub fn clean_stale_vms(vms_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(vms_dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !path.is_dir() || owned(&path) {
            continue;
        }
        // Keepers kill their VM processes when the owner dies; this catches
        // anything older, or a keeper that was killed itself.
        let killed = crate::vmm::process::kill_processes_mentioning(&path.display().to_string());
        if killed > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(
                    processes = killed,
                    "removed stale VM directory {}",
                    path.display()
                );
                removed.push(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove stale VM directory {}: {e}", path.display()),
        }
    }
    removed
}

/// What `run` and `serve` clean before they start VMs: stale VM directories
/// under `vms_dir` and VM cgroups nobody holds.
pub fn clean_before_start(vms_dir: &Path) {
    let dirs = clean_stale_vms(vms_dir);
    let cgroups = match crate::security::cgroups::CgroupLayout::detect() {
        Ok(layout) if nix::unistd::geteuid().is_root() => crate::security::cgroups::clean_leftovers(&layout),
        _ => 0,
    };
    if !dirs.is_empty() || cgroups > 0 {
        tracing::warn!(
            directories = dirs.len(),
            cgroups,
            "removed what VMs of a killed process left behind"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_directory_is_kept_and_an_unlocked_one_removed() {
        let vms = tempfile::tempdir().expect("tempdir");
        let live = vms.path().join("live");
        let dead = vms.path().join("dead");
        std::fs::create_dir(&live).expect("mkdir");
        std::fs::create_dir(&dead).expect("mkdir");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let _owner = OwnerLock::take(&live).expect("lock");
        drop(OwnerLock::take(&dead).expect("lock"));
        for d in [&live, &dead] {
            let f = File::open(d.join(OWNER_FILE)).expect("open");
            f.set_modified(old).expect("age the lock file");
        }
        let removed = clean_stale_vms(vms.path());
        assert_eq!(removed, vec![dead.clone()]);
        assert!(live.exists() && !dead.exists());
        // A second lock on a held directory is refused.
        assert!(OwnerLock::take(&live).is_err());
    }

    #[test]
    fn a_young_directory_without_lock_is_being_created() {
        let vms = tempfile::tempdir().expect("tempdir");
        let new = vms.path().join("new");
        std::fs::create_dir(&new).expect("mkdir");
        assert!(clean_stale_vms(vms.path()).is_empty());
        assert!(new.exists());
    }

    #[test]
    fn the_lock_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        std::fs::write(&target, "x").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(FileLock::try_acquire(&link).is_err());
    }
}
