//! A guest that breaks the protocol (issue 10 part 5: guest output is untrusted
//! input), in real VMs: the image is the cached default rootfs with the agent
//! replaced by `neurovisor-agent-misbehave` (the agent built with its
//! test-only `misbehave` feature), which misbehaves when the request's env has
//! `NV_MISBEHAVE=<mode>` (see `crates/guest-agent/src/misbehave.rs`).
//!
//! The image is built here, in seconds: `cargo build` of the misbehaving
//! agent (a no-op when up to date), then a copy of the default rootfs whose
//! `/usr/sbin/neurovisor-agent` is swapped with `debugfs` (e2fsprogs). It is
//! cached under `<cache>/test-images/misbehave-<key>/`, keyed by the agent
//! binary and the base image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_no_leftovers, env_with_images, unowned_vm_cgroups, TestEnv};
use neurovisor::images::ImageSet;
use neurovisor::{ExecError, ExecRequest, Output, VmSize};

const AGENT_BIN: &str = "neurovisor-agent-misbehave";
/// The console log cap of the host (`vmm::capped_log::CONSOLE_LOG_CAP`).
const CONSOLE_CAP: u64 = neurovisor::vmm::capped_log::CONSOLE_LOG_CAP;

fn run_tool(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (the hostile-guest image needs it)"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    run_tool(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// `target/release` (or `debug`): the test binary is in its `deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Builds (if needed) the misbehaving agent and returns its path.
fn misbehaving_agent() -> PathBuf {
    let profile_dir = target_dir();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "neurovisor-guest-agent",
        "--features",
        "misbehave",
        "--bin",
        AGENT_BIN,
    ]);
    if release {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    run_tool(&mut cmd);
    let bin = profile_dir.join(AGENT_BIN);
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// The default image with the misbehaving agent as init (built once, cached).
fn hostile_images() -> ImageSet {
    static IMAGES: OnceLock<ImageSet> = OnceLock::new();
    IMAGES.get_or_init(build_hostile_images).clone()
}

fn build_hostile_images() -> ImageSet {
    let base = common::images("default");
    let agent = misbehaving_agent();
    let base_rootfs = std::fs::canonicalize(&base.rootfs).expect("base rootfs");
    let key_text = format!("{}\n{}\n", sha256(&agent), base_rootfs.display());
    let key_file = std::env::temp_dir().join(format!("nv-hostile-key-{}", std::process::id()));
    std::fs::write(&key_file, &key_text).expect("key");
    let key = sha256(&key_file)[..16].to_string();
    let _ = std::fs::remove_file(&key_file);

    let root = neurovisor::config::cache_dir().join("test-images");
    let dir = root.join(format!("misbehave-{key}"));
    let rootfs = dir.join("rootfs.ext4");
    if !rootfs.is_file() {
        std::fs::create_dir_all(&root).expect("cache dir");
        let tmp = root.join(format!(".build-{key}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        let img = tmp.join("rootfs.ext4");
        run_tool(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&base_rootfs)
                .arg(&img),
        );
        std::fs::copy(
            base_rootfs.with_file_name("languages.json"),
            tmp.join("languages.json"),
        )
        .expect("languages.json");
        // /sbin is a symlink to usr/sbin in the bookworm image.
        let script = format!(
            "cd /usr/sbin\nrm neurovisor-agent\nwrite {} neurovisor-agent\n\
             sif neurovisor-agent mode 0100755\nsif neurovisor-agent uid 0\nsif neurovisor-agent gid 0\n",
            agent.display()
        );
        let cmds = tmp.join("debugfs.cmds");
        std::fs::write(&cmds, script).expect("debugfs script");
        run_tool(Command::new("debugfs").arg("-w").arg("-f").arg(&cmds).arg(&img));
        let stat = run_tool(
            Command::new("debugfs")
                .arg("-R")
                .arg("stat /usr/sbin/neurovisor-agent")
                .arg(&img),
        );
        let size = std::fs::metadata(&agent).expect("agent").len();
        assert!(
            stat.contains("Mode:  0755") && stat.contains(&format!("Size: {size}")),
            "agent not replaced: {stat}"
        );
        // Older builds of this image are of no use any more.
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("misbehave-") && e.path() != dir {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        // Another test binary may have won the race: either copy is the same.
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    ImageSet::resolve(&neurovisor::images::ImageSelection {
        image: Some("default".into()),
        kernel: Some(base.kernel.clone()),
        rootfs: Some(rootfs),
    })
    .expect("hostile image")
}

fn hostile_env() -> TestEnv {
    env_with_images(hostile_images())
}

fn misbehave(mode: &str) -> ExecRequest {
    let mut r = ExecRequest::new("python", "print('never run')");
    r.env.insert("NV_MISBEHAVE".into(), mode.into());
    r
}

/// Nothing of the test's VMs is left: processes, directories, cgroups.
fn assert_all_clean(env: &TestEnv) {
    env.assert_clean();
    let cgroups = unowned_vm_cgroups();
    assert!(cgroups.is_empty(), "VM cgroups left behind: {cgroups:?}");
}

/// The execution in `mode` must fail.
async fn refused(env: &TestEnv, mode: &str) -> ExecError {
    match env.try_run(&misbehave(mode)).await {
        Ok(r) => panic!("{mode}: accepted, stdout {:?}", r.out()),
        Err(e) => e,
    }
}

fn no_raw_controls(text: &str) -> bool {
    !text.chars().any(|c| c.is_control() && c != '\n')
        && !text.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z"))
}

#[tokio::test]
async fn output_past_the_cap_is_cut_by_the_host_and_flagged() {
    let env = hostile_env();
    // 50 x 16 KiB = 800 KiB: past the cap, but under the discard ceiling.
    let mut req = misbehave("flood");
    req.max_output_bytes = 16 << 10;
    let ran = env
        .try_run(&req)
        .await
        .expect("flood within the ceiling completes");
    assert_eq!(ran.stdout.len(), 16 << 10, "the host forwarded more than the cap");
    assert!(ran.stdout.iter().all(|&b| b == b'F'));
    let o = &ran.outcome;
    // The guest claimed nothing was truncated; the host saw 50 x the cap.
    assert!(o.stdout_truncated && !o.stderr_truncated, "{o:?}");
    assert_eq!(o.stdout_bytes, 50 * (16 << 10), "{o:?}");
    assert_eq!(o.exit_code, Some(0));
    assert_all_clean(&env);
}

#[tokio::test]
async fn a_guest_streaming_far_past_the_cap_is_stopped_in_bounded_time() {
    let env = hostile_env();
    // The default cap (1 MiB): the guest streams 50 MiB.
    let mut req = misbehave("flood");
    req.timeout = Duration::from_secs(120);
    let mut forwarded = 0usize;
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            forwarded += b.len();
        }
    };
    let mut vm = env.sandbox.boot(VmSize::Small).await.expect("boot");
    let started = Instant::now();
    let result = vm.execute(&req, &mut sink).await;
    let took = started.elapsed();
    vm.destroy().await;
    let e = result.expect_err("a guest ignoring the cap must not complete");
    assert!(matches!(e, ExecError::Protocol(_)), "{e}");
    assert!(
        e.to_string().contains("ignored the output cap of 1048576 bytes"),
        "{e}"
    );
    assert_eq!(forwarded as u64, req.max_output_bytes);
    // 50 MiB at the vsock rate limit (16 MiB/s) would take 3 s and more; the
    // host stops after the cap + 1 MiB, long before the deadline.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_all_clean(&env);
}

#[tokio::test]
async fn an_absurd_exit_status_is_a_protocol_error() {
    let env = hostile_env();
    for (mode, want) in [
        ("signal", "signal 4096 (must be 1..=64)"),
        ("exit-code", "exit code -7 (must be 0..=255)"),
        ("both", "both exit code 0 and signal 9"),
    ] {
        let e = env
            .try_run(&misbehave(mode))
            .await
            .err()
            .unwrap_or_else(|| panic!("{mode}: accepted"));
        assert!(matches!(e, ExecError::Protocol(_)), "{mode}: {e}");
        let text = e.to_string();
        assert!(
            text.contains("the guest sent an invalid value") && text.contains(want),
            "{mode}: {text}"
        );
        assert!(!e.is_invalid_request(), "{mode}: not the user's fault");
    }
    assert_all_clean(&env);
}

#[tokio::test]
async fn control_characters_from_the_guest_never_reach_host_text() {
    let env = hostile_env();
    let e = refused(&env, "control").await;
    let text = e.to_string();
    assert!(
        no_raw_controls(&text) && !text.contains('\n'),
        "raw guest controls: {text:?}"
    );
    assert!(
        text.contains("\\u{1b}[2J") && text.contains("forged log line"),
        "{text}"
    );
    // The Health fields came through the same sanitizer at boot.
    assert_all_clean(&env);
}

#[tokio::test]
async fn chunks_after_the_exit_status_are_ignored() {
    let env = hostile_env();
    let ran = env.try_run(&misbehave("after-exit")).await.expect("runs");
    assert_eq!(ran.out(), "before exit\n");
    assert_eq!(ran.outcome.exit_code, Some(0));
    assert_eq!(ran.outcome.stdout_bytes, 12);
    assert!(!ran.outcome.stdout_truncated);
    assert_all_clean(&env);
}

#[tokio::test]
async fn a_frame_over_the_limit_is_a_protocol_error() {
    let env = hostile_env();
    let started = Instant::now();
    let e = refused(&env, "huge-frame").await;
    assert!(matches!(e, ExecError::Protocol(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "over the {}-byte limit",
            neurovisor::exec::MAX_GUEST_MESSAGE
        )),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_all_clean(&env);
}

#[tokio::test]
async fn the_console_log_stays_under_its_cap() {
    let env = hostile_env();
    let mut vm = env.sandbox.boot(VmSize::Small).await.expect("boot");
    let dir = vm.dir().expect("vm dir").to_path_buf();
    let mut out = Vec::new();
    let mut sink = |o: Output<'_>| {
        if let Output::Stdout(b) = o {
            out.extend_from_slice(b);
        }
    };
    let mut req = misbehave("console");
    req.timeout = Duration::from_secs(60);
    let result = vm.execute(&req, &mut sink).await;
    let console = dir.join("console.log");
    let meta = std::fs::metadata(&console).expect("console.log");
    let text = String::from_utf8_lossy(&std::fs::read(&console).expect("read console")).into_owned();
    vm.destroy().await;
    result.expect("console flood runs");
    let out = String::from_utf8_lossy(&out).into_owned();
    let written: u64 = out
        .trim()
        .strip_prefix("console bytes written: ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {out:?}"));
    eprintln!(
        "guest wrote {written} bytes to its console; console.log is {} bytes",
        meta.len()
    );
    assert!(
        written > CONSOLE_CAP + (64 << 10),
        "the guest wrote only {written} bytes to its console"
    );
    assert!(
        meta.len() <= CONSOLE_CAP + 512,
        "console.log is {} bytes",
        meta.len()
    );
    assert!(text.contains("log capped at 1048576 bytes"), "no truncation note");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_all_clean(&env);
}

/// `neurovisor run`: a protocol error exits 125 with one line; a rejection
/// full of escapes exits 2 and neither its line nor the debug log shows them raw.
#[test]
fn the_cli_reports_hostile_guests_in_one_clean_line() {
    let images = hostile_images();
    let state = tempfile::Builder::new()
        .prefix("nvhg-")
        .tempdir()
        .expect("state dir");
    let run = |mode: &str| {
        Command::new(env!("CARGO_BIN_EXE_neurovisor"))
            .args(["run", "--size", "small", "--lang", "python", "-c", "print(1)"])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--rootfs")
            .arg(&images.rootfs)
            .args(["-e", &format!("NV_MISBEHAVE={mode}")])
            .env("NEUROVISOR_STATE_DIR", state.path())
            .env("NEUROVISOR_LOG", "neurovisor=debug")
            // The host's own log colors would hide raw guest escapes.
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run neurovisor")
    };
    let o = run("signal");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(125), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("neurovisor: ") && last.contains("the guest sent an invalid value: signal 4096"),
        "{err}"
    );
    let o = run("control");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        no_raw_controls(&err),
        "raw guest controls in the CLI's output: {err:?}"
    );
    assert!(err.contains("\\u{1b}[2J"), "{err}");
    assert_no_leftovers(state.path());
}
