//! Firecracker's API: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! Each call opens its own connection (Firecracker's API server is single
//! threaded and calls are few), sends one request and reads the answer. Any
//! answer other than 2xx becomes [`VmmError::FirecrackerApi`] naming the call
//! (`PUT /drives/rootfs`) and carrying Firecracker's `fault_message`.
//!
//! The request bodies below follow Firecracker's OpenAPI description
//! (`firecracker-api.yaml`); the integration tests validate every request
//! against it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;

use super::VmmError;

/// How long one API call may take (Firecracker answers in milliseconds;
/// `InstanceStart` and snapshot calls are the slow ones).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to retry connecting while the socket exists but is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_secs(2);

/// A client for one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    /// Firecracker's own log file, whose tail is added to errors.
    log: Option<PathBuf>,
    timeout: Duration,
}

/// A failed call, before it is turned into a [`VmmError`].
struct CallError {
    status: Option<u16>,
    fault: String,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            log: None,
            timeout: CALL_TIMEOUT,
        }
    }

    /// Adds the tail of this file (Firecracker's logger output) to errors.
    pub fn with_log(mut self, log: impl Into<PathBuf>) -> Self {
        self.log = Some(log.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn put(&self, path: &str, body: &impl Serialize) -> Result<(), VmmError> {
        self.call(Method::PUT, path, body).await.map(|_| ())
    }

    pub async fn patch(&self, path: &str, body: &impl Serialize) -> Result<(), VmmError> {
        self.call(Method::PATCH, path, body).await.map(|_| ())
    }

    /// `GET path` (no body); returns the answer's body on 2xx.
    pub async fn get(&self, path: &str) -> Result<Bytes, VmmError> {
        self.send_call(Method::GET, path, None).await
    }

    /// `GET /`: the instance's id, state (`Not started`, `Running`, `Paused`) and version.
    pub async fn instance_info(&self) -> Result<InstanceInfo, VmmError> {
        let body = self.get("/").await?;
        serde_json::from_slice(&body).map_err(|e| {
            self.error(
                "GET /",
                None,
                format!("unexpected answer {}: {e}", String::from_utf8_lossy(&body)),
            )
        })
    }

    /// Sends one request with a JSON body; returns the answer's body on 2xx.
    pub async fn call(&self, method: Method, path: &str, body: &impl Serialize) -> Result<Bytes, VmmError> {
        let name = format!("{method} {path}");
        let json = serde_json::to_vec(body).map_err(|e| self.error(&name, None, e.to_string()))?;
        self.send_call(method, path, Some(json)).await
    }

    async fn send_call(&self, method: Method, path: &str, json: Option<Vec<u8>>) -> Result<Bytes, VmmError> {
        let name = format!("{method} {path}");
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if json.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(json.map(Bytes::from).unwrap_or_default()))
            .map_err(|e| self.error(&name, None, e.to_string()))?;
        tracing::debug!(call = %name, socket = %self.socket.display(), "Firecracker API");
        match tokio::time::timeout(self.timeout, self.send(request)).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(e)) => Err(self.error(&name, e.status, e.fault)),
            Err(_) => Err(self.error(&name, None, format!("no answer within {:?}", self.timeout))),
        }
    }

    fn error(&self, call: &str, status: Option<u16>, fault: String) -> VmmError {
        VmmError::FirecrackerApi {
            call: call.to_string(),
            status,
            fault,
            log_tail: self
                .log
                .as_deref()
                .map(|l| super::log_tail(l, 10))
                .unwrap_or_default(),
        }
    }

    async fn connect(&self) -> std::io::Result<UnixStream> {
        let deadline = tokio::time::Instant::now() + CONNECT_RETRY;
        loop {
            match UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                // The socket file appears at bind(), a moment before listen().
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Bytes, CallError> {
        let transport = |what: &str, e: &dyn std::fmt::Display| CallError {
            status: None,
            fault: format!("{what}: {e}"),
        };
        let stream = self
            .connect()
            .await
            .map_err(|e| transport(&format!("connect to {}", self.socket.display()), &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport("HTTP handshake", &e))?;
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport("request", &e))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transport("reading the answer", &e))?
                .to_bytes();
            // Dropping the sender lets the connection future finish.
            drop(sender);
            if status.is_success() {
                Ok(body)
            } else {
                Err(CallError {
                    status: Some(status.as_u16()),
                    fault: fault_message(&body),
                })
            }
        };
        let (result, _) = tokio::join!(exchange, conn);
        result
    }
}

/// Firecracker's error body is `{"fault_message": "..."}`; anything else is shown as is.
pub fn fault_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ApiError {
        fault_message: String,
    }
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => e.fault_message,
        Err(_) if body.is_empty() => "(no error message)".into(),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

// ---- Request bodies (definitions of firecracker-api.yaml) ----

/// `InstanceInfo` (the answer to `GET /`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

/// `Logger`
#[derive(Debug, Clone, Serialize)]
pub struct Logger {
    pub log_path: String,
    pub level: &'static str,
    pub show_level: bool,
    pub show_log_origin: bool,
}

/// `Metrics`
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `MachineConfiguration`
#[derive(Debug, Clone, Serialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
}

/// `BootSource`
#[derive(Debug, Clone, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    pub boot_args: String,
}

/// `TokenBucket`: `size` tokens, refilled completely every `refill_time` ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

impl TokenBucket {
    /// A bucket that allows `per_second` tokens a second.
    pub fn per_second(per_second: u64) -> Self {
        Self {
            size: per_second,
            refill_time: 1000,
            one_time_burst: None,
        }
    }
}

/// `RateLimiter`: bytes per second and/or operations per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Limits in bytes/s and operations/s; `None` when both are absent.
    pub fn from_rates(bytes_per_sec: Option<u64>, ops_per_sec: Option<u64>) -> Option<Self> {
        let rl = Self {
            bandwidth: bytes_per_sec.map(TokenBucket::per_second),
            ops: ops_per_sec.map(TokenBucket::per_second),
        };
        (rl != Self::default()).then_some(rl)
    }
}

/// `Drive` (virtio-block)
#[derive(Debug, Clone, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `NetworkInterface` (virtio-net on a TAP Firecracker opens by name)
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `Vsock`
#[derive(Debug, Clone, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

/// `EntropyDevice`
#[derive(Debug, Clone, Default, Serialize)]
pub struct EntropyDevice {}

/// `InstanceActionInfo`
#[derive(Debug, Clone, Serialize)]
pub struct InstanceAction {
    pub action_type: &'static str,
}

pub const INSTANCE_START: InstanceAction = InstanceAction {
    action_type: "InstanceStart",
};
pub const SEND_CTRL_ALT_DEL: InstanceAction = InstanceAction {
    action_type: "SendCtrlAltDel",
};

/// `Vm`
#[derive(Debug, Clone, Serialize)]
pub struct VmState {
    pub state: &'static str,
}

pub const PAUSED: VmState = VmState { state: "Paused" };
pub const RESUMED: VmState = VmState { state: "Resumed" };

/// `SnapshotCreateParams`
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotCreate {
    pub snapshot_path: String,
    pub mem_file_path: String,
    pub snapshot_type: &'static str,
}

/// `MemoryBackend`
#[derive(Debug, Clone, Serialize)]
pub struct MemoryBackend {
    pub backend_type: &'static str,
    pub backend_path: String,
}

/// `VsockOverride`
#[derive(Debug, Clone, Serialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `SnapshotLoadParams` (with `mem_backend`: `mem_file_path` is deprecated).
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_messages_are_extracted() {
        assert_eq!(fault_message(br#"{"fault_message":"bad drive"}"#), "bad drive");
        assert_eq!(fault_message(b"oops\n"), "oops");
        assert_eq!(fault_message(b""), "(no error message)");
    }

    #[test]
    fn rate_limiter_is_omitted_without_limits() {
        assert_eq!(RateLimiter::from_rates(None, None), None);
        let rl = RateLimiter::from_rates(Some(1 << 20), None).expect("limiter");
        assert_eq!(
            serde_json::to_value(rl).expect("json"),
            serde_json::json!({"bandwidth": {"size": 1048576, "refill_time": 1000}})
        );
    }
}
