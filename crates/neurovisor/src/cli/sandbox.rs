//! `neurovisor sandbox ...`: sandboxes that live across calls, on a running
//! daemon (`neurovisor.v1.Sandboxes`).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use neurovisor::daemon_client::{DaemonClient, DaemonEndpoint, DaemonError};
use neurovisor::exec::Output;
use neurovisor_proto::v1::{CreateSandboxRequest, SandboxInfo};
use serde_json::json;

use super::run::{parse_env, ProgramArgs};
use super::{parse_duration, EXIT_BAD_INPUT, EXIT_SANDBOX_ERROR, EXIT_TIMEOUT};

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox: a VM of its own that keeps its files between runs,
    /// until it is killed or its timeout passes. Prints its id.
    Create(CreateArgs),
    /// Run a program in a sandbox; streams its output and exits with its
    /// status (like `run`).
    Exec(ExecArgs),
    /// The live sandboxes.
    List(ListArgs),
    /// One sandbox, as JSON.
    Get(IdArgs),
    /// Kill a sandbox: its VM is destroyed.
    Kill(IdArgs),
    /// Set a sandbox's timeout, counted from now.
    Timeout(TimeoutArgs),
    /// Pause a sandbox: its whole VM (memory, processes, files) is saved to
    /// the daemon's disk and stopped until `resume`; it does not expire
    /// meanwhile. Needs a daemon started with `--snapshot` on QEMU.
    Pause(IdArgs),
    /// Resume a paused sandbox where it stopped.
    Resume(ResumeArgs),
    /// Copy a file into or out of a sandbox: `cp LOCAL ID:PATH` or
    /// `cp ID:PATH LOCAL` (`-` for stdin/stdout). Streams; any size.
    Cp(CpArgs),
    /// List a directory of a sandbox.
    Ls(LsArgs),
    /// The URL where a desktop sandbox is watched or driven in a browser
    /// (noVNC; the daemon needs --desktop-listen). It holds the sandbox's
    /// token: share it as you would a password.
    Vnc(VncArgs),
    /// Save a desktop sandbox's screen as PNG.
    Screenshot(ScreenshotArgs),
    /// Drive a desktop sandbox: click, move, type, key, scroll, open a URL.
    Desktop(DesktopArgs),
}

#[derive(Debug, Args)]
pub struct VncArgs {
    id: String,
    /// A URL that only watches (the daemon drops the viewer's input).
    #[arg(long)]
    view_only: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct ScreenshotArgs {
    id: String,
    /// Where to write the PNG (`-`: stdout).
    #[arg(short, long, default_value = "screenshot.png")]
    output: PathBuf,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct DesktopArgs {
    id: String,
    #[command(subcommand)]
    action: DesktopCommand,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
enum DesktopCommand {
    /// Move the pointer to X Y.
    Move { x: u32, y: u32 },
    /// Click at X Y.
    Click {
        x: u32,
        y: u32,
        /// left, middle or right.
        #[arg(long, default_value = "left")]
        button: String,
        /// 2 for a double click.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Type TEXT into the focused window.
    Type { text: String },
    /// Press keys: X key names joined by + ("ctrl+l", "Return").
    Key { keys: Vec<String> },
    /// Scroll at X Y: positive AMOUNT down, negative up.
    Scroll {
        x: u32,
        y: u32,
        #[arg(allow_hyphen_values = true)]
        amount: i32,
    },
    /// Open URL in the browser.
    Open { url: String },
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// LOCAL or ID:PATH.
    from: String,
    /// LOCAL or ID:PATH (exactly one side is in a sandbox).
    to: String,
    /// Act as this sandbox user: "user" (default) or "root".
    #[arg(long, default_value = "user")]
    user: String,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    id: String,
    /// Absolute, or relative to the user's home.
    #[arg(default_value = ".")]
    path: String,
    /// Levels to descend.
    #[arg(long, default_value_t = 1)]
    depth: u32,
    #[arg(long, default_value = "user")]
    user: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// `ID:PATH` -> (id, path); `None` for a local path.
fn remote_of(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !path.is_empty()).then_some((id, path))
}

/// Which daemon.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon: unix:/path/to/neurovisor.sock, host:port, http://... or
    /// https://... (default: the one whose socket is in the state directory).
    #[arg(long, env = "NEUROVISOR_ADDR", global = true)]
    addr: Option<String>,
    /// PEM CA certificate of an https:// daemon with a private CA.
    #[arg(long, env = "NEUROVISOR_TLS_CA", value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// The daemon's state directory (where its socket and token are).
    #[arg(long, env = "NEUROVISOR_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// How long the sandbox lives (e.g. 300s, 10m, 2h) [default: 5m].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// A label, returned by get and list (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_env)]
    metadata: Vec<(String, String)>,
    /// Environment of every program run in it (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A built guest image (e.g. full) [default: the daemon's].
    #[arg(long)]
    image: Option<String>,
    /// small, medium or large [default: the daemon's].
    #[arg(long)]
    size: Option<String>,
    /// A sandbox profile known to the daemon: its image, size, environment
    /// and egress (the daemon needs --network for egress).
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// What its timeout does: kill it, or pause it to disk (needs a daemon
    /// that can pause: `serve --snapshot` on QEMU).
    #[arg(long, value_enum, default_value_t = OnTimeout::Kill)]
    on_timeout: OnTimeout,
    /// A paused sandbox resumes when a call uses it (exec, cp, ...).
    #[arg(long)]
    auto_resume: bool,
    /// Its programs reach the daemon's LLM server at
    /// http://127.0.0.1:11434 (the daemon needs --llm-bridge).
    #[arg(long)]
    llm_bridge: bool,
    /// Give it a network device behind its own gateway, default deny: only
    /// --allow-host names and --allow-cidr ranges (and its profile's egress)
    /// are reachable. The daemon needs --network.
    #[arg(long)]
    network: bool,
    /// A name it may reach (repeatable): api.example.com, or *.example.com.
    /// Needs --network.
    #[arg(long, value_name = "NAME")]
    allow_host: Vec<String>,
    /// An address range it may reach on any TCP port (repeatable). Needs --network.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<String>,
    /// Print the sandbox as JSON instead of its id.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnTimeout {
    Kill,
    Pause,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The sandbox's id (from `sandbox create`).
    id: String,
    #[command(flatten)]
    program: ProgramArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    id: String,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    id: String,
    /// Its timeout from now (default: what was left of it when paused).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Args)]
pub struct TimeoutArgs {
    id: String,
    /// The new timeout, from now (e.g. 300s, 10m).
    #[arg(value_parser = parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> u8 {
    eprintln!("neurovisor: {msg}");
    code
}

fn exit_code(e: &DaemonError) -> u8 {
    match e {
        DaemonError::Invalid(_) | DaemonError::BadAddress(_) | DaemonError::NotFound(_) => EXIT_BAD_INPUT,
        DaemonError::Other(_) => EXIT_SANDBOX_ERROR,
    }
}

async fn connect(d: &DaemonArgs) -> Result<DaemonClient, u8> {
    let dirs = neurovisor::daemon_client::discovery_dirs(d.state_dir.as_deref());
    let ep = match &d.addr {
        Some(addr) => {
            DaemonEndpoint::parse(addr, &dirs[0], d.tls_ca.clone()).map_err(|e| fail(&e, exit_code(&e)))?
        }
        None => neurovisor::daemon_client::discover(&dirs).await.ok_or_else(|| {
            fail(
                "no daemon is running (sandboxes live in a daemon): start `neurovisor serve`, or pass --addr",
                EXIT_SANDBOX_ERROR,
            )
        })?,
    };
    DaemonClient::connect(&ep)
        .await
        .map_err(|e| fail(&e, exit_code(&e)))
}

fn secs(d: Option<Duration>) -> Result<u32, u8> {
    match d {
        None => Ok(0),
        Some(d) if d.as_secs() == 0 => Err(fail("--timeout: at least 1s", EXIT_BAD_INPUT)),
        Some(d) => u32::try_from(d.as_secs()).map_err(|_| fail("--timeout: too long", EXIT_BAD_INPUT)),
    }
}

fn info_json(s: &SandboxInfo) -> serde_json::Value {
    json!({
        "sandbox_id": s.sandbox_id,
        "vm_id": s.vm_id,
        "started_at_ms": s.started_at_ms,
        "end_at_ms": s.end_at_ms,
        "metadata": s.metadata,
        "memory_mib": s.memory_mib,
        "vcpus": s.vcpus,
        "image": s.image,
        "restored": s.restored,
        "executions": s.executions,
        "paused": s.paused,
        "on_timeout": s.on_timeout,
        "auto_resume": s.auto_resume,
        "llm_bridge": s.llm_bridge,
        "desktop": s.desktop,
    })
}

pub async fn sandbox(cmd: SandboxCommand) -> u8 {
    match run(cmd).await {
        Ok(code) | Err(code) => code,
    }
}

async fn run(cmd: SandboxCommand) -> Result<u8, u8> {
    match cmd {
        SandboxCommand::Create(a) => {
            let timeout_s = secs(a.timeout)?;
            let mut c = connect(&a.daemon).await?;
            let s = c
                .sandbox_create(CreateSandboxRequest {
                    timeout_s,
                    metadata: a.metadata.into_iter().collect::<HashMap<_, _>>(),
                    env: a.env.into_iter().collect::<HashMap<_, _>>(),
                    image: a.image.unwrap_or_default(),
                    size: a.size.unwrap_or_default(),
                    on_timeout: match a.on_timeout {
                        OnTimeout::Kill => "kill",
                        OnTimeout::Pause => "pause",
                    }
                    .into(),
                    auto_resume: a.auto_resume,
                    llm_bridge: a.llm_bridge,
                    profile: a.profile.unwrap_or_default(),
                    network: a.network,
                    allow_hosts: a.allow_host,
                    allow_cidrs: a.allow_cidr,
                })
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            if a.json {
                println!("{}", info_json(&s));
            } else {
                println!("{}", s.sandbox_id);
            }
            Ok(0)
        }
        SandboxCommand::Vnc(a) => {
            let mut c = connect(&a.daemon).await?;
            let v = c
                .sandbox_desktop_view(&a.id, a.view_only)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            println!("{}", v.url);
            Ok(0)
        }
        SandboxCommand::Screenshot(a) => {
            let mut c = connect(&a.daemon).await?;
            let (png, w, h) = c
                .sandbox_screenshot(&a.id)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            if a.output.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(&png)
                    .and_then(|_| out.flush())
                    .map_err(|e| fail(format!("stdout: {e}"), EXIT_SANDBOX_ERROR))?;
            } else {
                std::fs::write(&a.output, &png)
                    .map_err(|e| fail(format!("{}: {e}", a.output.display()), EXIT_BAD_INPUT))?;
                eprintln!("neurovisor: {}x{} screenshot in {}", w, h, a.output.display());
            }
            Ok(0)
        }
        SandboxCommand::Desktop(a) => {
            use neurovisor_proto::v1::desktop_action_request::Action;
            use neurovisor_proto::v1::{Click, Point, Scroll};
            let action = match a.action {
                DesktopCommand::Move { x, y } => Action::Move(Point { x, y }),
                DesktopCommand::Click { x, y, button, count } => Action::Click(Click { x, y, button, count }),
                DesktopCommand::Type { text } => Action::TypeText(text),
                DesktopCommand::Key { keys } => Action::Key(keys.join(" ")),
                DesktopCommand::Scroll { x, y, amount } => Action::Scroll(Scroll { x, y, amount }),
                DesktopCommand::Open { url } => Action::OpenUrl(url),
            };
            let mut c = connect(&a.daemon).await?;
            c.sandbox_desktop_action(neurovisor_proto::v1::DesktopActionRequest {
                sandbox_id: a.id,
                action: Some(action),
            })
            .await
            .map_err(|e| fail(&e, exit_code(&e)))?;
            Ok(0)
        }
        SandboxCommand::Exec(a) => {
            let req = a.program.request().map_err(|m| fail(m, EXIT_BAD_INPUT))?;
            let mut c = connect(&a.daemon).await?;
            let mut sink = |o: Output<'_>| match o {
                Output::Stdout(b) => {
                    let mut s = std::io::stdout().lock();
                    let _ = s.write_all(b).and_then(|_| s.flush());
                }
                Output::Stderr(b) => {
                    let _ = std::io::stderr().lock().write_all(b);
                }
            };
            let r = c
                .sandbox_exec(&a.id, &req, &mut sink)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            let o = r.outcome;
            if o.timed_out {
                eprintln!(
                    "neurovisor: the program hit its time limit ({:?}) and was killed",
                    req.timeout
                );
                return Ok(EXIT_TIMEOUT);
            }
            Ok(u8::try_from(o.shell_status().clamp(0, 255)).unwrap_or(1))
        }
        SandboxCommand::List(a) => {
            let mut c = connect(&a.daemon).await?;
            let all = c.sandbox_list().await.map_err(|e| fail(&e, exit_code(&e)))?;
            if a.json {
                println!(
                    "{}",
                    serde_json::Value::Array(all.iter().map(info_json).collect())
                );
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                println!(
                    "{:<34} {:>8} {:>6} {:>10}",
                    "SANDBOX", "MEMORY", "RUNS", "ENDS IN"
                );
                for s in &all {
                    println!(
                        "{:<34} {:>5}MiB {:>6} {:>9}s",
                        s.sandbox_id,
                        s.memory_mib,
                        s.executions,
                        s.end_at_ms.saturating_sub(now) / 1000
                    );
                }
            }
            Ok(0)
        }
        SandboxCommand::Get(a) => {
            let mut c = connect(&a.daemon).await?;
            let s = c.sandbox_get(&a.id).await.map_err(|e| fail(&e, exit_code(&e)))?;
            println!("{}", info_json(&s));
            Ok(0)
        }
        SandboxCommand::Kill(a) => {
            let mut c = connect(&a.daemon).await?;
            c.sandbox_kill(&a.id).await.map_err(|e| fail(&e, exit_code(&e)))?;
            Ok(0)
        }
        SandboxCommand::Cp(a) => {
            let mut c = connect(&a.daemon).await?;
            match (remote_of(&a.from), remote_of(&a.to)) {
                (None, Some((id, path))) => {
                    let local = if a.from == "-" {
                        PathBuf::from("/dev/stdin")
                    } else {
                        PathBuf::from(&a.from)
                    };
                    c.sandbox_upload(id, &local, path, &a.user)
                        .await
                        .map_err(|e| fail(&e, exit_code(&e)))?;
                }
                (Some((id, path)), None) => {
                    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if a.to == "-" {
                        Box::new(tokio::io::stdout())
                    } else {
                        Box::new(
                            tokio::fs::File::create(&a.to)
                                .await
                                .map_err(|e| fail(format!("cannot write {}: {e}", a.to), EXIT_BAD_INPUT))?,
                        )
                    };
                    c.sandbox_download(id, path, &a.user, &mut out)
                        .await
                        .map_err(|e| fail(&e, exit_code(&e)))?;
                }
                _ => return Err(fail(
                    "cp: exactly one side must be SANDBOX_ID:PATH (the 32-digit id from `sandbox create`)",
                    EXIT_BAD_INPUT,
                )),
            }
            Ok(0)
        }
        SandboxCommand::Ls(a) => {
            let mut c = connect(&a.daemon).await?;
            let all = c
                .sandbox_list_dir(&a.id, &a.path, a.depth, &a.user)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            for e in &all {
                if a.json {
                    println!(
                        "{}",
                        json!({"name": e.name, "path": e.path, "type": e.r#type().as_str_name(),
                               "size": e.size, "mode": e.mode, "permissions": e.permissions,
                               "owner": e.owner, "group": e.group, "modified_unix_ns": e.modified_unix_ns,
                               "symlink_target": e.symlink_target})
                    );
                } else {
                    println!(
                        "{} {:<8} {:<8} {:>10} {}",
                        e.permissions, e.owner, e.group, e.size, e.path
                    );
                }
            }
            Ok(0)
        }
        SandboxCommand::Pause(a) => {
            let mut c = connect(&a.daemon).await?;
            let s = c
                .sandbox_pause(&a.id)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            println!("{}", info_json(&s));
            Ok(0)
        }
        SandboxCommand::Resume(a) => {
            let timeout_s = secs(a.timeout)?;
            let mut c = connect(&a.daemon).await?;
            let s = c
                .sandbox_resume(&a.id, timeout_s)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            println!("{}", info_json(&s));
            Ok(0)
        }
        SandboxCommand::Timeout(a) => {
            let timeout_s = secs(Some(a.timeout))?;
            let mut c = connect(&a.daemon).await?;
            let s = c
                .sandbox_set_timeout(&a.id, timeout_s)
                .await
                .map_err(|e| fail(&e, exit_code(&e)))?;
            println!("{}", info_json(&s));
            Ok(0)
        }
    }
}
