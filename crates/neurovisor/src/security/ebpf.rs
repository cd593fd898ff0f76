//! The eBPF layer (cargo feature `ebpf`): a BPF LSM file policy for VMM
//! processes and per-VM syscall counts, keyed by cgroup v2 id.
//!
//! The programs are in `bpf/guard.bpf.c`, compiled by `build.rs` with clang
//! and embedded here; [`EbpfGuard`] loads them with aya and fills their maps:
//!
//! - **File policy** (`lsm/file_open`): a process whose cgroup v2 id was
//!   given to [`EbpfGuard::confine_cgroup`] gets `EPERM` when it opens a
//!   path given to [`EbpfGuard::protect_path`]. Files are matched by
//!   (device, inode), so hard links, bind mounts, `/proc/<pid>/root/...`,
//!   chroots and renames of the same file are covered too. A protected
//!   directory covers itself and every entry up to [`MAX_TREE_DEPTH`]
//!   directories below it on the same filesystem, including entries created
//!   after the call.
//! - **Syscall counts** (`tracepoint/raw_syscalls/sys_enter`): every system
//!   call entered by a process of a confined cgroup is counted
//!   ([`EbpfGuard::syscall_count`]), so the daemon can export per-VM rates
//!   and notice a VMM that suddenly behaves differently.
//!
//! Where the file policy cannot run (BPF LSM not in the kernel's active list,
//! or a kernel that refuses LSM programs: [`BpfError::LsmRefused`]),
//! [`LsmMode::IfActive`] keeps the syscall counter and
//! [`EbpfGuard::lsm_enforcing`] says so. [`EbpfGuard::attach_policy_dry_run`]
//! then still checks the policy's decisions against the real kernel.
//!
//! # What the file policy does not cover
//!
//! It is one hook, `file_open`, so it stops reading and writing through a
//! *new* open, including `execve` of a protected file. It does not stop:
//! file descriptors opened before the process entered the cgroup (or passed
//! to it over a socket), `stat`/`access`/`readlink`, `unlink`/`rename`/
//! `chmod`/`chown`/`truncate(path)`/`mkdir` in a protected directory (the
//! `O_CREAT` of a new file in a protected directory creates it, then the
//! open fails), `mmap` of an fd it already has, connecting to a protected
//! Unix socket (no open involved), entries more than [`MAX_TREE_DEPTH`]
//! levels below a protected directory, or filesystems mounted below one.
//! A file replaced by rename (a new inode) loses protection unless its
//! directory is protected. Protection is by exact cgroup id: a process that
//! moves to another cgroup (including a child cgroup) leaves it, so the VM's
//! cgroup must not be writable by the VMM's uid. On btrfs subvolumes and
//! overlayfs, `stat`'s `st_dev` can differ from the superblock's device the
//! kernel sees, so paths there may silently not match.
//!
//! # Cgroups on hybrid hosts
//!
//! `bpf_get_current_cgroup_id()` returns the id on the cgroup v2 (unified)
//! hierarchy even when the resource controllers are on v1. A VMM that was
//! only put in v1 cgroups sits in the v2 *root* (id 1), which must never be
//! confined (that would be every process on the host): put each VM in its own
//! v2 directory as well, e.g. with [`Cgroup2Dir`].

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{BtfTracePoint, Lsm, ProgramError, RawTracePoint, TracePoint};
use aya::{Btf, BtfError, Ebpf};

use super::lsm::{self, LsmStatusError};

/// The compiled programs. aya parses the ELF in place, so the bytes must be
/// aligned (plain `include_bytes!` gives no alignment guarantee).
static GUARD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard.bpf.o"));

/// How many directory levels below a protected directory are covered
/// (`MAX_TREE_DEPTH` in `bpf/guard.bpf.c`).
pub const MAX_TREE_DEPTH: usize = 8;

/// Value flags of the `protected_inodes` map (`PROTECT_*` in the C source).
const PROTECT_SELF: u8 = 1;
const PROTECT_TREE: u8 = 2;
/// Indexes of the `stats` map (`STAT_*` in the C source).
const STAT_DENIALS: u32 = 0;
const STAT_DRY_RUN_DENIALS: u32 = 1;
/// `BPF_NOEXIST`: insert only if the key is new (keeps a running count).
const BPF_NOEXIST: u64 = 1;
/// The cgroup v2 root's id (its kernfs inode number).
const ROOT_CGROUP_ID: u64 = 1;

/// Whether loading requires the BPF LSM to be active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LsmMode {
    /// Fail when the BPF LSM is not active (the file policy is the point).
    Required,
    /// Load the syscall counter alone when the BPF LSM is not active, with a
    /// warning; [`EbpfGuard::lsm_enforcing`] tells which it was.
    IfActive,
}

/// Errors of the eBPF layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The embedded object could not be loaded (maps created, relocated).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The kernel's BTF (needed to attach LSM programs) is unreadable.
    #[error("reading kernel BTF from /sys/kernel/btf/vmlinux: {0}")]
    Btf(#[from] BtfError),
    /// A program failed to load (verifier) or attach.
    #[error("eBPF program `{name}`: {source}")]
    Program {
        /// The program's name in the object.
        name: &'static str,
        /// aya's error (the verifier log for load failures).
        #[source]
        source: ProgramError,
    },
    /// The object lacks a program or map this module expects (a build mismatch).
    #[error("eBPF object has no {kind} `{name}`")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("eBPF map `{name}`: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// The active LSM list could not be read.
    #[error(transparent)]
    LsmStatus(#[from] LsmStatusError),
    /// The BPF LSM is not active and [`LsmMode::Required`] was asked for.
    #[error("{0}")]
    LsmInactive(String),
    /// The BPF LSM is listed as active, but the kernel refused the LSM
    /// program with EPERM before verifying it (root, all capabilities).
    /// Seen on kernels that refuse every BPF trampoline program (`lsm/`,
    /// `fentry/`), e.g. some hypervisor-provided guest kernels.
    #[error(
        "the kernel refused to load the BPF LSM program `file_open` (EPERM, no verifier log) \
         although `bpf` is an active LSM: this kernel does not allow BPF trampoline programs \
         (lsm/, fentry/), so the file policy cannot run here"
    )]
    LsmRefused {
        /// aya's load error.
        #[source]
        source: ProgramError,
    },
    /// Confining this cgroup would confine every process on the host (the
    /// root) or the daemon itself.
    #[error("refusing to confine cgroup id {id}: {why}")]
    RefusedCgroup {
        /// The cgroup id.
        id: u64,
        /// Why.
        why: &'static str,
    },
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem in /proc/self/mountinfo (mount -t cgroup2 none /sys/fs/cgroup/unified)")]
    NoCgroup2,
    /// A path is not on the cgroup2 filesystem.
    #[error("{} is not a cgroup v2 directory", .0.display())]
    NotCgroup2(PathBuf),
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl BpfError {
    fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// The loaded and attached programs and their maps. Dropping it detaches
/// both programs and frees the maps (the policy ends with it).
pub struct EbpfGuard {
    /// Owns the programs and their links: keep it alive as long as the
    /// policy should hold.
    ebpf: Ebpf,
    confined: HashMap<MapData, u64, u8>,
    protected: HashMap<MapData, [u64; 2], u8>,
    syscalls: PerCpuHashMap<MapData, u64, u64>,
    stats: PerCpuArray<MapData, u64>,
    lsm_enforcing: bool,
    syscall_hook: &'static str,
}

impl std::fmt::Debug for EbpfGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfGuard")
            .field("lsm_enforcing", &self.lsm_enforcing)
            .field("syscall_hook", &self.syscall_hook)
            .finish_non_exhaustive()
    }
}

impl EbpfGuard {
    /// Loads the object and attaches the syscall counter and (when the BPF
    /// LSM is active, see `mode`) the `file_open` policy. Needs root.
    pub fn load(mode: LsmMode) -> Result<Self, BpfError> {
        let lsm_active = match lsm::bpf_lsm_status() {
            Ok(active) => active,
            // Without a readable list the LSM attach might still work, but
            // we cannot know whether it would ever run; treat as inactive.
            Err(e) if mode == LsmMode::IfActive => {
                tracing::warn!(error = %e, "cannot tell whether the BPF LSM is active");
                false
            }
            Err(e) => return Err(e.into()),
        };
        if !lsm_active {
            let hint = lsm::enable_hint(&lsm::active_lsms().unwrap_or_default());
            if mode == LsmMode::Required {
                return Err(BpfError::LsmInactive(hint));
            }
            tracing::warn!("{hint}; loading the syscall counter without the file policy");
        }

        let mut ebpf = Ebpf::load(GUARD_OBJECT)?;

        let syscall_hook = attach_syscall_counter(&mut ebpf)?;

        let lsm_enforcing = lsm_active
            && match attach_file_policy(&mut ebpf) {
                Ok(()) => true,
                Err(e) if mode == LsmMode::IfActive => {
                    tracing::warn!(error = %e, "file policy not attached; counting syscalls only");
                    false
                }
                Err(e) => return Err(e),
            };

        let confined = HashMap::try_from(take_map(&mut ebpf, "confined_cgroups")?)
            .map_err(map_err("confined_cgroups"))?;
        let protected = HashMap::try_from(take_map(&mut ebpf, "protected_inodes")?)
            .map_err(map_err("protected_inodes"))?;
        let syscalls = PerCpuHashMap::try_from(take_map(&mut ebpf, "syscall_counts")?)
            .map_err(map_err("syscall_counts"))?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "stats")?).map_err(map_err("stats"))?;

        tracing::info!(lsm_enforcing, syscall_hook, "eBPF guard attached");
        Ok(Self {
            ebpf,
            confined,
            protected,
            syscalls,
            stats,
            lsm_enforcing,
            syscall_hook,
        })
    }

    /// Where the syscall counter is attached: `tracepoint/raw_syscalls/sys_enter`,
    /// or `raw_tracepoint/sys_enter` on hosts without tracefs.
    pub fn syscall_hook(&self) -> &'static str {
        self.syscall_hook
    }

    /// Whether the `file_open` policy is attached (the BPF LSM was active).
    /// When false, [`confine_cgroup`](Self::confine_cgroup) only counts.
    pub fn lsm_enforcing(&self) -> bool {
        self.lsm_enforcing
    }

    /// Puts the processes of cgroup v2 `id` (see [`cgroup_id`]) under the
    /// file policy and starts counting their syscalls. Confining an already
    /// confined cgroup keeps its count.
    ///
    /// Refuses the root cgroup and the caller's own cgroup: either would lock
    /// the daemon out of its own state.
    pub fn confine_cgroup(&mut self, id: u64) -> Result<(), BpfError> {
        if id <= ROOT_CGROUP_ID {
            return Err(BpfError::RefusedCgroup {
                id,
                why: "it is the cgroup v2 root (every process not in a v2 child cgroup)",
            });
        }
        match current_cgroup_id() {
            Ok(own) if own == id => {
                return Err(BpfError::RefusedCgroup {
                    id,
                    why: "it is this process's own cgroup",
                })
            }
            Ok(_) => {}
            // Not knowing our own cgroup is no reason to leave a VM
            // unconfined; the root check above already covers the worst case.
            Err(e) => tracing::debug!(error = %e, "cannot read own cgroup id"),
        }
        let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus()?]).map_err(|e| {
            BpfError::io(
                "sizing per-CPU values",
                Path::new("/sys/devices/system/cpu/possible"),
                e,
            )
        })?;
        match self.syscalls.insert(id, zeros, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(BpfError::Map {
                    name: "syscall_counts",
                    source,
                })
            }
        }
        self.confined
            .insert(id, 1, 0)
            .map_err(map_err("confined_cgroups"))?;
        tracing::debug!(cgroup_id = id, "cgroup confined");
        Ok(())
    }

    /// Ends the policy and the count for cgroup `id`; returns its final
    /// syscall count (0 if it was not confined).
    pub fn release_cgroup(&mut self, id: u64) -> Result<u64, BpfError> {
        let count = self.syscall_count(id)?;
        ignore_missing(self.confined.remove(&id)).map_err(map_err("confined_cgroups"))?;
        ignore_missing(self.syscalls.remove(&id)).map_err(map_err("syscall_counts"))?;
        tracing::debug!(cgroup_id = id, syscalls = count, "cgroup released");
        Ok(count)
    }

    /// Denies confined processes opening `path` (symlinks followed: the
    /// target is protected). A directory is protected with everything below
    /// it up to [`MAX_TREE_DEPTH`] levels on the same filesystem; a file by
    /// itself (all its hard links). The path must exist now.
    pub fn protect_path(&mut self, path: &Path) -> Result<(), BpfError> {
        let (key, is_dir) = file_key(path)?;
        let flags = if is_dir {
            PROTECT_SELF | PROTECT_TREE
        } else {
            PROTECT_SELF
        };
        self.protected
            .insert(key, flags, 0)
            .map_err(map_err("protected_inodes"))?;
        tracing::debug!(path = %path.display(), ino = key[0], dev = key[1], is_dir, "path protected");
        Ok(())
    }

    /// Lifts the protection of `path` (no-op if it had none).
    pub fn unprotect_path(&mut self, path: &Path) -> Result<(), BpfError> {
        let (key, _) = file_key(path)?;
        ignore_missing(self.protected.remove(&key)).map_err(map_err("protected_inodes"))
    }

    /// Syscalls entered by processes of cgroup `id` since it was confined;
    /// 0 for a cgroup that is not confined.
    pub fn syscall_count(&self, id: u64) -> Result<u64, BpfError> {
        match self.syscalls.get(&id, 0) {
            Ok(per_cpu) => Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add)),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(source) => Err(BpfError::Map {
                name: "syscall_counts",
                source,
            }),
        }
    }

    /// (cgroup id, syscall count) of every confined cgroup, for metrics.
    pub fn syscall_counts(&self) -> Result<Vec<(u64, u64)>, BpfError> {
        self.syscalls
            .iter()
            .map(|entry| {
                entry
                    .map(|(id, per_cpu)| (id, per_cpu.iter().copied().fold(0u64, u64::wrapping_add)))
                    .map_err(map_err("syscall_counts"))
            })
            .collect()
    }

    /// Opens denied by the file policy since load, all cgroups together.
    pub fn denials(&self) -> Result<u64, BpfError> {
        self.stat(STAT_DENIALS)
    }

    /// Diagnostic: also runs the file policy's decision (the same C code as
    /// the LSM hook) at the `ext4_sync_file_enter` tracepoint, i.e. on every
    /// `fsync()` of an ext4 file, and counts what it would deny in
    /// [`dry_run_denials`](Self::dry_run_denials) without denying anything.
    /// This checks the maps, CO-RE reads, device encoding and tree walk
    /// against the running kernel where LSM programs cannot be loaded.
    /// Needs ext4 built into the kernel (or loaded).
    pub fn attach_policy_dry_run(&mut self) -> Result<(), BpfError> {
        const NAME: &str = "policy_dry_run";
        let btf = Btf::from_sys_fs()?;
        let prog: &mut BtfTracePoint = program(&mut self.ebpf, NAME)?;
        prog.load("ext4_sync_file_enter", &btf)
            .and_then(|()| prog.attach().map(drop))
            .map_err(|source| BpfError::Program { name: NAME, source })
    }

    /// fsync()s the dry run (see
    /// [`attach_policy_dry_run`](Self::attach_policy_dry_run)) would have
    /// denied as opens.
    pub fn dry_run_denials(&self) -> Result<u64, BpfError> {
        self.stat(STAT_DRY_RUN_DENIALS)
    }

    fn stat(&self, index: u32) -> Result<u64, BpfError> {
        let per_cpu = self.stats.get(&index, 0).map_err(map_err("stats"))?;
        Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
    }
}

/// Loads and attaches the `file_open` LSM program.
fn attach_file_policy(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    const NAME: &str = "file_open";
    let btf = Btf::from_sys_fs()?;
    let policy: &mut Lsm = program(ebpf, NAME)?;
    policy.load(NAME, &btf).map_err(|source| {
        // A verifier rejection comes with a log and EACCES/EINVAL; a bare
        // EPERM for root means the kernel refuses the program type itself.
        let refused = matches!(
            &source,
            ProgramError::LoadError { io_error, verifier_log }
                if io_error.raw_os_error() == Some(libc::EPERM)
                    && verifier_log.to_string().trim().is_empty()
        );
        if refused {
            BpfError::LsmRefused { source }
        } else {
            BpfError::Program { name: NAME, source }
        }
    })?;
    policy
        .attach()
        .map_err(|source| BpfError::Program { name: NAME, source })?;
    Ok(())
}

/// Attaches the syscall counter: the classic tracepoint when tracefs is
/// there (its event id is read from tracefs), else the raw tracepoint, which
/// needs nothing but the bpf() syscall. Same counting code, same map.
fn attach_syscall_counter(ebpf: &mut Ebpf) -> Result<&'static str, BpfError> {
    const CLASSIC: &str = "count_syscalls";
    const RAW: &str = "count_syscalls_raw";
    let classic: &mut TracePoint = program(ebpf, CLASSIC)?;
    classic.load().map_err(|source| BpfError::Program {
        name: CLASSIC,
        source,
    })?;
    let classic_error = match classic.attach("raw_syscalls", "sys_enter") {
        Ok(_) => return Ok("tracepoint/raw_syscalls/sys_enter"),
        Err(e) => e,
    };
    tracing::info!(
        error = %classic_error,
        "tracepoint raw_syscalls/sys_enter not attachable (tracefs not mounted?); using raw_tracepoint/sys_enter"
    );
    let raw: &mut RawTracePoint = program(ebpf, RAW)?;
    raw.load()
        .and_then(|()| raw.attach("sys_enter"))
        .map_err(|source| BpfError::Program { name: RAW, source })?;
    Ok("raw_tracepoint/sys_enter")
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(BpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| BpfError::Program { name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name).ok_or(BpfError::Missing { kind: "map", name })
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn nr_cpus() -> Result<usize, BpfError> {
    aya::util::nr_cpus().map_err(|(path, e)| BpfError::io("reading", Path::new(path), e))
}

/// The map key of `path`: `[inode, device]` with the device in the kernel's
/// encoding, and whether it is a directory.
fn file_key(path: &Path) -> Result<([u64; 2], bool), BpfError> {
    let meta = std::fs::metadata(path).map_err(|e| BpfError::io("stat", path, e))?;
    Ok(([meta.ino(), kernel_dev(meta.dev())], meta.is_dir()))
}

/// Converts a `st_dev` as `stat(2)` returns it (glibc's `makedev` encoding:
/// minor bits split around the major) to the kernel's internal `dev_t`
/// (`MKDEV`: major << 20 | minor), which is what `inode->i_sb->s_dev` holds.
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = u64::from(libc::major(st_dev));
    let minor = u64::from(libc::minor(st_dev));
    (major << 20) | (minor & 0xf_ffff)
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|e| BpfError::io("reading", path, e))?;
    parse_cgroup2_mount(&text).ok_or(BpfError::NoCgroup2)
}

/// The first cgroup2 mount point in a `/proc/<pid>/mountinfo` text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [tags...] - <fstype> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let (b'\\', Some(digits)) = (bytes[i], bytes.get(i + 1..i + 4)) {
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(value) = u8::try_from(value) {
                    out.push(value);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of a cgroup directory: its inode number on the cgroup2
/// filesystem, the value `bpf_get_current_cgroup_id()` returns for its
/// processes.
pub fn cgroup_id(dir: &Path) -> Result<u64, BpfError> {
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| BpfError::io("statfs", dir, io::Error::from(e)))?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(BpfError::NotCgroup2(dir.to_owned()));
    }
    let meta = std::fs::metadata(dir).map_err(|e| BpfError::io("stat", dir, e))?;
    Ok(meta.ino())
}

/// This process's cgroup v2 id (from the `0::` line of `/proc/self/cgroup`).
pub fn current_cgroup_id() -> Result<u64, BpfError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(|e| BpfError::io("reading", path, e))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(BpfError::NoCgroup2)?;
    let dir = cgroup2_mount()?.join(relative.trim_start_matches('/'));
    cgroup_id(&dir)
}

/// A cgroup v2 directory made to identify one VM's processes (and nothing
/// else: no controllers are enabled). Removed on drop, which only succeeds
/// once its processes are gone.
#[derive(Debug)]
pub struct Cgroup2Dir {
    path: PathBuf,
    id: u64,
}

impl Cgroup2Dir {
    /// Creates `<cgroup2 mount>/<name>` (parents included).
    pub fn create(name: &str) -> Result<Self, BpfError> {
        Self::create_at(&cgroup2_mount()?.join(name))
    }

    /// Creates the cgroup directory `path` (parents included); it must be
    /// on the cgroup2 filesystem.
    pub fn create_at(path: &Path) -> Result<Self, BpfError> {
        std::fs::create_dir_all(path).map_err(|e| BpfError::io("creating cgroup", path, e))?;
        let id = match cgroup_id(path) {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_dir(path);
                return Err(e);
            }
        };
        Ok(Self {
            path: path.to_owned(),
            id,
        })
    }

    /// The cgroup id to pass to [`EbpfGuard::confine_cgroup`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `cgroup.procs` for writing. A child joins the cgroup by writing
    /// `0` (meaning "the writer") to it between fork and exec, e.g. from
    /// `Command::pre_exec`: a single `write(2)` on an fd opened beforehand is
    /// async-signal-safe, so the child is inside before it runs any code of
    /// its own.
    pub fn open_procs(&self) -> Result<File, BpfError> {
        let procs = self.path.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|e| BpfError::io("opening", &procs, e))
    }
}

impl Drop for Cgroup2Dir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove cgroup (processes left in it?)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_userspace_dev_to_kernel_dev() {
        // 254:0 (virtio disk): glibc 0xfe00 -> kernel 254 << 20.
        assert_eq!(kernel_dev(0xfe00), 254 << 20);
        // 8:1 (sda1): 0x801 -> 8 << 20 | 1.
        assert_eq!(kernel_dev(0x801), (8 << 20) | 1);
        // A large minor (anonymous devices, 0:300): glibc keeps minor bits
        // 8.. above bit 12.
        let st_dev = libc::makedev(0, 300);
        assert_eq!(kernel_dev(st_dev), 300);
        let st_dev = libc::makedev(259, 70_000);
        assert_eq!(kernel_dev(st_dev), (259 << 20) | 70_000);
    }

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_mountinfo() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let spaced = "30 23 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            parse_cgroup2_mount("22 27 0:21 / /proc rw - proc proc rw\n"),
            None
        );
    }
}
