//! Jails for VMM processes (QEMU and its `vhost-device-vsock` helper).
//!
//! A jailed process runs
//! - under a uid/gid of its own VM (one slot of a configured range, see
//!   [`crate::vmm::jailer::IdPool`]), with no capabilities, an empty bounding
//!   set, NoNewPrivs and `PR_SET_PDEATHSIG(SIGKILL)`;
//! - in new mount, PID, network, IPC and UTS namespaces: it sees no host
//!   process, has no network device and no route anywhere;
//! - in a private, read-only root (a tmpfs) holding only `/usr` (the VMM's
//!   libraries and firmware, read-only), the VM's kernel and rootfs
//!   (read-only), a few `/dev` nodes, a fresh `/proc`, and the VM's own state
//!   directory at `/vm` (its sockets and logs: the only writable place);
//! - with rlimits on open files, file size, processes and core dumps;
//! - in the VM's cgroup (joined before anything else happens).
//!
//! How: the process is started under a keeper
//! ([`crate::supervisor::keeper`]), which unshares the PID namespace, so its
//! child is PID 1 of a new one; that child joins the cgroup, unshares the
//! other namespaces ([`Prepared::enter`]), builds the root, drops privileges
//! and execs the VMM. The keeper reaps it and carries the owner's death to it.
//! Everything the child does between fork and exec is a raw syscall on data
//! prepared beforehand: nothing allocates after `fork` in a threaded process.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the VM's state directory appears inside the jail.
pub const JAIL_VM_DIR: &str = "/vm";
/// Where the kernel and rootfs appear inside the jail.
pub const JAIL_KERNEL: &str = "/img/vmlinux";
pub const JAIL_ROOTFS: &str = "/img/rootfs.ext4";
/// Where the VMM binary appears inside the jail (its file name is appended).
pub const JAIL_BIN_DIR: &str = "/vmm";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail path {0:?} contains a NUL byte")]
    Nul(PathBuf),
    #[error("jail: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Resource limits of a jailed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailLimits {
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_FSIZE in bytes. A memfd backing guest RAM counts as a file, so this
    /// must exceed the guest's memory.
    pub file_size: u64,
    /// RLIMIT_NPROC: processes *and threads* of the jail's uid (one uid per VM).
    pub processes: u64,
}

impl JailLimits {
    /// Limits for a VMM with `mem_mib` of guest RAM.
    pub fn for_vmm(mem_mib: u32) -> Self {
        Self {
            open_files: 1024,
            file_size: (u64::from(mem_mib) + 64) << 20,
            processes: 256,
        }
    }
}

/// A bind mount into the jail root.
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    /// Absolute path inside the jail.
    pub jail: PathBuf,
    pub writable: bool,
}

/// Everything needed to jail one process.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// An empty directory on the host that becomes the jail's root mount point.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. the group owning `/dev/kvm`).
    pub groups: Vec<u32>,
    pub binds: Vec<Bind>,
    pub limits: JailLimits,
    pub hostname: String,
    /// A seccomp filter installed right before exec (it must allow `execve`).
    pub seccomp: Option<Vec<libc::sock_filter>>,
}

/// Host directories a dynamically linked VMM needs: `/usr` read-only, and the
/// top-level library and binary directories (symlinks into `/usr` on merged-usr
/// systems, recreated as symlinks).
pub fn system_binds() -> Vec<Bind> {
    let mut binds = vec![Bind {
        host: "/usr".into(),
        jail: "/usr".into(),
        writable: false,
    }];
    for dir in ["/lib", "/lib64", "/bin", "/sbin"] {
        let p = Path::new(dir);
        if p.is_dir() && !p.is_symlink() {
            binds.push(Bind {
                host: p.into(),
                jail: p.into(),
                writable: false,
            });
        }
    }
    binds
}

/// Device nodes every VMM gets (read/write, but only these).
pub fn device_binds(kvm: bool) -> Vec<Bind> {
    let mut devs = vec!["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];
    if kvm {
        devs.push("/dev/kvm");
    }
    devs.into_iter()
        .filter(|d| Path::new(d).exists())
        .map(|d| Bind {
            host: d.into(),
            jail: d.into(),
            writable: true,
        })
        .collect()
}

enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
    Proc(CString),
}

/// A [`JailSpec`] turned into C strings and syscalls, ready for `pre_exec`.
pub struct Prepared {
    root: CString,
    dot: CString,
    slash: CString,
    tmpfs: CString,
    tmpfs_opts: CString,
    proc_fs: CString,
    ops: Vec<Op>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    limits: JailLimits,
    hostname: CString,
    seccomp: Option<Vec<libc::sock_filter>>,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Nul(p.to_path_buf()))
}

impl JailSpec {
    pub fn prepare(self) -> Result<Arc<Prepared>, JailError> {
        let root = self.root.clone();
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let mut ops = Vec::new();
        let mut made = std::collections::BTreeSet::new();
        let mut mkdirs = |ops: &mut Vec<Op>, jail_dir: &Path| -> Result<(), JailError> {
            let mut cur = PathBuf::from("/");
            for c in jail_dir.components().skip(1) {
                cur.push(c);
                if made.insert(cur.clone()) {
                    ops.push(Op::Mkdir(cstr(&inside(&cur))?));
                }
            }
            Ok(())
        };
        for dir in ["/proc", "/dev", "/tmp"] {
            mkdirs(&mut ops, Path::new(dir))?;
        }
        for link in ["/lib", "/lib64", "/bin", "/sbin"] {
            if let Ok(target) = std::fs::read_link(link) {
                ops.push(Op::Symlink {
                    target: cstr(&target)?,
                    link: cstr(&inside(Path::new(link)))?,
                });
            }
        }
        for b in &self.binds {
            let is_dir = std::fs::metadata(&b.host)
                .map_err(|source| JailError::Io {
                    what: "bind source",
                    path: b.host.clone(),
                    source,
                })?
                .is_dir();
            if is_dir {
                mkdirs(&mut ops, &b.jail)?;
            } else {
                if let Some(parent) = b.jail.parent() {
                    mkdirs(&mut ops, parent)?;
                }
                ops.push(Op::Touch(cstr(&inside(&b.jail))?));
            }
            let dst = cstr(&inside(&b.jail))?;
            // Not recursive: nothing mounted below a source comes along.
            ops.push(Op::Bind {
                src: cstr(&b.host)?,
                dst: dst.clone(),
                flags: libc::MS_BIND,
            });
            // A bind mount ignores MS_RDONLY & co. until it is remounted.
            let mut flags = libc::MS_NOSUID;
            if !b.writable {
                flags |= libc::MS_RDONLY | libc::MS_NODEV;
            }
            if !b.host.starts_with("/dev") {
                flags |= libc::MS_NODEV;
            }
            ops.push(Op::Bind {
                src: dst.clone(),
                dst,
                flags: libc::MS_REMOUNT | libc::MS_BIND | flags,
            });
        }
        ops.push(Op::Proc(cstr(&inside(Path::new("/proc")))?));
        Ok(Arc::new(Prepared {
            root: cstr(&self.root)?,
            dot: CString::from(c"."),
            slash: CString::from(c"/"),
            tmpfs: CString::from(c"tmpfs"),
            tmpfs_opts: CString::from(c"size=1m,mode=0755"),
            proc_fs: CString::from(c"proc"),
            ops,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups,
            limits: self.limits,
            hostname: CString::new(self.hostname.replace('\0', "")).unwrap_or_default(),
            seccomp: self.seccomp,
        }))
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Prepared {
    /// Enters the jail: new mount, network, IPC and UTS namespaces, the
    /// private root, no privileges. Runs in the VM process between fork and
    /// exec, as PID 1 of the PID namespace its keeper made
    /// ([`crate::supervisor::keeper`]).
    pub fn enter(&self) -> std::io::Result<()> {
        // SAFETY: raw, async-signal-safe syscalls on prepared buffers.
        unsafe {
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            ))?;
            self.build_and_drop()
        }
    }

    unsafe fn build_and_drop(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        check(libc::mount(
            null,
            self.slash.as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            self.tmpfs.as_ptr(),
            self.root.as_ptr(),
            self.tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            self.tmpfs_opts.as_ptr().cast(),
        ))?;
        for op in &self.ops {
            match op {
                Op::Mkdir(p) => {
                    if libc::mkdir(p.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Op::Touch(p) => {
                    let fd = libc::open(
                        p.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    check(fd)?;
                    libc::close(fd);
                }
                Op::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr()))?,
                Op::Bind { src, dst, flags } => check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    *flags,
                    std::ptr::null(),
                ))?,
                Op::Proc(p) => check(libc::mount(
                    self.proc_fs.as_ptr(),
                    p.as_ptr(),
                    self.proc_fs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?,
            }
        }
        // pivot_root(".", ".") stacks the old root under the new one; detaching
        // it leaves nothing of the host but what was bound in.
        check(libc::chdir(self.root.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr()) as libc::c_int)?;
        check(libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(self.slash.as_ptr()))?;
        check(libc::mount(
            null,
            self.slash.as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ))?;
        check(libc::sethostname(
            self.hostname.as_ptr(),
            self.hostname.as_bytes().len(),
        ))?;
        for (res, lim) in [
            (libc::RLIMIT_NOFILE, self.limits.open_files),
            (libc::RLIMIT_FSIZE, self.limits.file_size),
            (libc::RLIMIT_NPROC, self.limits.processes),
            (libc::RLIMIT_CORE, 0),
        ] {
            let r = libc::rlimit {
                rlim_cur: lim,
                rlim_max: lim,
            };
            check(libc::setrlimit(res, &r))?;
        }
        // What the VMM processes create (their sockets) is theirs alone:
        // 0700 for sockets; the daemon hands the two it must reach (the
        // guest's hybrid vsock, QMP) to root:<VM gid> 0660 itself.
        libc::umask(0o077);
        // Nothing of root's power survives: bounding and ambient sets emptied
        // while CAP_SETPCAP is still there, then the uid switch clears the rest.
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))?;
        let mut cap = 0;
        while libc::prctl(libc::PR_CAPBSET_READ, cap) >= 0 {
            check(libc::prctl(libc::PR_CAPBSET_DROP, cap))?;
            cap += 1;
        }
        check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
        check(libc::setresgid(self.gid, self.gid, self.gid))?;
        check(libc::setresuid(self.uid, self.uid, self.uid))?;
        // A credential change clears the parent-death signal: set it again.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if let Some(filter) = &self.seccomp {
            let prog = libc::sock_fprog {
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr().cast_mut(),
            };
            check(libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ))?;
        }
        Ok(())
    }
}
