//! Fresh VMs from a snapshot (`--snapshot`): one template VM per (image,
//! size, backend, warm languages) boots, its agent becomes ready and its warm
//! interpreters wait for code, it is snapshotted, and every later VM of that
//! kind is restored from the snapshot instead of booted.
//!
//! - **Cache.** `Managed` templates live in `<cache>/<backend>-<size>-<key>/`
//!   (`state`, `mem`, `inputs.json`); the key hashes the inputs (backend and
//!   its binary, size, warm languages, kernel and rootfs by path, size, mtime
//!   and inode). Changed inputs give a new key: the template is rebuilt and
//!   the stale one removed. A template is built in a temporary directory and
//!   renamed into place, so concurrent processes never see half of one.
//!   `Files` are a user's `--snapshot-file`/`--mem-file`: used as they are if
//!   present, else made there.
//! - **Memory.** On QEMU the template's RAM is a memfd ([`GuestMemory`]),
//!   sealed once the template is gone and shared copy-on-write by every
//!   restored VM of this process. Firecracker maps its memory file itself.
//! - **Uniqueness.** Before a restored VM is handed out, `Reseed` gives it
//!   64 bytes of host entropy (credited, CRNG reseeded), the wall clock and
//!   its id (see the guest's `reseed.rs`).
//! - **Failure.** A template that cannot be built, or a snapshot that does
//!   not restore, is logged with the reason and the VMs are booted cold; a
//!   managed template that failed to restore is deleted, so the next start
//!   rebuilds it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neurovisor_proto::guest::{HealthRequest, ReseedRequest, SettleRequest};
use neurovisor_proto::GUEST_AGENT_PORT;
use sha2::{Digest, Sha256};

use crate::channel::GuestError;
use crate::config::VmSize;
use crate::exec::{guest_client, sanitize_health, ExecError, ReadyVm, Sandbox};
use crate::vmm::{GuestMemory, VmmError};

/// Where snapshots come from.
#[derive(Debug, Clone)]
pub enum SnapshotSource {
    /// Templates built and cached under this directory, keyed by their inputs.
    Managed { cache_dir: PathBuf },
    /// A user's files (the seed's `--snapshot-file`, `--mem-file`).
    Files { state: PathBuf, mem: PathBuf },
}

/// The seed's default paths of a user-made snapshot.
pub const DEFAULT_SNAPSHOT_FILE: &str = "./snapshot_file";
pub const DEFAULT_MEM_FILE: &str = "./mem_file";

/// How long a template's warm interpreters may take to be ready.
const SETTLE: Duration = Duration::from_secs(30);
/// How long a restored VM may take to answer.
const RESTORE_READY: Duration = Duration::from_secs(10);
/// The same for a paused sandbox, which has no cold boot to fall back on.
const RESUME_READY: Duration = Duration::from_secs(30);
/// Host entropy handed to each restored VM.
const ENTROPY_BYTES: usize = 64;

/// One snapshot a VM can be restored from.
#[derive(Debug)]
pub struct Template {
    pub state: PathBuf,
    pub mem: PathBuf,
    /// The sealed RAM image (QEMU).
    pub memory: Option<Arc<GuestMemory>>,
    /// The managed directory, removed when the template turns out broken.
    managed_dir: Option<PathBuf>,
    /// Restores that failed in a row.
    failures: std::sync::atomic::AtomicU32,
}

impl Template {
    /// A restore worked: earlier failures were passing (a loaded host).
    pub fn restored(&self) {
        self.failures.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Restores that may fail in a row before a template is given up: one
/// failure can be a host too loaded to answer in time; a snapshot that
/// cannot be restored fails every time.
const FAILURES_BEFORE_DISCARD: u32 = 3;

enum Slot {
    Ready(Arc<Template>),
    /// Why no template: VMs of this kind boot cold.
    Failed(String),
}

/// The templates of one sandbox, per VM size and warm languages.
type SlotKey = (PathBuf, &'static str, Vec<String>);

fn slot_key(sb: &Sandbox, size: VmSize, warm: &[String]) -> SlotKey {
    (sb.images().rootfs.clone(), size.name(), warm.to_vec())
}

pub struct Snapshots {
    source: SnapshotSource,
    /// By (rootfs, size, warm languages): one template per image too.
    slots: tokio::sync::Mutex<HashMap<SlotKey, Slot>>,
}

impl Snapshots {
    pub fn new(source: SnapshotSource) -> Self {
        Self {
            source,
            slots: Default::default(),
        }
    }

    pub fn source(&self) -> &SnapshotSource {
        &self.source
    }

    /// Why VMs of `size` boot cold, if they do.
    pub async fn failure(&self, sb: &Sandbox, size: VmSize, warm: &[String]) -> Option<String> {
        match self.slots.lock().await.get(&slot_key(sb, size, warm)) {
            Some(Slot::Failed(why)) => Some(why.clone()),
            _ => None,
        }
    }

    /// The template for `size`, built (or loaded) on first use; `None` if
    /// there is none (logged once), so the caller boots cold.
    pub async fn template(&self, sb: &Sandbox, size: VmSize, warm: &[String]) -> Option<Arc<Template>> {
        let mut slots = self.slots.lock().await;
        let key = slot_key(sb, size, warm);
        if let Some(slot) = slots.get(&key) {
            return match slot {
                Slot::Ready(t) => Some(t.clone()),
                Slot::Failed(_) => None,
            };
        }
        let started = Instant::now();
        let slot = match self.prepare(sb, size, warm).await {
            Ok(t) => {
                tracing::info!(size = size.name(), took_ms = started.elapsed().as_millis() as u64,
                    state = %t.state.display(), "snapshot template ready");
                Slot::Ready(Arc::new(t))
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::error!(size = size.name(), "no snapshot, VMs boot cold: {why}");
                Slot::Failed(why)
            }
        };
        let out = match &slot {
            Slot::Ready(t) => Some(t.clone()),
            Slot::Failed(_) => None,
        };
        slots.insert(key, slot);
        out
    }

    /// A restore of `t` failed (the caller boots instead). After
    /// [`FAILURES_BEFORE_DISCARD`] in a row the template is discarded.
    pub async fn failed(&self, t: &Arc<Template>, why: &str) {
        let n = t.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n < FAILURES_BEFORE_DISCARD {
            tracing::warn!(state = %t.state.display(), failures = n, "a restore failed, this VM boots instead: {why}");
            return;
        }
        self.discard(t, why).await;
    }

    /// A template that does not restore: never used again by this process;
    /// a managed one is deleted so that the next start rebuilds it.
    pub async fn discard(&self, t: &Arc<Template>, why: &str) {
        tracing::error!(state = %t.state.display(), "snapshot does not restore, VMs boot cold from now on: {why}");
        let mut slots = self.slots.lock().await;
        for slot in slots.values_mut() {
            if matches!(slot, Slot::Ready(x) if Arc::ptr_eq(x, t)) {
                *slot = Slot::Failed(why.to_string());
            }
        }
        if let Some(dir) = &t.managed_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    async fn prepare(&self, sb: &Sandbox, size: VmSize, warm: &[String]) -> Result<Template, SnapshotError> {
        let qemu = sb.backend().name() == "qemu";
        let mem_bytes = u64::from(size.memory_mib()) << 20;
        let load = |state: PathBuf, mem: PathBuf, managed_dir| -> Result<Template, SnapshotError> {
            let memory = if qemu {
                Some(Arc::new(GuestMemory::load(&mem, mem_bytes).map_err(|e| {
                    SnapshotError::Invalid(format!("{e}; remove it (or pass other files) to make a new one"))
                })?))
            } else {
                None
            };
            Ok(Template {
                state,
                mem,
                memory,
                managed_dir,
                failures: Default::default(),
            })
        };
        match &self.source {
            SnapshotSource::Files { state, mem } => {
                if state.exists() || mem.exists() {
                    if !state.exists() || !mem.exists() {
                        return Err(SnapshotError::Invalid(format!(
                            "{} and {} must both exist (a snapshot is the pair); remove the other one to make a new snapshot there",
                            state.display(),
                            mem.display()
                        )));
                    }
                    return load(state.clone(), mem.clone(), None);
                }
                let memory = build(sb, size, warm, state, mem).await?;
                Ok(Template {
                    state: state.clone(),
                    mem: mem.clone(),
                    memory,
                    managed_dir: None,
                    failures: Default::default(),
                })
            }
            SnapshotSource::Managed { cache_dir } => {
                let inputs = inputs(sb, size, warm);
                let key = hex(&Sha256::digest(inputs.to_string().as_bytes())[..8]);
                let prefix = format!("{}-{}-", sb.backend().name(), size.name());
                let dir = cache_dir.join(format!("{prefix}{key}"));
                std::fs::create_dir_all(cache_dir).map_err(|e| SnapshotError::io(cache_dir, e))?;
                // Stale templates go: those whose files changed since (a
                // rebuilt rootfs, another kernel, a new VMM or NeuroVisor).
                // Templates of other images or warm sets stay: another
                // process (a daemon, a `run`) may be using them.
                if let Ok(entries) = std::fs::read_dir(cache_dir) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let candidate =
                            name.starts_with(&prefix) && e.path() != dir && !name.ends_with(".tmp");
                        if candidate && is_stale(sb, &e.path()) {
                            tracing::info!(template = %name, "removing a stale snapshot template (its inputs changed)");
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
                let (state, mem) = (dir.join("state"), dir.join("mem"));
                if dir.join("inputs.json").exists() {
                    match load(state.clone(), mem.clone(), Some(dir.clone())) {
                        Ok(t) => return Ok(t),
                        Err(e) => {
                            tracing::warn!("cached snapshot template unusable, rebuilding: {e}");
                            let _ = std::fs::remove_dir_all(&dir);
                        }
                    }
                }
                let tmp = cache_dir.join(format!("{prefix}{key}.{}.tmp", std::process::id()));
                let _ = std::fs::remove_dir_all(&tmp);
                std::fs::create_dir_all(&tmp).map_err(|e| SnapshotError::io(&tmp, e))?;
                let built = build(sb, size, warm, &tmp.join("state"), &tmp.join("mem")).await;
                let memory = match built {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(e);
                    }
                };
                let written = serde_json::to_vec_pretty(&inputs)
                    .map_err(std::io::Error::other)
                    .and_then(|j| std::fs::write(tmp.join("inputs.json"), j));
                if let Err(e) = written {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(SnapshotError::io(&tmp, e));
                }
                if std::fs::rename(&tmp, &dir).is_err() {
                    // Another process put the same template there first.
                    let _ = std::fs::remove_dir_all(&tmp);
                    return load(state, mem, Some(dir));
                }
                Ok(Template {
                    state,
                    mem,
                    memory,
                    managed_dir: Some(dir),
                    failures: Default::default(),
                })
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("building the template VM: {0}")]
    Build(#[source] Box<ExecError>),
}

impl SnapshotError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn file_identity(p: &Path) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => serde_json::json!({
            "path": p.display().to_string(),
            "len": m.len(),
            "mtime_ns": m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            "ino": m.ino(),
        }),
        Err(_) => serde_json::json!({ "path": p.display().to_string() }),
    }
}

/// Whether the template in `dir` was made from files that have changed
/// since (or by another NeuroVisor or VMM): it can never be used again.
fn is_stale(sb: &Sandbox, dir: &Path) -> bool {
    let Ok(recorded) = std::fs::read(dir.join("inputs.json")) else {
        return true;
    };
    let Ok(recorded) = serde_json::from_slice::<serde_json::Value>(&recorded) else {
        return true;
    };
    let file_changed = |k: &str| {
        let path = recorded[k]["path"].as_str().unwrap_or_default();
        recorded[k] != file_identity(Path::new(path))
    };
    recorded["neurovisor"] != env!("CARGO_PKG_VERSION")
        || recorded["vmm"] != sb.backend().identity()
        || file_changed("kernel")
        || file_changed("rootfs")
}

/// What a template depends on: a change to any of these makes a new one.
fn inputs(sb: &Sandbox, size: VmSize, warm: &[String]) -> serde_json::Value {
    let images = sb.images();
    serde_json::json!({
        "neurovisor": env!("CARGO_PKG_VERSION"),
        "backend": sb.backend().name(),
        "vmm": sb.backend().identity(),
        "size": size.name(),
        "memory_mib": size.memory_mib(),
        "vcpus": size.vcpus(),
        "warm": warm,
        "kernel": file_identity(&images.kernel),
        "rootfs": file_identity(&images.rootfs),
    })
}

/// Boots the template VM, waits for its agent and warm interpreters, and
/// snapshots it into `state` and `mem`. Returns the sealed RAM (QEMU).
async fn build(
    sb: &Sandbox,
    size: VmSize,
    warm: &[String],
    state: &Path,
    mem: &Path,
) -> Result<Option<Arc<GuestMemory>>, SnapshotError> {
    let qemu = sb.backend().name() == "qemu";
    let memory = if qemu {
        Some(Arc::new(
            GuestMemory::create(u64::from(size.memory_mib()) << 20)
                .map_err(|e| SnapshotError::Invalid(e.to_string()))?,
        ))
    } else {
        None
    };
    let build_err = |e: ExecError| SnapshotError::Build(Box::new(e));
    let mut extra = Vec::new();
    if !warm.is_empty() {
        extra.push(format!("nv.warm={}", warm.join(",")));
    }
    let mut cfg = sb.vm_config(size, extra);
    cfg.guest_memory = memory.clone();
    let budget = Duration::from_secs(90);
    let mut vm = sb.backend().spawn(&cfg).await.map_err(|e| build_err(e.into()))?;
    let result = async {
        vm.wait_ready(budget).await?;
        let stream = vm.connect(GUEST_AGENT_PORT).await?;
        let io = sb.guest_io().clone();
        let settled = io
            .run(async move {
                let mut client = guest_client(stream).await?;
                client.health(HealthRequest {}).await.map_err(GuestError::from)?;
                let s = client
                    .settle(SettleRequest {
                        timeout_ms: SETTLE.as_millis() as u32,
                    })
                    .await
                    .map_err(GuestError::from)?;
                Ok::<_, ExecError>(s.into_inner().warm_languages)
            })
            .await
            .map_err(|e| GuestError::Connect(e.to_string()))??;
        let missing: Vec<&String> = warm.iter().filter(|l| !settled.contains(l)).collect();
        if !missing.is_empty() {
            tracing::warn!(?missing, "template snapshotted without these warm interpreters");
        }
        // The connection is closed: let the agent see it end, so that the
        // snapshot holds an agent waiting for its next host.
        tokio::time::sleep(Duration::from_millis(200)).await;
        vm.pause().await?;
        vm.create_snapshot(state, mem).await?;
        Ok::<_, ExecError>(())
    }
    .await;
    tracing::debug!(console = %crate::vmm::log_tail(&vm.dir().join("console.log"), 30), "template console");
    vm.kill().await;
    result.map_err(build_err)?;
    if let Some(m) = &memory {
        m.seal().map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    }
    Ok(memory)
}

/// Restores one VM from `t` and makes it unique; `Err` means the snapshot
/// (not the caller's request) failed.
pub async fn restore(sb: &Sandbox, t: &Template, size: VmSize) -> Result<ReadyVm, ExecError> {
    restore_files(sb, &t.state, &t.mem, t.memory.clone(), size, RESTORE_READY).await
}

/// Brings back a VM saved by [`ReadyVm::save`] (a paused sandbox): the same
/// guest, processes and files, made current (clock, entropy) like any
/// restored VM, under a new VM id.
pub async fn resume(sb: &Sandbox, state: &Path, mem: &Path, size: VmSize) -> Result<ReadyVm, ExecError> {
    restore_files(sb, state, mem, None, size, RESUME_READY).await
}

fn set_stage(stage: &std::sync::Mutex<&'static str>, now: &'static str) {
    if let Ok(mut s) = stage.lock() {
        *s = now;
    }
}

async fn restore_files(
    sb: &Sandbox,
    state: &Path,
    mem: &Path,
    memory: Option<Arc<GuestMemory>>,
    size: VmSize,
    ready: Duration,
) -> Result<ReadyVm, ExecError> {
    let started = Instant::now();
    let mut cfg = sb.vm_config(size, Vec::new());
    cfg.guest_memory = memory;
    let vm_id = cfg.id.clone();
    let mut vm = sb.backend().restore(&cfg, state, mem).await?;
    let loaded = started.elapsed();
    let deadline = tokio::time::Instant::now() + ready;
    // What the restore was waiting for when the deadline passed, for the error.
    let stage = std::sync::Mutex::new("the agent's answer on its channel");
    let connected = tokio::time::timeout_at(deadline, async {
        vm.wait_ready(ready).await?;
        let answered = started.elapsed();
        set_stage(&stage, "a connection to the agent");
        let stream = vm.connect(GUEST_AGENT_PORT).await?;
        set_stage(&stage, "the agent's answer to Reseed");
        let mut entropy = vec![0u8; ENTROPY_BYTES];
        getrandom::getrandom(&mut entropy).map_err(|e| ExecError::Vmm(VmmError::Snapshot(e.to_string())))?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        sb.guest_io()
            .run(async move {
                let channel = crate::exec::guest_channel(stream).await?;
                let mut client = crate::exec::execution_client(channel.clone());
                let reseeded = client
                    .reseed(ReseedRequest {
                        entropy: entropy.into(),
                        unix_time_ns,
                        vm_id,
                    })
                    .await
                    .map_err(GuestError::from)?
                    .into_inner();
                let health = reseeded.health.ok_or_else(|| {
                    ExecError::Protocol("Reseed answered without the agent's health".into())
                })?;
                tracing::debug!(
                    loaded_ms = loaded.as_secs_f64() * 1e3,
                    answered_ms = answered.as_secs_f64() * 1e3,
                    reseeded_ms = started.elapsed().as_secs_f64() * 1e3,
                    "restored"
                );
                Ok::<_, ExecError>((channel, sanitize_health(health)))
            })
            .await
            .map_err(|e| GuestError::Connect(e.to_string()))?
    })
    .await
    .unwrap_or_else(|_| {
        Err(ExecError::Vmm(VmmError::Snapshot(format!(
            "the restored VM did not answer within {ready:?} (waiting for {})",
            stage.lock().map(|s| *s).unwrap_or("?")
        ))))
    });
    match connected {
        Ok((channel, health)) => {
            let mut ready = ReadyVm::new(
                vm,
                channel,
                sb.guest_io().clone(),
                started.elapsed(),
                health,
                sb.hooks.counters.clone(),
            );
            ready.restored = true;
            ready.bridge = sb.llm_bridge.clone();
            Ok(ready)
        }
        Err(e) => {
            let tail = crate::vmm::log_tail(&vm.dir().join("console.log"), 20);
            tracing::debug!(console = %tail, "the restored VM's console");
            vm.kill().await;
            Err(e)
        }
    }
}
