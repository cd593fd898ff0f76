//! Snapshots (`--snapshot`): the template VM is built, cached by its inputs,
//! rebuilt when they change, and a snapshot that cannot be used gives a
//! clear reason while executions boot cold. These boot real VMs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use neurovisor::config::VmSize;
use neurovisor::snapshot::{SnapshotSource, Snapshots};
use neurovisor::ExecRequest;

fn warm() -> Vec<String> {
    vec!["python".to_string()]
}

fn print_one() -> ExecRequest {
    ExecRequest::new("python", "print(6 * 7)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_snapshot_file_is_named_and_executions_boot_cold() {
    let mut env = common::env();
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, mem) = (dir.path().join("snapshot_file"), dir.path().join("mem_file"));
    std::fs::write(&state, b"not a snapshot").expect("write");
    std::fs::write(&mem, b"too short for any VM").expect("write");
    let snaps = Arc::new(Snapshots::new(SnapshotSource::Files {
        state: state.clone(),
        mem: mem.clone(),
    }));
    env.sandbox.snapshots = Some(snaps.clone());
    let ran = env.run_req(&print_one()).await;
    assert_eq!(ran.out(), "42\n");
    let why = snaps
        .failure(&env.sandbox, VmSize::Small, &warm())
        .await
        .expect("the snapshot must be reported unusable");
    assert!(
        why.contains(&mem.display().to_string()) && why.contains("needs"),
        "the reason must name the file and the size it needs: {why}"
    );
    // Only one of the pair: refused with what to do.
    std::fs::remove_file(&state).expect("rm");
    let only_mem = Snapshots::new(SnapshotSource::Files { state, mem });
    assert!(only_mem
        .template(&env.sandbox, VmSize::Medium, &warm())
        .await
        .is_none());
    let why = only_mem
        .failure(&env.sandbox, VmSize::Medium, &warm())
        .await
        .expect("failure");
    assert!(why.contains("must both exist"), "{why}");
    env.assert_clean();
}

/// A copy of the default rootfs at `to` (sparse, a new file each time).
fn copy_rootfs(to: &std::path::Path) {
    let _ = std::fs::remove_file(to);
    let st = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&common::images("default").rootfs)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_is_cached_by_its_inputs_and_rebuilt_when_the_rootfs_changes() {
    let scratch = tempfile::tempdir().expect("scratch");
    let rootfs = scratch.path().join("rootfs.ext4");
    copy_rootfs(&rootfs);
    let mut images = common::images("default");
    images.rootfs = rootfs.clone();
    let env = common::env_with_images(images);
    let cache = env.state.path().join("snapshots");
    let source = SnapshotSource::Managed {
        cache_dir: cache.clone(),
    };
    let first = Snapshots::new(source.clone())
        .template(&env.sandbox, VmSize::Medium, &warm())
        .await
        .expect("the template builds");
    let dir = first.state.parent().expect("dir").to_path_buf();
    for f in ["state", "mem", "inputs.json"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let state_len = std::fs::metadata(&first.state).expect("state").len();
    assert!(
        state_len > 1000 && state_len < 4 << 20,
        "device state only (x-ignore-shared), got {state_len} bytes"
    );
    let mem = std::fs::metadata(&first.mem).expect("mem");
    assert_eq!(mem.len(), u64::from(VmSize::Medium.memory_mib()) << 20);
    assert!(
        mem.blocks() * 512 < mem.len(),
        "the memory image must be sparse: {} of {} bytes",
        mem.blocks() * 512,
        mem.len()
    );
    // Same inputs: the cached one is used, not rebuilt.
    let ino = std::fs::metadata(&first.state).expect("state").ino();
    let again = Snapshots::new(source.clone())
        .template(&env.sandbox, VmSize::Medium, &warm())
        .await
        .expect("cached");
    assert_eq!(again.state, first.state);
    assert_eq!(std::fs::metadata(&again.state).expect("state").ino(), ino);

    // A template of other images (the default rootfs) is another one, and
    // both stay: another process may be using the other.
    let other = common::env();
    let side = Snapshots::new(source.clone())
        .template(&other.sandbox, VmSize::Medium, &warm())
        .await
        .expect("a template of the default images");
    assert_ne!(side.state, first.state);
    assert!(dir.exists(), "a template still in use by its images was removed");

    // The rootfs is rebuilt (a new file at the same path): a new template,
    // the stale one removed.
    copy_rootfs(&rootfs);
    let rebuilt = Snapshots::new(source)
        .template(&env.sandbox, VmSize::Medium, &warm())
        .await
        .expect("rebuilt");
    assert_ne!(rebuilt.state, first.state);
    assert!(!dir.exists(), "the stale template {} was kept", dir.display());
    assert!(side.state.exists(), "the other images' template was removed");
    drop((first, again, rebuilt, side));
    env.assert_clean();
    other.assert_clean();
}

/// A sandbox whose VMs are restored from a template cached in its own state.
fn restoring_env() -> common::TestEnv {
    let mut env = common::env();
    env.sandbox.snapshots = Some(Arc::new(Snapshots::new(SnapshotSource::Managed {
        cache_dir: env.state.path().join("snapshots"),
    })));
    env
}

async fn run_on(
    vm: &mut neurovisor::ReadyVm,
    req: &ExecRequest,
) -> (neurovisor::ExecOutcome, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut sink = |o: neurovisor::Output<'_>| match o {
        neurovisor::Output::Stdout(b) => out.extend_from_slice(b),
        neurovisor::Output::Stderr(b) => err.extend_from_slice(b),
    };
    let outcome = vm.execute(req, &mut sink).await.expect("execute");
    (
        outcome,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_vms_are_unique_isolated_and_on_time() {
    let env = restoring_env();
    // Both from one snapshot, alive at the same time.
    let mut a = env
        .sandbox
        .boot_warm(VmSize::Small, &warm())
        .await
        .expect("restore a");
    let mut b = env
        .sandbox
        .boot_warm(VmSize::Small, &warm())
        .await
        .expect("restore b");
    assert!(a.restored && b.restored, "both VMs must come from the snapshot");
    assert_ne!(a.id(), b.id());
    let probe = ExecRequest::new(
        "python",
        "import os, random, uuid, time, pathlib\n\
         mark = pathlib.Path('/tmp/nv-written-by-a-sibling')\n\
         seen = mark.exists()\n\
         mark.write_text('x')\n\
         print(os.urandom(16).hex(), random.random(), uuid.uuid4(), repr(time.time()), seen)\n",
    );
    let mut seen = Vec::new();
    for vm in [&mut a, &mut b] {
        let (o, out, err) = run_on(vm, &probe).await;
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert_eq!(o.exit_code, Some(0), "{out}{err}");
        assert!(o.restored && o.warm_interpreter, "{o:?}");
        let f: Vec<String> = out.split_whitespace().map(String::from).collect();
        assert_eq!(f.len(), 5, "{out}");
        let guest_now: f64 = f[3].parse().expect("time");
        assert!(
            (host_now - guest_now).abs() < 1.0,
            "the restored VM's clock is {guest_now}, the host's {host_now}"
        );
        assert_eq!(
            f[4], "False",
            "a write in one restored VM is visible in the other"
        );
        seen.push(f);
    }
    for (i, what) in ["os.urandom(16)", "random.random()", "uuid.uuid4()"]
        .iter()
        .enumerate()
    {
        assert_ne!(seen[0][i], seen[1][i], "{what} is the same in two restored VMs");
    }
    a.destroy().await;
    b.destroy().await;
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_vm_runs_every_language() {
    let env = restoring_env();
    for (lang, code, want) in [
        (
            "python",
            "import sys; print(sys.argv[0].endswith('main.py'), __name__)",
            "True __main__\n",
        ),
        ("bash", "echo \"$((6 * 7)) $(id -u)\"", "42 1000\n"),
        (
            "javascript",
            "console.log([1, 2, 3].map(x => x * 2).join(','))",
            "2,4,6\n",
        ),
    ] {
        let mut vm = env
            .sandbox
            .boot_warm(VmSize::Small, &warm())
            .await
            .expect("restore");
        assert!(vm.restored, "{lang}: not restored");
        let (o, out, err) = run_on(&mut vm, &ExecRequest::new(lang, code)).await;
        assert_eq!((o.exit_code, out.as_str()), (Some(0), want), "{lang}: {err}");
        vm.destroy().await;
    }
    env.assert_clean();
}

/// `neurovisor serve --snapshot`, confined as in production: its pool's VMs
/// are restored (each unlike the others), the template outlives the daemon
/// under `<state>/snapshots`, and nothing else of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_snapshot_serves_restored_vms_and_keeps_its_template() {
    let d = common::daemon::start_daemon(&["--warm", "2", "--max", "3", "--snapshot"]);
    d.wait_warm(2);
    let mut c = d.client().await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        // Refilled before each request: one taken before the pool has
        // restored its replacement is restored on demand (not `warm`).
        tokio::task::block_in_place(|| d.wait_warm(2));
        let r = c
            .execute_once(common::daemon::req(
                "python",
                "import os; print(os.urandom(16).hex())",
            ))
            .await
            .expect("execute")
            .into_inner();
        assert_eq!(r.exit_code, Some(0), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(r.restored && r.warm, "not a restored VM from the pool: {r:?}");
        assert!(
            seen.insert(r.stdout.clone()),
            "two restored VMs gave the same random bytes"
        );
    }
    let snapshots = d.dir.join("snapshots");
    // Held past the daemon: its state directory is removed with the last holder.
    let _state = d.state.clone();
    let d_log = d.log_text();
    drop(c);
    d.stop();
    let templates: Vec<_> = std::fs::read_dir(&snapshots)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(templates.len(), 1, "{templates:?}\n{d_log}");
    assert!(templates[0].join("state").is_file() && templates[0].join("mem").is_file());
}

/// A snapshot whose device state is damaged (its memory file is right):
/// each restore fails and that VM boots instead, so every execution still
/// answers; after three failures in a row the snapshot is given up with
/// QEMU's reason, and the user's files are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_given_up_while_every_execution_boots() {
    let mut env = common::env();
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, mem) = (dir.path().join("snapshot_file"), dir.path().join("mem_file"));
    let source = SnapshotSource::Files {
        state: state.clone(),
        mem: mem.clone(),
    };
    // Made there, as the seed's `--snapshot-file`/`--mem-file` do when missing.
    Snapshots::new(source.clone())
        .template(&env.sandbox, VmSize::Small, &warm())
        .await
        .expect("the snapshot is made");
    let good = std::fs::read(&state).expect("state");
    std::fs::write(&state, &good[..good.len() / 2]).expect("truncate the device state");
    let snaps = Arc::new(Snapshots::new(source));
    env.sandbox.snapshots = Some(snaps.clone());
    for _ in 0..4 {
        let ran = env.run_req(&print_one()).await;
        assert_eq!(ran.out(), "42\n");
        assert!(
            !ran.outcome.restored,
            "a corrupt snapshot restored: {:?}",
            ran.outcome
        );
    }
    let why = snaps
        .failure(&env.sandbox, VmSize::Small, &warm())
        .await
        .expect("the snapshot must be given up after failing three times");
    assert!(why.contains("QEMU refused the snapshot"), "{why}");
    assert!(
        state.is_file() && mem.is_file(),
        "the user's snapshot files were removed"
    );
    env.assert_clean();
}
