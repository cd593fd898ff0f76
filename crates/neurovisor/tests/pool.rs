//! Pool behaviour that needs no daemon: back-off after repeated boot failures,
//! retry of a stalled boot for a waiting request.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use neurovisor::boot::{BootStats, BudgetConfig};
use neurovisor::metrics::Metrics;
use neurovisor::pool::{Pool, PoolConfig, PoolError};
use neurovisor::vmm::QemuBackend;
use neurovisor::{ExecRequest, Output, Sandbox, VmSize};

#[tokio::test]
async fn repeated_boot_failures_back_off_and_report_why() {
    let state = tempfile::Builder::new()
        .prefix("nvpool-")
        .tempdir()
        .expect("state");
    let mut images = common::images("default");
    // Not a kernel: QEMU refuses it at once, so every boot fails fast.
    let bogus = state.path().join("not-a-kernel");
    std::fs::write(&bogus, b"garbage").expect("write");
    images.kernel = bogus;
    let backend = QemuBackend::new(&Default::default()).expect("backend");
    let pool = Pool::start(
        Sandbox::new(Arc::new(backend), images, state.path().to_path_buf()),
        PoolConfig {
            warm: 2,
            max: 3,
            size: VmSize::Small,
            queue_timeout: Duration::from_secs(5),
            ..PoolConfig::default()
        },
        Arc::new(Metrics::new()),
    )
    .expect("pool");
    let until = Instant::now() + Duration::from_secs(30);
    // Past the first back-off step, so the window (2 s) outlasts the checks below.
    while pool.status().degraded.is_none() || pool.status().consecutive_boot_failures < 4 {
        assert!(Instant::now() < until, "never degraded: {:?}", pool.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = pool.status();
    let why = st.degraded.clone().expect("reason");
    assert!(st.consecutive_boot_failures >= 3, "{st:?}");
    assert!(why.contains("qemu"), "the reason names the failure: {why}");
    match pool.acquire().await {
        Err(e @ PoolError::Degraded { .. }) => assert!(e.to_string().contains("retry later"), "{e}"),
        Err(e) => panic!("expected Degraded, got {e}"),
        Ok(_) => panic!("a VM from a pool that cannot boot"),
    }
    // Backing off, not looping: QEMU fails in milliseconds, so a boot loop would
    // rack up hundreds of failures in 3 s; back-off (1 s, 2 s, ...) allows a few.
    let before = pool.status().consecutive_boot_failures;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pool.status().consecutive_boot_failures;
    assert!(
        after - before <= 4,
        "boot loop: {before} -> {after} failures in 3 s"
    );
    pool.shutdown(Duration::from_secs(10)).await;
    common::assert_no_leftovers(state.path());
}

/// A request waiting on a cold boot whose VM hangs gets a fresh VM: the client
/// sees its result, the stall and the retry are counted with their reason.
#[tokio::test]
async fn a_cold_boot_that_stalls_is_retried_and_the_request_succeeds() {
    let state = tempfile::Builder::new()
        .prefix("nvpool-")
        .tempdir()
        .expect("state");
    let backend = QemuBackend::new(&Default::default()).expect("backend");
    let sandbox = Sandbox::new(
        Arc::new(backend),
        common::images("default"),
        state.path().to_path_buf(),
    )
    .with_boot_stats(BootStats::new(BudgetConfig {
        default: Duration::from_secs(8),
        min_samples: usize::MAX,
        ..BudgetConfig::default()
    }));
    // The first boot never reaches init (waits for a root disk that is not there).
    sandbox.inject_boot_fault(1, &["root=/dev/nv-no-such-disk", "rootwait"]);
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::start(
        sandbox,
        PoolConfig {
            warm: 0,
            max: 2,
            size: VmSize::Small,
            queue_timeout: Duration::from_secs(60),
            ..PoolConfig::default()
        },
        metrics.clone(),
    )
    .expect("pool");
    let mut lease = pool.acquire().await.expect("the retry boots a working VM");
    let mut out = Vec::new();
    let outcome = lease
        .execute(
            &ExecRequest::new("python", "print('retried')"),
            &mut |o: Output<'_>| {
                if let Output::Stdout(b) = o {
                    out.extend_from_slice(b)
                }
            },
        )
        .await
        .expect("execute");
    assert_eq!((outcome.exit_code, out.as_slice()), (Some(0), &b"retried\n"[..]));
    drop(lease);
    let st = pool.status();
    assert_eq!((st.boot.stalls, st.boot.retries), (1, 1), "{st:?}");
    assert!(
        st.boot.recent_retries[0].reason.contains("VM boot stalled"),
        "{st:?}"
    );
    assert_eq!(st.consecutive_boot_failures, 0, "the retry's success resets it");
    let text = metrics.encode();
    for line in [
        "neurovisor_vm_boot_retries_total{reason=\"stall\"} 1",
        "neurovisor_vm_boot_failures_total{reason=\"stall\"} 1",
        "neurovisor_vm_boot_stalls_total 1",
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
    pool.shutdown(Duration::from_secs(10)).await;
    common::assert_no_leftovers(state.path());
}
