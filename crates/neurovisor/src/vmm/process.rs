//! Child processes of a VM (the VMM and its helpers).
//!
//! Every VM process is started under a keeper
//! ([`crate::supervisor::keeper`]): the keeper carries the death of this
//! process (SIGKILL included) to the VM process and reaps it, so neither an
//! orphan nor a zombie is left. A [`Helper`] is our handle on the keeper:
//! stopping it asks the keeper to kill and reap the VM process, then reaps
//! the keeper. Note: the death signal follows the *thread* that spawned the
//! keeper, so helpers must be spawned from runtime worker threads, never from
//! `spawn_blocking` threads (which exit when idle).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::capped_log::CappedLog;
use super::VmmError;
use crate::supervisor::keeper::{Keeper, KeeperSpec};

/// How long a keeper gets to kill and reap its VM process before it is killed itself.
const KEEPER_GRACE: Duration = Duration::from_secs(3);

/// A VM process, through its keeper. Dropping it asks the keeper to kill and
/// reap the VM process; the runtime reaps the keeper in the background.
#[derive(Debug)]
pub struct Helper {
    pub what: &'static str,
    child: Child,
    exited: bool,
}

impl Helper {
    /// Spawns `cmd` under a keeper (`spec`: cgroup, jail). Its stdout and
    /// stderr are pipes copied into `stdout` and `stderr` (capped logs, see
    /// [`super::capped_log`]; they may be the same). `cmd` must have no
    /// `pre_exec` hooks of its own.
    pub fn spawn(
        what: &'static str,
        mut cmd: Command,
        stdout: &CappedLog,
        stderr: &CappedLog,
        spec: KeeperSpec,
    ) -> Result<Self, VmmError> {
        let err = |source| VmmError::Spawn {
            what: what.to_string(),
            source,
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        Keeper::new(spec).apply(&mut cmd);
        let mut child = cmd.spawn().map_err(err)?;
        // The copies end when the keeper and the VM process are gone.
        if let Some(out) = child.stdout.take() {
            stdout.attach(out);
        }
        if let Some(e) = child.stderr.take() {
            stderr.attach(e);
        }
        Ok(Self {
            what,
            child,
            exited: false,
        })
    }

    /// The keeper's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The VM process's pid (the keeper's child), while it runs.
    pub fn vm_pid(&self) -> Option<u32> {
        child_of(self.child.id()?)
    }

    /// Waits for the process to exit and describes how it ended.
    pub async fn exited(&mut self) -> String {
        let s = match self.child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        self.exited = true;
        s
    }

    /// Returns the exit description if the process has already exited.
    pub fn try_exited(&mut self) -> Option<String> {
        let s = match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        };
        self.exited |= s.is_some();
        s
    }

    /// Waits up to `grace` for a voluntary exit, then has the keeper kill and
    /// reap the VM process; always reaps the keeper.
    pub async fn stop(mut self, grace: Duration) {
        if !grace.is_zero() && tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            self.exited = true;
            return;
        }
        self.terminate();
        if tokio::time::timeout(KEEPER_GRACE, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                what = self.what,
                "keeper did not stop in {KEEPER_GRACE:?}; killing it"
            );
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        self.exited = true;
    }

    /// Asks the keeper to kill and reap the VM process.
    fn terminate(&self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if !self.exited {
            self.terminate();
        }
    }
}

/// The first process whose parent is `pid` (a keeper has exactly one child).
pub fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let child: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // The command name may hold spaces and parentheses: fields follow the last ')'.
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == pid).then_some(child)
    })
}

/// Waits until `path` exists (a helper creating its socket), or the helper exits.
pub async fn wait_for_path(
    path: &Path,
    helper: &mut Helper,
    timeout: Duration,
    log: &Path,
) -> Result<(), VmmError> {
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    while !path.exists() {
        if let Some(status) = helper.try_exited() {
            return Err(VmmError::HelperExited {
                what: helper.what.to_string(),
                status,
                log_tail: super::log_tail(log, 20),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VmmError::HelperExited {
                what: helper.what.to_string(),
                status: format!("did not create {} within {timeout:?}", path.display()),
                log_tail: super::log_tail(log, 20),
            });
        }
        tokio::time::sleep(poll_pause(started)).await;
    }
    Ok(())
}

/// The pause between two polls for something a VMM is about to do (a
/// socket it binds, a port it answers on): 1 ms while it is expected, since
/// each ms lost is one more ms of every restore (a doubling back-off to 10 ms
/// lost ~7 ms per restore here); 10 ms once it is late.
pub fn poll_pause(started: tokio::time::Instant) -> Duration {
    if started.elapsed() < Duration::from_millis(250) {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(10)
    }
}

/// SIGKILLs every process whose command line mentions `needle` (a VM directory:
/// every process of a VM names it in its arguments). Returns how many.
pub fn kill_processes_mentioning(needle: &str) -> usize {
    let me = std::process::id();
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&raw).replace('\0', " ").contains(needle)
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
                .is_ok()
        {
            n += 1;
        }
    }
    n
}
