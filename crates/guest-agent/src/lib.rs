//! NeuroVisor guest agent: PID 1 of the microVM and the execution server.
//!
//! As PID 1 it prepares the throwaway root ([`init`]), forks the gRPC server
//! ([`server`]) and reaps orphans until the server exits, then stops the VM.
//! The binaries (`src/main.rs`, and the test-only `neurovisor-agent-misbehave`
//! with the `misbehave` feature) only call [`main`].

mod bridge;
mod contexts;
mod exec;
mod files;
mod init;
mod languages;
#[cfg(feature = "misbehave")]
mod misbehave;
mod procs;
mod reseed;
mod serial;
mod server;
mod warm;

use nix::unistd::{fork, ForkResult};

fn start_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
}

fn run_server(warm: Vec<String>) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("neurovisor-agent: tokio runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(server::serve(warm)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("neurovisor-agent: {e}");
            1
        }
    }
}

/// The agent's entry point (as PID 1 or, for tests, as a plain process).
pub fn main() {
    if std::env::args().any(|a| a == "--version") {
        println!("neurovisor-agent {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if std::process::id() != 1 {
        start_logging(&std::env::var("NV_LOG").unwrap_or_else(|_| "info".into()));
        let warm = std::env::var("NV_WARM").unwrap_or_default();
        let warm = warm
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        std::process::exit(run_server(warm));
    }
    let params = init::read_boot_params();
    if params.poweroff_only {
        init::shutdown(&params);
    }
    start_logging(&params.log);
    if let Err(e) = init::setup_root(&params) {
        eprintln!("neurovisor-agent: cannot prepare the root filesystem: {e}");
        init::shutdown(&params);
    }
    // SAFETY: no threads exist yet (the runtime is created in the child).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => std::process::exit(run_server(params.warm.clone())),
        Ok(ForkResult::Parent { child }) => {
            init::reap_until(child);
            init::shutdown(&params);
        }
        Err(e) => {
            eprintln!("neurovisor-agent: fork: {e}");
            init::shutdown(&params);
        }
    }
}
