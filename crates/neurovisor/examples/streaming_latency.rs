//! Output streaming latency, end to end: `cargo run --release --example streaming_latency`.
//!
//! Boots a real microVM and runs a program that prints one line every 50 ms
//! (flushing each). On the host, every chunk is timestamped as it arrives
//! through the whole path (guest pipe → agent → vsock → HTTP/2 → host meter →
//! sink): the time to the first chunk after the request, and the gaps between
//! chunks, whose ideal is the program's 50 ms. Prints the distribution and
//! exits 1 if output was batched instead of streamed (the median gap over
//! twice the interval, or most lines arriving together).

mod common;

use std::time::Instant;

use neurovisor::{ExecRequest, Output, VmSize};

const LINES: usize = 40;
const INTERVAL_MS: u64 = 50;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit_status("streaming_latency", measure().await)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn measure() -> Result<bool, String> {
    let (sandbox, _state) = common::qemu_sandbox("nv-streaming-")?;
    let boot = Instant::now();
    let mut vm = sandbox.boot(VmSize::Small).await.map_err(|e| e.to_string())?;
    println!(
        "VM {} ready in {:.0} ms",
        vm.id(),
        boot.elapsed().as_secs_f64() * 1e3
    );
    let code = format!(
        "import sys, time\nfor i in range({LINES}):\n    print(f'line {{i}}', flush=True)\n    time.sleep({})\n",
        INTERVAL_MS as f64 / 1000.0
    );
    let req = ExecRequest::new("python", code);
    let mut arrivals: Vec<(Instant, usize)> = Vec::new();
    let sent = Instant::now();
    let result = {
        let mut sink = |o: Output<'_>| {
            if let Output::Stdout(b) = o {
                arrivals.push((Instant::now(), b.iter().filter(|c| **c == b'\n').count()));
            }
        };
        vm.execute(&req, &mut sink).await
    };
    vm.destroy().await;
    let o = result.map_err(|e| e.to_string())?;
    let Some(first) = arrivals.first() else {
        return Err("no output arrived".into());
    };
    let ttfb = (first.0 - sent).as_secs_f64() * 1e3;
    // Python writes a line's text and its newline separately: the gaps that
    // matter are between the chunks that end lines.
    let line_ends: Vec<(Instant, usize)> = arrivals.iter().copied().filter(|a| a.1 > 0).collect();
    let mut gaps: Vec<f64> = line_ends
        .windows(2)
        .map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1e3)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let lines: usize = arrivals.iter().map(|a| a.1).sum();
    println!(
        "program: {LINES} lines, one every {INTERVAL_MS} ms; ran {:.0} ms in the guest, exit {:?}",
        o.duration_ms, o.exit_code
    );
    println!(
        "time to first chunk: {ttfb:.1} ms after the request (interpreter start included; warm: {})",
        o.warm_interpreter
    );
    println!(
        "{} chunks carrying {lines} lines; gaps between line ends: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (ideal {INTERVAL_MS} ms)",
        arrivals.len(),
        pct(&gaps, 0.5),
        pct(&gaps, 0.95),
        pct(&gaps, 1.0)
    );
    let mut ok = true;
    let separate = line_ends.len() >= LINES * 3 / 4;
    println!(
        "  [{}] lines arrive as they are printed ({} of {LINES} ended in a chunk of their own)",
        if separate { "ok" } else { "FAIL" },
        line_ends.len()
    );
    ok &= separate;
    let median = pct(&gaps, 0.5);
    let streamed = median < (INTERVAL_MS * 2) as f64;
    println!(
        "  [{}] the median gap is under {} ms (output is streamed, not batched)",
        if streamed { "ok" } else { "FAIL" },
        INTERVAL_MS * 2
    );
    ok &= streamed && lines == LINES && o.exit_code == Some(0);
    Ok(ok)
}
