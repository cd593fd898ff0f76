//! One cgroup per VM: a memory limit with OOM kill, a CPU quota matching the
//! VM's vCPUs and a pids limit, for the VM's host processes (the VMM and its
//! helpers), on cgroup v2 and on v1/hybrid hosts.
//!
//! The guest is confined by the VM; these limits confine the VMM process
//! itself, so a guest that drives QEMU into unbounded memory use (TCG's
//! translation cache, device emulation) or a compromised VMM cannot take the
//! host down with it.
//!
//! Layout, detected from `/proc/self/mountinfo` ([`CgroupLayout::detect`]):
//! - **v2** (unified): `<root>/neurovisor/vm-<id>` with `memory.max`,
//!   `memory.swap.max = 0`, `memory.oom.group = 1`, `cpu.max`, `pids.max`.
//! - **v1 / hybrid**: the same directory in the `memory`, `cpu`, `cpuacct`
//!   and `pids` hierarchies (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`,
//!   `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `pids.max`), plus, when cgroup2 is
//!   mounted beside them (hybrid), a controller-less directory in the unified
//!   hierarchy. That gives the VM's processes a cgroup v2 id, which is what an
//!   eBPF program sees in `bpf_get_current_cgroup_id()` ([`VmCgroup::cgroup_v2_id`]).
//!
//! A child joins the cgroup between fork and exec ([`pre_exec_join`] with
//! [`VmCgroup::procs_files`]), so not one instruction of the VMM runs
//! unconfined. A live [`VmCgroup`] holds an `flock` on its directory, which is
//! how [`clean_leftovers`] tells the cgroups of a SIGKILLed daemon from those of
//! a daemon still running beside it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directory under each hierarchy's root that holds the VM cgroups.
pub const PARENT: &str = "neurovisor";
/// Prefix of a VM cgroup's directory name.
pub const VM_PREFIX: &str = "vm-";

/// Host memory a VMM needs beyond the guest's RAM, added to the memory limit.
///
/// Measured with QEMU 7.2 under TCG (`microvm`, `vhost-device-vsock`), peak
/// over the VM's life, excluding the guest RAM (the memfd, `RssShmem`):
/// `print(1)` 81 MB anonymous (heap + TCG translation cache); CPU-heavy Python
/// 91-102 MB (1 and 4 vCPUs); a JIT-heavy Node.js program 152 MB. Add ~37 MB
/// of QEMU's binary and libraries (charged to the cgroup when it faults them
/// into the page cache first), ~4 MB for `vhost-device-vsock` and kernel
/// memory: up to ~195 MB seen. 256 MiB leaves room for workloads that translate
/// more code. The variable part is TCG's translation cache (QEMU's default
/// `tb-size` is large); bounding it (`-accel tcg,tb-size=...`) bounds this.
pub const VMM_MEMORY_OVERHEAD: u64 = 256 << 20;

/// Tasks (processes and threads) a VM may have. QEMU runs a main loop, one
/// thread per vCPU, RCU and signal threads, and an I/O thread pool of up to 64
/// workers; `vhost-device-vsock` a handful. 12 were seen with 4 vCPUs, but the
/// pool grows under disk load.
pub const DEFAULT_PIDS_MAX: u64 = 128;

/// CPU bandwidth period (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`VmCgroup::remove`] waits for killed processes to leave.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for `Drop`, which must not hang a caller for long.
const DROP_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup filesystem with the memory, cpu and pids controllers is mounted (checked /proc/self/mountinfo)")]
    NotMounted,
    #[error("the cgroup v1 controller '{0}' is not mounted (mount it, or boot with cgroup v2: systemd.unified_cgroup_hierarchy=1)")]
    MissingController(String),
    #[error("cgroup v2 controller(s) {missing} not available in {path} (enabled: '{available}'); enable them in the parent's cgroup.subtree_control")]
    ControllersUnavailable {
        path: PathBuf,
        missing: String,
        available: String,
    },
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write '{value}' to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} still has processes {pids:?} after {waited:?}")]
    Busy {
        path: PathBuf,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid VM id '{0}' for a cgroup name (letters, digits, '-' and '_' only)")]
    InvalidId(String),
}

/// What a VM's processes may use together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory (RAM; swap is not allowed) in bytes; beyond it the OOM killer
    /// kills the VM. 0: no limit.
    pub memory_bytes: u64,
    /// CPU time in thousandths of a CPU (1000 = one full CPU). 0: no quota.
    pub cpu_millis: u64,
    /// Tasks (processes + threads). 0: no limit.
    pub pids_max: u64,
}

impl CgroupLimits {
    /// The limits of a VM with `memory_mib` of guest RAM and `vcpus` vCPUs:
    /// guest RAM + [`VMM_MEMORY_OVERHEAD`], one CPU per vCPU, [`DEFAULT_PIDS_MAX`].
    pub fn for_vm(memory_mib: u64, vcpus: u32) -> Self {
        Self {
            memory_bytes: (memory_mib << 20).saturating_add(VMM_MEMORY_OVERHEAD),
            cpu_millis: u64::from(vcpus) * 1000,
            pids_max: DEFAULT_PIDS_MAX,
        }
    }
}

/// Where the cgroup hierarchies are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Pure cgroup v2: one hierarchy with all controllers.
    V2 { root: PathBuf },
    /// Cgroup v1 hierarchies by controller name (co-mounted controllers share a
    /// path), and the cgroup2 mount of a hybrid host.
    V1 {
        controllers: BTreeMap<String, PathBuf>,
        unified: Option<PathBuf>,
    },
}

/// Controllers whose v1 hierarchies a VM cgroup uses; `cpuacct` only for accounting.
const V1_REQUIRED: [&str; 3] = ["memory", "cpu", "pids"];
const V1_ACCOUNTING: &str = "cpuacct";
/// Controllers enabled for VM cgroups on v2.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// v1 controller names (everything else in a v1 mount's options is an option
/// or a named hierarchy such as `name=systemd`).
const V1_CONTROLLER_NAMES: [&str; 14] = [
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

impl CgroupLayout {
    /// The layout of this host, from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// Parses mountinfo text. v1 wins when it holds one of the controllers a
    /// VM cgroup needs: a controller bound to a v1 hierarchy is unavailable in
    /// cgroup2, so such a host must be driven through v1.
    pub fn from_mountinfo(text: &str) -> Result<Self, CgroupError> {
        let mut controllers: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut unified: Option<PathBuf> = None;
        let mut unified_is_root = false;
        for line in text.lines() {
            // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (Some(root), Some(mount), Some(fstype)) = (l.get(3), l.get(4), r.first()) else {
                continue;
            };
            let mount = unescape_mount_path(mount);
            match *fstype {
                // Prefer a mount of the whole hierarchy over bind mounts of subtrees.
                "cgroup2" if unified.is_none() || (*root == "/" && !unified_is_root) => {
                    unified = Some(mount);
                    unified_is_root = *root == "/";
                }
                "cgroup" => {
                    let opts = r.get(2).copied().unwrap_or("");
                    for opt in opts.split(',') {
                        if V1_CONTROLLER_NAMES.contains(&opt) {
                            controllers
                                .entry(opt.to_string())
                                .or_insert_with(|| mount.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        if V1_REQUIRED.iter().any(|c| controllers.contains_key(*c)) {
            if let Some(missing) = V1_REQUIRED.iter().find(|c| !controllers.contains_key(**c)) {
                return Err(CgroupError::MissingController(missing.to_string()));
            }
            return Ok(Self::V1 { controllers, unified });
        }
        match unified {
            Some(root) => Ok(Self::V2 { root }),
            None => Err(CgroupError::NotMounted),
        }
    }

    /// Every hierarchy root a VM cgroup may have a directory in.
    fn roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = Vec::new();
        match self {
            Self::V2 { root } => roots.push(root.clone()),
            Self::V1 { controllers, unified } => {
                for p in controllers.values().chain(unified.iter()) {
                    if !roots.contains(p) {
                        roots.push(p.clone());
                    }
                }
            }
        }
        roots
    }
}

/// The files and values that put `limits` into effect, relative to a VM
/// cgroup's directory. `Optional` files are skipped when the kernel lacks them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    file: &'static str,
    value: String,
    optional: bool,
}

fn set(file: &'static str, value: impl ToString) -> Setting {
    Setting {
        file,
        value: value.to_string(),
        optional: false,
    }
}

fn set_if_present(file: &'static str, value: impl ToString) -> Setting {
    Setting {
        optional: true,
        ..set(file, value)
    }
}

fn cpu_quota_us(limits: &CgroupLimits) -> u64 {
    // At least 1 ms: the kernel's minimum quota.
    (limits.cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000)
}

fn v2_settings(limits: &CgroupLimits) -> Vec<Setting> {
    let mut s = Vec::new();
    if limits.memory_bytes > 0 {
        s.push(set("memory.max", limits.memory_bytes));
        // Swap would let the VM exceed its RAM limit.
        s.push(set_if_present("memory.swap.max", 0));
        // An OOM kills the whole VM (every process of the cgroup), not one
        // helper with the VMM left half alive (kernel >= 4.19).
        s.push(set_if_present("memory.oom.group", 1));
    }
    if limits.cpu_millis > 0 {
        s.push(set(
            "cpu.max",
            format!("{} {CPU_PERIOD_US}", cpu_quota_us(limits)),
        ));
    }
    if limits.pids_max > 0 {
        s.push(set("pids.max", limits.pids_max));
    }
    s
}

/// v1 settings by controller.
fn v1_settings(limits: &CgroupLimits) -> Vec<(&'static str, Setting)> {
    let mut s = Vec::new();
    if limits.memory_bytes > 0 {
        s.push(("memory", set("memory.limit_in_bytes", limits.memory_bytes)));
        // RAM + swap: equal to the RAM limit, i.e. no swap (only with swap accounting).
        s.push((
            "memory",
            set_if_present("memory.memsw.limit_in_bytes", limits.memory_bytes),
        ));
    }
    if limits.cpu_millis > 0 {
        s.push(("cpu", set("cpu.cfs_period_us", CPU_PERIOD_US)));
        s.push(("cpu", set("cpu.cfs_quota_us", cpu_quota_us(limits))));
    }
    if limits.pids_max > 0 {
        s.push(("pids", set("pids.max", limits.pids_max)));
    }
    s
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    // No O_CREAT: cgroup files exist or the kernel lacks the feature.
    let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

fn read_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    read_file(path)?.trim().parse().ok()
}

fn pids_in(dir: &Path) -> Vec<u32> {
    read_file(&dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Takes an exclusive `flock` on a directory without blocking; `None` if
/// another holder has it (or it cannot be opened).
fn try_lock_dir(dir: &Path) -> Option<File> {
    let f = File::open(dir).ok()?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (r == 0).then_some(f)
}

/// Where the VM cgroup's pieces are.
#[derive(Debug, Clone)]
enum Dirs {
    V2 {
        dir: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
        pids: PathBuf,
        unified: Option<PathBuf>,
    },
}

/// One VM's cgroup, in every hierarchy it needs. Dropping it removes it (best
/// effort, killing what is left); [`VmCgroup::remove`] does the same and reports.
#[derive(Debug)]
pub struct VmCgroup {
    name: String,
    dirs: Dirs,
    /// Every directory created, in creation order (distinct).
    created: Vec<PathBuf>,
    procs: Vec<CString>,
    v2_id: Option<u64>,
    /// flock on the first directory while this VM cgroup is alive.
    _lock: Option<File>,
    removed: bool,
}

impl VmCgroup {
    /// Creates `<root>/neurovisor/vm-<vm_id>` in every hierarchy the layout
    /// needs and applies `limits`. On error nothing is left behind.
    pub fn create(layout: &CgroupLayout, vm_id: &str, limits: &CgroupLimits) -> Result<Self, CgroupError> {
        if !valid_id(vm_id) {
            return Err(CgroupError::InvalidId(vm_id.to_string()));
        }
        let name = format!("{VM_PREFIX}{vm_id}");
        let vm_dir = |root: &Path| root.join(PARENT).join(&name);
        let dirs = match layout {
            CgroupLayout::V2 { root } => Dirs::V2 { dir: vm_dir(root) },
            CgroupLayout::V1 { controllers, unified } => {
                let get = |c: &str| {
                    controllers
                        .get(c)
                        .map(|p| vm_dir(p))
                        .ok_or_else(|| CgroupError::MissingController(c.to_string()))
                };
                Dirs::V1 {
                    memory: get("memory")?,
                    cpu: get("cpu")?,
                    cpuacct: get(V1_ACCOUNTING).ok(),
                    pids: get("pids")?,
                    unified: unified.as_deref().map(vm_dir),
                }
            }
        };
        let mut cg = Self {
            name,
            dirs,
            created: Vec::new(),
            procs: Vec::new(),
            v2_id: None,
            _lock: None,
            removed: false,
        };
        // From here on, dropping `cg` removes whatever was created.
        match layout {
            CgroupLayout::V2 { root } => cg.create_v2(root, limits)?,
            CgroupLayout::V1 { .. } => cg.create_v1(limits)?,
        }
        cg.procs = cg
            .created
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| CgroupError::Create {
                path: cg.created.first().cloned().unwrap_or_default(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        tracing::debug!(cgroup = %cg.name, dirs = ?cg.created, ?limits, "VM cgroup created");
        Ok(cg)
    }

    fn mkdir(&mut self, dir: &Path) -> Result<(), CgroupError> {
        if self.created.iter().any(|d| d == dir) {
            return Ok(());
        }
        let parent = dir.parent().unwrap_or(dir);
        match std::fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    path: parent.to_path_buf(),
                    source,
                })
            }
        }
        std::fs::create_dir(dir).map_err(|source| CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        })?;
        self.created.push(dir.to_path_buf());
        if self._lock.is_none() {
            self._lock = try_lock_dir(dir);
        }
        Ok(())
    }

    fn create_v2(&mut self, root: &Path, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let wanted = |s: &str| {
            V2_CONTROLLERS
                .iter()
                .filter(|c| !s.split_whitespace().any(|x| x == **c))
                .copied()
                .collect::<Vec<_>>()
        };
        let avail_path = root.join("cgroup.controllers");
        let available = read_file(&avail_path).unwrap_or_default();
        let missing = wanted(&available);
        if !missing.is_empty() {
            return Err(CgroupError::ControllersUnavailable {
                path: avail_path,
                missing: missing.join(", "),
                available: available.trim().to_string(),
            });
        }
        let enable = V2_CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        // Delegate the controllers down to the VM cgroups: root -> neurovisor -> vm-<id>.
        let parent = root.join(PARENT);
        if !wanted(&read_file(&root.join("cgroup.subtree_control")).unwrap_or_default()).is_empty() {
            write_file(&root.join("cgroup.subtree_control"), &enable)?;
        }
        match std::fs::create_dir(&parent) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: parent, source }),
        }
        if !wanted(&read_file(&parent.join("cgroup.subtree_control")).unwrap_or_default()).is_empty() {
            write_file(&parent.join("cgroup.subtree_control"), &enable)?;
        }
        let Dirs::V2 { dir } = &self.dirs else {
            return Ok(());
        };
        let dir = dir.clone();
        self.mkdir(&dir)?;
        for s in v2_settings(limits) {
            let path = dir.join(s.file);
            if s.optional && !path.exists() {
                continue;
            }
            write_file(&path, &s.value)?;
        }
        self.v2_id = std::fs::metadata(&dir).ok().map(|m| m.ino());
        Ok(())
    }

    fn create_v1(&mut self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let Dirs::V1 {
            memory,
            cpu,
            cpuacct,
            pids,
            unified,
        } = &self.dirs
        else {
            return Ok(());
        };
        let (memory, cpu, cpuacct, pids, unified) = (
            memory.clone(),
            cpu.clone(),
            cpuacct.clone(),
            pids.clone(),
            unified.clone(),
        );
        // Memory first: it is the one the lock is taken on (see clean_leftovers).
        for d in [
            Some(&memory),
            Some(&cpu),
            cpuacct.as_ref(),
            Some(&pids),
            unified.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            self.mkdir(d)?;
        }
        for (controller, s) in v1_settings(limits) {
            let dir = match controller {
                "memory" => &memory,
                "cpu" => &cpu,
                _ => &pids,
            };
            let path = dir.join(s.file);
            if s.optional && !path.exists() {
                continue;
            }
            write_file(&path, &s.value)?;
        }
        if let Some(u) = &unified {
            self.v2_id = std::fs::metadata(u).ok().map(|m| m.ino());
        }
        Ok(())
    }

    /// `vm-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup's directories, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.created
    }

    /// The id of the VM's cgroup v2 directory (its inode number), as eBPF's
    /// `bpf_get_current_cgroup_id()` reports it for the VM's processes. `None`
    /// on a v1 host without a cgroup2 mount.
    pub fn cgroup_v2_id(&self) -> Option<u64> {
        self.v2_id
    }

    /// The VM's own directories (not shared parents) in the order they can
    /// be removed, as C strings for a keeper ([`crate::supervisor::keeper`]).
    pub fn removal_order(&self) -> Vec<CString> {
        self.created
            .iter()
            .rev()
            .filter(|d| d.file_name().is_some_and(|n| n == self.name.as_str()))
            .filter_map(|d| CString::new(d.as_os_str().as_encoded_bytes()).ok())
            .collect()
    }

    /// The `cgroup.procs` files, one per hierarchy (the first is the one a
    /// keeper reads to see whether the cgroup is empty).
    pub fn procs_files(&self) -> Vec<CString> {
        self.procs.clone()
    }

    /// How a forked child joins this cgroup quickly ([`CgroupJoin`]),
    /// prepared so that nothing allocates after fork.
    pub fn join(&self) -> CgroupJoin {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
        match &self.dirs {
            Dirs::V2 { dir } => CgroupJoin {
                v1_tasks: Vec::new(),
                v2_dir: c(dir),
                v2_procs: c(&dir.join("cgroup.procs")),
            },
            Dirs::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
                unified,
            } => CgroupJoin {
                v1_tasks: [Some(memory), Some(cpu), cpuacct.as_ref(), Some(pids)]
                    .into_iter()
                    .flatten()
                    .filter_map(|d| c(&d.join("tasks")))
                    .collect(),
                v2_dir: unified.as_deref().and_then(c),
                v2_procs: unified.as_deref().and_then(|u| c(&u.join("cgroup.procs"))),
            },
        }
    }

    /// Moves a running process (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.created {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup (all hierarchies).
    pub fn pids(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.created.iter().flat_map(|d| pids_in(d)).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// A reader of this cgroup's usage figures.
    pub fn stats(&self) -> CgroupStats {
        CgroupStats {
            dirs: self.dirs.clone(),
        }
    }

    /// Memory charged to the cgroup now.
    pub fn memory_usage_bytes(&self) -> Option<u64> {
        self.stats().memory_usage_bytes()
    }

    /// The highest memory charge seen.
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        self.stats().memory_peak_bytes()
    }

    /// Processes the OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> Option<u64> {
        self.stats().oom_kills()
    }

    /// CFS periods in which the cgroup was throttled by its CPU quota.
    pub fn cpu_throttled(&self) -> Option<u64> {
        self.stats().cpu_throttled()
    }

    /// CPU time used, in microseconds.
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        self.stats().cpu_usage_usec()
    }

    /// Tasks in the cgroup now.
    pub fn pids_current(&self) -> Option<u64> {
        self.stats().pids_current()
    }

    /// Kills everything left in the cgroup, waits until it is empty and removes
    /// its directories in every hierarchy. Blocks (polling with short sleeps,
    /// up to a few seconds): async callers should use `spawn_blocking`.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_inner(REMOVE_TIMEOUT)
    }

    fn remove_inner(&mut self, timeout: Duration) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        let dirs = std::mem::take(&mut self.created);
        let result = empty_and_remove(&dirs, timeout);
        self._lock = None;
        result
    }
}

/// Reads one VM cgroup's usage figures (cheap to clone; used by `/metrics`).
#[derive(Debug, Clone)]
pub struct CgroupStats {
    dirs: Dirs,
}

impl CgroupStats {
    fn memory_dir(&self) -> &Path {
        match &self.dirs {
            Dirs::V2 { dir } => dir,
            Dirs::V1 { memory, .. } => memory,
        }
    }

    fn cpu_dir(&self) -> &Path {
        match &self.dirs {
            Dirs::V2 { dir } => dir,
            Dirs::V1 { cpu, .. } => cpu,
        }
    }

    fn pids_dir(&self) -> &Path {
        match &self.dirs {
            Dirs::V2 { dir } => dir,
            Dirs::V1 { pids, .. } => pids,
        }
    }

    fn is_v2(&self) -> bool {
        matches!(self.dirs, Dirs::V2 { .. })
    }

    /// Memory charged to the cgroup now.
    pub fn memory_usage_bytes(&self) -> Option<u64> {
        let f = if self.is_v2() {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        read_u64(&self.memory_dir().join(f))
    }

    /// The highest memory charge seen (v2 `memory.peak`, kernel >= 5.19;
    /// v1 `memory.max_usage_in_bytes`).
    pub fn memory_peak_bytes(&self) -> Option<u64> {
        let f = if self.is_v2() {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        read_u64(&self.memory_dir().join(f))
    }

    /// Processes the OOM killer killed in this cgroup (v2 `memory.events`
    /// `oom_kill`; v1 `memory.oom_control` `oom_kill`, kernel >= 4.13).
    pub fn oom_kills(&self) -> Option<u64> {
        let f = if self.is_v2() {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        keyed(&read_file(&self.memory_dir().join(f))?, "oom_kill")
    }

    /// CFS periods in which the cgroup was throttled by its CPU quota.
    pub fn cpu_throttled(&self) -> Option<u64> {
        keyed(&read_file(&self.cpu_dir().join("cpu.stat"))?, "nr_throttled")
    }

    /// CPU time used, in microseconds (v2 `cpu.stat` `usage_usec`; v1
    /// `cpuacct.usage`, `None` without the cpuacct hierarchy).
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        match &self.dirs {
            Dirs::V2 { dir } => keyed(&read_file(&dir.join("cpu.stat"))?, "usage_usec"),
            Dirs::V1 { cpuacct, .. } => {
                read_u64(&cpuacct.as_ref()?.join("cpuacct.usage")).map(|ns| ns / 1000)
            }
        }
    }

    /// Tasks in the cgroup now (`pids.current`).
    pub fn pids_current(&self) -> Option<u64> {
        read_u64(&self.pids_dir().join("pids.current"))
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner(DROP_TIMEOUT) {
            tracing::warn!(cgroup = %self.name, "cannot remove VM cgroup: {e}");
        }
    }
}

/// Kills every process in `dirs` (v2 `cgroup.kill` where the kernel has it,
/// else SIGKILL to each listed pid until none is left), then removes the
/// directories, children before parents.
fn empty_and_remove(dirs: &[PathBuf], timeout: Duration) -> Result<(), CgroupError> {
    for d in dirs {
        let kill = d.join("cgroup.kill");
        if kill.exists() {
            let _ = write_file(&kill, "1");
        }
    }
    let me = std::process::id();
    let started = Instant::now();
    let mut first_err = None;
    loop {
        let left: Vec<(PathBuf, Vec<u32>)> = dirs
            .iter()
            .map(|d| (d.clone(), pids_in(d)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if left.is_empty() {
            break;
        }
        if started.elapsed() >= timeout {
            let (path, pids) = left.into_iter().next().unwrap_or_default();
            first_err = Some(CgroupError::Busy {
                path,
                pids,
                waited: started.elapsed(),
            });
            break;
        }
        for pid in left.iter().flat_map(|(_, p)| p) {
            if *pid == me {
                // Never kill the caller; its cgroup membership is a bug elsewhere.
                tracing::error!(pid, "the calling process is inside a VM cgroup; not killing it");
                continue;
            }
            if let Ok(p) = i32::try_from(*pid) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for d in dirs.iter().rev() {
        // Exited tasks can keep a cgroup busy for a moment after they vanish from cgroup.procs.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    first_err.get_or_insert(CgroupError::Remove {
                        path: d.clone(),
                        source,
                    });
                    break;
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// How a new VM process enters its cgroup without stalling the spawn.
///
/// Moving a whole process (`cgroup.procs`) write-locks the kernel's global
/// threadgroup semaphore, which waits for an RCU grace period: 7-14 ms per
/// spawn, measured here on every VM boot and restore. Neither way below takes
/// that lock: the pre-exec child is single-threaded, so moving its one thread
/// through a v1 `tasks` file moves the process; and a v2 cgroup is entered at
/// creation with `clone3(CLONE_INTO_CGROUP)`. `v2_procs` is the fallback for
/// kernels without it (before 5.7).
#[derive(Debug, Clone, Default)]
pub struct CgroupJoin {
    /// v1 `tasks` files the child writes "0" to (see [`pre_exec_join`]).
    pub v1_tasks: Vec<CString>,
    /// The v2 directory, opened before the fork for `CLONE_INTO_CGROUP`.
    pub v2_dir: Option<CString>,
    /// Its `cgroup.procs`, written by the child when `clone3` could not place it.
    pub v2_procs: Option<CString>,
}

/// Joins the cgroups whose `cgroup.procs` (or v1 `tasks`) files are given, from a forked child
/// before exec (`Command::pre_exec`). Async-signal-safe: only `open`, `write`
/// and `close`, no allocation.
pub fn pre_exec_join(files: &[CString]) -> std::io::Result<()> {
    for f in files {
        // SAFETY: `f` is a valid NUL-terminated path; the buffer is a static byte.
        let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0" means the writing process itself.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = (n != 1).then(std::io::Error::last_os_error);
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(())
}

/// Removes leftover `vm-*` cgroups under `<root>/neurovisor` in every
/// hierarchy (a daemon killed with SIGKILL cannot remove its own), killing any
/// process still in them. Cgroups of a live [`VmCgroup`], in this or another
/// process, are locked and left alone. Returns how many VM cgroups were removed.
/// A VM cgroup younger than this is never taken for a leftover.
const LEFTOVER_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(2);

pub fn clean_leftovers(layout: &CgroupLayout) -> usize {
    let roots = layout.roots();
    // The directory a live VmCgroup locks: its first one (v2 dir / v1 memory).
    let lock_root = match layout {
        CgroupLayout::V2 { root } => Some(root.clone()),
        CgroupLayout::V1 { controllers, .. } => controllers.get("memory").cloned(),
    };
    let mut names: Vec<String> = Vec::new();
    for root in &roots {
        let Ok(entries) = std::fs::read_dir(root.join(PARENT)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(VM_PREFIX) && e.path().is_dir() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let mut removed = 0;
    for name in names {
        let primary = lock_root.as_ref().map(|r| r.join(PARENT).join(&name));
        // Just made: its creator may not have taken its lock yet (it locks
        // right after mkdir), so it cannot be told from a leftover. Skip it.
        let young = primary
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < LEFTOVER_MIN_AGE);
        if young {
            continue;
        }
        // Held by a live owner: not a leftover. Keep our lock while removing.
        let _lock = match primary.as_ref().filter(|p| p.exists()) {
            Some(p) => match try_lock_dir(p) {
                Some(l) => Some(l),
                None => continue,
            },
            None => None,
        };
        // The primary first (the same order create uses), then the rest.
        let mut dirs: Vec<PathBuf> = primary.into_iter().collect();
        for root in &roots {
            let d = root.join(PARENT).join(&name);
            if !dirs.contains(&d) && d.exists() {
                dirs.push(d);
            }
        }
        dirs.retain(|d| d.exists());
        match empty_and_remove(&dirs, REMOVE_TIMEOUT) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(cgroup = %name, "cannot remove leftover VM cgroup: {e}"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_hybrid_is_v1_with_unified() {
        let l = CgroupLayout::from_mountinfo(HYBRID).expect("layout");
        let CgroupLayout::V1 { controllers, unified } = l else {
            panic!("not v1: {l:?}");
        };
        assert_eq!(controllers.get("cpu"), Some(&PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(
            controllers.get("cpuacct"),
            Some(&PathBuf::from("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(
            controllers.get("memory"),
            Some(&PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert!(!controllers.contains_key("name=systemd") && !controllers.contains_key("rw"));
        assert_eq!(unified, Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn mountinfo_variants() {
        // Pure v2 (systemd's named v1 hierarchy or none at all beside it).
        let v2 =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(
            CgroupLayout::from_mountinfo(v2).expect("v2"),
            CgroupLayout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        // Co-mounted v1 controllers and an escaped mount point; no cgroup2.
        let v1 = "\
25 20 0:21 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
26 20 0:22 / /sys/fs/cgroup/mem\\040ory rw - cgroup cgroup rw,memory
27 20 0:23 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
28 20 0:24 / /sys/fs/cgroup/net rw - cgroup cgroup rw,net_cls,net_prio
";
        let CgroupLayout::V1 { controllers, unified } = CgroupLayout::from_mountinfo(v1).expect("v1") else {
            panic!("not v1");
        };
        assert_eq!(controllers["cpu"], controllers["cpuacct"]);
        assert_eq!(controllers["memory"], PathBuf::from("/sys/fs/cgroup/mem ory"));
        assert_eq!(unified, None);
        // v1 net_cls beside a full v2: the VM's controllers are in v2.
        let mixed = format!("{v2}28 20 0:24 / /sys/fs/cgroup/net rw - cgroup cgroup rw,net_cls\n");
        assert!(matches!(
            CgroupLayout::from_mountinfo(&mixed),
            Ok(CgroupLayout::V2 { .. })
        ));
        // v1 memory without pids: an error that names it.
        let partial =
            "26 20 0:22 / /m rw - cgroup cgroup rw,memory\n27 20 0:23 / /c rw - cgroup cgroup rw,cpu\n";
        assert!(matches!(
            CgroupLayout::from_mountinfo(partial),
            Err(CgroupError::MissingController(c)) if c == "pids"
        ));
        assert!(matches!(
            CgroupLayout::from_mountinfo(""),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn settings_match_the_limits() {
        let l = CgroupLimits::for_vm(256, 2);
        assert_eq!(l.memory_bytes, (256 << 20) + VMM_MEMORY_OVERHEAD);
        let v2: Vec<(&str, String)> = v2_settings(&l).into_iter().map(|s| (s.file, s.value)).collect();
        assert_eq!(
            v2,
            [
                ("memory.max", l.memory_bytes.to_string()),
                ("memory.swap.max", "0".into()),
                ("memory.oom.group", "1".into()),
                ("cpu.max", "200000 100000".into()),
                ("pids.max", DEFAULT_PIDS_MAX.to_string()),
            ]
        );
        let half = CgroupLimits {
            memory_bytes: 0,
            cpu_millis: 500,
            pids_max: 0,
        };
        let v1: Vec<(&str, &str, String)> = v1_settings(&half)
            .into_iter()
            .map(|(c, s)| (c, s.file, s.value))
            .collect();
        assert_eq!(
            v1,
            [
                ("cpu", "cpu.cfs_period_us", "100000".into()),
                ("cpu", "cpu.cfs_quota_us", "50000".into()),
            ]
        );
        assert_eq!(
            v2_settings(&CgroupLimits {
                cpu_millis: 0,
                ..half
            }),
            vec![]
        );
    }

    #[test]
    fn keyed_values_and_ids() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(t, "oom_kill"), Some(3));
        assert_eq!(keyed(t, "oom"), None);
        assert!(valid_id("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"));
        for bad in ["", "../x", "a/b", "a b", "."] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    /// Real cgroups need root and a cgroup filesystem; returns why not when absent.
    fn host_layout() -> Option<CgroupLayout> {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root to create cgroups");
            return None;
        }
        match CgroupLayout::detect() {
            Ok(l) => Some(l),
            Err(e) => {
                println!("skipped: {e}");
                None
            }
        }
    }

    fn test_id(tag: &str) -> String {
        format!("test-{tag}-{}", uuid::Uuid::now_v7().simple())
    }

    fn spawn_in(cg: &VmCgroup, program: &str, args: &[&str]) -> std::process::Child {
        let files = cg.procs_files();
        let mut cmd = Command::new(program);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: pre_exec_join is async-signal-safe (open/write/close only).
        unsafe {
            cmd.pre_exec(move || pre_exec_join(&files));
        }
        cmd.spawn().expect("spawn in cgroup")
    }

    #[test]
    fn real_cgroup_limits_join_and_cleanup() {
        let Some(layout) = host_layout() else { return };
        let limits = CgroupLimits {
            memory_bytes: 96 << 20,
            cpu_millis: 500,
            pids_max: 20,
        };
        let cg = VmCgroup::create(&layout, &test_id("limits"), &limits).expect("create");
        let dirs = cg.dirs().to_vec();
        assert!(!dirs.is_empty() && dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
        // The limits are in the kernel's files.
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read").trim().to_string();
        match &layout {
            CgroupLayout::V2 { .. } => {
                assert_eq!(
                    read(cg.stats().memory_dir().join("memory.max")),
                    (96u64 << 20).to_string()
                );
                assert_eq!(read(cg.stats().memory_dir().join("memory.oom.group")), "1");
                assert_eq!(read(cg.stats().cpu_dir().join("cpu.max")), "50000 100000");
            }
            CgroupLayout::V1 { unified, .. } => {
                assert_eq!(
                    read(cg.stats().memory_dir().join("memory.limit_in_bytes")),
                    (96u64 << 20).to_string()
                );
                assert_eq!(read(cg.stats().cpu_dir().join("cpu.cfs_quota_us")), "50000");
                assert_eq!(cg.cgroup_v2_id().is_some(), unified.is_some());
            }
        }
        assert_eq!(read(cg.stats().pids_dir().join("pids.max")), "20");

        // A child joins every hierarchy before exec.
        let mut child = spawn_in(&cg, "sleep", &["60"]);
        let pid = child.id();
        assert_eq!(cg.pids(), vec![pid]);
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("proc cgroup");
        for line in own.lines() {
            let mut parts = line.splitn(3, ':').skip(1);
            let (controllers, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let ours = path.ends_with(cg.name());
            if controllers.is_empty() && cg.cgroup_v2_id().is_some() {
                assert!(ours, "not in the v2 cgroup: {line}");
            }
            if controllers.split(',').any(|c| V1_REQUIRED.contains(&c)) {
                assert!(ours, "not in the v1 cgroup: {line}");
            }
        }
        if let Some(id) = cg.cgroup_v2_id() {
            assert!(id > 1);
        }
        assert!(cg.memory_usage_bytes().is_some());
        assert_eq!(cg.oom_kills(), Some(0));
        assert_eq!(cg.pids_current(), Some(1));

        // add_pid moves an already running process.
        let mut other = Command::new("sleep").arg("60").spawn().expect("spawn");
        cg.add_pid(other.id()).expect("add_pid");
        assert_eq!(cg.pids().len(), 2);

        // remove() kills both and leaves no directory behind.
        cg.remove().expect("remove");
        for c in [&mut child, &mut other] {
            let st = c.wait().expect("wait");
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        }
        for d in &dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    #[test]
    fn real_cgroup_pids_limit_stops_forks_and_drop_cleans_up() {
        let Some(layout) = host_layout() else { return };
        let limits = CgroupLimits {
            memory_bytes: 0,
            cpu_millis: 0,
            pids_max: 5,
        };
        let cg = VmCgroup::create(&layout, &test_id("pids"), &limits).expect("create");
        let dirs = cg.dirs().to_vec();
        // A shell that starts background sleeps until fork fails.
        let mut sh = spawn_in(
            &cg,
            "bash",
            &[
                "-c",
                "n=0; for i in $(seq 1 20); do sleep 60 & n=$((n+1)); done 2>/dev/null; sleep 60",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while cg.pids_current().unwrap_or(0) < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let n = cg.pids_current().expect("pids.current");
        assert!(n <= 5, "pids.current {n} above pids.max 5");
        assert_eq!(n, 5, "the shell should have filled its allowance");
        // Drop alone removes everything.
        drop(cg);
        let _ = sh.wait();
        for d in &dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }

    #[test]
    fn real_cgroup_leftovers_are_removed_but_live_ones_kept() {
        let Some(layout) = host_layout() else { return };
        let limits = CgroupLimits {
            memory_bytes: 64 << 20,
            cpu_millis: 1000,
            pids_max: 10,
        };
        let live = VmCgroup::create(&layout, &test_id("live"), &limits).expect("create");
        // A leftover: a cgroup whose owner is gone (forgotten = neither removed
        // nor locked) with a process still in it.
        let stale = VmCgroup::create(&layout, &test_id("stale"), &limits).expect("create");
        let mut child = spawn_in(&stale, "sleep", &["60"]);
        let stale_dirs = stale.dirs().to_vec();
        let mut stale = stale;
        stale._lock = None;
        std::mem::forget(stale);
        // Younger ones are never taken for leftovers (their creator may be
        // between mkdir and lock).
        assert_eq!(clean_leftovers_named(&layout, &stale_dirs), 0);
        std::thread::sleep(LEFTOVER_MIN_AGE + std::time::Duration::from_millis(200));

        let removed = clean_leftovers(&layout);
        assert!(removed >= 1, "removed {removed}");
        for d in &stale_dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
        let st = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        assert!(
            live.dirs().iter().all(|d| d.exists()),
            "a live cgroup was removed"
        );
        live.remove().expect("remove");
    }

    #[test]
    fn invalid_ids_are_refused_before_touching_the_host() {
        let layout = CgroupLayout::V2 {
            root: "/nonexistent".into(),
        };
        assert!(matches!(
            VmCgroup::create(&layout, "../../etc", &CgroupLimits::for_vm(1, 1)),
            Err(CgroupError::InvalidId(_))
        ));
    }

    /// How many of `dirs` one cleaning pass removed.
    fn clean_leftovers_named(layout: &CgroupLayout, dirs: &[PathBuf]) -> usize {
        clean_leftovers(layout);
        usize::from(!dirs.iter().all(|d| d.exists()))
    }
}
