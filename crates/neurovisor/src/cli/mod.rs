//! Command-line interface: argument parsing and the subcommands.

mod agent;
mod bench;
mod bench_daemon;
mod bench_snapshot;
mod doctor;
mod images;
mod install;
mod mcp;
mod profile;
mod run;
mod sandbox;
mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use neurovisor::daemon_client::DaemonEndpoint;
use neurovisor::images::{ImageSelection, ImageSet};
use neurovisor::llm::bridge::BridgeConfig;
use neurovisor::security::rate_limit::RateLimitConfig;
use neurovisor::vmm::fc_api::RateLimiter;
use neurovisor::vmm::jailer::IdRange;
use neurovisor::vmm::qemu::QemuOptions;
use neurovisor::vmm::{select_backend, Accel, BackendKind, BackendOptions, FirecrackerOptions};
use neurovisor::{config, Sandbox};

/// Exit status for failures of the sandbox itself (VM did not boot, images missing...).
pub const EXIT_SANDBOX_ERROR: u8 = 125;
/// Exit status for bad input (unknown language, empty code...).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the program hit its time limit (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug, Parser)]
#[command(
    name = "neurovisor",
    version,
    about = "Run untrusted code in ephemeral microVMs",
    long_about = "Run untrusted code in ephemeral microVMs.\n\nWithout a subcommand, `neurovisor [--warm N --max M --size S ...]` starts the daemon (same as `neurovisor serve`), and `neurovisor --agent TASK [--model M]` runs one task in agent mode (same as `neurovisor agent TASK`).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug); NEUROVISOR_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log lines on stderr as text or JSON (one object per line, with the
    /// request's trace_id from its span).
    #[arg(
        long,
        global = true,
        env = "NEUROVISOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: neurovisor::telemetry::LogFormat,
    /// Export traces and logs over OTLP/gRPC to this endpoint (e.g.
    /// http://localhost:4317); without it nothing is exported.
    #[arg(long, global = true, env = "NEUROVISOR_OTLP", value_name = "URL")]
    pub otlp: Option<String>,
    /// Push the metrics of a one-shot command (`run`, `agent`) to this
    /// Prometheus Pushgateway when it ends (e.g. http://localhost:9091).
    #[arg(long, global = true, env = "NEUROVISOR_PUSHGATEWAY", value_name = "URL")]
    pub pushgateway: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: serve::ServeArgs,
    /// The seed form of agent mode: `neurovisor --agent "task" --model qwen3`.
    #[command(flatten)]
    seed_agent: agent::SeedAgentArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run code in a fresh microVM and stream its output.
    ///
    /// Exit status: the program's own; 128+N if it was killed by signal N;
    /// 124 if it hit the time limit; 2 for bad input; 125 if the sandbox failed.
    Run(run::RunArgs),
    /// Install packages in a fresh microVM whose network reaches only the
    /// package index, then run a command there (Fission's `install`).
    Install(install::InstallArgs),
    /// Clone a repository into a fresh microVM (network: its host and the
    /// package index), install its requirements.txt, run a command there.
    Repo(install::RepoArgs),
    /// Let an LLM solve a task by writing code that runs in fresh microVMs.
    ///
    /// Exit status: 0 with a final answer; 1 if --max-iterations was reached;
    /// 2 for bad input; 3 if the LLM server is unreachable, lacks the model or
    /// answered with an error; 125 if the sandbox cannot be set up.
    Agent(agent::AgentArgs),
    /// Serve the Model Context Protocol on stdin/stdout, for MCP clients
    /// (desktop agents, IDEs) that spawn it: tools execute_code and
    /// list_languages, each call in a fresh microVM (through the daemon when
    /// one is running, else booted directly); through a daemon also the
    /// desktop tools (desktop_create, desktop_screenshot, desktop_action,
    /// desktop_kill), whose desktops are destroyed when the client closes.
    Mcp(mcp::McpArgs),
    /// Run the daemon: a pre-warmed VM pool behind a gRPC API, plus /metrics.
    Serve(Box<serve::ServeArgs>),
    /// Sandboxes that live across calls, on a running daemon: create, exec,
    /// list, get, kill, timeout.
    ///
    /// Exit status of exec: the program's own (as for run); 2 for bad input
    /// or an unknown sandbox; 125 if the daemon failed.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Check that this host can run VMs, and say how to fix what is missing.
    Doctor(doctor::DoctorArgs),
    /// Build the guest kernel and root filesystem images (cached).
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Sandbox profiles: list them and their presets, validate, show compiled.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Benchmarks (printed, not asserted).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Internal: the egress gateway of one VM (started by neurovisor itself).
    #[command(hide = true)]
    NetGateway(NetGatewayArgs),
}

/// Internal arguments of `net-gateway` (see `neurovisor::net::gateway`).
#[derive(Debug, Clone, Args)]
pub struct NetGatewayArgs {
    #[arg(long)]
    control_fd: i32,
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// The VM's `NetSettings` as JSON.
    #[arg(long)]
    settings: String,
    /// The VM's namespace, when the host made it (jailed Firecracker).
    #[arg(long)]
    vm_netns: Option<PathBuf>,
}

impl Cli {
    /// `net-gateway`'s arguments, when that is the command: it must run
    /// before any runtime thread exists.
    pub fn net_gateway(&self) -> Option<Result<neurovisor::net::gateway::GatewayArgs, String>> {
        let Some(Command::NetGateway(a)) = &self.command else {
            return None;
        };
        Some(
            serde_json::from_str(&a.settings)
                .map_err(|e| format!("net-gateway: bad settings: {e}"))
                .map(|settings| neurovisor::net::gateway::GatewayArgs {
                    control_fd: a.control_fd,
                    settings,
                    uid: a.uid,
                    gid: a.gid,
                    vm_netns: a.vm_netns.clone(),
                }),
        )
    }
}

/// Options shared by every command that boots VMs.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// A sandbox profile (`neurovisor profile list`) or a profile file: its
    /// image, size, limits, environment and agent prompt apply; flags given
    /// here win over it.
    #[arg(long, env = "NEUROVISOR_PROFILE", value_name = "NAME|FILE")]
    profile: Option<String>,
    /// The profile, once loaded (`VmArgs::load_profile`).
    #[arg(skip)]
    loaded: std::sync::OnceLock<neurovisor::profile::Profile>,
    /// Guest image: `default` (python, bash, javascript) or `full` (adds go,
    /// rust) [default: the profile's, else default].
    #[arg(long, env = "NEUROVISOR_IMAGE")]
    image: Option<String>,
    /// Guest kernel (default: the cached build, ~/.cache/neurovisor/vmlinux).
    #[arg(long, env = "NEUROVISOR_KERNEL")]
    kernel: Option<PathBuf>,
    /// Root filesystem image (default: the cached build of --image).
    #[arg(long, env = "NEUROVISOR_ROOTFS")]
    rootfs: Option<PathBuf>,
    /// Accelerator: detected when not given (KVM if usable, else TCG).
    #[arg(long, env = "NEUROVISOR_ACCEL", value_enum)]
    accel: Option<Accel>,
    /// Directory for per-VM sockets and logs (default /run/neurovisor for root).
    #[arg(long, env = "NEUROVISOR_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long, env = "NEUROVISOR_QEMU_BIN")]
    qemu_bin: Option<PathBuf>,
    /// vhost-device-vsock binary (default: on PATH or in ~/.cargo/bin).
    #[arg(long, env = "NEUROVISOR_VHOST_VSOCK_BIN")]
    vhost_vsock_bin: Option<PathBuf>,
    /// Run QEMU without its seccomp sandbox (debugging only).
    #[arg(long, hide = true)]
    no_qemu_sandbox: bool,
    /// VMM: `auto` uses Firecracker when its binary is found and hardware KVM
    /// is usable, QEMU otherwise.
    #[arg(long, env = "NEUROVISOR_BACKEND", value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Firecracker binary (default: `firecracker` on PATH).
    #[arg(long, env = "NEUROVISOR_FIRECRACKER_BIN")]
    firecracker_bin: Option<PathBuf>,
    /// Firecracker's jailer binary (default: `jailer` on PATH).
    #[arg(long, env = "NEUROVISOR_JAILER_BIN")]
    jailer_bin: Option<PathBuf>,
    /// Run Firecracker under its jailer (default: when the jailer is found and we are root).
    #[arg(long, overrides_with = "no_jailer")]
    jailer: bool,
    /// Run Firecracker without its jailer.
    #[arg(long, overrides_with = "jailer")]
    no_jailer: bool,
    /// Jail the QEMU backend's processes (own uid, namespaces, private root).
    /// Default: when running as root.
    #[arg(long, overrides_with = "no_jail")]
    jail: bool,
    /// Run the QEMU backend's processes unjailed.
    #[arg(long, env = "NEUROVISOR_NO_JAIL", overrides_with = "jail")]
    no_jail: bool,
    /// uids/gids for jailed VMs, FIRST-LAST (each VM gets its own).
    #[arg(long, env = "NEUROVISOR_JAIL_IDS", default_value = "1000000000-1000065535")]
    jail_ids: IdRange,
    /// Firecracker: root drive bandwidth limit in bytes per second.
    #[arg(long, env = "NEUROVISOR_DRIVE_BANDWIDTH")]
    drive_bandwidth: Option<u64>,
    /// Firecracker: root drive limit in operations per second.
    #[arg(long, env = "NEUROVISOR_DRIVE_IOPS")]
    drive_iops: Option<u64>,
    /// Guest-to-host vsock bandwidth limit in bytes per second (0 = unlimited;
    /// default 16 MiB/s with a 4 MiB burst).
    #[arg(long, env = "NEUROVISOR_VSOCK_BANDWIDTH", value_name = "BYTES_PER_SEC")]
    vsock_bandwidth: Option<u64>,
    /// Guest-initiated vsock connections per second; excess ones are closed
    /// (0 = unlimited; default 50/s with a burst of 100).
    #[arg(long, env = "NEUROVISOR_VSOCK_OPS", value_name = "OPS_PER_SEC")]
    vsock_ops: Option<u64>,
    /// Interpreters each VM starts before its code arrives, comma-separated,
    /// or `none` (a direct run starts only its own language, if listed).
    #[arg(long, env = "NEUROVISOR_WARM_LANGUAGES", value_delimiter = ',',
          default_value = "python", value_parser = parse_warm_language)]
    warm_languages: Vec<String>,
    /// Restore VMs from a snapshot of a template VM (booted once per size,
    /// agent and warm interpreters ready) instead of booting each one; the
    /// template is cached under the state directory, keyed by its inputs.
    /// A restore that fails is logged and that VM boots instead.
    #[arg(long, env = "NEUROVISOR_SNAPSHOT")]
    snapshot: bool,
    /// A user's snapshot device-state file (made there if missing; implies
    /// --snapshot). Without a value: ./snapshot_file.
    #[arg(long, value_name = "PATH", num_args = 0..=1,
          default_missing_value = neurovisor::snapshot::DEFAULT_SNAPSHOT_FILE)]
    snapshot_file: Option<PathBuf>,
    /// The memory file of that snapshot (implies --snapshot). Without a
    /// value: ./mem_file.
    #[arg(long, value_name = "PATH", num_args = 0..=1,
          default_missing_value = neurovisor::snapshot::DEFAULT_MEM_FILE)]
    mem_file: Option<PathBuf>,
    /// The inference bridge: programs reach the LLM server at
    /// http://127.0.0.1:11434 inside their VM, carried over the agent's
    /// channel (no network), rate-limited per VM. `run`: this program;
    /// `serve`: requests that ask for it (`llm_bridge`).
    #[arg(long, env = "NEUROVISOR_LLM_BRIDGE")]
    llm_bridge: bool,
    /// The LLM server behind the bridge, Ollama or OpenAI-compatible
    /// [default: serve's --ollama-host, else $OLLAMA_HOST, else http://localhost:11434].
    #[arg(long, env = "NEUROVISOR_LLM_BRIDGE_URL", value_name = "URL")]
    llm_bridge_url: Option<String>,
    /// Environment variable holding an API key the bridge sends to the
    /// server (programs never see it).
    #[arg(long, value_name = "VAR")]
    llm_bridge_key_env: Option<String>,
    /// Requests per second each VM may send through the bridge (0 = no limit).
    #[arg(long, value_name = "PER_SEC", default_value_t = neurovisor::llm::bridge::DEFAULT_REQUESTS_PER_SEC)]
    llm_bridge_rate: u64,
    /// Bytes per second each VM's bridge traffic may carry, both ways (0 = no limit).
    #[arg(long, value_name = "BYTES_PER_SEC", default_value_t = neurovisor::llm::bridge::DEFAULT_BYTES_PER_SEC)]
    llm_bridge_bandwidth: u64,
    /// Give each VM a network device behind its own gateway, default deny:
    /// only names from --allow-host (and the profile's egress) resolve, and
    /// only to those addresses, on 80/443, with a matching TLS SNI or HTTP Host.
    #[arg(long, env = "NEUROVISOR_NETWORK")]
    network: bool,
    /// A name the VM may reach (repeatable): api.example.com, or
    /// *.example.com for its subdomains. Needs --network.
    #[arg(long, value_name = "NAME")]
    allow_host: Vec<String>,
    /// An address range the VM may reach on any TCP port without a name
    /// (repeatable; private ranges are refused unless named). Needs --network.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<String>,
    /// Bytes per second each VM may send through its gateway (default: unlimited).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    egress_bandwidth: Option<u64>,
    /// The network namespace gateways connect from (a file such as
    /// /run/netns/NAME; default: the host's).
    #[arg(long, env = "NEUROVISOR_NET_UPSTREAM_NETNS", value_name = "PATH")]
    net_upstream_netns: Option<PathBuf>,
    /// Resolvers the gateways ask (IP or IP:PORT, comma-separated; default:
    /// the host's /etc/resolv.conf).
    #[arg(long, env = "NEUROVISOR_NET_DNS", value_name = "ADDR", value_delimiter = ',',
          value_parser = neurovisor::net::parse_dns_server)]
    net_dns: Vec<std::net::SocketAddr>,
}

fn parse_warm_language(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a language name; give names like python,javascript or none"
        ))
    }
}

impl VmArgs {
    pub fn qemu_options(&self) -> QemuOptions {
        QemuOptions {
            qemu_bin: self.qemu_bin.clone(),
            vhost_vsock_bin: self.vhost_vsock_bin.clone(),
            accel: self.accel,
            no_sandbox: self.no_qemu_sandbox,
            jail: match (self.jail, self.no_jail) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            jail_ids: self.jail_ids,
        }
    }

    pub fn firecracker_options(&self) -> FirecrackerOptions {
        FirecrackerOptions {
            firecracker_bin: self.firecracker_bin.clone(),
            jailer_bin: self.jailer_bin.clone(),
            jailer: match (self.jailer, self.no_jailer) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            jail_ids: self.jail_ids,
            drive_rate_limiter: RateLimiter::from_rates(self.drive_bandwidth, self.drive_iops),
            ..Default::default()
        }
    }

    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            kind: self.backend,
            qemu: self.qemu_options(),
            firecracker: self.firecracker_options(),
        }
    }

    /// Loads and checks `--profile` (once, before any VM), and returns it.
    /// Its image is used unless `--image` was given.
    pub fn load_profile(&self) -> Result<Option<&neurovisor::profile::Profile>, String> {
        let Some(name) = &self.profile else {
            return Ok(None);
        };
        if self.loaded.get().is_none() {
            let p = profile::store().load(name).map_err(|e| e.to_string())?;
            let _ = self.loaded.set(p);
        }
        Ok(self.loaded.get())
    }

    /// The image VMs boot: `--image`, else the profile's, else `default`.
    fn image_name(&self) -> String {
        self.image
            .clone()
            .or_else(|| self.loaded.get().map(|p| p.image.clone()))
            .unwrap_or_else(|| "default".into())
    }

    pub fn image_selection(&self) -> ImageSelection {
        ImageSelection {
            image: Some(self.image_name()),
            kernel: self.kernel.clone(),
            rootfs: self.rootfs.clone(),
        }
    }

    /// Whether `--llm-bridge` was given.
    pub fn llm_bridge(&self) -> bool {
        self.llm_bridge
    }

    /// The inference bridge's settings (checked), with `--llm-bridge`.
    /// `ollama_host`: serve's `--ollama-host`, the default server.
    pub fn bridge_config(&self, ollama_host: Option<&str>) -> Result<Option<BridgeConfig>, String> {
        if !self.llm_bridge {
            return Ok(None);
        }
        let upstream = self
            .llm_bridge_url
            .clone()
            .or_else(|| ollama_host.map(str::to_string))
            .or_else(|| std::env::var("OLLAMA_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| neurovisor::llm::ollama::DEFAULT_OLLAMA_HOST.to_string());
        let api_key = match &self.llm_bridge_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!("--llm-bridge-key-env {var}: that variable is not set; export the API key in it")
            })?),
        };
        let cfg = BridgeConfig {
            upstream,
            api_key,
            requests_per_sec: self.llm_bridge_rate,
            bytes_per_sec: self.llm_bridge_bandwidth,
        };
        // Checked here, once, for every command that boots VMs.
        neurovisor::llm::bridge::LlmBridge::new(cfg.clone(), Default::default())
            .map_err(|e| e.to_string())?;
        Ok(Some(cfg))
    }

    /// The VMs' network, checked once: `--network` with `--allow-host` and
    /// `--allow-cidr`, plus the profile's egress (a profile that names egress
    /// turns the network on). `None`: no network device.
    pub fn net_settings(&self) -> Result<Option<neurovisor::net::NetSettings>, String> {
        let profile = self.load_profile()?;
        let from_profile = profile.is_some_and(|p| !p.egress.is_empty());
        if !self.network && !from_profile {
            if !self.allow_host.is_empty() || !self.allow_cidr.is_empty() {
                return Err(neurovisor::net::PolicyError::NoNetwork.to_string());
            }
            return Ok(None);
        }
        let mut hosts = self.allow_host.clone();
        let mut cidrs = self.allow_cidr.clone();
        if let Some(p) = profile {
            hosts.extend(p.egress.domains.iter().cloned());
            cidrs.extend(p.egress.cidrs.iter().cloned());
        }
        let policy = neurovisor::net::EgressPolicy::new(&hosts, &cidrs, self.egress_bandwidth)
            .map_err(|e| e.to_string())?;
        if let Some(ns) = &self.net_upstream_netns {
            if !ns.exists() {
                return Err(format!(
                    "--net-upstream-netns {}: no such namespace file; create it with `ip netns add NAME` (then /run/netns/NAME)",
                    ns.display()
                ));
            }
        }
        if self.snapshot || self.snapshot_file.is_some() || self.mem_file.is_some() {
            return Err(
                "--network VMs are booted, never restored (their link is made at boot); drop --snapshot"
                    .into(),
            );
        }
        Ok(Some(neurovisor::net::NetSettings {
            policy,
            upstream: neurovisor::net::Upstream {
                netns: self.net_upstream_netns.clone(),
                dns: self.net_dns.clone(),
            },
            program: None,
        }))
    }

    /// The state directory given with --state-dir (or its variable), if any.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.state_dir.as_deref()
    }

    pub fn sandbox(&self) -> Result<Sandbox, String> {
        if let Some(p) = self.load_profile()? {
            let image = self.image_name();
            if self.rootfs.is_none()
                && image == p.image
                && p.needs_derived_image()
                && !neurovisor::images::image_dir(&image)
                    .join("rootfs.ext4")
                    .is_file()
            {
                return Err(format!(
                    "profile '{}' installs {} into image {image}, which is not built; build it with `neurovisor images build --profile {}`",
                    p.name,
                    p.capabilities.packages.join(", "),
                    self.profile.as_deref().unwrap_or(&p.name)
                ));
            }
        }
        let images = ImageSet::resolve(&self.image_selection()).map_err(|e| e.to_string())?;
        let (backend, _why) = select_backend(&self.backend_options()).map_err(|e| e.to_string())?;
        let state = self.state_dir.clone().unwrap_or_else(config::default_state_dir);
        // VMs of a `run` that was killed (SIGKILL) left their directories.
        neurovisor::supervisor::clean_before_start(&state.join("vms"));
        let snapshots = self
            .snapshot_source(&state)
            .map(|s| std::sync::Arc::new(neurovisor::snapshot::Snapshots::new(s)));
        let mut sandbox = Sandbox::new(backend, images, state);
        sandbox.rate_limit = RateLimitConfig::default().with_rates(self.vsock_bandwidth, self.vsock_ops);
        sandbox.warm_languages = self
            .warm_languages
            .iter()
            .filter(|l| *l != "none")
            .cloned()
            .collect();
        sandbox.snapshots = snapshots;
        sandbox.llm_bridge = self
            .bridge_config(None)?
            .map(|c| neurovisor::llm::bridge::LlmBridge::new(c, Default::default()).map(std::sync::Arc::new))
            .transpose()
            .map_err(|e| e.to_string())?;
        sandbox.network = self.net_settings()?.map(std::sync::Arc::new);
        Ok(sandbox)
    }

    /// Where snapshots come from, if VMs are restored.
    pub fn snapshot_source(&self, state: &std::path::Path) -> Option<neurovisor::snapshot::SnapshotSource> {
        use neurovisor::snapshot::{SnapshotSource, DEFAULT_MEM_FILE, DEFAULT_SNAPSHOT_FILE};
        match (&self.snapshot_file, &self.mem_file) {
            (None, None) if !self.snapshot => None,
            (None, None) => Some(SnapshotSource::Managed {
                cache_dir: state.join("snapshots"),
            }),
            (s, m) => Some(SnapshotSource::Files {
                state: s.clone().unwrap_or_else(|| DEFAULT_SNAPSHOT_FILE.into()),
                mem: m.clone().unwrap_or_else(|| DEFAULT_MEM_FILE.into()),
            }),
        }
    }
}

/// Where `run` and `agent` send executions: a daemon, or VMs booted directly.
#[derive(Debug, Clone, Args)]
pub struct DaemonTarget {
    /// Use the daemon at this address: unix:/path/to/neurovisor.sock,
    /// host:port, http://host:port or https://host:port (default: the daemon
    /// whose socket is in the state directory, when one is running, else VMs
    /// booted directly). Over TCP the token comes from NEUROVISOR_TOKEN, else
    /// from <state-dir>/token.
    #[arg(long, env = "NEUROVISOR_ADDR", conflicts_with = "local")]
    pub addr: Option<String>,
    /// Always boot VMs directly, even when a daemon is running (--local=false: look for one).
    #[arg(
        long,
        env = "NEUROVISOR_LOCAL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub local: bool,
    /// PEM CA certificate of an https:// daemon with a private CA.
    #[arg(long, env = "NEUROVISOR_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl DaemonTarget {
    /// `vm`'s profile, if one was named; a profile's VMs boot here (a daemon
    /// boots its own image and size), so no daemon is looked for, and one
    /// named with `--addr` is an error.
    pub fn for_profile(&mut self, vm: &VmArgs) -> Result<Option<neurovisor::profile::Profile>, String> {
        // Checked before a daemon is chosen, so bad egress never takes a VM.
        let net = vm.net_settings()?;
        if net.is_some() {
            if self.addr.is_some() {
                return Err("--network boots its VMs here (each with its own gateway), but --addr (or NEUROVISOR_ADDR) names a daemon; drop one of them".into());
            }
            self.local = true;
        }
        let Some(p) = vm.load_profile()? else {
            return Ok(None);
        };
        if self.addr.is_some() {
            return Err(format!(
                "--profile {} boots its VMs here, but --addr (or NEUROVISOR_ADDR) names a daemon, which boots its own; drop one of them",
                p.name
            ));
        }
        self.local = true;
        Ok(Some(p.clone()))
    }

    /// The daemon to use, or `None` for direct boots. `state_dir`: the one
    /// chosen with --state-dir, if any (where the socket and token are looked for).
    pub async fn resolve(
        &self,
        state_dir: Option<&std::path::Path>,
    ) -> Result<Option<DaemonEndpoint>, String> {
        let dirs = neurovisor::daemon_client::discovery_dirs(state_dir);
        match (&self.addr, self.local) {
            (Some(addr), _) => DaemonEndpoint::parse(addr, &dirs[0], self.tls_ca.clone())
                .map(Some)
                .map_err(|e| e.to_string()),
            (None, false) => Ok(neurovisor::daemon_client::discover(&dirs).await),
            (None, true) => Ok(None),
        }
    }
}

impl Cli {
    /// Logging and trace export as the flags ask.
    pub fn telemetry(&self) -> neurovisor::telemetry::TelemetryConfig {
        neurovisor::telemetry::TelemetryConfig {
            verbose: self.verbose,
            format: self.log_format,
            otlp: self.otlp.clone(),
        }
    }
}

/// The metrics a one-shot command pushes at its end (`--pushgateway`), or
/// the error line for a URL that cannot work (bad input: before any VM).
pub fn one_shot_metrics(
    pushgateway: Option<&str>,
) -> Result<Option<std::sync::Arc<neurovisor::metrics::Metrics>>, String> {
    match pushgateway {
        None => Ok(None),
        Some(url) => {
            neurovisor::metrics::check_pushgateway(url).map_err(|e| e.to_string())?;
            Ok(Some(std::sync::Arc::new(neurovisor::metrics::Metrics::new())))
        }
    }
}

/// Pushes a one-shot command's metrics; a failure is one line on stderr
/// (the command's own result stands).
pub async fn push_metrics(
    metrics: Option<&neurovisor::metrics::Metrics>,
    pushgateway: Option<&str>,
    command: &str,
) {
    if let (Some(m), Some(url)) = (metrics, pushgateway) {
        if let Err(e) = m.push(url, command).await {
            eprintln!("neurovisor: {e}");
        }
    }
}

pub async fn dispatch(mut cli: Cli) -> u8 {
    match cli.command {
        None => match cli.seed_agent.agent.take() {
            Some(task) => agent::run_seed(task, cli.seed_agent, cli.serve, cli.pushgateway).await,
            None => serve::serve(cli.serve).await,
        },
        Some(Command::Agent(a)) => agent::run(a, cli.pushgateway).await,
        Some(Command::Serve(a)) => serve::serve(*a).await,
        Some(Command::Run(a)) => run::run(a, cli.pushgateway).await,
        Some(Command::Install(a)) => install::install(a, cli.pushgateway).await,
        Some(Command::Repo(a)) => install::repo(a, cli.pushgateway).await,
        Some(Command::Mcp(a)) => mcp::run(a).await,
        Some(Command::Sandbox(c)) => sandbox::sandbox(c).await,
        Some(Command::Doctor(a)) => doctor::doctor(a),
        Some(Command::Images(c)) => images::images(c).await,
        Some(Command::Profile(c)) => profile::profile(c),
        Some(Command::Bench(c)) => bench::bench(c).await,
        // Run by `main` before the runtime starts.
        Some(Command::NetGateway(_)) => EXIT_SANDBOX_ERROR,
    }
}

/// Parses "30", "30s", "500ms", "2m", "1h".
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 30, 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in '{s}' (use ms, s, m or h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration '{s}'"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
