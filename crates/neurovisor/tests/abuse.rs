//! The abuse suite: hostile programs in real VMs behind a confined daemon.
//! Each case states what must hold on the host afterwards; between cases the
//! daemon must still serve an ordinary request, and after the suite nothing of
//! its VMs (process, cgroup, socket, directory) is left.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon, Daemon};
use neurovisor::security::caps::{mask, vm_role_caps};
use neurovisor_proto::v1::{ExecuteRequest, ExecuteResult};

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn run(d: &Daemon, r: ExecuteRequest) -> ExecuteResult {
    let mut c = d.client().await;
    c.execute_once(r).await.expect("execute_once").into_inner()
}

fn with(lang: &str, code: &str, timeout_ms: u32) -> ExecuteRequest {
    ExecuteRequest {
        timeout_ms,
        ..req(lang, code)
    }
}

async fn still_serving(d: &Daemon, after: &str) {
    let r = run(d, req("python", "print(6 * 7)")).await;
    assert_eq!(&r.stdout[..], b"42\n", "daemon stopped serving after {after}");
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&s, "VmRSS:")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => n += dir_bytes(&e.path()),
            Ok(m) => n += m.len(),
            Err(_) => {}
        }
    }
    n
}

/// Every VM cgroup directory of `vm_id` on this host.
fn cgroup_dirs(vm_id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for base in [
            h.path().join("neurovisor"),
            std::path::PathBuf::from("/sys/fs/cgroup/neurovisor"),
        ] {
            let p = base.join(format!("vm-{vm_id}"));
            if p.exists() {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_programs_leave_the_host_intact() {
    let d = start_daemon(&["--warm", "1", "--max", "2"]);
    d.wait_warm(1);
    let mut vm_ids = Vec::new();
    let rss_before = rss_kib(d.pid());

    // Fork bomb: stopped by the guest's process limit and the wall clock.
    let t = Instant::now();
    let r = run(&d, with("bash", ":(){ :|:& };:", 5000)).await;
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "fork bomb took {:?}",
        t.elapsed()
    );
    vm_ids.push(r.vm_id.clone());
    still_serving(&d, "a fork bomb").await;

    // Memory bomb beyond guest RAM: an OOM kill inside the VM, reported as such.
    let r = run(
        &d,
        with(
            "python",
            "b = []\nwhile True:\n    b.append(bytearray(32 << 20))",
            30_000,
        ),
    )
    .await;
    let res = r.clone();
    assert!(
        res.oom_killed || String::from_utf8_lossy(&r.stderr).contains("MemoryError"),
        "memory bomb not stopped by OOM: {res:?} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    vm_ids.push(res.vm_id);
    still_serving(&d, "a memory bomb").await;

    // Disk fill: the guest sees ENOSPC on its capped writable layer.
    let r = run(
        &d,
        with("bash", "head -c 4G /dev/zero > /tmp/fill; echo rc=$?", 60_000),
    )
    .await;
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("No space left on device"), "disk fill: {err}");
    // The guest's writable layer is RAM-backed in the guest: the host's disk
    // holds only the VM's logs and sockets.
    let used = dir_bytes(d.state.path());
    assert!(
        used < 16 << 20,
        "the state dir grew to {used} bytes during a disk fill"
    );
    still_serving(&d, "a disk fill").await;

    // Many small files: ends (inode or space limit, or the clock), host untouched.
    let r = run(
        &d,
        with(
            "python",
            "import os\nn = 0\ntry:\n    while n < 1_000_000:\n        open(f'/tmp/f{n}', 'w').close(); n += 1\nexcept OSError as e:\n    print('stopped', e.errno)\nprint(n)",
            20_000,
        ),
    )
    .await;
    assert!(!r.vm_id.is_empty(), "many files: no result");
    still_serving(&d, "a million small files").await;

    // Output flood on both streams: truncated with a marker, daemon memory flat.
    let r = run(
        &d,
        ExecuteRequest {
            max_output_bytes: 256 << 10,
            ..with(
                "bash",
                "yes AAAAAAAAAAAAAAA | head -c 3G & yes BBBBBBBBBBBBBBBB | head -c 3G >&2; wait",
                15_000,
            )
        },
    )
    .await;
    let res = &r;
    assert!(
        res.stdout_truncated && res.stderr_truncated,
        "flood not truncated: {res:?}"
    );
    assert!(r.stdout.len() <= (256 << 10) + 4096 && r.stderr.len() <= (256 << 10) + 4096);
    let growth = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024,
        "daemon RSS grew by {growth} KiB during the flood"
    );
    still_serving(&d, "an output flood").await;

    // CPU spin and sleep inf: killed at the wall-clock limit.
    for (lang, code) in [("python", "while True:\n    pass"), ("bash", "sleep inf")] {
        let t = Instant::now();
        let r = run(&d, with(lang, code, 2000)).await;
        let res = r;
        assert!(res.timed_out, "{code}: not timed out: {res:?}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{code}: took {:?}",
            t.elapsed()
        );
    }
    still_serving(&d, "a CPU spin and sleep inf").await;

    // vsock: nothing on the host CID nor any other CID answers the guest.
    let scan = r#"
import socket
reached = []
# Unanswered connects wait for the timeout: a sample of ports, not all 2^32.
targets = [(2, p) for p in list(range(0, 64)) + list(range(5995, 6005)) + [8080, 9090, 50051]]
targets += [(cid, p) for cid in (4, 100, 4096) for p in (22, 6000, 6001)]
for cid, port in targets:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect((cid, port))
        reached.append((cid, port))
    except OSError:
        pass
    finally:
        s.close()
print("tried", len(targets), "reached", reached)
"#;
    let r = run(&d, with("python", scan, 120_000)).await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("reached []"),
        "vsock scan: {out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    still_serving(&d, "a vsock scan").await;

    // Guest kernel surface and host files.
    let secret = format!("/tmp/nv-host-secret-{}", uuid::Uuid::new_v4());
    std::fs::write(&secret, "host only").expect("write secret");
    let probe = format!(
        r#"
for f in /dev/mem /dev/kmem /dev/port /dev/kvm /proc/modules /proc/kcore {secret}; do test -e $f && echo "PRESENT $f"; done
python3 - <<'EOF'
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for name, nr in (("kexec_load", 246), ("init_module", 175), ("finit_module", 313)):
    r = libc.syscall(nr, 0, 0, 0, 0)
    print(name, r, ctypes.get_errno())
EOF
ls /sys/class/net
grep -E ' (9p|virtiofs|nfs|cifs) ' /proc/mounts && echo SHARED-FS
true"#
    );
    let r = run(&d, with("bash", &probe, 30_000)).await;
    let _ = std::fs::remove_file(&secret);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        !out.contains("PRESENT") && !out.contains("SHARED-FS"),
        "guest surface: {out}"
    );
    for name in ["kexec_load", "init_module", "finit_module"] {
        assert!(
            out.contains(&format!("{name} -1 ")),
            "{name} worked in the guest: {out}"
        );
    }
    let nets: Vec<&str> = out
        .lines()
        .filter(|l| *l == "lo" || l.starts_with("eth"))
        .collect();
    assert!(
        !nets.iter().any(|n| n.starts_with("eth")),
        "guest has a network device: {out}"
    );
    still_serving(&d, "the kernel-surface probes").await;

    vm_ids.retain(|v| !v.is_empty());
    assert_eq!(d.stop(), Some(0));
    for id in vm_ids {
        assert!(
            cgroup_dirs(&id).is_empty(),
            "cgroup of VM {id} left: {:?}",
            cgroup_dirs(&id)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_daemon_thread_and_vmm_process_is_confined() {
    if !root() {
        eprintln!("skipped: confinement needs root");
        return;
    }
    let d = start_daemon(&["--warm", "1", "--max", "2"]);
    d.wait_warm(1);
    let pid = d.pid();
    let vm_mask = format!("{:016x}", mask(&vm_role_caps(false, false, false)));
    let mut roles = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status_field(&s, "Name:");
        assert_eq!(
            status_field(&s, "Seccomp:"),
            "2",
            "thread {name} has no filter:\n{s}"
        );
        assert_eq!(status_field(&s, "NoNewPrivs:"), "1", "thread {name}");
        let want = if name == "nv-vm" {
            vm_mask.as_str()
        } else {
            "0000000000000000"
        };
        for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "CapInh:"] {
            let want = if set == "CapAmb:" || set == "CapInh:" {
                "0000000000000000"
            } else {
                want
            };
            assert_eq!(status_field(&s, set), want, "thread {name} {set}");
        }
        *roles.entry(name).or_insert(0) += 1;
    }
    assert!(
        roles.contains_key("nv-vm") && roles.contains_key("nv-api"),
        "{roles:?}"
    );

    let state = d.state.path().display().to_string();
    let daemon_ns = |ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
    let mut seen = 0;
    for p in common::processes_mentioning(&state) {
        let Some((pid_str, _)) = p.split_once(':') else {
            continue;
        };
        let vmm = ["qemu-system-x86_64:", "vhost-device-vsock:"]
            .iter()
            .any(|n| p.contains(&format!("{n}{state}")));
        if !vmm {
            continue;
        }
        let s = std::fs::read_to_string(format!("/proc/{pid_str}/status")).unwrap_or_default();
        if s.is_empty() {
            continue;
        }
        seen += 1;
        assert_eq!(status_field(&s, "Seccomp:"), "2", "{p}");
        assert_eq!(status_field(&s, "NoNewPrivs:"), "1", "{p}");
        for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(&s, set), "0000000000000000", "{p} {set}");
        }
        let uid: u32 = status_field(&s, "Uid:")
            .split_whitespace()
            .next()
            .and_then(|u| u.parse().ok())
            .expect("uid");
        assert!(uid >= 1_000_000_000, "{p} runs as uid {uid}");
        assert_eq!(
            status_field(&s, "NSpid:").split_whitespace().count(),
            2,
            "{p}: no PID namespace"
        );
        for ns in ["mnt", "pid", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid_str}/ns/{ns}")).expect("ns");
            assert_ne!(theirs, daemon_ns(ns), "{p} shares the daemon's {ns} namespace");
        }
        let root: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid_str}/root"))
            .expect("root")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for forbidden in ["etc", "root", "home", "run", "var", "work", "sys"] {
            assert!(
                !root.contains(forbidden),
                "{p}: /{forbidden} visible in the jail: {root:?}"
            );
        }
        assert!(root.contains("vm"), "{p}: {root:?}");
    }
    assert!(
        seen >= 2,
        "expected a jailed QEMU and vhost-device-vsock, saw {seen}"
    );
    assert_eq!(d.stop(), Some(0));
}
