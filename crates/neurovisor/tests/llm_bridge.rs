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
use neurovisor_proto::v1::{execute_response::Event, ExecuteResult};

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
    let mut s = c.execute(r).await?.into_inner();
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
