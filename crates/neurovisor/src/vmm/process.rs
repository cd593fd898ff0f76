//! Child processes of a VM (the VMM and its helpers).
//!
//! Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so a daemon that is killed
//! cannot orphan a VM, and is killed and reaped when its owner is done with it.
//! Note: the death signal follows the *thread* that spawned the child, so
//! children must be spawned from runtime worker threads, never from
//! `spawn_blocking` threads (which exit when idle).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::VmmError;

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Helper {
    pub what: &'static str,
    child: Child,
}

impl Helper {
    /// Spawns `cmd` with output appended to `log`.
    pub fn spawn(what: &'static str, mut cmd: Command, log: &Path) -> Result<Self, VmmError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| VmmError::Spawn {
                what: what.to_string(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| VmmError::Spawn {
            what: what.to_string(),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            what: what.to_string(),
            source,
        })?;
        Ok(Self { what, child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the process to exit and describes how it ended.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        }
    }

    /// Returns the exit description if the process has already exited.
    pub fn try_exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// Waits up to `grace` for a voluntary exit, then kills; always reaps.
    pub async fn stop(mut self, grace: Duration) {
        if !grace.is_zero() && tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return;
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Waits until `path` exists (a helper creating its socket), or the helper exits.
pub async fn wait_for_path(
    path: &Path,
    helper: &mut Helper,
    timeout: Duration,
    log: &Path,
) -> Result<(), VmmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_micros(500);
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
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(10));
    }
    Ok(())
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
