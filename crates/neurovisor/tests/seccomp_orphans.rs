//! The daemon's `nv-guest` threads (seccomp role `guest`) run a tokio runtime,
//! and every tokio runtime's driver reaps the process-wide queue of orphaned
//! children (a `tokio::process::Child` dropped before its process ended, as a
//! VM's keeper can be): the first time it finds one it registers its SIGCHLD
//! listener (`rt_sigaction`), then reaps with `wait4(WNOHANG)`. The guest
//! filter allowed neither, so an orphan reaped on an `nv-guest` thread
//! killed the whole daemon (`dmesg`: `comm="nv-guest" ... sig=31
//! syscall=13`). Here the orphan is made on an unconfined thread and reaped
//! by a runtime on a thread confined to the real guest filter; this test
//! process must survive it, and the child must not stay a zombie.
//!
//! One test in its own binary: the orphan queue and its SIGCHLD listener are
//! process-wide, set up once.

use std::time::Duration;

use neurovisor::security::seccomp;

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn an_orphan_reaped_on_a_guest_confined_thread_does_not_kill_the_daemon() {
    // An unconfined thread spawns a child and drops it while it runs: tokio
    // queues it as an orphan (nothing is reaped here: the runtime never
    // parks after the drop).
    let pid = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let child = tokio::process::Command::new("sleep")
                .arg("30")
                .kill_on_drop(false)
                .spawn()
                .expect("spawn sleep");
            let pid = child.id().expect("pid");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill");
            drop(child);
            pid
        })
    })
    .join()
    .expect("spawning thread");

    // A guest-confined thread drives its own runtime, as an nv-guest worker
    // does; its driver finds the orphan when it parks.
    let reaper = std::thread::Builder::new()
        .name("nv-guest-orphan".into())
        .spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            seccomp::apply_to_current_thread("guest").expect("guest filter");
            rt.block_on(async {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        })
        .expect("thread");
    reaper.join().expect("the confined thread");

    // Reaped (by the confined runtime or, after the first SIGCHLD, by any):
    // no zombie left behind.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Some(state) = state_of(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the orphan {pid} is still there (state {state})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
