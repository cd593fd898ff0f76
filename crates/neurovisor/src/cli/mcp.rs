//! `neurovisor mcp`: the MCP server over stdio, for MCP clients that spawn it.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use neurovisor::agent::{CodeExecutor, DaemonExecutor, SandboxExecutor};
use neurovisor::config::VmSize;
use neurovisor::exec::MAX_TIMEOUT;
use neurovisor::mcp::desktop::SessionDesktops;
use neurovisor::mcp::{self, McpSettings, NeuroVisorMcp};

use super::{parse_duration, VmArgs, EXIT_BAD_INPUT, EXIT_SANDBOX_ERROR};

#[derive(Debug, Args)]
pub struct McpArgs {
    /// Time limit of a call that gives no timeout_seconds (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// Bytes of stdout and of stderr a call returns; the rest is cut and flagged.
    #[arg(long, default_value_t = mcp::DEFAULT_MAX_OUTPUT,
          value_parser = clap::value_parser!(u64).range(1..=neurovisor::exec::DEFAULT_MAX_OUTPUT))]
    max_output: u64,
    /// VM size for direct runs: small, medium, large (a daemon uses its own).
    #[arg(long, value_enum, default_value_t = VmSize::Medium)]
    size: VmSize,
    #[command(flatten)]
    target: super::DaemonTarget,
    #[command(flatten)]
    vm: VmArgs,
}

/// Serves until the client closes stdin (exit 0) or SIGINT/SIGTERM.
/// stdout carries only protocol messages; logs and errors go to stderr.
pub async fn run(a: McpArgs) -> u8 {
    if a.timeout.is_zero() || a.timeout > MAX_TIMEOUT {
        eprintln!(
            "neurovisor: --timeout {:?} is out of range; it must be between 1 s and {} s",
            a.timeout,
            MAX_TIMEOUT.as_secs()
        );
        return EXIT_BAD_INPUT;
    }
    let daemon = match a.target.resolve(a.vm.state_dir()).await {
        Ok(d) => d,
        Err(m) => {
            eprintln!("neurovisor: {m}");
            return EXIT_BAD_INPUT;
        }
    };
    // Desktops are the daemon's sandboxes: without one there are no desktop tools.
    let mut desktops = None;
    let (executor, memory_mib): (Arc<dyn CodeExecutor>, _) = match &daemon {
        Some(ep) => {
            tracing::info!(daemon = %ep, "MCP executions and desktops go through the daemon");
            let d = Arc::new(DaemonExecutor::new(ep.clone()));
            desktops = Some(Arc::new(SessionDesktops::new(d.clone())));
            (d, None)
        }
        None => match a.vm.sandbox() {
            Ok(sb) => (
                Arc::new(SandboxExecutor::new(sb, a.size)),
                Some(u64::from(a.size.memory_mib())),
            ),
            Err(m) => {
                eprintln!("neurovisor: {m}");
                return EXIT_SANDBOX_ERROR;
            }
        },
    };
    let settings = McpSettings {
        default_timeout: a.timeout,
        max_output_bytes: a.max_output,
        memory_mib,
    };
    let server = match NeuroVisorMcp::new(executor, settings).await {
        Ok(s) => match &desktops {
            Some(d) => s.with_desktops(d.clone()),
            None => s,
        },
        Err(e) => {
            eprintln!("neurovisor: {e}");
            return EXIT_SANDBOX_ERROR;
        }
    };
    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigterm, mut sigint) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("neurovisor: cannot handle signals: {e}");
            return EXIT_SANDBOX_ERROR;
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    let served = mcp::serve_stdio(server, shutdown).await;
    if let Some(d) = desktops {
        let n = d.kill_all().await;
        if n > 0 {
            tracing::info!("destroyed the {n} desktop(s) this MCP client left running");
        }
    }
    match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("neurovisor: {e}");
            EXIT_SANDBOX_ERROR
        }
    }
}
