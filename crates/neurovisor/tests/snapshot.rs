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
        .failure(VmSize::Small, &warm())
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
    let why = only_mem.failure(VmSize::Medium, &warm()).await.expect("failure");
    assert!(why.contains("must both exist"), "{why}");
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_is_cached_by_its_inputs_and_rebuilt_when_the_rootfs_changes() {
    let env = common::env();
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

    // A changed rootfs (another file): a new template, the stale one removed.
    let mut images = common::images("default");
    let copy = env.state.path().join("rootfs-copy.ext4");
    let st = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&images.rootfs)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(st.success());
    images.rootfs = copy;
    let other = common::env_with_images(images);
    let rebuilt = Snapshots::new(source)
        .template(&other.sandbox, VmSize::Medium, &warm())
        .await
        .expect("rebuilt");
    assert_ne!(rebuilt.state, first.state);
    assert!(!dir.exists(), "the stale template {} was kept", dir.display());
    drop((first, again, rebuilt));
    env.assert_clean();
    other.assert_clean();
}
