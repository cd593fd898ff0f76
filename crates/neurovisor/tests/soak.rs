//! Soak: 300 short Python programs through a daemon pool like
//! `neurovisor serve --warm 2 --max 4` with 2-vCPU VMs and 4 concurrent clients.
//! No client may see a failure (a boot that stalls or dies is retried on a
//! fresh VM); the boot-time distribution and every retried boot are printed.
//! Afterwards no VM process, cgroup or directory is left.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{req, start_daemon_sized};

const EXECUTIONS: usize = 300;
const CLIENTS: usize = 4;

/// 5-7 minutes on a 2-core host (425 s measured on a shared, loaded one), so
/// not part of a plain `cargo test`; `scripts/test.sh` (CI) runs it with
/// `cargo test --release -p neurovisor --test soak -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "soak test, 5-7 min: run with --ignored (scripts/test.sh does)"]
async fn soak_300_executions_through_the_pool_without_a_client_visible_failure() {
    let state = Arc::new(
        tempfile::Builder::new()
            .prefix("nvsoak-")
            .tempdir()
            .expect("state"),
    );
    let d = start_daemon_sized(
        state,
        "medium",
        &["--warm", "2", "--max", "4", "--queue-timeout", "120s"],
    );
    d.wait_warm(2);
    let client = d.client().await;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (mut c, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= EXECUTIONS {
                        return failures;
                    }
                    let code = format!("import sys\nprint({i} * {i}, sys.version_info[0])");
                    match c.execute_once(req("python", &code)).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            let want = format!("{} 3\n", i * i);
                            if r.stdout != want.as_bytes() || r.exit_code != Some(0) {
                                failures.push(format!(
                                    "#{i}: exit {:?}, stdout {:?}, stderr {:?}",
                                    r.exit_code,
                                    String::from_utf8_lossy(&r.stdout),
                                    String::from_utf8_lossy(&r.stderr)
                                ));
                            }
                        }
                        Err(s) => failures.push(format!("#{i}: {:?}: {}", s.code(), s.message())),
                    }
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("client task"));
    }
    let took = started.elapsed();
    let st = d.status();
    let boot = &st["boot"];
    eprintln!(
        "soak: {EXECUTIONS} executions, {CLIENTS} clients, in {:.1} s: {} failed",
        took.as_secs_f64(),
        failures.len()
    );
    eprintln!(
        "soak: {} boots, boot-to-ready p50 {} ms, p95 {} ms, max {} ms; stall budget {} ms ({}); {} stalls, {} retries",
        boot["boots"],
        boot["p50_ms"],
        boot["p95_ms"],
        boot["max_ms"],
        boot["budget_ms"],
        boot["budget_basis"],
        boot["stalls"],
        boot["retries"]
    );
    for r in boot["recent_retries"].as_array().into_iter().flatten() {
        eprintln!(
            "soak: retried boot of VM {} (attempt {}): {}",
            r["vm_id"], r["attempt"], r["reason"]
        );
    }
    assert!(
        failures.is_empty(),
        "client-visible failures: {failures:#?}\ndaemon log:\n{}",
        d.log.lock().map(|l| l.clone()).unwrap_or_default()
    );
    assert!(boot["boots"].as_u64().unwrap_or(0) >= EXECUTIONS as u64, "{st}");
    d.wait_for("0 active, 0 booting", Duration::from_secs(60), |st| {
        st["active"] == 0 && st["booting"] == 0
    });
    // stop() checks: no VM process or directory, no unowned VM cgroup, no daemon dir.
    assert_eq!(d.stop(), Some(0));
    let qemu = common::processes_mentioning("nvsoak-");
    assert!(qemu.is_empty(), "left behind: {qemu:#?}");
}
