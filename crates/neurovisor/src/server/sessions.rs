//! `neurovisor.v1.Sandboxes`: sandboxes that live across calls.
//!
//! A sandbox is a [`Lease`] on one pool VM that is kept instead of dropped
//! after its first program: the VM is never handed to anyone else, and files
//! and installed software stay between its `Exec` calls. The table owns every
//! lease; a sandbox ends (its lease dropped, which destroys the VM) at `Kill`,
//! when its deadline passes (the reaper task), when a program leaves its VM in
//! an unknown state (a failed execution, not a program's own failure), or at
//! daemon shutdown ([`SandboxTable::kill_all`], before the pool drains). The
//! leases count against the pool's `max`, and the table has caps of its own
//! on live sandboxes and their memory.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use neurovisor_proto::v1::sandboxes_server::Sandboxes as SandboxesApi;
use neurovisor_proto::v1::{
    execute_response::Event, ContextAck, ContextInfo, ContextSelector, CreateContextRequest,
    CreateSandboxRequest, EntryInfo, ExecuteResponse, KillSandboxResponse, ListContextsRequest,
    ListContextsResponse, ListDirRequest, ListDirResponse, ListProcessesRequest, ListProcessesResponse,
    ListSandboxesRequest, ListSandboxesResponse, MoveRequest, PathRequest, ProcessAck, ProcessSelector,
    ReadFileRequest, RemoveResponse, ResizePtyRequest, ResumeSandboxRequest, RunCodeRequest,
    SandboxExecRequest, SandboxInfo, SandboxRef, SendInputRequest, SetSandboxTimeoutRequest,
    SignalProcessRequest, StartProcessRequest, WatchDirRequest, WriteFileRequest,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::session_io::{ChunkStream, CodeStream, EventStream, WatchStream};
use tracing::Instrument;

use super::sandbox::{
    pool_status, result_of, to_status, wire_of, InFlight, Outbox, OutboxStream, OutputBudget, Queued,
};
use super::trace::{trace_id_of, with_trace_id};
use crate::config::VmSize;
use crate::exec::{ExecError, ExecRequest, Output, OutputSink};
use crate::metrics::Metrics;
use crate::pool::{Lease, Pool};
use crate::vmm::VmmError;

/// A sandbox's life when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest life a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_METADATA: usize = 64;
const MAX_METADATA_KEY: usize = 256;
const MAX_METADATA_VALUE: usize = 4096;

/// Caps on what sandboxes may hold at once.
#[derive(Debug, Clone, Copy)]
pub struct SandboxLimits {
    /// Live sandboxes.
    pub max_sandboxes: usize,
    /// Guest memory of all live sandboxes together, MiB.
    pub max_memory_mib: u64,
}

/// Egress a Create asks for itself (beside its profile's).
#[derive(Debug, Default)]
struct Egress {
    network: bool,
    hosts: Vec<String>,
    cidrs: Vec<String>,
}

impl Egress {
    /// Its part of a pool's key: the same egress, the same pool.
    fn key(&self) -> String {
        let mut hosts = self.hosts.clone();
        hosts.sort();
        hosts.dedup();
        let mut cidrs = self.cidrs.clone();
        cidrs.sort();
        cidrs.dedup();
        format!("|net:{}|{}", hosts.join(","), cidrs.join(","))
    }
}

/// A paused sandbox's snapshot on disk.
#[derive(Clone)]
struct Paused {
    /// `state` and `mem` (see [`Lease::save`]); removed with the sandbox.
    dir: PathBuf,
    /// What was left of its timeout.
    left: Duration,
}

pub(super) struct Session {
    id: String,
    /// The pool its VMs come from: the daemon's, or the on-demand one of its
    /// own image and size.
    pool: Pool,
    /// Its current VM (a resumed sandbox has a new one).
    vm_id: std::sync::Mutex<String>,
    started_at: SystemTime,
    /// (monotonic deadline, the same as wall time for clients, the timeout
    /// it was set from).
    deadline: std::sync::Mutex<(Instant, SystemTime, Duration)>,
    /// Its timeout pauses it instead of killing it.
    pause_at_timeout: bool,
    /// A call that needs its VM resumes it while it is paused.
    auto_resume: bool,
    metadata: HashMap<String, String>,
    pub(super) env: BTreeMap<String, String>,
    restored: bool,
    executions: AtomicU64,
    /// `None` once killed or while paused. Held by the one `Exec` running,
    /// and by a pause or resume in progress.
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// `Some` while paused.
    paused: std::sync::Mutex<Option<Paused>>,
    /// Cancelled when the sandbox ends: a running `Exec` lets go of the lease.
    pub(super) killed: CancellationToken,
    /// Its files and processes (on the VM's connection; calls fail once the
    /// VM is gone). `None` while paused.
    guest: std::sync::Mutex<Option<crate::channel::GuestSession>>,
    /// See [`SandboxTable::access_token`].
    access_token: String,
    /// Its inference bridge (`llm_bridge`): its trace id, and the task
    /// serving its current VM (none while paused).
    bridge: Option<(String, std::sync::Mutex<Option<crate::llm::bridge::BridgeTask>>)>,
    /// Its desktop, when its image has one (started at create; its
    /// processes go on across pause and resume).
    desktop: Option<Arc<crate::desktop::Desktop>>,
}

impl Session {
    /// Its image (what its programs are checked against).
    pub(super) fn images(&self) -> &crate::images::ImageSet {
        self.pool.sandbox().images()
    }

    fn size(&self) -> VmSize {
        self.pool.config().size
    }

    fn is_paused(&self) -> bool {
        self.paused.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Starts its bridge on its current VM, if it has one.
    async fn start_bridge(&self) -> Result<(), Status> {
        let (Some((trace_id, task)), Some(b)) = (&self.bridge, self.pool.sandbox().llm_bridge.as_ref())
        else {
            return Ok(());
        };
        let guest = self.guest()?;
        let started = b
            .start(guest, trace_id.clone())
            .await
            .map_err(|e| Status::unavailable(format!("the inference bridge did not start: {e}")))?;
        if let Ok(mut t) = task.lock() {
            *t = Some(started);
        }
        Ok(())
    }

    fn stop_bridge(&self) {
        if let Some((_, task)) = &self.bridge {
            if let Ok(mut t) = task.lock() {
                t.take();
            }
        }
    }

    /// Its deadline is `timeout` from now.
    fn set_deadline(&self, timeout: Duration) {
        let now = (Instant::now(), SystemTime::now());
        if let Ok(mut d) = self.deadline.lock() {
            *d = (now.0 + timeout, now.1 + timeout, timeout);
        }
    }

    /// The agent's services of its VM; FAILED_PRECONDITION while paused.
    pub(super) fn guest(&self) -> Result<crate::channel::GuestSession, Status> {
        let g = self.guest.lock().ok().and_then(|g| g.clone());
        g.ok_or_else(|| {
            Status::failed_precondition(format!(
                "sandbox {} is paused; resume it first (Resume, `neurovisor sandbox resume`, or E2B's connect)",
                self.id
            ))
        })
    }
}

/// 32 random bytes as hex.
fn random_token() -> String {
    let mut b = [0u8; 32];
    // The kernel's CSPRNG; it does not fail after boot.
    if getrandom::getrandom(&mut b).is_err() {
        // Two v4 UUIDs come from the same source through another path.
        return format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Table {
    pool: Pool,
    /// On-demand pools of sandboxes created with another image, size or
    /// profile (key: image, size, profile name or ""), made at their first
    /// sandbox, shut down with the daemon.
    others: std::sync::Mutex<HashMap<(String, &'static str, String), Pool>>,
    /// Sandbox profiles a Create may name (the daemon's built-in and user's).
    profiles: crate::profile::ProfileStore,
    limits: SandboxLimits,
    metrics: Arc<Metrics>,
    budget: OutputBudget,
    stall_timeout: Duration,
    sessions: std::sync::Mutex<HashMap<String, Arc<Session>>>,
    /// Sandboxes being created and their guest memory, MiB (counted
    /// against the caps).
    creating: std::sync::Mutex<(usize, u64)>,
    /// A deadline changed or a sandbox came or went: the reaper looks again.
    changed: tokio::sync::Notify,
    /// The daemon is stopping: the reaper ends.
    stopped: CancellationToken,
    /// Where paused sandboxes' snapshots are kept (one directory each).
    paused_dir: PathBuf,
    /// The desktop viewer's base URL (`serve --desktop-listen`), once bound.
    desktop_url: std::sync::OnceLock<String>,
}

/// Every live sandbox of the daemon (a handle: clones share it).
#[derive(Clone)]
pub struct SandboxTable {
    inner: Arc<Table>,
}

/// A place counted against the caps while a sandbox is created: (table,
/// its memory in MiB).
struct Reservation<'a>(&'a Table, u64);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.creating.lock() {
            n.0 = n.0.saturating_sub(1);
            n.1 = n.1.saturating_sub(self.1);
        }
    }
}

impl SandboxTable {
    /// The table and its reaper (a task on the current runtime that kills
    /// sandboxes whose deadline has passed).
    /// `paused_dir` holds paused sandboxes' snapshots (the daemon empties it
    /// when it starts: no sandbox outlives its daemon).
    pub fn start(
        pool: Pool,
        limits: SandboxLimits,
        metrics: Arc<Metrics>,
        budget: OutputBudget,
        paused_dir: PathBuf,
        profiles: crate::profile::ProfileStore,
    ) -> Self {
        let t = Self {
            inner: Arc::new(Table {
                pool,
                others: std::sync::Mutex::new(HashMap::new()),
                profiles,
                limits,
                metrics,
                budget,
                stall_timeout: super::sandbox::DEFAULT_STALL_TIMEOUT,
                sessions: std::sync::Mutex::new(HashMap::new()),
                creating: std::sync::Mutex::new((0, 0)),
                changed: tokio::sync::Notify::new(),
                stopped: CancellationToken::new(),
                paused_dir,
                desktop_url: std::sync::OnceLock::new(),
            }),
        };
        tokio::spawn(reap(t.inner.clone()));
        t
    }

    pub(super) fn get(&self, id: &str) -> Result<Arc<Session>, Status> {
        self.inner
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(id).cloned())
            .ok_or_else(|| missing(id))
    }

    fn info(&self, s: &Session) -> SandboxInfo {
        let size = s.size();
        let end = s.deadline.lock().map(|d| d.1).unwrap_or(s.started_at);
        let paused = s.is_paused();
        SandboxInfo {
            sandbox_id: s.id.clone(),
            vm_id: s.vm_id.lock().map(|v| v.clone()).unwrap_or_default(),
            started_at_ms: unix_ms(s.started_at),
            end_at_ms: if paused { 0 } else { unix_ms(end) },
            paused,
            on_timeout: if s.pause_at_timeout { "pause" } else { "kill" }.into(),
            auto_resume: s.auto_resume,
            llm_bridge: s.bridge.is_some(),
            metadata: s.metadata.clone(),
            memory_mib: size.memory_mib(),
            vcpus: size.vcpus(),
            image: s.images().name.clone(),
            restored: s.restored,
            executions: s.executions.load(Ordering::Relaxed),
            desktop: s
                .desktop
                .as_ref()
                .map(|d| format!("{}x{}", d.width, d.height))
                .unwrap_or_default(),
        }
    }

    /// Live sandboxes.
    pub fn len(&self) -> usize {
        self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn reserve(&self, size: VmSize) -> Result<Reservation<'_>, Status> {
        let t = &*self.inner;
        let (live, live_mib) = t
            .sessions
            .lock()
            .map(|s| {
                let mib: u64 = s.values().map(|s| u64::from(s.size().memory_mib())).sum();
                (s.len(), mib)
            })
            .unwrap_or((0, 0));
        let mut creating = t
            .creating
            .lock()
            .map_err(|_| Status::internal("sandbox table poisoned"))?;
        let n = live + creating.0;
        let used = live_mib + creating.1;
        let per_vm = u64::from(size.memory_mib());
        if n >= t.limits.max_sandboxes {
            return Err(Status::resource_exhausted(format!(
                "{n} sandboxes are live, the most this daemon allows (--max-sandboxes {}); kill one first",
                t.limits.max_sandboxes
            )));
        }
        if used + per_vm > t.limits.max_memory_mib {
            return Err(Status::resource_exhausted(format!(
                "another sandbox of {per_vm} MiB would take live sandboxes ({used} MiB) past {} MiB (--max-sandbox-memory); kill one first",
                t.limits.max_memory_mib
            )));
        }
        creating.0 += 1;
        creating.1 += per_vm;
        Ok(Reservation(t, per_vm))
    }

    /// A profile named by a Create, compiled (a name: the daemon's profiles,
    /// never a client's file).
    fn profile(&self, name: &str) -> Result<Option<crate::profile::Profile>, Status> {
        if name.is_empty() {
            return Ok(None);
        }
        let ok = name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !name.starts_with('-');
        if !ok {
            return Err(Status::invalid_argument(format!(
                "profile: '{}' is not a profile name (letters, digits, - and _); `neurovisor profile list` on the daemon's host shows them",
                name.chars().take(40).collect::<String>()
            )));
        }
        self.inner
            .profiles
            .load(name)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("profile: {e}")))
    }

    /// Whether the daemon has a profile called `name` (E2B template names).
    pub(crate) fn has_profile(&self, name: &str) -> bool {
        matches!(self.profile(name), Ok(Some(_)))
    }

    /// The pool a request naming `profile` (empty: none), `image` and `size`
    /// (empty: the profile's, else the daemon's) takes its VM from, and the
    /// profile, loaded. Sandboxes and one-shot executions of one profile share
    /// that pool.
    pub(crate) fn pool_for(
        &self,
        profile: &str,
        image: &str,
        size: &str,
    ) -> Result<(Pool, Option<crate::profile::Profile>), Status> {
        self.pool_with_egress(profile, image, size, &Egress::default())
    }

    /// [`Self::pool_for`] with egress of the request's own on top of the
    /// profile's.
    fn pool_with_egress(
        &self,
        profile: &str,
        image: &str,
        size: &str,
        own: &Egress,
    ) -> Result<(Pool, Option<crate::profile::Profile>), Status> {
        let profile = self.profile(profile)?;
        let (image, size) = match &profile {
            Some(p) => (
                if image.is_empty() { p.image.as_str() } else { image }.to_string(),
                match (size, p.size) {
                    (s, _) if !s.is_empty() => s.to_string(),
                    (_, Some(s)) => s.name().to_string(),
                    _ => String::new(),
                },
            ),
            None => (image.to_string(), size.to_string()),
        };
        let pool = self.pool_of(&image, &size, profile.as_ref(), own)?;
        Ok((pool, profile))
    }

    /// The pool of sandboxes of `image` and `size` (empty: the daemon's) and
    /// `profile` (its egress, when it names any): the daemon's own, or an
    /// on-demand one made now. An image that is not built is
    /// INVALID_ARGUMENT with the command that builds it.
    fn pool_of(
        &self,
        image: &str,
        size: &str,
        profile: Option<&crate::profile::Profile>,
        own: &Egress,
    ) -> Result<Pool, Status> {
        let t = &*self.inner;
        let main = &t.pool;
        let size = match size {
            "" => main.config().size,
            "small" => VmSize::Small,
            "medium" => VmSize::Medium,
            "large" => VmSize::Large,
            other => {
                return Err(Status::invalid_argument(format!(
                    "size: '{}' is not a size; use small (1 vCPU, 256 MiB), medium (2, 512 MiB) or large (4, 1024 MiB)",
                    other.chars().take(40).collect::<String>()
                )))
            }
        };
        let main_image = &main.sandbox().images().name;
        let image = if image.is_empty() {
            main_image.as_str()
        } else {
            image
        };
        if own.hosts.len() > 64 || own.cidrs.len() > 64 {
            return Err(Status::invalid_argument(
                "allow_hosts/allow_cidrs: at most 64 each; use *.example.com for a domain's subdomains",
            ));
        }
        let asks_egress = !own.hosts.is_empty() || !own.cidrs.is_empty();
        if asks_egress && !own.network {
            return Err(Status::invalid_argument(
                "allow_hosts/allow_cidrs need network: set it (`sandbox create --network --allow-host NAME`)",
            ));
        }
        let profile_egress = profile.filter(|p| !p.egress.is_empty());
        let network = if own.network || profile_egress.is_some() {
            let Some(net) = main.sandbox().network.as_ref() else {
                return Err(Status::failed_precondition(match profile_egress {
                    Some(p) => format!(
                        "profile {}: it allows egress, but this daemon gives VMs no network; start it with --network",
                        p.name
                    ),
                    None => "network: this daemon gives VMs no network; start it with --network".into(),
                }));
            };
            let mut hosts = own.hosts.clone();
            let mut cidrs = own.cidrs.clone();
            if let Some(p) = profile_egress {
                hosts.extend(p.egress.domains.iter().cloned());
                cidrs.extend(p.egress.cidrs.iter().cloned());
            }
            let policy =
                crate::net::EgressPolicy::new(&hosts, &cidrs, net.policy.bandwidth).map_err(|e| {
                    Status::invalid_argument(match profile_egress {
                        Some(p) => format!("profile {}: {e}", p.name),
                        None => e.to_string(),
                    })
                })?;
            Some(Arc::new(crate::net::NetSettings {
                policy,
                upstream: net.upstream.clone(),
                program: net.program.clone(),
            }))
        } else {
            None
        };
        let mut profile_key = profile.map(|p| p.name.clone()).unwrap_or_default();
        if own.network {
            profile_key.push_str(&own.key());
        }
        if image == main_image && size == main.config().size && profile.is_none() && !own.network {
            return Ok(main.clone());
        }
        let valid = !image.is_empty()
            && image.len() <= 64
            && image
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_+".contains(&b))
            && !image.starts_with(['-', '_', '+']);
        if !valid {
            return Err(Status::invalid_argument(format!(
                "image: '{}' is not an image name (lower-case letters, digits, -, _ and a profile's +); `neurovisor images list` shows the built ones",
                image.chars().take(40).collect::<String>()
            )));
        }
        let mut others = t
            .others
            .lock()
            .map_err(|_| Status::internal("sandbox table poisoned"))?;
        let key = (image.to_string(), size.name(), profile_key);
        if let Some(p) = others.get(&key) {
            return Ok(p.clone());
        }
        let images = crate::images::ImageSet::resolve(&crate::images::ImageSelection {
            image: Some(image.to_string()),
            kernel: Some(main.sandbox().images().kernel.clone()),
            rootfs: None,
        })
        .map_err(|e| Status::invalid_argument(format!("image: {e}")))?;
        let pool = main
            .sibling(images, size, t.limits.max_sandboxes.max(1), network)
            .map_err(Status::internal)?;
        tracing::info!(
            image,
            size = size.name(),
            profile = %key.2,
            "a pool for sandboxes of this image, size and profile"
        );
        others.insert(key, pool.clone());
        Ok(pool)
    }

    pub(crate) async fn create(&self, r: CreateSandboxRequest) -> Result<SandboxInfo, Status> {
        let timeout = timeout_of(r.timeout_s)?;
        check_metadata(&r.metadata)?;
        let own = Egress {
            network: r.network,
            hosts: r.allow_hosts,
            cidrs: r.allow_cidrs,
        };
        let (pool, profile) = self.pool_with_egress(&r.profile, &r.image, &r.size, &own)?;
        // The profile's environment under the request's own.
        let mut env: BTreeMap<String, String> = profile
            .as_ref()
            .map(|p| p.env.clone().into_iter().collect())
            .unwrap_or_default();
        env.extend(r.env);
        if r.llm_bridge && pool.sandbox().llm_bridge.is_none() {
            return Err(Status::invalid_argument(
                "llm_bridge: this daemon has no inference bridge; start it with --llm-bridge (the LLM server: --llm-bridge-url or --ollama-host)",
            ));
        }
        let pause_at_timeout = match r.on_timeout.as_str() {
            "" | "kill" => false,
            "pause" if pool.sandbox().can_pause() => true,
            "pause" => return Err(Status::failed_precondition(
                "on_timeout \"pause\": this daemon cannot pause sandboxes (QEMU pauses only VMs restored \
                     from a snapshot: start it with --snapshot); use on_timeout \"kill\"",
            )),
            other => {
                return Err(Status::invalid_argument(format!(
                    "on_timeout: \"{other}\" is not an action; use \"kill\" or \"pause\""
                )))
            }
        };
        // The same checks as every request's environment, before a VM is taken.
        let mut probe = ExecRequest::new("bash", "true");
        probe.env = env.clone();
        probe.validate(pool.sandbox().images()).map_err(to_status)?;
        let _place = self.reserve(pool.config().size)?;
        let lease = pool.acquire().await.map_err(pool_status)?;
        let guest = lease
            .session()
            .ok_or_else(|| Status::internal("the pool handed out a lease without a VM"))?;
        // A desktop image's session starts now; its VM goes with the lease
        // if it does not come up.
        let desktop = match &pool.sandbox().images().desktop {
            Some(spec) => {
                let d = crate::desktop::Desktop::start(&guest, spec, random_token(), random_token())
                    .await
                    .map_err(|e| desktop_status(&e))?;
                tracing::info!(vm = %lease.vm_id(), ready_ms = d.ready_after.as_millis() as u64, "desktop ready");
                Some(Arc::new(d))
            }
            None => None,
        };
        let now = (Instant::now(), SystemTime::now());
        let id = uuid::Uuid::now_v7();
        let session = Arc::new(Session {
            id: id.simple().to_string(),
            bridge: r
                .llm_bridge
                .then(|| (id.to_string(), std::sync::Mutex::new(None))),
            pool,
            vm_id: std::sync::Mutex::new(lease.vm_id().to_string()),
            started_at: now.1,
            deadline: std::sync::Mutex::new((now.0 + timeout, now.1 + timeout, timeout)),
            pause_at_timeout,
            auto_resume: r.auto_resume,
            metadata: r.metadata,
            env,
            restored: lease.restored(),
            executions: AtomicU64::new(0),
            lease: tokio::sync::Mutex::new(Some(lease)),
            paused: std::sync::Mutex::new(None),
            killed: CancellationToken::new(),
            guest: std::sync::Mutex::new(Some(guest)),
            access_token: random_token(),
            desktop,
        });
        // Its VM is dropped with the session if the bridge does not start.
        session.start_bridge().await?;
        let info = self.info(&session);
        if let Ok(mut s) = self.inner.sessions.lock() {
            s.insert(session.id.clone(), session.clone());
        }
        self.inner.metrics.sandboxes.inc();
        self.inner.changed.notify_waiters();
        tracing::info!(sandbox = %session.id, vm = %lease_vm(&session), ?timeout, "sandbox created");
        Ok(info)
    }

    /// One sandbox as clients see it; NOT_FOUND if it is not live.
    pub(crate) fn info_of(&self, id: &str) -> Result<SandboxInfo, Status> {
        self.get(id).map(|s| self.info(&s))
    }

    /// Every live sandbox, oldest first.
    pub(crate) fn infos(&self) -> Vec<SandboxInfo> {
        let all: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        let mut v: Vec<SandboxInfo> = all.iter().map(|s| self.info(s)).collect();
        v.sort_by_key(|s| (s.started_at_ms, s.sandbox_id.clone()));
        v
    }

    /// The secret a client must show for sandbox `id`'s files and processes
    /// over HTTP (E2B's `envdAccessToken`).
    pub(crate) fn access_token(&self, id: &str) -> Option<String> {
        self.get(id).ok().map(|s| s.access_token.clone())
    }

    /// Kills sandbox `id` for a client; `false` if it was not live.
    pub(crate) async fn kill_for_client(&self, id: &str) -> bool {
        self.kill(id, Ending::Killed, "killed by a client").await
    }

    /// Ends sandbox `id`: its VM is destroyed. `false` if there was none.
    async fn kill(&self, id: &str, how: Ending, why: &str) -> bool {
        let session = self.inner.sessions.lock().ok().and_then(|mut s| s.remove(id));
        let Some(session) = session else { return false };
        self.inner.changed.notify_waiters();
        end(&self.inner, &session, how, why).await;
        true
    }

    /// Ends every sandbox and the reaper (daemon shutdown), before the pool drains.
    pub async fn kill_all(&self) {
        self.inner.stopped.cancel();
        let all: Vec<Arc<Session>> = self
            .inner
            .sessions
            .lock()
            .map(|mut s| s.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for s in all {
            end(&self.inner, &s, Ending::Shutdown, "the daemon is stopping").await;
        }
        let others: Vec<Pool> = self
            .inner
            .others
            .lock()
            .map(|mut o| o.drain().map(|(_, p)| p).collect())
            .unwrap_or_default();
        for p in others {
            p.shutdown(Duration::from_secs(10)).await;
        }
    }

    /// Whether sandbox `id` is paused (NOT_FOUND if it is not live).
    pub(crate) fn is_paused(&self, id: &str) -> Result<bool, Status> {
        self.get(id).map(|s| s.is_paused())
    }

    /// Pauses sandbox `id`: its VM's snapshot goes to disk and the VM is
    /// destroyed (see the `Pause` call in sandbox.proto).
    pub(crate) async fn pause(&self, id: &str) -> Result<SandboxInfo, Status> {
        let s = self.get(id)?;
        pause_session(&self.inner, &s, None).await?;
        Ok(self.info(&s))
    }

    /// Resumes paused sandbox `id` in a VM restored from its snapshot; its
    /// timeout is `timeout_s` from now, or what was left of it (0).
    pub(crate) async fn resume(&self, id: &str, timeout_s: u32) -> Result<SandboxInfo, Status> {
        let asked = (timeout_s > 0).then(|| timeout_of(timeout_s)).transpose()?;
        let s = self.get(id)?;
        resume_session(&self.inner, &s, asked, false).await?;
        Ok(self.info(&s))
    }

    /// Sandbox `id` for a call that needs its VM: a paused sandbox created
    /// with `auto_resume` is resumed first (the others are refused by
    /// [`Session::guest`]).
    pub(super) async fn awake(&self, id: &str) -> Result<Arc<Session>, Status> {
        let s = self.get(id)?;
        if s.auto_resume && s.is_paused() {
            resume_session(&self.inner, &s, None, true).await?;
        }
        Ok(s)
    }

    /// Sets where the desktop viewer is served (`http://host:port`).
    pub(crate) fn set_desktop_url(&self, base: String) {
        let _ = self.inner.desktop_url.set(base);
    }

    /// Sandbox `id`'s desktop, its guest and its end (for a viewer).
    pub(crate) fn desktop_of(
        &self,
        id: &str,
    ) -> Result<
        (
            Arc<crate::desktop::Desktop>,
            crate::channel::GuestSession,
            CancellationToken,
        ),
        Status,
    > {
        let s = self.get(id)?;
        let d = desktop_in(&s)?;
        Ok((d, s.guest()?, s.killed.clone()))
    }

    pub(crate) async fn screenshot(
        &self,
        id: &str,
    ) -> Result<neurovisor_proto::v1::DesktopScreenshot, Status> {
        let s = self.awake(id).await?;
        let d = desktop_in(&s)?;
        let (png, width, height) = d.screenshot(&s.guest()?).await.map_err(|e| desktop_status(&e))?;
        Ok(neurovisor_proto::v1::DesktopScreenshot {
            png: png.into(),
            width,
            height,
        })
    }

    pub(crate) async fn desktop_action(
        &self,
        r: neurovisor_proto::v1::DesktopActionRequest,
    ) -> Result<(), Status> {
        let s = self.get(&r.sandbox_id)?;
        let d = desktop_in(&s)?;
        // Checked before the VM is touched (a paused one stays paused).
        let action =
            crate::desktop::Action::from_wire(r, d.width, d.height).map_err(|e| desktop_status(&e))?;
        let s = self.awake(&s.id).await?;
        d.act(&s.guest()?, &action).await.map_err(|e| desktop_status(&e))
    }

    pub(crate) fn desktop_view(
        &self,
        id: &str,
        view_only: bool,
    ) -> Result<neurovisor_proto::v1::DesktopViewInfo, Status> {
        let s = self.get(id)?;
        let d = desktop_in(&s)?;
        let base = self.inner.desktop_url.get().ok_or_else(|| {
            Status::failed_precondition(
                "this daemon serves no desktop viewer; start it with --desktop-listen 127.0.0.1:6080",
            )
        })?;
        let mode = if view_only {
            crate::desktop::ViewMode::ViewOnly
        } else {
            crate::desktop::ViewMode::Interactive
        };
        Ok(neurovisor_proto::v1::DesktopViewInfo {
            url: crate::desktop::web::viewer_url(base, &s.id, d.token(mode), view_only),
            view_only,
            width: d.width,
            height: d.height,
        })
    }

    pub(crate) fn set_timeout(&self, id: &str, timeout_s: u32) -> Result<SandboxInfo, Status> {
        let timeout = timeout_of(timeout_s)?;
        let s = self.get(id)?;
        if s.is_paused() {
            return Err(Status::failed_precondition(format!(
                "sandbox {id} is paused and does not expire; give the timeout when you resume it"
            )));
        }
        s.set_deadline(timeout);
        self.inner.changed.notify_waiters();
        Ok(self.info(&s))
    }
}

fn desktop_in(s: &Session) -> Result<Arc<crate::desktop::Desktop>, Status> {
    s.desktop.clone().ok_or_else(|| {
        Status::failed_precondition(format!(
            "sandbox {} has no desktop (its image is {}); create one with image \"desktop\" (`neurovisor images build --image desktop`)",
            s.id,
            s.images().name
        ))
    })
}

fn desktop_status(e: &crate::desktop::DesktopError) -> Status {
    Status::new(e.code(), e.to_string())
}

/// Why a sandbox ended (the `reason` of `neurovisor_sandboxes_ended_total`).
#[derive(Debug, Clone, Copy)]
enum Ending {
    Killed,
    Expired,
    Failed,
    Shutdown,
}

impl Ending {
    fn label(self) -> &'static str {
        match self {
            Self::Killed => "killed",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Shutdown => "shutdown",
        }
    }
}

fn lease_vm(s: &Session) -> String {
    s.vm_id.lock().map(|v| v.clone()).unwrap_or_default()
}

/// Pauses `s` (see `SandboxTable::pause`). A client's pause is refused
/// while an `Exec` holds the VM; the timeout's (`at_timeout`: the timeout it
/// resumes with) waits for it.
async fn pause_session(t: &Table, s: &Session, at_timeout: Option<Duration>) -> Result<(), Status> {
    let id = &s.id;
    let mut guard = match at_timeout {
        Some(_) => tokio::select! {
            g = s.lease.lock() => g,
            _ = s.killed.cancelled() => return Err(Status::aborted(format!("sandbox {id} was killed"))),
        },
        None => s.lease.try_lock().map_err(|_| {
            Status::failed_precondition(format!(
                "sandbox {id} is running a program (Exec) or being paused or resumed; pause it once that is done"
            ))
        })?,
    };
    if s.is_paused() {
        return Err(Status::failed_precondition(format!(
            "sandbox {id} is already paused"
        )));
    }
    let Some(lease) = guard.as_mut() else {
        return Err(Status::not_found(format!("no sandbox '{id}' (it was killed)")));
    };
    let dir = t.paused_dir.join(id);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
    let started = Instant::now();
    let saved = tokio::select! {
        r = lease.save(dir.join("state"), dir.join("mem")) => r,
        _ = s.killed.cancelled() => Err(ExecError::Protocol("killed".into())),
    };
    if let Err(e) = saved {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(match e {
            ExecError::Vmm(VmmError::Unsupported(why)) => {
                Status::failed_precondition(format!("sandbox {id} cannot be paused: {why}"))
            }
            e => Status::unavailable(format!("sandbox {id} was not paused: {e}; it runs on")),
        });
    }
    let left = match at_timeout {
        Some(t) => t,
        None => s
            .deadline
            .lock()
            .map(|d| d.0.saturating_duration_since(Instant::now()))
            .unwrap_or(DEFAULT_TIMEOUT)
            .max(Duration::from_secs(1)),
    };
    s.stop_bridge();
    if let Ok(mut g) = s.guest.lock() {
        *g = None;
    }
    if let Ok(mut p) = s.paused.lock() {
        *p = Some(Paused { dir, left });
    }
    // Destroys the VM and frees its place in the pool.
    drop(guard.take());
    t.changed.notify_waiters();
    tracing::info!(sandbox = %id, took_ms = started.elapsed().as_millis() as u64, at_timeout = at_timeout.is_some(), "sandbox paused");
    Ok(())
}

/// Resumes paused `s` with timeout `asked` (`None`: what it had left).
/// `if_paused`: a sandbox that is running already (another call resumed
/// it) is not an error.
async fn resume_session(
    t: &Table,
    s: &Session,
    asked: Option<Duration>,
    if_paused: bool,
) -> Result<(), Status> {
    let id = &s.id;
    // Waits for a pause in progress.
    let mut guard = s.lease.lock().await;
    let Some(p) = s.paused.lock().ok().and_then(|p| p.clone()) else {
        if if_paused {
            return Ok(());
        }
        return Err(Status::failed_precondition(format!(
            "sandbox {id} is running, not paused"
        )));
    };
    let started = Instant::now();
    let lease = tokio::select! {
        r = s.pool.resume(p.dir.join("state"), p.dir.join("mem")) => r,
        _ = s.killed.cancelled() => return Err(Status::aborted(format!("sandbox {id} was killed"))),
    }
    .map_err(|e| {
        let st = pool_status(e);
        Status::new(st.code(), format!("{}; sandbox {id} stays paused", st.message()))
    })?;
    if let Ok(mut v) = s.vm_id.lock() {
        *v = lease.vm_id().to_string();
    }
    if let Ok(mut g) = s.guest.lock() {
        *g = lease.session();
    }
    s.set_deadline(asked.unwrap_or(p.left));
    *guard = Some(lease);
    if let Ok(mut p) = s.paused.lock() {
        *p = None;
    }
    drop(guard);
    if let Err(e) = s.start_bridge().await {
        tracing::warn!(sandbox = %id, "{}", e.message());
    }
    let _ = std::fs::remove_dir_all(&p.dir);
    t.changed.notify_waiters();
    tracing::info!(sandbox = %id, vm = %lease_vm(s), took_ms = started.elapsed().as_millis() as u64, "sandbox resumed");
    Ok(())
}

/// Drops the session's lease (destroying its VM) after any running `Exec`,
/// pause or resume has let go of it, or removes its snapshot if paused.
async fn end(t: &Table, s: &Session, how: Ending, why: &str) {
    s.killed.cancel();
    s.stop_bridge();
    let mut guard = s.lease.lock().await;
    let lease = guard.take();
    let paused = s.paused.lock().ok().and_then(|mut p| p.take());
    if lease.is_some() || paused.is_some() {
        tracing::info!(sandbox = %s.id, vm = %lease_vm(s), paused = paused.is_some(), reason = how.label(), "sandbox ended: {why}");
        t.metrics.sandboxes.dec();
        t.metrics
            .sandboxes_ended
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: crate::metrics::Label::fixed(how.label()),
            })
            .inc();
    }
    drop(lease);
    if let Some(p) = paused {
        if let Err(e) = std::fs::remove_dir_all(&p.dir) {
            tracing::warn!(sandbox = %s.id, "could not remove the paused sandbox's snapshot {}: {e}", p.dir.display());
        }
    }
    drop(guard);
}

/// Kills sandboxes whose deadline has passed, until the daemon stops.
async fn reap(t: Arc<Table>) {
    loop {
        // Registered before the table is read: no change is missed.
        let changed = t.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = Instant::now();
        let (expired, to_pause, next) = match t.sessions.lock() {
            Ok(mut map) => {
                let due =
                    |s: &Session| !s.is_paused() && s.deadline.lock().map(|d| d.0 <= now).unwrap_or(true);
                let ids: Vec<String> = map
                    .iter()
                    .filter(|(_, s)| due(s) && !s.pause_at_timeout)
                    .map(|(k, _)| k.clone())
                    .collect();
                let expired: Vec<Arc<Session>> = ids.iter().filter_map(|id| map.remove(id)).collect();
                let to_pause: Vec<Arc<Session>> = map.values().filter(|s| due(s)).cloned().collect();
                for s in &to_pause {
                    // Not due again while its pause runs; a pause that fails
                    // ends it.
                    if let Ok(mut d) = s.deadline.lock() {
                        d.0 = now + MAX_TIMEOUT;
                    }
                }
                let next = map
                    .values()
                    .filter(|s| !s.is_paused())
                    .filter_map(|s| s.deadline.lock().ok().map(|d| d.0))
                    .min();
                (expired, to_pause, next)
            }
            Err(_) => return,
        };
        for s in expired {
            end(&t, &s, Ending::Expired, "its timeout passed").await;
        }
        for s in to_pause {
            let t = t.clone();
            tokio::spawn(async move {
                let timeout = s.deadline.lock().map(|d| d.2).unwrap_or(DEFAULT_TIMEOUT);
                if let Err(e) = pause_session(&t, &s, Some(timeout)).await {
                    if s.killed.is_cancelled() {
                        return;
                    }
                    let gone = t.sessions.lock().ok().and_then(|mut m| m.remove(&s.id));
                    if gone.is_some() {
                        t.changed.notify_waiters();
                        end(
                            &t,
                            &s,
                            Ending::Expired,
                            &format!("its timeout passed and it could not be paused: {}", e.message()),
                        )
                        .await;
                    }
                }
            });
        }
        let wait = next
            .map(|n| n.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = t.stopped.cancelled() => return,
            _ = changed => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn timeout_of(secs: u32) -> Result<Duration, Status> {
    let d = if secs == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_secs(u64::from(secs))
    };
    if d > MAX_TIMEOUT {
        return Err(Status::invalid_argument(format!(
            "timeout_s: {secs} s is longer than the most a sandbox may live ({} s); ask for less and extend it with SetTimeout",
            MAX_TIMEOUT.as_secs()
        )));
    }
    Ok(d)
}

fn check_metadata(m: &HashMap<String, String>) -> Result<(), Status> {
    if m.len() > MAX_METADATA {
        return Err(Status::invalid_argument(format!(
            "metadata: {} entries, at most {MAX_METADATA} allowed",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
            return Err(Status::invalid_argument(format!(
                "metadata: key '{}' must be 1-{MAX_METADATA_KEY} bytes and its value at most {MAX_METADATA_VALUE} bytes",
                k.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Output of a sandbox's program on its way to the client. A client that
/// left or stopped reading loses the rest (the program runs on and the
/// sandbox stays); the budget bounds what waits for slow readers.
struct ExecSink {
    tx: mpsc::Sender<Queued>,
    budget: OutputBudget,
    stall_timeout: Duration,
    outbox: Arc<Outbox>,
    dropped: bool,
}

#[tonic::async_trait]
impl OutputSink for ExecSink {
    async fn write(&mut self, o: Output<'_>) {
        if self.dropped {
            return;
        }
        let ev = match o {
            Output::Stdout(b) => Event::Stdout(b.to_vec().into()),
            Output::Stderr(b) => Event::Stderr(b.to_vec().into()),
        };
        let queue = async {
            let room = self.budget.reserve(o.len()).await;
            self.tx
                .send(Queued {
                    msg: Ok(ExecuteResponse { event: Some(ev) }),
                    _room: room,
                })
                .await
                .is_ok()
        };
        match tokio::time::timeout(self.stall_timeout, queue).await {
            Ok(true) => {}
            Ok(false) => self.dropped = true,
            Err(_) => {
                self.dropped = true;
                self.outbox.abandon(Status::deadline_exceeded(format!(
                    "the client read none of its output for {:?}; the rest of it is dropped (the sandbox stays)",
                    self.stall_timeout
                )));
            }
        }
    }
}

pub struct SandboxesService {
    table: SandboxTable,
}

impl SandboxesService {
    pub fn new(table: SandboxTable) -> Self {
        Self { table }
    }
}

#[tonic::async_trait]
impl SandboxesApi for SandboxesService {
    type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecuteResponse, Status>> + Send>>;
    type ReadFileStream = ChunkStream;
    type StartProcessStream = EventStream;
    type ConnectProcessStream = EventStream;
    type RunCodeStream = CodeStream;
    type WatchDirStream = WatchStream;

    async fn watch_dir(&self, r: Request<WatchDirRequest>) -> Result<Response<WatchStream>, Status> {
        self.table.watch_dir(r.into_inner()).await.map(Response::new)
    }

    async fn create_context(
        &self,
        r: Request<CreateContextRequest>,
    ) -> Result<Response<ContextInfo>, Status> {
        self.table.create_context(r.into_inner()).await.map(Response::new)
    }

    async fn list_contexts(
        &self,
        r: Request<ListContextsRequest>,
    ) -> Result<Response<ListContextsResponse>, Status> {
        self.table.list_contexts(r.into_inner()).await.map(Response::new)
    }

    async fn restart_context(&self, r: Request<ContextSelector>) -> Result<Response<ContextInfo>, Status> {
        self.table
            .restart_context(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_context(&self, r: Request<ContextSelector>) -> Result<Response<ContextAck>, Status> {
        self.table.remove_context(r.into_inner()).await.map(Response::new)
    }

    async fn run_code(&self, r: Request<RunCodeRequest>) -> Result<Response<CodeStream>, Status> {
        self.table.run_code(r.into_inner()).await.map(Response::new)
    }

    async fn screenshot(
        &self,
        r: Request<SandboxRef>,
    ) -> Result<Response<neurovisor_proto::v1::DesktopScreenshot>, Status> {
        self.table
            .screenshot(&r.into_inner().sandbox_id)
            .await
            .map(Response::new)
    }

    async fn desktop_action(
        &self,
        r: Request<neurovisor_proto::v1::DesktopActionRequest>,
    ) -> Result<Response<neurovisor_proto::v1::DesktopActionResponse>, Status> {
        self.table.desktop_action(r.into_inner()).await?;
        Ok(Response::new(neurovisor_proto::v1::DesktopActionResponse {}))
    }

    async fn desktop_view(
        &self,
        r: Request<neurovisor_proto::v1::DesktopViewRequest>,
    ) -> Result<Response<neurovisor_proto::v1::DesktopViewInfo>, Status> {
        let r = r.into_inner();
        self.table
            .desktop_view(&r.sandbox_id, r.view_only)
            .map(Response::new)
    }

    async fn read_file(&self, r: Request<ReadFileRequest>) -> Result<Response<ChunkStream>, Status> {
        self.table.read_file(r.into_inner()).await.map(Response::new)
    }

    async fn write_file(
        &self,
        r: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<EntryInfo>, Status> {
        self.table.write_file(r.into_inner()).await.map(Response::new)
    }

    async fn list_dir(&self, r: Request<ListDirRequest>) -> Result<Response<ListDirResponse>, Status> {
        self.table.list_dir(r.into_inner()).await.map(Response::new)
    }

    async fn stat(&self, r: Request<PathRequest>) -> Result<Response<EntryInfo>, Status> {
        self.table.stat(r.into_inner()).await.map(Response::new)
    }

    async fn make_dir(&self, r: Request<PathRequest>) -> Result<Response<EntryInfo>, Status> {
        self.table.make_dir(r.into_inner()).await.map(Response::new)
    }

    async fn remove(&self, r: Request<PathRequest>) -> Result<Response<RemoveResponse>, Status> {
        self.table.remove(r.into_inner()).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn r#move(&self, r: Request<MoveRequest>) -> Result<Response<EntryInfo>, Status> {
        self.table.rename(r.into_inner()).await.map(Response::new)
    }

    async fn start_process(&self, r: Request<StartProcessRequest>) -> Result<Response<EventStream>, Status> {
        self.table.start_process(r.into_inner()).await.map(Response::new)
    }

    async fn connect_process(&self, r: Request<ProcessSelector>) -> Result<Response<EventStream>, Status> {
        self.table
            .connect_process(r.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_processes(
        &self,
        r: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        self.table.list_processes(r.into_inner()).await.map(Response::new)
    }

    async fn send_input(&self, r: Request<SendInputRequest>) -> Result<Response<ProcessAck>, Status> {
        self.table.send_input(r.into_inner()).await.map(Response::new)
    }

    async fn resize_pty(&self, r: Request<ResizePtyRequest>) -> Result<Response<ProcessAck>, Status> {
        self.table.resize_pty(r.into_inner()).await.map(Response::new)
    }

    async fn close_stdin(&self, r: Request<ProcessSelector>) -> Result<Response<ProcessAck>, Status> {
        self.table.close_stdin(r.into_inner()).await.map(Response::new)
    }

    async fn signal_process(&self, r: Request<SignalProcessRequest>) -> Result<Response<ProcessAck>, Status> {
        self.table.signal_process(r.into_inner()).await.map(Response::new)
    }

    async fn create(&self, request: Request<CreateSandboxRequest>) -> Result<Response<SandboxInfo>, Status> {
        self.table.create(request.into_inner()).await.map(Response::new)
    }

    async fn get(&self, request: Request<SandboxRef>) -> Result<Response<SandboxInfo>, Status> {
        let s = self.table.get(&request.into_inner().sandbox_id)?;
        Ok(Response::new(self.table.info(&s)))
    }

    async fn list(
        &self,
        _: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.table.infos(),
        }))
    }

    async fn kill(&self, request: Request<SandboxRef>) -> Result<Response<KillSandboxResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        if self.table.kill(&id, Ending::Killed, "killed by a client").await {
            Ok(Response::new(KillSandboxResponse {}))
        } else {
            Err(self.table.get(&id).err().unwrap_or_else(|| Status::not_found(id)))
        }
    }

    async fn pause(&self, request: Request<SandboxRef>) -> Result<Response<SandboxInfo>, Status> {
        self.table
            .pause(&request.into_inner().sandbox_id)
            .await
            .map(Response::new)
    }

    async fn resume(&self, request: Request<ResumeSandboxRequest>) -> Result<Response<SandboxInfo>, Status> {
        let r = request.into_inner();
        self.table
            .resume(&r.sandbox_id, r.timeout_s)
            .await
            .map(Response::new)
    }

    async fn set_timeout(
        &self,
        request: Request<SetSandboxTimeoutRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        let r = request.into_inner();
        self.table
            .set_timeout(&r.sandbox_id, r.timeout_s)
            .map(Response::new)
    }

    async fn exec(&self, request: Request<SandboxExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let trace_id = trace_id_of(&request);
        let r = request.into_inner();
        let session = self.table.awake(&r.sandbox_id).await?;
        session.guest()?;
        let mut e = r
            .request
            .ok_or_else(|| Status::invalid_argument("request: missing; say what to run (language, code)"))?;
        if !e.profile.is_empty() {
            return Err(Status::invalid_argument(
                "request.profile: a sandbox keeps the profile it was created with; name it in CreateSandboxRequest.profile",
            ));
        }
        // The sandbox's environment under the request's own.
        let own = std::mem::take(&mut e.env);
        e.env = session.env.clone().into_iter().collect();
        e.env.extend(own);
        let t = &self.table.inner;
        let mut req =
            ExecRequest::from_wire(wire_of(e, trace_id.clone()), session.images()).map_err(to_status)?;
        session.pool.sandbox().check_bridge(&req).map_err(to_status)?;
        // A sandbox with a bridge of its own serves it already.
        req.llm_bridge &= session.bridge.is_none();
        let in_flight = InFlight::new(&t.metrics);
        let (tx, rx) = mpsc::channel::<Queued>(super::sandbox::STREAM_QUEUE);
        let outbox = Outbox::new(rx);
        let table = self.table.clone();
        let task_outbox = outbox.clone();
        tokio::spawn(
            async move {
                let _in_flight = in_flight;
                let t = &table.inner;
                let mut sink = ExecSink {
                    tx: tx.clone(),
                    budget: t.budget.clone(),
                    stall_timeout: t.stall_timeout,
                    outbox: task_outbox.clone(),
                    dropped: false,
                };
                let started = Instant::now();
                let mut guard = tokio::select! {
                    g = session.lease.lock() => g,
                    _ = session.killed.cancelled() => {
                        task_outbox.abandon(Status::aborted("the sandbox was killed"));
                        return;
                    }
                };
                let waited = started.elapsed();
                let Some(lease) = guard.as_mut() else {
                    task_outbox.abandon(match session.guest() {
                        Err(paused) if !session.killed.is_cancelled() => paused,
                        _ => Status::aborted("the sandbox was killed"),
                    });
                    return;
                };
                session.executions.fetch_add(1, Ordering::Relaxed);
                let result = tokio::select! {
                    r = lease.execute(&req, &mut sink) => r,
                    _ = session.killed.cancelled() => {
                        task_outbox.abandon(Status::aborted("the sandbox was killed while the program ran"));
                        return;
                    }
                };
                t.metrics.record_execution(&req.language, &req.trace_id, &result);
                let msg = match result {
                    Ok(o) => Ok(ExecuteResponse {
                        event: Some(Event::Result(result_of(&o, true, waited))),
                    }),
                    // Refused before the program ran (the bridge's port
                    // is taken in the VM): the sandbox is as it was.
                    Err(ExecError::InvalidRequest(m)) => Err(Status::failed_precondition(m)),
                    Err(e) => {
                        // The VM's state is unknown after a failed execution:
                        // the sandbox ends rather than serve from it.
                        drop(guard);
                        table
                            .kill(&session.id, Ending::Failed, &format!("an execution failed: {e}"))
                            .await;
                        Err(Status::internal(format!("{e}; the sandbox was killed")))
                    }
                };
                let queued = Queued { msg, _room: None };
                if !sink.dropped
                    && tokio::time::timeout(t.stall_timeout, tx.send(queued))
                        .await
                        .is_err()
                {
                    task_outbox.abandon(Status::deadline_exceeded("the client did not read its result"));
                }
            }
            .in_current_span(),
        );
        let stream = OutboxStream {
            outbox,
            finished: false,
        };
        Ok(with_trace_id(Response::new(Box::pin(stream)), &trace_id))
    }
}
/// The answer for a sandbox id the table does not hold.
pub(crate) fn missing(id: &str) -> Status {
    Status::not_found(format!(
        "no sandbox '{id}' (it was killed, its timeout passed, or the daemon restarted); create one"
    ))
}
