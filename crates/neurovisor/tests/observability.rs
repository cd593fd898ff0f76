//! Observability end to end, against real components: a real Prometheus
//! server (Debian's) scrapes a daemon that ran executions and an agent task;
//! `promtool check metrics` and the monitoring stack's checker read a scrape;
//! a real OTLP/gRPC endpoint receives the spans of an execution and of an
//! agent task, each under its trace id, the guest's process span a descendant
//! of the request's; `run` pushes its metrics to a real Pushgateway and logs
//! JSON lines carrying its trace id.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::otlp::{descends, named, names, tree, Otlp};
use neurovisor_proto::v1::agent_client::AgentClient;
use neurovisor_proto::v1::RunTaskRequest;
use serde_json::{json, Value};

/// A server process of the test (Prometheus, Pushgateway), killed and
/// reaped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn get(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    std::net::TcpStream::connect(addr).ok()?;
    Some(common::daemon::http_get(addr, &format!("/{path}")))
}

fn wait_http(url: &str, what: &str, timeout: Duration) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if matches!(get(url), Some((200, _))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not come up at {url}");
}

/// A scripted Ollama `/api/chat` (NDJSON, its documented shape): the first
/// turn calls `execute_code`, the second answers.
async fn scripted_ollama() -> String {
    let turn = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/api/chat",
        axum::routing::post(move || {
            let n = turn.fetch_add(1, Ordering::SeqCst);
            async move {
                let message = if n == 0 {
                    json!({"role": "assistant", "content": "",
                           "tool_calls": [{"function": {"name": "execute_code",
                               "arguments": {"language": "python", "code": "print(6 * 7)"}}}]})
                } else {
                    json!({"role": "assistant", "content": "The answer is 42."})
                };
                let lines = [
                    json!({"model": "qwen3", "created_at": "2026-12-04T12:00:00Z", "message": message, "done": false}),
                    json!({"model": "qwen3", "created_at": "2026-12-04T12:00:01Z",
                           "message": {"role": "assistant", "content": ""}, "done_reason": "stop", "done": true,
                           "total_duration": 900_000_000u64, "load_duration": 250_000_000u64,
                           "prompt_eval_count": 26, "eval_count": 21}),
                ];
                let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
                ([("content-type", "application/x-ndjson")], body)
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

/// `/metrics` as Prometheus asks for it (OpenMetrics).
fn openmetrics_scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

fn hex_trace(uuid: &str) -> String {
    uuid.replace('-', "")
}

fn prometheus_query(base: &str, q: &str) -> Vec<Value> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some((200, body)) = get(&format!("{base}/api/v1/query?query={enc}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_and_otlp_see_a_daemons_executions_and_agent_task() {
    let otlp = Otlp::start().await;
    let ollama = scripted_ollama().await;
    let d = tokio::task::spawn_blocking({
        let (ollama, otlp) = (ollama.clone(), otlp.url());
        move || {
            common::daemon::start_daemon(&[
                "--warm",
                "1",
                "--max",
                "2",
                "--ollama-host",
                &ollama,
                "--otlp",
                &otlp,
            ])
        }
    })
    .await
    .expect("join");
    tokio::task::block_in_place(|| d.wait_warm(1));

    // One execution, under a trace id of the client's.
    let exec_trace = uuid::Uuid::now_v7().to_string();
    let mut c = d.client().await;
    let mut req = tonic::Request::new(common::daemon::req("python", "print('observed')"));
    req.metadata_mut()
        .insert("x-trace-id", exec_trace.parse().expect("ascii"));
    let r = c.execute_once(req).await.expect("execute").into_inner();
    assert_eq!(&r.stdout[..], b"observed\n");
    assert_eq!(r.trace_id, exec_trace);

    // One agent task (the daemon mints its trace id).
    let mut agent = AgentClient::new(d.channel().await);
    let resp = agent
        .run_task(RunTaskRequest {
            task: "What is 6 * 7?".into(),
            model: "qwen3".into(),
            max_iterations: 4,
            ..Default::default()
        })
        .await
        .expect("RunTask");
    let agent_trace = resp
        .metadata()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .expect("trace id")
        .to_string();
    let mut events = resp.into_inner();
    let mut answered = false;
    while let Some(ev) = events.message().await.expect("event") {
        answered |= format!("{ev:?}").contains("The answer is 42.");
    }
    assert!(answered, "the agent task did not answer");

    // A real Prometheus scrapes the daemon.
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: neurovisor\n    static_configs:\n      - targets: ['{}']\n",
            d.metrics
        ),
    )
    .expect("config");
    let _prometheus = Server(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian's `prometheus` package)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let until = Instant::now() + Duration::from_secs(60);
    let (mut executions, mut warm, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    while Instant::now() < until {
        executions = prometheus_query(&base, "neurovisor_executions_total{outcome=\"ok\"}");
        warm = prometheus_query(&base, "neurovisor_pool_warm_vms");
        tokens = prometheus_query(&base, "neurovisor_tokens_generated_total");
        if !executions.is_empty() && !warm.is_empty() && !tokens.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let value = |v: &[Value]| -> f64 {
        v.iter()
            .filter_map(|s| s["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()))
            .sum()
    };
    // The daemon's own execution and the agent's tool call.
    assert_eq!(value(&executions), 2.0, "{executions:?}");
    assert_eq!(executions[0]["metric"]["language"], "python", "{executions:?}");
    assert!(!warm.is_empty(), "no pool gauge in Prometheus");
    assert_eq!(value(&tokens), 42.0, "{tokens:?}");
    let up = prometheus_query(&base, "up{job=\"neurovisor\"}");
    assert_eq!(value(&up), 1.0, "{up:?}");

    // The scrape passes promtool and feeds the monitoring stack's checker.
    let (status, scrape) = common::daemon::http_get(&d.metrics, "/metrics");
    assert_eq!(status, 200);
    let families = scrape.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert!(families >= 30, "{families} families");
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, &scrape).expect("write scrape");
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("scrape"))
        .output()
        .expect("promtool");
    assert!(
        promtool.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let check = Command::new("python3")
        .arg(root.join("monitoring/check.py"))
        .arg("--metrics")
        .arg(&file)
        .current_dir(&root)
        .output()
        .expect("monitoring/check.py");
    assert!(
        check.status.success(),
        "monitoring/check.py: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Asked for OpenMetrics (as Prometheus asks), the execution's sample
    // links to its trace (an exemplar).
    let om = openmetrics_scrape(&d.metrics);
    assert!(om.trim_end().ends_with("# EOF"), "not OpenMetrics");
    assert!(
        om.contains(&format!("# {{trace_id=\"{}\"}}", hex_trace(&exec_trace))),
        "no exemplar of the execution's trace in the OpenMetrics scrape"
    );
    assert!(
        !scrape.contains("# EOF") && !scrape.contains("trace_id="),
        "a plain scrape got OpenMetrics"
    );

    // Traces: the execution, from the request to the guest's process.
    let t = hex_trace(&exec_trace);
    let want = [
        "grpc",
        "pool.acquire",
        "vm.execute",
        "guest.execute",
        "guest.process",
    ];
    let spans = otlp.wait_trace(&t, &want, Duration::from_secs(20)).await;
    let grpc = named(&spans, "grpc");
    assert_eq!(grpc.attributes.get("neurovisor.trace_id"), Some(&exec_trace));
    assert_eq!(grpc.service, "neurovisor");
    let process = named(&spans, "guest.process");
    assert!(
        descends(&spans, process, grpc),
        "guest.process is no descendant of the request's span:\n{}",
        tree(&spans)
    );
    let execute = named(&spans, "vm.execute");
    assert!(
        process.start_ns >= execute.start_ns && process.end_ns <= execute.end_ns + 1_000_000,
        "the guest's span lies outside the execution's:\n{}",
        tree(&spans)
    );
    println!("execution trace {exec_trace}:\n{}", tree(&spans));

    // The agent task: its LLM calls, tool call and execution in one trace.
    let t = hex_trace(&agent_trace);
    let want = [
        "grpc",
        "agent.task",
        "llm.call",
        "tool.call",
        "vm.execute",
        "guest.process",
    ];
    let spans = otlp.wait_trace(&t, &want, Duration::from_secs(20)).await;
    for n in want {
        named(&spans, n);
    }
    let llm_calls = spans.iter().filter(|s| s.name == "llm.call").count();
    assert_eq!(llm_calls, 2, "{:?}", names(&spans));
    assert!(descends(
        &spans,
        named(&spans, "guest.process"),
        named(&spans, "agent.task")
    ));
    println!("agent trace {agent_trace}:\n{}", tree(&spans));
    // Logs over OTLP carry their span's trace.
    let logs = otlp.logs();
    assert!(
        logs.iter().any(|l| l.trace_id == hex_trace(&exec_trace)),
        "no log record of the execution's trace among {} records",
        logs.len()
    );

    // `run` through the daemon: both processes export, one trace, the
    // daemon's request span a child of the CLI's (`traceparent`).
    let run_trace = uuid::Uuid::now_v7().to_string();
    let out = tokio::task::spawn_blocking({
        let (addr, url, run_trace) = (d.addr(), otlp.url(), run_trace.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_neurovisor"))
                .args(["run", "--addr", &addr, "--otlp", &url, "--trace-id", &run_trace])
                .args(["--lang", "bash", "-c", "echo via the daemon"])
                .output()
                .expect("run")
        }
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = hex_trace(&run_trace);
    let spans = otlp
        .wait_trace(&t, &["run", "grpc", "guest.process"], Duration::from_secs(20))
        .await;
    let (cli, daemon) = (named(&spans, "run"), named(&spans, "grpc"));
    assert!(
        descends(&spans, daemon, cli) && descends(&spans, named(&spans, "guest.process"), cli),
        "the daemon's spans did not join the CLI's trace:\n{}",
        tree(&spans)
    );
    println!("run through the daemon, trace {run_trace}:\n{}", tree(&spans));

    drop(c);
    drop(agent);
    let log = d.log_text();
    let _state = d.state.clone();
    d.stop();
    assert!(!log.contains("OTLP") || !log.contains("error"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exports_its_trace_pushes_its_metrics_and_logs_json() {
    let otlp = Otlp::start().await;
    let port = free_port();
    let data = tempfile::tempdir().expect("tmp");
    let _pushgateway = Server(
        Command::new("prometheus-pushgateway")
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--persistence.file={}", data.path().join("p").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus-pushgateway (Debian's package)"),
    );
    let gateway = format!("http://127.0.0.1:{port}");
    tokio::task::block_in_place(|| {
        wait_http(
            &format!("{gateway}/metrics"),
            "the Pushgateway",
            Duration::from_secs(20),
        )
    });
    let state = tempfile::Builder::new()
        .prefix("nvobs-")
        .tempdir()
        .expect("state");
    let trace = uuid::Uuid::now_v7().to_string();
    let url = otlp.url();
    let out = tokio::task::spawn_blocking({
        let (state, trace, gateway) = (state.path().to_path_buf(), trace.clone(), gateway.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_neurovisor"))
                .args([
                    "run",
                    "--local",
                    "--size",
                    "small",
                    "--lang",
                    "python",
                    "-v",
                    "--log-format",
                    "json",
                ])
                .args(["--trace-id", &trace, "--otlp", &url, "--pushgateway", &gateway])
                .arg("--state-dir")
                .arg(&state)
                .args(["-c", "import os; print(os.environ['NEUROVISOR_TRACE_ID'])"])
                .env("NEUROVISOR_LOG", "neurovisor=info")
                .output()
                .expect("run")
        }
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), trace);

    // JSON log lines, the run's trace id on those logged inside its span.
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no JSON log lines:\n{stderr}");
    assert!(
        lines.iter().any(|l| l.to_string().contains(&trace)),
        "no log line carries the trace id:\n{stderr}"
    );

    // The trace: run → boot and execution → the guest's process.
    let t = hex_trace(&trace);
    let spans = otlp
        .wait_trace(
            &t,
            &["run", "vm.boot", "vm.execute", "guest.process"],
            Duration::from_secs(10),
        )
        .await;
    let root = named(&spans, "run");
    assert!(
        root.parent_span_id.is_empty(),
        "the run's span is not the root:\n{}",
        tree(&spans)
    );
    assert!(
        descends(&spans, named(&spans, "guest.process"), root),
        "{}",
        tree(&spans)
    );
    assert!(
        descends(&spans, named(&spans, "vm.boot"), root),
        "{}",
        tree(&spans)
    );

    // The Pushgateway holds the run's metrics.
    let (_, pushed) = get(&format!("{gateway}/metrics")).expect("pushgateway");
    let executed = pushed
        .lines()
        .find(|l| l.starts_with("neurovisor_executions_total{") && l.contains("command=\"run\""))
        .unwrap_or_else(|| panic!("no pushed execution count:\n{pushed}"));
    assert!(
        executed.contains("outcome=\"ok\"") && executed.ends_with(" 1"),
        "{executed}"
    );
    assert!(pushed.contains("neurovisor_vm_boot_seconds_count{"), "{pushed}");

    // `agent` pushes too: its task, LLM calls, tokens and the execution.
    let ollama = scripted_ollama().await;
    let out = tokio::task::spawn_blocking({
        let (state, gateway) = (state.path().to_path_buf(), gateway.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_neurovisor"))
                .args([
                    "agent",
                    "What is 6 * 7?",
                    "--local",
                    "--size",
                    "small",
                    "--model",
                    "qwen3",
                ])
                .args(["--base-url", &ollama, "--pushgateway", &gateway])
                .arg("--state-dir")
                .arg(&state)
                .output()
                .expect("agent")
        }
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, pushed) = get(&format!("{gateway}/metrics")).expect("pushgateway");
    for want in [
        "neurovisor_agent_tasks_total{",
        "neurovisor_tokens_generated_total{",
        "neurovisor_executions_total{",
    ] {
        let line = pushed
            .lines()
            .find(|l| l.starts_with(want) && l.contains("command=\"agent\""))
            .unwrap_or_else(|| panic!("no pushed {want}...}} of the agent:\n{pushed}"));
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(v >= 1.0, "{line}");
    }

    // Bad URLs: one line naming the flag, before any VM.
    for (flag, bad) in [("--otlp", "localhost:4317"), ("--pushgateway", "ftp://x")] {
        let o = Command::new(env!("CARGO_BIN_EXE_neurovisor"))
            .args(["run", "--local", "--lang", "python", "-c", "print(1)", flag, bad])
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(flag), "{err}");
    }
    common::assert_no_leftovers(state.path());
}
