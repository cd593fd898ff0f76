//! A `neurovisor serve` child process for tests: started with its own state
//! directory (gRPC on its Unix socket there, metrics on a free port), stopped
//! with SIGTERM and checked for leftovers.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::ExecuteRequest;
use tonic::transport::Channel;

use super::{assert_no_leftovers, processes_mentioning};

pub struct Daemon {
    pub child: Option<Child>,
    pub state: Arc<tempfile::TempDir>,
    /// Its `--state-dir`: `state`, or a directory inside it.
    pub dir: PathBuf,
    /// The daemon's Unix socket (`<state>/neurovisor.sock`).
    pub socket: PathBuf,
    /// `host:port` of the TCP listener, when started with `--listen`.
    pub tcp: Option<String>,
    pub metrics: String,
    pub log: Arc<Mutex<String>>,
}

pub fn start_daemon_in(state: Arc<tempfile::TempDir>, extra: &[&str]) -> Daemon {
    start_daemon_sized(state, "small", extra)
}

/// A daemon whose pool boots VMs of `size` (`small` elsewhere).
pub fn start_daemon_sized(state: Arc<tempfile::TempDir>, size: &str, extra: &[&str]) -> Daemon {
    let dir = state.path().to_path_buf();
    spawn_daemon(state, dir, size, extra)
}

/// A daemon with `--state-dir dir` (inside `state`, which outlives it).
pub fn start_daemon_at(state: Arc<tempfile::TempDir>, dir: PathBuf, extra: &[&str]) -> Daemon {
    spawn_daemon(state, dir, "small", extra)
}

fn spawn_daemon(state: Arc<tempfile::TempDir>, dir: PathBuf, size: &str, extra: &[&str]) -> Daemon {
    spawn_daemon_with(
        Command::new(env!("CARGO_BIN_EXE_neurovisor")),
        state,
        dir,
        size,
        extra,
    )
}

/// A daemon in a network namespace of its own where only loopback exists
/// (its TCP listeners are reachable only from that namespace: enter it with
/// `nsenter --net=/proc/<pid>/ns/net`). The daemon keeps the pid `unshare`
/// and `sh` had (both exec).
pub fn start_daemon_offline(extra: &[&str]) -> Daemon {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" \"$@\"",
    ])
    .arg(env!("CARGO_BIN_EXE_neurovisor"));
    let dir = state.path().to_path_buf();
    spawn_daemon_with(cmd, state, dir, "small", extra)
}

fn spawn_daemon_with(
    mut cmd: Command,
    state: Arc<tempfile::TempDir>,
    dir: PathBuf,
    size: &str,
    extra: &[&str],
) -> Daemon {
    cmd.args(["serve", "--metrics-addr", "127.0.0.1:0", "--size", size])
        .arg("--state-dir")
        .arg(&dir)
        .args(extra)
        .env("NEUROVISOR_LOG", "neurovisor=info")
        // Tests choose their model explicitly; a developer's default must not leak in.
        .env_remove("NEUROVISOR_MODEL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn daemon");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr"));
    let log = Arc::new(Mutex::new(String::new()));
    let mut first = String::new();
    let (socket, tcp, metrics) = loop {
        first.clear();
        if lines.read_line(&mut first).expect("read") == 0 {
            let _ = child.wait();
            panic!("daemon exited before serving: {}", log.lock().expect("log"));
        }
        log.lock().expect("log").push_str(&first);
        // `serving gRPC on unix:PATH[ and http(s)://ADDR (token in FILE)], metrics on http://ADDR/metrics (...)`
        if let Some(rest) = first.trim().strip_prefix("neurovisor: serving gRPC on unix:") {
            let (g, m) = rest.split_once(", metrics on http://").expect("format");
            let (socket, tcp) = match g.split_once(" and ") {
                Some((s, t)) => {
                    let t = t.split_once("://").expect("scheme").1;
                    (s, Some(t.split(' ').next().expect("tcp addr").to_string()))
                }
                None => (g, None),
            };
            break (
                PathBuf::from(socket),
                tcp,
                m.split('/').next().expect("addr").to_string(),
            );
        }
    };
    let l = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while lines.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            l.lock().expect("log").push_str(&line);
            line.clear();
        }
    });
    Daemon {
        child: Some(child),
        state,
        dir,
        socket,
        tcp,
        metrics,
        log,
    }
}

/// A daemon whose process also has `env` (e.g. `NEUROVISOR_CONFIG_DIR`).
pub fn start_daemon_with_env(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    let dir = state.path().to_path_buf();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_neurovisor"));
    cmd.envs(env.iter().copied());
    spawn_daemon_with(cmd, state, dir, "small", extra)
}

pub fn start_daemon(extra: &[&str]) -> Daemon {
    let state = Arc::new(tempfile::Builder::new().prefix("nvd-").tempdir().expect("state"));
    start_daemon_in(state, extra)
}

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// The sum of every sample of metric `name` (all label sets) on its
    /// `/metrics`, 0 when it has none.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, text) = http_get(&self.metrics, "/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                (metric == name).then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(&self.metrics, "/healthz").1).expect("healthz json")
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&serde_json::Value) -> bool) {
        let until = Instant::now() + timeout;
        loop {
            let st = self.status();
            if f(&st) {
                return;
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}: {st}\ndaemon log:\n{}",
                self.log.lock().map(|l| l.clone()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_warm(&self, n: u64) {
        self.wait_for(&format!("{n} warm VMs"), Duration::from_secs(120), |st| {
            st["warm"] == n
        });
    }

    /// `--addr` for `neurovisor run`: `unix:<socket>`.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// A gRPC channel over the daemon's Unix socket.
    pub async fn channel(&self) -> Channel {
        neurovisor::daemon_client::unix_channel(&self.socket, false)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:?}", self.socket.display()))
    }

    pub async fn client(&self) -> SandboxClient<Channel> {
        SandboxClient::new(self.channel().await)
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn vm_processes(&self) -> Vec<String> {
        processes_mentioning(&self.state.path().display().to_string())
            .into_iter()
            .filter(|p| p.contains("qemu-system"))
            .collect()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    /// SIGTERM, wait for exit; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let code = self
            .child
            .take()
            .and_then(|mut c| c.wait().ok())
            .and_then(|s| s.code());
        assert_no_leftovers(&self.dir);
        let leaked = super::unowned_vm_cgroups();
        assert!(leaked.is_empty(), "VM cgroups left with no owner: {leaked:?}");
        assert!(
            !self.socket.exists(),
            "socket {} not removed at shutdown",
            self.socket.display()
        );
        let dir = self.dir.join("daemon");
        assert!(
            !dir.exists(),
            "daemon state dir not removed (exit {code:?}): {:?}\n{}",
            std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()),
            self.log.lock().map(|l| l.clone()).unwrap_or_default()
        );
        code
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if std::thread::panicking() {
                // A failed test: how the daemon ended (a seccomp kill is
                // signal 31) and what it logged.
                eprintln!(
                    "daemon status: {:?}\ndaemon log:\n{}",
                    c.try_wait(),
                    self.log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn req(language: &str, code: &str) -> ExecuteRequest {
    ExecuteRequest {
        language: language.into(),
        code: code.into(),
        ..Default::default()
    }
}

/// A stand-in for Ollama speaking its real `/api/generate` wire format.
pub async fn fake_ollama() -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/api/generate",
        post(|axum::Json(body): axum::Json<serde_json::Value>| async move {
            if body["model"] == "missing" {
                return (
                    axum::http::StatusCode::NOT_FOUND,
                    axum::Json(
                        serde_json::json!({"error": "model 'missing' not found, try pulling it first"}),
                    ),
                );
            }
            (
                axum::http::StatusCode::OK,
                axum::Json(serde_json::json!({
                    "model": body["model"], "created_at": "2026-11-22T12:00:00Z",
                    "response": format!("echo: {}", body["prompt"].as_str().unwrap_or("")),
                    "done": true, "done_reason": "stop", "total_duration": 5_043_500_667u64,
                    "load_duration": 5_025_959u64, "prompt_eval_count": 26, "eval_count": 290
                })),
            )
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}
