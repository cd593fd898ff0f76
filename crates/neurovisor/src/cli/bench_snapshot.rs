//! `neurovisor bench snapshot`: VMs restored from a template's snapshot
//! against cold-booted ones, side by side in one run: time to agent-ready,
//! host CPU per VM (start to teardown, every process of the VM included),
//! and the memory (PSS) an idle VM costs while several of its kind run.

use std::time::{Duration, Instant};

use clap::Args;
use neurovisor::snapshot::{SnapshotSource, Snapshots};
use neurovisor::{ExecRequest, Output, ReadyVm, Sandbox, VmSize};
use serde_json::json;

use super::bench::summarize;
use super::VmArgs;

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Rounds; each round cold-boots one VM and restores one, interleaved.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// VMs of each kind alive at once for the memory measurement.
    #[arg(long, default_value_t = 4)]
    vms: usize,
    #[arg(long, value_enum, default_value_t = VmSize::Small)]
    size: VmSize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CPU seconds of this process and of its reaped descendants (the VM
/// processes roll up into their keepers, the keepers into us).
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let secs = |who| {
        getrusage(who)
            .map(|u| {
                let (a, b) = (u.user_time(), u.system_time());
                a.tv_sec() as f64 + b.tv_sec() as f64 + (a.tv_usec() + b.tv_usec()) as f64 / 1e6
            })
            .unwrap_or(f64::NAN)
    };
    secs(UsageWho::RUSAGE_SELF) + secs(UsageWho::RUSAGE_CHILDREN)
}

/// Proportional set size of one process, in MiB (`/proc/PID/smaps_rollup`).
fn pss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One VM's PSS: all its host processes (QEMU, and vhost-device-vsock on a
/// cold boot).
fn vm_pss_mib(vm: &ReadyVm) -> Result<f64, String> {
    let pids = vm.pids();
    if pids.is_empty() {
        return Err("the VM has no processes".into());
    }
    pids.iter()
        .map(|p| pss_mib(*p).ok_or_else(|| format!("no smaps_rollup for pid {p}")))
        .sum()
}

/// One VM from `sb` until its agent answers, then destroyed: (ready ms, host
/// CPU seconds from start to the last process reaped).
async fn one(sb: &Sandbox, size: VmSize, restored: bool) -> Result<(f64, f64), String> {
    let cpu = cpu_seconds();
    let vm = sb.boot(size).await.map_err(|e| e.to_string())?;
    if vm.restored != restored {
        return Err(format!(
            "expected a {} VM, got a {} one (see the log for why the snapshot was not used)",
            if restored { "restored" } else { "booted" },
            if vm.restored { "restored" } else { "booted" },
        ));
    }
    let ready = ms(vm.boot_time);
    vm.destroy().await;
    Ok((ready, cpu_seconds() - cpu))
}

async fn print1(vm: &mut ReadyVm) -> Result<f64, String> {
    let mut out = Vec::new();
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            out.extend_from_slice(b)
        }
    };
    let t = Instant::now();
    let o = vm
        .execute(&ExecRequest::new("python", "print(1)"), &mut sink)
        .await
        .map_err(|e| e.to_string())?;
    if out != b"1\n" || o.exit_code != Some(0) {
        return Err(format!("print(1) gave {:?}", String::from_utf8_lossy(&out)));
    }
    Ok(ms(t.elapsed()))
}

/// `n` VMs of `sb` alive at once, idle for a moment: PSS per VM (MiB).
async fn idle_pss(sb: &Sandbox, size: VmSize, n: usize, restored: bool) -> Result<Vec<f64>, String> {
    let mut vms = Vec::new();
    let mut result = Ok(());
    for _ in 0..n {
        match sb.boot(size).await {
            Ok(vm) if vm.restored == restored => vms.push(vm),
            Ok(vm) => {
                vm.destroy().await;
                result = Err("a VM of the wrong kind (restored or booted) came back".to_string());
                break;
            }
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
    }
    // Idle: the guest settles (its warm interpreter waits for code).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pss: Result<Vec<f64>, String> = vms.iter().map(vm_pss_mib).collect();
    for vm in vms {
        vm.destroy().await;
    }
    result.and(pss)
}

async fn run(a: SnapshotArgs) -> Result<serde_json::Value, String> {
    let sandbox = a.vm.sandbox()?;
    let warm = sandbox.warm_languages.clone();
    let (backend, images) = sandbox.into_parts();
    let state = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| e.to_string())?;
    let mut cold = Sandbox::new(backend.clone(), images.clone(), state.path().join("cold"));
    cold.warm_languages = warm.clone();
    let mut snap = Sandbox::new(backend, images, state.path().join("snap"));
    snap.warm_languages = warm.clone();
    let snapshots = std::sync::Arc::new(Snapshots::new(SnapshotSource::Managed {
        cache_dir: state.path().join("snapshots"),
    }));
    snap.snapshots = Some(snapshots.clone());

    let t = Instant::now();
    if snapshots.template(&snap, a.size, &warm).await.is_none() {
        let why = snapshots.failure(&snap, a.size, &warm).await.unwrap_or_default();
        return Err(format!("no snapshot template: {why}"));
    }
    let template_ms = ms(t.elapsed());

    let runs = a.runs.max(1);
    let (mut cold_ready, mut cold_cpu, mut snap_ready, mut snap_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut cold_print, mut snap_print) = (vec![], vec![]);
    for round in 0..runs {
        let (r, c) = one(&cold, a.size, false).await?;
        cold_ready.push(r);
        cold_cpu.push(c);
        let (r, c) = one(&snap, a.size, true).await?;
        snap_ready.push(r);
        snap_cpu.push(c);
        // print(1) on a VM that just became ready, warm interpreter both.
        for (sb, into) in [(&cold, &mut cold_print), (&snap, &mut snap_print)] {
            let mut vm = sb.boot(a.size).await.map_err(|e| e.to_string())?;
            let t = print1(&mut vm).await;
            vm.destroy().await;
            into.push(t?);
        }
        if !a.json {
            eprintln!(
                "round {}/{runs}: cold boot {:.0} ms ({:.2} s CPU), restore {:.0} ms ({:.2} s CPU)",
                round + 1,
                cold_ready[round],
                cold_cpu[round],
                snap_ready[round],
                snap_cpu[round]
            );
        }
    }
    let n = a.vms.max(1);
    let cold_pss = idle_pss(&cold, a.size, n, false).await?;
    let snap_pss = idle_pss(&snap, a.size, n, true).await?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (cr, sr) = (summarize(&cold_ready), summarize(&snap_ready));
    let (cc, sc) = (summarize(&cold_cpu), summarize(&snap_cpu));
    let (cp, sp) = (summarize(&cold_print), summarize(&snap_print));
    let (cm, sm) = (mean(&cold_pss), mean(&snap_pss));
    Ok(json!({
        "size": a.size, "runs": runs, "warm_languages": warm, "vms_alive_for_pss": n,
        "template_build_ms": template_ms,
        "cold_ready_ms": cr, "restore_ready_ms": sr,
        "ratio_restore_to_cold_p50": sr.p50 / cr.p50,
        "ratio_restore_to_cold_p95": sr.p95 / cr.p95,
        "cold_cpu_s": cc, "restore_cpu_s": sc,
        "cold_print1_ms": cp, "restore_print1_ms": sp,
        "cold_idle_pss_mib": cm, "restore_idle_pss_mib": sm,
        "ratio_pss_restore_to_cold": sm / cm,
    }))
}

fn row(name: &str, s: &serde_json::Value, scale: f64) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN) * scale;
    format!(
        "{name:<44} {:>9.1} {:>9.1} {:>9.1}",
        f("p50"),
        f("p95"),
        f("mean")
    )
}

pub async fn bench(a: SnapshotArgs) -> Result<(), String> {
    let json_out = a.json;
    let v = run(a).await?;
    if json_out {
        println!("{v}");
        return Ok(());
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "neurovisor bench snapshot: {} rounds, size {}, warm {}, template built in {:.0} ms",
        v["runs"],
        v["size"].as_str().unwrap_or("?"),
        v["warm_languages"],
        f("template_build_ms")
    );
    println!("{:<44} {:>9} {:>9} {:>9}", "", "p50", "p95", "mean");
    println!(
        "{}",
        row("cold boot to agent-ready (ms)", &v["cold_ready_ms"], 1.0)
    );
    println!(
        "{}",
        row("restore to agent-ready (ms)", &v["restore_ready_ms"], 1.0)
    );
    println!(
        "{}",
        row(
            "host CPU per cold VM, boot+teardown (ms)",
            &v["cold_cpu_s"],
            1000.0
        )
    );
    println!(
        "{}",
        row(
            "host CPU per restored VM, restore+teardown (ms)",
            &v["restore_cpu_s"],
            1000.0
        )
    );
    println!(
        "{}",
        row("print(1) on a fresh cold VM (ms)", &v["cold_print1_ms"], 1.0)
    );
    println!(
        "{}",
        row(
            "print(1) on a fresh restored VM (ms)",
            &v["restore_print1_ms"],
            1.0
        )
    );
    println!(
        "restore / cold, agent-ready: p50 {:.3}x, p95 {:.3}x   (target <= 0.1x)",
        f("ratio_restore_to_cold_p50"),
        f("ratio_restore_to_cold_p95")
    );
    println!(
        "host CPU per VM p50: restored {:.3} s, cold {:.3} s   (target <= 0.2 s)",
        v["restore_cpu_s"]["p50"].as_f64().unwrap_or(f64::NAN),
        v["cold_cpu_s"]["p50"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "idle PSS per VM with {} alive: restored {:.1} MiB, cold {:.1} MiB = {:.3}x   (target <= 0.25x)",
        v["vms_alive_for_pss"],
        f("restore_idle_pss_mib"),
        f("cold_idle_pss_mib"),
        f("ratio_pss_restore_to_cold")
    );
    Ok(())
}
