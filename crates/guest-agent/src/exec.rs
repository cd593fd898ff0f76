//! Runs one program as the unprivileged sandbox user and streams its output.
//!
//! Each execution gets a fresh working directory, a clean environment, its own
//! session (so the whole process group can be killed), and rlimits. Output is
//! forwarded in chunks as it is read; the bounded channel to the gRPC stream
//! gives backpressure all the way to the program's pipe.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use neurovisor_proto::guest::{execute_event::Event, ExecuteEvent, ExecuteRequest, ExitStatus};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{chown, Gid, Pid, Uid};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tonic::Status;

use crate::languages::{recipe, Language, Recipe};
use crate::warm::WarmSet;

pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;
pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;
const DEFAULT_MAX_PROCESSES: u32 = 512;
const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 30;
const DEFAULT_MAX_OPEN_FILES: u32 = 1024;
/// How long output already in the pipes may still drain after the program ended.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// The unprivileged account programs run as (created in the image).
pub const SANDBOX_UID: u32 = 1000;
pub const SANDBOX_GID: u32 = 1000;
pub const SANDBOX_HOME: &str = "/home/user";
/// Its name (E2B's sandboxes call it `user` too).
pub const SANDBOX_USER: &str = "user";

pub type EventTx = mpsc::Sender<Result<ExecuteEvent, Status>>;

/// The rlimits a program runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_processes: u32,
    pub max_file_size: u64,
    pub max_open_files: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_processes: DEFAULT_MAX_PROCESSES,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// A validated request, ready to run.
#[derive(Debug)]
pub struct Plan {
    pub language: String,
    recipe: Recipe,
    code: String,
    /// The program's own arguments (after the source file).
    pub args: Vec<String>,
    stdin: Bytes,
    pub env: HashMap<String, String>,
    timeout: Duration,
    max_output: u64,
    pub limits: Limits,
}

fn nonzero<T: Default + PartialEq>(v: T, default: T) -> T {
    if v == T::default() {
        default
    } else {
        v
    }
}

/// Checks a request; the error text names the field and the fix.
pub fn plan(req: ExecuteRequest, available: &[Language]) -> Result<Plan, String> {
    let names = || {
        available
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if req.language.is_empty() {
        return Err(format!("language is required; available: {}", names()));
    }
    if !available.iter().any(|l| l.name == req.language) {
        return Err(format!(
            "unknown language '{}'; available: {}",
            req.language,
            names()
        ));
    }
    if req.code.trim().is_empty() {
        return Err("code is empty; pass the program's source text".to_string());
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!("env: invalid variable name or value for '{k}'"));
        }
    }
    if req.args.iter().any(|a| a.contains('\0')) {
        return Err("args: an argument contains a NUL byte".to_string());
    }
    let recipe =
        recipe(&req.language, &req.args).ok_or_else(|| format!("unknown language '{}'", req.language))?;
    let limits = req.limits.unwrap_or_default();
    let mut env = req.env;
    if !req.trace_id.is_empty() {
        env.insert("NEUROVISOR_TRACE_ID".to_string(), req.trace_id);
    }
    Ok(Plan {
        language: req.language,
        recipe,
        code: req.code,
        args: req.args,
        stdin: req.stdin,
        env,
        timeout: Duration::from_millis(u64::from(nonzero(req.timeout_ms, DEFAULT_TIMEOUT_MS))),
        max_output: nonzero(limits.max_output_bytes, DEFAULT_MAX_OUTPUT),
        limits: Limits {
            max_processes: nonzero(limits.max_processes, DEFAULT_MAX_PROCESSES),
            max_file_size: nonzero(limits.max_file_size_bytes, DEFAULT_MAX_FILE_SIZE),
            max_open_files: nonzero(limits.max_open_files, DEFAULT_MAX_OPEN_FILES),
        },
    })
}

pub(crate) fn base_env() -> Vec<(&'static str, String)> {
    vec![
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME", SANDBOX_HOME.into()),
        ("USER", SANDBOX_USER.into()),
        ("LOGNAME", SANDBOX_USER.into()),
        ("LANG", "C.UTF-8".into()),
        ("TMPDIR", "/tmp".into()),
        ("PYTHONUNBUFFERED", "1".into()),
        ("PYTHONDONTWRITEBYTECODE", "1".into()),
        ("GOCACHE", "/tmp/.gocache".into()),
        ("GOPATH", "/tmp/.gopath".into()),
        ("GO111MODULE", "off".into()),
    ]
}

static NEXT_RUN: AtomicU64 = AtomicU64::new(1);

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> Status + '_ {
    move |e| Status::internal(format!("{what}: {e}"))
}

fn chown_to_sandbox(p: &std::path::Path) -> std::io::Result<()> {
    chown(
        p,
        Some(Uid::from_raw(SANDBOX_UID)),
        Some(Gid::from_raw(SANDBOX_GID)),
    )
    .map_err(|e| std::io::Error::other(format!("chown {}: {e}", p.display())))
}

/// A fresh working directory of the sandbox user (0700).
pub(crate) fn create_workdir() -> std::io::Result<PathBuf> {
    let dir = PathBuf::from(format!("/tmp/run-{}", NEXT_RUN.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    chown_to_sandbox(&dir)?;
    Ok(dir)
}

/// Writes the program's source file into `dir`, owned by the sandbox user.
pub(crate) fn write_source(dir: &std::path::Path, plan: &Plan) -> std::io::Result<()> {
    let file = dir.join(plan.recipe.file);
    std::fs::write(&file, &plan.code)?;
    chown_to_sandbox(&file)
}

fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Copies one pipe into the event stream, forwarding at most `cap` bytes and
/// reading (and dropping) the rest so the program never blocks on a full pipe.
async fn pump(mut pipe: impl AsyncRead + Unpin, is_stdout: bool, cap: u64, tx: EventTx) -> (u64, bool) {
    let mut buf = vec![0u8; 32 * 1024];
    let (mut total, mut sent) = (0u64, 0u64);
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if sent < cap {
            let take = (cap - sent).min(n as u64) as usize;
            sent += take as u64;
            let chunk = Bytes::copy_from_slice(&buf[..take]);
            let event = if is_stdout {
                Event::Stdout(chunk)
            } else {
                Event::Stderr(chunk)
            };
            if tx.send(Ok(ExecuteEvent { event: Some(event) })).await.is_err() {
                break;
            }
        }
    }
    (total, total > cap)
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit with a valid pointer to a stack value; async-signal-safe.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Undoes the agent's OOM protection (inherited through fork) so that the
/// program, not the agent, is what the guest OOM killer picks. Raising the score
/// runs before the privilege drop. Only open/write/close: async-signal-safe.
fn make_preferred_oom_victim() {
    // SAFETY: static NUL-terminated path and buffer; the fd is closed.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let v = b"500";
            libc::write(fd, v.as_ptr().cast(), v.len());
            libc::close(fd);
        }
    }
}

/// Becomes the sandbox user with no supplementary groups.
fn drop_privileges() -> std::io::Result<()> {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(SANDBOX_GID) != 0
            || libc::setuid(SANDBOX_UID) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Sets what every program's process does before it runs, whether started
/// for a request or ahead of one ([`crate::warm`]): preferred OOM victim,
/// own session, rlimits, the sandbox user; `control` becomes fd 3.
pub(crate) fn confine_child(cmd: &mut Command, limits: Limits, control: Option<std::os::fd::RawFd>) {
    confine_child_as(cmd, limits, control, true)
}

/// [`confine_child`], staying root when `drop_to_user` is false (a sandbox
/// process started as root on request).
pub(crate) fn confine_child_as(
    cmd: &mut Command,
    limits: Limits,
    control: Option<std::os::fd::RawFd>,
    drop_to_user: bool,
) {
    let (nproc, fsize, nofile) = (
        u64::from(limits.max_processes),
        limits.max_file_size,
        u64::from(limits.max_open_files),
    );
    // Order matters: OOM score and hard rlimits are set while still root, then
    // the privilege drop. SAFETY: the closure only makes async-signal-safe
    // syscalls (open/write/close, dup2, setsid, setrlimit, setgroups, setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            make_preferred_oom_victim();
            if let Some(fd) = control {
                // dup2 leaves the copy without O_CLOEXEC, so it survives exec;
                // a pipe that already is fd 3 has to lose the flag itself.
                let ok = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) == 0
                } else {
                    libc::dup2(fd, 3) == 3
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            set_rlimit(libc::RLIMIT_NPROC, nproc)?;
            set_rlimit(libc::RLIMIT_FSIZE, fsize)?;
            set_rlimit(libc::RLIMIT_NOFILE, nofile)?;
            set_rlimit(libc::RLIMIT_CORE, 0)?;
            if drop_to_user {
                drop_privileges()?;
            }
            Ok(())
        });
    }
}

/// Starts the program: hands it to a warm interpreter when one fits, else
/// starts it fresh. Returns the child and whether it was warm.
async fn start(plan: &Plan, warm: &WarmSet) -> Result<(Child, bool), Status> {
    if let Some(w) = warm.take(plan).await {
        let child = w
            .start(plan)
            .map_err(internal("hand the code to the warm interpreter"))?;
        return Ok((child, true));
    }
    let dir = create_workdir().map_err(internal("create the working directory"))?;
    write_source(&dir, plan).map_err(internal("write the source file"))?;
    let mut cmd = Command::new(plan.recipe.program);
    cmd.args(&plan.recipe.argv)
        .current_dir(&dir)
        .env_clear()
        .envs(base_env())
        .envs(&plan.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    confine_child(&mut cmd, plan.limits, None);
    let child = cmd
        .spawn()
        .map_err(|e| Status::internal(format!("start {}: {e}", plan.recipe.program)))?;
    Ok((child, false))
}

/// Runs a validated plan, sending output chunks and then one final exit event.
/// `received`: when the request arrived (the host learns the start delay).
pub async fn run(plan: Plan, tx: EventTx, warm: &WarmSet, received: Instant) -> Result<(), Status> {
    let oom_before = oom_kills();
    let (mut child, warm_interpreter) = start(&plan, warm).await?;
    let started = Instant::now();
    let start_delay = started.saturating_duration_since(received);
    let pgid = child.id();

    if let Some(mut stdin) = child.stdin.take() {
        let data = plan.stdin.clone();
        tokio::spawn(async move {
            // A program that never reads stdin closes the pipe: not an error.
            let _ = stdin.write_all(&data).await;
        });
    }
    let out = child
        .stdout
        .take()
        .map(|p| tokio::spawn(pump(p, true, plan.max_output, tx.clone())));
    let err = child
        .stderr
        .take()
        .map(|p| tokio::spawn(pump(p, false, plan.max_output, tx.clone())));

    enum Outcome {
        Exited(std::io::Result<std::process::ExitStatus>),
        TimedOut,
        HostGone,
    }
    let outcome = tokio::select! {
        s = child.wait() => Outcome::Exited(s),
        _ = tokio::time::sleep(plan.timeout) => Outcome::TimedOut,
        _ = tx.closed() => Outcome::HostGone,
    };
    let timed_out = matches!(outcome, Outcome::TimedOut);
    let status = match outcome {
        Outcome::Exited(s) => s,
        Outcome::TimedOut => {
            kill_group(pgid);
            child.wait().await
        }
        Outcome::HostGone => {
            // Nobody will read the result.
            kill_group(pgid);
            let _ = child.wait().await;
            return Ok(());
        }
    }
    .map_err(internal("wait for the program"))?;
    let duration = started.elapsed();
    // Background processes of the program would keep the pipes open.
    kill_group(pgid);

    let drain = async {
        let o = match out {
            Some(h) => h.await.unwrap_or((0, false)),
            None => (0, false),
        };
        let e = match err {
            Some(h) => h.await.unwrap_or((0, false)),
            None => (0, false),
        };
        (o, e)
    };
    let ((out_bytes, out_trunc), (err_bytes, err_trunc)) = tokio::time::timeout(DRAIN_GRACE, drain)
        .await
        .unwrap_or(((0, false), (0, false)));

    let exit = ExitStatus {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        oom_killed: oom_kills() > oom_before,
        duration_us: duration.as_micros() as u64,
        stdout_truncated: out_trunc,
        stderr_truncated: err_trunc,
        stdout_bytes: out_bytes,
        stderr_bytes: err_bytes,
        warm_interpreter,
        start_delay_us: start_delay.as_micros() as u64,
    };
    let _ = tx
        .send(Ok(ExecuteEvent {
            event: Some(Event::Exit(exit)),
        }))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn langs() -> Vec<Language> {
        vec![Language {
            name: "python".into(),
            version: "3.11".into(),
        }]
    }

    fn req(language: &str, code: &str) -> ExecuteRequest {
        ExecuteRequest {
            language: language.into(),
            code: code.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_bad_requests_with_a_named_field() {
        let e = plan(req("cobol", "x"), &langs()).unwrap_err();
        assert!(
            e.contains("unknown language 'cobol'") && e.contains("python"),
            "{e}"
        );
        assert!(plan(req("", "x"), &langs())
            .unwrap_err()
            .contains("language is required"));
        assert!(plan(req("python", "  \n"), &langs())
            .unwrap_err()
            .contains("code is empty"));
        let mut r = req("python", "print(1)");
        r.env.insert("A=B".into(), "x".into());
        assert!(plan(r, &langs()).unwrap_err().starts_with("env:"));
    }

    #[test]
    fn applies_defaults_and_trace_id() {
        let mut r = req("python", "print(1)");
        r.trace_id = "t-1".into();
        let p = plan(r, &langs()).expect("valid");
        assert_eq!(p.timeout, Duration::from_millis(u64::from(DEFAULT_TIMEOUT_MS)));
        assert_eq!(p.max_output, DEFAULT_MAX_OUTPUT);
        assert_eq!(p.env.get("NEUROVISOR_TRACE_ID").map(String::as_str), Some("t-1"));
    }

    #[tokio::test]
    async fn pump_caps_and_flags_truncation() {
        let (tx, mut rx) = mpsc::channel(64);
        let data: &[u8] = &[b'x'; 100];
        let (total, truncated) = pump(data, true, 40, tx).await;
        assert_eq!((total, truncated), (100, true));
        let mut got = 0;
        while let Some(Ok(ExecuteEvent {
            event: Some(Event::Stdout(b)),
        })) = rx.recv().await
        {
            got += b.len();
        }
        assert_eq!(got, 40);
    }
}
