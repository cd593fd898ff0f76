//! Prometheus metrics of real executions: `cargo run --release --example metrics_demo`.
//!
//! Starts a pool of real microVMs (QEMU; TCG where KVM is unusable) with its
//! own metrics registry, runs a program that succeeds, one that exits 3 and
//! one whose output passes its cap, then prints the metric lines those
//! executions moved — in the text format `/metrics` serves to curl and
//! promtool — and checks each against what happened. Exits 1 when a count is
//! off. Needs the guest images (`neurovisor images build`) and root.

use std::sync::Arc;
use std::time::Duration;

mod common;

use neurovisor::metrics::Metrics;
use neurovisor::pool::{Pool, PoolConfig};
use neurovisor::{ExecRequest, Output, VmSize};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit_status("metrics_demo", demo().await)
}

async fn demo() -> Result<bool, String> {
    let (mut sandbox, _state) = common::qemu_sandbox("nv-metrics-demo-")?;
    let metrics = Arc::new(Metrics::new());
    metrics.allow_languages(sandbox.images().languages.iter().map(|l| l.name.as_str()));
    metrics.set_build(sandbox.backend().name(), sandbox.backend().accel());
    sandbox.hooks.counters = metrics.vm_counters();
    let pool = Pool::start(
        sandbox,
        PoolConfig {
            warm: 1,
            max: 2,
            size: VmSize::Small,
            ..PoolConfig::default()
        },
        metrics.clone(),
    )?;
    let mut over_cap = ExecRequest::new("python", "print('x' * 5000)");
    over_cap.max_output_bytes = 1000;
    let runs = [
        ExecRequest::new("python", "print('hello from a microVM')"),
        ExecRequest::new("bash", "echo failing >&2; exit 3"),
        over_cap,
    ];
    for req in &runs {
        let mut lease = pool.acquire().await.map_err(|e| e.to_string())?;
        let mut sink = |_: Output<'_>| {};
        let result = lease.execute(req, &mut sink).await;
        metrics.record_execution(&req.language, &req.trace_id, &result);
        let o = result.map_err(|e| e.to_string())?;
        println!(
            "ran {:<6} exit {:?}, {} stdout bytes{}, VM {} ({}, waited {:?})",
            req.language,
            o.exit_code,
            o.stdout_bytes,
            if o.stdout_truncated { " (truncated)" } else { "" },
            o.vm_id,
            if lease.warm {
                "from the pool"
            } else {
                "booted for it"
            },
            lease.waited
        );
    }
    pool.shutdown(Duration::from_secs(30)).await;

    let text = metrics.encode_prometheus_text();
    println!("\nwhat the executions moved (text format, as /metrics serves it):");
    for l in text.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("neurovisor_executions_total")
                || l.starts_with("neurovisor_output_")
                || l.starts_with("neurovisor_vm_boot_seconds_count")
                || l.starts_with("neurovisor_vm_acquire_seconds_count")
                || l.starts_with("neurovisor_vm_lifetime_seconds_count")
                || l.starts_with("neurovisor_code_execution_duration_seconds_count")
                || l.starts_with("neurovisor_build_info"))
    }) {
        println!("  {l}");
    }
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let mut ok = true;
    for (line, what) in [
        (
            r#"neurovisor_executions_total{language="python",outcome="ok"} 2"#,
            "two Python runs exited 0",
        ),
        (
            r#"neurovisor_executions_total{language="bash",outcome="nonzero_exit"} 1"#,
            "the Bash run exited 3",
        ),
        (
            r#"neurovisor_output_truncations_total{stream="stdout"} 1"#,
            "one stdout reached its cap",
        ),
        ("neurovisor_vm_acquire_seconds_count 3", "three acquisitions"),
    ] {
        let held = text.lines().any(|l| l == line);
        println!("  [{}] {what}: {line}", if held { "ok" } else { "FAIL" });
        ok &= held;
    }
    let lifetimes = text
        .lines()
        .find_map(|l| l.strip_prefix("neurovisor_vm_lifetime_seconds_count "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // Three leased VMs, plus the warm ones the shutdown destroyed.
    let held = lifetimes >= 3;
    println!(
        "  [{}] every destroyed VM's lifetime counted: {lifetimes}",
        if held { "ok" } else { "FAIL" }
    );
    ok &= held;
    println!(
        "  [{}] {families} metric families (30 or more)",
        if families >= 30 { "ok" } else { "FAIL" }
    );
    ok &= families >= 30;
    Ok(ok)
}
