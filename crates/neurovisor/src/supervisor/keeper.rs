//! The keeper: a small process between the host and every VM process.
//!
//! Every VMM process (QEMU, `vhost-device-vsock`, Firecracker or its jailer)
//! is started as the only child of a *keeper*, forked from the spawning
//! process. The keeper exists because nothing of ours runs after a SIGKILL:
//! - it has a parent-death signal ([`OWNER_DEATH`]) and checks its parent
//!   right after setting it, so the death of the CLI or daemon — SIGKILL
//!   included — always reaches it, also through a jail (whose uid switch
//!   clears a death signal);
//! - on that signal, or on SIGTERM from the host, it SIGKILLs its child and
//!   *reaps* it, so a VM process is never left as a zombie to PID 1;
//! - when its parent is gone it also removes the VM's cgroup directories once
//!   they are empty (the owner cannot any more); the VM's state directory is
//!   left for the next `run` or `serve` (see [`super::clean_stale_vms`]);
//! - when the child exits on its own, it exits the same way (same code, or
//!   the same signal), so the host sees the VM process's own status.
//!
//! The keeper stays outside the VM's cgroup: the child is born into it (v2)
//! or joins it right after the fork (v1; see [`CgroupJoin`]), so killing everything in the cgroup never kills the keeper
//! before it has reaped. With a jail, the keeper unshares the PID namespace
//! (the child becomes its PID 1); the child unshares the other namespaces
//! itself, because `pivot_root` would move the keeper's root too if they
//! shared a mount namespace.
//!
//! Everything here runs between `fork` and `exec` of a threaded process: raw
//! async-signal-safe syscalls on data prepared beforehand, no allocation.

use std::ffi::CString;
use std::sync::Arc;

use crate::security::cgroups::{pre_exec_join, CgroupJoin};
use crate::security::jail;

/// The name the keeper shows in `ps` (`comm`, at most 15 bytes).
pub const KEEPER_COMM: &std::ffi::CStr = c"nv-keeper";

/// The parent-death signal. Not SIGTERM (the host's stop request): the
/// death signal fires when the *thread* that forked us exits, and while a
/// SIGKILLed owner's threads exit one by one we are first handed to a sibling
/// thread (`getppid()` unchanged). Telling the two apart lets the keeper wait
/// for the owner to be really gone before it takes over removing the cgroup,
/// where a host stop must not wait at all.
const OWNER_DEATH: libc::c_int = libc::SIGUSR1;

/// How long a keeper woken by [`OWNER_DEATH`] waits for its owner's last
/// thread to exit (then it is reparented) before deciding who cleans up.
const OWNER_EXIT_MS: u32 = 2_000;

/// How long an orphaned keeper retries removing the VM's cgroup while the
/// other processes of the VM are still being killed by their own keepers.
const ORPHAN_RMDIR_MS: u32 = 2_000;

/// What a keeper does for one VM process, prepared before the fork.
#[derive(Default)]
pub struct KeeperSpec {
    /// `cgroup.procs` files of the VM's cgroup (one per hierarchy; the first
    /// tells an orphaned keeper whether the cgroup is empty).
    pub cgroup_procs: Vec<CString>,
    /// How the child joins that cgroup.
    pub cgroup_join: CgroupJoin,
    /// The VM's cgroup directories, removed (in this order) by an orphaned keeper.
    pub cgroup_dirs: Vec<CString>,
    /// Run the child jailed (new namespaces, private root, no privileges).
    pub jail: Option<Arc<jail::Prepared>>,
    /// No transparent huge pages in the child (`PR_SET_THP_DISABLE`, kept
    /// across exec): for QEMU under TCG, whose translated-code buffer asks for
    /// them, so every 2 MiB it touches would count whole (an idle restored
    /// VM held 10 MiB for 8.5 MiB of code).
    pub no_huge_pages: bool,
    /// Close-on-exec descriptors of ours the child inherits (the guest RAM
    /// memfd of a snapshot); the keeper itself closes them.
    pub inherit_fds: Vec<libc::c_int>,
}

/// A [`KeeperSpec`] bound to the process that spawns.
pub struct Keeper {
    spec: KeeperSpec,
    /// The spawning process: a different parent means it died.
    parent: libc::pid_t,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `CLONE_INTO_CGROUP` (uapi `linux/sched.h`).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `fork()`, with the child born in the v2 cgroup `cgroup_fd` when the kernel
/// can (see [`CgroupJoin`]); `.1` tells whether it was. Any `clone3` failure
/// (ENOSYS before 5.3, E2BIG/EINVAL before 5.7) falls back to a plain fork,
/// and the child then writes `cgroup.procs`, which reports a real refusal.
///
/// # Safety
/// Only in a single-threaded child between fork and exec, like everything here.
unsafe fn fork_into_cgroup(cgroup_fd: libc::c_int) -> (libc::pid_t, bool) {
    if cgroup_fd >= 0 {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cgroup_fd as u64,
            ..CloneArgs::default()
        };
        let pid = libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        );
        if pid >= 0 {
            return (pid as libc::pid_t, true);
        }
    }
    (libc::fork(), false)
}

impl Keeper {
    pub fn new(spec: KeeperSpec) -> Arc<Self> {
        Arc::new(Self {
            spec,
            parent: std::process::id() as libc::pid_t,
        })
    }

    /// Makes `cmd` start under a keeper. Must be the first `pre_exec` hook of
    /// `cmd` (it forks: hooks registered before it would run in the keeper).
    pub fn apply(self: &Arc<Self>, cmd: &mut tokio::process::Command) {
        let me = self.clone();
        // SAFETY: the hook only makes raw syscalls on data prepared above.
        unsafe {
            cmd.pre_exec(move || me.in_child());
        }
    }

    /// In the forked child of the spawning process, which becomes the keeper;
    /// returns (to go on to exec) only in the keeper's own child.
    fn in_child(&self) -> std::io::Result<()> {
        // SAFETY (whole fn): raw, async-signal-safe syscalls on prepared data.
        unsafe {
            // The death signal first, then the check: a parent that died in
            // between is caught by the check instead.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, OWNER_DEATH))?;
            if libc::getppid() != self.parent {
                // The owner died while forking us: nobody else will remove the cgroup.
                self.remove_cgroups();
                libc::_exit(137);
            }
            // Signals wait in the mask until the keeper asks for them; the
            // child gets the old mask back before anything else.
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            check(libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old))?;
            if self.spec.jail.is_some() {
                // Applies to children only: the child is PID 1 of the namespace.
                check(libc::unshare(libc::CLONE_NEWPID))?;
            }
            let keeper = libc::getpid();
            let join = &self.spec.cgroup_join;
            let cgroup_fd = match &join.v2_dir {
                Some(d) => libc::open(d.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC),
                None => -1,
            };
            let (pid, placed) = fork_into_cgroup(cgroup_fd);
            check(pid)?;
            if pid > 0 {
                self.keep(pid, &all);
            }
            if cgroup_fd >= 0 {
                libc::close(cgroup_fd);
            }
            check(libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &old,
                std::ptr::null_mut(),
            ))?;
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
            if libc::getppid() != keeper && self.spec.jail.is_none() {
                libc::_exit(137);
            }
            if !placed {
                if let Some(procs) = &join.v2_procs {
                    pre_exec_join(std::slice::from_ref(procs))?;
                }
            }
            pre_exec_join(&join.v1_tasks)?;
            if self.spec.no_huge_pages {
                check(libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0))?;
            }
            if let Some(j) = &self.spec.jail {
                j.enter()?;
            }
            for &fd in &self.spec.inherit_fds {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
        }
        Ok(())
    }

    /// The keeper's life: wait for the child or a stop request; never returns.
    unsafe fn keep(&self, child: libc::pid_t, all: &libc::sigset_t) -> ! {
        // Close everything, including std's exec-status pipe, so spawn()
        // returns as soon as the child has exec'd (or reports its failure).
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::prctl(libc::PR_SET_NAME, KEEPER_COMM.as_ptr());
        // A keeper is a copy of the daemon's memory: never dump it.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        let tick = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            let sig = libc::sigtimedwait(all, std::ptr::null_mut(), &tick);
            let owner_dying = sig == OWNER_DEATH || libc::getppid() != self.parent;
            let mut status = 0;
            if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                self.finish(status, owner_dying);
            }
            if owner_dying || matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGHUP) {
                libc::kill(child, libc::SIGKILL);
                loop {
                    let r = libc::waitpid(child, &mut status, 0);
                    if r == child || (r < 0 && *libc::__errno_location() != libc::EINTR) {
                        break;
                    }
                }
                self.finish(status, owner_dying);
            }
        }
    }

    /// Cleans up after an owner that is gone, then exits like the child.
    /// `owner_dying`: the death signal came, so the owner's remaining threads
    /// are exiting too; wait for that before looking at the parent.
    unsafe fn finish(&self, status: libc::c_int, owner_dying: bool) -> ! {
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        let mut waited = 0;
        while owner_dying && libc::getppid() == self.parent && waited < OWNER_EXIT_MS {
            libc::nanosleep(&pause, std::ptr::null_mut());
            waited += 10;
        }
        if libc::getppid() != self.parent {
            self.remove_cgroups();
        } else if !owner_dying {
            // A host stop. If this was the VM's last process, its cgroup goes
            // now too: an owner SIGKILLed between reaping its keepers and
            // removing the cgroup would otherwise leave it, with no keeper
            // left to notice (the owner tolerates it being gone).
            self.remove_cgroups_if_empty();
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            125
        });
    }

    /// Removes the VM's cgroup directories if no process is left in them
    /// (a sibling VM process still running: nothing to do, its keeper is
    /// last). Retries briefly: a reaped task can keep a cgroup busy for a
    /// moment after it left `cgroup.procs`.
    unsafe fn remove_cgroups_if_empty(&self) {
        let Some(procs) = self.spec.cgroup_procs.first() else {
            return;
        };
        let fd = libc::open(procs.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return;
        }
        let mut buf = [0u8; 16];
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        if n != 0 {
            return;
        }
        self.rmdir_cgroups(20, 5_000_000);
    }

    /// Removes the VM's cgroup directories once the other VM processes are
    /// gone too (EBUSY until then); whichever keeper is last succeeds.
    unsafe fn remove_cgroups(&self) {
        self.rmdir_cgroups(ORPHAN_RMDIR_MS / 10, 10_000_000);
    }

    /// Up to `tries` rounds, `pause_ns` apart, of removing the VM's cgroup
    /// directories; done at the first round in which none was busy.
    unsafe fn rmdir_cgroups(&self, tries: u32, pause_ns: libc::c_long) {
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: pause_ns,
        };
        for _ in 0..tries {
            let mut busy = false;
            for d in &self.spec.cgroup_dirs {
                if libc::rmdir(d.as_ptr()) < 0 && *libc::__errno_location() == libc::EBUSY {
                    busy = true;
                }
            }
            if !busy {
                return;
            }
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::cgroups::{CgroupLayout, CgroupLimits, VmCgroup};
    use crate::vmm::process::child_of;

    /// The keeper's child is in the VM's cgroup in every hierarchy (born in
    /// the v2 one, moved by thread into the v1 ones); the keeper is not.
    #[tokio::test]
    async fn the_child_is_in_every_hierarchy_of_the_vm_cgroup_and_the_keeper_in_none() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root to create cgroups");
            return;
        }
        let Ok(layout) = CgroupLayout::detect() else {
            println!("skipped: no usable cgroup layout");
            return;
        };
        let id = format!("test-keeper-{}", uuid::Uuid::now_v7().simple());
        let limits = CgroupLimits {
            memory_bytes: 64 << 20,
            cpu_millis: 500,
            pids_max: 8,
        };
        let cg = VmCgroup::create(&layout, &id, &limits).expect("create the cgroup");
        let spec = KeeperSpec {
            cgroup_procs: cg.procs_files(),
            cgroup_join: cg.join(),
            cgroup_dirs: cg.removal_order(),
            ..KeeperSpec::default()
        };
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30").kill_on_drop(true);
        Keeper::new(spec).apply(&mut cmd);
        let mut keeper = cmd.spawn().expect("spawn under a keeper");
        let keeper_pid = keeper.id().expect("keeper pid");
        let child = child_of(keeper_pid).expect("the keeper's child");
        let in_ours = |pid: u32| -> Vec<String> {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.ends_with(cg.name()))
                .map(str::to_string)
                .collect()
        };
        let mine = in_ours(child);
        assert_eq!(
            mine.len(),
            cg.dirs().len(),
            "child {child} joined only {mine:?} of {:?}",
            cg.dirs()
        );
        if cg.cgroup_v2_id().is_some() || matches!(layout, CgroupLayout::V2 { .. }) {
            assert!(
                mine.iter().any(|l| l.starts_with("0::")),
                "not in the v2 cgroup: {mine:?}"
            );
        }
        assert!(in_ours(keeper_pid).is_empty(), "the keeper joined the VM cgroup");
        assert_eq!(cg.pids(), vec![child]);
        // The host's stop request: the keeper kills and reaps its child.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(keeper_pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal the keeper");
        let _ = keeper.wait().await;
        assert!(
            std::fs::metadata(format!("/proc/{child}")).is_err(),
            "child {child} left"
        );
        cg.remove().expect("remove the cgroup");
    }
}
