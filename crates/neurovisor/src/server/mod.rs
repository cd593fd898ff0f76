//! The daemon (`neurovisor serve`): the gRPC API, the metrics endpoint, and the
//! pool's lifecycle.
//!
//! Start-up checks the state directory (ours, not writable by others; see
//! [`crate::transport`]), takes an exclusive lock on `<state>/daemon/lock` (two
//! daemons on one state directory refuse to start), removes what a previous
//! daemon killed with SIGKILL left behind, binds `<state>/neurovisor.sock`
//! (replacing a stale one) and, with `--listen`, a TCP listener that needs the
//! token (TLS with `--tls-cert/--tls-key`), then pre-warms. SIGTERM/SIGINT
//! remove the socket, stop accepting, let in-flight executions finish within a
//! grace period, destroy every VM and remove `<state>/daemon`.

pub mod access;
pub mod agent;
pub mod inference;
pub mod limits;
pub mod sandbox;
pub mod session_io;
pub mod sessions;
pub mod trace;

use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use neurovisor_proto::inference::inference_service_server::InferenceServiceServer;
use neurovisor_proto::v1::agent_server::AgentServer;
use neurovisor_proto::v1::sandbox_server::SandboxServer;
use neurovisor_proto::v1::sandboxes_server::SandboxesServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Identity, Server, ServerTlsConfig};

use self::access::AccessLayer;
use crate::channel::GuestIo;
use crate::exec::Sandbox;
use crate::images::ImageSet;
use crate::llm::OllamaClient;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolConfig};
use crate::security::{caps, lsm, seccomp, vm_guard};
use crate::supervisor::FileLock;
use crate::transport::{self, Token, TransportError};
use crate::vmm::process::kill_processes_mentioning;
use crate::vmm::VmmBackend;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// TCP listener for gRPC (`--listen`); requests over it need the token.
    /// The Unix socket `<state_dir>/neurovisor.sock` is always there.
    pub listen: Option<SocketAddr>,
    /// TCP listener for MCP over Streamable HTTP (`--mcp-listen`, endpoint
    /// `/mcp`); requests over it need the token too.
    pub mcp_listen: Option<SocketAddr>,
    /// TCP listener for the E2B-compatible HTTP API (`--e2b-listen`); its
    /// API key is the token, each sandbox's calls need its own access token.
    pub e2b_listen: Option<SocketAddr>,
    /// TCP listener for the desktop viewer (`--desktop-listen`): the noVNC
    /// page and each desktop sandbox's WebSocket (its own token).
    pub desktop_listen: Option<SocketAddr>,
    /// The noVNC web client's files (`--novnc-dir`).
    pub novnc_dir: PathBuf,
    /// Certificate and key that make the TCP listener TLS.
    pub tls: Option<TlsFiles>,
    /// The group that may use the Unix socket (when it exists).
    pub socket_group: String,
    pub metrics_addr: SocketAddr,
    /// Parent state directory: the socket and the token live there; the
    /// daemon works in `<state_dir>/daemon`.
    pub state_dir: PathBuf,
    pub pool: PoolConfig,
    pub shutdown_grace: Duration,
    pub ollama_host: String,
    pub default_model: String,
    /// Confine the daemon's threads after start-up (seccomp per thread role,
    /// capabilities, NoNewPrivs); see [`crate::security::seccomp`].
    pub confine: bool,
    /// Token buckets on what each VM's guest sends to the host.
    pub rate_limit: crate::security::rate_limit::RateLimitConfig,
    /// Interpreters each pool VM starts before its request arrives.
    pub warm_languages: Vec<String>,
    /// `--snapshot`: pool VMs are restored from a template's snapshot.
    pub snapshot: Option<crate::snapshot::SnapshotSource>,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Calls at once on one connection.
    pub max_streams_per_connection: u32,
    /// Bytes of output buffered for clients, across all requests.
    pub output_budget: usize,
    /// How long a streaming client may read nothing before its execution is stopped.
    pub stall_timeout: Duration,
    /// Caps on sandboxes that live across calls (`neurovisor.v1.Sandboxes`).
    pub sandboxes: sessions::SandboxLimits,
    /// The inference bridge requests may ask for (`--llm-bridge`).
    pub llm_bridge: Option<crate::llm::bridge::BridgeConfig>,
    /// `--network`: every pool VM gets a NIC behind its own gateway.
    pub network: Option<Arc<crate::net::NetSettings>>,
}

/// PEM files for the TCP listener's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where a started daemon listens (given to `run`'s `ready` callback).
#[derive(Debug, Clone)]
pub struct Listening {
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub tls: bool,
    pub token_file: PathBuf,
    pub metrics: SocketAddr,
    /// The MCP endpoint's address (`http://<addr>/mcp`).
    pub mcp: Option<SocketAddr>,
    /// The E2B API's address.
    pub e2b: Option<SocketAddr>,
    /// The desktop viewer's address.
    pub desktop: Option<SocketAddr>,
}

impl Listening {
    /// `unix:/run/neurovisor/neurovisor.sock and https://0.0.0.0:50051 (token in /run/neurovisor/token)`.
    pub fn grpc_summary(&self) -> String {
        let mut s = format!("unix:{}", self.socket.display());
        if let Some(a) = self.tcp {
            let scheme = if self.tls { "https" } else { "http" };
            s.push_str(&format!(
                " and {scheme}://{a} (token in {})",
                self.token_file.display()
            ));
        }
        s
    }
}

/// Removes VM cgroups nobody holds any more (their daemon was killed, or
/// their removal was cut short); live VMs' cgroups are locked and kept.
fn clean_leftover_cgroups() {
    if let Ok(layout) = crate::security::cgroups::CgroupLayout::detect() {
        let n = crate::security::cgroups::clean_leftovers(&layout);
        if n > 0 {
            tracing::warn!("removed {n} VM cgroup(s) left behind");
        }
    }
}

/// Says at start-up whether the BPF LSM is active, and how to enable it.
fn report_bpf_lsm() {
    let path = std::path::Path::new(lsm::LSM_LIST_PATH);
    if !path.exists() && nix::unistd::geteuid().is_root() {
        // securityfs is often not mounted in containers and minimal hosts.
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    match lsm::bpf_lsm_status() {
        Ok(true) => tracing::info!("BPF LSM is active"),
        Ok(false) => tracing::warn!("{}", lsm::enable_hint(&lsm::active_lsms().unwrap_or_default())),
        Err(e) => tracing::warn!("cannot tell whether the BPF LSM is active: {e}"),
    }
}

/// Loads the eBPF guard (optional at run time): the `file_open` policy for
/// VM cgroups protecting host secrets and the daemon's lock, and per-VM
/// syscall counts. A host that refuses it gets a warning, not a failure.
#[cfg(feature = "ebpf")]
fn load_ebpf_guard(dir: &Path, state_dir: &Path) -> vm_guard::VmGuard {
    use crate::security::ebpf::{EbpfGuard, LsmMode};
    match EbpfGuard::load(LsmMode::IfActive) {
        Ok(mut g) => {
            for p in [
                PathBuf::from("/etc/shadow"),
                PathBuf::from("/etc/gshadow"),
                dir.join("lock"),
                transport::token_path(state_dir),
            ] {
                if p.exists() {
                    if let Err(e) = g.protect_path(&p) {
                        tracing::warn!("eBPF: cannot protect {}: {e}", p.display());
                    }
                }
            }
            tracing::info!(enforcing = g.lsm_enforcing(), "eBPF guard loaded");
            vm_guard::VmGuard::new(g)
        }
        Err(e) => {
            tracing::warn!("eBPF guard not loaded: {e}");
            vm_guard::VmGuard::default()
        }
    }
}

/// A runtime whose threads are confined to one role: `nv-vm` (VMs are
/// booted and destroyed there) or `nv-guest` (guest bytes are read there).
struct VmRuntime(Option<tokio::runtime::Runtime>);

impl VmRuntime {
    fn new() -> Result<Self, DaemonError> {
        Self::for_role(seccomp::Role::Vm, "nv-vm", 2)
    }

    /// The guest I/O runtime: everything that parses guest bytes (see
    /// [`crate::channel::guest_io`]), on threads without capabilities.
    fn guest() -> Result<Self, DaemonError> {
        Self::for_role(seccomp::Role::Guest, "nv-guest", 2)
    }

    fn for_role(role: seccomp::Role, name: &str, workers: usize) -> Result<Self, DaemonError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .thread_keep_alive(Duration::from_secs(1))
            .on_thread_start(seccomp::thread_hook(role))
            .on_thread_park(seccomp::thread_hook(role))
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(|e| DaemonError::Serve(format!("cannot start the {name} runtime: {e}")))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for VmRuntime {
    fn drop(&mut self) {
        // Dropping a runtime inside another one would block: let it go instead.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot confine the daemon: {0} (run as root, or pass --no-confine to debug)")]
    Confine(String),
    #[error("another neurovisor daemon (pid {pid}) is using the state directory {dir}; stop it, or give this one its own --state-dir")]
    Locked { dir: PathBuf, pid: String },
    #[error("state directory {dir}: {source}")]
    StateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock file {0} is a symbolic link; remove it (nothing should link there) and start again")]
    LockLink(PathBuf),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("cannot listen on the Unix socket {path}: {source} (check the state directory, or pass another --state-dir)")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Bridge(#[from] crate::llm::bridge::BridgeError),
    #[error(transparent)]
    Desktop(#[from] crate::desktop::web::NoVncError),
    #[error("cannot listen on {addr} for {what}: {source} (choose another address with {flag})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid pool configuration: {0}")]
    Pool(String),
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

pub fn daemon_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon")
}

/// Where the daemon keeps paused sandboxes' snapshots (guest memory: inside
/// the daemon's own directory, 0700).
pub fn paused_dir(state_dir: &Path) -> PathBuf {
    daemon_dir(state_dir).join("paused")
}

/// The exclusive lock of one state directory, held for the daemon's lifetime.
pub struct StateLock {
    _lock: FileLock,
}

impl StateLock {
    /// Locks `<dir>/lock` (`dir`: the daemon directory, which must exist),
    /// never following a symlink, and writes our pid into it.
    pub fn acquire(dir: &Path) -> Result<Self, DaemonError> {
        let path = dir.join("lock");
        let sd = |source: std::io::Error| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                DaemonError::LockLink(path.clone())
            } else {
                DaemonError::StateDir {
                    dir: dir.to_path_buf(),
                    source,
                }
            }
        };
        let Some(lock) = FileLock::try_acquire(&path).map_err(sd)? else {
            let mut pid = String::new();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                let _ = (&mut f).take(32).read_to_string(&mut pid);
            }
            return Err(DaemonError::Locked {
                dir: dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        };
        let mut f = lock.file();
        f.set_len(0).map_err(sd)?;
        // Written at offset 0: the file was opened without O_APPEND.
        std::io::Seek::rewind(&mut f).map_err(sd)?;
        write!(f, "{}", std::process::id()).map_err(sd)?;
        Ok(Self { _lock: lock })
    }
}

/// `<state>/neurovisor.sock` while the daemon serves; removed on drop.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove {}: {e}", self.0.display()),
        }
    }
}

/// Binds the daemon's Unix socket: under a temporary name, then mode 0660
/// with `group` (0600 without), then renamed over `<state>/neurovisor.sock`
/// (so a stale socket of a killed daemon is replaced in one step). Call only
/// with the state lock held.
fn bind_socket(
    state_dir: &Path,
    group: Option<(&str, nix::unistd::Gid)>,
) -> Result<(UnixListener, SocketFile), DaemonError> {
    let path = transport::socket_path(state_dir);
    let tmp = state_dir.join(format!(".{}.{}", transport::SOCKET_NAME, std::process::id()));
    let err = |source| DaemonError::BindSocket {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let finish = || -> std::io::Result<()> {
        let mode = match group {
            Some((_, gid)) => {
                std::os::unix::fs::lchown(&tmp, None, Some(gid.as_raw()))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok((listener, SocketFile(path.clone())))
}

fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig, DaemonError> {
    let read = |p: &Path, flag: &str| {
        std::fs::read(p).map_err(|e| DaemonError::Tls(format!("cannot read {} ({flag}): {e}", p.display())))
    };
    let cert = read(&files.cert, "--tls-cert")?;
    let key = read(&files.key, "--tls-key")?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// An error with its causes, `a: b: c` (tonic's errors say little at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Kills the processes of VMs a previous daemon left (it was SIGKILLed) and
/// removes their directories. Returns how many VM directories were removed.
pub fn clean_leftovers(vms_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(vms_dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let killed = kill_processes_mentioning(&path.display().to_string());
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!("cannot remove leftover {}: {e}", path.display());
        } else {
            n += 1;
        }
        tracing::info!(processes = killed, "removed leftover VM {}", path.display());
    }
    n
}

async fn bind(addr: SocketAddr, what: &'static str, flag: &'static str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind {
        addr,
        what,
        flag,
        source,
    })
}

fn metrics_router(metrics: Arc<Metrics>, pool: Pool) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    use axum::routing::get;
    let m = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            // OpenMetrics (with exemplars linking samples to traces) for
            // scrapers that ask for it, as Prometheus does; the classic text
            // format for everyone else (curl, promtool, older scrapers).
            get(move |headers: axum::http::HeaderMap| {
                let m = m.clone();
                async move {
                    let openmetrics = headers
                        .get_all(axum::http::header::ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains("application/openmetrics-text"));
                    if openmetrics {
                        (
                            [(
                                CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            m.encode(),
                        )
                    } else {
                        (
                            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                            m.encode_prometheus_text(),
                        )
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let pool = pool.clone();
                async move {
                    let st = pool.status();
                    let code = if st.degraded.is_some() {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::OK
                    };
                    (code, axum::Json(st))
                }
            }),
        )
}

/// Runs the daemon until `shutdown` resolves, then drains and cleans up.
/// `ready` is called with the bound addresses once serving (tests use port 0).
pub async fn run(
    cfg: DaemonConfig,
    backend: Arc<dyn VmmBackend>,
    images: ImageSet,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Listening),
) -> Result<(), DaemonError> {
    cfg.pool.validate().map_err(DaemonError::Pool)?;
    let group = transport::group_gid(&cfg.socket_group).map(|g| (cfg.socket_group.as_str(), g));
    transport::prepare_state_dir(&cfg.state_dir, group)?;
    let dir = daemon_dir(&cfg.state_dir);
    transport::prepare_daemon_dir(&dir)?;
    let lock = StateLock::acquire(&dir)?;
    // Jailed Firecracker VMs lose the parent-death signal (the jailer changes
    // uid), so they can outlive a SIGKILLed daemon: clean those too.
    crate::vmm::jailer::clean_leftover_jails(&dir);
    let removed = clean_leftovers(&dir.join("vms"));
    // Also what killed `run`s left (their VMs' owners are gone).
    crate::supervisor::clean_stale_vms(&cfg.state_dir.join("vms"));
    clean_leftover_cgroups();
    // Paused sandboxes' snapshots: no sandbox outlives its daemon.
    match std::fs::remove_dir_all(paused_dir(&cfg.state_dir)) {
        Ok(()) => tracing::warn!("removed the paused sandboxes a previous daemon left"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("could not remove the paused sandboxes a previous daemon left: {e}"),
    }
    if removed > 0 {
        tracing::warn!("removed {removed} VM(s) left by a previous daemon");
    }
    let token_file = transport::token_path(&cfg.state_dir);
    let token = match cfg.listen.or(cfg.mcp_listen).or(cfg.e2b_listen) {
        Some(_) => Some(Token::load_or_create(&cfg.state_dir)?),
        None => None,
    };
    let tls = cfg.tls.as_ref().map(tls_config).transpose()?;
    let tcp_builder = match tls {
        Some(t) => Server::builder().tls_config(t).map_err(|e| {
            DaemonError::Tls(format!(
                "{} (pass a PEM certificate chain with --tls-cert and its private key with --tls-key)",
                error_chain(&e)
            ))
        })?,
        None => Server::builder(),
    };
    let (unix, socket) = bind_socket(&cfg.state_dir, group)?;
    match group {
        Some((name, _)) => tracing::info!("socket {} (mode 0660, group {name})", socket.0.display()),
        None => tracing::warn!(
            "group {g} does not exist: the socket {} is mode 0600, for this user only; create the group (groupadd --system {g}, as scripts/setup.sh does) to let its members use the daemon",
            socket.0.display(),
            g = cfg.socket_group
        ),
    }
    let tcp = match cfg.listen {
        Some(addr) => Some(bind(addr, "gRPC", "--listen").await?),
        None => None,
    };
    let mcp_tcp = match cfg.mcp_listen {
        Some(addr) => Some(bind(addr, "MCP", "--mcp-listen").await?),
        None => None,
    };
    let e2b_tcp = match cfg.e2b_listen {
        Some(addr) => Some(bind(addr, "E2B API", "--e2b-listen").await?),
        None => None,
    };
    // The viewer's files are read now: the confined API threads open none.
    let desktop_tcp = match cfg.desktop_listen {
        Some(addr) => {
            let novnc = crate::desktop::web::NoVnc::load(&cfg.novnc_dir)?;
            Some((
                bind(addr, "desktop viewer", "--desktop-listen").await?,
                Arc::new(novnc),
            ))
        }
        None => None,
    };
    let http = bind(cfg.metrics_addr, "metrics", "--metrics-addr").await?;
    let metrics_addr = http.local_addr().unwrap_or(cfg.metrics_addr);
    if !metrics_addr.ip().is_loopback() {
        tracing::warn!(
            "/metrics and /healthz on {metrics_addr} are reachable from other hosts (they show VM ids and pool state); pass --metrics-addr 127.0.0.1:9090 to keep them local"
        );
    }
    let listening = Listening {
        socket: socket.0.clone(),
        tcp: tcp
            .as_ref()
            .map(|l| l.local_addr().ok().or(cfg.listen))
            .unwrap_or(None),
        tls: cfg.tls.is_some(),
        token_file: token_file.clone(),
        metrics: metrics_addr,
        mcp: mcp_tcp
            .as_ref()
            .map(|l| l.local_addr().ok().or(cfg.mcp_listen))
            .unwrap_or(None),
        e2b: e2b_tcp
            .as_ref()
            .map(|l| l.local_addr().ok().or(cfg.e2b_listen))
            .unwrap_or(None),
        desktop: desktop_tcp
            .as_ref()
            .map(|(l, _)| l.local_addr().ok().or(cfg.desktop_listen))
            .unwrap_or(None),
    };

    report_bpf_lsm();
    #[cfg(feature = "ebpf")]
    let guard = load_ebpf_guard(&dir, &cfg.state_dir);
    #[cfg(not(feature = "ebpf"))]
    let guard = vm_guard::VmGuard::default();
    let vm_rt = VmRuntime::new()?;
    let guest_rt = VmRuntime::guest()?;
    if cfg.confine {
        let firecracker = backend.name() == "firecracker";
        let ebpf = guard.loaded();
        let filters = seccomp::RoleFilters::new(
            caps::vm_role_caps(firecracker, ebpf, cfg.network.is_some()),
            if ebpf { "vm-ebpf" } else { "vm" },
        )
        .map_err(|e| DaemonError::Confine(e.to_string()))?;
        seccomp::arm(
            filters,
            &[
                tokio::runtime::Handle::current(),
                vm_rt.handle(),
                guest_rt.handle(),
            ],
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| DaemonError::Confine(e.to_string()))?;
        tracing::info!("confined: seccomp allowlists per thread role, capabilities dropped, NoNewPrivs");
    } else {
        tracing::warn!("running unconfined: no seccomp filters, all capabilities kept");
    }

    let metrics = Arc::new(Metrics::new());
    metrics.watch_vms(backend.live_vms());
    metrics.set_build(backend.name(), backend.accel());
    metrics.allow_model(&cfg.default_model);
    metrics.allow_languages(images.languages.iter().map(|l| l.name.as_str()));
    let languages = images.languages.clone();
    let memory_mib = cfg.pool.size.memory_mib();
    let mut sandbox =
        Sandbox::new(backend, images, dir.clone()).with_guest_io(GuestIo::on(guest_rt.handle()));
    sandbox.rate_limit = cfg.rate_limit;
    sandbox.warm_languages = cfg.warm_languages.clone();
    sandbox.snapshots = cfg
        .snapshot
        .clone()
        .map(|s| Arc::new(crate::snapshot::Snapshots::new(s)));
    sandbox.hooks = crate::supervisor::VmHooks {
        counters: metrics.vm_counters(),
        guard,
    };
    sandbox.llm_bridge = cfg
        .llm_bridge
        .clone()
        .map(|c| crate::llm::bridge::LlmBridge::new(c, metrics.llm_bridge_requests.clone()).map(Arc::new))
        .transpose()?;
    sandbox.network = cfg.network.clone();
    let pool = Pool::start_on(sandbox, cfg.pool.clone(), metrics.clone(), vm_rt.handle())
        .map_err(DaemonError::Pool)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SandboxServer<sandbox::SandboxService>>()
        .await;
    let health_task = {
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                if pool.status().degraded.is_some() {
                    health
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                } else {
                    health
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // Both reflection versions: grpcurl speaks v1, many clients still v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(neurovisor_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| DaemonError::Serve(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| DaemonError::Serve(e.to_string()))?;

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let router = metrics_router(metrics.clone(), pool.clone());
    let http_task = tokio::spawn(async move {
        let serving = axum::serve(http, router).with_graceful_shutdown(async move {
            let _ = http_stopped.await;
        });
        if let Err(e) = serving.await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });

    let budget = sandbox::OutputBudget::new(cfg.output_budget);
    let sessions = sessions::SandboxTable::start(
        pool.clone(),
        cfg.sandboxes,
        metrics.clone(),
        budget.clone(),
        paused_dir(&cfg.state_dir),
        crate::profile::ProfileStore::new(crate::profile::ProfileStore::default_user_dir()),
    );
    // MCP over Streamable HTTP: the same pool, the same connection limit.
    let slots = limits::ConnectionSlots::new(cfg.max_connections);
    let stop_mcp = tokio_util::sync::CancellationToken::new();
    let (stop_mcp_http, mcp_http_stopped) = tokio::sync::oneshot::channel::<()>();
    let mcp_task = match (mcp_tcp, &token, listening.mcp) {
        (Some(l), Some(token), Some(addr)) => {
            let server = crate::mcp::NeuroVisorMcp::with_languages(
                Arc::new(crate::agent::PoolExecutor::new(pool.clone())),
                languages,
                crate::mcp::McpSettings {
                    memory_mib: Some(u64::from(memory_mib)),
                    ..Default::default()
                },
            )
            .with_desktops(Arc::new(sessions.clone()));
            let router = crate::mcp::http::router(
                server,
                token.clone(),
                token_file.clone(),
                addr,
                stop_mcp.clone(),
                metrics.clone(),
            );
            let listener = slots.limit_listener(l);
            Some(tokio::spawn(async move {
                let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = mcp_http_stopped.await;
                });
                if let Err(e) = serving.await {
                    tracing::warn!("MCP endpoint stopped: {e}");
                }
            }))
        }
        _ => None,
    };

    // The E2B API: the same sandboxes, the same connection limit.
    let (stop_e2b_http, e2b_http_stopped) = tokio::sync::oneshot::channel::<()>();
    let e2b_task = match (e2b_tcp, &token, listening.e2b) {
        (Some(l), Some(token), Some(addr)) => {
            let state = crate::e2b::E2bState::new(
                sessions.clone(),
                token.clone(),
                token_file.clone(),
                cfg.pool.size,
                pool.sandbox().images().name.clone(),
                metrics.clone(),
                addr,
            );
            let router = crate::e2b::router(state);
            let listener = slots.limit_listener(l);
            Some(tokio::spawn(async move {
                let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = e2b_http_stopped.await;
                });
                if let Err(e) = serving.await {
                    tracing::warn!("E2B endpoint stopped: {e}");
                }
            }))
        }
        _ => None,
    };
    // The desktop viewer: the same sandboxes, the same connection limit.
    let (stop_desktop_http, desktop_http_stopped) = tokio::sync::oneshot::channel::<()>();
    let desktop_task = match (desktop_tcp, listening.desktop) {
        (Some((l, novnc)), Some(addr)) => {
            let host = if addr.ip().is_unspecified() {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            } else {
                addr
            };
            sessions.set_desktop_url(format!("http://{host}"));
            let router = crate::desktop::web::router(sessions.clone(), novnc);
            let listener = slots.limit_listener(l);
            Some(tokio::spawn(async move {
                let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = desktop_http_stopped.await;
                });
                if let Err(e) = serving.await {
                    tracing::warn!("desktop viewer stopped: {e}");
                }
            }))
        }
        _ => None,
    };
    let sessions_svc = SandboxesServer::new(sessions::SandboxesService::new(sessions.clone()))
        .max_decoding_message_size(crate::exec::MAX_REQUEST_BYTES);
    let sandbox_svc = SandboxServer::new(
        sandbox::SandboxService::new(pool.clone(), metrics.clone(), budget)
            .with_stall_timeout(cfg.stall_timeout)
            .with_profiles(sessions.clone()),
    )
    .max_decoding_message_size(crate::exec::MAX_REQUEST_BYTES);
    let agent_svc = AgentServer::new(agent::AgentService::new(
        pool.clone(),
        metrics.clone(),
        cfg.ollama_host.clone(),
        cfg.default_model.clone(),
    ));
    let inference_svc = InferenceServiceServer::new(inference::InferenceProxy::new(
        OllamaClient::new(&cfg.ollama_host),
        cfg.default_model.clone(),
        metrics.clone(),
    ));
    // The same services behind both listeners; the access layer tells them
    // apart (Unix socket: peer credentials; TCP: the token).
    let access = AccessLayer::new(token, token_file.clone(), metrics.clone());
    let routes = |b: Server| {
        b.max_concurrent_streams(Some(cfg.max_streams_per_connection))
            // A client that opens connections and then answers nothing is dropped.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(access.clone())
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(sandbox_svc.clone())
            .add_service(sessions_svc.clone())
            .add_service(agent_svc.clone())
            .add_service(inference_svc.clone())
    };
    let (stop_grpc, grpc_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // One connection limit for every listener (`slots`, above).
    let unix_server = routes(Server::builder()).serve_with_incoming_shutdown(
        slots.limit(UnixListenerStream::new(unix)),
        stopped(grpc_stopped.clone()),
    );
    let tcp_server = tcp.map(|l| {
        routes(tcp_builder).serve_with_incoming_shutdown(
            slots.limit(TcpListenerStream::new(l)),
            stopped(grpc_stopped.clone()),
        )
    });
    let server = async move {
        let tcp = async move {
            match tcp_server {
                Some(s) => s.await,
                None => Ok(()),
            }
        };
        tokio::try_join!(unix_server, tcp).map(|_| ())
    };
    tokio::pin!(server);
    tracing::info!(
        socket = %listening.socket.display(),
        tcp = ?listening.tcp,
        tls = listening.tls,
        mcp = ?listening.mcp,
        e2b = ?listening.e2b,
        %metrics_addr,
        warm = cfg.pool.warm,
        max = cfg.pool.max,
        "daemon serving"
    );
    ready(&listening);

    let mut result = Ok(());
    tokio::select! {
        r = &mut server => result = r.map_err(|e| DaemonError::Serve(error_chain(&e))),
        _ = shutdown => {
            tracing::info!("shutting down: draining in-flight requests (grace {:?})", cfg.shutdown_grace);
        }
    }
    // New clients find no socket (and boot their VMs themselves).
    drop(socket);
    let _ = stop_grpc.send(true);
    let _ = stop_mcp_http.send(());
    let _ = stop_e2b_http.send(());
    let _ = stop_desktop_http.send(());
    // In-flight executions finish within the grace period; the pool destroys
    // warm VMs at once and waits for leased ones.
    let drain_server = async {
        if tokio::time::timeout(cfg.shutdown_grace, &mut server)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; cancelling the remaining requests");
        }
        // MCP calls still open now end with their sessions (their VMs destroyed).
        stop_mcp.cancel();
    };
    // Sandboxes end now (they would hold their leases, and the pool's
    // drain, for as long as they live).
    tokio::join!(drain_server, async {
        sessions.kill_all().await;
        pool.shutdown(cfg.shutdown_grace + Duration::from_secs(10)).await
    });
    for t in [mcp_task, e2b_task, desktop_task].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = stop_http.send(());
    let _ = http_task.await;
    health_task.abort();
    // Anything still alive (cancelled requests) is killed here, by a VM
    // management thread: only those may signal jailed processes.
    let vms = dir.join("vms");
    let _ = vm_rt
        .handle()
        .spawn(async move {
            clean_leftovers(&vms);
            clean_leftover_cgroups();
        })
        .await;
    // A VM process that was just killed may still be closing its files.
    for attempt in 1..=5 {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) if attempt == 5 => tracing::warn!("cannot remove {}: {e}", dir.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop(lock);
    tracing::info!("daemon stopped");
    result
}
