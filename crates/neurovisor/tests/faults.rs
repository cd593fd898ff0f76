//! Fault paths of the VM lifecycle, with real VMs and the real binary:
//! SIGKILL of `run` at random points (boot, execution, teardown), SIGKILL of
//! `serve` with warm and busy VMs, no zombie after a normal `run`, and jail
//! uids that differ across concurrent `neurovisor` processes.
//!
//! "A process of the VM" is QEMU or `vhost-device-vsock` (found by the VM
//! directory in their `argv[0]`) or its keeper (`nv-keeper`, a child of the
//! `neurovisor` process). A zombie still has its `/proc/<pid>`, so "gone"
//! below means reaped, not only dead.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_no_leftovers, daemon::start_daemon_in};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long after a SIGKILL every VM process (QEMU, vhost) must be reaped and
/// its cgroups gone.
const VM_GONE: Duration = Duration::from_secs(2);
/// Cgroups go once the killed owner's last thread has exited, which a keeper
/// waits for (up to 2 s: `OWNER_EXIT_MS`), then its rmdir retries.
const CGROUPS_GONE: Duration = Duration::from_secs(4);
/// Keepers outlive their VM process by a moment and are then reaped by PID 1
/// (their parent is gone), which on these machines takes 1-2 s.
const KEEPER_GONE: Duration = Duration::from_secs(6);

#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    comm: String,
}

fn stat_of(pid: u32) -> Option<(String, char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// VM processes of `state` (argv[0] names the VM directory) and keepers
/// whose parent is `owner`.
fn vm_processes(state: &Path, owner: Option<u32>) -> Vec<Proc> {
    let needle = state.display().to_string();
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let (comm, _, ppid) = stat_of(pid)?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mentions = String::from_utf8_lossy(&cmd).contains(&needle);
            let keeper = comm == "nv-keeper" && Some(ppid) == owner;
            (mentions && pid != std::process::id() && Some(pid) != owner || keeper)
                .then_some(Proc { pid, comm })
        })
        .collect()
}

fn present(p: &Proc) -> bool {
    // Same pid and command name: not a reused pid.
    stat_of(p.pid).is_some_and(|(comm, _, _)| comm == p.comm)
}

/// The VM ids with a directory under `state/vms`.
fn vm_ids(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Cgroup directories of these VMs, in any hierarchy.
fn cgroups_of(ids: &[String]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for id in ids {
            for base in [
                root.path().join("neurovisor"),
                PathBuf::from("/sys/fs/cgroup/neurovisor"),
            ] {
                let d = base.join(format!("vm-{id}"));
                if d.exists() && !found.contains(&d) {
                    found.push(d);
                }
            }
        }
    }
    found
}

/// Waits until `done` holds or `limit` passes; returns how long it took.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if done() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cli(state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_neurovisor"));
    c.args(args)
        .env("NEUROVISOR_STATE_DIR", state)
        .env("NEUROVISOR_LOCAL", "true")
        .env_remove("NEUROVISOR_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Reads a child's stdout in the background; the flag is set at the first line.
fn watch_output(child: &mut Child) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    if let Some(out) = child.stdout.take() {
        let f = flag.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if lines.next().is_some() {
                f.store(true, Ordering::SeqCst);
            }
            for _ in lines {}
        });
    }
    flag
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn sigkill_of_run_at_30_points_leaves_no_vm_process_zombie_or_cgroup() {
    let state = tempfile::Builder::new()
        .prefix("nvkill-")
        .tempdir()
        .expect("state");
    let rounds = 32;
    // Every third round aims at boot (a random moment after spawn), at the
    // execution (a random moment after the program's first line) or at
    // teardown (just after the last line of a program that then exits).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("seed {seed}");
    let mut rng = seed | 1;
    let mut random_ms = |max: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_millis(rng % max.max(1))
    };
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut vm_worst, mut keeper_worst) = (Duration::ZERO, Duration::ZERO);
    for i in 0..rounds {
        let aim = ["boot", "execution", "teardown"][i % 3];
        let (code, delay) = match aim {
            "boot" => ("print('up', flush=True)", random_ms(1500)),
            "execution" => (
                "import time; print('up', flush=True); time.sleep(2)",
                random_ms(1500),
            ),
            _ => ("print('up', flush=True)", random_ms(80)),
        };
        let mut child = cli(
            state.path(),
            &["run", "--size", "small", "--lang", "python", "-c", code],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
        let owner = child.id();
        let printed = watch_output(&mut child);
        let mut seen: BTreeMap<u32, Proc> = BTreeMap::new();
        let mut t0 = Instant::now();
        let mut waiting_for_output = aim != "boot";
        let mut exited = false;
        while waiting_for_output || t0.elapsed() < delay {
            for p in vm_processes(state.path(), Some(owner)) {
                seen.entry(p.pid).or_insert(p);
            }
            if child.try_wait().expect("try_wait").is_some() {
                exited = true;
                break;
            }
            if waiting_for_output && printed.load(Ordering::SeqCst) {
                waiting_for_output = false;
                t0 = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let phase = if exited {
            "after exit"
        } else if printed.load(Ordering::SeqCst) {
            if aim == "teardown" {
                "teardown"
            } else {
                "execution"
            }
        } else if seen.values().any(|p| p.comm.starts_with("qemu")) {
            "boot"
        } else {
            "before boot"
        };
        *phases.entry(phase).or_default() += 1;
        let ids = vm_ids(state.path());
        if !exited {
            kill(Pid::from_raw(owner as i32), Signal::SIGKILL).expect("kill run");
        }
        child.wait().expect("reap run");
        for p in vm_processes(state.path(), None) {
            seen.entry(p.pid).or_insert(p);
        }
        let (vms, keepers): (Vec<Proc>, Vec<Proc>) = seen.into_values().partition(|p| p.comm != "nv-keeper");
        // Killed between the cgroup's creation and the first keeper's start
        // (nothing of ours is alive to remove it): the next run removes it.
        let before_keepers = keepers.is_empty() && vms.is_empty();
        if before_keepers && !cgroups_of(&ids).is_empty() {
            *phases.entry("cgroup before any keeper").or_default() += 1;
        }
        let vm_time = wait_until(VM_GONE, || !vms.iter().any(present)).and_then(|t| {
            let cgroups = wait_until(CGROUPS_GONE, || before_keepers || cgroups_of(&ids).is_empty());
            cgroups.map(|c| t + c)
        });
        let Some(vm_time) = vm_time else {
            let left: Vec<_> = vms
                .iter()
                .filter(|p| present(p))
                .map(|p| (p, stat_of(p.pid)))
                .collect();
            panic!(
                "round {i} ({phase}, killed at {delay:?}): VM processes {left:?} or cgroups {:?} still there ({VM_GONE:?}, {CGROUPS_GONE:?}) after SIGKILL",
                cgroups_of(&ids)
            );
        };
        let keeper_time = wait_until(KEEPER_GONE, || !keepers.iter().any(present))
            .unwrap_or_else(|| panic!("round {i}: keepers {keepers:?} not reaped within {KEEPER_GONE:?}"));
        vm_worst = vm_worst.max(vm_time);
        keeper_worst = keeper_worst.max(keeper_time);
        println!(
            "round {i:2}: killed {:>7} after {} ({phase}): VM processes {} gone in {}, keepers {} in {}",
            ms(delay),
            if aim == "boot" { "spawn" } else { "output" },
            vms.len(),
            ms(vm_time),
            keepers.len(),
            ms(keeper_time)
        );
    }
    println!(
        "phases: {phases:?}; worst: VM processes {}, keepers {}",
        ms(vm_worst),
        ms(keeper_worst)
    );
    assert!(
        phases.get("boot").copied().unwrap_or(0) >= 3,
        "too few kills during boot: {phases:?}"
    );
    assert!(
        phases.get("execution").copied().unwrap_or(0) >= 3,
        "too few kills during execution: {phases:?}"
    );
    // The next run removes what the killed ones left (their directories).
    std::thread::sleep(Duration::from_millis(600));
    let o = cli(
        state.path(),
        &["run", "--size", "small", "--lang", "bash", "-c", "echo fine"],
    )
    .output()
    .expect("run");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "fine");
    assert_no_leftovers(state.path());
    let leaked = common::unowned_vm_cgroups();
    assert!(leaked.is_empty(), "VM cgroups left with no owner: {leaked:?}");
}

#[test]
fn a_finished_run_has_reaped_every_process_of_its_vm() {
    let state = tempfile::Builder::new()
        .prefix("nvreap-")
        .tempdir()
        .expect("state");
    for code in [
        "print(1)",
        "import sys; sys.exit(3)",
        "import os; os.kill(os.getpid(), 9)",
    ] {
        let mut child = cli(
            state.path(),
            &["run", "--size", "small", "--lang", "python", "-c", code],
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn run");
        let owner = child.id();
        let mut seen: BTreeMap<u32, Proc> = BTreeMap::new();
        while child.try_wait().expect("try_wait").is_none() {
            for p in vm_processes(state.path(), Some(owner)) {
                seen.entry(p.pid).or_insert(p);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            seen.values().any(|p| p.comm.starts_with("qemu")) && seen.values().any(|p| p.comm == "nv-keeper"),
            "saw the VM's processes while it ran: {seen:?}"
        );
        // No grace period: the CLI has returned, so everything must be reaped.
        let left: Vec<_> = seen
            .values()
            .filter(|p| present(p))
            .map(|p| (p, stat_of(p.pid)))
            .collect();
        assert!(left.is_empty(), "after `run` returned ({code}): {left:?}");
    }
    assert_no_leftovers(state.path());
}

#[test]
fn sigkill_of_serve_kills_its_warm_and_busy_vms_and_the_next_start_cleans_up() {
    let state = Arc::new(
        tempfile::Builder::new()
            .prefix("nvdkill-")
            .tempdir()
            .expect("state"),
    );
    let d = start_daemon_in(state.clone(), &["--warm", "2", "--max", "4"]);
    d.wait_warm(2);
    // Two busy VMs: clients of the daemon running long programs.
    let mut clients: Vec<Child> = (0..2)
        .map(|_| {
            let mut c = cli(
                state.path(),
                &[
                    "run",
                    "--addr",
                    &d.addr(),
                    "--lang",
                    "python",
                    "-c",
                    "import time; print('busy', flush=True); time.sleep(60)",
                ],
            );
            c.env_remove("NEUROVISOR_LOCAL").stdout(Stdio::piped());
            c.spawn().expect("client")
        })
        .collect();
    let busy: Vec<_> = clients.iter_mut().map(watch_output).collect();
    assert!(
        wait_until(Duration::from_secs(60), || busy
            .iter()
            .all(|b| b.load(Ordering::SeqCst)))
        .is_some(),
        "both clients running"
    );
    d.wait_warm(2);
    // The clients mention the state directory too (`--addr unix:<state>/...`):
    // they are ours to reap, not the daemon's VMs.
    let client_pids: Vec<u32> = clients.iter().map(|c| c.id()).collect();
    let procs: Vec<Proc> = vm_processes(state.path(), Some(d.pid() as u32))
        .into_iter()
        .filter(|p| !client_pids.contains(&p.pid))
        .collect();
    let qemus = procs.iter().filter(|p| p.comm.starts_with("qemu")).count();
    assert!(qemus >= 4, "2 warm + 2 busy VMs: {procs:?}");
    let ids = vm_ids(&state.path().join("daemon"));
    d.signal(Signal::SIGKILL);
    drop(d); // reaps the daemon
    let (vms, keepers): (Vec<Proc>, Vec<Proc>) = procs.into_iter().partition(|p| p.comm != "nv-keeper");
    let took = wait_until(VM_GONE, || !vms.iter().any(present))
        .unwrap_or_else(|| panic!("VM processes alive {VM_GONE:?} after the daemon's SIGKILL: {vms:?}"));
    println!(
        "{} VM processes of the killed daemon reaped in {}",
        vms.len(),
        ms(took)
    );
    wait_until(KEEPER_GONE, || !keepers.iter().any(present)).expect("keepers reaped");
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Keepers removed the cgroups of the killed daemon's VMs.
    assert!(
        cgroups_of(&ids).is_empty(),
        "cgroups left: {:?}",
        cgroups_of(&ids)
    );
    // The next daemon removes the directories.
    let d2 = start_daemon_in(state.clone(), &["--warm", "0", "--max", "1"]);
    assert_eq!(
        std::fs::read_dir(state.path().join("daemon/vms"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "leftovers removed before serving"
    );
    assert_eq!(d2.stop(), Some(0));
}

#[test]
fn concurrent_neurovisor_processes_give_their_vms_distinct_jail_uids() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: jails need root");
        return;
    }
    let states: Vec<tempfile::TempDir> = (0..2)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("nvuid-")
                .tempdir()
                .expect("state")
        })
        .collect();
    let mut children: Vec<Child> = states
        .iter()
        .map(|s| {
            cli(
                s.path(),
                &[
                    "run",
                    "--size",
                    "small",
                    "--lang",
                    "bash",
                    "-c",
                    "echo up; sleep 4",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
        })
        .collect();
    let up: Vec<_> = children.iter_mut().map(watch_output).collect();
    if wait_until(Duration::from_secs(120), || {
        up.iter().all(|u| u.load(Ordering::SeqCst))
    })
    .is_none()
    {
        let errs: Vec<String> = children
            .iter_mut()
            .map(|c| {
                let _ = c.kill();
                let _ = c.wait();
                let mut e = String::new();
                if let Some(mut s) = c.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut s, &mut e);
                }
                e
            })
            .collect();
        panic!("both runs did not start within 120 s; their stderr: {errs:?}");
    }
    let uid_of = |p: &Proc| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .expect("uid")
    };
    let uids: Vec<Vec<u32>> = states
        .iter()
        .map(|s| {
            vm_processes(s.path(), None)
                .iter()
                .filter(|p| p.comm != "nv-keeper")
                .map(uid_of)
                .collect()
        })
        .collect();
    println!("jail uids: {uids:?}");
    for c in &mut children {
        assert!(c.wait().expect("wait").success());
    }
    assert!(
        uids.iter()
            .all(|u| u.len() == 2 && u.iter().all(|&id| id >= 1_000_000_000)),
        "{uids:?}"
    );
    assert!(
        uids[0].iter().all(|u| !uids[1].contains(u)),
        "the two runs share a uid: {uids:?}"
    );
    for s in &states {
        assert_no_leftovers(s.path());
    }
}
