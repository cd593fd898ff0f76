//! Boot stall detection and boot retries.
//!
//! A guest that hangs while booting shows nothing (the console is `quiet`, the
//! agent never says READY), so the only signal is time. Instead of one fixed
//! timeout, [`BootStats`] keeps the recent boot-to-ready durations per backend
//! and VM size and derives a *stall budget* from them:
//!
//! ```text
//! budget = min(cap, max(floor, factor × p95(last `window` boots)) × 2^(attempt + consecutive stalls))
//! ```
//!
//! with `default` instead of the p95 term until `min_samples` boots have been
//! measured. The doubling per retry and per consecutive stall keeps a host that
//! merely got slower (more load) from turning every boot into a "stall": a
//! success resets it. [`BootStats`] is a cheap handle (clone it to share one
//! set of statistics between a [`crate::Sandbox`] and a pool); there is no
//! process-wide state.
//!
//! It also counts stalls and retries and keeps the last few retries with their
//! reasons, for `/healthz` and tests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// How the stall budget is derived.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// Never less than this (TCG cold boots take 0.7-2.5 s under load, KVM ~0.1 s;
    /// a busy host can stretch either for a while).
    pub floor: Duration,
    /// Never more than this (the old fixed boot timeout).
    pub cap: Duration,
    /// Before `min_samples` boots have been measured.
    pub default: Duration,
    /// Multiple of the p95 boot time.
    pub factor: f64,
    pub min_samples: usize,
    /// Recent boots the p95 is taken over.
    pub window: usize,
    /// Boot retries for a request that waits on a boot (the user's code has not
    /// run yet, so a fresh VM is always safe).
    pub retries: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            floor: Duration::from_secs(5),
            cap: Duration::from_secs(90),
            default: Duration::from_secs(30),
            factor: 4.0,
            min_samples: 5,
            window: 64,
            retries: 2,
        }
    }
}

/// The time one boot attempt may take, and how it was derived.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub timeout: Duration,
    pub basis: String,
}

/// One boot that failed for a waiting request and was retried on a fresh VM.
#[derive(Debug, Clone, Serialize)]
pub struct RetryRecord {
    /// Seconds since the Unix epoch.
    pub at_unix_s: u64,
    /// The attempt that failed (0 = the first).
    pub attempt: u32,
    pub vm_id: String,
    /// First line of the failure.
    pub reason: String,
}

/// Boot times and failures of one backend and size, for reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootReport {
    /// Successful boots measured (since start).
    pub boots: u64,
    /// Over the kept samples (the last [`KEEP_FOR_REPORT`] boots).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// What the next first attempt would get.
    pub budget_ms: f64,
    pub budget_basis: String,
    /// Over all keys of this handle.
    pub stalls: u64,
    pub retries: u64,
    /// The last [`KEEP_RETRIES`] retries, oldest first.
    pub recent_retries: Vec<RetryRecord>,
}

/// Boot samples kept per key for [`BootReport`] percentiles.
pub const KEEP_FOR_REPORT: usize = 4096;
/// Retry records kept.
pub const KEEP_RETRIES: usize = 64;

#[derive(Default)]
struct KeyStats {
    samples: VecDeque<Duration>,
    boots: u64,
    max: Duration,
    consecutive_stalls: u32,
}

#[derive(Default)]
struct Stats {
    keys: HashMap<String, KeyStats>,
    stalls: u64,
    retries: u64,
    recent_retries: VecDeque<RetryRecord>,
}

/// Shared boot statistics; see the module docs.
#[derive(Clone, Default)]
pub struct BootStats {
    cfg: Arc<BudgetConfig>,
    stats: Arc<Mutex<Stats>>,
}

impl std::fmt::Debug for BootStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootStats")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Nearest-rank percentile of unsorted samples.
fn percentile(samples: impl Iterator<Item = Duration>, p: f64) -> Option<Duration> {
    let mut v: Vec<Duration> = samples.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl BootStats {
    pub fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg: Arc::new(cfg),
            stats: Arc::default(),
        }
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The budget of boot attempt `attempt` (0 = first) for `key`.
    pub fn budget(&self, key: &str, attempt: u32) -> Budget {
        let st = self.lock();
        let ks = st.keys.get(key);
        let stalls = ks.map_or(0, |k| k.consecutive_stalls);
        let n = ks.map_or(0, |k| k.samples.len());
        let recent = || {
            let k = ks.expect("samples exist");
            k.samples.iter().rev().take(self.cfg.window).copied()
        };
        let (base, mut basis) = if n < self.cfg.min_samples {
            (
                self.cfg.default,
                format!(
                    "default {:?}, {n} of {} boots measured",
                    self.cfg.default, self.cfg.min_samples
                ),
            )
        } else {
            let p95 = percentile(recent(), 95.0).unwrap_or(self.cfg.default);
            let t = p95.mul_f64(self.cfg.factor).max(self.cfg.floor);
            let used = n.min(self.cfg.window);
            (
                t,
                format!(
                    "max({:?}, {} × p95 {:.2} s of the last {used} boots)",
                    self.cfg.floor,
                    self.cfg.factor,
                    p95.as_secs_f64()
                ),
            )
        };
        let doublings = attempt.saturating_add(stalls).min(16);
        if doublings > 0 {
            basis.push_str(&format!(
                " × 2^{doublings} (attempt {}, {stalls} stall(s) in a row)",
                attempt + 1
            ));
        }
        let mut timeout = base.saturating_mul(1u32 << doublings);
        if timeout >= self.cfg.cap {
            timeout = self.cfg.cap;
            basis.push_str(&format!(", capped at {:?}", self.cfg.cap));
        }
        Budget { timeout, basis }
    }

    /// A boot of `key` became ready after `took`.
    pub fn record_ready(&self, key: &str, took: Duration) {
        let mut st = self.lock();
        let ks = st.keys.entry(key.to_string()).or_default();
        ks.samples.push_back(took);
        if ks.samples.len() > KEEP_FOR_REPORT {
            ks.samples.pop_front();
        }
        ks.boots += 1;
        ks.max = ks.max.max(took);
        ks.consecutive_stalls = 0;
    }

    /// A boot of `key` exceeded its budget.
    pub fn record_stall(&self, key: &str) {
        let mut st = self.lock();
        st.stalls += 1;
        let ks = st.keys.entry(key.to_string()).or_default();
        ks.consecutive_stalls = ks.consecutive_stalls.saturating_add(1);
    }

    /// A failed boot attempt is being retried on a fresh VM.
    pub fn record_retry(&self, attempt: u32, vm_id: &str, reason: &str) {
        let mut st = self.lock();
        st.retries += 1;
        let first_line = reason.lines().next().unwrap_or_default();
        let reason: String = first_line.chars().take(300).collect();
        st.recent_retries.push_back(RetryRecord {
            at_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            attempt,
            vm_id: vm_id.to_string(),
            reason,
        });
        if st.recent_retries.len() > KEEP_RETRIES {
            st.recent_retries.pop_front();
        }
    }

    pub fn stalls(&self) -> u64 {
        self.lock().stalls
    }

    pub fn retries(&self) -> u64 {
        self.lock().retries
    }

    /// Boot times of `key` and the counters of this handle.
    pub fn report(&self, key: &str) -> BootReport {
        let budget = self.budget(key, 0);
        let st = self.lock();
        let ks = st.keys.get(key);
        let pct = |p| ks.and_then(|k| percentile(k.samples.iter().copied(), p)).map(ms);
        BootReport {
            boots: ks.map_or(0, |k| k.boots),
            p50_ms: pct(50.0),
            p95_ms: pct(95.0),
            max_ms: ks.filter(|k| k.boots > 0).map(|k| ms(k.max)),
            budget_ms: ms(budget.timeout),
            budget_basis: budget.basis,
            stalls: st.stalls,
            retries: st.retries,
            recent_retries: st.recent_retries.iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn conservative_default_until_enough_boots_are_measured() {
        let s = BootStats::default();
        let b = s.budget("qemu/medium", 0);
        assert_eq!(b.timeout, Duration::from_secs(30));
        assert!(b.basis.contains("0 of 5"), "{}", b.basis);
        for _ in 0..4 {
            s.record_ready("qemu/medium", secs(1.0));
        }
        assert_eq!(s.budget("qemu/medium", 0).timeout, Duration::from_secs(30));
        // Other keys are separate.
        s.record_ready("qemu/small", secs(1.0));
        assert_eq!(s.budget("qemu/medium", 0).timeout, Duration::from_secs(30));
    }

    #[test]
    fn budget_is_a_multiple_of_the_p95_with_floor_and_cap() {
        let s = BootStats::default();
        // 19 boots of 2 s and one of 3 s: p95 (nearest rank 19 of 20) is 2 s.
        for _ in 0..19 {
            s.record_ready("k", secs(2.0));
        }
        s.record_ready("k", secs(3.0));
        let b = s.budget("k", 0);
        assert_eq!(b.timeout, secs(8.0), "{b:?}");
        assert!(b.basis.contains("p95 2.00 s"), "{}", b.basis);
        // Fast (KVM-like) boots: the floor.
        let fast = BootStats::default();
        for _ in 0..10 {
            fast.record_ready("k", secs(0.1));
        }
        assert_eq!(fast.budget("k", 0).timeout, Duration::from_secs(5));
        // Retries double it; the cap bounds it.
        assert_eq!(s.budget("k", 1).timeout, secs(16.0));
        assert_eq!(s.budget("k", 2).timeout, secs(32.0));
        let capped = s.budget("k", 5);
        assert_eq!(capped.timeout, Duration::from_secs(90));
        assert!(capped.basis.contains("capped"), "{}", capped.basis);
    }

    #[test]
    fn consecutive_stalls_widen_the_budget_until_a_boot_succeeds() {
        let s = BootStats::default();
        for _ in 0..10 {
            s.record_ready("k", secs(1.0));
        }
        assert_eq!(s.budget("k", 0).timeout, secs(5.0));
        s.record_stall("k");
        s.record_stall("k");
        assert_eq!(s.budget("k", 0).timeout, secs(20.0));
        assert_eq!(s.stalls(), 2);
        s.record_ready("k", secs(1.0));
        assert_eq!(s.budget("k", 0).timeout, secs(5.0));
    }

    #[test]
    fn report_has_the_distribution_and_the_retries() {
        let s = BootStats::default();
        for ms in 1..=100u64 {
            s.record_ready("k", Duration::from_millis(ms * 10));
        }
        s.record_retry(0, "vm-1", "VM boot stalled: ...\nconsole tail");
        let r = s.report("k");
        assert_eq!(r.boots, 100);
        assert_eq!(r.p50_ms, Some(500.0));
        assert_eq!(r.p95_ms, Some(950.0));
        assert_eq!(r.max_ms, Some(1000.0));
        assert_eq!(r.retries, 1);
        assert_eq!(r.recent_retries[0].reason, "VM boot stalled: ...");
        assert_eq!(r.recent_retries[0].vm_id, "vm-1");
        let empty = BootStats::default().report("k");
        assert_eq!((empty.boots, empty.p50_ms, empty.max_ms), (0, None, None));
    }
}
