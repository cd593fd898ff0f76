//! Proof that the BPF LSM file policy holds: processes in a confined cgroup
//! cannot open protected files, the same opens from outside succeed.
//!
//! Run as root on a kernel with the BPF LSM active:
//! `cargo run -p neurovisor --example lsm_proof --features ebpf`.
//! Exits 0 when every expectation held, 1 when one did not, 2 when the proof
//! could not run (not root, BPF LSM inactive, no cgroup2), 3 when the kernel
//! refuses BPF LSM programs altogether: then the same decision code runs as a
//! dry run at ext4's fsync tracepoint (nothing is denied) and 3 means every
//! decision was right there.
//!
//! Children are plain `fork(2)`s that only make async-signal-safe calls
//! (write, open, close, _exit) with everything prepared beforehand, so the
//! result is the exact errno of one `open(2)` made inside the cgroup.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use neurovisor::security::ebpf::{BpfError, Cgroup2Dir, EbpfGuard, LsmMode};
use neurovisor::security::lsm;

/// Exit code of a child that could not join its cgroup.
const JOIN_FAILED: i32 = 200;

/// Exit code when the kernel refuses LSM programs but the dry run showed
/// every decision right.
const DRY_RUN_ONLY: u8 = 3;

/// How the policy is observed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The LSM hook is attached: protected opens fail with EPERM.
    Enforcing,
    /// The kernel refuses LSM programs: the same decision runs at ext4's
    /// fsync tracepoint and only counts what it would deny.
    DryRun,
}

fn main() -> ExitCode {
    // The library warns through tracing (e.g. why the file policy is off).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run() {
        Ok((Mode::Enforcing, true)) => {
            println!("\nRESULT: the file policy held in every case");
            ExitCode::SUCCESS
        }
        Ok((Mode::DryRun, true)) => {
            println!(
                "\nRESULT: NOT ENFORCED: this kernel refuses BPF LSM programs; every policy \
                 decision was right in the dry run, but nothing was denied"
            );
            ExitCode::from(DRY_RUN_ONLY)
        }
        Ok((_, false)) => {
            println!("\nRESULT: FAILED: the file policy did not hold (see [FAIL] lines)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("lsm_proof cannot run: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(Mode, bool), Box<dyn std::error::Error>> {
    println!("lsm_proof: BPF LSM `file_open` denies protected files to confined cgroups only\n");
    if !nix::unistd::Uid::effective().is_root() {
        return Err("must run as root (loads BPF programs, creates cgroups)".into());
    }
    if !lsm::bpf_lsm_status()? {
        return Err(lsm::enable_hint(&lsm::active_lsms()?).into());
    }

    let (mut guard, mode) = match EbpfGuard::load(LsmMode::Required) {
        Ok(guard) => (guard, Mode::Enforcing),
        Err(refused @ BpfError::LsmRefused { .. }) => {
            println!("{refused}\n");
            println!("falling back to a DRY RUN: the same decision code at the ext4 fsync tracepoint\n");
            let mut guard = EbpfGuard::load(LsmMode::IfActive)?;
            guard.attach_policy_dry_run()?;
            (guard, Mode::DryRun)
        }
        Err(e) => return Err(e.into()),
    };
    let scratch = tempfile::tempdir()?;
    let secret = scratch.path().join("secret.txt");
    std::fs::write(&secret, "protected file\n")?;
    let hard_link = scratch.path().join("secret-hardlink.txt");
    std::fs::hard_link(&secret, &hard_link)?;
    let state = scratch.path().join("state");
    std::fs::create_dir_all(state.join("vms/vm1"))?;
    let public = scratch.path().join("public.txt");
    std::fs::write(&public, "not protected\n")?;

    for path in [Path::new("/etc/shadow"), &secret, &state] {
        guard.protect_path(path)?;
        println!("protected: {}", path.display());
    }
    // Created after protect_path: covered because its parent directories are.
    let late = state.join("vms/vm1/console.log");
    std::fs::write(&late, "created after the policy\n")?;

    let cgroup = Cgroup2Dir::create(&format!("neurovisor-lsm-proof-{}", std::process::id()))?;
    let procs = cgroup.open_procs()?;
    guard.confine_cgroup(cgroup.id())?;
    println!(
        "confined cgroup {} (id {})\n",
        cgroup.path().display(),
        cgroup.id()
    );

    let mut ok = true;
    let mut expected_denials = 0;
    let denials_before = denials(&guard, mode)?;
    let cases: [(&Path, bool); 6] = [
        (Path::new("/etc/shadow"), true),
        (&secret, true),
        (&hard_link, true),
        (&state, true),
        (&late, true),
        (&public, false),
    ];
    for (path, protected) in cases {
        for inside in [true, false] {
            let before = denials(&guard, mode)?;
            let got = open_in_child(inside.then_some(&procs), path, mode == Mode::DryRun)?;
            let denied = denials(&guard, mode)? - before;
            let should_deny = protected && inside;
            expected_denials += u64::from(should_deny);
            let who = if inside {
                "child in confined cgroup"
            } else {
                "child outside the cgroup"
            };
            ok &= match mode {
                Mode::Enforcing => report(who, path, got, if should_deny { libc::EPERM } else { 0 }),
                Mode::DryRun => report_dry_run(who, path, got, denied, should_deny),
            };
        }
    }
    let own = open_here(Path::new("/etc/shadow"));
    ok &= report("this process (outside)", Path::new("/etc/shadow"), own, 0);

    let denied = denials(&guard, mode)? - denials_before;
    let counted = denied == expected_denials;
    println!(
        "\n[{}] {} counter rose by {denied} (expected {expected_denials})",
        if counted { " ok " } else { "FAIL" },
        if mode == Mode::DryRun {
            "dry-run denial"
        } else {
            "denial"
        }
    );
    ok &= counted;

    let syscalls = guard.release_cgroup(cgroup.id())?;
    println!(
        "released cgroup {} ({syscalls} syscalls counted while confined)",
        cgroup.id()
    );
    let before = denials(&guard, mode)?;
    let after = open_in_child(Some(&procs), Path::new("/etc/shadow"), mode == Mode::DryRun)?;
    let denied = denials(&guard, mode)? - before;
    ok &= match mode {
        Mode::Enforcing => report("child in released cgroup", Path::new("/etc/shadow"), after, 0),
        Mode::DryRun => report_dry_run(
            "child in released cgroup",
            Path::new("/etc/shadow"),
            after,
            denied,
            false,
        ),
    };

    drop(procs);
    drop(cgroup);
    Ok((mode, ok))
}

fn denials(guard: &EbpfGuard, mode: Mode) -> Result<u64, BpfError> {
    match mode {
        Mode::Enforcing => guard.denials(),
        Mode::DryRun => guard.dry_run_denials(),
    }
}

/// Dry run: the open itself must succeed (nothing enforces), and the policy
/// must have counted exactly one would-be denial for the protected cases.
fn report_dry_run(who: &str, path: &Path, got: i32, denied: u64, should_deny: bool) -> bool {
    let held = got == 0 && denied == u64::from(should_deny);
    println!(
        "[{}] {who:<26} open+fsync {:<42} -> {:<6} policy says {:<5} (expected {})",
        if held { " ok " } else { "FAIL" },
        path.display(),
        describe(got),
        if denied > 0 { "deny" } else { "allow" },
        if should_deny { "deny" } else { "allow" },
    );
    held
}

fn report(who: &str, path: &Path, got: i32, expected: i32) -> bool {
    let held = got == expected;
    println!(
        "[{}] {who:<26} open {:<48} -> {:<8} (expected {})",
        if held { " ok " } else { "FAIL" },
        path.display(),
        describe(got),
        describe(expected)
    );
    held
}

fn describe(code: i32) -> String {
    match code {
        0 => "opened".to_owned(),
        libc::EPERM => "EPERM".to_owned(),
        libc::EACCES => "EACCES".to_owned(),
        libc::ENOENT => "ENOENT".to_owned(),
        JOIN_FAILED => "child could not join the cgroup".to_owned(),
        other => format!("errno {other}"),
    }
}

/// 0 if this process can open `path` read-only, else the errno.
fn open_here(path: &Path) -> i32 {
    match File::open(path) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Forks a child that joins the cgroup behind `procs` (when given), opens
/// `path` read-only (and fsyncs it, for the dry run) and exits with 0 or the
/// errno.
fn open_in_child(procs: Option<&File>, path: &Path, fsync: bool) -> Result<i32, Box<dyn std::error::Error>> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let procs_fd = procs.map(AsRawFd::as_raw_fd);
    // SAFETY: the child only calls async-signal-safe functions (write, open,
    // fsync, close, _exit) on data prepared before the fork, then exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error().into()),
        0 => unsafe {
            if let Some(fd) = procs_fd {
                // "0" moves the writing process itself into the cgroup.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(JOIN_FAILED);
                }
            }
            let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                libc::_exit(*libc::__errno_location());
            }
            if fsync && libc::fsync(fd) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            libc::close(fd);
            libc::_exit(0);
        },
        pid => wait_exit_code(pid),
    }
}

fn wait_exit_code(pid: libc::pid_t) -> Result<i32, Box<dyn std::error::Error>> {
    let mut status = 0;
    // SAFETY: waiting for our own child; status is a valid out pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(std::io::Error::last_os_error().into());
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(format!("child {pid} did not exit normally (status {status:#x})").into())
    }
}
