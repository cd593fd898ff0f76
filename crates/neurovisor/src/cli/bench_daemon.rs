//! `neurovisor bench pool --daemon`: what a client of `neurovisor serve`
//! sees, side by side in one run: a daemon whose pool boots its VMs and one
//! whose pool restores them from a snapshot (`--snapshot`). Each is a real
//! `serve` child process with its own state directory; the bench talks gRPC
//! to its Unix socket (no CLI process per call): `print(1)` latency from a
//! warm pool, and throughput of short Python programs (a function and its
//! asserts, as an LLM agent's code tool sends) with C concurrent clients.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use neurovisor::daemon_client::{DaemonClient, DaemonEndpoint};
use neurovisor::{ExecRequest, Output, VmSize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::bench::summarize;

/// A short program of the kind evaluations send: a function plus asserts.
pub const SHORT_PROGRAM: &str = r#"
def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def is_palindrome(s):
    cleaned = [c.lower() for c in s if c.isalnum()]
    return cleaned == cleaned[::-1]


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def word_counts(text):
    counts = {}
    for w in text.split():
        w = w.strip(".,!?").lower()
        if w:
            counts[w] = counts.get(w, 0) + 1
    return counts


assert merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]) == [[1, 6], [8, 10], [15, 18]]
assert merge_intervals([[1, 4], [4, 5]]) == [[1, 5]]
assert merge_intervals([]) == []
assert is_palindrome("A man, a plan, a canal: Panama")
assert not is_palindrome("race a car")
assert [fib(i) for i in range(10)] == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
assert fib(50) == 12586269025
assert word_counts("the cat and the hat.") == {"the": 2, "cat": 1, "and": 1, "hat": 1}
assert sorted(word_counts("a A a").items()) == [("a", 3)]
print("all tests passed")
"#;

/// One `neurovisor serve` child, stopped (SIGTERM, then waited for) on drop.
struct Served {
    child: tokio::process::Child,
    socket: PathBuf,
    metrics: String,
}

impl Served {
    async fn start(
        dir: &Path,
        warm: usize,
        max: usize,
        size: VmSize,
        snapshot: bool,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args([
            "serve",
            "--metrics-addr",
            "127.0.0.1:0",
            "--queue-timeout",
            "300s",
        ])
        .arg("--warm")
        .arg(warm.to_string())
        .arg("--max")
        .arg(max.to_string())
        .arg("--size")
        .arg(size.name())
        .arg("--state-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        if snapshot {
            cmd.arg("--snapshot");
        }
        let mut child = cmd.spawn().map_err(|e| format!("start neurovisor serve: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let serving = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.trim().strip_prefix("neurovisor: serving gRPC on unix:") {
                    return Some(rest.to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or("neurovisor serve exited or said nothing within 60 s")?;
        // The daemon logs to stderr: keep reading it so that it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, rest) = serving
            .split_once(", metrics on http://")
            .ok_or("unexpected serve output")?;
        let metrics = rest.split('/').next().unwrap_or_default().to_string();
        Ok(Self {
            child,
            socket: socket.into(),
            metrics,
        })
    }

    async fn status(&self) -> Result<serde_json::Value, String> {
        reqwest::get(format!("http://{}/healthz", self.metrics))
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())
    }

    /// Until `n` VMs are warm and none is busy.
    async fn wait_warm(&self, n: usize) -> Result<(), String> {
        let until = Instant::now() + Duration::from_secs(180);
        loop {
            let st = self.status().await?;
            if st["warm"].as_u64() >= Some(n as u64) && st["active"] == 0 {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(format!("the daemon's pool did not fill within 180 s: {st}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn client(&self) -> Result<DaemonClient, String> {
        DaemonClient::connect(&DaemonEndpoint::unix(&self.socket))
            .await
            .map_err(|e| e.to_string())
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Runs `code` through `client`; returns the latency in ms.
async fn call(client: &mut DaemonClient, code: &str, want: &[u8]) -> Result<f64, String> {
    let mut out = Vec::new();
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            out.extend_from_slice(b)
        }
    };
    let t = Instant::now();
    let r = client
        .execute(&ExecRequest::new("python", code), &mut sink)
        .await
        .map_err(|e| e.to_string())?;
    if out != want || r.outcome.exit_code != Some(0) {
        return Err(format!(
            "the program printed {:?} and exited {:?}",
            String::from_utf8_lossy(&out),
            r.outcome.exit_code
        ));
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

pub struct DaemonBench {
    pub runs: usize,
    pub warm: usize,
    pub max: usize,
    pub size: VmSize,
    pub programs: usize,
    pub concurrency: usize,
}

async fn one_daemon(b: &DaemonBench, dir: &Path, snapshot: bool) -> Result<serde_json::Value, String> {
    let d = Served::start(dir, b.warm, b.max, b.size, snapshot).await?;
    let result = async {
        let mut client = d.client().await?;
        let mut print1 = Vec::new();
        for _ in 0..b.runs.max(1) {
            d.wait_warm(b.warm).await?;
            print1.push(call(&mut client, "print(1)", b"1\n").await?);
        }
        d.wait_warm(b.warm).await?;
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..b.concurrency.max(1) {
            let (mut c, next, total) = (d.client().await?, next.clone(), b.programs);
            workers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    lat.push(call(&mut c, SHORT_PROGRAM, b"all tests passed\n").await?);
                }
                Ok::<_, String>(lat)
            }));
        }
        let mut latencies = Vec::new();
        for w in workers {
            latencies.extend(w.await.map_err(|e| e.to_string())??);
        }
        let secs = started.elapsed().as_secs_f64();
        Ok::<_, String>(json!({
            "print1_ms": summarize(&print1),
            "programs": b.programs, "seconds": secs,
            "programs_per_second": b.programs as f64 / secs,
            "program_latency_ms": summarize(&latencies),
        }))
    }
    .await;
    d.stop().await;
    result
}

/// Both daemons, one after the other, on the same host and images.
pub async fn run(b: &DaemonBench) -> Result<serde_json::Value, String> {
    let state = tempfile::Builder::new()
        .prefix("bench-daemon-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| e.to_string())?;
    let booted = one_daemon(b, &state.path().join("boot"), false).await?;
    let restored = one_daemon(b, &state.path().join("snapshot"), true).await?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "warm": b.warm, "max": b.max, "size": b.size, "concurrency": b.concurrency.max(1),
        "booted": booted, "restored": restored,
        "ratio_throughput_restored_to_booted": f(&restored, "programs_per_second") / f(&booted, "programs_per_second"),
    }))
}

pub fn print(v: &serde_json::Value) {
    // One row: the value at `path` (keys below each daemon's result) for both.
    let row = |label: String, path: &[&str]| {
        let at = |d: &str| {
            path.iter()
                .fold(&v[d], |x, k| &x[*k])
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        println!("{label:<52} {:>12.2} {:>12.2}", at("booted"), at("restored"));
    };
    println!(
        "through the daemon (gRPC on its Unix socket, no CLI process), warm {}, max {}, {} clients:",
        v["warm"], v["max"], v["concurrency"]
    );
    println!("{:<52} {:>12} {:>12}", "", "VMs booted", "VMs restored");
    row(
        "print(1) from the warm pool, p50 ms (target <= 60)".into(),
        &["print1_ms", "p50"],
    );
    row(
        "print(1) from the warm pool, p95 ms".into(),
        &["print1_ms", "p95"],
    );
    row(
        format!("short programs/s ({} programs)", v["booted"]["programs"]),
        &["programs_per_second"],
    );
    row(
        "short program latency p50 ms".into(),
        &["program_latency_ms", "p50"],
    );
    println!(
        "restored / booted throughput: {:.2}x; restored vs the 0.97 programs/s measured before snapshots: {:.2}x (target >= 3x)",
        v["ratio_throughput_restored_to_booted"].as_f64().unwrap_or(f64::NAN),
        v["restored"]["programs_per_second"].as_f64().unwrap_or(f64::NAN) / 0.97
    );
}
