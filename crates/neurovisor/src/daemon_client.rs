//! A client of a running daemon's `neurovisor.v1.Sandbox` API, shared by
//! `neurovisor run` and the agent when they hand executions to a daemon, and
//! of its `neurovisor.v1.Sandboxes` API (`neurovisor sandbox ...`).
//!
//! Clients find a local daemon by its Unix socket, `<state>/neurovisor.sock`
//! ([`discover`]), and trust it only when nobody else can have put it there:
//! a socket owned by root or by us, in a directory owned by root or by us that
//! others cannot write, served by a process running as root or as us. They
//! never probe TCP. `--addr` names any daemon: `unix:/path`, `host:port`,
//! `http://...` or `https://...`; over TCP the client sends the token
//! (`NEUROVISOR_TOKEN`, else `<state>/token` when readable).

use std::path::{Path, PathBuf};
use std::time::Duration;

use neurovisor_proto::v1::sandbox_client::SandboxClient;
use neurovisor_proto::v1::sandboxes_client::SandboxesClient;
use neurovisor_proto::v1::{
    execute_response::Event, CreateSandboxRequest, EntryInfo, ExecuteRequest, ExecuteResponse,
    LanguagesRequest, ListDirRequest, ListSandboxesRequest, ReadFileRequest, SandboxExecRequest, SandboxInfo,
    SandboxRef, SetSandboxTimeoutRequest, WriteFileRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::channel::session::FILE_CHUNK;
use crate::exec::{ExecOutcome, ExecRequest, Output, OutputSink};
use crate::images::Language;
use crate::server::error_chain;
use crate::server::trace::TRACE_HEADER;
use crate::transport::{self, TOKEN_ENV};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The daemon rejected the request (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// `--addr` (or its companions) cannot be used as given.
    #[error("{0}")]
    BadAddress(String),
    /// No such sandbox (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Other(String),
}

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddr {
    Unix(PathBuf),
    /// `http://host:port` or `https://host:port`.
    Tcp {
        uri: String,
        tls: bool,
    },
}

/// A daemon to talk to, with what the connection needs.
#[derive(Clone)]
pub struct DaemonEndpoint {
    pub addr: DaemonAddr,
    /// Sent as `authorization: Bearer` over TCP.
    pub token: Option<String>,
    /// PEM CA for `https://` daemons with a private CA (else public roots).
    pub tls_ca: Option<PathBuf>,
    /// Found by discovery: refuse a socket served by anyone but root or us.
    pub trusted_peer_only: bool,
}

impl std::fmt::Debug for DaemonEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonEndpoint")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl std::fmt::Display for DaemonEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            DaemonAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            DaemonAddr::Tcp { uri, .. } => f.write_str(uri),
        }
    }
}

impl DaemonEndpoint {
    /// The daemon's socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            addr: DaemonAddr::Unix(path.into()),
            token: None,
            tls_ca: None,
            trusted_peer_only: false,
        }
    }

    /// Parses `--addr`: `unix:/path` (or `unix:///path`), `host:port`,
    /// `http://host:port`, `https://host:port`. Over TCP the token comes from
    /// `NEUROVISOR_TOKEN`, else from `<state_dir>/token` when readable.
    pub fn parse(addr: &str, state_dir: &Path, tls_ca: Option<PathBuf>) -> Result<Self, DaemonError> {
        let addr = addr.trim();
        let bad = |why: &str| {
            DaemonError::BadAddress(format!(
                "invalid --addr '{addr}': {why} (use unix:/path/to/neurovisor.sock, host:port, http://host:port or https://host:port)"
            ))
        };
        if let Some(rest) = addr.strip_prefix("unix:") {
            let path = rest
                .strip_prefix("//")
                .filter(|p| p.starts_with('/'))
                .unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("no socket path"));
            }
            return Ok(Self::unix(path));
        }
        let (uri, tls) = if let Some(r) = addr.strip_prefix("https://") {
            (format!("https://{r}"), true)
        } else if addr.starts_with("http://") {
            (addr.to_string(), false)
        } else if let Some((scheme, _)) = addr.split_once("://") {
            return Err(bad(&format!("unknown scheme {scheme}")));
        } else {
            (format!("http://{addr}"), false)
        };
        let parsed: Uri = uri.parse().map_err(|e| bad(&format!("{e}")))?;
        if parsed.port_u16().is_none() && !tls {
            return Err(bad("no port"));
        }
        if tls_ca.is_some() && !tls {
            return Err(DaemonError::BadAddress(format!(
                "--tls-ca (or NEUROVISOR_TLS_CA) is for https:// daemons, but --addr is {addr}; use https://, or drop the CA"
            )));
        }
        Ok(Self {
            addr: DaemonAddr::Tcp { uri, tls },
            token: transport::client_token(state_dir),
            tls_ca,
            trusted_peer_only: false,
        })
    }
}

/// The state directories whose socket a client looks for: `state_dir`, and,
/// when not root and no state directory was chosen, the system daemon's.
pub fn discovery_dirs(state_dir: Option<&Path>) -> Vec<PathBuf> {
    match state_dir {
        Some(d) => vec![d.to_path_buf()],
        None => {
            let mut v = vec![crate::config::default_state_dir()];
            let system = PathBuf::from(transport::SYSTEM_STATE_DIR);
            if !v.contains(&system) {
                v.push(system);
            }
            v
        }
    }
}

/// Checks the process behind a connected socket runs as root or as us.
fn check_peer(s: &tokio::net::UnixStream, path: &Path) -> std::io::Result<()> {
    let uid = s.peer_cred()?.uid();
    let me = nix::unistd::Uid::effective().as_raw();
    if uid == 0 || uid == me {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is served by uid {uid}, neither root nor us", path.display()),
        ))
    }
}

/// A running daemon's socket in one of `dirs`, if there is one we may trust.
/// An untrusted socket is skipped with a warning; a stale one (nobody
/// listening) quietly.
pub async fn discover(dirs: &[PathBuf]) -> Option<DaemonEndpoint> {
    for dir in dirs {
        let path = transport::socket_path(dir);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::debug!("{}: {e}", path.display());
                continue;
            }
        }
        if let Err(why) = transport::check_trusted_socket(&path) {
            tracing::warn!(
                "not using the daemon socket {}: {why}; booting VMs directly (pass --addr to choose a daemon, or --local)",
                path.display()
            );
            continue;
        }
        let probe =
            tokio::time::timeout(Duration::from_millis(500), tokio::net::UnixStream::connect(&path)).await;
        match probe {
            Ok(Ok(s)) => match check_peer(&s, &path) {
                Ok(()) => {
                    return Some(DaemonEndpoint {
                        trusted_peer_only: true,
                        ..DaemonEndpoint::unix(path)
                    })
                }
                Err(e) => tracing::warn!("not using the daemon socket: {e}; booting VMs directly"),
            },
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => tracing::warn!(
                "cannot use the daemon at {}: {e}; booting VMs directly (join the group {g} to use it: usermod -aG {g} $USER)",
                path.display(),
                g = transport::DEFAULT_SOCKET_GROUP
            ),
            Ok(Err(e)) => tracing::debug!("no daemon behind {}: {e}", path.display()),
            Err(_) => tracing::warn!("the daemon at {} does not answer; booting VMs directly", path.display()),
        }
    }
    None
}

/// A channel to the daemon's socket at `path`; with `trusted_peer_only`, only
/// to a daemon running as root or as us.
pub async fn unix_channel(path: &Path, trusted_peer_only: bool) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&path).await?;
            if trusted_peer_only {
                check_peer(&s, &path)?;
            }
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    // The URI is not used to connect; it names the `:authority`.
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector(connector)
        .await
}

/// What to do about a failed connection, for the error message.
fn connect_hint(ep: &DaemonEndpoint, err: &str) -> String {
    let group = transport::DEFAULT_SOCKET_GROUP;
    match &ep.addr {
        DaemonAddr::Unix(_) if err.contains("os error 13") || err.contains("ermission denied") => format!(
            "join the group {group} to use this daemon (usermod -aG {group} $USER, then log in again), or run without --addr to boot VMs directly"
        ),
        DaemonAddr::Tcp { tls: true, .. } if ep.tls_ca.is_none() => {
            "start it with `neurovisor serve --listen ...`; for a daemon with a private CA pass --tls-ca FILE (or NEUROVISOR_TLS_CA)".into()
        }
        _ => "start it with `neurovisor serve`, or run without --addr to boot VMs directly".into(),
    }
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
    auth: Option<MetadataValue<Ascii>>,
    inner: SandboxClient<Channel>,
    sandboxes: SandboxesClient<Channel>,
}

/// The wire form of a validated request.
fn wire_request(req: &ExecRequest) -> ExecuteRequest {
    ExecuteRequest {
        language: req.language.clone(),
        code: req.code.clone(),
        args: req.args.clone(),
        stdin: req.stdin.clone().into(),
        env: req.env.clone().into_iter().collect(),
        timeout_ms: u32::try_from(req.timeout.as_millis()).unwrap_or(u32::MAX),
        max_output_bytes: req.max_output_bytes,
        llm_bridge: req.llm_bridge,
        // The daemon's own pool: a CLI `--profile` boots its VMs locally.
        profile: String::new(),
    }
}

impl DaemonClient {
    pub async fn connect(ep: &DaemonEndpoint) -> Result<Self, DaemonError> {
        let addr = ep.to_string();
        let mut auth = None;
        let channel = match &ep.addr {
            DaemonAddr::Unix(path) => unix_channel(path, ep.trusted_peer_only).await,
            DaemonAddr::Tcp { uri, tls } => {
                if let Some(t) = &ep.token {
                    auth = Some(format!("Bearer {t}").parse().map_err(|_| {
                        DaemonError::BadAddress(format!(
                            "the token ({TOKEN_ENV} or the token file) has characters a header cannot carry; use the 64 hex digits of the daemon's token file"
                        ))
                    })?);
                }
                let mut e = Endpoint::from_shared(uri.clone())
                    .map_err(|e| DaemonError::BadAddress(format!("invalid --addr {addr}: {e}")))?
                    .connect_timeout(Duration::from_secs(3));
                if *tls {
                    let mut c = ClientTlsConfig::new();
                    c = match &ep.tls_ca {
                        Some(ca) => {
                            let pem = std::fs::read(ca).map_err(|e| {
                                DaemonError::BadAddress(format!(
                                    "cannot read the CA certificate {} (--tls-ca or NEUROVISOR_TLS_CA): {e}",
                                    ca.display()
                                ))
                            })?;
                            c.ca_certificate(Certificate::from_pem(pem))
                        }
                        None => c.with_webpki_roots(),
                    };
                    e = e.tls_config(c).map_err(|e| {
                        DaemonError::BadAddress(format!("TLS for {addr}: {}", error_chain(&e)))
                    })?;
                }
                e.connect().await
            }
        };
        let channel = channel.map_err(|e| {
            let why = error_chain(&e);
            DaemonError::Other(format!(
                "cannot reach the daemon at {addr} ({why}); {}",
                connect_hint(ep, &why)
            ))
        })?;
        Ok(Self {
            addr,
            auth,
            inner: SandboxClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            sandboxes: SandboxesClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(a) = &self.auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        // The daemon's spans join this process's trace (`--otlp`).
        if let Some(tp) = crate::telemetry::traceparent(&tracing::Span::current()) {
            if let Ok(v) = tp.parse() {
                r.metadata_mut().insert("traceparent", v);
            }
        }
        r
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn status(&self, s: tonic::Status) -> DaemonError {
        match s.code() {
            tonic::Code::InvalidArgument => DaemonError::Invalid(s.message().to_string()),
            tonic::Code::NotFound => DaemonError::NotFound(s.message().to_string()),
            _ => DaemonError::Other(format!("daemon at {}: {}", self.addr, s.message())),
        }
    }

    pub async fn languages(&mut self) -> Result<Vec<Language>, DaemonError> {
        let r = self
            .inner
            .languages(self.request(LanguagesRequest {}))
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
        let mut request = self.request(wire_request(req));
        if let Ok(v) = req.trace_id.parse() {
            request.metadata_mut().insert(TRACE_HEADER, v);
        }
        let stream = self
            .inner
            .execute(request)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        self.forward(stream, on_output).await
    }

    /// Creates a sandbox that lives across calls.
    pub async fn sandbox_create(&mut self, r: CreateSandboxRequest) -> Result<SandboxInfo, DaemonError> {
        let request = self.request(r);
        let s = self.sandboxes.create(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_get(&mut self, id: &str) -> Result<SandboxInfo, DaemonError> {
        let request = self.request(SandboxRef {
            sandbox_id: id.into(),
        });
        let s = self.sandboxes.get(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    /// A desktop sandbox's screen: (PNG, width, height).
    pub async fn sandbox_screenshot(&mut self, id: &str) -> Result<(Vec<u8>, u32, u32), DaemonError> {
        let request = self.request(SandboxRef {
            sandbox_id: id.into(),
        });
        let s = self.sandboxes.screenshot(request).await;
        s.map(|r| {
            let r = r.into_inner();
            (r.png.to_vec(), r.width, r.height)
        })
        .map_err(|s| self.status(s))
    }

    pub async fn sandbox_desktop_action(
        &mut self,
        r: neurovisor_proto::v1::DesktopActionRequest,
    ) -> Result<(), DaemonError> {
        let request = self.request(r);
        let s = self.sandboxes.desktop_action(request).await;
        s.map(|_| ()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_desktop_view(
        &mut self,
        id: &str,
        view_only: bool,
    ) -> Result<neurovisor_proto::v1::DesktopViewInfo, DaemonError> {
        let request = self.request(neurovisor_proto::v1::DesktopViewRequest {
            sandbox_id: id.into(),
            view_only,
        });
        let s = self.sandboxes.desktop_view(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_list(&mut self) -> Result<Vec<SandboxInfo>, DaemonError> {
        let request = self.request(ListSandboxesRequest {});
        let s = self.sandboxes.list(request).await;
        s.map(|r| r.into_inner().sandboxes).map_err(|s| self.status(s))
    }

    pub async fn sandbox_kill(&mut self, id: &str) -> Result<(), DaemonError> {
        let request = self.request(SandboxRef {
            sandbox_id: id.into(),
        });
        let s = self.sandboxes.kill(request).await;
        s.map(|_| ()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_pause(&mut self, id: &str) -> Result<SandboxInfo, DaemonError> {
        let request = self.request(SandboxRef {
            sandbox_id: id.into(),
        });
        let s = self.sandboxes.pause(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_resume(&mut self, id: &str, timeout_s: u32) -> Result<SandboxInfo, DaemonError> {
        let request = self.request(neurovisor_proto::v1::ResumeSandboxRequest {
            sandbox_id: id.into(),
            timeout_s,
        });
        let s = self.sandboxes.resume(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    pub async fn sandbox_set_timeout(
        &mut self,
        id: &str,
        timeout_s: u32,
    ) -> Result<SandboxInfo, DaemonError> {
        let request = self.request(SetSandboxTimeoutRequest {
            sandbox_id: id.into(),
            timeout_s,
        });
        let s = self.sandboxes.set_timeout(request).await;
        s.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    /// Copies `local` into sandbox `id` at `remote` (1 MiB at a time; the
    /// file is never held whole).
    pub async fn sandbox_upload(
        &mut self,
        id: &str,
        local: &Path,
        remote: &str,
        user: &str,
    ) -> Result<EntryInfo, DaemonError> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| DaemonError::Invalid(format!("cannot read {}: {e}", local.display())))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let first = WriteFileRequest {
            sandbox_id: id.into(),
            path: remote.into(),
            user: user.into(),
            data: Default::default(),
            complete: false,
        };
        let _ = tx.send(first).await;
        let path = local.to_path_buf();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; FILE_CHUNK];
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                let m = WriteFileRequest {
                    data: buf[..n].to_vec().into(),
                    ..Default::default()
                };
                if tx.send(m).await.is_err() {
                    return Ok::<(), std::io::Error>(());
                }
            }
        });
        let request = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let written = self.sandboxes.write_file(request).await;
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(DaemonError::Invalid(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
            Err(e) => return Err(DaemonError::Other(format!("upload: {e}"))),
        }
        written.map(|r| r.into_inner()).map_err(|s| self.status(s))
    }

    /// Copies `remote` of sandbox `id` into `out` as it streams; the bytes copied.
    pub async fn sandbox_download(
        &mut self,
        id: &str,
        remote: &str,
        user: &str,
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> Result<u64, DaemonError> {
        use tokio::io::AsyncWriteExt;
        let request = self.request(ReadFileRequest {
            sandbox_id: id.into(),
            path: remote.into(),
            user: user.into(),
        });
        let s = self.sandboxes.read_file(request).await;
        let mut stream = s.map_err(|s| self.status(s))?.into_inner();
        let mut n = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| self.status(s))? {
            out.write_all(&chunk.data)
                .await
                .map_err(|e| DaemonError::Other(format!("cannot write the download: {e}")))?;
            n += chunk.data.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| DaemonError::Other(format!("cannot write the download: {e}")))?;
        Ok(n)
    }

    pub async fn sandbox_list_dir(
        &mut self,
        id: &str,
        path: &str,
        depth: u32,
        user: &str,
    ) -> Result<Vec<EntryInfo>, DaemonError> {
        let request = self.request(ListDirRequest {
            sandbox_id: id.into(),
            path: path.into(),
            user: user.into(),
            depth,
        });
        let s = self.sandboxes.list_dir(request).await;
        s.map(|r| r.into_inner().entries).map_err(|s| self.status(s))
    }

    /// Runs `req` in sandbox `id`, forwarding output as it streams.
    pub async fn sandbox_exec(
        &mut self,
        id: &str,
        req: &ExecRequest,
        on_output: &mut dyn OutputSink,
    ) -> Result<RemoteOutcome, DaemonError> {
        let mut request = self.request(SandboxExecRequest {
            sandbox_id: id.into(),
            request: Some(wire_request(req)),
        });
        if let Ok(v) = req.trace_id.parse() {
            request.metadata_mut().insert(TRACE_HEADER, v);
        }
        let s = self.sandboxes.exec(request).await;
        let stream = s.map_err(|s| self.status(s))?.into_inner();
        self.forward(stream, on_output).await
    }

    /// Forwards a stream's output to `on_output` and returns its result.
    async fn forward(
        &self,
        mut stream: tonic::Streaming<ExecuteResponse>,
        on_output: &mut dyn OutputSink,
    ) -> Result<RemoteOutcome, DaemonError> {
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
                            warm_interpreter: r.warm_interpreter,
                            restored: r.restored,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_name_the_forms() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = |a: &str| DaemonEndpoint::parse(a, dir.path(), None);
        assert_eq!(
            p("unix:/x/nv.sock").expect("unix").addr,
            DaemonAddr::Unix("/x/nv.sock".into())
        );
        assert_eq!(
            p("unix:///x/nv.sock").expect("unix").addr,
            DaemonAddr::Unix("/x/nv.sock".into())
        );
        assert_eq!(
            p("127.0.0.1:7").expect("tcp").addr,
            DaemonAddr::Tcp {
                uri: "http://127.0.0.1:7".into(),
                tls: false
            }
        );
        assert_eq!(
            p("https://h.example:443").expect("tls").addr,
            DaemonAddr::Tcp {
                uri: "https://h.example:443".into(),
                tls: true
            }
        );
        for bad in ["ftp://x:1", "unix:", "localhost"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(
                e.contains("unix:/path/to/neurovisor.sock, host:port"),
                "{bad}: {e}"
            );
        }
        let e = DaemonEndpoint::parse("http://h:1", dir.path(), Some("/ca.pem".into())).unwrap_err();
        assert!(e.to_string().contains("use https://"), "{e}");
        assert_eq!(p("unix:/s").expect("unix").to_string(), "unix:/s");
    }
}
