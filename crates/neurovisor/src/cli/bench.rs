//! `neurovisor bench`: latency benchmarks, measured side by side in one run and
//! printed as ratios (never asserted: timings belong in reports, not tests).

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use neurovisor::{ExecRequest, Output, Sandbox, VmSize};
use serde_json::json;

use super::{VmArgs, EXIT_SANDBOX_ERROR};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Cold boot until the agent answers Health, and `print(1)` end to end,
    /// against a baseline VM of the same kernel whose init only powers off.
    Boot(BootArgs),
    /// Pool: warm acquisition latency, `print(1)` warm vs cold (side by side),
    /// and throughput of N requests at concurrency C.
    Pool(PoolArgs),
    /// Snapshots: restore vs cold boot to agent-ready, host CPU per VM, idle
    /// PSS per VM (side by side).
    Snapshot(super::bench_snapshot::SnapshotArgs),
}

#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Samples for the acquisition and warm/cold measurements.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value_t = 2)]
    warm: usize,
    #[arg(long, default_value_t = 4)]
    max: usize,
    /// Requests in the throughput run.
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Concurrent clients in the throughput run.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, value_enum, default_value_t = VmSize::Small)]
    size: VmSize,
    /// Instead: two `neurovisor serve` daemons side by side, one booting its
    /// VMs and one restoring them (`--snapshot`), driven over gRPC: print(1)
    /// from the warm pool (--runs) and short Python programs (--requests)
    /// from --concurrency clients.
    #[arg(long)]
    daemon: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Rounds; each round boots one VM of every kind, interleaved.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, value_enum, default_value_t = VmSize::Small)]
    size: VmSize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

/// p50 / p95 / mean of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub p50: f64,
    pub p95: f64,
    pub mean: f64,
    pub n: usize,
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let pick = |q: f64| -> f64 {
        if s.is_empty() {
            return f64::NAN;
        }
        let idx = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
        s[idx]
    };
    Summary {
        p50: pick(0.5),
        p95: pick(0.95),
        mean: if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        },
        n: s.len(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn baseline_once(sandbox: &Sandbox, size: VmSize) -> Result<f64, String> {
    let cfg = sandbox.vm_config(size, vec!["nv.mode=poweroff".into()]);
    let started = Instant::now();
    let mut vm = sandbox.backend().spawn(&cfg).await.map_err(|e| e.to_string())?;
    let exited = vm.wait_exited(Duration::from_secs(60)).await;
    let t = ms(started.elapsed());
    vm.kill().await;
    exited
        .map(|_| t)
        .ok_or_else(|| "baseline VM did not power off within 60 s".into())
}

async fn boot_once(sandbox: &Sandbox, size: VmSize) -> Result<f64, String> {
    let vm = sandbox.boot(size).await.map_err(|e| e.to_string())?;
    let t = ms(vm.boot_time);
    vm.destroy().await;
    Ok(t)
}

/// Returns (end to end, host-side overhead = execute call minus guest-reported duration).
async fn print_once(sandbox: &Sandbox, size: VmSize) -> Result<(f64, f64), String> {
    let req = ExecRequest::new("python", "print(1)");
    let mut out = Vec::new();
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            out.extend_from_slice(b)
        }
    };
    let o = sandbox
        .run(&req, size, &mut sink)
        .await
        .map_err(|e| e.to_string())?;
    if out != b"1\n" || o.exit_code != Some(0) {
        return Err(format!(
            "print(1) gave {:?}, exit {:?}",
            String::from_utf8_lossy(&out),
            o.exit_code
        ));
    }
    Ok((o.total_ms, o.execute_ms - o.duration_ms))
}

async fn boot(a: BootArgs) -> Result<serde_json::Value, String> {
    let sandbox = a.vm.sandbox()?;
    let (mut base, mut ready, mut e2e, mut overhead) = (vec![], vec![], vec![], vec![]);
    for round in 0..a.runs.max(1) {
        base.push(baseline_once(&sandbox, a.size).await?);
        ready.push(boot_once(&sandbox, a.size).await?);
        let (t, o) = print_once(&sandbox, a.size).await?;
        e2e.push(t);
        overhead.push(o);
        if !a.json {
            eprintln!(
                "round {}/{}: baseline {:.0} ms, agent ready {:.0} ms, print(1) {:.0} ms",
                round + 1,
                a.runs.max(1),
                base[round],
                ready[round],
                e2e[round]
            );
        }
    }
    let (b, r, e, o) = (
        summarize(&base),
        summarize(&ready),
        summarize(&e2e),
        summarize(&overhead),
    );
    Ok(json!({
        "size": a.size,
        "runs": a.runs.max(1),
        "baseline_poweroff_ms": b,
        "agent_ready_ms": r,
        "print1_end_to_end_ms": e,
        "host_overhead_ms": o,
        "ratio_agent_ready_to_baseline_p50": r.p50 / b.p50,
    }))
}

async fn wait_warm(pool: &neurovisor::pool::Pool, n: usize) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(180);
    while pool.status().warm < n {
        if let Some(why) = pool.status().degraded {
            return Err(format!("pool degraded: {why}"));
        }
        if Instant::now() > until {
            return Err("pool did not fill within 180 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn print1_on(lease: &mut neurovisor::pool::Lease) -> Result<(), String> {
    let mut sink = |_: Output<'_>| {};
    let o = lease
        .execute(&ExecRequest::new("python", "print(1)"), &mut sink)
        .await
        .map_err(|e| e.to_string())?;
    if o.exit_code != Some(0) {
        return Err(format!("print(1) exited {:?}", o.exit_code));
    }
    Ok(())
}

async fn pool_bench(a: PoolArgs) -> Result<serde_json::Value, String> {
    use neurovisor::pool::{Pool, PoolConfig};
    let sandbox = a.vm.sandbox()?;
    let sandbox_warm = sandbox.warm_languages.clone();
    let (backend, images) = sandbox.into_parts();
    let state = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| e.to_string())?;
    let cold = Sandbox::new(backend.clone(), images.clone(), state.path().join("cold"));
    let cfg = PoolConfig {
        warm: a.warm.max(1),
        max: a.max.max(a.warm.max(1) + 1),
        size: a.size,
        queue_timeout: Duration::from_secs(300),
        ..PoolConfig::default()
    };
    // The same pool whose VMs start no interpreter ahead: side by side.
    let mut plain_sandbox = Sandbox::new(backend.clone(), images.clone(), state.path().join("plain"));
    plain_sandbox.warm_languages.clear();
    let plain = Pool::start(
        plain_sandbox,
        cfg.clone(),
        std::sync::Arc::new(neurovisor::metrics::Metrics::new()),
    )?;
    let mut warm_sandbox = Sandbox::new(backend, images, state.path().join("pool"));
    let cfg_warm_languages = sandbox_warm.join(",");
    warm_sandbox.warm_languages = sandbox_warm;
    let pool = Pool::start(
        warm_sandbox,
        cfg.clone(),
        std::sync::Arc::new(neurovisor::metrics::Metrics::new()),
    )?;
    let runs = a.runs.max(1);
    let (mut acquire, mut warm_e2e, mut cold_e2e) = (vec![], vec![], vec![]);
    let mut plain_e2e = vec![];
    let (mut health, mut host_side) = (vec![], vec![]);
    for _ in 0..runs {
        wait_warm(&pool, cfg.warm).await?;
        // Warm: acquisition (host-side, Health check included), then print(1).
        let t0 = Instant::now();
        let mut lease = pool.acquire().await.map_err(|e| e.to_string())?;
        let total = t0.elapsed();
        acquire.push(ms(total));
        health.push(ms(lease.health_check));
        host_side.push(ms(total.saturating_sub(lease.health_check)));
        print1_on(&mut lease).await?;
        warm_e2e.push(ms(t0.elapsed()));
        drop(lease);
        // A warm VM whose Python starts with the request.
        wait_warm(&plain, cfg.warm).await?;
        let t2 = Instant::now();
        let mut lease = plain.acquire().await.map_err(|e| e.to_string())?;
        print1_on(&mut lease).await?;
        plain_e2e.push(ms(t2.elapsed()));
        drop(lease);
        // Cold, right after: boot + print(1), same size and image.
        let mut sink = |_: Output<'_>| {};
        let t1 = Instant::now();
        cold.run(&ExecRequest::new("python", "print(1)"), a.size, &mut sink)
            .await
            .map_err(|e| e.to_string())?;
        cold_e2e.push(ms(t1.elapsed()));
    }
    plain.shutdown(Duration::from_secs(30)).await;
    wait_warm(&pool, cfg.warm).await?;
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..a.concurrency.max(1))
        .map(|_| {
            let (pool, next, total) = (pool.clone(), next.clone(), a.requests);
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let mut lease = pool.acquire().await.map_err(|e| e.to_string())?;
                    print1_on(&mut lease).await?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    pool.shutdown(Duration::from_secs(30)).await;
    let (acq, w, c) = (summarize(&acquire), summarize(&warm_e2e), summarize(&cold_e2e));
    let fresh = summarize(&plain_e2e);
    let (hc, host) = (summarize(&health), summarize(&host_side));
    Ok(json!({
        "size": a.size, "runs": runs, "warm": cfg.warm, "max": cfg.max,
        "acquire_warm_ms": acq,
        "acquire_health_check_ms": hc,
        "acquire_host_side_ms": host,
        "print1_warm_ms": w,
        "print1_cold_ms": c,
        "print1_warm_fresh_interpreter_ms": fresh,
        "warm_languages": cfg_warm_languages,
        "ratio_fresh_to_warm_interpreter_p50": fresh.p50 / w.p50,
        "ratio_cold_to_warm_p50": c.p50 / w.p50,
        "throughput": { "requests": a.requests, "concurrency": a.concurrency.max(1), "seconds": elapsed,
                        "per_second": a.requests as f64 / elapsed },
    }))
}

fn row(name: &str, s: &serde_json::Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{name:<36} {:>9.1} {:>9.1} {:>9.1}",
        f("p50"),
        f("p95"),
        f("mean")
    )
}

pub async fn bench(cmd: BenchCommand) -> u8 {
    match cmd {
        BenchCommand::Snapshot(a) => match super::bench_snapshot::bench(a).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("neurovisor: bench failed: {e}");
                EXIT_SANDBOX_ERROR
            }
        },
        BenchCommand::Pool(a) if a.daemon => {
            let b = super::bench_daemon::DaemonBench {
                runs: a.runs,
                warm: a.warm.max(1),
                max: a.max.max(a.warm.max(1) + 1),
                size: a.size,
                programs: a.requests,
                concurrency: a.concurrency,
            };
            match super::bench_daemon::run(&b).await {
                Ok(v) if a.json => {
                    println!("{v}");
                    0
                }
                Ok(v) => {
                    super::bench_daemon::print(&v);
                    0
                }
                Err(e) => {
                    eprintln!("neurovisor: bench failed: {e}");
                    EXIT_SANDBOX_ERROR
                }
            }
        }
        BenchCommand::Pool(a) => {
            let json_out = a.json;
            match pool_bench(a).await {
                Ok(v) if json_out => {
                    println!("{v}");
                    0
                }
                Ok(v) => {
                    println!(
                        "neurovisor bench pool: {} rounds, size {}, warm {}, max {}",
                        v["runs"],
                        v["size"].as_str().unwrap_or("?"),
                        v["warm"],
                        v["max"]
                    );
                    println!("{:<36} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "mean ms");
                    println!("{}", row("acquire from warm pool, total", &v["acquire_warm_ms"]));
                    println!(
                        "{}",
                        row(
                            "  of which agent Health round trip",
                            &v["acquire_health_check_ms"]
                        )
                    );
                    println!("{}", row("  of which host-side", &v["acquire_host_side_ms"]));
                    println!("{}", row("print(1) end to end, warm VM", &v["print1_warm_ms"]));
                    println!(
                        "{}",
                        row(
                            "  same, Python started with the call",
                            &v["print1_warm_fresh_interpreter_ms"]
                        )
                    );
                    println!("{}", row("print(1) end to end, cold boot", &v["print1_cold_ms"]));
                    println!(
                        "warm interpreters ({}): fresh / warm interpreter (p50): {:.1}x",
                        v["warm_languages"].as_str().unwrap_or(""),
                        v["ratio_fresh_to_warm_interpreter_p50"]
                            .as_f64()
                            .unwrap_or(f64::NAN)
                    );
                    println!(
                        "cold / warm (p50): {:.1}x   host-side acquisition p50: {:.3} ms (target < 2 ms; total with the Health check {:.2} ms)",
                        v["ratio_cold_to_warm_p50"].as_f64().unwrap_or(f64::NAN),
                        v["acquire_host_side_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
                        v["acquire_warm_ms"]["p50"].as_f64().unwrap_or(f64::NAN)
                    );
                    let t = &v["throughput"];
                    println!(
                        "throughput: {} requests at concurrency {} in {:.1} s = {:.2} req/s",
                        t["requests"],
                        t["concurrency"],
                        t["seconds"].as_f64().unwrap_or(f64::NAN),
                        t["per_second"].as_f64().unwrap_or(f64::NAN)
                    );
                    0
                }
                Err(e) => {
                    eprintln!("neurovisor: bench failed: {e}");
                    EXIT_SANDBOX_ERROR
                }
            }
        }
        BenchCommand::Boot(a) => {
            let json_out = a.json;
            let size = a.size;
            let accel = neurovisor::vmm::accel::choose(
                a.vm.qemu_options().accel,
                &neurovisor::vmm::accel::KvmProbe::host(),
            );
            match boot(a).await {
                Ok(v) if json_out => {
                    println!("{v}");
                    0
                }
                Ok(v) => {
                    println!(
                        "neurovisor bench boot: {} rounds, size {size}, {:?} ({})",
                        v["runs"], accel.accel, accel.reason
                    );
                    println!("{:<36} {:>9} {:>9} {:>9}", "", "p50 ms", "p95 ms", "mean ms");
                    println!(
                        "{}",
                        row("baseline VM (init powers off)", &v["baseline_poweroff_ms"])
                    );
                    println!("{}", row("agent ready (answers Health)", &v["agent_ready_ms"]));
                    println!(
                        "{}",
                        row("print(1) end to end (cold VM)", &v["print1_end_to_end_ms"])
                    );
                    println!("{}", row("host overhead per execution", &v["host_overhead_ms"]));
                    println!(
                        "agent ready / baseline (p50): {:.2}x   (target <= 1.2x)",
                        v["ratio_agent_ready_to_baseline_p50"]
                            .as_f64()
                            .unwrap_or(f64::NAN)
                    );
                    println!(
                        "host overhead p50: {:.2} ms   (target < 5 ms; execute call minus the guest-reported run time)",
                        v["host_overhead_ms"]["p50"].as_f64().unwrap_or(f64::NAN)
                    );
                    0
                }
                Err(e) => {
                    eprintln!("neurovisor: bench failed: {e}");
                    EXIT_SANDBOX_ERROR
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.p50, s.p95, s.mean, s.n), (3.0, 5.0, 3.0, 5));
        assert!(summarize(&[]).p50.is_nan());
    }
}
