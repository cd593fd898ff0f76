//! `neurovisor run` against a running daemon (`--addr`, or one found at the
//! default address): the same output and exit codes as a direct run.

use std::net::SocketAddr;
use std::time::Duration;

use neurovisor::ExecOutcome;
use neurovisor::ExecRequest;
use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::{execute_response::Event, ExecuteRequest};
use tonic::transport::Endpoint;

pub const DEFAULT_DAEMON: &str = "127.0.0.1:50051";

/// Is a daemon listening at the default address? (A quick TCP probe.)
pub async fn default_daemon() -> Option<String> {
    let addr: SocketAddr = DEFAULT_DAEMON.parse().ok()?;
    let probe = tokio::time::timeout(Duration::from_millis(150), tokio::net::TcpStream::connect(addr)).await;
    matches!(probe, Ok(Ok(_))).then(|| DEFAULT_DAEMON.to_string())
}

pub enum RemoteError {
    /// The daemon rejected the request (INVALID_ARGUMENT).
    Invalid(String),
    Other(String),
}

pub async fn execute(
    addr: &str,
    req: &ExecRequest,
    on_output: &mut (dyn FnMut(neurovisor::Output<'_>) + Send),
) -> Result<ExecOutcome, RemoteError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| RemoteError::Other(format!("invalid daemon address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| {
        RemoteError::Other(format!(
            "cannot reach the daemon at {addr} ({e}); start it with `neurovisor serve`, or run without --addr"
        ))
    })?;
    let mut client = SandboxClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut request = tonic::Request::new(ExecuteRequest {
        language: req.language.clone(),
        code: req.code.clone(),
        args: req.args.clone(),
        stdin: req.stdin.clone().into(),
        env: req.env.clone().into_iter().collect(),
        timeout_ms: u32::try_from(req.timeout.as_millis()).unwrap_or(u32::MAX),
        max_output_bytes: req.max_output_bytes,
    });
    if let Ok(v) = req.trace_id.parse() {
        request.metadata_mut().insert("x-trace-id", v);
    }
    let status = |s: tonic::Status| match s.code() {
        tonic::Code::InvalidArgument => RemoteError::Invalid(s.message().to_string()),
        _ => RemoteError::Other(format!("daemon at {addr}: {}", s.message())),
    };
    let mut stream = client.execute(request).await.map_err(status)?.into_inner();
    while let Some(msg) = stream.message().await.map_err(status)? {
        match msg.event {
            Some(Event::Stdout(b)) => on_output(neurovisor::Output::Stdout(&b)),
            Some(Event::Stderr(b)) => on_output(neurovisor::Output::Stderr(&b)),
            Some(Event::Result(r)) => {
                return Ok(ExecOutcome {
                    vm_id: r.vm_id,
                    trace_id: r.trace_id,
                    exit_code: r.exit_code,
                    signal: r.signal,
                    timed_out: r.timed_out,
                    oom_killed: r.oom_killed,
                    stdout_truncated: r.stdout_truncated,
                    stderr_truncated: r.stderr_truncated,
                    stdout_bytes: r.stdout_bytes,
                    stderr_bytes: r.stderr_bytes,
                    duration_ms: r.duration_us as f64 / 1000.0,
                    boot_ms: 0.0,
                    execute_ms: 0.0,
                    total_ms: 0.0,
                });
            }
            None => {}
        }
    }
    Err(RemoteError::Other(format!(
        "daemon at {addr} ended the stream without a result"
    )))
}
