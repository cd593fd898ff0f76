//! Proof that a VM cgroup's limits hold: `cargo run --example cgroups_demo` (as root).
//!
//! Creates a VM-style cgroup (64 MiB memory, 0.5 CPU, 16 tasks) on this host's
//! layout (v2, or v1/hybrid), runs real processes in it (this binary again, in
//! a child role, joined between fork and exec with `pre_exec_join`), and
//! measures:
//!
//! 1. memory: a child touching 256 MiB is OOM-killed; `oom_kills` goes up and
//!    the peak charge stays at the limit;
//! 2. CPU: a child spinning on two threads for ~2 s gets about 0.5 CPU
//!    (cgroup CPU accounting), and is throttled;
//! 3. pids: a fork loop stops at `pids.max`;
//!
//! then removes the cgroup (which kills what is left: the fork loop's
//! processes) and checks that no directory or process is left. Exits 1 when a
//! limit did not hold.

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use neurovisor::security::cgroups::{pre_exec_join, CgroupLayout, CgroupLimits, VmCgroup};

const MEMORY: u64 = 64 << 20;
const CPU_MILLIS: u64 = 500;
const PIDS: u64 = 16;

/// Child roles (this binary run again with `child <role>`).
fn child(role: &str) -> ExitCode {
    match role {
        "hog" => {
            // Touch 256 MiB page by page: far beyond the 64 MiB limit.
            let mut v = vec![0u8; 256 << 20];
            for i in (0..v.len()).step_by(4096) {
                v[i] = 1;
            }
            std::hint::black_box(&v);
            println!("survived");
            ExitCode::SUCCESS
        }
        "spin" => {
            let spin = || {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            };
            std::thread::spawn(spin);
            spin()
        }
        "forkloop" => {
            let mut n = 0u32;
            let err = loop {
                // SAFETY: single-threaded process; the child only calls pause().
                match unsafe { libc::fork() } {
                    -1 => break std::io::Error::last_os_error(),
                    0 => loop {
                        // SAFETY: async-signal-safe; waits for the SIGKILL of the cleanup.
                        unsafe { libc::pause() };
                    },
                    _ => n += 1,
                }
                if n > 10_000 {
                    break std::io::Error::other("no limit");
                }
            };
            println!("{n} {err}");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        _ => ExitCode::from(2),
    }
}

struct Checks {
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: String) {
        println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
    }
}

fn spawn(cg: &VmCgroup, role: &str) -> std::io::Result<Child> {
    let files = cg.procs_files();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["child", role])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: pre_exec_join only calls open/write/close.
    unsafe {
        cmd.pre_exec(move || pre_exec_join(&files));
    }
    cmd.spawn()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn memory(cg: &VmCgroup, c: &mut Checks) -> std::io::Result<()> {
    println!("1. memory: a child touches 256 MiB under a {} limit", mib(MEMORY));
    let before = cg.oom_kills().unwrap_or(0);
    let mut hog = spawn(cg, "hog")?;
    let status = hog.wait()?;
    let after = cg.oom_kills().unwrap_or(0);
    let peak = cg.memory_peak_bytes();
    println!(
        "   child ended with {status}; oom_kills {before} -> {after}; peak charge {}",
        peak.map(mib).unwrap_or_else(|| "n/a".into())
    );
    c.check(
        status.signal() == Some(9),
        "the child was killed with SIGKILL".into(),
    );
    c.check(after > before, "the cgroup's oom_kill count went up".into());
    if let Some(p) = peak {
        c.check(
            p <= MEMORY,
            format!("peak charge {} <= limit {}", mib(p), mib(MEMORY)),
        );
    }
    Ok(())
}

fn cpu(cg: &VmCgroup, c: &mut Checks) -> std::io::Result<()> {
    let window = Duration::from_secs(2);
    println!(
        "2. CPU: a child spins on 2 threads for {window:?} under a quota of {:.1} CPU",
        CPU_MILLIS as f64 / 1000.0
    );
    let mut spinner = spawn(cg, "spin")?;
    // Let it start, then measure a window.
    std::thread::sleep(Duration::from_millis(300));
    let (u0, t0, th0) = (
        cg.cpu_usage_usec(),
        Instant::now(),
        cg.cpu_throttled().unwrap_or(0),
    );
    std::thread::sleep(window);
    let (u1, elapsed, th1) = (cg.cpu_usage_usec(), t0.elapsed(), cg.cpu_throttled().unwrap_or(0));
    spinner.kill()?;
    spinner.wait()?;
    let (Some(u0), Some(u1)) = (u0, u1) else {
        c.check(false, "CPU usage is not accounted (no cpuacct / cpu.stat)".into());
        return Ok(());
    };
    let cpus = (u1 - u0) as f64 / 1e6 / elapsed.as_secs_f64();
    let quota = CPU_MILLIS as f64 / 1000.0;
    println!(
        "   {:.3} s of CPU in {:.3} s = {cpus:.3} CPU (quota {quota:.1}); throttled periods {th0} -> {th1}",
        (u1 - u0) as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    c.check(
        cpus <= quota * 1.1,
        format!("{cpus:.3} CPU <= 110 % of the quota"),
    );
    c.check(
        cpus >= quota * 0.4,
        format!("{cpus:.3} CPU: the spinner did run (>= 40 % of the quota)"),
    );
    c.check(th1 > th0, "the quota throttled it".into());
    Ok(())
}

fn pids(cg: &VmCgroup, c: &mut Checks) -> std::io::Result<(Vec<u32>, Child)> {
    println!("3. pids: a fork loop under pids.max = {PIDS}");
    let mut forker = spawn(cg, "forkloop")?;
    let mut line = String::new();
    if let Some(out) = forker.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let forked: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    let current = cg.pids_current().unwrap_or(0);
    let procs = cg.pids();
    println!(
        "   forked {forked} then: {}",
        line.trim().split_once(' ').map(|x| x.1).unwrap_or("")
    );
    println!("   pids.current {current}, {} processes listed", procs.len());
    c.check(
        forked == PIDS - 1,
        format!("{forked} forks + the forker = pids.max {PIDS}"),
    );
    c.check(current == PIDS, format!("pids.current {current} == pids.max"));
    // The forker and its children stay in: they are the cleanup's job.
    Ok((procs, forker))
}

fn gone(pid: u32) -> bool {
    // Dead, or a zombie waiting for its (re)parent.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("child") {
        return child(&args.next().unwrap_or_default());
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cgroups_demo needs root (it creates cgroups)");
        return ExitCode::FAILURE;
    }
    let layout = match CgroupLayout::detect() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("cgroup layout (from /proc/self/mountinfo): {layout:?}");
    let limits = CgroupLimits {
        memory_bytes: MEMORY,
        cpu_millis: CPU_MILLIS,
        pids_max: PIDS,
    };
    let id = format!("demo-{}", uuid::Uuid::now_v7().simple());
    let cg = match VmCgroup::create(&layout, &id, &limits) {
        Ok(cg) => cg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let dirs = cg.dirs().to_vec();
    println!("created {} in:", cg.name());
    for d in &dirs {
        println!("  {}", d.display());
    }
    println!(
        "cgroup v2 id (for bpf_get_current_cgroup_id): {:?}",
        cg.cgroup_v2_id()
    );
    let mut c = Checks { failed: 0 };

    if let Err(e) = memory(&cg, &mut c) {
        c.check(false, format!("memory: {e}"));
    }
    if let Err(e) = cpu(&cg, &mut c) {
        c.check(false, format!("cpu: {e}"));
    }
    let (left, forker) = match pids(&cg, &mut c) {
        Ok((p, f)) => (p, Some(f)),
        Err(e) => {
            c.check(false, format!("pids: {e}"));
            (Vec::new(), None)
        }
    };

    println!("4. cleanup: remove() with {} processes still inside", left.len());
    let started = Instant::now();
    let r = cg.remove();
    println!("   remove took {:?}: {r:?}", started.elapsed());
    c.check(r.is_ok(), "remove succeeded".into());
    c.check(
        dirs.iter().all(|d| !Path::new(d).exists()),
        "no cgroup directory is left".into(),
    );
    if let Some(mut f) = forker {
        let st = f.wait();
        c.check(
            st.as_ref().is_ok_and(|s| s.signal() == Some(9)),
            format!("the fork loop was killed by the cleanup ({st:?})"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.iter().all(|p| gone(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive: Vec<u32> = left.iter().copied().filter(|p| !gone(*p)).collect();
    c.check(
        alive.is_empty(),
        format!("every process of the cgroup is dead (alive: {alive:?})"),
    );

    if c.failed == 0 {
        println!("cgroup limits held: all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("cgroup limits did NOT hold: {} check(s) failed", c.failed);
        ExitCode::FAILURE
    }
}
