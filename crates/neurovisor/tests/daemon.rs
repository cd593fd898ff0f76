//! The daemon (`neurovisor serve`) end to end: real VMs behind the gRPC API,
//! pool invariants under load, lifecycle (SIGTERM, SIGKILL, two daemons), and
//! a client generated in another language (Python, grpcio-tools).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{fake_ollama, http_get, req, start_daemon, start_daemon_in};
use common::processes_mentioning;
use neurovisor_proto::inference::inference_service_client::InferenceServiceClient;
use neurovisor_proto::inference::InferRequest;
use neurovisor_proto::v1::{execute_response::Event, ExecuteRequest, LanguagesRequest};

#[test]
fn python_grpcio_client_executes_code_through_the_daemon() {
    let python = neurovisor::config::cache_dir().join("pyenv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run `bash scripts/setup.sh` (it creates the venv with grpcio-tools)",
        python.display()
    );
    let d = start_daemon(&["--warm", "1", "--max", "2"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(python)
        .arg(format!("{root}/crates/neurovisor/tests/python/sandbox_client.py"))
        .args([
            "--addr",
            &d.addr(),
            "--proto-dir",
            &format!("{root}/crates/proto/proto"),
        ])
        .output()
        .expect("run python client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("all checks passed"),
        "{text}\n{}\ndaemon log: {}",
        String::from_utf8_lossy(&out.stderr),
        d.log.lock().expect("log")
    );
    assert_eq!(d.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_invariants_under_50_concurrent_requests() {
    let d = start_daemon(&["--warm", "2", "--max", "4", "--queue-timeout", "10s"]);
    d.wait_warm(2);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        let needle = d.state.path().display().to_string();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = processes_mentioning(&needle)
                    .iter()
                    .filter(|p| p.contains("qemu-system"))
                    .count();
                peak.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let client = d.client().await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let r = c.execute_once(req("python", &format!("print({i} * 2)"))).await;
                (i, r)
            })
        })
        .collect();
    let (mut ok, mut exhausted, mut vm_ids) = (0, 0, std::collections::HashSet::new());
    for t in tasks {
        let (i, r) = t.await.expect("task");
        match r {
            Ok(resp) => {
                let r = resp.into_inner();
                assert_eq!(r.stdout, format!("{}\n", i * 2).as_bytes(), "request {i}");
                assert!(
                    vm_ids.insert(r.vm_id.clone()),
                    "VM {} served two requests",
                    r.vm_id
                );
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "request {i}: {s:?}");
                assert!(s.message().contains("retry"), "{}", s.message());
                exhausted += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    eprintln!(
        "50 requests: {ok} ok, {exhausted} RESOURCE_EXHAUSTED, peak {} VMs",
        peak.load(Ordering::Relaxed)
    );
    assert_eq!(ok + exhausted, 50);
    assert!(ok >= 4, "at least max requests succeed");
    assert!(
        peak.load(Ordering::Relaxed) <= 4,
        "more than max VMs alive: {}",
        peak.load(Ordering::Relaxed)
    );
    // The last leases are destroyed after their responses are sent, so
    // "settled" means warm refilled and every used VM gone, not just warm == 2.
    d.wait_for("2 warm, 0 active, 0 booting", Duration::from_secs(120), |st| {
        st["warm"] == 2 && st["active"] == 0 && st["booting"] == 0
    });
    let (_, metrics) = http_get(&d.metrics, "/metrics");
    for name in [
        "neurovisor_pool_warm_vms 2",
        "neurovisor_pool_active_vms 0",
        "neurovisor_vm_boot_seconds_count",
        "neurovisor_vm_acquire_seconds_count",
        "neurovisor_requests_in_flight 0",
        "neurovisor_code_execution_duration_seconds_count{language=\"python\"}",
        "neurovisor_grpc_request_duration_seconds_count{method=\"ExecuteOnce\"}",
    ] {
        assert!(metrics.contains(name), "missing {name} in /metrics:\n{metrics}");
    }
    if nix::unistd::geteuid().is_root() {
        // One series per live VM (the 2 warm ones); ended VMs' series are gone.
        for family in [
            "neurovisor_cgroup_memory_usage_bytes{",
            "neurovisor_cgroup_tasks{",
        ] {
            let n = metrics.lines().filter(|l| l.starts_with(family)).count();
            assert_eq!(n, 2, "{family} series:\n{metrics}");
        }
    }
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_killed_warm_vm_is_replaced() {
    let d = start_daemon(&["--warm", "1", "--max", "2"]);
    d.wait_warm(1);
    let before = d.vm_processes();
    assert_eq!(before.len(), 1, "{before:?}");
    let pid: i32 = before[0]
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
    // The pool notices the death (liveness check), drops the VM and boots another.
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let after = d.vm_processes();
        let st = d.status();
        if st["warm"] == 1 && after.len() == 1 && !after[0].starts_with(&format!("{pid}:")) {
            break;
        }
        assert!(Instant::now() < until, "no replacement: {after:?} {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let r = rt.block_on(async {
        d.client()
            .await
            .execute_once(req("python", "print('still serving')"))
            .await
    });
    assert_eq!(r.expect("execute").into_inner().stdout, b"still serving\n"[..]);
    assert_eq!(d.stop(), Some(0));
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_cleans_up() {
    let d = start_daemon(&["--warm", "1", "--max", "3", "--shutdown-grace", "60s"]);
    d.wait_warm(1);
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut c = d.client().await;
        let s = c
            .execute(req(
                "python",
                "import time\nprint('start', flush=True)\ntime.sleep(3)\nprint('done')",
            ))
            .await
            .expect("execute")
            .into_inner();
        streams.push(s);
    }
    // Both programs are running before the signal.
    let mut outputs = [Vec::new(), Vec::new()];
    for (i, s) in streams.iter_mut().enumerate() {
        while !outputs[i].starts_with(b"start") {
            match s.message().await.expect("stream").expect("event").event {
                Some(Event::Stdout(b)) => outputs[i].extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    d.signal(nix::sys::signal::Signal::SIGTERM);
    for (i, s) in streams.iter_mut().enumerate() {
        let mut exit = None;
        while let Some(m) = s.message().await.expect("stream completes") {
            match m.event {
                Some(Event::Stdout(b)) => outputs[i].extend_from_slice(&b),
                Some(Event::Result(r)) => exit = r.exit_code,
                _ => {}
            }
        }
        assert_eq!(outputs[i], b"start\ndone\n");
        assert_eq!(exit, Some(0));
    }
    // New work is refused while draining... and the daemon exits cleanly.
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn after_sigkill_the_next_daemon_removes_the_leftovers() {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    let d = start_daemon_in(state.clone(), &["--warm", "1", "--max", "2"]);
    d.wait_warm(1);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let vms = state.path().join("daemon/vms");
    let left: Vec<_> = std::fs::read_dir(&vms).expect("vms dir").flatten().collect();
    assert_eq!(left.len(), 1, "a SIGKILLed daemon leaves its VM directory");
    let d2 = start_daemon_in(state.clone(), &["--warm", "0", "--max", "1"]);
    assert!(
        std::fs::read_dir(&vms).map(|d| d.count()).unwrap_or(0) == 0,
        "leftovers removed before serving"
    );
    assert!(d2.vm_processes().is_empty());
    assert_eq!(d2.stop(), Some(0));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let d = start_daemon(&["--warm", "0"]);
    let out = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--warm",
            "0",
        ])
        .arg("--state-dir")
        .arg(d.state.path())
        .output()
        .expect("second daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!("another neurovisor daemon (pid {})", d.pid())),
        "{err}"
    );
    assert_eq!(d.stop(), Some(0));
}

#[tokio::test]
async fn api_validation_trace_ids_disconnects_and_inference() {
    let ollama = fake_ollama().await;
    let d = start_daemon(&["--warm", "1", "--max", "2", "--ollama-host", &ollama]);
    let mut c = d.client().await;

    for (r, field) in [
        (req("cobol", "x"), "unknown language 'cobol'"),
        (req("python", ""), "code: empty"),
        (
            ExecuteRequest {
                timeout_ms: 7_200_000,
                ..req("python", "1")
            },
            "timeout",
        ),
        (
            ExecuteRequest {
                max_output_bytes: 1 << 40,
                ..req("python", "1")
            },
            "max_output_bytes",
        ),
    ] {
        let e = c.execute_once(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }

    let langs = c
        .languages(LanguagesRequest {})
        .await
        .expect("languages")
        .into_inner();
    let names: Vec<_> = langs.languages.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["python", "bash", "javascript"]);

    // x-trace-id is honoured end to end, and minted when absent.
    let mut r = tonic::Request::new(req("bash", "echo $NEUROVISOR_TRACE_ID"));
    r.metadata_mut()
        .insert("x-trace-id", "rust-trace-7".parse().expect("ascii"));
    let resp = c.execute_once(r).await.expect("execute");
    assert_eq!(
        resp.metadata().get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some("rust-trace-7")
    );
    let body = resp.into_inner();
    assert_eq!(
        (body.stdout.as_ref(), body.trace_id.as_str()),
        (&b"rust-trace-7\n"[..], "rust-trace-7")
    );
    let minted = c.execute_once(req("bash", "true")).await.expect("execute");
    let id = minted
        .metadata()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .expect("trace id")
        .to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).expect("uuid").get_version_num(), 7);
    assert_eq!(minted.into_inner().trace_id, id);

    // A client that disconnects mid-stream frees its VM at once. The client is
    // our CLI in daemon mode, killed while its program runs: the connection
    // drops as when a real client crashes or loses the network. The VMs of
    // the calls above are destroyed after their answers: wait until they are
    // gone, so that the one active VM below is the client's.
    d.wait_for(
        "the earlier VMs gone and one warm",
        Duration::from_secs(120),
        |st| st["active"] == 0 && st["warm"] == 1,
    );
    let mut client = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args(["run", "--addr", &d.addr(), "--lang", "python", "-c"])
        .arg("import time\nprint('x', flush=True)\ntime.sleep(300)")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    let mut line = String::new();
    BufReader::new(client.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "x\n");
    assert_eq!(d.status()["active"], 1);
    client.kill().expect("kill client");
    let _ = client.wait();
    d.wait_for(
        "the VM of the disconnected client to go",
        Duration::from_secs(10),
        |st| st["active"] == 0,
    );
    assert!(d.log.lock().expect("log").contains("client disconnected"));
    drop(c);

    // Inference proxied to Ollama (a server speaking its wire format), and its errors.
    let mut inf = InferenceServiceClient::new(d.channel().await);
    let r = inf
        .infer(InferRequest {
            prompt: "hello".into(),
            model: "qwen3".into(),
        })
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(
        (r.text.as_str(), r.model.as_str(), r.tokens),
        ("echo: hello", "qwen3", 290)
    );
    let e = inf
        .infer(InferRequest {
            prompt: "hello".into(),
            model: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("ollama pull missing"), "{}", e.message());
    assert_eq!(d.stop(), Some(0));

    let d = start_daemon(&["--warm", "0", "--ollama-host", "http://127.0.0.1:9"]);
    let mut inf = InferenceServiceClient::new(d.channel().await);
    let e = inf
        .infer(InferRequest {
            prompt: "hello".into(),
            model: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("ollama serve"), "{}", e.message());
    assert_eq!(d.stop(), Some(0));
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

/// Guest bytes meet the least privilege: the daemon's `nv-guest` threads
/// (which read the vsock handshake, READY, the agent's HTTP/2 connection and
/// decode Health and Execute) hold no capabilities and a seccomp filter, and
/// executions (output, the host's cap, exit codes) work through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_bytes_are_read_on_unprivileged_confined_threads() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: confinement needs root");
        return;
    }
    let d = start_daemon(&["--warm", "1", "--max", "2"]);
    let mut c = d.client().await;
    let r = c
        .execute_once(req(
            "python",
            "import sys\nsys.stdout.write('x' * 300000)\nsys.stderr.write('err')\nsys.exit(3)",
        ))
        .await
        .expect("execute")
        .into_inner();
    assert_eq!(r.stdout.len(), 300_000);
    assert_eq!(r.stderr, b"err"[..]);
    assert_eq!(r.exit_code, Some(3));
    // The host's own cap still applies (it runs on the caller's side).
    let r = c
        .execute_once(ExecuteRequest {
            max_output_bytes: 1000,
            ..req("python", "print('y' * 5000)")
        })
        .await
        .expect("execute capped")
        .into_inner();
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated);

    let pid = d.pid();
    let mut guest_threads = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if status_field(&s, "Name:") != "nv-guest" {
            continue;
        }
        guest_threads += 1;
        assert_eq!(
            status_field(&s, "Seccomp:"),
            "2",
            "nv-guest without a filter:\n{s}"
        );
        assert_eq!(status_field(&s, "NoNewPrivs:"), "1", "{s}");
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
            assert_eq!(status_field(&s, set), "0000000000000000", "nv-guest {set}:\n{s}");
        }
    }
    assert!(
        (1..=4).contains(&guest_threads),
        "expected 1-2 nv-guest workers (and at most a couple of blocking threads), saw {guest_threads}"
    );
    // Still serving: nothing on nv-guest hit its filter (that kills the daemon).
    let r = c
        .execute_once(req("python", "print('again')"))
        .await
        .expect("execute again")
        .into_inner();
    assert_eq!(r.stdout, b"again\n"[..]);
    assert_eq!(d.stop(), Some(0));
}
