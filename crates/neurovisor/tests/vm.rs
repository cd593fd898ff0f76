//! End-to-end tests through the library: each test boots real microVMs
//! (QEMU microvm; TCG on hosts without usable KVM) and runs real code.

mod common;

use std::time::{Duration, Instant};

use common::env;
use neurovisor::{ExecError, ExecRequest, Output, VmSize};

#[tokio::test]
async fn python_bash_and_javascript_print_the_right_output() {
    let env = env();
    let py = env.run("python", "print(sum(range(10)))").await;
    assert_eq!((py.out().as_str(), py.outcome.exit_code), ("45\n", Some(0)));
    let sh = env.run("bash", "for i in 1 2 3; do echo -n $i; done; echo").await;
    assert_eq!(sh.out(), "123\n");
    let js = env
        .run("javascript", "console.log([1,2,3].map(x => x * 2).join(','))")
        .await;
    assert_eq!(js.out(), "2,4,6\n");
    env.assert_clean();
}

#[tokio::test]
async fn exit_codes_signals_and_separate_streams() {
    let env = env();
    let r = env
        .run(
            "python",
            "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nsys.exit(3)",
        )
        .await;
    assert_eq!(r.outcome.exit_code, Some(3));
    assert_eq!(r.out(), "to out\n");
    assert_eq!(r.err(), "to err\n");
    let k = env.run("bash", "echo before; kill -SEGV $$").await;
    assert_eq!((k.outcome.exit_code, k.outcome.signal), (None, Some(11)));
    assert_eq!(k.outcome.shell_status(), 139);
    assert_eq!(k.out(), "before\n");
    env.assert_clean();
}

#[tokio::test]
async fn unicode_and_binary_output_survive() {
    let env = env();
    let r = env
        .run(
            "python",
            "import sys\nprint('héllo ✓ 日本語 🚀')\nsys.stdout.flush()\nsys.stdout.buffer.write(bytes(range(256)))",
        )
        .await;
    let mut want = "héllo ✓ 日本語 🚀\n".as_bytes().to_vec();
    want.extend(0u8..=255);
    assert_eq!(r.stdout, want);
    env.assert_clean();
}

#[tokio::test]
async fn infinite_loop_is_killed_at_the_timeout() {
    let env = env();
    let mut req = ExecRequest::new("python", "while True: pass");
    req.timeout = Duration::from_secs(3);
    let r = env.run_req(&req).await;
    assert!(r.outcome.timed_out, "{:?}", r.outcome);
    assert_eq!(r.outcome.signal, Some(9));
    assert!(
        r.outcome.duration_ms >= 2900.0 && r.outcome.duration_ms < 10_000.0,
        "{:?}",
        r.outcome
    );
    // A background child in the same process group is killed too.
    let mut req = ExecRequest::new("bash", "sleep 1000 & sleep 1000");
    req.timeout = Duration::from_secs(2);
    let r = env.run_req(&req).await;
    assert!(r.outcome.timed_out);
    env.assert_clean();
}

#[tokio::test]
async fn output_beyond_the_cap_is_truncated_and_flagged() {
    let env = env();
    let mut req = ExecRequest::new(
        "python",
        "import sys\nprint('x' * 5000)\nprint('e' * 10, file=sys.stderr)",
    );
    req.max_output_bytes = 1000;
    let r = env.run_req(&req).await;
    assert_eq!(r.stdout.len(), 1000);
    assert!(
        r.outcome.stdout_truncated && !r.outcome.stderr_truncated,
        "{:?}",
        r.outcome
    );
    assert_eq!(r.outcome.stdout_bytes, 5001);
    assert_eq!(r.err(), format!("{}\n", "e".repeat(10)));
    assert_eq!(r.outcome.exit_code, Some(0));
    env.assert_clean();
}

#[tokio::test]
async fn stdin_env_args_and_trace_id_reach_the_program() {
    let env = env();
    let mut req = ExecRequest::new(
        "python",
        "import os, sys\nprint(sys.stdin.read().upper())\nprint(os.environ['GREETING'])\nprint(sys.argv[1:])\nprint(os.environ['NEUROVISOR_TRACE_ID'])\nprint(os.getuid(), os.getcwd().startswith('/tmp/run-'))",
    );
    req.stdin = b"from stdin".to_vec();
    req.env.insert("GREETING".into(), "hi there".into());
    req.args = vec!["a b".into(), "c".into()];
    req.trace_id = "0193a7f0-test-trace".into();
    let r = env.run_req(&req).await;
    assert_eq!(
        r.out(),
        "FROM STDIN\nhi there\n['a b', 'c']\n0193a7f0-test-trace\n1000 True\n",
        "stderr: {}",
        r.err()
    );
    env.assert_clean();
}

#[tokio::test]
async fn writes_in_one_vm_are_invisible_to_the_next() {
    let env = env();
    let w = env
        .run(
            "bash",
            "echo secret > /tmp/marker && echo secret > ~/marker && ls /tmp/marker ~/marker",
        )
        .await;
    assert_eq!(w.outcome.exit_code, Some(0), "{}", w.err());
    let r = env
        .run(
            "bash",
            "ls /tmp/marker ~/marker 2>/dev/null; echo $?; touch /usr/x 2>/dev/null || echo ro",
        )
        .await;
    assert_eq!(r.out(), "2\nro\n");
    env.assert_clean();
}

#[tokio::test]
async fn output_streams_while_the_program_runs() {
    let env = env();
    let req = ExecRequest::new(
        "python",
        "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
    );
    let mut arrivals: Vec<(Instant, String)> = Vec::new();
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            arrivals.push((Instant::now(), String::from_utf8_lossy(b).into_owned()));
        }
    };
    let outcome = env
        .sandbox
        .run(&req, VmSize::Small, &mut sink)
        .await
        .expect("run");
    let done = Instant::now();
    let first = arrivals.first().expect("some output");
    assert!(first.1.starts_with("first"));
    // Streamed, not buffered until exit: the first line arrived while the program slept.
    assert!(
        done - first.0 >= Duration::from_millis(1500),
        "first chunk came late"
    );
    assert_eq!(outcome.exit_code, Some(0));
    env.assert_clean();
}

#[tokio::test]
async fn four_vms_run_concurrently() {
    let env = env();
    let runs = (0..4).map(|i| {
        let mut req = ExecRequest::new("python", "import os; print(os.environ['N'])");
        req.env.insert("N".into(), i.to_string());
        let env = &env;
        async move { (i, env.run_req(&req).await) }
    });
    let results = futures_join_all(runs).await;
    let mut vm_ids = std::collections::HashSet::new();
    for (i, r) in results {
        assert_eq!(r.out(), format!("{i}\n"));
        vm_ids.insert(r.outcome.vm_id.clone());
    }
    assert_eq!(vm_ids.len(), 4, "each execution had its own VM");
    env.assert_clean();
}

async fn futures_join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out = Vec::new();
    // Drive all futures together.
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

#[tokio::test]
async fn health_reports_languages_and_the_guest_kernel() {
    let env = env();
    let vm = env.sandbox.boot(VmSize::Small).await.expect("boot");
    let names: Vec<_> = vm.health.languages.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["python", "bash", "javascript"]);
    assert!(vm.health.ready);
    assert!(vm.health.kernel.starts_with("6.1"), "{}", vm.health.kernel);
    assert!(vm
        .health
        .languages
        .iter()
        .all(|l| !l.version.is_empty() && l.version != "unknown"));
    assert_eq!(vm.pids().len(), 2, "qemu and vhost-device-vsock");
    vm.destroy().await;
    env.assert_clean();
}

#[tokio::test]
async fn guest_rejects_an_unknown_language_itself() {
    // Bypass host-side validation to prove the guest agent checks too.
    let env = env();
    let mut vm = env.sandbox.boot(VmSize::Small).await.expect("boot");
    let mut sink = |_: Output<'_>| {};
    let e = vm
        .execute(&ExecRequest::new("cobol", "DISPLAY 'HI'"), &mut sink)
        .await
        .unwrap_err();
    assert!(e.is_invalid_request(), "{e}");
    assert!(
        e.to_string().contains("unknown language 'cobol'") && e.to_string().contains("python"),
        "{e}"
    );
    vm.destroy().await;
    env.assert_clean();
}

#[tokio::test]
async fn memory_bomb_is_reported_as_guest_oom() {
    let env = env();
    let r = env
        .run(
            "python",
            "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))",
        )
        .await;
    assert!(r.outcome.oom_killed, "{:?} stderr={}", r.outcome, r.err());
    assert_eq!(r.outcome.signal, Some(9));
    env.assert_clean();
}

#[tokio::test]
async fn dropping_an_execution_midway_leaves_nothing() {
    let env = env();
    let req = ExecRequest::new("python", "import time; time.sleep(600)");
    let mut sink = |_: Output<'_>| {};
    let fut = env.sandbox.run(&req, VmSize::Small, &mut sink);
    // Cancelled while the VM boots or runs: like Ctrl-C in a caller.
    let r = tokio::time::timeout(Duration::from_secs(4), fut).await;
    assert!(r.is_err(), "should still be running");
    // Drop kills synchronously; give the kernel a moment to reap.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.assert_clean();
}

#[tokio::test]
async fn a_vm_that_cannot_boot_reports_its_console() {
    // A root filesystem without the agent: the kernel panics, the VM exits.
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let img = dir.path().join("noagent.ext4");
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&empty)
        .arg(&img)
        .arg("8M")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    let mut env = env();
    let mut images = env.sandbox.images().clone();
    images.rootfs = img;
    images.languages.clear();
    let backend = neurovisor::vmm::QemuBackend::new(&Default::default()).expect("backend");
    env.sandbox = neurovisor::Sandbox::new(
        std::sync::Arc::new(backend),
        images,
        env.state.path().to_path_buf(),
    );
    let e = env
        .try_run(&ExecRequest::new("python", "print(1)"))
        .await
        .err()
        .expect("must fail");
    let msg = e.to_string();
    // A guest that dies while booting is retried on fresh VMs (two retries)
    // before the caller sees the failure.
    match &e {
        ExecError::BootFailed { attempts, last } => {
            assert_eq!(*attempts, 3, "{msg}");
            assert!(matches!(**last, ExecError::Vmm(_)), "{msg}");
        }
        _ => panic!("expected BootFailed after retries: {msg}"),
    }
    assert_eq!(env.sandbox.boot_stats().retries(), 2, "{msg}");
    assert!(msg.contains("exited before its agent was ready"), "{msg}");
    assert!(msg.contains("Kernel panic"), "console tail missing: {msg}");
    env.assert_clean();
}

/// The sockets in a running VM's directory are no one else's: the guest's
/// hybrid vsock and QMP are root:<VM gid> 0660 (the daemon reaches them as
/// owner without CAP_DAC_OVERRIDE, the jailed VM as group), vhost.sock (while
/// it exists) is the VM uid's alone, no socket is world-accessible, logs are 0600.
#[tokio::test]
async fn vm_directory_sockets_have_the_narrowest_modes() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: jailed VMs need root");
        return;
    }
    let env = env();
    let vm = env.sandbox.boot(VmSize::Small).await.expect("boot");
    let dir = vm.dir().expect("dir").to_path_buf();
    let dir_meta = std::fs::metadata(&dir).expect("dir");
    let vm_gid = dir_meta.gid();
    assert_ne!(vm_gid, 0, "the VM directory belongs to the jail's group");
    assert_eq!(dir_meta.mode() & 0o777, 0o770);
    let mode = |name: &str| {
        let m = std::fs::symlink_metadata(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        (m.mode() & 0o777, m.uid(), m.gid(), m.file_type().is_socket())
    };
    assert_eq!(mode("vsock.sock"), (0o660, 0, vm_gid, true), "vsock.sock");
    assert_eq!(mode("qmp.sock"), (0o660, 0, vm_gid, true), "qmp.sock");
    // vhost-device-vsock may unlink its vhost-user socket once QEMU is on it.
    if dir.join("vhost.sock").exists() {
        let (vhost_mode, vhost_uid, _, is_sock) = mode("vhost.sock");
        assert!(
            is_sock && vhost_mode & 0o077 == 0,
            "vhost.sock mode {vhost_mode:o}"
        );
        assert!(
            vhost_uid >= 1_000_000_000,
            "vhost.sock owned by {vhost_uid}, not the VM's uid"
        );
    }
    for log in ["console.log", "vmm.log"] {
        assert_eq!(mode(log).0, 0o600, "{log}");
    }
    for e in std::fs::read_dir(&dir).expect("read dir").flatten() {
        let m = e.metadata().expect("stat");
        if m.file_type().is_socket() {
            assert_eq!(
                m.mode() & 0o007,
                0,
                "{} is accessible to others: {:o}",
                e.path().display(),
                m.mode() & 0o777
            );
        }
    }
    vm.destroy().await;
    env.assert_clean();
}
