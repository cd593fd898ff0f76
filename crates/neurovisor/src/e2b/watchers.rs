//! Directory watchers that clients poll (envd's `CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`, which the synchronous E2B SDK uses):
//! each is a guest watch stream drained into a bounded queue by a task. A
//! watcher ends with its sandbox (the stream ends) or at `RemoveWatcher`.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use neurovisor_proto::v1::FsEvent;
use tokio_stream::{Stream, StreamExt};
use tonic::Code;

/// Events a watcher keeps between polls (the oldest go first).
const MAX_QUEUED: usize = 10_000;
/// Watchers alive in the daemon at once.
const MAX_WATCHERS: usize = 256;

type Events = Pin<Box<dyn Stream<Item = Result<FsEvent, tonic::Status>> + Send>>;

struct Watcher {
    sandbox: String,
    queue: Arc<Mutex<VecDeque<FsEvent>>>,
    task: tokio::task::AbortHandle,
}

/// Every watcher of the E2B API (a handle: clones share them).
#[derive(Clone, Default)]
pub struct Watchers {
    all: Arc<Mutex<HashMap<String, Watcher>>>,
}

impl Watchers {
    /// Starts draining `events` (a guest watch, `started` first); its id.
    pub fn start(&self, sandbox: &str, mut events: Events) -> Result<String, (Code, String)> {
        let mut all = self
            .all
            .lock()
            .map_err(|_| (Code::Internal, "watchers poisoned".to_string()))?;
        if all.len() >= MAX_WATCHERS {
            return Err((
                Code::ResourceExhausted,
                format!("{MAX_WATCHERS} watchers exist, the most this daemon keeps; remove one"),
            ));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let (q, me, registry) = (queue.clone(), id.clone(), self.all.clone());
        let task = tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                if ev.started {
                    continue;
                }
                if let Ok(mut q) = q.lock() {
                    if q.len() >= MAX_QUEUED {
                        q.pop_front();
                    }
                    q.push_back(ev);
                }
            }
            // The sandbox (or its watch) is gone.
            if let Ok(mut all) = registry.lock() {
                all.remove(&me);
            }
        });
        all.insert(
            id.clone(),
            Watcher {
                sandbox: sandbox.to_string(),
                queue,
                task: task.abort_handle(),
            },
        );
        Ok(id)
    }

    fn with<T>(&self, sandbox: &str, id: &str, f: impl FnOnce(&Watcher) -> T) -> Result<T, (Code, String)> {
        let all = self
            .all
            .lock()
            .map_err(|_| (Code::Internal, "watchers poisoned".to_string()))?;
        match all.get(id) {
            // Another sandbox's watcher is as good as none.
            Some(w) if w.sandbox == sandbox => Ok(f(w)),
            _ => Err((
                Code::NotFound,
                format!("watcher {id} not found (removed, or its sandbox ended)"),
            )),
        }
    }

    /// The events since the last poll.
    pub fn take(&self, sandbox: &str, id: &str) -> Result<Vec<FsEvent>, (Code, String)> {
        self.with(sandbox, id, |w| {
            w.queue
                .lock()
                .map(|mut q| q.drain(..).collect())
                .unwrap_or_default()
        })
    }

    pub fn remove(&self, sandbox: &str, id: &str) -> Result<(), (Code, String)> {
        self.with(sandbox, id, |w| w.task.abort())?;
        if let Ok(mut all) = self.all.lock() {
            all.remove(id);
        }
        Ok(())
    }
}
