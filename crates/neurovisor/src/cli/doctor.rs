//! `neurovisor doctor`: what this host can do and how to fix what it cannot.

use clap::Args;
use neurovisor::doctor::{run_checks_with, Level};

use super::VmArgs;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

pub fn doctor(a: DoctorArgs) -> u8 {
    // With --profile, the image checked is the profile's.
    if let Err(e) = a.vm.load_profile() {
        eprintln!("neurovisor: {e}");
        return super::EXIT_BAD_INPUT;
    }
    let checks = run_checks_with(&a.vm.backend_options(), &a.vm.image_selection());
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    if a.json {
        println!("{}", serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        for c in &checks {
            let tag = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Info => "info",
                Level::Fail => "FAIL",
            };
            println!("[{tag}] {:<20} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("       {:<20} fix: {fix}", "");
            }
        }
        println!(
            "{}",
            if failed {
                "Some checks failed: NeuroVisor cannot run VMs until they are fixed."
            } else {
                "This host can run NeuroVisor VMs."
            }
        );
    }
    u8::from(failed)
}
