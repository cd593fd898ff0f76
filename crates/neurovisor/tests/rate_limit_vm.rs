//! The vsock rate limiter against a real guest: a VM whose output is limited
//! to 64 KiB/s must take as long as that rate implies to stream 512 KiB (the
//! guest is held back through HTTP/2 flow control, nothing is lost), and with
//! the default limits the same program must run fast.

mod common;

use std::time::Duration;

use neurovisor::security::rate_limit::RateLimitConfig;
use neurovisor::ExecRequest;

/// The tests share two CPUs with TCG guests: one VM at a time keeps the
/// timings about the limiter, not about CPU contention.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const OUTPUT: usize = 512 * 1024;
const LOW_RATE: u64 = 64 * 1024;

/// Prints `OUTPUT` bytes: 512 lines of 1 KiB.
fn printer() -> ExecRequest {
    let mut req = ExecRequest::new(
        "python",
        "import sys\nline = 'y' * 1023 + '\\n'\nfor _ in range(512):\n    sys.stdout.write(line)\nsys.stdout.flush()",
    );
    req.timeout = Duration::from_secs(60);
    req
}

/// Seconds the limiter needs for `bytes`, after the initial bucket.
fn expected_secs(limits: &RateLimitConfig, bytes: usize) -> f64 {
    let b = limits.bandwidth.expect("a bandwidth limit");
    (bytes as f64 - b.size as f64 - b.one_time_burst as f64) / b.rate_per_sec()
}

#[tokio::test]
async fn low_bandwidth_limit_paces_guest_output() {
    let _one = SERIAL.lock().await;
    let mut env = common::env();
    let limits = RateLimitConfig::default().with_rates(Some(LOW_RATE), None);
    env.sandbox.rate_limit = limits;
    // The counters the daemon's /metrics would show, handed to the VMs.
    let counters = neurovisor::metrics::VmCounters::default();
    env.sandbox.hooks.counters = counters.clone();
    let throttled_before = counters.throttled("bytes").get();

    let r = env.run_req(&printer()).await;
    let expected = expected_secs(&limits, OUTPUT);
    let took = r.outcome.execute_ms / 1000.0;
    println!(
        "64 KiB/s: {} bytes in {took:.2} s (execute), expected >= {expected:.2} s; {:.1} KiB/s achieved",
        r.stdout.len(),
        r.stdout.len() as f64 / 1024.0 / took
    );
    assert_eq!(r.outcome.exit_code, Some(0), "{:?} {}", r.outcome, r.err());
    assert_eq!(r.stdout.len(), OUTPUT, "the output must arrive complete");
    assert!(r.stdout.iter().all(|&b| b == b'y' || b == b'\n'));
    assert!(!r.outcome.stdout_truncated);
    assert!(
        took >= 0.8 * expected,
        "{OUTPUT} bytes at {LOW_RATE} B/s took only {took:.2} s (expected {expected:.2} s)"
    );
    assert!(took < 3.0 * expected + 10.0, "stalled: {took:.2} s");
    assert!(
        counters.throttled("bytes").get() > throttled_before,
        "the limiter never held a read back"
    );

    // The guest's own output cap still applies under the limit: truncated at
    // 128 KiB, flagged, and only that much has to pass the limiter.
    let mut req = printer();
    req.max_output_bytes = 128 * 1024;
    let r = env.run_req(&req).await;
    let took = r.outcome.execute_ms / 1000.0;
    let expected = expected_secs(&limits, 128 * 1024);
    println!(
        "64 KiB/s, 128 KiB cap: {} bytes in {took:.2} s, expected >= {expected:.2} s",
        r.stdout.len()
    );
    assert_eq!(r.stdout.len(), 128 * 1024);
    assert!(r.outcome.stdout_truncated, "{:?}", r.outcome);
    assert!(
        took >= 0.8 * expected,
        "took only {took:.2} s (expected {expected:.2} s)"
    );
    env.assert_clean();
}

#[tokio::test]
async fn default_limits_let_ordinary_output_through_fast() {
    let _one = SERIAL.lock().await;
    let env = common::env();
    assert_eq!(env.sandbox.rate_limit, RateLimitConfig::default());
    let r = env.run_req(&printer()).await;
    let took = r.outcome.execute_ms / 1000.0;
    let limited = expected_secs(
        &RateLimitConfig::default().with_rates(Some(LOW_RATE), None),
        OUTPUT,
    );
    println!(
        "default limits: {} bytes in {took:.2} s (64 KiB/s would need {limited:.2} s)",
        r.stdout.len()
    );
    assert_eq!(r.outcome.exit_code, Some(0), "{:?} {}", r.outcome, r.err());
    assert_eq!(r.stdout.len(), OUTPUT);
    assert!(
        took < limited / 2.0,
        "512 KiB took {took:.2} s with the default limits (16 MiB/s)"
    );
    env.assert_clean();
}

/// The daemon hands its registry's counters down to every VM: a throttled
/// guest shows on its `/metrics` (no process-wide counters in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_metrics_count_what_its_vms_limiters_hold_back() {
    let _one = SERIAL.lock().await;
    let d = common::daemon::start_daemon(&["--warm", "1", "--max", "1", "--vsock-bandwidth", "65536"]);
    d.wait_warm(1);
    let throttled = || {
        let (_, m) = common::daemon::http_get(&d.metrics, "/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix("neurovisor_vsock_throttled_total{kind=\"bytes\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(throttled(), 0, "nothing was held back before any output");
    let mut c = d.client().await;
    let r = c
        .execute_once(common::daemon::req(
            "python",
            "import sys\nsys.stdout.write(('y' * 1023 + '\\n') * 256)\nsys.stdout.flush()",
        ))
        .await
        .expect("execute")
        .into_inner();
    assert_eq!(r.stdout.len(), 256 * 1024, "the output must arrive complete");
    let n = throttled();
    println!("daemon at 64 KiB/s: 256 KiB through, {n} throttled reads on /metrics");
    assert!(n > 0, "the VM's limiter held reads back, but /metrics shows none");
    assert_eq!(d.stop(), Some(0));
}
