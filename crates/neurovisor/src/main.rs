//! The `neurovisor` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("neurovisor: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_SANDBOX_ERROR);
        }
    };
    let code = rt.block_on(cli::dispatch(args));
    // Do not wait for lingering blocking tasks (e.g. a stdin reader).
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    ExitCode::from(code)
}
