//! The daemon (`neurovisor serve`): the gRPC API, the metrics endpoint, and the
//! pool's lifecycle.
//!
//! Start-up takes an exclusive lock on `<state>/daemon/lock` (two daemons on one
//! state directory refuse to start), removes what a previous daemon killed with
//! SIGKILL left behind, then pre-warms. SIGTERM/SIGINT stop accepting, let
//! in-flight executions finish within a grace period, destroy every VM and
//! remove the state directory.

pub mod agent;
pub mod inference;
pub mod limits;
pub mod sandbox;
pub mod trace;

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use neurovisor_proto::inference::inference_service_server::InferenceServiceServer;
use neurovisor_proto::v1::agent_server::AgentServer;
use neurovisor_proto::v1::sandbox_server::SandboxServer;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::exec::Sandbox;
use crate::images::ImageSet;
use crate::llm::OllamaClient;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolConfig};
use crate::security::{caps, lsm, seccomp, vm_guard};
use crate::vmm::process::kill_processes_mentioning;
use crate::vmm::VmmBackend;

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Parent state directory; the daemon works in `<state_dir>/daemon`.
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
    /// Client connections open at once.
    pub max_connections: usize,
    /// Calls at once on one connection.
    pub max_streams_per_connection: u32,
    /// Bytes of output buffered for clients, across all requests.
    pub output_budget: usize,
    /// How long a streaming client may read nothing before its execution is stopped.
    pub stall_timeout: Duration,
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
fn load_ebpf_guard(dir: &Path) {
    use crate::security::ebpf::{EbpfGuard, LsmMode};
    match EbpfGuard::load(LsmMode::IfActive) {
        Ok(mut g) => {
            for p in [
                PathBuf::from("/etc/shadow"),
                PathBuf::from("/etc/gshadow"),
                dir.join("lock"),
            ] {
                if p.exists() {
                    if let Err(e) = g.protect_path(&p) {
                        tracing::warn!("eBPF: cannot protect {}: {e}", p.display());
                    }
                }
            }
            tracing::info!(enforcing = g.lsm_enforcing(), "eBPF guard loaded");
            vm_guard::install(g);
        }
        Err(e) => tracing::warn!("eBPF guard not loaded: {e}"),
    }
}

/// The runtime VMs are booted and destroyed on; its threads are confined to
/// the VM management role.
struct VmRuntime(Option<tokio::runtime::Runtime>);

impl VmRuntime {
    fn new() -> Result<Self, DaemonError> {
        let hook = seccomp::thread_hook(seccomp::Role::Vm);
        let park = seccomp::thread_hook(seccomp::Role::Vm);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nv-vm")
            .thread_keep_alive(Duration::from_secs(1))
            .on_thread_start(hook)
            .on_thread_park(park)
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
            .map_err(|e| DaemonError::Serve(format!("cannot start the VM runtime: {e}")))
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

/// The exclusive lock of one state directory, held for the daemon's lifetime.
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateLock {
    pub fn acquire(dir: &Path) -> Result<Self, DaemonError> {
        let sd = |source| DaemonError::StateDir {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(sd)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(sd)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, _)) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                return Err(DaemonError::Locked {
                    dir: dir.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
        };
        lock.set_len(0).map_err(sd)?;
        lock.rewind().map_err(sd)?;
        write!(lock, "{}", std::process::id()).map_err(sd)?;
        Ok(Self { _lock: lock })
    }
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
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
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
    ready: impl FnOnce(SocketAddr, SocketAddr),
) -> Result<(), DaemonError> {
    cfg.pool.validate().map_err(DaemonError::Pool)?;
    let dir = daemon_dir(&cfg.state_dir);
    let lock = StateLock::acquire(&dir)?;
    // Jailed Firecracker VMs lose the parent-death signal (the jailer changes
    // uid), so they can outlive a SIGKILLed daemon: clean those too.
    crate::vmm::jailer::clean_leftover_jails(&dir);
    let removed = clean_leftovers(&dir.join("vms"));
    // Also what killed `run`s left (their VMs' owners are gone).
    crate::supervisor::clean_stale_vms(&cfg.state_dir.join("vms"));
    clean_leftover_cgroups();
    if removed > 0 {
        tracing::warn!("removed {removed} VM(s) left by a previous daemon");
    }
    let grpc = bind(cfg.grpc_addr, "gRPC", "--grpc-addr").await?;
    let http = bind(cfg.metrics_addr, "metrics", "--metrics-addr").await?;
    let (grpc_addr, metrics_addr) = (
        grpc.local_addr().unwrap_or(cfg.grpc_addr),
        http.local_addr().unwrap_or(cfg.metrics_addr),
    );

    report_bpf_lsm();
    #[cfg(feature = "ebpf")]
    load_ebpf_guard(&dir);
    let vm_rt = VmRuntime::new()?;
    if cfg.confine {
        let firecracker = backend.name() == "firecracker";
        let ebpf = vm_guard::loaded();
        let filters = seccomp::RoleFilters::new(
            caps::vm_role_caps(firecracker, ebpf),
            if ebpf { "vm-ebpf" } else { "vm" },
        )
        .map_err(|e| DaemonError::Confine(e.to_string()))?;
        seccomp::arm(
            filters,
            &[tokio::runtime::Handle::current(), vm_rt.handle()],
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
    metrics.allow_model(&cfg.default_model);
    metrics.allow_languages(images.languages.iter().map(|l| l.name.as_str()));
    let mut sandbox = Sandbox::new(backend, images, dir.clone());
    sandbox.rate_limit = cfg.rate_limit;
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

    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let budget = sandbox::OutputBudget::new(cfg.output_budget);
    let max_request = crate::exec::MAX_REQUEST_BYTES;
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(cfg.max_streams_per_connection))
        // A client that opens connections and sends nothing is dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            SandboxServer::new(
                sandbox::SandboxService::new(pool.clone(), metrics.clone(), budget)
                    .with_stall_timeout(cfg.stall_timeout),
            )
                .max_decoding_message_size(max_request),
        )
        .add_service(AgentServer::new(agent::AgentService::new(
            pool.clone(),
            metrics.clone(),
            cfg.ollama_host.clone(),
            cfg.default_model.clone(),
        )))
        .add_service(InferenceServiceServer::new(inference::InferenceProxy::new(
            OllamaClient::new(&cfg.ollama_host),
            cfg.default_model.clone(),
            metrics.clone(),
        )))
        .serve_with_incoming_shutdown(
            limits::limit_connections(TcpListenerStream::new(grpc), cfg.max_connections),
            async move {
                let _ = grpc_stopped.await;
            },
        );
    tokio::pin!(server);
    tracing::info!(%grpc_addr, %metrics_addr, warm = cfg.pool.warm, max = cfg.pool.max, "daemon serving");
    ready(grpc_addr, metrics_addr);

    let mut result = Ok(());
    tokio::select! {
        r = &mut server => result = r.map_err(|e| DaemonError::Serve(e.to_string())),
        _ = shutdown => {
            tracing::info!("shutting down: draining in-flight requests (grace {:?})", cfg.shutdown_grace);
        }
    }
    let _ = stop_grpc.send(());
    // In-flight executions finish within the grace period; the pool destroys
    // warm VMs at once and waits for leased ones.
    let drain_server = async {
        if tokio::time::timeout(cfg.shutdown_grace, &mut server)
            .await
            .is_err()
        {
            tracing::warn!("grace period over; cancelling the remaining requests");
        }
    };
    tokio::join!(
        drain_server,
        pool.shutdown(cfg.shutdown_grace + Duration::from_secs(10))
    );
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
