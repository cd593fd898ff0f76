//! `neurovisor serve` (and the seed-style `neurovisor --warm N --max M`): the daemon.
//!
//! Settings come from flags, their environment variables, a TOML config file
//! (`--config`), and defaults, in that order of precedence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use neurovisor::llm::ollama::DEFAULT_OLLAMA_HOST;
use neurovisor::pool::PoolConfig;
use neurovisor::server::{self, limits, DaemonConfig, Listening, TlsFiles};
use neurovisor::{config, VmSize};
use serde::Deserialize;

use super::{parse_duration, VmArgs, EXIT_BAD_INPUT, EXIT_SANDBOX_ERROR};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Pre-warmed VMs kept ready [default: 3].
    #[arg(long, env = "NEUROVISOR_POOL_SIZE")]
    pub warm: Option<usize>,
    /// Most VMs alive at once, warm + busy [default: 10].
    #[arg(long, env = "NEUROVISOR_MAX_VMS")]
    pub max: Option<usize>,
    /// VM size of the pool [default: the profile's, else medium].
    #[arg(long, value_enum, env = "NEUROVISOR_SIZE")]
    pub size: Option<VmSize>,
    /// Also serve gRPC on this TCP address; every request over it needs
    /// `authorization: Bearer <token>` (the token is in <state-dir>/token).
    /// Without it the daemon listens on its Unix socket only,
    /// <state-dir>/neurovisor.sock. (`--grpc-addr` is an old name.)
    #[arg(long, alias = "grpc-addr", env = "NEUROVISOR_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Also serve MCP (Model Context Protocol, Streamable HTTP) on this TCP
    /// address, endpoint `http://ADDR/mcp`, with the pool as executor; every
    /// request needs `Authorization: Bearer <token>` (<state-dir>/token).
    #[arg(long, env = "NEUROVISOR_MCP_LISTEN", value_name = "ADDR")]
    pub mcp_listen: Option<SocketAddr>,
    /// Also serve an E2B-compatible HTTP API on this TCP address, so the
    /// official E2B SDKs drive this daemon's sandboxes: set E2B_API_URL and
    /// E2B_SANDBOX_URL to http://ADDR and E2B_API_KEY to the token
    /// (<state-dir>/token).
    #[arg(long, env = "NEUROVISOR_E2B_LISTEN", value_name = "ADDR")]
    pub e2b_listen: Option<SocketAddr>,
    /// Also serve the desktop viewer (noVNC) on this TCP address: desktop
    /// sandboxes are watched or driven in a browser at the URL
    /// `neurovisor sandbox vnc ID` prints (each with its sandbox's token).
    #[arg(long, env = "NEUROVISOR_DESKTOP_LISTEN", value_name = "ADDR")]
    pub desktop_listen: Option<SocketAddr>,
    /// Where the noVNC web client is [default: /usr/share/novnc, Debian's
    /// novnc package].
    #[arg(long, env = "NEUROVISOR_NOVNC_DIR", value_name = "DIR")]
    pub novnc_dir: Option<PathBuf>,
    /// PEM certificate chain: makes the --listen address TLS (with --tls-key).
    #[arg(long, env = "NEUROVISOR_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "NEUROVISOR_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Group whose members may use the Unix socket (mode 0660); when the
    /// group does not exist the socket is 0600 [default: neurovisor].
    #[arg(long, env = "NEUROVISOR_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Prometheus /metrics listen address [default: 127.0.0.1:9090].
    #[arg(long, env = "NEUROVISOR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long a request waits for a free VM before RESOURCE_EXHAUSTED [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Requests that may wait for a VM at once; more get RESOURCE_EXHAUSTED at once [default: 64].
    #[arg(long)]
    pub max_queued: Option<usize>,
    /// Client connections open at once; more wait to be accepted [default: 256].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Calls at once on one client connection [default: 64].
    #[arg(long)]
    pub max_streams: Option<u32>,
    /// MiB of program output buffered for slow clients, across all requests [default: 256].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub output_budget_mib: Option<u64>,
    /// A streaming client that reads nothing for this long loses its execution (its VM is destroyed) [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub client_stall_timeout: Option<Duration>,
    /// Sandboxes (`neurovisor sandbox create`) live at once; more get RESOURCE_EXHAUSTED [default: --max].
    #[arg(long)]
    pub max_sandboxes: Option<usize>,
    /// MiB of guest memory all live sandboxes may hold together [default: no cap beyond --max-sandboxes].
    #[arg(long)]
    pub max_sandbox_memory: Option<u64>,
    /// Run without seccomp filters and capability drops (debugging only).
    #[arg(long, env = "NEUROVISOR_NO_CONFINE")]
    pub no_confine: bool,
    /// How long in-flight executions may finish after SIGTERM [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Ollama for inference.InferenceService/Infer [default: http://localhost:11434].
    #[arg(long, env = "OLLAMA_HOST")]
    pub ollama_host: Option<String>,
    /// Default model for Infer [default: qwen3].
    #[arg(long, env = "NEUROVISOR_MODEL")]
    pub model: Option<String>,
    /// TOML file with any of the settings above (snake_case keys).
    #[arg(long, env = "NEUROVISOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// The config file: every key optional, unknown keys rejected (typos).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    warm: Option<usize>,
    max: Option<usize>,
    size: Option<VmSize>,
    listen: Option<SocketAddr>,
    /// The old name of `listen`.
    grpc_addr: Option<SocketAddr>,
    mcp_listen: Option<SocketAddr>,
    e2b_listen: Option<SocketAddr>,
    desktop_listen: Option<SocketAddr>,
    novnc_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    socket_group: Option<String>,
    metrics_addr: Option<SocketAddr>,
    queue_timeout: Option<String>,
    shutdown_grace: Option<String>,
    ollama_host: Option<String>,
    model: Option<String>,
    max_queued: Option<usize>,
    max_connections: Option<usize>,
    max_streams: Option<u32>,
    output_budget_mib: Option<u64>,
    client_stall_timeout: Option<String>,
    max_sandboxes: Option<usize>,
    max_sandbox_memory: Option<u64>,
}

impl ServeArgs {
    fn file(&self) -> Result<FileConfig, String> {
        let Some(path) = &self.config else {
            return Ok(FileConfig::default());
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            format!(
                "config file {}: {}",
                path.display(),
                e.message().lines().next().unwrap_or("invalid TOML")
            )
        })
    }

    pub fn resolve(&self) -> Result<DaemonConfig, String> {
        let f = self.file()?;
        let dur = |flag: Option<Duration>, file: &Option<String>, default: u64| -> Result<Duration, String> {
            match (flag, file) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => parse_duration(s),
                (None, None) => Ok(Duration::from_secs(default)),
            }
        };
        let pool = PoolConfig {
            warm: self.warm.or(f.warm).unwrap_or(3),
            max: self.max.or(f.max).unwrap_or(10),
            size: self
                .size
                .or(f.size)
                .or(self.vm.load_profile()?.and_then(|p| p.size))
                .unwrap_or_default(),
            queue_timeout: dur(self.queue_timeout, &f.queue_timeout, 30)?,
            max_queued: self
                .max_queued
                .or(f.max_queued)
                .unwrap_or(PoolConfig::default().max_queued),
            ..PoolConfig::default()
        };
        pool.validate()?;
        // The old variable of --listen, for configurations that still set it.
        let old_env = match std::env::var("NEUROVISOR_GRPC_ADDR") {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().parse::<SocketAddr>().map_err(|e| {
                format!("NEUROVISOR_GRPC_ADDR={v}: {e} (give host:port, e.g. 127.0.0.1:50051; NEUROVISOR_LISTEN is its new name)")
            })?),
            _ => None,
        };
        let listen = self.listen.or(old_env).or(f.listen).or(f.grpc_addr);
        let tls = match (
            self.tls_cert.clone().or(f.tls_cert),
            self.tls_key.clone().or(f.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err("--tls-cert needs --tls-key too (the certificate's PEM private key)".into())
            }
            (None, Some(_)) => {
                return Err("--tls-key needs --tls-cert too (the PEM certificate chain)".into())
            }
        };
        if tls.is_some() && listen.is_none() {
            return Err(
                "--tls-cert/--tls-key secure the TCP listener, but there is none: also pass --listen ADDR (the Unix socket needs no TLS)"
                    .into(),
            );
        }
        let max_vms = pool.max;
        Ok(DaemonConfig {
            llm_bridge: None,
            network: None,
            listen,
            mcp_listen: self.mcp_listen.or(f.mcp_listen),
            e2b_listen: self.e2b_listen.or(f.e2b_listen),
            desktop_listen: self.desktop_listen.or(f.desktop_listen),
            novnc_dir: self
                .novnc_dir
                .clone()
                .or(f.novnc_dir)
                .unwrap_or_else(|| neurovisor::desktop::web::DEFAULT_NOVNC_DIR.into()),
            tls,
            socket_group: self
                .socket_group
                .clone()
                .or(f.socket_group)
                .unwrap_or_else(|| neurovisor::transport::DEFAULT_SOCKET_GROUP.into()),
            metrics_addr: self
                .metrics_addr
                .or(f.metrics_addr)
                .unwrap_or(([127, 0, 0, 1], 9090).into()),
            state_dir: self
                .vm
                .state_dir
                .clone()
                .unwrap_or_else(config::default_state_dir),
            pool,
            shutdown_grace: dur(self.shutdown_grace, &f.shutdown_grace, 30)?,
            ollama_host: self
                .ollama_host
                .clone()
                .or(f.ollama_host)
                .unwrap_or_else(|| DEFAULT_OLLAMA_HOST.into()),
            default_model: self.model.clone().or(f.model).unwrap_or_else(|| "qwen3".into()),
            confine: !self.no_confine && nix::unistd::geteuid().is_root(),
            rate_limit: Default::default(),
            warm_languages: Vec::new(),
            snapshot: None,
            max_connections: self
                .max_connections
                .or(f.max_connections)
                .unwrap_or(limits::DEFAULT_MAX_CONNECTIONS),
            max_streams_per_connection: self
                .max_streams
                .or(f.max_streams)
                .unwrap_or(limits::DEFAULT_MAX_STREAMS_PER_CONNECTION),
            output_budget: self
                .output_budget_mib
                .or(f.output_budget_mib)
                .map(|m| (m as usize) << 20)
                .unwrap_or(limits::DEFAULT_OUTPUT_BUDGET),
            stall_timeout: match (self.client_stall_timeout, &f.client_stall_timeout) {
                (Some(d), _) => d,
                (None, Some(s)) => parse_duration(s)?,
                (None, None) => server::sandbox::DEFAULT_STALL_TIMEOUT,
            },
            sandboxes: server::sessions::SandboxLimits {
                max_sandboxes: self.max_sandboxes.or(f.max_sandboxes).unwrap_or(max_vms),
                max_memory_mib: self
                    .max_sandbox_memory
                    .or(f.max_sandbox_memory)
                    .unwrap_or(u64::MAX),
            },
        })
    }
}

/// Registers the SIGTERM/SIGINT handlers now (not at first poll), so a signal
/// that arrives right after start-up already drains instead of killing.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

pub async fn serve(a: ServeArgs) -> u8 {
    let mut cfg = match a.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("neurovisor: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let (backend, images) = match a.vm.sandbox() {
        Ok(s) => {
            cfg.rate_limit = s.rate_limit;
            cfg.warm_languages = s.warm_languages.clone();
            cfg.network = s.network.clone();
            // `<state>/snapshots`, shared with `run`: the daemon removes
            // `<state>/daemon` when it stops, and a template outlives that.
            cfg.snapshot = a.vm.snapshot_source(&cfg.state_dir);
            cfg.llm_bridge = match a.vm.bridge_config(Some(&cfg.ollama_host)) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("neurovisor: {e}");
                    return EXIT_BAD_INPUT;
                }
            };
            s.into_parts()
        }
        Err(e) => {
            eprintln!("neurovisor: {e}");
            return EXIT_SANDBOX_ERROR;
        }
    };
    let summary = format!(
        "warm {}, max {}, size {}, image {}",
        cfg.pool.warm, cfg.pool.max, cfg.pool.size, images.name
    );
    let ready = move |l: &Listening| {
        eprintln!(
            "neurovisor: serving gRPC on {}, metrics on http://{}/metrics ({summary})",
            l.grpc_summary(),
            l.metrics
        );
        if let Some(a) = l.e2b {
            eprintln!(
                "neurovisor: serving the E2B API on http://{a} (E2B_API_URL and E2B_SANDBOX_URL; E2B_API_KEY is the token in {})",
                l.token_file.display()
            );
        }
        if let Some(a) = l.desktop {
            eprintln!(
                "neurovisor: serving the desktop viewer on http://{a} (`neurovisor sandbox vnc ID` prints a sandbox's URL)"
            );
        }
        if let Some(a) = l.mcp {
            eprintln!(
                "neurovisor: serving MCP on http://{a}{} (token in {})",
                neurovisor::mcp::http::MCP_PATH,
                l.token_file.display()
            );
        }
    };
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("neurovisor: cannot install signal handlers: {e}");
            return EXIT_SANDBOX_ERROR;
        }
    };
    match server::run(cfg, backend, images, shutdown, ready).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("neurovisor: {e}");
            EXIT_SANDBOX_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        s: ServeArgs,
    }

    #[test]
    fn a_profile_sets_the_pool_s_size_and_image_and_flags_win() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "size: small\ncapabilities:\n  packages: [jq]\n").expect("write");
        let path = file.to_str().expect("utf8");
        let t = T::parse_from(["x", "--profile", path]);
        assert_eq!(t.s.resolve().expect("valid").pool.size, VmSize::Small);
        let image = t.s.vm.image_selection().image.expect("an image");
        assert!(image.starts_with("default+"), "{image}");
        let t = T::parse_from(["x", "--profile", path, "--size", "large", "--image", "full"]);
        assert_eq!(t.s.resolve().expect("valid").pool.size, VmSize::Large);
        assert_eq!(t.s.vm.image_selection().image.as_deref(), Some("full"));
        let t = T::parse_from(["x", "--profile", "./missing.yaml"]);
        let e = t.s.resolve().expect_err("no such file");
        assert!(e.starts_with("cannot read ./missing.yaml: "), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("nv.toml");
        std::fs::write(&file, "warm = 1\nmax = 4\nqueue_timeout = \"5s\"\n").expect("write");
        let t = T::parse_from(["x", "--config", file.to_str().expect("utf8"), "--max", "6"]);
        let c = t.s.resolve().expect("valid");
        assert_eq!((c.pool.warm, c.pool.max), (1, 6));
        assert_eq!(c.pool.queue_timeout, Duration::from_secs(5));
        assert_eq!(c.listen, None, "no TCP unless asked");
        assert_eq!(c.socket_group, "neurovisor");

        std::fs::write(&file, "grpc_addr = \"127.0.0.1:7\"\n").expect("write");
        let t = T::parse_from(["x", "--config", file.to_str().expect("utf8")]);
        assert_eq!(
            t.s.resolve().expect("old key").listen,
            Some(([127, 0, 0, 1], 7).into())
        );
        let t = T::parse_from(["x", "--grpc-addr", "127.0.0.1:8"]);
        assert_eq!(
            t.s.resolve().expect("old flag").listen,
            Some(([127, 0, 0, 1], 8).into())
        );
        let e = T::parse_from(["x", "--listen", "127.0.0.1:8", "--tls-cert", "c.pem"])
            .s
            .resolve()
            .unwrap_err();
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        let e = T::parse_from(["x", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .s
            .resolve()
            .unwrap_err();
        assert!(e.contains("also pass --listen"), "{e}");

        std::fs::write(&file, "wram = 1\n").expect("write");
        let e = T::parse_from(["x", "--config", file.to_str().expect("utf8")])
            .s
            .resolve()
            .unwrap_err();
        assert!(e.contains("wram"), "{e}");
        let e = T::parse_from(["x", "--warm", "5", "--max", "2"])
            .s
            .resolve()
            .unwrap_err();
        assert!(e.contains("warm (5) cannot exceed max (2)"), "{e}");
    }
}
