//! The pre-warmed VM pool.
//!
//! Keeps `warm` booted VMs ready, never runs more than `max` VMs (warm +
//! booting + active), hands each VM to exactly one execution and destroys it
//! afterwards. Refilling happens in the background, so an acquisition never
//! waits for a boot when a warm VM is there. Repeated boot failures put the
//! pool into back-off (reported by [`Pool::status`]) instead of a boot loop.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::Instrument;

use serde::Serialize;
use tokio::sync::Notify;

use crate::boot::BootReport;
use crate::config::VmSize;
use crate::exec::{ExecError, ExecOutcome, ExecRequest, OutputSink, ReadyVm, Sandbox};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// VMs kept booted and idle.
    pub warm: usize,
    /// Upper bound on VMs alive at once (warm + booting + active).
    pub max: usize,
    pub size: VmSize,
    /// How long a request waits for a free VM before RESOURCE_EXHAUSTED.
    pub queue_timeout: Duration,
    /// Background boots in parallel (boots are CPU-heavy under TCG).
    pub parallel_boots: usize,
    /// Health check of a warm VM before it is handed out.
    pub health_timeout: Duration,
    /// Requests that may wait for a VM at once; one more is refused at once
    /// (RESOURCE_EXHAUSTED) instead of piling up.
    pub max_queued: usize,
    /// Whether its counts are the `neurovisor_pool_*` gauges (the daemon's
    /// main pool; not the on-demand pools of sandboxes with their own image
    /// or size).
    pub report: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            warm: 3,
            max: 10,
            size: VmSize::Medium,
            queue_timeout: Duration::from_secs(30),
            parallel_boots: 2,
            health_timeout: Duration::from_secs(5),
            max_queued: 64,
            report: true,
        }
    }
}

impl PoolConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max == 0 {
            return Err("max must be at least 1".into());
        }
        if self.warm > self.max {
            return Err(format!("warm ({}) cannot exceed max ({})", self.warm, self.max));
        }
        if self.parallel_boots == 0 {
            return Err("parallel boots must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no VM available: all {max} VMs are busy and none became free within {waited:?}; retry later, or raise --max / --queue-timeout")]
    Exhausted { max: usize, waited: Duration },
    #[error("too many requests waiting: {queued} are already queued for a VM (the limit, --max-queued); retry later, or raise --max / --max-queued")]
    QueueFull { queued: usize },
    #[error("VMs are failing to boot ({reason}); the pool retries in the background, retry later")]
    Degraded { reason: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Boot(ExecError),
    #[error("the VM management runtime is gone: {0}")]
    Runtime(String),
}

/// A snapshot of the pool for health reports.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    pub warm: usize,
    pub booting: usize,
    pub active: usize,
    pub max: usize,
    pub warm_target: usize,
    pub served: u64,
    pub consecutive_boot_failures: u32,
    /// Why the pool is not refilling, when it is backing off.
    pub degraded: Option<String>,
    /// Boot times, stall budget, stalls and retried boots.
    pub boot: BootReport,
}

#[derive(Default)]
struct State {
    warm: VecDeque<ReadyVm>,
    booting: usize,
    active: usize,
    served: u64,
    failures: u32,
    last_error: Option<String>,
    backoff_until: Option<Instant>,
    shutting_down: bool,
    /// Requests waiting for a VM.
    queued: usize,
}

impl State {
    fn total(&self) -> usize {
        self.warm.len() + self.booting + self.active
    }

    fn in_backoff(&self) -> bool {
        self.backoff_until.is_some_and(|t| Instant::now() < t)
    }
}

struct Inner {
    sandbox: Sandbox,
    cfg: PoolConfig,
    state: Mutex<State>,
    /// Signalled on every change that may let a waiter or the refiller proceed.
    changed: Notify,
    metrics: Arc<Metrics>,
    /// Where VMs are booted and destroyed: the daemon's VM management
    /// runtime, whose threads may fork VMMs (see `security::seccomp`).
    vm_rt: tokio::runtime::Handle,
}

/// Consecutive boot failures before the pool backs off.
const FAILURES_BEFORE_BACKOFF: u32 = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &State) {
        if !self.cfg.report {
            return;
        }
        self.metrics.pool_warm_vms.set(st.warm.len() as i64);
        self.metrics.pool_active_vms.set(st.active as i64);
        self.metrics.pool_booting_vms.set(st.booting as i64);
        self.metrics.pool_queued_requests.set(st.queued as i64);
    }

    fn record_boot(&self, st: &mut State, result: Result<Duration, &ExecError>) {
        match result {
            Ok(t) => {
                st.failures = 0;
                st.last_error = None;
                st.backoff_until = None;
                self.metrics.vm_boot_seconds.observe(t.as_secs_f64());
            }
            Err(e) => {
                st.failures += 1;
                self.metrics.record_boot_failure(e, false);
                let e = e.to_string();
                tracing::warn!(failures = st.failures, "VM boot failed: {e}");
                st.last_error = Some(e);
                if st.failures >= FAILURES_BEFORE_BACKOFF {
                    let exp = (st.failures - FAILURES_BEFORE_BACKOFF).min(6);
                    let backoff = (Duration::from_secs(1) * 2u32.pow(exp)).min(MAX_BACKOFF);
                    st.backoff_until = Some(Instant::now() + backoff);
                }
            }
        }
    }

    /// Frees an active slot once its VM is gone.
    fn release_slot(&self) {
        let mut st = self.lock();
        st.active = st.active.saturating_sub(1);
        self.publish(&st);
        drop(st);
        self.changed.notify_waiters();
    }
}

/// A reserved place under `max`. Freed on drop unless it became a [`Lease`],
/// so a caller cancelled mid-boot or mid-check never leaks capacity.
struct Slot {
    inner: Option<Arc<Inner>>,
}

impl Slot {
    fn new(inner: &Arc<Inner>) -> Self {
        Self {
            inner: Some(inner.clone()),
        }
    }

    fn into_lease(mut self, vm: ReadyVm, warm: bool, started: Instant, health_check: Duration) -> Lease {
        let inner = self.inner.take().expect("slot used once");
        let waited = started.elapsed();
        inner
            .metrics
            .vm_acquire_seconds
            .observe(waited.as_secs_f64(), crate::metrics::TraceLabel::current());
        inner.lock().served += 1;
        Lease {
            vm: Some(vm),
            inner,
            warm,
            waited,
            health_check,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.release_slot();
        }
    }
}

/// Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// Starts the pool and its background refiller on the current runtime.
    pub fn start(sandbox: Sandbox, cfg: PoolConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        Self::start_on(sandbox, cfg, metrics, tokio::runtime::Handle::current())
    }

    /// Starts the pool; VMs are booted and destroyed only on `vm_rt`.
    pub fn start_on(
        sandbox: Sandbox,
        cfg: PoolConfig,
        metrics: Arc<Metrics>,
        vm_rt: tokio::runtime::Handle,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let inner = Arc::new(Inner {
            sandbox,
            cfg,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            metrics,
            vm_rt,
        });
        inner.vm_rt.spawn(refill_loop(inner.clone()));
        Ok(Self { inner })
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.inner.sandbox
    }

    /// An on-demand pool beside this one (no warm VMs, up to `max`, not in
    /// the pool gauges) for VMs of other `images` or `size`, on the same VM
    /// runtime, backend and metrics.
    pub fn sibling(
        &self,
        images: crate::images::ImageSet,
        size: VmSize,
        max: usize,
        network: Option<Arc<crate::net::NetSettings>>,
    ) -> Result<Self, String> {
        let cfg = PoolConfig {
            warm: 0,
            max,
            size,
            report: false,
            ..self.inner.cfg.clone()
        };
        let mut sandbox = self.inner.sandbox.sibling(images);
        sandbox.network = network;
        Self::start_on(sandbox, cfg, self.inner.metrics.clone(), self.inner.vm_rt.clone())
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    pub fn status(&self) -> PoolStatus {
        let st = self.inner.lock();
        PoolStatus {
            warm: st.warm.len(),
            booting: st.booting,
            active: st.active,
            max: self.inner.cfg.max,
            warm_target: self.inner.cfg.warm,
            served: st.served,
            consecutive_boot_failures: st.failures,
            degraded: if st.in_backoff() {
                st.last_error.clone()
            } else {
                None
            },
            boot: self
                .inner
                .sandbox
                .boot_stats()
                .report(&self.inner.sandbox.boot_key(self.inner.cfg.size)),
        }
    }

    /// Takes a VM for one execution: a warm one when there is one (checked with
    /// Health first), else a cold boot while under `max`, else waits up to the
    /// queue timeout. A cold boot that stalls or dies is retried (a warm VM
    /// that became free meanwhile, or another cold boot, up to the boot
    /// budget's `retries`): the request's code has not run yet. A pool in
    /// back-off fails at once.
    pub async fn acquire(&self) -> Result<Lease, PoolError> {
        let span = tracing::info_span!(
            "pool.acquire",
            warm = tracing::field::Empty,
            vm_id = tracing::field::Empty,
            waited_ms = tracing::field::Empty
        );
        let lease = self.acquire_in().instrument(span.clone()).await?;
        span.record("warm", lease.warm);
        span.record("vm_id", lease.vm_id());
        span.record("waited_ms", lease.waited.as_secs_f64() * 1000.0);
        Ok(lease)
    }

    async fn acquire_in(&self) -> Result<Lease, PoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let deadline = started + inner.cfg.queue_timeout;
        let mut ticket: Option<QueueTicket> = None;
        enum Step {
            Warm(Box<ReadyVm>, Slot),
            Cold(Slot),
            Wait,
        }
        loop {
            // Registered before looking at the state, so no wake-up is missed.
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let step = {
                let mut st = inner.lock();
                if st.shutting_down {
                    return Err(PoolError::ShuttingDown);
                }
                let step = if let Some(vm) = st.warm.pop_front() {
                    st.active += 1;
                    Step::Warm(Box::new(vm), Slot::new(inner))
                } else if st.in_backoff() {
                    return Err(PoolError::Degraded {
                        reason: st.last_error.clone().unwrap_or_default(),
                    });
                } else if st.total() < inner.cfg.max {
                    st.active += 1;
                    Step::Cold(Slot::new(inner))
                } else {
                    if ticket.is_none() {
                        if st.queued >= inner.cfg.max_queued {
                            drop(st);
                            inner.metrics.pool_exhausted.inc();
                            return Err(PoolError::QueueFull {
                                queued: inner.cfg.max_queued,
                            });
                        }
                        st.queued += 1;
                        ticket = Some(QueueTicket(inner.clone(), Instant::now()));
                    }
                    Step::Wait
                };
                inner.publish(&st);
                step
            };
            match step {
                Step::Warm(mut vm, slot) => {
                    inner.changed.notify_waiters(); // the refiller replaces it
                    let dead = vm.check_exited();
                    let checked = Instant::now();
                    let healthy = match dead {
                        Some(how) => Err(how),
                        None => vm
                            .check_health(inner.cfg.health_timeout)
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    if let Err(why) = healthy {
                        tracing::warn!(vm = vm.id(), "warm VM failed its check, replacing it: {why}");
                        let _ = inner.vm_rt.spawn(vm.destroy()).await;
                        drop(slot);
                        continue;
                    }
                    return Ok(slot.into_lease(*vm, true, started, checked.elapsed()));
                }
                Step::Cold(slot) => {
                    let boot_started = Instant::now();
                    let boot = {
                        let inner = inner.clone();
                        AbortOnDrop(
                            inner.vm_rt.clone().spawn(
                                async move { inner.sandbox.boot_attempt(inner.cfg.size, attempt).await }
                                    .in_current_span(),
                            ),
                        )
                    };
                    let booted = match boot.join().await {
                        Ok(r) => r,
                        Err(e) => {
                            drop(slot);
                            return Err(PoolError::Runtime(e.to_string()));
                        }
                    };
                    match booted {
                        Ok(vm) => {
                            inner.record_boot(&mut inner.lock(), Ok(boot_started.elapsed()));
                            return Ok(slot.into_lease(vm, false, started, Duration::ZERO));
                        }
                        Err(e) => {
                            inner.record_boot(&mut inner.lock(), Err(&e));
                            drop(slot);
                            let retries = inner.sandbox.boot_stats().config().retries;
                            if e.is_retryable_boot_failure() && attempt < retries {
                                let vm_id = match &e {
                                    ExecError::BootStalled { vm_id, .. } => vm_id.as_str(),
                                    _ => "",
                                };
                                tracing::warn!(
                                    attempt = attempt + 1,
                                    "VM boot failed for a waiting request, retrying on a fresh VM: {e}"
                                );
                                inner
                                    .sandbox
                                    .boot_stats()
                                    .record_retry(attempt, vm_id, &e.to_string());
                                inner.metrics.record_boot_failure(&e, true);
                                attempt += 1;
                                continue;
                            }
                            if attempt > 0 {
                                return Err(PoolError::Boot(ExecError::BootFailed {
                                    attempts: attempt + 1,
                                    last: Box::new(e),
                                }));
                            }
                            return Err(PoolError::Boot(e));
                        }
                    }
                }
                Step::Wait => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        inner.metrics.pool_exhausted.inc();
                        return Err(PoolError::Exhausted {
                            max: inner.cfg.max,
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        }
    }

    /// A lease on the VM saved in `state` and `mem` (a paused sandbox's,
    /// see [`Lease::save`]), restored on the VM runtime. It takes a place
    /// under `max` like any lease: a warm VM gives up its place if none is
    /// free, else it waits up to the queue timeout.
    pub async fn resume(&self, state: PathBuf, mem: PathBuf) -> Result<Lease, PoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let deadline = started + inner.cfg.queue_timeout;
        let slot = loop {
            let notified = inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let evicted = {
                let mut st = inner.lock();
                if st.shutting_down {
                    return Err(PoolError::ShuttingDown);
                }
                if st.total() < inner.cfg.max {
                    st.active += 1;
                    inner.publish(&st);
                    break Slot::new(inner);
                }
                let vm = st.warm.pop_front();
                if vm.is_some() {
                    st.active += 1;
                    inner.publish(&st);
                }
                vm
            };
            if let Some(vm) = evicted {
                // Gone before its place is used, so `max` still bounds the VMs alive.
                let _ = inner.vm_rt.spawn(vm.destroy()).await;
                inner.changed.notify_waiters(); // the refiller sees the pool short
                break Slot::new(inner);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                inner.metrics.pool_exhausted.inc();
                return Err(PoolError::Exhausted {
                    max: inner.cfg.max,
                    waited: started.elapsed(),
                });
            }
        };
        let task = {
            let inner = inner.clone();
            AbortOnDrop(inner.vm_rt.clone().spawn(
                async move { crate::snapshot::resume(&inner.sandbox, &state, &mem, inner.cfg.size).await }
                    .in_current_span(),
            ))
        };
        match task.join().await {
            Ok(Ok(vm)) => Ok(slot.into_lease(vm, false, started, Duration::ZERO)),
            Ok(Err(e)) => Err(PoolError::Boot(e)),
            Err(e) => Err(PoolError::Runtime(e.to_string())),
        }
    }

    /// Stops refilling, destroys the warm VMs and waits (up to `deadline`) until
    /// every leased and booting VM is gone too.
    pub async fn shutdown(&self, deadline: Duration) {
        let warm: Vec<ReadyVm> = {
            let mut st = self.inner.lock();
            st.shutting_down = true;
            let w = st.warm.drain(..).collect();
            self.inner.publish(&st);
            w
        };
        self.inner.changed.notify_waiters();
        for vm in warm {
            let _ = self.inner.vm_rt.spawn(vm.destroy()).await;
        }
        let until = Instant::now() + deadline;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.inner.lock();
                if st.active == 0 && st.booting == 0 {
                    return;
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("pool shutdown: VMs still busy after {deadline:?}");
                return;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

/// One VM, leased for one execution (or for the life of a sandbox, see
/// `server::sessions`). Dropping the lease destroys the VM.
pub struct Lease {
    vm: Option<ReadyVm>,
    inner: Arc<Inner>,
    /// The VM came booted from the pool (false: booted for this request).
    pub warm: bool,
    /// Time from the request until the VM was ready for it.
    pub waited: Duration,
    /// Part of `waited` spent on the warm VM's Health round trip to its agent.
    pub health_check: Duration,
}

impl Lease {
    pub fn vm_id(&self) -> &str {
        self.vm.as_ref().map(|v| v.id()).unwrap_or("")
    }

    /// The VM's files and processes (usable while an execution runs).
    pub fn session(&self) -> Option<crate::channel::GuestSession> {
        self.vm.as_ref().map(|v| v.session())
    }

    /// The VM was restored from a snapshot (false: it booted).
    pub fn restored(&self) -> bool {
        self.vm.as_ref().is_some_and(|v| v.restored)
    }

    /// Pauses the VM and writes its snapshot (see [`ReadyVm::save`]) on the
    /// VM runtime; the VM runs on if that fails. Dropping the lease
    /// afterwards destroys the VM and frees its place;
    /// [`Pool::resume`] brings it back.
    pub async fn save(&mut self, state: PathBuf, mem: PathBuf) -> Result<(), ExecError> {
        let vm = self
            .vm
            .take()
            .ok_or_else(|| ExecError::Protocol("lease already used".into()))?;
        let task = self.inner.vm_rt.spawn(async move {
            let r = vm.save(&state, &mem).await;
            (vm, r)
        });
        let (vm, r) = match task.await {
            Ok(done) => done,
            Err(e) => {
                // The task's VM was dropped with it (killed): its place is free.
                self.inner.release_slot();
                return Err(ExecError::Vmm(crate::vmm::VmmError::Snapshot(format!(
                    "the snapshot task failed: {e}"
                ))));
            }
        };
        self.vm = Some(vm);
        r.map_err(ExecError::Vmm)
    }

    pub async fn execute(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn OutputSink,
    ) -> Result<ExecOutcome, ExecError> {
        match self.vm.as_mut() {
            Some(vm) => vm.execute(req, on_output).await,
            None => Err(ExecError::Protocol("lease already used".into())),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else { return };
        let inner = self.inner.clone();
        // The slot is freed only once the VM is really gone, so `max` bounds the
        // processes alive, not just the bookkeeping.
        let rt = inner.vm_rt.clone();
        // If that runtime is gone, the task is dropped unrun: ReadyVm's Drop
        // still kills the VM synchronously.
        rt.spawn(async move {
            vm.destroy().await;
            inner.release_slot();
        });
    }
}

/// A request's place in the queue, given back when it stops waiting.
/// A place in the queue of a full pool, and when it was taken.
struct QueueTicket(Arc<Inner>, Instant);

impl Drop for QueueTicket {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.queued = st.queued.saturating_sub(1);
        self.0.publish(&st);
        drop(st);
        self.0
            .metrics
            .pool_queue_wait_seconds
            .observe(self.1.elapsed().as_secs_f64());
    }
}

/// Aborts the task when dropped (a cancelled request stops its cold boot).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn refill_loop(inner: Arc<Inner>) {
    loop {
        let notified = inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (to_boot, dead) = {
            let mut st = inner.lock();
            if st.shutting_down {
                return;
            }
            // A warm VM whose VMM died is dropped here and replaced below.
            let mut dead = Vec::new();
            let mut keep = VecDeque::with_capacity(st.warm.len());
            while let Some(mut vm) = st.warm.pop_front() {
                match vm.check_exited() {
                    Some(how) => {
                        tracing::warn!(vm = vm.id(), "warm VM died ({how}); replacing it");
                        dead.push(vm);
                    }
                    None => keep.push_back(vm),
                }
            }
            st.warm = keep;
            // Still counted until destroyed: `max` bounds processes alive.
            st.active += dead.len();
            let n = if st.in_backoff() {
                0
            } else {
                let want = inner.cfg.warm.saturating_sub(st.warm.len() + st.booting);
                let room = inner.cfg.max.saturating_sub(st.total());
                let lanes = inner.cfg.parallel_boots.saturating_sub(st.booting);
                want.min(room).min(lanes)
            };
            st.booting += n;
            inner.publish(&st);
            (n, dead)
        };
        for vm in dead {
            vm.destroy().await;
            inner.release_slot();
        }
        for _ in 0..to_boot {
            tokio::spawn(boot_one(inner.clone()));
        }
        // Re-check on every change, and periodically for dead VMs and back-off expiry.
        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
    }
}

async fn boot_one(inner: Arc<Inner>) {
    let started = Instant::now();
    // One attempt: a failed background boot is replaced by the refiller
    // (subject to back-off), and no request is waiting on this one.
    let result = inner.sandbox.boot_attempt(inner.cfg.size, 0).await;
    let surplus = {
        let mut st = inner.lock();
        st.booting -= 1;
        let surplus = match result {
            Ok(vm) => {
                inner.record_boot(&mut st, Ok(started.elapsed()));
                if st.shutting_down {
                    // Still alive: counted until destroyed, so shutdown waits for it.
                    st.active += 1;
                    Some(vm)
                } else {
                    st.warm.push_back(vm);
                    None
                }
            }
            Err(e) => {
                inner.record_boot(&mut st, Err(&e));
                None
            }
        };
        inner.publish(&st);
        surplus
    };
    if let Some(vm) = surplus {
        vm.destroy().await;
        inner.release_slot();
    }
    inner.changed.notify_waiters();
}
