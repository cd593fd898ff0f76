//! Sandboxes that live across calls (`neurovisor.v1.Sandboxes` and
//! `neurovisor sandbox ...`), against a real daemon booting real VMs: state
//! persists between runs of one sandbox and never reaches another, timeouts
//! and kills destroy the VM, caps are enforced, and a daemon stopped with
//! SIGTERM or SIGKILL leaves no sandbox VM behind.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon, start_daemon_in, Daemon};
use neurovisor_proto::v1::sandboxes_client::SandboxesClient;
use neurovisor_proto::v1::{
    execute_response::Event, CreateSandboxRequest, ExecuteResult, ListSandboxesRequest, SandboxExecRequest,
    SandboxRef, SetSandboxTimeoutRequest,
};
use tonic::transport::Channel;

async fn sandboxes(d: &Daemon) -> SandboxesClient<Channel> {
    SandboxesClient::new(d.channel().await)
}

/// Runs `code` in sandbox `id`: (stdout, stderr, result).
async fn exec(
    c: &mut SandboxesClient<Channel>,
    id: &str,
    lang: &str,
    code: &str,
) -> (String, String, ExecuteResult) {
    let mut s = c
        .exec(SandboxExecRequest {
            sandbox_id: id.into(),
            request: Some(req(lang, code)),
        })
        .await
        .expect("exec")
        .into_inner();
    let (mut out, mut err, mut result) = (Vec::new(), Vec::new(), None);
    while let Some(m) = s.message().await.expect("exec stream") {
        match m.event {
            Some(Event::Stdout(b)) => out.extend_from_slice(&b),
            Some(Event::Stderr(b)) => err.extend_from_slice(&b),
            Some(Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        result.expect("a result"),
    )
}

/// `neurovisor sandbox ARGS --addr unix:...`: (exit code, stdout, stderr).
fn cli(d: &Daemon, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .arg("sandbox")
        .args(args)
        .args(["--addr", &d.addr()])
        .output()
        .expect("run neurovisor sandbox");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_keep_state_apart_expire_are_killed_and_capped() {
    let d = start_daemon(&["--warm", "1", "--max", "4", "--max-sandboxes", "2"]);
    let mut c = sandboxes(&d).await;

    // Bad input is refused before a VM is taken.
    let e = c
        .create(CreateSandboxRequest {
            timeout_s: 10 * 24 * 3600,
            ..Default::default()
        })
        .await
        .expect_err("a 10-day timeout");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("timeout_s"), "{}", e.message());
    let e = c
        .create(CreateSandboxRequest {
            env: HashMap::from([("1BAD".to_string(), "x".to_string())]),
            ..Default::default()
        })
        .await
        .expect_err("a bad variable name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // A over gRPC (with metadata and an environment), B with the CLI.
    let a = c
        .create(CreateSandboxRequest {
            timeout_s: 600,
            metadata: HashMap::from([("task".to_string(), "t1".to_string())]),
            env: HashMap::from([("GREETING".to_string(), "hello".to_string())]),
        })
        .await
        .expect("create A")
        .into_inner();
    let (code, out, err) = cli(&d, &["create", "--timeout", "10m", "--meta", "who=cli"]);
    assert_eq!(code, Some(0), "{err}");
    let b = out.trim().to_string();
    assert_eq!(b.len(), 32, "an id on stdout: {out:?}");
    assert_ne!(a.sandbox_id, b);

    // The cap: a third is refused while two live.
    let e = c
        .create(CreateSandboxRequest::default())
        .await
        .expect_err("a third sandbox");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-sandboxes"), "{}", e.message());

    // State persists across runs in A, in any language, with A's environment.
    let (out, err, r) = exec(
        &mut c,
        &a.sandbox_id,
        "bash",
        "echo state-of-A > /tmp/keep.txt; echo \"$GREETING\"",
    )
    .await;
    assert_eq!((out.as_str(), r.exit_code), ("hello\n", Some(0)), "{err}");
    let (out, _, r) = exec(
        &mut c,
        &a.sandbox_id,
        "python",
        "print(open('/tmp/keep.txt').read().strip())",
    )
    .await;
    assert_eq!((out.as_str(), r.exit_code), ("state-of-A\n", Some(0)));
    assert_eq!(r.vm_id, a.vm_id, "every run of A is in A's VM");
    // A program's own failure leaves the sandbox as it was.
    let (_, _, r) = exec(&mut c, &a.sandbox_id, "bash", "exit 7").await;
    assert_eq!(r.exit_code, Some(7));
    let (out, _, _) = exec(&mut c, &a.sandbox_id, "bash", "cat /tmp/keep.txt").await;
    assert_eq!(out, "state-of-A\n");

    // Nothing of A reaches B (CLI exec: the program's status is the exit code).
    let (code, out, err) = cli(
        &d,
        &[
            "exec",
            &b,
            "--lang",
            "bash",
            "-c",
            "cat /tmp/keep.txt; echo \"[$GREETING]\"",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "[]\n", "B sees A's file or environment: {out:?} {err}");
    assert!(err.contains("No such file"), "{err}");
    let (code, _, _) = cli(
        &d,
        &["exec", &b, "--lang", "python", "-c", "import sys; sys.exit(3)"],
    );
    assert_eq!(code, Some(3));

    // Get and list.
    let got = c
        .get(SandboxRef {
            sandbox_id: a.sandbox_id.clone(),
        })
        .await
        .expect("get A")
        .into_inner();
    assert_eq!(got.executions, 4);
    assert_eq!(got.metadata.get("task").map(String::as_str), Some("t1"));
    let (code, out, _) = cli(&d, &["list", "--json"]);
    assert_eq!(code, Some(0));
    let listed: serde_json::Value = serde_json::from_str(&out).expect("list --json");
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["sandbox_id"].as_str())
        .collect();
    assert!(
        ids.contains(&a.sandbox_id.as_str()) && ids.contains(&b.as_str()),
        "{out}"
    );
    let list = c.list(ListSandboxesRequest {}).await.expect("list").into_inner();
    assert_eq!(list.sandboxes.len(), 2);
    assert_eq!(d.metric_sum("neurovisor_sandboxes"), 2.0);

    // Kill B with the CLI: its VM goes; B is then unknown (exit 2, one line).
    wait_until("A, B and one warm VM", Duration::from_secs(60), || {
        d.vm_processes().len() == 3
    });
    let (code, _, err) = cli(&d, &["kill", &b]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&d, &["exec", &b, "--lang", "bash", "-c", "true"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("no sandbox '{b}'")), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A's timeout, shortened, kills its VM; A is then unknown.
    let vm_a = a.vm_id.clone();
    c.set_timeout(SetSandboxTimeoutRequest {
        sandbox_id: a.sandbox_id.clone(),
        timeout_s: 2,
    })
    .await
    .expect("set timeout");
    wait_until(
        "A's VM to be destroyed at its timeout",
        Duration::from_secs(30),
        || !d.vm_processes().iter().any(|p| p.contains(&vm_a)),
    );
    let e = c
        .get(SandboxRef {
            sandbox_id: a.sandbox_id.clone(),
        })
        .await
        .expect_err("A expired");
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(d.metric_sum("neurovisor_sandboxes"), 0.0);
    let (_, text) = common::daemon::http_get(&d.metrics, "/metrics");
    for reason in ["killed", "expired"] {
        let line = format!("neurovisor_sandboxes_ended_total{{reason=\"{reason}\"}} 1");
        assert!(text.contains(&line), "no '{line}' in /metrics");
    }

    // A sandbox alive at SIGTERM is destroyed with the daemon; stop() checks
    // that no process, cgroup, socket or directory is left.
    let (code, _, err) = cli(&d, &["create"]);
    assert_eq!(code, Some(0), "{err}");
    drop(c);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_sigkilled_daemon_takes_its_sandbox_vms_along() {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    let d = start_daemon_in(state.clone(), &["--warm", "0", "--max", "2"]);
    let (code, id, err) = cli(&d, &["create"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cli(&d, &["exec", id.trim(), "--lang", "bash", "-c", "echo alive"]);
    assert_eq!((code, out.as_str()), (Some(0), "alive\n"), "{err}");
    assert_eq!(d.vm_processes().len(), 1);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let needle = state.path().display().to_string();
    drop(d);
    // The keepers kill and reap the VM's processes and remove its cgroup.
    wait_until(
        "the sandbox VM to die with its daemon",
        Duration::from_secs(10),
        || common::processes_mentioning(&needle).is_empty(),
    );
    wait_until("the VM cgroup to be removed", Duration::from_secs(10), || {
        common::unowned_vm_cgroups().is_empty()
    });
    // The next daemon on the same state directory starts clean.
    let d2 = start_daemon_in(state, &["--warm", "0", "--max", "1"]);
    assert!(d2.vm_processes().is_empty());
    assert_eq!(d2.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stops_a_running_program_and_a_client_that_leaves_does_not_end_the_sandbox() {
    let d = start_daemon(&["--warm", "0", "--max", "3"]);
    let mut c = sandboxes(&d).await;
    let a = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("create A")
        .into_inner();
    let b = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("create B")
        .into_inner();

    // Kill while a program runs: its stream ends ABORTED, its VM goes.
    let mut running = c
        .exec(SandboxExecRequest {
            sandbox_id: a.sandbox_id.clone(),
            request: Some(req("bash", "echo started; sleep 60; echo never")),
        })
        .await
        .expect("exec")
        .into_inner();
    let first = running
        .message()
        .await
        .expect("first message")
        .expect("a message");
    assert!(
        matches!(first.event, Some(Event::Stdout(ref o)) if o.as_ref() == b"started\n"),
        "{first:?}"
    );
    let killed_at = Instant::now();
    c.kill(SandboxRef {
        sandbox_id: a.sandbox_id.clone(),
    })
    .await
    .expect("kill A");
    let end = loop {
        match running.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    let end = end.expect("the stream ends with an error, not a result");
    assert_eq!(end.code(), tonic::Code::Aborted, "{end:?}");
    assert!(killed_at.elapsed() < Duration::from_secs(10));
    wait_until("A's VM to be destroyed", Duration::from_secs(10), || {
        !d.vm_processes().iter().any(|p| p.contains(&a.vm_id))
    });

    // A client that goes away mid-program: the program runs to its end, the
    // sandbox stays, and the next program (which waits for it) sees its work.
    let mut leaving = c
        .exec(SandboxExecRequest {
            sandbox_id: b.sandbox_id.clone(),
            request: Some(req(
                "bash",
                "for i in $(seq 1 20); do echo $i; sleep 0.1; done; echo finished > /tmp/done",
            )),
        })
        .await
        .expect("exec")
        .into_inner();
    let _ = leaving.message().await.expect("first line");
    drop(leaving);
    let (out, err, r) = exec(&mut c, &b.sandbox_id, "bash", "cat /tmp/done").await;
    assert_eq!((out.as_str(), r.exit_code), ("finished\n", Some(0)), "{err}");
    let info = c
        .get(SandboxRef {
            sandbox_id: b.sandbox_id.clone(),
        })
        .await
        .expect("B still there")
        .into_inner();
    assert_eq!(info.executions, 2);
    drop(c);
    assert_eq!(d.stop(), Some(0));
}
