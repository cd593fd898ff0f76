//! A client of a running daemon's `neurovisor.v1.Sandbox` API, shared by
//! `neurovisor run` and the agent when they hand executions to a daemon.

use std::net::SocketAddr;
use std::time::Duration;

use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::{execute_response::Event, ExecuteRequest, LanguagesRequest};
use tonic::transport::{Channel, Endpoint};

use crate::exec::{ExecOutcome, ExecRequest, Output, OutputSink};
use crate::images::Language;
use crate::server::trace::TRACE_HEADER;

pub const DEFAULT_DAEMON_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The daemon rejected the request (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Other(String),
}

/// Is a daemon listening at the default address? (A quick TCP probe.)
pub async fn default_daemon() -> Option<String> {
    let addr: SocketAddr = DEFAULT_DAEMON_ADDR.parse().ok()?;
    let probe = tokio::time::timeout(Duration::from_millis(150), tokio::net::TcpStream::connect(addr)).await;
    matches!(probe, Ok(Ok(_))).then(|| DEFAULT_DAEMON_ADDR.to_string())
}

/// How a daemon execution ended, with the pool's view of it.
#[derive(Debug, Clone)]
pub struct RemoteOutcome {
    pub outcome: ExecOutcome,
    /// Time the daemon spent getting a VM.
    pub wait_ms: f64,
    /// The VM came pre-booted from the pool.
    pub warm: bool,
}

#[derive(Clone)]
pub struct DaemonClient {
    addr: String,
    inner: SandboxClient<Channel>,
}

impl DaemonClient {
    /// `addr`: `host:port` or a URL.
    pub async fn connect(addr: &str) -> Result<Self, DaemonError> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(url)
            .map_err(|e| DaemonError::Other(format!("invalid daemon address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| {
                DaemonError::Other(format!(
                    "cannot reach the daemon at {addr} ({e}); start it with `neurovisor serve`, or run without --addr"
                ))
            })?;
        Ok(Self {
            addr: addr.to_string(),
            inner: SandboxClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn status(&self, s: tonic::Status) -> DaemonError {
        match s.code() {
            tonic::Code::InvalidArgument => DaemonError::Invalid(s.message().to_string()),
            _ => DaemonError::Other(format!("daemon at {}: {}", self.addr, s.message())),
        }
    }

    pub async fn languages(&mut self) -> Result<Vec<Language>, DaemonError> {
        let r = self
            .inner
            .languages(LanguagesRequest {})
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        Ok(r.languages
            .into_iter()
            .map(|l| Language {
                name: l.name,
                version: l.version,
            })
            .collect())
    }

    /// Runs `req` in a VM of the daemon's pool, forwarding output as it streams.
    pub async fn execute(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn OutputSink,
    ) -> Result<RemoteOutcome, DaemonError> {
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
            request.metadata_mut().insert(TRACE_HEADER, v);
        }
        let mut stream = self
            .inner
            .execute(request)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(|s| self.status(s))? {
            match msg.event {
                Some(Event::Stdout(b)) => on_output.write(Output::Stdout(&b)).await,
                Some(Event::Stderr(b)) => on_output.write(Output::Stderr(&b)).await,
                Some(Event::Result(r)) => {
                    return Ok(RemoteOutcome {
                        outcome: ExecOutcome {
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
                            ..Default::default()
                        },
                        wait_ms: r.wait_us as f64 / 1000.0,
                        warm: r.warm,
                    });
                }
                None => {}
            }
        }
        Err(DaemonError::Other(format!(
            "daemon at {} ended the stream without a result",
            self.addr
        )))
    }
}
