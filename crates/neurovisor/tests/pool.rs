//! Pool behaviour that needs no daemon: back-off after repeated boot failures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use neurovisor::metrics::Metrics;
use neurovisor::pool::{Pool, PoolConfig, PoolError};
use neurovisor::vmm::QemuBackend;
use neurovisor::{Sandbox, VmSize};

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
