//! The daemon cannot be made to hold without bound or to break: clients that
//! never read, a queue that overflows, and 1,000 generated hostile requests
//! (issue 10). Real daemon, real VMs.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon, Daemon};
use neurovisor_proto::v1::ExecuteRequest;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tonic::Code;

/// The daemon's resident memory, from /proc.
fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// The documented bound (README, "Limits"): the daemon's RSS under load from
/// clients that never read stays below this.
const RSS_BOUND_MIB: f64 = 160.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_never_read_are_bounded_and_others_are_served() {
    let d = start_daemon(&[
        "--warm",
        "1",
        "--max",
        "2",
        "--max-queued",
        "8",
        "--client-stall-timeout",
        "3s",
        "--queue-timeout",
        "90s",
    ]);
    d.wait_warm(1);
    let pid = d.pid();
    let base = rss_mib(pid);
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            let mut peak = 0f64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        (stop, h)
    };

    // 40 clients, each on its own connection, ask for 32 MiB of output and
    // never read a byte of it.
    let flood = "import sys\nchunk = 'x' * 65536\nwhile True:\n    sys.stdout.write(chunk)\n";
    let mut calls = Vec::new();
    for _ in 0..40 {
        let mut c = d.client().await;
        let r = ExecuteRequest {
            max_output_bytes: 32 << 20,
            timeout_ms: 60_000,
            ..req("python", flood)
        };
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = c.execute(r).await;
            (started.elapsed(), res.map(|r| r.into_inner()), c)
        }));
    }
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for call in calls {
        let (took, res, c) = call.await.expect("join");
        match res {
            Ok(stream) => held.push((stream, c)),
            Err(s) => refused.push((took, s)),
        }
    }
    // 2 run, 8 wait; the other 30 are refused at once.
    assert!(refused.len() >= 25, "only {} of 40 refused", refused.len());
    for (took, s) in &refused {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("--max-queued"), "{}", s.message());
        assert!(*took < Duration::from_millis(100), "refusal took {took:?}");
    }

    // A well-behaved client is served while the non-readers hold their streams
    // (each stalled one loses its VM after 3 s).
    let mut good = d.client().await;
    let started = Instant::now();
    let ok = loop {
        match good.execute_once(req("python", "print(6*7)")).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::ResourceExhausted && started.elapsed() < Duration::from_secs(120) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => panic!("the well-behaved client was not served: {s:?}"),
        }
    };
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "42\n");
    assert_eq!(ok.exit_code, Some(0));

    // Every held stream ends with a clear error once read: its client stalled.
    let mut stalled = 0;
    for (mut stream, _c) in held {
        let mut bytes = 0usize;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(120), stream.message()).await {
                Ok(Ok(Some(m))) => {
                    if let Some(neurovisor_proto::v1::execute_response::Event::Stdout(b)) = m.event {
                        bytes += b.len();
                    }
                }
                Ok(Ok(None)) => break None,
                Ok(Err(s)) => break Some(s),
                Err(_) => panic!("a held stream never ended"),
            }
        };
        let s = end.expect("a stalled stream ended without an error");
        assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
        assert!(s.message().contains("read none of its output"), "{}", s.message());
        // What was buffered for it is bounded by its queue, not by the 32 MiB asked.
        assert!(bytes < 4 << 20, "{bytes} bytes were buffered for one stalled client");
        stalled += 1;
    }
    assert!(stalled >= 2);
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.1.join().expect("sampler");
    eprintln!("daemon RSS: {base:.1} MiB idle, {peak:.1} MiB peak with 40 clients that never read");
    assert!(peak < RSS_BOUND_MIB, "daemon RSS peaked at {peak:.1} MiB (bound {RSS_BOUND_MIB} MiB)");
    d.wait_for("no active VMs", Duration::from_secs(60), |st| st["active"] == 0);
    assert_eq!(d.stop(), Some(0));
}

/// A gRPC codec that sends and receives raw bytes: garbage and wrong types
/// reach the daemon's decoder as they are.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// One hostile request: a structured one broken in one field, or raw bytes.
#[derive(Debug, Clone)]
enum Hostile {
    Request(ExecuteRequest, &'static str),
    Bytes(Vec<u8>),
}

fn weird_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[\u{0}-\u{1f}\u{7f}-\u{9f}]{1,20}",
        "[\u{202e}\u{200b}\u{feff}\u{fffd}\u{10ffff}\u{1f600}]{1,10}",
        Just("a\"} 1\nneurovisor_pool_warm_vms 1e9\n#".to_string()),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let base = || req("python", "print(1)");
    prop_oneof![
        weird_text().prop_filter("not a language", |l| !matches!(l.as_str(), "python" | "bash" | "javascript"))
            .prop_map(move |l| Hostile::Request(ExecuteRequest { language: l, ..base() }, "language:")),
        "[ \t\n\r]{0,8}".prop_map(move |c| Hostile::Request(ExecuteRequest { code: c, ..base() }, "code:")),
        (".{0,20}", ".{0,20}").prop_map(move |(a, b)| Hostile::Request(
            ExecuteRequest { code: format!("{a}\0{b}"), ..base() },
            "code:"
        )),
        (0usize..4, ".{0,10}").prop_map(move |(i, a)| {
            let mut args = vec!["ok".to_string(); i];
            args.push(format!("{a}\0"));
            Hostile::Request(ExecuteRequest { args, ..base() }, "args")
        }),
        ("[A-Z_]{1,8}", ".{0,10}").prop_map(move |(k, v)| Hostile::Request(
            ExecuteRequest { env: [(k, format!("{v}\0x"))].into(), ..base() },
            "env:"
        )),
        prop_oneof!["[0-9][A-Z]{0,5}", "[A-Z]{0,3}=[A-Z]{0,3}", "[a-z]{1,3}[-. ][a-z]{1,3}", weird_text()]
            .prop_filter("a valid name", |k| {
                !k.is_empty()
                    && !(k.chars().next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
                        && k.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()))
            })
            .prop_map(move |k| Hostile::Request(ExecuteRequest { env: [(k, "1".into())].into(), ..base() }, "env:")),
        (257usize..400).prop_map(move |n| Hostile::Request(
            ExecuteRequest { env: (0..n).map(|i| (format!("V{i}"), "1".into())).collect(), ..base() },
            "env:"
        )),
        (257usize..300).prop_map(move |n| Hostile::Request(
            ExecuteRequest { args: vec!["a".into(); n], ..base() },
            "args:"
        )),
        (3_600_001u32..=u32::MAX).prop_map(move |t| Hostile::Request(
            ExecuteRequest { timeout_ms: t, ..base() },
            "timeout:"
        )),
        ((64u64 << 20) + 1..=u64::MAX).prop_map(move |m| Hostile::Request(
            ExecuteRequest { max_output_bytes: m, ..base() },
            "max_output_bytes:"
        )),
        Just(Hostile::Request(
            ExecuteRequest { env: [("NEUROVISOR_TRACE_ID".into(), "x".into())].into(), ..base() },
            "env:"
        )),
        (1usize..64).prop_map(move |extra| Hostile::Request(
            ExecuteRequest { code: "x".repeat((1 << 20) + extra), ..base() },
            "code:"
        )),
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(Hostile::Bytes),
        // Valid protobuf framing, wrong types: field 1 (language) as a varint,
        // field 6 (timeout) as a string, unknown fields with every wire type.
        (any::<u64>(), ".{0,10}", any::<u32>()).prop_map(|(v, s, f)| {
            let mut b = vec![0x08];
            let mut x = v;
            loop {
                let byte = (x & 0x7f) as u8;
                x >>= 7;
                if x == 0 {
                    b.push(byte);
                    break;
                }
                b.push(byte | 0x80);
            }
            b.push(0x32);
            b.push(s.len() as u8);
            b.extend_from_slice(s.as_bytes());
            b.extend_from_slice(&[0xf8 | (f as u8 & 0x07), 0xff, 0xff, 0xff, 0xff, 0x0f]);
            Hostile::Bytes(b)
        }),
    ]
}

async fn raw_call(
    ch: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<tonic::Response<Vec<u8>>, tonic::Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    g.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
}

fn check_metrics(d: &Daemon) -> String {
    let (code, text) = common::daemon::http_get(&d.metrics, "/metrics");
    assert_eq!(code, 200);
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // promtool exits 1 for lint findings too (e.g. a counter's name); only a
    // parse error means the exposition is broken.
    assert!(
        !report.contains("error while linting") && !report.contains("text format parsing error"),
        "/metrics does not parse:\n{report}\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hostile_requests_get_clear_errors_and_break_nothing() {
    let ollama = common::daemon::fake_ollama().await;
    let d = start_daemon(&["--warm", "1", "--max", "2", "--ollama-host", &ollama]);
    d.wait_warm(1);
    let mut c = d.client().await;
    let ch = d.channel().await;

    let mut runner = TestRunner::deterministic();
    let strategy = hostile();
    let started = Instant::now();
    let (mut structured, mut raw) = (0, 0);
    for i in 0..1000 {
        let case = strategy.new_tree(&mut runner).expect("case").current();
        match case {
            Hostile::Request(r, field) => {
                structured += 1;
                let e = if i % 2 == 0 {
                    c.execute_once(r.clone()).await.map(|_| ()).unwrap_err()
                } else {
                    match c.execute(r.clone()).await {
                        Ok(s) => s.into_inner().message().await.map(|_| ()).unwrap_err(),
                        Err(e) => e,
                    }
                };
                assert_eq!(e.code(), Code::InvalidArgument, "case {i} {r:?}: {e:?}");
                assert!(e.message().starts_with(field), "case {i}: wanted {field}: {}", e.message());
                assert!(!e.message().contains('\0') && !e.message().contains('\n'), "{:?}", e.message());
            }
            Hostile::Bytes(b) => {
                raw += 1;
                let path = if i % 2 == 0 {
                    "/neurovisor.v1.Sandbox/ExecuteOnce"
                } else {
                    "/neurovisor.v1.Sandbox/Execute"
                };
                match raw_call(ch.clone(), path, b.clone()).await {
                    // Garbage can decode as a valid (empty-ish) message: then
                    // it must have been refused as such, not run.
                    Ok(_) => panic!("case {i}: {b:?} was accepted"),
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::InvalidArgument | Code::Internal),
                            "case {i}: {e:?}"
                        );
                        assert!(!e.message().is_empty());
                    }
                }
            }
        }
    }
    eprintln!(
        "{structured} structured and {raw} raw hostile requests in {:.1?}",
        started.elapsed()
    );

    // Forged and unbounded model names (the case): no forged line, no new series.
    let mut inf = neurovisor_proto::inference::inference_service_client::InferenceServiceClient::new(ch.clone());
    let forged = "a\"} 1\nneurovisor_pool_warm_vms 1e9\n#".to_string();
    for model in [forged.clone(), "m".repeat(5000), "qwen3".into()]
        .into_iter()
        .chain((0..100).map(|i| format!("model-{i}")))
    {
        let _ = inf
            .infer(neurovisor_proto::inference::InferRequest {
                prompt: "hi".into(),
                model,
            })
            .await;
    }
    let text = check_metrics(&d);
    assert!(
        !text.lines().any(|l| l.starts_with("neurovisor_pool_warm_vms 1e9")),
        "forged line in /metrics:\n{text}"
    );
    let model_series = text.lines().filter(|l| l.starts_with("neurovisor_requests_total{")).count();
    assert!(model_series <= 33, "{model_series} model series:\n{text}");
    assert!(text.contains("neurovisor_requests_total{model=\"other\"}"), "{text}");

    // Still up, nothing executed, no VM beyond the warm one.
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid()), None).is_ok());
    let st = d.status();
    assert_eq!(st["served"], 0, "a hostile request got a VM: {st}");
    assert!(d.vm_processes().len() <= 2, "{:?}", d.vm_processes());
    let ok = c.execute_once(req("python", "print(6*7)")).await.expect("a valid request").into_inner();
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "42\n");
    assert_eq!(d.stop(), Some(0));
}
