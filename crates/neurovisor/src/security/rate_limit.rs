//! Token-bucket rate limiting of everything a guest sends to the host over vsock.
//!
//! A guest controls how fast it writes to its vsock connections and how often it
//! connects to host ports; without a limit a hostile guest can make the host
//! spend CPU on HTTP/2 decoding and forwarding, or on accepting connections, as
//! fast as it likes. Each VM gets one [`RateLimiter`] (shared by all its
//! streams, see [`crate::channel::HybridVsock`]) with two buckets, as in
//! Firecracker's `RateLimiter`:
//!
//! - **bandwidth** (bytes): [`RateLimitedStream`] wraps every stream from the
//!   guest and delays *reads* while the bucket is empty. Nothing is buffered on
//!   the host: the unread bytes stay in the socket, so the guest's writes block
//!   and HTTP/2 flow control pushes back on the guest agent.
//! - **ops** (operations): every connection the guest opens to a host port
//!   costs one token; with the bucket empty the connection is closed at once and
//!   counted ([`RateLimiter::admit_connection`]).
//!
//! Bucket semantics follow Firecracker's `TokenBucket` (`firecracker-api.yaml`):
//! `size` tokens, refilled from empty in `refill_time` ms at a constant rate,
//! plus `one_time_burst` tokens that are available once, before the bucket
//! itself. A bucket with `size == 0` or `refill_time == 0` does not limit.
//! A request larger than `size` still makes progress: a stream reads it in
//! pieces of at most the available budget, and [`RateLimiter::acquire`] lets an
//! oversized request drive the bucket into debt and waits until the debt is
//! repaid, so the long-run rate holds either way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const NANOS_PER_MILLI: u128 = 1_000_000;

/// One token bucket as configured (Firecracker's `TokenBucket` schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start, before the bucket itself.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// A bucket with a sustained rate of `per_second` tokens and a capacity of
    /// what that rate refills in `window`; `None` (no limit) for a rate of 0.
    pub fn per_second(per_second: u64, window: Duration) -> Option<Self> {
        if per_second == 0 {
            return None;
        }
        let window_ms = window.as_millis().max(1);
        let size = u128::from(per_second) * window_ms / 1000;
        // Very low rates: one token, refilled in 1/rate seconds.
        let (size, refill_time) = if size == 0 {
            (1, 1000 / u128::from(per_second))
        } else {
            (size, window_ms)
        };
        Some(Self {
            size: u64::try_from(size).unwrap_or(u64::MAX),
            one_time_burst: 0,
            refill_time: u64::try_from(refill_time.max(1)).unwrap_or(u64::MAX),
        })
    }

    /// Whether this bucket limits anything (Firecracker: size and refill_time non-zero).
    pub fn is_limiting(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }

    /// The sustained rate in tokens per second (infinite when not limiting).
    pub fn rate_per_sec(&self) -> f64 {
        if self.is_limiting() {
            self.size as f64 * 1000.0 / self.refill_time as f64
        } else {
            f64::INFINITY
        }
    }
}

/// Default operations bucket: 100 connections at once, 50 per second sustained
/// (the product seed's "capacity 100, rate 50/s").
pub const DEFAULT_OPS: TokenBucketConfig = TokenBucketConfig {
    size: 100,
    one_time_burst: 0,
    refill_time: 2000,
};

/// Default bandwidth bucket: 4 MiB burst, refilled in 250 ms, i.e. 16 MiB/s
/// sustained. An execution's output is capped at 1 MiB per stream by default
/// (`exec::DEFAULT_MAX_OUTPUT`), so ordinary executions never wait; 16 MiB/s is
/// above what a TCG guest pushes through `vhost-device-vsock`, yet bounds the
/// host CPU a hostile guest can burn on HTTP/2 and protobuf decoding to a small
/// share of one core per VM.
pub const DEFAULT_BANDWIDTH: TokenBucketConfig = TokenBucketConfig {
    size: 4 << 20,
    one_time_burst: 0,
    refill_time: 250,
};

/// Burst window used when a bandwidth limit is given as a plain rate (CLI):
/// the same shape as [`DEFAULT_BANDWIDTH`].
pub const BANDWIDTH_WINDOW: Duration = Duration::from_millis(250);
/// Burst window used when an ops limit is given as a plain rate (CLI): the same
/// shape as [`DEFAULT_OPS`].
pub const OPS_WINDOW: Duration = Duration::from_millis(2000);

/// Limits for everything one VM's guest sends over vsock. `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes read from guest streams.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Connections the guest opens to host ports.
    pub ops: Option<TokenBucketConfig>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            bandwidth: Some(DEFAULT_BANDWIDTH),
            ops: Some(DEFAULT_OPS),
        }
    }
}

impl RateLimitConfig {
    /// No limits at all.
    pub const UNLIMITED: Self = Self {
        bandwidth: None,
        ops: None,
    };

    /// Overrides the buckets given as plain per-second rates (the CLI's
    /// `--vsock-bandwidth` / `--vsock-ops`): `None` keeps the current bucket,
    /// `Some(0)` removes the limit.
    pub fn with_rates(mut self, bytes_per_sec: Option<u64>, ops_per_sec: Option<u64>) -> Self {
        if let Some(rate) = bytes_per_sec {
            self.bandwidth = TokenBucketConfig::per_second(rate, BANDWIDTH_WINDOW);
        }
        if let Some(rate) = ops_per_sec {
            self.ops = TokenBucketConfig::per_second(rate, OPS_WINDOW);
        }
        self
    }
}

/// Result of [`TokenBucket::reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were taken.
    Success,
    /// Not enough tokens; nothing was taken. Retry after the given time.
    Wait(Duration),
    /// The request was larger than the bucket: everything available was taken
    /// and the rest is owed. The caller must wait the given time (until the
    /// debt is repaid) before going on.
    Debt(Duration),
}

/// The state of one token bucket. Time is passed in, so the arithmetic can be
/// tested without clocks; tokio's [`Instant`] follows paused test time.
#[derive(Debug)]
pub struct TokenBucket {
    size: u64,
    refill_time_ns: u128,
    /// What is left of the one-time burst.
    burst: u64,
    /// Tokens in the bucket; negative while an oversized request is being repaid.
    budget: i128,
    /// Time up to which refills have been credited.
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket; `None` when `cfg` does not limit.
    pub fn new(cfg: TokenBucketConfig, now: Instant) -> Option<Self> {
        cfg.is_limiting().then(|| Self {
            size: cfg.size,
            refill_time_ns: u128::from(cfg.refill_time) * NANOS_PER_MILLI,
            burst: cfg.one_time_burst,
            budget: i128::from(cfg.size),
            last_update: now,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn refill(&mut self, now: Instant) {
        let size = i128::from(self.size);
        if self.budget >= size {
            // Full: refills are lost, and so is the time spent full.
            self.last_update = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let tokens = elapsed * u128::from(self.size) / self.refill_time_ns;
        if tokens == 0 {
            return;
        }
        // Credit only the time those whole tokens took, so fractions carry over;
        // rounding the time up never grants more than the rate allows.
        let used = (tokens * self.refill_time_ns).div_ceil(u128::from(self.size));
        self.last_update += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(tokens).min(size);
        if self.budget >= size {
            self.last_update = now;
        }
    }

    /// Time until the bucket holds `tokens` (at most `size`), from `now`.
    fn time_until(&self, tokens: u64, now: Instant) -> Duration {
        let missing = i128::from(tokens.min(self.size)) - self.budget;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let missing = u128::try_from(missing).unwrap_or(u128::MAX);
        let total = (missing * self.refill_time_ns).div_ceil(u128::from(self.size));
        let accrued = now.saturating_duration_since(self.last_update).as_nanos();
        Duration::from_nanos(u64::try_from(total.saturating_sub(accrued)).unwrap_or(u64::MAX))
    }

    /// Tokens that can be taken right now without debt.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        let budget = u64::try_from(self.budget.max(0)).unwrap_or(u64::MAX);
        self.burst.saturating_add(budget)
    }

    /// Takes `tokens` (burst first). Requests up to `size` succeed or wait with
    /// nothing taken; larger ones go into debt, but only from a bucket without
    /// debt, so at most one oversized request is being repaid at a time.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        if rest == 0 {
            self.burst -= from_burst;
            return Reduction::Success;
        }
        self.refill(now);
        let rest_i = i128::from(rest);
        if rest_i <= self.budget {
            self.burst -= from_burst;
            self.budget -= rest_i;
            return Reduction::Success;
        }
        if rest > self.size {
            if self.budget < 0 {
                return Reduction::Wait(self.time_until(0, now));
            }
            self.burst -= from_burst;
            self.budget -= rest_i;
            return Reduction::Debt(self.time_until(0, now));
        }
        Reduction::Wait(self.time_until(rest, now))
    }

    /// Takes `tokens` unconditionally (they were already used), going into debt
    /// if they exceed what is there.
    pub fn force_reduce(&mut self, tokens: u64, now: Instant) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.refill(now);
        self.budget = self.budget.saturating_sub(i128::from(tokens - from_burst));
    }
}

/// Which bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Bytes,
    Ops,
}

impl TokenKind {
    /// Label value of `neurovisor_vsock_throttled_total{kind=...}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Bytes => "bytes",
            Self::Ops => "ops",
        }
    }
}

/// What one limiter has let through and held back (for tests and reports;
/// the daemon's view across VMs is in [`crate::metrics`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    /// Bytes read from guest streams.
    pub bytes: u64,
    /// Times a read or byte request had to wait for tokens.
    pub throttled_bytes: u64,
    /// Operations (accepted connections, acquired ops).
    pub ops: u64,
    /// Times an operation found the ops bucket empty.
    pub throttled_ops: u64,
    /// Guest connections closed because the ops bucket was empty.
    pub rejected_connections: u64,
}

#[derive(Debug, Default)]
struct Stats {
    bytes: AtomicU64,
    throttled_bytes: AtomicU64,
    ops: AtomicU64,
    throttled_ops: AtomicU64,
    rejected_connections: AtomicU64,
}

/// The daemon-wide counters, resolved once so the hot path does not allocate.
#[derive(Debug)]
struct Hooks {
    throttled_bytes: Counter,
    throttled_ops: Counter,
    rejected_connections: Counter,
}

impl Hooks {
    fn on(c: &crate::metrics::VmCounters) -> Self {
        Self {
            throttled_bytes: c.throttled(TokenKind::Bytes.label()),
            throttled_ops: c.throttled(TokenKind::Ops.label()),
            rejected_connections: c.vsock_rejected_connections.clone(),
        }
    }
}

/// Smallest read worth waking up for once the bucket ran dry: reading a few
/// bytes per timer tick would cost more host CPU than it saves.
const MIN_READ: u64 = 4096;

/// The bandwidth and ops buckets of one VM.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    bandwidth: Option<Mutex<TokenBucket>>,
    ops: Option<Mutex<TokenBucket>>,
    stats: Stats,
    hooks: Hooks,
}

/// What a stream may read now.
enum Allowance {
    Unlimited,
    Bytes(usize),
    Wait(Duration),
}

fn lock(m: &Mutex<TokenBucket>) -> MutexGuard<'_, TokenBucket> {
    // The bucket is plain arithmetic: a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RateLimiter {
    /// A limiter counting what it holds back into `counters`.
    pub fn new(config: RateLimitConfig, counters: &crate::metrics::VmCounters) -> Self {
        let now = Instant::now();
        let bucket = |c: Option<TokenBucketConfig>| c.and_then(|c| TokenBucket::new(c, now)).map(Mutex::new);
        Self {
            config,
            bandwidth: bucket(config.bandwidth),
            ops: bucket(config.ops),
            stats: Stats::default(),
            hooks: Hooks::on(counters),
        }
    }

    /// A limiter that lets everything through (still counts).
    pub fn unlimited() -> Self {
        Self::new(RateLimitConfig::UNLIMITED, &Default::default())
    }

    pub fn config(&self) -> RateLimitConfig {
        self.config
    }

    pub fn stats(&self) -> RateLimitStats {
        let s = &self.stats;
        RateLimitStats {
            bytes: s.bytes.load(Ordering::Relaxed),
            throttled_bytes: s.throttled_bytes.load(Ordering::Relaxed),
            ops: s.ops.load(Ordering::Relaxed),
            throttled_ops: s.throttled_ops.load(Ordering::Relaxed),
            rejected_connections: s.rejected_connections.load(Ordering::Relaxed),
        }
    }

    fn bucket(&self, kind: TokenKind) -> Option<&Mutex<TokenBucket>> {
        match kind {
            TokenKind::Bytes => self.bandwidth.as_ref(),
            TokenKind::Ops => self.ops.as_ref(),
        }
    }

    fn count(&self, kind: TokenKind, n: u64) {
        match kind {
            TokenKind::Bytes => self.stats.bytes.fetch_add(n, Ordering::Relaxed),
            TokenKind::Ops => self.stats.ops.fetch_add(n, Ordering::Relaxed),
        };
    }

    fn note_throttled(&self, kind: TokenKind) {
        match kind {
            TokenKind::Bytes => {
                self.stats.throttled_bytes.fetch_add(1, Ordering::Relaxed);
                self.hooks.throttled_bytes.inc();
            }
            TokenKind::Ops => {
                self.stats.throttled_ops.fetch_add(1, Ordering::Relaxed);
                self.hooks.throttled_ops.inc();
            }
        }
    }

    /// Takes `n` tokens, waiting as long as the rate requires. A request larger
    /// than the bucket takes what is there and waits out the rest.
    pub async fn acquire(&self, kind: TokenKind, n: u64) {
        let Some(bucket) = self.bucket(kind) else {
            self.count(kind, n);
            return;
        };
        let mut throttled = false;
        loop {
            let r = lock(bucket).reduce(n, Instant::now());
            let wait = match r {
                Reduction::Success => {
                    self.count(kind, n);
                    return;
                }
                Reduction::Wait(d) => d,
                Reduction::Debt(d) => {
                    self.count(kind, n);
                    self.note_throttled(kind);
                    tokio::time::sleep(d).await;
                    return;
                }
            };
            if !throttled {
                throttled = true;
                self.note_throttled(kind);
            }
            // Never spin on a zero wait: the timer has millisecond resolution.
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// Takes one op token for a connection the guest opened. `false` (counted
    /// as throttled and rejected) when the ops bucket is empty: the caller must
    /// close the connection.
    pub fn admit_connection(&self) -> bool {
        let admitted = match &self.ops {
            None => true,
            Some(b) => lock(b).reduce(1, Instant::now()) == Reduction::Success,
        };
        if admitted {
            self.count(TokenKind::Ops, 1);
        } else {
            self.note_throttled(TokenKind::Ops);
            self.stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
            self.hooks.rejected_connections.inc();
        }
        admitted
    }

    /// How much a stream may read now, for a buffer of `want` bytes.
    fn read_allowance(&self, want: usize) -> Allowance {
        let Some(bucket) = &self.bandwidth else {
            return Allowance::Unlimited;
        };
        let now = Instant::now();
        let mut b = lock(bucket);
        let available = b.available(now);
        let want = u64::try_from(want).unwrap_or(u64::MAX);
        // With a nearly empty bucket wait for a worthwhile chunk; never for more
        // than the bucket holds, so any request makes progress.
        let need = want.min(MIN_READ).min(b.size()).max(1);
        if available >= need {
            Allowance::Bytes(usize::try_from(available.min(want)).unwrap_or(usize::MAX))
        } else {
            Allowance::Wait(b.time_until(need, now).max(Duration::from_millis(1)))
        }
    }

    pub(crate) fn consumed_bytes(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        if let Some(bucket) = &self.bandwidth {
            // Usually within the allowance; concurrent readers of the same VM
            // may overdraw slightly, which later reads repay.
            lock(bucket).force_reduce(n, Instant::now());
        }
        self.count(TokenKind::Bytes, n);
    }
}

/// A stream whose reads are paced by the byte bucket of a [`RateLimiter`].
/// Writes (host to guest) pass through unchanged.
#[derive(Debug)]
pub struct RateLimitedStream<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> RateLimitedStream<S> {
    pub fn new(inner: S, limiter: Arc<RateLimiter>) -> Self {
        Self {
            inner,
            limiter,
            sleep: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RateLimitedStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            match this.limiter.read_allowance(buf.remaining()) {
                Allowance::Unlimited => {
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    this.limiter
                        .count(TokenKind::Bytes, (buf.filled().len() - before) as u64);
                    return Poll::Ready(Ok(()));
                }
                Allowance::Bytes(n) => {
                    // Read into a window of at most `n` bytes, so the socket
                    // keeps whatever the bucket cannot pay for yet.
                    let window = buf.initialize_unfilled_to(n);
                    let mut limited = ReadBuf::new(window);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
                    let got = limited.filled().len();
                    buf.advance(got);
                    this.limiter.consumed_bytes(got);
                    return Poll::Ready(Ok(()));
                }
                Allowance::Wait(d) => {
                    this.limiter.note_throttled(TokenKind::Bytes);
                    this.sleep = Some(Box::pin(tokio::time::sleep(d)));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RateLimitedStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MS: Duration = Duration::from_millis(1);

    fn cfg(size: u64, burst: u64, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }

    #[test]
    fn config_parses_firecracker_json_and_defaults() {
        let c: RateLimitConfig =
            serde_json::from_str(r#"{"bandwidth": {"size": 1000, "refill_time": 100}}"#).expect("parse");
        assert_eq!(c.bandwidth, Some(cfg(1000, 0, 100)));
        assert_eq!(c.ops, Some(DEFAULT_OPS), "absent fields keep the defaults");
        let c: RateLimitConfig = serde_json::from_str(r#"{"ops": null}"#).expect("parse");
        assert_eq!((c.bandwidth, c.ops), (Some(DEFAULT_BANDWIDTH), None));
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"bandwith": null}"#).is_err());
        assert_eq!(DEFAULT_OPS.rate_per_sec(), 50.0);
        assert_eq!(DEFAULT_BANDWIDTH.rate_per_sec(), 16.0 * 1024.0 * 1024.0);
        assert!(!cfg(0, 5, 100).is_limiting() && !cfg(5, 0, 0).is_limiting());
    }

    #[test]
    fn cli_rates_map_to_buckets() {
        let c = RateLimitConfig::default().with_rates(Some(65536), Some(0));
        assert_eq!(c.bandwidth, Some(cfg(16384, 0, 250)));
        assert_eq!(c.bandwidth.map(|b| b.rate_per_sec()), Some(65536.0));
        assert_eq!(c.ops, None);
        let c = RateLimitConfig::default().with_rates(None, Some(10));
        assert_eq!(
            (c.bandwidth, c.ops),
            (Some(DEFAULT_BANDWIDTH), Some(cfg(20, 0, 2000)))
        );
        // Below one token per window: one token per 1/rate s.
        assert_eq!(
            TokenBucketConfig::per_second(2, BANDWIDTH_WINDOW),
            Some(cfg(1, 0, 500))
        );
        assert_eq!(TokenBucketConfig::per_second(0, BANDWIDTH_WINDOW), None);
    }

    #[test]
    fn bucket_refills_at_the_configured_rate() {
        let t0 = Instant::now();
        // 1000 tokens per 100 ms = 10 per ms.
        let mut b = TokenBucket::new(cfg(1000, 0, 100), t0).expect("limiting");
        assert_eq!(b.reduce(1000, t0), Reduction::Success);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.reduce(10, t0), Reduction::Wait(MS));
        assert_eq!(b.reduce(500, t0), Reduction::Wait(50 * MS));
        assert_eq!(b.available(t0 + 10 * MS), 100);
        assert_eq!(b.reduce(500, t0 + 10 * MS), Reduction::Wait(40 * MS));
        // Fractions carry over: 0.15 ms steps (1.5 tokens each) add up.
        let mut t = t0 + 10 * MS;
        for _ in 0..100 {
            t += Duration::from_micros(150);
            b.available(t);
        }
        assert_eq!(b.available(t), 250);
        // Never more than size, however long it idles.
        assert_eq!(b.available(t + Duration::from_secs(60)), 1000);
        assert!(TokenBucket::new(cfg(0, 0, 100), t0).is_none());
    }

    #[test]
    fn one_time_burst_comes_first_and_only_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(cfg(100, 300, 1000), t0).expect("limiting");
        assert_eq!(b.available(t0), 400);
        assert_eq!(b.reduce(250, t0), Reduction::Success);
        assert_eq!(b.available(t0), 150);
        // 50 from the burst, 100 from the bucket.
        assert_eq!(b.reduce(150, t0), Reduction::Success);
        assert_eq!(
            b.available(t0 + Duration::from_secs(100)),
            100,
            "the burst is gone for good"
        );
    }

    #[test]
    fn oversized_request_goes_into_debt_and_blocks_others() {
        let t0 = Instant::now();
        // 100 tokens per second.
        let mut b = TokenBucket::new(cfg(100, 0, 1000), t0).expect("limiting");
        assert_eq!(b.reduce(40, t0), Reduction::Success);
        // 300 > size: takes the 60 left and owes 240 = 2.4 s.
        assert_eq!(b.reduce(300, t0), Reduction::Debt(Duration::from_millis(2400)));
        // Others wait for the debt (and for their own tokens).
        assert_eq!(
            b.reduce(1, t0 + Duration::from_secs(1)),
            Reduction::Wait(Duration::from_millis(1410))
        );
        assert_eq!(
            b.reduce(300, t0 + Duration::from_secs(1)),
            Reduction::Wait(Duration::from_millis(1400)),
            "no second debt on top of the first"
        );
        assert_eq!(b.available(t0 + Duration::from_millis(2400)), 0);
        assert_eq!(b.reduce(5, t0 + Duration::from_millis(2450)), Reduction::Success);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_holds_the_rate_and_oversized_requests_progress() {
        // 1000 bytes/s, 100 at once.
        let l = RateLimiter::new(
            RateLimitConfig {
                bandwidth: Some(cfg(100, 0, 100)),
                ops: None,
            },
            &Default::default(),
        );
        let start = Instant::now();
        for _ in 0..20 {
            l.acquire(TokenKind::Bytes, 50).await;
        }
        // 1000 bytes: 100 free, 900 at 1000/s.
        assert_eq!(start.elapsed(), Duration::from_millis(900));
        let start = Instant::now();
        l.acquire(TokenKind::Bytes, 5000).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(5000),
            "5x the bucket, paid at the rate"
        );
        let s = l.stats();
        assert_eq!(s.bytes, 6000);
        assert!(s.throttled_bytes >= 18, "{s:?}");
        // Ops are unlimited here.
        let start = Instant::now();
        l.acquire(TokenKind::Ops, 1_000_000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_beyond_the_ops_bucket_are_rejected() {
        let counters = crate::metrics::VmCounters::default();
        let l = RateLimiter::new(
            RateLimitConfig {
                bandwidth: None,
                ops: Some(DEFAULT_OPS),
            },
            &counters,
        );
        let admitted = (0..150).filter(|_| l.admit_connection()).count();
        assert_eq!(admitted, 100);
        tokio::time::advance(Duration::from_secs(1)).await;
        let admitted = (0..150).filter(|_| l.admit_connection()).count();
        assert_eq!(admitted, 50, "50 per second after the burst");
        let s = l.stats();
        assert_eq!((s.ops, s.rejected_connections, s.throttled_ops), (150, 150, 150));
        // Into the handle it was given, and only that one.
        assert_eq!(counters.vsock_rejected_connections.get(), 150);
        assert_eq!(counters.throttled("ops").get(), 150);
        assert_eq!(crate::metrics::VmCounters::default().throttled("ops").get(), 0);
        assert!(RateLimiter::unlimited().admit_connection());
    }

    /// Reads everything from `r` through a limiter, returning the bytes and the
    /// (virtual) time it took.
    async fn pump(
        limit: TokenBucketConfig,
        data: Vec<u8>,
        write_chunk: usize,
    ) -> (Vec<u8>, Duration, RateLimitStats) {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let limiter = Arc::new(RateLimiter::new(
            RateLimitConfig {
                bandwidth: Some(limit),
                ops: None,
            },
            &Default::default(),
        ));
        let mut r = RateLimitedStream::new(a, limiter.clone());
        let writer = tokio::spawn(async move {
            for c in data.chunks(write_chunk) {
                b.write_all(c).await.expect("write");
            }
        });
        let start = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        let took = start.elapsed();
        writer.await.expect("writer");
        (got, took, limiter.stats())
    }

    #[tokio::test(start_paused = true)]
    async fn stream_reads_are_paced_and_complete() {
        // 64 KiB/s with a 16 KiB bucket; 256 KiB through it.
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        let (got, took, stats) = pump(cfg(16 * 1024, 0, 250), data.clone(), 4096).await;
        assert!(got == data, "data must arrive intact");
        // (256 - 16) KiB at 64 KiB/s = 3.75 s; timer ticks may only add.
        let expected = Duration::from_millis(3750);
        assert!(
            took >= expected && took < expected + Duration::from_millis(250),
            "{took:?}"
        );
        assert_eq!(stats.bytes, data.len() as u64);
        assert!(stats.throttled_bytes > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_write_larger_than_the_bucket_still_arrives() {
        // One 200 KB write against a 10 KB bucket at 100 KB/s.
        let data = vec![7u8; 200_000];
        let (got, took, _) = pump(cfg(10_000, 0, 100), data.clone(), data.len()).await;
        assert_eq!(got.len(), data.len());
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_millis(2200),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_stream_does_not_wait_and_counts() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let limiter = Arc::new(RateLimiter::unlimited());
        let mut r = RateLimitedStream::new(a, limiter.clone());
        // Writes pass through.
        r.write_all(b"x").await.expect("write");
        let writer = tokio::spawn(async move {
            let mut x = [0u8; 1];
            b.read_exact(&mut x).await.expect("read");
            assert_eq!(&x, b"x");
            b.write_all(&[1u8; 100_000]).await.expect("write");
        });
        let start = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!((got.len(), start.elapsed()), (100_000, Duration::ZERO));
        writer.await.expect("writer");
        assert_eq!(limiter.stats().bytes, 100_000);
    }
}
