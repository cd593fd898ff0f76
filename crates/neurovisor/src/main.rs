//! The `neurovisor` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use neurovisor::security::seccomp::{self, Role};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // A VM's gateway switches network namespaces, which only works while the
    // process has a single thread: before any runtime exists.
    if let Some(gw) = args.net_gateway() {
        return match gw.map(neurovisor::net::gateway::main) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("net-gateway: {e}");
                ExitCode::from(cli::EXIT_SANDBOX_ERROR)
            }
            Err(m) => {
                eprintln!("{m}");
                ExitCode::from(cli::EXIT_BAD_INPUT)
            }
        };
    }
    // The hooks confine API threads once the daemon arms its seccomp filters
    // (`neurovisor serve`); for other commands they do nothing.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("nv-api")
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .on_thread_start(seccomp::thread_hook(Role::Api))
        .on_thread_park(seccomp::thread_hook(Role::Api))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("neurovisor: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_SANDBOX_ERROR);
        }
    };
    // Exporters (`--otlp`) run as tasks on this runtime.
    let telemetry = {
        let _in_rt = rt.enter();
        match neurovisor::telemetry::Telemetry::init(&args.telemetry()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("neurovisor: {e}");
                return ExitCode::from(cli::EXIT_BAD_INPUT);
            }
        }
    };
    let code = rt.block_on(async {
        let code = cli::dispatch(args).await;
        telemetry.shutdown().await;
        code
    });
    // Do not wait for lingering blocking tasks (e.g. a stdin reader).
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(code)
}
