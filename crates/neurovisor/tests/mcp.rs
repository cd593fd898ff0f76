//! The MCP server against a real MCP client, the official Python SDK
//! (`mcp` 2.3.0, installed by scripts/setup.sh into the test venv), driving
//! `tests/mcp/mcp_check.py`: over stdio (`neurovisor mcp`, VMs booted
//! directly or through a running daemon) and over Streamable HTTP (`serve
//! --mcp-listen`, the pool), with both protocol revisions it serves
//! (2025-11-25 with `initialize`, 2026-07-28 stateless). The script lists the
//! tools and validates their schemas, runs Python and Bash, checks
//! `structuredContent` against the output schema, the error results,
//! progress for a 3 s program and cancellation (the VM gone within 1 s); and
//! the daemon's desktop tools (`tests/mcp/desktop_check.py`).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::assert_no_leftovers;
use common::daemon::start_daemon_in;

fn python() -> std::path::PathBuf {
    let p = neurovisor::config::cache_dir().join("pyenv/bin/python");
    assert!(
        p.is_file(),
        "{} missing: run `bash scripts/setup.sh` (it creates the venv with the MCP SDK)",
        p.display()
    );
    p
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/mcp_check.py");

/// Runs the check script; panics with its output unless it passed.
fn check(args: &[&str], what: &str) -> String {
    let out = Command::new(python())
        .arg(SCRIPT)
        .args(args)
        .env("NEUROVISOR_LOG", "neurovisor=info")
        .output()
        .expect("run mcp_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: the MCP client's checks failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: execute_code python"), "{what}: {stdout}");
    stdout
}

fn stdio_args<'a>(protocol: &'a str, vms: &'a str, server: &'a [&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--protocol",
        protocol,
        "--vms-dir",
        vms,
        "--stdio",
        env!("CARGO_BIN_EXE_neurovisor"),
    ];
    a.extend_from_slice(server);
    a
}

#[test]
fn stdio_with_direct_boots_serves_both_protocol_revisions() {
    let state = tempfile::Builder::new()
        .prefix("nvmcp-")
        .tempdir()
        .expect("state");
    let s = state.path().to_str().expect("utf-8 path").to_string();
    let vms = format!("{s}/vms");
    let server = ["mcp", "--local", "--size", "small", "--state-dir", &s];
    for protocol in ["2025-11-25", "2026-07-28"] {
        let out = check(&stdio_args(protocol, &vms, &server), &format!("stdio {protocol}"));
        assert!(out.contains(&format!("protocol {protocol}")), "{out}");
        assert!(out.contains("ok: execute_code cancel"), "{out}");
        assert_no_leftovers(state.path());
    }
}

#[test]
fn stdio_goes_through_a_running_daemon() {
    let state = Arc::new(
        tempfile::Builder::new()
            .prefix("nvmcpd-")
            .tempdir()
            .expect("state"),
    );
    let d = start_daemon_in(state.clone(), &["--warm", "0", "--max", "2"]);
    let s = state.path().to_str().expect("utf-8 path").to_string();
    let vms = format!("{s}/daemon/vms");
    let server = ["mcp", "--state-dir", &s];
    check(
        &stdio_args("2025-11-25", &vms, &server),
        "stdio through the daemon",
    );
    // The executions were the daemon's, not booted by `neurovisor mcp`:
    // Python, Bash and the 3 s progress program ran to the end (the
    // cancelled call and the refused ones are not counted as executions).
    let executed = d.metric_sum("neurovisor_executions_total");
    assert!(executed >= 3.0, "the daemon ran {executed} executions");
    assert!(
        !Path::new(&format!("{s}/vms")).exists(),
        "`neurovisor mcp` booted VMs itself"
    );
    assert_eq!(d.stop(), Some(0));
}

/// One raw HTTP/1.1 POST; returns the status code.
fn post_status(addr: &str, host: &str, headers: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#;
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn mcp_addr(d: &common::daemon::Daemon) -> String {
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(rest) = log.split("serving MCP on http://").nth(1) {
            return rest.split('/').next().expect("addr").to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no MCP address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A daemon serving MCP over Streamable HTTP: (state, daemon, its MCP
/// address, its token).
fn mcp_daemon(prefix: &str) -> (Arc<tempfile::TempDir>, common::daemon::Daemon, String, String) {
    let state = Arc::new(tempfile::Builder::new().prefix(prefix).tempdir().expect("state"));
    let d = start_daemon_in(
        state.clone(),
        &["--warm", "0", "--max", "2", "--mcp-listen", "127.0.0.1:0"],
    );
    let addr = mcp_addr(&d);
    let token = std::fs::read_to_string(state.path().join("token")).expect("token file");
    (state, d, addr, token.trim().to_string())
}

#[test]
fn streamable_http_from_the_daemon_needs_the_token_and_serves_both_revisions() {
    let (state, d, addr, token) = mcp_daemon("nvmcph-");
    let token = token.as_str();
    // No token or a wrong one: refused.
    assert_eq!(post_status(&addr, "127.0.0.1", ""), 401);
    assert_eq!(
        post_status(&addr, "127.0.0.1", "Authorization: Bearer 00\r\n"),
        401
    );
    let metrics = common::daemon::http_get(&d.metrics, "/metrics").1;
    for line in [
        r#"neurovisor_auth_failures_total{transport="mcp",reason="no_token"} 1"#,
        r#"neurovisor_auth_failures_total{transport="mcp",reason="wrong_token"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line}:\n{metrics}");
    }
    let url = format!("http://{addr}/mcp");
    let auth = format!("Authorization: Bearer {token}");
    // The right token from a page on another host (DNS rebinding): refused.
    assert_eq!(
        post_status(&addr, "attacker.example", &format!("{auth}\r\n")),
        403
    );
    let vms = format!("{}/daemon/vms", state.path().display());
    for protocol in ["2025-11-25", "2026-07-28"] {
        let out = check(
            &[
                "--http",
                &url,
                "--header",
                &auth,
                "--protocol",
                protocol,
                "--vms-dir",
                &vms,
            ],
            &format!("http {protocol}"),
        );
        assert!(out.contains("ok: execute_code cancel"), "{out}");
    }
    assert_eq!(d.stop(), Some(0));
    assert!(!Path::new(&vms).exists());
}

/// Runs `tests/mcp/desktop_check.py` with `args`; panics with its output
/// unless it passed. Returns (stdout, stderr).
fn desktop_check(args: &[&str], what: &str) -> (String, String) {
    let out = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/desktop_check.py"))
        .args(args)
        .env("NEUROVISOR_LOG", "neurovisor=info")
        .output()
        .expect("run desktop_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what}: the desktop checks failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{what}:\n{stdout}");
    (stdout, stderr)
}

/// The daemon's desktop tools through the official SDK
/// (`tests/mcp/desktop_check.py`): create, screenshot (an image result),
/// click and type (the screen changes), bad arguments and unknown ids as
/// error results, kill; over Streamable HTTP from the daemon, then over
/// stdio (`neurovisor mcp` going through the daemon), where the client
/// closes with its desktop still running and `neurovisor mcp` must destroy
/// it. Nothing is left.
#[test]
fn a_model_uses_a_desktop_through_the_mcp_tools() {
    let (state, d, addr, token) = mcp_daemon("nvmcpd-");
    let url = format!("http://{addr}/mcp");
    let (stdout, _) = desktop_check(&[&url, &token], "Streamable HTTP");
    assert!(
        stdout.contains("ok: desktop_kill: the desktop is gone"),
        "{stdout}"
    );
    assert!(d.vm_processes().is_empty(), "{:?}", d.vm_processes());

    let s = state.path().to_str().expect("utf-8 path");
    let (stdout, stderr) = desktop_check(
        &[
            "--stdio",
            env!("CARGO_BIN_EXE_neurovisor"),
            "mcp",
            "--state-dir",
            s,
        ],
        "stdio through the daemon",
    );
    assert!(stdout.contains("closing the client with"), "{stdout}");
    assert!(
        stderr.contains("destroyed the 1 desktop(s) this MCP client left running"),
        "`neurovisor mcp` did not destroy the desktop its client left:\n{stderr}"
    );
    // `neurovisor mcp` waited for the kill before exiting, and the SDK for it.
    assert!(d.vm_processes().is_empty(), "{:?}", d.vm_processes());
    assert!(
        !Path::new(&format!("{s}/vms")).exists(),
        "`neurovisor mcp` booted VMs itself"
    );
    assert_eq!(d.stop(), Some(0));
}
