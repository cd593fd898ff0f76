//! Proof that the vsock rate limiter holds: `cargo run --example rate_limit_proof`.
//!
//! Everything here is measured in this run, on real Unix sockets (the same
//! kind the guest's hybrid vsock uses), with the library's own types:
//!
//! 1. bandwidth: 4 MiB pushed as fast as possible into a socket pair whose
//!    reading end is a `RateLimitedStream` (1 MiB/s, 256 KiB bucket). Every
//!    interval of the run must stay inside the token-bucket envelope
//!    `size + rate * t`, and the sustained rate must be close to the configured one;
//! 2. oversized requests: a single 512 KiB write read with one `read_exact`,
//!    and one `acquire` of 512 KiB, against a 64 KiB bucket: both must finish,
//!    in the time the rate implies;
//! 3. ops: a "guest" opens connections to a `HybridVsock` listener as fast as
//!    it can for 2 s; only `100 + 50/s` may be admitted, the rest must be closed.
//!
//! Exits 1 when a limit did not hold or something stalled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use neurovisor::channel::HybridVsock;
use neurovisor::security::rate_limit::{
    RateLimitConfig, RateLimitedStream, RateLimiter, TokenBucketConfig, TokenKind, DEFAULT_OPS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How far above the configured rate a measurement may be (timer granularity,
/// scheduling): well inside the 10-15 % the protection promises.
const OVER: f64 = 1.05;

struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: String) {
        println!("  [{}] {what}", if ok { "ok" } else { "FAIL" });
        if !ok {
            self.failed.push(what);
        }
    }
}

fn bandwidth_only(b: TokenBucketConfig) -> RateLimitConfig {
    RateLimitConfig {
        bandwidth: Some(b),
        ops: None,
    }
}

fn kib(b: f64) -> String {
    format!("{:.1} KiB", b / 1024.0)
}

/// Writes `total` bytes into a socket pair as fast as possible and reads them
/// through the limiter, recording (time, bytes so far) after every read.
async fn pump(limiter: Arc<RateLimiter>, total: usize) -> std::io::Result<Vec<(Duration, u64)>> {
    let (a, mut b) = UnixStream::pair()?;
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            b.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut r = RateLimitedStream::new(a, limiter);
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut trace = vec![(Duration::ZERO, 0u64)];
    let start = Instant::now();
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
        trace.push((start.elapsed(), got));
    }
    writer.await.map_err(std::io::Error::other)??;
    Ok(trace)
}

async fn bandwidth(c: &mut Checks) -> std::io::Result<()> {
    let bucket = TokenBucketConfig {
        size: 256 * 1024,
        one_time_burst: 0,
        refill_time: 250,
    };
    let rate = bucket.rate_per_sec();
    let total = 4usize << 20;
    println!(
        "1. bandwidth: {} through a limiter of {}/s (bucket {})",
        kib(total as f64),
        kib(rate),
        kib(bucket.size as f64)
    );
    let limiter = Arc::new(RateLimiter::new(bandwidth_only(bucket), &Default::default()));
    let trace = tokio::time::timeout(Duration::from_secs(30), pump(limiter.clone(), total))
        .await
        .map_err(|_| std::io::Error::other("stalled: 4 MiB not through after 30 s"))??;
    let (took, got) = trace.last().copied().unwrap_or_default();
    let secs = took.as_secs_f64();
    let sustained = (got as f64 - bucket.size as f64) / secs;
    let expected = (total as f64 - bucket.size as f64) / rate;
    println!(
        "   {} in {secs:.3} s (expected >= {expected:.3} s): {}/s overall, {}/s after the initial bucket, configured {}/s; {} reads, {} waits",
        kib(got as f64),
        kib(got as f64 / secs),
        kib(sustained),
        kib(rate),
        trace.len() - 1,
        limiter.stats().throttled_bytes
    );
    c.check(
        got == total as u64,
        format!("all {} bytes arrived ({got})", total),
    );
    c.check(
        sustained <= rate * OVER,
        format!(
            "sustained rate {}/s <= {:.0} % of the configured {}/s",
            kib(sustained),
            OVER * 100.0,
            kib(rate)
        ),
    );
    c.check(
        sustained >= rate * 0.8,
        format!(
            "no stall: sustained rate {}/s >= 80 % of the configured rate",
            kib(sustained)
        ),
    );
    // The token-bucket envelope: in any interval t, at most size + rate * t.
    let mut worst = 0.0f64;
    let mut worst_at = (0.0, 0.0);
    for (i, &(ti, bi)) in trace.iter().enumerate() {
        for &(tj, bj) in &trace[i + 1..] {
            let dt = (tj - ti).as_secs_f64();
            let allowed = bucket.size as f64 + rate * dt;
            let ratio = (bj - bi) as f64 / allowed;
            if ratio > worst {
                worst = ratio;
                worst_at = (ti.as_secs_f64(), tj.as_secs_f64());
            }
        }
    }
    c.check(
        worst <= OVER,
        format!(
            "every interval stays inside size + rate*t (worst: {:.1} % of the envelope, {:.3}..{:.3} s)",
            worst * 100.0,
            worst_at.0,
            worst_at.1
        ),
    );
    Ok(())
}

async fn oversized(c: &mut Checks) -> std::io::Result<()> {
    let bucket = TokenBucketConfig {
        size: 64 * 1024,
        one_time_burst: 0,
        refill_time: 250,
    };
    let rate = bucket.rate_per_sec();
    let total = 512usize * 1024;
    let expected = (total as f64 - bucket.size as f64) / rate;
    println!(
        "2. oversized requests: {} at once against a {} bucket ({}/s); expected {expected:.3} s",
        kib(total as f64),
        kib(bucket.size as f64),
        kib(rate)
    );

    // One write of 512 KiB, read with one read_exact of 512 KiB.
    let limiter = Arc::new(RateLimiter::new(bandwidth_only(bucket), &Default::default()));
    let (a, mut b) = UnixStream::pair()?;
    let writer = tokio::spawn(async move { b.write_all(&vec![1u8; total]).await });
    let mut r = RateLimitedStream::new(a, limiter);
    let mut buf = vec![0u8; total];
    let start = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut buf)).await;
    let took = start.elapsed().as_secs_f64();
    writer.await.map_err(std::io::Error::other)??;
    let done = matches!(read, Ok(Ok(_)));
    println!(
        "   stream: one read_exact of {} took {took:.3} s",
        kib(total as f64)
    );
    c.check(done, "the oversized read completed (no stall)".into());
    c.check(
        took >= expected / OVER && took <= expected * 1.5,
        format!("it took {took:.3} s, i.e. the configured rate (expected {expected:.3} s)"),
    );

    // acquire(): the request goes into debt and waits it out.
    let limiter = RateLimiter::new(bandwidth_only(bucket), &Default::default());
    let start = Instant::now();
    let acquired = tokio::time::timeout(
        Duration::from_secs(20),
        limiter.acquire(TokenKind::Bytes, total as u64),
    )
    .await;
    let took = start.elapsed().as_secs_f64();
    println!("   acquire({}) took {took:.3} s", kib(total as f64));
    c.check(
        acquired.is_ok(),
        "the oversized acquire completed (no stall)".into(),
    );
    c.check(
        took >= expected / OVER && took <= expected * 1.5,
        format!("it took {took:.3} s, i.e. the configured rate (expected {expected:.3} s)"),
    );
    Ok(())
}

async fn ops(c: &mut Checks) -> std::io::Result<()> {
    let run_for = Duration::from_secs(2);
    println!(
        "3. ops: guest connections for {:?} against the default ops bucket ({} at once, {}/s)",
        run_for,
        DEFAULT_OPS.size,
        DEFAULT_OPS.rate_per_sec()
    );
    let dir = tempfile::tempdir()?;
    // The daemon's own registry: its VMs' limiters count into the handle it hands out, and
    // /metrics must show what they held back.
    let metrics = neurovisor::metrics::Metrics::new();
    let hv = HybridVsock::new(
        dir.path().join("vsock.sock"),
        RateLimitConfig {
            bandwidth: None,
            ops: Some(DEFAULT_OPS),
        },
        &metrics.vm_counters(),
    );
    let listener = hv.listen(6001).map_err(std::io::Error::other)?;
    let path = hv.host_port_path(6001);
    // The host side: answer every admitted connection with "ok".
    let host = {
        let hv = hv.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut s) = hv.accept(&listener).await else {
                    break;
                };
                let _ = s.write_all(b"ok").await;
            }
        })
    };
    // The guest side: connect as fast as possible.
    let start = Instant::now();
    let (mut admitted, mut refused) = (0u64, 0u64);
    while start.elapsed() < run_for {
        let mut s = UnixStream::connect(&path).await?;
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply).await;
        if reply == b"ok" {
            admitted += 1;
        } else {
            refused += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    host.abort();
    let allowed = DEFAULT_OPS.size as f64 + DEFAULT_OPS.rate_per_sec() * secs;
    let stats = hv.limiter().stats();
    println!(
        "   {} connections in {secs:.3} s: {admitted} admitted, {refused} closed (limiter: {} ops, {} rejected); allowed {allowed:.0}",
        admitted + refused,
        stats.ops,
        stats.rejected_connections
    );
    c.check(
        admitted as f64 <= allowed + 1.0,
        format!("admitted {admitted} <= {allowed:.0} (100 + 50/s)"),
    );
    c.check(
        admitted as f64 >= allowed * 0.9,
        format!("admitted {admitted} >= 90 % of the allowance: the limiter does not over-reject"),
    );
    c.check(
        refused > 0 && stats.rejected_connections == refused,
        format!(
            "every excess connection was closed and counted ({refused} / {})",
            stats.rejected_connections
        ),
    );
    let text = metrics.encode();
    let line = text
        .lines()
        .find(|l| l.starts_with("neurovisor_vsock_rejected_connections_total"))
        .unwrap_or("")
        .to_string();
    let exported: Option<u64> = line.split_whitespace().last().and_then(|v| v.parse().ok());
    println!("   /metrics: {line}");
    c.check(
        exported == Some(refused),
        "the rejections show up in neurovisor_vsock_rejected_connections_total".into(),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut c = Checks { failed: Vec::new() };
    for (name, r) in [
        ("bandwidth", bandwidth(&mut c).await),
        ("oversized", oversized(&mut c).await),
        ("ops", ops(&mut c).await),
    ] {
        if let Err(e) = r {
            c.check(false, format!("{name}: {e}"));
        }
    }
    if c.failed.is_empty() {
        println!("rate limiting held: all checks passed");
        std::process::ExitCode::SUCCESS
    } else {
        println!("rate limiting did NOT hold: {} check(s) failed", c.failed.len());
        std::process::ExitCode::FAILURE
    }
}
