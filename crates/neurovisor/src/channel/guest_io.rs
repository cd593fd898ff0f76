//! Where the host code that reads guest bytes runs.
//!
//! The daemon runs everything that parses what a guest sends (the hybrid-vsock
//! handshake, the READY announcement, the HTTP/2 connection to the agent, the
//! prost decoding of Health and of the Execute stream) on a runtime of its
//! own, `nv-guest`, whose threads hold no capabilities and the narrowest
//! seccomp filter (`guest` in `security/seccomp.json`): a parser bug a
//! malicious guest can reach runs there, not next to CAP_SYS_ADMIN and
//! `execve`. [`GuestIo`] is the handle to that runtime; without one (the
//! single-process `neurovisor run`, tests) the same code runs inline on the
//! caller's runtime.
//!
//! Tasks started through [`GuestIo`] end when their caller goes away
//! ([`GuestTask`] aborts on drop), so dropping a lease or a timed-out
//! execution never leaves a guest reader behind.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
#[error("the guest I/O task ended without a result: {0}")]
pub struct GuestIoError(String);

/// The runtime guest bytes are read on: `nv-guest` in the daemon, else the
/// caller's own.
#[derive(Debug, Clone, Default)]
pub struct GuestIo(Option<Handle>);

impl GuestIo {
    /// Guest I/O runs on the caller's runtime.
    pub fn inline() -> Self {
        Self(None)
    }

    /// Guest I/O runs on `handle`'s runtime.
    pub fn on(handle: Handle) -> Self {
        Self(Some(handle))
    }

    /// True when guest I/O runs on a runtime of its own.
    pub fn is_separate(&self) -> bool {
        self.0.is_some()
    }

    /// Runs `fut` on the guest I/O runtime and waits for it; inline without
    /// one. Dropping the returned future aborts the task.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output, GuestIoError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            None => Ok(fut.await),
            Some(h) => GuestTask(h.spawn(fut)).join().await,
        }
    }

    /// Starts `fut` as a task on the guest I/O runtime (the caller's runtime
    /// without one); it is aborted when the returned [`GuestTask`] is dropped.
    pub fn spawn<F>(&self, fut: F) -> GuestTask<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        GuestTask(match &self.0 {
            None => tokio::spawn(fut),
            Some(h) => h.spawn(fut),
        })
    }
}

/// A task reading guest bytes; aborted when dropped.
#[derive(Debug)]
pub struct GuestTask<T>(JoinHandle<T>);

impl<T> GuestTask<T> {
    /// Waits for the task's result.
    pub async fn join(mut self) -> Result<T, GuestIoError> {
        (&mut self.0).await.map_err(|e| GuestIoError(e.to_string()))
    }
}

impl<T> Drop for GuestTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn tasks_run_on_the_guest_runtime_and_end_with_their_caller() {
        let guest = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nv-guest-test")
            .enable_all()
            .build()
            .expect("guest runtime");
        let caller = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("caller runtime");
        let io = GuestIo::on(guest.handle().clone());
        caller.block_on(async {
            let name = io
                .run(async { std::thread::current().name().map(str::to_string) })
                .await
                .expect("run");
            assert_eq!(name.as_deref(), Some("nv-guest-test"));
            // Dropped before it finishes: the task must not run on.
            let finished = Arc::new(AtomicBool::new(false));
            let f = finished.clone();
            let task = io.spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                f.store(true, Ordering::SeqCst);
            });
            drop(task);
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(!finished.load(Ordering::SeqCst), "an abandoned guest task ran on");
            // A timed-out `run` aborts its task the same way.
            let f = finished.clone();
            let r = tokio::time::timeout(
                Duration::from_millis(50),
                io.run(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    f.store(true, Ordering::SeqCst);
                }),
            )
            .await;
            assert!(r.is_err());
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert!(!finished.load(Ordering::SeqCst), "a timed-out guest task ran on");
            let inline = GuestIo::inline()
                .run(async { std::thread::current().name().map(str::to_string) })
                .await
                .expect("inline");
            assert_ne!(inline.as_deref(), Some("nv-guest-test"));
        });
    }
}
