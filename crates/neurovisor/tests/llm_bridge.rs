//! The inference bridge against real VMs: a program in the guest calls
//! `http://127.0.0.1:11434` and reaches a test LLM server on the host (no
//! network device: the agent's channel carries it), with the request's trace
//! id, the host's API key in place of the program's, its path kept on the
//! configured server, per-VM request limits (429) counted on `/metrics`;
//! without the bridge nothing listens there, and a daemon without one
//! refuses requests that ask for it.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::daemon::{req, start_daemon};
use neurovisor_proto::v1::sandboxes_client::SandboxesClient;
use neurovisor_proto::v1::{
    execute_response::Event, process_event::Event as PEvent, CreateSandboxRequest, ExecuteResult,
    SandboxExecRequest, SandboxRef, StartProcessRequest,
};

/// What the test server saw of one request: (path, x-trace-id,
/// traceparent, authorization).
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A stand-in for Ollama's `/api/generate` (any path answers the same way)
/// that records what reached it.
async fn recording_llm() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let h = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let row = (path, h("x-trace-id"), h("traceparent"), h("authorization"));
            if let Ok(mut seen) = record.lock() {
                seen.push(row);
            }
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            axum::Json(serde_json::json!({
                "model": v["model"], "response": format!("echo: {}", v["prompt"].as_str().unwrap_or("")),
                "done": true
            }))
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}"), seen)
}

/// A guest program: POSTs `n` prompts to the bridge, prints one line per
/// answer (`200 echo: ...` or `429`), or the error.
fn caller(n: usize, path: &str) -> String {
    format!(
        r#"
import json, urllib.request, urllib.error
for i in range({n}):
    r = urllib.request.Request("http://127.0.0.1:11434{path}",
        data=json.dumps({{"model": "m", "prompt": "hello %d" % i}}).encode(),
        headers={{"Content-Type": "application/json", "Authorization": "Bearer guest-key"}})
    try:
        with urllib.request.urlopen(r, timeout=20) as a:
            print(a.status, json.load(a)["response"], flush=True)
    except urllib.error.HTTPError as e:
        print(e.code, flush=True)
    except Exception as e:
        print("error", type(e).__name__, e, flush=True)
"#
    )
}

async fn execute(
    c: &mut neurovisor_proto::v1::sandbox_client::SandboxClient<tonic::transport::Channel>,
    r: impl tonic::IntoRequest<neurovisor_proto::v1::ExecuteRequest>,
) -> Result<(String, ExecuteResult), tonic::Status> {
    collect(c.execute(r).await?.into_inner()).await
}

/// An execution's stdout and result.
async fn collect(
    mut s: tonic::Streaming<neurovisor_proto::v1::ExecuteResponse>,
) -> Result<(String, ExecuteResult), tonic::Status> {
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        match m.event {
            Some(Event::Stdout(b)) => out.extend_from_slice(&b),
            Some(Event::Result(r)) => return Ok((String::from_utf8_lossy(&out).into_owned(), r)),
            _ => {}
        }
    }
    Err(tonic::Status::internal("no result"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_program_reaches_the_llm_server_through_the_bridge_within_its_limits() {
    let (llm, seen) = recording_llm().await;
    let d = start_daemon(&[
        "--warm",
        "1",
        "--max",
        "2",
        "--llm-bridge",
        "--llm-bridge-url",
        &llm,
        "--llm-bridge-rate",
        "1",
        // Restored VMs (their agent on a virtio-serial port), which pause.
        "--snapshot",
    ]);
    let mut c = d.client().await;

    // One request: answered by the server, with the execution's trace id.
    let mut r = req("python", &caller(1, "/api/generate?stream=false"));
    r.llm_bridge = true;
    let mut call = tonic::Request::new(r);
    let trace = "01939a6e-8f4c-7a1b-9c2d-3e4f5a6b7c8d";
    call.metadata_mut()
        .insert("x-trace-id", trace.parse().expect("ascii"));
    let (out, res) = execute(&mut c, call).await.expect("execute");
    assert_eq!(res.exit_code, Some(0), "{out}");
    assert_eq!(res.trace_id, trace);
    assert_eq!(out, "200 echo: hello 0\n");
    {
        let seen = seen.lock().expect("seen");
        let (path, trace_id, traceparent, auth) = seen.last().expect("a request reached the server").clone();
        assert_eq!(path, "/api/generate?stream=false");
        assert_eq!(trace_id, res.trace_id, "the execution's trace id");
        assert!(
            traceparent.starts_with(&format!("00-{}-", res.trace_id.replace('-', ""))),
            "{traceparent}"
        );
        // Without a host key the program's own goes through.
        assert_eq!(auth, "Bearer guest-key");
    }

    // A path that names another host stays a path on the server.
    let mut r = req("python", &caller(1, "/http://192.0.2.1/x"));
    r.llm_bridge = true;
    let (out, _) = execute(&mut c, r).await.expect("execute");
    assert!(out.starts_with("200 "), "{out}");
    assert_eq!(
        seen.lock().expect("seen").last().expect("seen").0,
        "/http://192.0.2.1/x"
    );

    // 1 request/s (a bucket of 2): a burst of 8 gets 429s, and /metrics counts them.
    let before = seen.lock().expect("seen").len();
    let mut r = req("python", &caller(8, "/api/generate"));
    r.llm_bridge = true;
    let (out, res) = execute(&mut c, r).await.expect("execute");
    assert_eq!(res.exit_code, Some(0), "{out}");
    let ok = out.lines().filter(|l| l.starts_with("200 echo: hello")).count();
    let limited = out.lines().filter(|l| *l == "429").count();
    assert_eq!(ok + limited, 8, "{out}");
    assert!(ok >= 1 && limited >= 1, "{out}");
    assert_eq!(
        seen.lock().expect("seen").len() - before,
        ok,
        "429s never reach the server"
    );
    assert!(d.metric_sum("neurovisor_llm_bridge_requests_total") >= 10.0);

    sandboxes_use_the_bridge(&d).await;

    // Without asking for it, nothing listens in the VM.
    let (out, _) = execute(&mut c, req("python", &caller(1, "/api/generate")))
        .await
        .expect("execute");
    assert!(out.starts_with("error URLError"), "{out}");
    drop(c);
    assert_eq!(d.stop(), Some(0));

    // A daemon without a bridge refuses the request before a VM is taken.
    let d = start_daemon(&["--warm", "0", "--max", "1"]);
    let mut c = d.client().await;
    let mut r = req("python", "print(1)");
    r.llm_bridge = true;
    let e = execute(&mut c, r).await.expect_err("no bridge");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("--llm-bridge"), "{e:?}");
    drop(c);
    assert_eq!(d.stop(), Some(0));
}

/// `neurovisor run --llm-bridge` (VMs booted directly): the host's API key
/// replaces the program's, which never sees it; a bad URL is one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_the_bridge_sends_the_hosts_key() {
    let (llm, seen) = recording_llm().await;
    let state = tempfile::Builder::new().prefix("nvbr-").tempdir().expect("state");
    let code = caller(1, "/v1/chat/completions")
        + "\nimport os\nprint(sorted(k for k in os.environ if 'KEY' in k))\n";
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_neurovisor"));
        c.args([
            "run",
            "--local",
            "--size",
            "small",
            "--llm-bridge",
            "--llm-bridge-key-env",
            "NV_TEST_LLM_KEY",
        ])
        .args(extra)
        .args(["--lang", "python", "-c", &code])
        .env("NEUROVISOR_STATE_DIR", state.path())
        .env("NV_TEST_LLM_KEY", "host-secret")
        .stdin(Stdio::null());
        tokio::task::spawn_blocking(move || c.output().expect("run neurovisor"))
    };
    let o = run(&["--llm-bridge-url", &llm]).await.expect("join");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out, "200 echo: hello 0\n[]\n");
    let (path, _, _, auth) = seen.lock().expect("seen").last().expect("seen").clone();
    assert_eq!(
        (path.as_str(), auth.as_str()),
        ("/v1/chat/completions", "Bearer host-secret")
    );

    let o = run(&["--llm-bridge-url", "localhost:11434"]).await.expect("join");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_ne!(o.status.code(), Some(0));
    assert!(err.contains("--llm-bridge-url localhost:11434"), "{err}");
    common::assert_no_leftovers(state.path());
}

/// Runs `code` in sandbox `id` with `Exec`: (stdout, result) or the error.
async fn sandbox_exec(
    c: &mut SandboxesClient<tonic::transport::Channel>,
    id: &str,
    code: &str,
    llm_bridge: bool,
) -> Result<(String, ExecuteResult), tonic::Status> {
    let mut r = req("python", code);
    r.llm_bridge = llm_bridge;
    let s = c
        .exec(SandboxExecRequest {
            sandbox_id: id.into(),
            request: Some(r),
        })
        .await?
        .into_inner();
    collect(s).await
}

/// A sandbox created with `llm_bridge` has the bridge for its life (its
/// background processes use it, also after a pause and resume); another gets it per `Exec`, and when a
/// program of its own holds the port, that `Exec` is refused and the sandbox
/// lives on.
async fn sandboxes_use_the_bridge(d: &common::daemon::Daemon) {
    let mut c = SandboxesClient::new(d.channel().await);
    let with = c
        .create(CreateSandboxRequest {
            llm_bridge: true,
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert!(with.llm_bridge);
    let mut p = c
        .start_process(StartProcessRequest {
            sandbox_id: with.sandbox_id.clone(),
            cmd: "python3".into(),
            args: vec!["-c".into(), caller(1, "/api/generate")],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = p.message().await.expect("events") {
        match e.event {
            Some(PEvent::Stdout(b)) => out.extend_from_slice(&b),
            Some(PEvent::End(_)) => break,
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&out), "200 echo: hello 0\n");
    // Paused and resumed: the resumed VM has the bridge again.
    let id = || SandboxRef {
        sandbox_id: with.sandbox_id.clone(),
    };
    c.pause(id()).await.expect("pause");
    c.resume(neurovisor_proto::v1::ResumeSandboxRequest {
        sandbox_id: with.sandbox_id.clone(),
        timeout_s: 0,
    })
    .await
    .expect("resume");
    // An Exec that asks for it too uses the sandbox's.
    let (out, _) = sandbox_exec(&mut c, &with.sandbox_id, &caller(1, "/api/generate"), true)
        .await
        .expect("exec");
    assert_eq!(out, "200 echo: hello 0\n");

    let without = c
        .create(CreateSandboxRequest::default())
        .await
        .expect("create")
        .into_inner();
    let (out, _) = sandbox_exec(&mut c, &without.sandbox_id, &caller(1, "/api/generate"), true)
        .await
        .expect("exec");
    assert_eq!(out, "200 echo: hello 0\n");
    let (out, _) = sandbox_exec(&mut c, &without.sandbox_id, &caller(1, "/api/generate"), false)
        .await
        .expect("exec");
    assert!(
        out.starts_with("error URLError"),
        "the bridge outlived its Exec: {out}"
    );
    // A program of the sandbox's own on the port.
    let mut holder = c
        .start_process(StartProcessRequest {
            sandbox_id: without.sandbox_id.clone(),
            cmd: "python3".into(),
            args: vec![
                "-c".into(),
                "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1', 11434))\ns.listen()\nprint('bound', flush=True)\ntime.sleep(600)".into(),
            ],
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    loop {
        match holder.message().await.expect("events").expect("bound").event {
            Some(PEvent::Stdout(b)) if b.starts_with(b"bound") => break,
            Some(PEvent::End(e)) => panic!("the port holder ended: {e:?}"),
            _ => {}
        }
    }
    let e = sandbox_exec(&mut c, &without.sandbox_id, "print(1)", true)
        .await
        .expect_err("the port is taken");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("llm_bridge"), "{e:?}");
    let (out, _) = sandbox_exec(&mut c, &without.sandbox_id, "print('alive')", false)
        .await
        .expect("the sandbox lives on");
    assert_eq!(out, "alive\n");
    drop(holder);
    for id in [with.sandbox_id, without.sandbox_id] {
        c.kill(SandboxRef { sandbox_id: id }).await.expect("kill");
    }
}
