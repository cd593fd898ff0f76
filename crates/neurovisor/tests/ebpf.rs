//! The eBPF layer against the running kernel (cargo feature `ebpf`): the
//! syscall counter attributes calls to the right cgroup, and the file policy
//! denies protected opens to confined cgroups only, enforced through the BPF
//! LSM where the kernel allows it and checked as a dry run (the same decision
//! code at ext4's fsync tracepoint) everywhere.
//!
//! Needs root; each test prints why it skipped when the host cannot run it
//! (not root, no cgroup2, BPF LSM inactive or refused, not ext4).
//!
//! Children are plain `fork(2)`s that only make async-signal-safe calls on
//! data prepared before the fork, so the test harness's threads are no
//! hazard and the results are exact errnos and syscall counts.
#![cfg(feature = "ebpf")]

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

mod common;

use neurovisor::security::ebpf::{BpfError, Cgroup2Dir, EbpfGuard, LsmMode};
use neurovisor::security::lsm;

/// Exit code of a child that could not join its cgroup.
const JOIN_FAILED: i32 = 200;

fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A cgroup v2 directory unique to this test run.
fn cgroup(test: &str) -> Cgroup2Dir {
    Cgroup2Dir::create(&format!("neurovisor-test-{}-{test}", std::process::id()))
        .expect("create a cgroup v2 directory")
}

/// Forks a child that joins the cgroup behind `procs` (when given) and runs
/// `body`, which must only make async-signal-safe calls; returns its exit code.
fn in_child(procs: Option<RawFd>, body: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child writes to an fd, runs `body` (async-signal-safe by
    // contract) and leaves with _exit, never returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        unsafe {
            if let Some(fd) = procs {
                // "0" moves the writing process itself into the cgroup.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(JOIN_FAILED);
                }
            }
            libc::_exit(body());
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Child body: open `path` read-only, optionally fsync it; 0 or the errno.
fn open_body(path: &CString, fsync: bool) -> impl FnOnce() -> i32 + '_ {
    move || unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return *libc::__errno_location();
        }
        if fsync && libc::fsync(fd) != 0 {
            return *libc::__errno_location();
        }
        libc::close(fd);
        0
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("no NUL in path")
}

#[test]
fn syscalls_are_counted_for_the_confined_cgroup_only() {
    const TEST: &str = "syscalls_are_counted_for_the_confined_cgroup_only";
    const CALLS: u64 = 20_000;
    if !is_root() {
        return skip(TEST, "needs root");
    }
    let mut guard = EbpfGuard::load(LsmMode::IfActive).expect("load the eBPF guard");
    let tracked = cgroup("count-tracked");
    let untracked = cgroup("count-untracked");
    guard.confine_cgroup(tracked.id()).expect("confine");
    assert_eq!(guard.syscall_count(tracked.id()).expect("count"), 0);

    let getppid_loop = || {
        for _ in 0..CALLS {
            // SAFETY: a raw getppid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        0
    };
    let procs = tracked.open_procs().expect("cgroup.procs");
    assert_eq!(in_child(Some(procs.as_raw_fd()), getppid_loop), 0);
    let counted = guard.syscall_count(tracked.id()).expect("count");
    assert!(
        (CALLS..CALLS + 100).contains(&counted),
        "{counted} syscalls counted for {CALLS} getppid() calls"
    );

    let procs = untracked.open_procs().expect("cgroup.procs");
    assert_eq!(in_child(Some(procs.as_raw_fd()), getppid_loop), 0);
    assert_eq!(guard.syscall_count(untracked.id()).expect("count"), 0);
    assert_eq!(guard.syscall_count(tracked.id()).expect("count"), counted);
    assert_eq!(
        guard.syscall_counts().expect("all counts"),
        vec![(tracked.id(), counted)]
    );

    // Confining again keeps the running count.
    guard.confine_cgroup(tracked.id()).expect("confine again");
    assert_eq!(guard.syscall_count(tracked.id()).expect("count"), counted);
    assert_eq!(guard.release_cgroup(tracked.id()).expect("release"), counted);
    assert_eq!(guard.syscall_count(tracked.id()).expect("count"), 0);
    assert!(guard.syscall_counts().expect("all counts").is_empty());
}

#[test]
fn refuses_to_confine_the_root_cgroup() {
    if !is_root() {
        return skip("refuses_to_confine_the_root_cgroup", "needs root");
    }
    let mut guard = EbpfGuard::load(LsmMode::IfActive).expect("load the eBPF guard");
    let err = guard.confine_cgroup(1).expect_err("root cgroup");
    assert!(matches!(err, BpfError::RefusedCgroup { id: 1, .. }), "{err}");
    assert!(guard.syscall_counts().expect("counts").is_empty());
}

/// The files of one policy scenario: protected ones (a file, its hard link,
/// a directory, a file created below it afterwards) and a public one.
struct Scenario {
    _scratch: tempfile::TempDir,
    protected: Vec<PathBuf>,
    public: PathBuf,
}

fn scenario(guard: &mut EbpfGuard) -> Scenario {
    let scratch = tempfile::tempdir().expect("tempdir");
    let secret = scratch.path().join("secret");
    std::fs::write(&secret, "x").expect("write");
    let link = scratch.path().join("secret-link");
    std::fs::hard_link(&secret, &link).expect("hard link");
    let state = scratch.path().join("state");
    std::fs::create_dir_all(state.join("a/b")).expect("mkdir");
    let public = scratch.path().join("public");
    std::fs::write(&public, "x").expect("write");
    for path in [Path::new("/etc/shadow"), &secret, &state] {
        guard.protect_path(path).expect("protect");
    }
    let late = state.join("a/b/late");
    std::fs::write(&late, "created after protect_path").expect("write");
    Scenario {
        protected: vec!["/etc/shadow".into(), secret, link, state, late],
        public,
        _scratch: scratch,
    }
}

#[test]
fn file_policy_denies_protected_opens_to_confined_cgroups() {
    const TEST: &str = "file_policy_denies_protected_opens_to_confined_cgroups";
    if !is_root() {
        return skip(TEST, "needs root");
    }
    match lsm::bpf_lsm_status() {
        Ok(true) => {}
        Ok(false) => {
            let active = lsm::active_lsms().unwrap_or_default();
            return skip(TEST, &lsm::enable_hint(&active));
        }
        Err(e) => return skip(TEST, &e.to_string()),
    }
    let mut guard = match EbpfGuard::load(LsmMode::Required) {
        Ok(guard) => guard,
        // Only the kernel's blanket refusal is a reason to skip; a verifier
        // rejection of our program is a failure.
        Err(e @ BpfError::LsmRefused { .. }) => return skip(TEST, &e.to_string()),
        Err(e) => panic!("load the eBPF guard: {e}"),
    };
    assert!(guard.lsm_enforcing());
    let files = scenario(&mut guard);
    let confined = cgroup("lsm-confined");
    guard.confine_cgroup(confined.id()).expect("confine");
    let procs = confined.open_procs().expect("cgroup.procs");

    let before = guard.denials().expect("denials");
    for path in &files.protected {
        let p = c_path(path);
        let inside = in_child(Some(procs.as_raw_fd()), open_body(&p, false));
        assert_eq!(inside, libc::EPERM, "confined open of {}", path.display());
        let outside = in_child(None, open_body(&p, false));
        assert_eq!(outside, 0, "unconfined open of {}", path.display());
    }
    let public = c_path(&files.public);
    assert_eq!(in_child(Some(procs.as_raw_fd()), open_body(&public, false)), 0);
    let denied = guard.denials().expect("denials") - before;
    assert_eq!(denied, files.protected.len() as u64);

    guard.release_cgroup(confined.id()).expect("release");
    let shadow = c_path(Path::new("/etc/shadow"));
    assert_eq!(in_child(Some(procs.as_raw_fd()), open_body(&shadow, false)), 0);
}

#[test]
fn file_policy_decisions_are_right_in_a_dry_run() {
    const TEST: &str = "file_policy_decisions_are_right_in_a_dry_run";
    if !is_root() {
        return skip(TEST, "needs root");
    }
    let mut guard = EbpfGuard::load(LsmMode::IfActive).expect("load the eBPF guard");
    if let Err(e) = guard.attach_policy_dry_run() {
        return skip(TEST, &format!("ext4 fsync tracepoint unavailable: {e}"));
    }
    let files = scenario(&mut guard);
    let ext4 = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::EXT4_SUPER_MAGIC)
            .unwrap_or(false)
    };
    if !files.protected.iter().all(|p| ext4(p)) {
        return skip(TEST, "the test files are not all on ext4");
    }
    let confined = cgroup("dry-confined");
    guard.confine_cgroup(confined.id()).expect("confine");
    let procs = confined.open_procs().expect("cgroup.procs");

    let procs_fd = procs.as_raw_fd();
    let check = |guard: &EbpfGuard, path: &Path, inside: bool, should_deny: bool| {
        let p = c_path(path);
        let before = guard.dry_run_denials().expect("dry-run denials");
        // Nothing enforces in a dry run: the open itself must succeed.
        let code = in_child(inside.then_some(procs_fd), open_body(&p, true));
        assert_eq!(code, 0, "{}", path.display());
        let denied = guard.dry_run_denials().expect("dry-run denials") - before;
        assert_eq!(
            denied,
            u64::from(should_deny),
            "{} (confined: {inside})",
            path.display()
        );
    };
    for path in &files.protected {
        check(&guard, path, true, true);
        check(&guard, path, false, false);
    }
    check(&guard, &files.public, true, false);

    guard.release_cgroup(confined.id()).expect("release");
    check(&guard, Path::new("/etc/shadow"), true, false);
}

/// A daemon built with the feature loads the guard, confines each VM's cgroup
/// and reports the syscalls of finished VMs on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_counts_each_vms_syscalls() {
    if !is_root() {
        return skip("the_daemon_counts_each_vms_syscalls", "needs root");
    }
    let d = common::daemon::start_daemon(&["--warm", "1", "--max", "2"]);
    d.wait_warm(1);
    let mut c = d.client().await;
    let r = c
        .execute_once(common::daemon::req("python", "print(1)"))
        .await
        .expect("execute")
        .into_inner();
    assert_eq!(&r.stdout[..], b"1\n");
    // The VM is destroyed after the response; its count lands then.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let count = loop {
        let (_, m) = common::daemon::http_get(&d.metrics, "/metrics");
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("neurovisor_vmm_syscalls_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if n > 0 || std::time::Instant::now() > until {
            break n;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(count > 1000, "a VM's QEMU made only {count} counted syscalls");
    assert_eq!(d.stop(), Some(0));
}
