//! Sandboxes that live across calls (`neurovisor.v1.Sandboxes` and
//! `neurovisor sandbox ...`), against a real daemon booting real VMs: state
//! persists between runs of one sandbox and never reaches another, timeouts
//! and kills destroy the VM, caps are enforced, and a daemon stopped with
//! SIGTERM or SIGKILL leaves no sandbox VM behind; files round-trip
//! byte-exact (64 MiB) as the sandbox's user; processes outlive their call,
//! take input and signals, and a reader that stalls is detached.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon, start_daemon_in, Daemon};
use neurovisor_proto::v1::sandboxes_client::SandboxesClient;
use neurovisor_proto::v1::{
    code_event::Event as CEvent, execute_response::Event, process_event::Event as PEvent, CodeError,
    CreateContextRequest, CreateSandboxRequest, EntryInfo, ExecuteResult, FileType, ListDirRequest,
    ListProcessesRequest, ListSandboxesRequest, MoveRequest, PathRequest, ProcessEnd, ProcessEvent,
    ProcessSelector, ReadFileRequest, RunCodeRequest, SandboxExecRequest, SandboxRef, SendInputRequest,
    SetSandboxTimeoutRequest, SignalProcessRequest, StartProcessRequest, WriteFileRequest,
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
            ..Default::default()
        })
        .await
        .expect("create A")
        .into_inner();
    let (code, out, err) = cli(&d, &["create", "--timeout", "10m", "--meta", "who=cli"]);
    assert_eq!(code, Some(0), "{err}");
    let b = out.trim().to_string();
    assert_eq!(b.len(), 32, "an id on stdout: {out:?}");
    assert_ne!(a.sandbox_id, b);

    // A cold-booted QEMU VM (vhost-user vsock) cannot be snapshotted: the
    // pause is refused with the fix, and the sandbox runs on.
    let (code, _, err) = cli(&d, &["pause", &b]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("cannot be paused") && err.contains("--snapshot"),
        "{err}"
    );
    // So is a timeout that would pause, before a VM is taken.
    let (code, _, err) = cli(&d, &["create", "--on-timeout", "pause"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("cannot pause") && err.contains("--snapshot"),
        "{err}"
    );

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

/// Incompressible bytes that are not text.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn write_file(
    c: &mut SandboxesClient<Channel>,
    id: &str,
    path: &str,
    user: &str,
    data: &[u8],
) -> EntryInfo {
    let mut msgs = vec![WriteFileRequest {
        sandbox_id: id.into(),
        path: path.into(),
        user: user.into(),
        ..Default::default()
    }];
    msgs.extend(data.chunks(1 << 20).map(|c| WriteFileRequest {
        data: c.to_vec().into(),
        ..Default::default()
    }));
    c.write_file(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
        .unwrap_or_else(|e| panic!("write {path}: {e:?}"))
}

async fn read_file(
    c: &mut SandboxesClient<Channel>,
    id: &str,
    path: &str,
    user: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c
        .read_file(ReadFileRequest {
            sandbox_id: id.into(),
            path: path.into(),
            user: user.into(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        assert!(chunk.data.len() <= 1 << 20);
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

fn path_req(id: &str, path: &str, user: &str) -> PathRequest {
    PathRequest {
        sandbox_id: id.into(),
        path: path.into(),
        user: user.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_a_sandbox_round_trip_byte_exact_and_act_as_its_user() {
    // Medium: its 128 MiB writable layer holds a 64 MiB file.
    let state = Arc::new(tempfile::tempdir().expect("state dir"));
    let d = common::daemon::start_daemon_sized(state, "medium", &["--warm", "0", "--max", "2"]);
    let mut c = sandboxes(&d).await;
    let s = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("create")
        .into_inner();
    let id = s.sandbox_id.as_str();

    // 64 MiB of binary data in and out, byte-exact, streamed both ways.
    let big = noise(64 << 20, 0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let info = write_file(&mut c, id, "data/big.bin", "", &big).await;
    let up = started.elapsed();
    assert_eq!(info.path, "/home/user/data/big.bin");
    assert_eq!((info.size, info.owner.as_str()), (64 << 20, "user"), "{info:?}");
    let started = Instant::now();
    let back = read_file(&mut c, id, "/home/user/data/big.bin", "")
        .await
        .expect("read back");
    let down = started.elapsed();
    assert!(back == big, "64 MiB came back different ({} bytes)", back.len());
    eprintln!("64 MiB: upload {up:?}, download {down:?}");
    // A program sees the same bytes.
    let (out, err, r) = exec(
        &mut c,
        id,
        "python",
        "import hashlib; print(hashlib.sha256(open('/home/user/data/big.bin','rb').read()).hexdigest())",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{err}");
    let expected = {
        let out = Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut p| {
                use std::io::Write;
                p.stdin.take().expect("stdin").write_all(&big)?;
                p.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };
    assert_eq!(out.trim(), expected);
    c.remove(path_req(id, "data/big.bin", ""))
        .await
        .expect("remove the big file");

    // Directories, stat, move, remove, and what NOT_FOUND / ALREADY_EXISTS mean.
    let dir = c
        .make_dir(path_req(id, "a/b/c", ""))
        .await
        .expect("mkdir")
        .into_inner();
    assert_eq!(dir.r#type(), FileType::Directory);
    let e = c
        .make_dir(path_req(id, "a/b/c", ""))
        .await
        .expect_err("mkdir twice");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    write_file(&mut c, id, "a/b/note.txt", "", b"hello").await;
    let list = c
        .list_dir(ListDirRequest {
            sandbox_id: id.into(),
            path: "a".into(),
            depth: 2,
            user: String::new(),
        })
        .await
        .expect("list")
        .into_inner()
        .entries;
    let paths: Vec<&str> = list.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/home/user/a/b", "/home/user/a/b/c", "/home/user/a/b/note.txt"]
    );
    let moved = c
        .r#move(MoveRequest {
            sandbox_id: id.into(),
            source: "a/b/note.txt".into(),
            destination: "/tmp/x/moved.txt".into(),
            user: String::new(),
        })
        .await
        .expect("move")
        .into_inner();
    assert_eq!((moved.name.as_str(), moved.size), ("moved.txt", 5));
    let e = c
        .stat(path_req(id, "a/b/note.txt", ""))
        .await
        .expect_err("stat after move");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert_eq!(
        read_file(&mut c, id, "/tmp/x/moved.txt", "").await.expect("read"),
        b"hello"
    );
    c.remove(path_req(id, "a", "")).await.expect("remove a tree");
    assert_eq!(
        c.stat(path_req(id, "a", "")).await.expect_err("gone").code(),
        tonic::Code::NotFound
    );

    // The user is the kernel's to check: root's home is closed to "user".
    let e = read_file(&mut c, id, "/root/.bashrc", "")
        .await
        .expect_err("user reads root's file");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut w = vec![WriteFileRequest {
        sandbox_id: id.into(),
        path: "/etc/evil".into(),
        ..Default::default()
    }];
    w.push(WriteFileRequest {
        data: b"x".to_vec().into(),
        ..Default::default()
    });
    let e = c
        .write_file(tokio_stream::iter(w))
        .await
        .expect_err("user writes /etc");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let root = write_file(&mut c, id, "/etc/allowed", "root", b"root was here").await;
    assert_eq!(root.owner, "root");

    // Bad input is refused by the daemon with the field named.
    let e = c.stat(path_req(id, "", "")).await.expect_err("empty path");
    assert!(e.message().contains("path"), "{e:?}");
    let e = c.stat(path_req(id, "/", "bob")).await.expect_err("unknown user");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("\"root\""), "{}", e.message());
    let e = c
        .stat(path_req("0123456789abcdef0123456789abcdef", "/", ""))
        .await
        .expect_err("unknown sandbox");
    assert_eq!(e.code(), tonic::Code::NotFound);

    // The CLI copies both ways (stdin and files) and lists.
    let tmp = tempfile::tempdir().expect("tmp");
    let local = tmp.path().join("up.bin");
    let data = noise(3 << 20, 42);
    std::fs::write(&local, &data).expect("write local");
    let remote = format!("{id}:/tmp/up.bin");
    let (code, _, err) = cli(&d, &["cp", local.to_str().expect("utf-8"), &remote]);
    assert_eq!(code, Some(0), "{err}");
    let down = tmp.path().join("down.bin");
    let (code, _, err) = cli(&d, &["cp", &remote, down.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(&down).expect("downloaded") == data);
    let (code, out, err) = cli(&d, &["ls", id, "/tmp"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.ends_with(" /tmp/up.bin") && l.contains(" user ")),
        "{out}"
    );
    // `cp` SIGKILLed while it uploads over that file: the file keeps its
    // old bytes (no part of the new one in its place), the part goes. It
    // uploads from its stdin, which stays open, so its stream cannot have
    // ended when it is killed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
        .args(["sandbox", "cp", "-", &remote, "--addr", &d.addr()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start cp");
    let mut stdin = child.stdin.take().expect("cp's stdin");
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        // Until the child dies (a broken pipe); `stdin` is never closed first.
        let chunk = noise(1 << 20, 7);
        for _ in 0..256 {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
        stdin
    });
    let parts = |c: &mut SandboxesClient<Channel>| {
        let mut c = c.clone();
        let id = id.to_string();
        async move {
            let r = c
                .list_dir(ListDirRequest {
                    sandbox_id: id,
                    path: "/tmp".into(),
                    depth: 1,
                    user: String::new(),
                })
                .await
                .expect("list /tmp")
                .into_inner();
            r.entries
                .into_iter()
                .filter(|e| e.name.contains(".nv-upload-"))
                .map(|e| e.size)
                .collect::<Vec<_>>()
        }
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if parts(&mut c).await.iter().any(|size| *size > 0) {
            break;
        }
        assert!(
            child.try_wait().expect("cp").is_none(),
            "cp ended before it was seen uploading"
        );
        assert!(Instant::now() < until, "no upload in progress seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL cp");
    child.wait().expect("reap cp");
    drop(feeder.join().expect("feeder"));
    let until = Instant::now() + Duration::from_secs(10);
    while !parts(&mut c).await.is_empty() {
        assert!(Instant::now() < until, "the broken upload's part stays in /tmp");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, err) = cli(&d, &["cp", &remote, down.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(&down).expect("downloaded") == data,
        "a broken upload changed the file"
    );

    let (code, _, err) = cli(&d, &["cp", &format!("{id}:/nope"), down.to_str().expect("utf-8")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nope"), "{err}");
    let (code, _, err) = cli(&d, &["cp", "a", "b"]);
    assert_eq!(code, Some(2), "{err}");

    drop(c);
    assert_eq!(d.stop(), Some(0));
}

/// Runs code in a context: (stdout, result texts, error).
async fn run_code(
    c: &mut SandboxesClient<Channel>,
    id: &str,
    context_id: &str,
    language: &str,
    code: &str,
) -> (String, Vec<String>, Option<CodeError>) {
    let mut s = c
        .run_code(RunCodeRequest {
            sandbox_id: id.into(),
            context_id: context_id.into(),
            language: language.into(),
            code: code.into(),
            ..Default::default()
        })
        .await
        .expect("run code")
        .into_inner();
    let (mut out, mut results, mut error) = (String::new(), Vec::new(), None);
    while let Some(ev) = s.message().await.expect("code stream") {
        match ev.event {
            Some(CEvent::Stdout(t)) => out.push_str(&t),
            Some(CEvent::Result(r)) => results.push(r.text),
            Some(CEvent::Error(e)) => error = Some(e),
            Some(CEvent::ExecutionCount(_)) => return (out, results, error),
            _ => {}
        }
    }
    panic!("the run ended without its count");
}

/// The events of a process stream until it ends: (stdout, stderr, end).
async fn follow(s: &mut tonic::Streaming<ProcessEvent>) -> (String, String, Option<ProcessEnd>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(ev) = s.message().await.expect("process stream") {
        match ev.event {
            Some(PEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(PEvent::Stderr(b)) => err.extend_from_slice(&b),
            Some(PEvent::End(e)) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    String::from_utf8_lossy(&err).into_owned(),
                    Some(e),
                )
            }
            _ => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        None,
    )
}

/// Reads until stdout has shown `want`.
async fn read_until(s: &mut tonic::Streaming<ProcessEvent>, want: &str) {
    let mut out = String::new();
    while !out.contains(want) {
        match tokio::time::timeout(Duration::from_secs(30), s.message()).await {
            Ok(Ok(Some(ProcessEvent {
                event: Some(PEvent::Stdout(b)),
            }))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Ok(Some(_))) => {}
            other => panic!("waiting for {want:?} in {out:?}: {other:?}"),
        }
    }
}

fn start_req(id: &str, cmd: &str, args: &[&str]) -> StartProcessRequest {
    StartProcessRequest {
        sandbox_id: id.into(),
        cmd: cmd.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

async fn started(
    c: &mut SandboxesClient<Channel>,
    r: StartProcessRequest,
) -> (u32, tonic::Streaming<ProcessEvent>) {
    let mut s = c.start_process(r).await.expect("start").into_inner();
    match s.message().await.expect("first event").and_then(|e| e.event) {
        Some(PEvent::Started(pid)) => (pid, s),
        other => panic!("the first event is not `started`: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_outlive_their_call_take_input_and_signals_and_a_stalled_reader_is_dropped() {
    let d = start_daemon(&["--warm", "0", "--max", "2"]);
    let mut c = sandboxes(&d).await;
    let s = c
        .create(CreateSandboxRequest {
            env: HashMap::from([("FROM_SANDBOX".to_string(), "yes".to_string())]),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    let id = s.sandbox_id.as_str();

    // Exit codes exact; the user, the home, the sandbox's environment.
    let (_, mut p) = started(
        &mut c,
        start_req(
            id,
            "bash",
            &["-c", "id -un; pwd; echo $FROM_SANDBOX; echo oops >&2; exit 7"],
        ),
    )
    .await;
    let (out, err, end) = follow(&mut p).await;
    let end = end.expect("an end");
    assert_eq!(out, "user\n/home/user\nyes\n");
    assert_eq!(err, "oops\n");
    assert_eq!(
        (end.exit_code, end.signal, end.status.as_str()),
        (Some(7), None, "exit status 7")
    );
    let mut as_root = start_req(id, "id", &["-u"]);
    as_root.user = "root".into();
    let (_, mut p) = started(&mut c, as_root).await;
    assert_eq!(follow(&mut p).await.0, "0\n");

    // A background process outlives the call that started it; another call
    // finds it by tag, reconnects by pid, feeds its stdin and signals it.
    let mut bg = start_req(
        id,
        "bash",
        &[
            "-c",
            "echo ready; while read line; do echo \"got $line\"; done; sleep 600",
        ],
    );
    bg.stdin = true;
    bg.tag = "worker".into();
    let (pid, mut first) = started(&mut c, bg).await;
    read_until(&mut first, "ready").await;
    drop(first);
    let list = c
        .list_processes(ListProcessesRequest {
            sandbox_id: id.into(),
        })
        .await
        .expect("list")
        .into_inner()
        .processes;
    let w = list
        .iter()
        .find(|p| p.tag == "worker")
        .expect("the worker is listed");
    assert_eq!((w.pid, w.cmd.as_str(), w.user.as_str()), (pid, "bash", "user"));
    let mut again = c
        .connect_process(ProcessSelector {
            sandbox_id: id.into(),
            pid,
            tag: String::new(),
        })
        .await
        .expect("connect")
        .into_inner();
    assert_eq!(
        again.message().await.expect("event").and_then(|e| e.event),
        Some(PEvent::Started(pid))
    );
    c.send_input(SendInputRequest {
        sandbox_id: id.into(),
        pid: 0,
        tag: "worker".into(),
        data: b"hello\n".to_vec().into(),
    })
    .await
    .expect("send input");
    read_until(&mut again, "got hello").await;
    c.signal_process(SignalProcessRequest {
        sandbox_id: id.into(),
        pid,
        tag: String::new(),
        signal: 15,
    })
    .await
    .expect("SIGTERM");
    let end = follow(&mut again).await.2.expect("an end after SIGTERM");
    assert_eq!(
        (end.exit_code, end.signal, end.status.as_str()),
        (None, Some(15), "signal: SIGTERM")
    );
    let e = c
        .connect_process(ProcessSelector {
            sandbox_id: id.into(),
            pid,
            tag: String::new(),
        })
        .await
        .expect_err("connect to an ended process");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // Closing stdin is end-of-file for the process.
    let mut cat = start_req(id, "cat", &[]);
    cat.stdin = true;
    let (pid, mut p) = started(&mut c, cat).await;
    c.send_input(SendInputRequest {
        sandbox_id: id.into(),
        pid,
        tag: String::new(),
        data: b"abc".to_vec().into(),
    })
    .await
    .expect("input");
    c.close_stdin(ProcessSelector {
        sandbox_id: id.into(),
        pid,
        tag: String::new(),
    })
    .await
    .expect("close stdin");
    let (out, _, end) = follow(&mut p).await;
    assert_eq!((out.as_str(), end.and_then(|e| e.exit_code)), ("abc", Some(0)));

    // A time limit kills the whole group.
    let mut slow = start_req(id, "bash", &["-c", "sleep 100 & sleep 100"]);
    slow.timeout_ms = 500;
    let (_, mut p) = started(&mut c, slow).await;
    let end = follow(&mut p).await.2.expect("an end");
    assert!(end.timed_out && end.signal == Some(9), "{end:?}");

    // Bad input, named.
    let e = c
        .start_process(start_req(id, " ", &[]))
        .await
        .expect_err("empty cmd");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .start_process(start_req(id, "no-such-program", &[]))
        .await
        .expect_err("missing program");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("no-such-program"), "{}", e.message());
    let e = c
        .signal_process(SignalProcessRequest {
            sandbox_id: id.into(),
            pid: 1,
            tag: String::new(),
            signal: 99,
        })
        .await
        .expect_err("signal 99");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // A client that never reads a flood: it is detached (its stream ends
    // without an end), the process runs on, other calls are answered.
    let mut flood = start_req(id, "cat", &["/dev/zero"]);
    flood.tag = "flood".into();
    let (pid, mut p) = started(&mut c, flood).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stat = c
        .stat(path_req(id, "/", ""))
        .await
        .expect("stat while a reader stalls");
    assert_eq!(stat.into_inner().path, "/");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (_, _, end) = tokio::time::timeout(Duration::from_secs(60), follow(&mut p))
        .await
        .expect("the stalled reader's stream ends");
    assert!(
        end.is_none(),
        "a stalled reader is detached, not given an end: {end:?}"
    );
    let list = c
        .list_processes(ListProcessesRequest {
            sandbox_id: id.into(),
        })
        .await
        .expect("list")
        .into_inner()
        .processes;
    assert!(
        list.iter().any(|p| p.pid == pid),
        "the flood still runs: {list:?}"
    );
    c.signal_process(SignalProcessRequest {
        sandbox_id: id.into(),
        pid,
        tag: String::new(),
        signal: 9,
    })
    .await
    .expect("SIGKILL");

    // Code contexts: state between runs, the last expression's value,
    // errors by name, separate contexts, JavaScript.
    let x = run_code(&mut c, id, "", "python", "x = 20\nprint('set')").await;
    assert_eq!((x.0.as_str(), x.2), ("set\n", None));
    let x = run_code(
        &mut c,
        id,
        "",
        "python",
        "x * 2 + int(__import__('os').environ['FROM_SANDBOX'] == 'yes')",
    )
    .await;
    assert_eq!(x.1, vec!["41".to_string()]);
    let x = run_code(&mut c, id, "", "python", "undefined_name").await;
    assert_eq!(x.2.map(|e| e.name).as_deref(), Some("NameError"));
    let ctx = c
        .create_context(CreateContextRequest {
            sandbox_id: id.into(),
            language: "javascript".into(),
            ..Default::default()
        })
        .await
        .expect("create a context")
        .into_inner();
    let x = run_code(&mut c, id, &ctx.id, "", "let n = 3; n * 7").await;
    assert_eq!(x.1, vec!["21".to_string()]);
    let e = c
        .create_context(CreateContextRequest {
            sandbox_id: id.into(),
            language: "cobol".into(),
            ..Default::default()
        })
        .await
        .expect_err("no cobol contexts");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Killing the sandbox ends an attached stream with ABORTED.
    let (_, mut p) = started(&mut c, start_req(id, "sleep", &["600"])).await;
    c.kill(SandboxRef {
        sandbox_id: id.into(),
    })
    .await
    .expect("kill");
    let end = loop {
        match p.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    assert_eq!(end.map(|s| s.code()), Some(tonic::Code::Aborted));
    drop(c);
    assert_eq!(d.stop(), Some(0));
}

/// Pause writes the sandbox's whole VM to the daemon's disk and stops it;
/// resume brings the same guest back in a new VM process. On QEMU that needs
/// a `--snapshot` daemon (its sandboxes run in restored VMs, whose guest
/// channel is a virtio-serial port that migrates). A file, a running
/// process's memory and stdin, and a code context's variables survive; the
/// guest's clock is the host's again; nothing runs and nothing expires while
/// paused; kill and daemon shutdown remove the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_resumes_with_its_files_processes_and_contexts() {
    let d = start_daemon(&["--warm", "0", "--max", "2", "--snapshot"]);
    let mut c = sandboxes(&d).await;
    let s = c
        .create(CreateSandboxRequest {
            timeout_s: 60,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    let id = s.sandbox_id.clone();
    assert!(
        s.restored,
        "a --snapshot daemon's sandbox runs in a restored VM: {s:?}"
    );
    let (_, _, r) = exec(&mut c, &id, "bash", "echo kept > /home/user/keep.txt").await;
    assert_eq!(r.exit_code, Some(0));
    // A process whose state is in its memory: a running sum of its input.
    let mut sum = start_req(
        &id,
        "python3",
        &[
            "-u",
            "-c",
            "import sys\nt = 0\nprint('ready')\nfor l in sys.stdin:\n    t += int(l)\n    print('sum', t)",
        ],
    );
    sum.stdin = true;
    sum.tag = "sum".into();
    let (pid, mut p) = started(&mut c, sum).await;
    read_until(&mut p, "ready").await;
    let input = |data: &str| SendInputRequest {
        sandbox_id: id.clone(),
        pid,
        tag: String::new(),
        data: data.as_bytes().to_vec().into(),
    };
    c.send_input(input("5\n")).await.expect("input");
    read_until(&mut p, "sum 5").await;
    drop(p);
    let (_, results, error) = run_code(&mut c, &id, "", "python", "x = 41\nx").await;
    assert_eq!((results, error), (vec!["41".to_string()], None));

    let paused = c
        .pause(SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .expect("pause")
        .into_inner();
    assert!(paused.paused && paused.end_at_ms == 0, "{paused:?}");
    let snapshot = d.dir.join("daemon/paused").join(&id);
    assert!(
        snapshot.join("state").is_file(),
        "no snapshot at {}",
        snapshot.display()
    );
    wait_until(
        "the paused sandbox's VM to be gone",
        Duration::from_secs(10),
        || d.vm_processes().is_empty(),
    );
    // Refused clearly while paused.
    let e = c
        .exec(SandboxExecRequest {
            sandbox_id: id.clone(),
            request: Some(req("bash", "true")),
        })
        .await
        .expect_err("exec while paused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("paused"), "{e:?}");
    let e = c
        .stat(path_req(&id, "keep.txt", ""))
        .await
        .expect_err("stat while paused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = c
        .pause(SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .expect_err("pause twice");
    assert!(e.message().contains("already paused"), "{e:?}");
    // The guest's clock stops with it; resume sets it again.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (code, out, err) = cli(&d, &["resume", &id, "--timeout", "120s"]);
    assert_eq!(code, Some(0), "{err}");
    let info: serde_json::Value = serde_json::from_str(out.trim()).expect("resume prints JSON");
    assert_eq!(info["paused"], false, "{out}");
    let end = info["end_at_ms"].as_u64().unwrap_or(0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    assert!(
        end > now_ms + 100_000 && end <= now_ms + 121_000,
        "end_at_ms {end}, now {now_ms}"
    );
    assert!(!snapshot.exists(), "the snapshot stays after the resume");

    let (out, _, r) = exec(&mut c, &id, "bash", "cat /home/user/keep.txt; date +%s").await;
    assert_eq!(r.exit_code, Some(0));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("kept"));
    let guest_now: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("date +%s");
    let host_now = now_ms / 1000;
    assert!(
        guest_now.abs_diff(host_now) <= 2,
        "guest clock {guest_now}, host {host_now}"
    );
    let mut p = c
        .connect_process(ProcessSelector {
            sandbox_id: id.clone(),
            pid,
            tag: String::new(),
        })
        .await
        .expect("the process is still there")
        .into_inner();
    c.send_input(input("7\n")).await.expect("input after resume");
    read_until(&mut p, "sum 12").await;
    let (_, results, _) = run_code(&mut c, &id, "", "python", "x + 1").await;
    assert_eq!(results, vec!["42".to_string()]);
    drop(p);

    // Paused again, then killed: the snapshot goes with it.
    let (code, _, err) = cli(&d, &["pause", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(snapshot.join("state").is_file());
    let (code, _, err) = cli(&d, &["kill", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!snapshot.exists(), "the snapshot stays after kill");
    let e = c
        .get(SandboxRef {
            sandbox_id: id.clone(),
        })
        .await
        .expect_err("killed");
    assert_eq!(e.code(), tonic::Code::NotFound);

    // A sandbox paused when the daemon stops leaves nothing (`stop` checks).
    let other = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("create")
        .into_inner();
    c.pause(SandboxRef {
        sandbox_id: other.sandbox_id.clone(),
    })
    .await
    .expect("pause");
    drop(c);
    assert_eq!(d.stop(), Some(0));
}

/// A sandbox may ask for another image or size than the daemon's pool: it
/// gets a VM of that kind (booted on demand), its programs are checked
/// against that image's languages, and the memory cap counts each sandbox's
/// own size. Bad names are refused before a VM is taken; the on-demand pool
/// goes with the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_get_the_image_and_size_they_ask_for() {
    let d = start_daemon(&["--warm", "1", "--max", "3", "--max-sandbox-memory", "1024"]);
    let mut c = sandboxes(&d).await;
    let create = |image: &str, size: &str| CreateSandboxRequest {
        image: image.into(),
        size: size.into(),
        ..Default::default()
    };
    for (image, size, want) in [
        ("", "huge", "size"),
        ("../etc", "", "image"),
        ("never-built", "", "images build --image never-built"),
    ] {
        let e = c.create(create(image, size)).await.expect_err("bad input");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(want), "{want}: {}", e.message());
    }

    let full = c
        .create(create("full", "medium"))
        .await
        .expect("a full, medium sandbox")
        .into_inner();
    assert_eq!(
        (full.image.as_str(), full.memory_mib, full.vcpus),
        ("full", 512, 2),
        "{full:?}"
    );
    let (out, err, r) = exec(
        &mut c,
        &full.sandbox_id,
        "bash",
        "nproc; awk '/MemTotal/ {print ($2 > 400000)}' /proc/meminfo; command -v go",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["2", "1"], "{out}");
    assert!(lines.get(2).is_some_and(|l| l.ends_with("/go")), "{out}");

    let small = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("a sandbox of the daemon's kind")
        .into_inner();
    assert_eq!(
        (small.image.as_str(), small.memory_mib),
        ("default", 256),
        "{small:?}"
    );
    let e = c
        .exec(SandboxExecRequest {
            sandbox_id: small.sandbox_id.clone(),
            request: Some(req("go", "package main\nfunc main() {}")),
        })
        .await
        .expect_err("go is not in the default image");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // 512 + 256 MiB live: another 512 would pass 1024, another 256 fits.
    let e = c
        .create(create("", "medium"))
        .await
        .expect_err("past the memory cap");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("768 MiB"), "{}", e.message());
    let (code, out, err) = cli(&d, &["create", "--size", "small", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"memory_mib\":256"), "{out}");

    drop(c);
    assert_eq!(d.stop(), Some(0));
}

async fn info(c: &mut SandboxesClient<Channel>, id: &str) -> neurovisor_proto::v1::SandboxInfo {
    c.get(SandboxRef {
        sandbox_id: id.to_string(),
    })
    .await
    .expect("get")
    .into_inner()
}

/// `on_timeout: pause`: the timeout pauses the sandbox instead of killing
/// it; with `auto_resume` the next call that needs it resumes it (its file
/// is there), without it the call is refused. A daemon SIGKILLed with a
/// paused sandbox leaves its VMs to their keepers and its snapshot to the
/// next start, which removes it. The pauses and the resume run while both
/// host cores are busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_pauses_a_sandbox_a_call_resumes_it_and_a_sigkilled_daemon_leaves_no_snapshot() {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    let d = start_daemon_in(state.clone(), &["--warm", "0", "--max", "2", "--snapshot"]);
    let mut c = sandboxes(&d).await;
    let create = |auto_resume: bool| CreateSandboxRequest {
        timeout_s: 3,
        on_timeout: "pause".into(),
        auto_resume,
        ..Default::default()
    };
    let woken = c.create(create(true)).await.expect("create").into_inner();
    assert_eq!((woken.on_timeout.as_str(), woken.auto_resume), ("pause", true));
    let asleep = c.create(create(false)).await.expect("create").into_inner();
    let e = c
        .create(CreateSandboxRequest {
            on_timeout: "hibernate".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown action");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"kill\" or \"pause\""), "{e:?}");
    let (_, _, r) = exec(
        &mut c,
        &woken.sandbox_id,
        "bash",
        "echo kept > /home/user/keep.txt",
    )
    .await;
    assert_eq!(r.exit_code, Some(0));

    // The pauses and the resume run with both cores busy.
    let load = common::Load::start(2);

    for id in [&woken.sandbox_id, &asleep.sandbox_id] {
        let until = Instant::now() + Duration::from_secs(60);
        while !info(&mut c, id).await.paused {
            assert!(
                Instant::now() < until,
                "sandbox {id} was not paused at its timeout"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_until(
        "the paused sandboxes' VMs to be gone",
        Duration::from_secs(10),
        || d.vm_processes().is_empty(),
    );
    let e = c
        .stat(path_req(&asleep.sandbox_id, "/", ""))
        .await
        .expect_err("a paused sandbox without auto_resume");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // The call resumes it and is answered; its timeout starts again.
    let st = c
        .stat(path_req(&woken.sandbox_id, "keep.txt", ""))
        .await
        .expect("stat resumes the sandbox")
        .into_inner();
    assert_eq!(st.size, 5);
    let now = info(&mut c, &woken.sandbox_id).await;
    assert!(!now.paused && now.end_at_ms > 0, "{now:?}");
    let (out, _, r) = exec(&mut c, &woken.sandbox_id, "bash", "cat /home/user/keep.txt").await;
    assert_eq!((out.as_str(), r.exit_code), ("kept\n", Some(0)));
    drop(load);

    // SIGKILL with a paused sandbox: its snapshot outlives the daemon until
    // the next start on the same state directory.
    let snapshot = state.path().join("daemon/paused").join(&asleep.sandbox_id);
    assert!(
        snapshot.join("state").is_file(),
        "no snapshot at {}",
        snapshot.display()
    );
    drop(c);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    let needle = state.path().display().to_string();
    drop(d);
    wait_until(
        "the VMs to die with their daemon",
        Duration::from_secs(10),
        || common::processes_mentioning(&needle).is_empty(),
    );
    wait_until("the VM cgroups to be removed", Duration::from_secs(10), || {
        common::unowned_vm_cgroups().is_empty()
    });
    let d2 = start_daemon_in(state, &["--warm", "0", "--max", "1"]);
    assert!(!snapshot.exists(), "the next daemon left {}", snapshot.display());
    let mut c = sandboxes(&d2).await;
    let e = c
        .get(SandboxRef {
            sandbox_id: asleep.sandbox_id.clone(),
        })
        .await
        .expect_err("no sandbox outlives its daemon");
    assert_eq!(e.code(), tonic::Code::NotFound);
    drop(c);
    assert_eq!(d2.stop(), Some(0));
}
