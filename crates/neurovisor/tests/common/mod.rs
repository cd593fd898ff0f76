//! Shared helpers for the VM integration tests: a sandbox with its own state
//! directory, and the check that nothing of a test's VMs is left on the host.
#![allow(dead_code)]

pub mod daemon;
pub mod otlp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use neurovisor::images::{ImageSelection, ImageSet};
use neurovisor::vmm::qemu::QemuOptions;
use neurovisor::vmm::QemuBackend;
use neurovisor::{ExecError, ExecOutcome, ExecRequest, Output, Sandbox, VmSize};

pub struct TestEnv {
    pub state: tempfile::TempDir,
    pub sandbox: Sandbox,
}

pub fn images(name: &str) -> ImageSet {
    ImageSet::resolve(&ImageSelection {
        image: Some(name.into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("the VM tests need the guest images: {e}"))
}

pub fn env() -> TestEnv {
    env_with_image("default")
}

pub fn env_with_image(name: &str) -> TestEnv {
    env_with_images(images(name))
}

/// A sandbox on the QEMU backend booting `images`.
pub fn env_with_images(images: ImageSet) -> TestEnv {
    // NV_TEST_LOG=neurovisor=debug shows what the library logs (a restore's
    // steps, why one failed) in the test's output.
    if let Ok(filter) = std::env::var("NV_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let state = tempfile::Builder::new()
        .prefix("nvtest-")
        .tempdir()
        .expect("state dir");
    let backend = QemuBackend::new(&QemuOptions::default()).expect("qemu backend");
    let sandbox = Sandbox::new(Arc::new(backend), images, state.path().to_path_buf());
    TestEnv { state, sandbox }
}

/// The result of one execution with its output collected.
pub struct Ran {
    pub outcome: ExecOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Ran {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl TestEnv {
    pub async fn try_run(&self, req: &ExecRequest) -> Result<Ran, ExecError> {
        self.try_run_sized(req, VmSize::Small).await
    }

    pub async fn try_run_sized(&self, req: &ExecRequest, size: VmSize) -> Result<Ran, ExecError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut sink = |o: Output<'_>| match o {
            Output::Stdout(b) => stdout.extend_from_slice(b),
            Output::Stderr(b) => stderr.extend_from_slice(b),
        };
        let outcome = self.sandbox.run(req, size, &mut sink).await?;
        Ok(Ran {
            outcome,
            stdout,
            stderr,
        })
    }

    pub async fn run(&self, lang: &str, code: &str) -> Ran {
        self.run_req(&ExecRequest::new(lang, code)).await
    }

    pub async fn run_req(&self, req: &ExecRequest) -> Ran {
        self.try_run(req)
            .await
            .unwrap_or_else(|e| panic!("{} execution failed: {e}", req.language))
    }

    pub fn assert_clean(&self) {
        assert_no_leftovers(self.state.path());
    }
}

/// Host processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

/// No VM process, socket or directory of this state dir remains.
pub fn assert_no_leftovers(state: &Path) {
    let procs = processes_mentioning(&state.display().to_string());
    assert!(procs.is_empty(), "VM processes left behind: {procs:#?}");
    let vms: PathBuf = state.join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM state left behind: {left:?}");
}

/// VM cgroups (`<memory or v2 root>/neurovisor/vm-*`) that no live VM holds: a live
/// `VmCgroup` keeps an flock on its first directory. Checked twice, 300 ms
/// apart, so a cgroup caught between its mkdir and its lock is not reported.
pub fn unowned_vm_cgroups() -> Vec<PathBuf> {
    let scan = || {
        let mut found = Vec::new();
        // The locked directory: the v1 memory one, or the v2 one.
        for base in ["/sys/fs/cgroup/memory/neurovisor", "/sys/fs/cgroup/neurovisor"] {
            for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
                let p = e.path();
                if !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vm-"))
                {
                    continue;
                }
                let Ok(f) = std::fs::File::open(&p) else { continue };
                if nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
                    found.push(p);
                }
            }
        }
        found
    };
    let first = scan();
    if first.is_empty() {
        return first;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = scan();
    first
        .into_iter()
        .filter(|p| second.contains(p) && p.exists())
        .collect()
}

/// The `neurovisor` binary as a user runs it, with a state directory of its
/// own (and no profiles of the user's); dropping it checks that nothing of
/// its VMs is left.
pub struct Cli {
    pub state: tempfile::TempDir,
    /// `NEUROVISOR_LOG` for its commands (none: the binary's default).
    log: Option<&'static str>,
}

impl Cli {
    pub fn new() -> Self {
        Self {
            state: tempfile::Builder::new()
                .prefix("nvcli-")
                .tempdir()
                .expect("state dir"),
            log: None,
        }
    }

    /// Commands log at `filter` (e.g. `neurovisor=info`) on stderr.
    pub fn logging(filter: &'static str) -> Self {
        let mut cli = Self::new();
        cli.log = Some(filter);
        cli
    }

    pub fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_neurovisor"));
        c.args(args)
            .env("NEUROVISOR_STATE_DIR", self.state.path())
            // No profiles of the user's: only the built-in ones.
            .env("NEUROVISOR_CONFIG_DIR", self.state.path())
            .env_remove("NEUROVISOR_NET_UPSTREAM_NETNS")
            .env_remove("NEUROVISOR_NET_DNS")
            .stdin(std::process::Stdio::null());
        match self.log {
            Some(f) => c.env("NEUROVISOR_LOG", f),
            None => c.env_remove("NEUROVISOR_LOG"),
        };
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().expect("run neurovisor")
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_leftovers(self.state.path());
        }
    }
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Busy loops on the host, one per core asked for; killed and reaped when
/// dropped.
pub struct Load(Vec<std::process::Child>);

impl Load {
    pub fn start(n: usize) -> Self {
        Self(
            (0..n)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("start a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
