//! Interpreters started before their code arrives.
//!
//! Starting CPython costs about 0.4 s of guest CPU under TCG (Node more),
//! most of a short execution. For each language the host names on the kernel
//! command line (`nv.warm=python,javascript`), the agent starts the
//! interpreter once it has announced readiness, exactly as an execution would
//! start it (sandbox user, its own session, the default rlimits and OOM
//! score, a fresh working directory, the base environment,
//! stdin/stdout/stderr pipes), plus one more pipe on fd 3. A small bootstrap
//! then blocks reading fd 3. An execution that can use it writes its source
//! file into that directory and its arguments and environment into fd 3; the
//! bootstrap makes the process look as if it had been started as `python3 -u
//! main.py ARGS` (`sys.argv`, `sys.orig_argv`, `sys.path[0]`, a clean
//! `__main__` with an absolute `__file__`, tracebacks without the bootstrap's
//! frames) or `node main.js ARGS` (`process.argv`, `require.main`, Node's own
//! entry point) and runs the code. Everything else (pipes, timeout,
//! process-group kill, exit codes and signals, OOM detection) is the cold
//! path's, because the process is the same kind of child.
//!
//! A request falls back to a fresh interpreter when the warm one cannot be
//! the same: variables read at interpreter start-up (`PYTHON*`, `NODE_*`,
//! locale, `HOME`, `TZ`, the dynamic loader's and malloc's), rlimits other
//! than the defaults it was started with, or a second execution in the same
//! VM (each interpreter serves one). The result says which one ran
//! (`ExitStatus.warm_interpreter`).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::exec::{self, Limits, Plan};

/// The languages that can be started ahead, and how.
pub fn bootstrap(language: &str) -> Option<(&'static str, Vec<String>)> {
    match language {
        "python" => Some((
            "/usr/bin/python3",
            vec!["-u".into(), "-c".into(), PYTHON_BOOTSTRAP.into()],
        )),
        "javascript" => Some(("/usr/bin/node", vec!["-e".into(), NODE_BOOTSTRAP.into()])),
        _ => None,
    }
}

/// The same for Node: waits on fd 3, then becomes `node main.js ARGS`
/// (`process.argv`, `process.execArgv`, `require.main`, no `-e` globals) and
/// runs the program through Node's own entry point. Only the node-internal
/// frames at the bottom of a stack trace differ from a fresh start.
const NODE_BOOTSTRAP: &str = r#"(() => {
  const fs = require("fs");
  const Module = require("module");
  const path = require("path");
  const data = fs.readFileSync(3);
  fs.closeSync(3);
  const fields = data.toString("utf8").split("\0");
  fields.pop();
  const n = Number(fields[0]);
  const args = fields.slice(1, 1 + n);
  for (const kv of fields.slice(1 + n)) {
    const i = kv.indexOf("=");
    process.env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  const main = path.join(process.cwd(), "main.js");
  process.argv = [process.execPath, main, ...args];
  process.execArgv = [];
  for (const k of ["require", "module", "exports", "__filename", "__dirname"]) delete globalThis[k];
  Module.runMain();
})();
"#;

/// Waits on fd 3 for `N\0arg1\0…argN\0K=V\0…`, then becomes `python3 -u
/// main.py ARGS` (see the module docs). Everything it defines is removed from
/// `__main__` before the program runs.
const PYTHON_BOOTSTRAP: &str = r#"def _nv():
    import os, sys
    buf = bytearray()
    while True:
        chunk = os.read(3, 65536)
        if not chunk:
            break
        buf += chunk
    os.close(3)
    fields = bytes(buf).split(b"\0")[:-1]
    n = int(fields[0])
    args = [os.fsdecode(a) for a in fields[1:1 + n]]
    for kv in fields[1 + n:]:
        k, _, v = kv.partition(b"=")
        os.environb[k] = v
    d = os.getcwd()
    path = os.path.join(d, "main.py")
    sys.argv = ["main.py"] + args
    sys.orig_argv = ["/usr/bin/python3", "-u", "main.py"] + args
    sys.path[0] = d
    g = sys.modules["__main__"].__dict__
    for k in list(g):
        if k not in ("__name__", "__builtins__"):
            del g[k]
    g.update(__annotations__={}, __doc__=None, __package__=None, __spec__=None, __file__=path, __cached__=None,
             __loader__=sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path))
    try:
        with open(path, "rb") as f:
            source = f.read()
        exec(compile(source, path, "exec", dont_inherit=True), g)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        # The hook prints the exception's own traceback: drop ours from it.
        e.__traceback__ = tb
        sys.excepthook(type(e), e, tb)
        if isinstance(e, KeyboardInterrupt):
            import signal
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        e = tb = None
        sys.exit(1)
_nv()
"#;

/// Environment variables that act when an interpreter starts, so a warm one
/// would ignore them.
fn acts_at_start_up(name: &str) -> bool {
    name.starts_with("PYTHON")
        || name.starts_with("LC_")
        || name.starts_with("LD_")
        || name.starts_with("MALLOC_")
        || name.starts_with("NODE_")
        || name.starts_with("UV_")
        || matches!(name, "LANG" | "LANGUAGE" | "HOME" | "TZ" | "GLIBC_TUNABLES")
}

/// One started interpreter waiting for its code.
pub struct Warm {
    pub child: Child,
    pub dir: PathBuf,
    control: OwnedFd,
    limits: Limits,
}

impl Warm {
    /// Writes the source file and hands the interpreter its arguments and
    /// environment; from here on it runs the program.
    pub fn start(self, plan: &Plan) -> std::io::Result<Child> {
        exec::write_source(&self.dir, plan)?;
        let mut msg = Vec::new();
        msg.extend_from_slice(plan.args.len().to_string().as_bytes());
        msg.push(0);
        for a in &plan.args {
            msg.extend_from_slice(a.as_bytes());
            msg.push(0);
        }
        for (k, v) in &plan.env {
            msg.extend_from_slice(k.as_bytes());
            msg.push(b'=');
            msg.extend_from_slice(v.as_bytes());
            msg.push(0);
        }
        // Closing the pipe ends the message. Written here where the pipe
        // takes it all (the common case), since the request is waiting:
        // under TCG a blocking-pool thread for the write cost a restored VM
        // 25-55 ms. The rest (a large environment and arguments fill the
        // pipe; an interpreter still starting reads only when it is up) is
        // written by a task on the reactor. A failed write (the interpreter
        // died) shows as the program's own failure.
        let rest = match write_nonblocking(&self.control, &msg) {
            Ok(n) => msg.split_off(n),
            Err(e) => {
                tracing::warn!("cannot hand the code to the warm interpreter: {e}");
                return Ok(self.child);
            }
        };
        if !rest.is_empty() {
            let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(self.control)?;
            tokio::spawn(async move {
                if let Err(e) = pipe.write_all(&rest).await {
                    tracing::warn!("cannot hand the code to the warm interpreter: {e}");
                }
            });
        }
        Ok(self.child)
    }
}

/// Writes what the pipe `fd` takes now, leaving it non-blocking; returns
/// how much.
fn write_nonblocking(fd: &OwnedFd, data: &[u8]) -> std::io::Result<usize> {
    use nix::errno::Errno;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    let mut done = 0;
    while done < data.len() {
        match nix::unistd::write(fd, &data[done..]) {
            Ok(n) => done += n,
            Err(Errno::EAGAIN) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// The interpreters started ahead, one per warm language.
pub struct WarmSet {
    ready: Mutex<HashMap<String, Warm>>,
    /// Set once [`WarmSet::start`] has run: a request that arrives right
    /// after readiness waits for it rather than starting a second interpreter.
    started: watch::Sender<bool>,
}

impl Default for WarmSet {
    fn default() -> Self {
        Self {
            ready: Mutex::default(),
            started: watch::Sender::new(false),
        }
    }
}

/// How long a request waits for the warm interpreters to be started (the
/// spawn itself takes milliseconds; this bounds a stuck one).
const WAIT_FOR_START: Duration = Duration::from_secs(2);

impl WarmSet {
    /// Starts one interpreter for each of `languages` that can be started
    /// ahead and is installed; failures are logged (executions then start
    /// their own).
    pub fn start(&self, languages: &[String], installed: &[crate::languages::Language]) {
        for lang in languages {
            if !installed.iter().any(|l| &l.name == lang) {
                continue;
            }
            match spawn(lang) {
                Ok(w) => {
                    if let Ok(mut r) = self.ready.lock() {
                        r.insert(lang.clone(), w);
                    }
                }
                Err(e) => tracing::warn!(language = %lang, "cannot start a warm interpreter: {e}"),
            }
        }
        self.started.send_replace(true);
    }

    /// The warm interpreter for `plan`, if there is one and it can run it as
    /// a fresh one would.
    pub async fn take(&self, plan: &Plan) -> Option<Warm> {
        let mut started = self.started.subscribe();
        let _ = tokio::time::timeout(WAIT_FOR_START, started.wait_for(|s| *s)).await;
        let mut ready = self.ready.lock().ok()?;
        let w = ready.get_mut(plan.language.as_str())?;
        if !matches!(w.child.try_wait(), Ok(None)) {
            tracing::warn!(language = %plan.language, "the warm interpreter has died; starting a fresh one");
            ready.remove(plan.language.as_str());
            return None;
        }
        if w.limits != plan.limits {
            tracing::info!(language = %plan.language, "fresh interpreter: the request's rlimits differ from the warm one's");
            return None;
        }
        if let Some(k) = plan.env.keys().find(|k| acts_at_start_up(k)) {
            tracing::info!(language = %plan.language, "fresh interpreter: {k} acts at interpreter start-up");
            return None;
        }
        ready.remove(plan.language.as_str())
    }
}

impl WarmSet {
    /// The languages whose interpreter is started and blocked reading its
    /// code (fd 3), waiting up to `timeout` for the rest: a snapshot taken
    /// then holds them ready.
    pub async fn settle(&self, timeout: Duration) -> Vec<String> {
        let mut started = self.started.subscribe();
        let _ = tokio::time::timeout(timeout, started.wait_for(|s| *s)).await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (waiting, all) = {
                let Ok(ready) = self.ready.lock() else {
                    return Vec::new();
                };
                let waiting: Vec<String> = ready
                    .iter()
                    .filter(|(_, w)| w.child.id().is_some_and(blocked_on_control))
                    .map(|(l, _)| l.clone())
                    .collect();
                let all = waiting.len() == ready.len();
                (waiting, all)
            };
            if all || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces the warm interpreters whose random state was fixed at start
    /// and cannot be reseeded from inside (V8 seeds `Math.random` once, at
    /// start-up): after a restore they would repeat every other restored
    /// VM's numbers. Python seeds `random` when it is imported, which the
    /// bootstrap does not do before the program runs.
    pub fn restart_unreseedable(&self) {
        let Ok(mut ready) = self.ready.lock() else { return };
        for lang in ["javascript"] {
            if let Some(old) = ready.remove(lang) {
                // The new one gets the old one's work directory: a program
                // sees the same cwd as in a VM that was never restored.
                let dir = old.dir.clone();
                drop(old);
                match spawn_in(lang, Some(dir)) {
                    Ok(w) => {
                        ready.insert(lang.to_string(), w);
                    }
                    Err(e) => tracing::warn!(language = lang, "cannot restart a warm interpreter: {e}"),
                }
            }
        }
    }
}

/// Whether process `pid` is blocked in `read(3, ...)` (its control pipe),
/// from `/proc/<pid>/syscall`: the syscall number (0 is read on x86_64)
/// and its first argument.
fn blocked_on_control(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .map(|s| is_read_of_fd3(&s))
        .unwrap_or(false)
}

fn is_read_of_fd3(syscall: &str) -> bool {
    let mut f = syscall.split_whitespace();
    matches!((f.next(), f.next()), (Some("0"), Some("0x3")))
}

fn spawn(language: &str) -> std::io::Result<Warm> {
    spawn_in(language, None)
}

/// Starts `language` ahead in `dir`, or in a new work directory.
fn spawn_in(language: &str, dir: Option<PathBuf>) -> std::io::Result<Warm> {
    let (program, argv) = bootstrap(language)
        .ok_or_else(|| std::io::Error::other(format!("{language} cannot be started ahead")))?;
    let dir = match dir {
        Some(d) => d,
        None => exec::create_workdir()?,
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let limits = Limits::default();
    let mut cmd = Command::new(program);
    cmd.args(&argv)
        .current_dir(&dir)
        .env_clear()
        .envs(exec::base_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let fd = read.as_raw_fd();
    exec::confine_child(&mut cmd, limits, Some(fd));
    let child = cmd.spawn()?;
    drop(read);
    Ok(Warm {
        child,
        dir,
        control: write,
        limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_variables_force_a_fresh_interpreter() {
        for k in [
            "PYTHONPATH",
            "PYTHONHASHSEED",
            "LC_ALL",
            "LANG",
            "HOME",
            "TZ",
            "LD_PRELOAD",
        ] {
            assert!(acts_at_start_up(k), "{k}");
        }
        for k in ["FOO", "NEUROVISOR_TRACE_ID", "PATH_INFO"] {
            assert!(!acts_at_start_up(k), "{k}");
        }
        assert!(bootstrap("python").is_some() && bootstrap("javascript").is_some());
        assert!(bootstrap("bash").is_none());
    }

    #[test]
    fn a_read_of_the_control_pipe_is_recognized() {
        assert!(is_read_of_fd3("0 0x3 0x7f12 0x10000 0x0 0x0 0x0 0x7ffd 0x7f34\n"));
        assert!(!is_read_of_fd3("0 0x4 0x7f12 0x10000 0x0 0x0 0x0 0x7ffd 0x7f34"));
        assert!(!is_read_of_fd3(
            "7 0x7ffd 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd 0x7f34"
        ));
        assert!(!is_read_of_fd3("running"));
    }
}
