//! Proves that capabilities the daemon drops cannot be raised again: a thread
//! restricts itself to the VM management role's set minus CAP_SYS_ADMIN (and the
//! API role's empty set), then tries to regain CAP_SYS_ADMIN every way it can.
//! A second thread drops to the guest-I/O role's set (nothing: `nv-guest`
//! threads, which read guest bytes) and must get EPERM for mount and setuid.
//! Run as root: `cargo run --example capabilities_proof`. Exits non-zero if a
//! dropped capability came back or a privileged call succeeded.

use caps::{CapSet, Capability};
use neurovisor::security::caps::restrict_thread;

fn check(failures: &mut u32, what: &str, regained: bool) {
    println!("  {} {what}", if regained { "FAIL" } else { "ok  " });
    if regained {
        *failures += 1;
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("capabilities_proof needs root (it drops capabilities it must first have)");
        std::process::exit(2);
    }
    let failures = std::thread::spawn(|| {
        let mut failures = 0;
        let before = caps::read(None, CapSet::Effective).map(|s| s.len()).unwrap_or(0);
        restrict_thread(&[Capability::CAP_KILL]).expect("restrict");
        let eff = caps::read(None, CapSet::Effective).expect("read");
        println!(
            "effective capabilities: {before} before, {} after: {eff:?}",
            eff.len()
        );
        check(&mut failures, "only CAP_KILL left in effective", eff.len() != 1);
        check(
            &mut failures,
            "raise CAP_SYS_ADMIN into effective refused",
            caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_ok(),
        );
        let mut all = caps::read(None, CapSet::Permitted).expect("read");
        all.insert(Capability::CAP_SYS_ADMIN);
        check(
            &mut failures,
            "add CAP_SYS_ADMIN back to permitted refused",
            caps::set(None, CapSet::Permitted, &all).is_ok(),
        );
        check(
            &mut failures,
            "CAP_SYS_ADMIN gone from the bounding set",
            caps::has_cap(None, CapSet::Bounding, Capability::CAP_SYS_ADMIN).unwrap_or(true),
        );
        check(
            &mut failures,
            "ambient raise of CAP_SYS_ADMIN refused",
            caps::raise(None, CapSet::Ambient, Capability::CAP_SYS_ADMIN).is_ok(),
        );
        let host = c"proof";
        // SAFETY: plain syscall; needs CAP_SYS_ADMIN, which must be gone.
        let rc = unsafe { libc::sethostname(host.as_ptr(), 5) };
        check(
            &mut failures,
            "sethostname() (needs CAP_SYS_ADMIN) refused",
            rc == 0,
        );
        let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
        check(
            &mut failures,
            "NoNewPrivs set (exec cannot grant privileges)",
            nnp != 1,
        );
        // Exec a set-uid/file-capability binary cannot help either: NoNewPrivs.
        failures
    })
    .join()
    .expect("thread");
    let failures = failures
        + std::thread::spawn(|| {
            let mut failures = 0;
            println!("guest-I/O role (nv-guest): no capabilities at all");
            restrict_thread(&[]).expect("restrict");
            for (set, name) in [
                (CapSet::Effective, "effective"),
                (CapSet::Permitted, "permitted"),
                (CapSet::Inheritable, "inheritable"),
                (CapSet::Bounding, "bounding"),
                (CapSet::Ambient, "ambient"),
            ] {
                let n = caps::read(None, set).map(|s| s.len()).unwrap_or(usize::MAX);
                check(&mut failures, &format!("{name} set empty ({n} left)"), n != 0);
            }
            let eperm =
                |rc: i32| rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            // SAFETY: plain syscalls that need CAP_SYS_ADMIN / CAP_SETUID, which must be gone.
            let rc = unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/mnt".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            check(&mut failures, "mount() fails with EPERM", !eperm(rc));
            // The raw syscall changes only this thread (glibc's setuid would change all).
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 1, 1, 1) } as i32;
            check(&mut failures, "setresuid(1) fails with EPERM", !eperm(rc));
            failures
        })
        .join()
        .expect("thread");
    if failures > 0 {
        println!("FAIL: {failures} check(s) did not hold");
        std::process::exit(1);
    }
    println!("PASS: dropped capabilities stayed dropped");
}
