//! The E2B-compatible API (`serve --e2b-listen`) driven by the official E2B
//! Python SDKs, unmodified (`e2b` 2.63.x and `e2b-code-interpreter` 2.11.x,
//! installed into the test venv by scripts/setup.sh): the daemon and the SDK share a network namespace
//! whose only interface is loopback, so any attempt of the SDK to reach
//! E2B's cloud fails instead of passing silently. Real VMs, real commands,
//! real files; the daemon leaves nothing behind.

mod common;

use std::process::Command;

use common::daemon::start_daemon_offline;

fn python() -> std::path::PathBuf {
    let p = neurovisor::config::cache_dir().join("pyenv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs the E2B SDK for this test)",
        p.display()
    );
    p
}

#[test]
fn the_official_e2b_sdk_drives_sandboxes_from_a_loopback_only_namespace() {
    let d = start_daemon_offline(&["--warm", "1", "--max", "3", "--e2b-listen", "127.0.0.1:3000"]);
    let token = std::fs::read_to_string(d.dir.join("token")).expect("the daemon's token");
    let token = token.trim();
    for (script, ok) in [
        ("e2b_check.py", "E2B-CHECK OK"),
        ("interpreter_check.py", "INTERPRETER-CHECK OK"),
    ] {
        run_check(&d, token, script, ok);
    }
    // Sandboxes the SDKs killed are gone; the daemon stops clean.
    assert_eq!(d.stop(), Some(0));
}

/// Pause and resume need a `--snapshot` daemon on QEMU (see
/// `tests/sandboxes.rs`); the SDK's `pause()` and `connect()` drive them.
#[test]
fn the_official_e2b_sdk_pauses_and_resumes_a_sandbox() {
    let d = start_daemon_offline(&[
        "--warm",
        "0",
        "--max",
        "2",
        "--snapshot",
        "--e2b-listen",
        "127.0.0.1:3000",
    ]);
    let token = std::fs::read_to_string(d.dir.join("token")).expect("the daemon's token");
    run_check(&d, token.trim(), "pause_check.py", "PAUSE-CHECK OK");
    assert_eq!(d.stop(), Some(0));
}

/// Runs one SDK script in the daemon's network namespace.
fn run_check(d: &common::daemon::Daemon, token: &str, script: &str, ok: &str) {
    let script = format!("{}/tests/e2b/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", d.pid()))
        .arg("--")
        .arg(python())
        .arg(&script)
        .env("E2B_API_URL", "http://127.0.0.1:3000")
        .env("E2B_SANDBOX_URL", "http://127.0.0.1:3000")
        .env("E2B_API_KEY", token)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .expect("run the E2B check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(ok),
        "{script} failed ({:?}):\n{stdout}\n{stderr}\ndaemon log:\n{}",
        out.status,
        d.log_text()
    );
    eprint!("{stdout}");
}
