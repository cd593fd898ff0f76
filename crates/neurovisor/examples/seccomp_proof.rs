//! Proves that the daemon's API-thread seccomp filter kills the process on a
//! forbidden syscall: a child installs the real `api` allowlist, shows that an
//! allowed call still works, then calls `mount` and must die of SIGSYS.
//! Run: `cargo run --example seccomp_proof`. Exits non-zero if the protection did not hold.

use neurovisor::security::seccomp;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

fn main() {
    let allowed = seccomp::allowed("api").expect("filter data");
    println!(
        "api filter: {} syscalls allowed; execve/mount/ptrace/bpf are not",
        allowed.len()
    );
    // SAFETY: single-threaded here; the child only makes raw syscalls and exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            if let Err(e) = seccomp::apply_to_current_thread("api") {
                eprintln!("install failed: {e}");
                unsafe { libc::_exit(3) };
            }
            // Allowed: getpid and write still work under the filter.
            let pid = unsafe { libc::getpid() };
            let msg = format!("child {pid}: filter installed, getpid() works; now calling mount()\n");
            unsafe { libc::write(1, msg.as_ptr().cast(), msg.len()) };
            let src = c"none";
            unsafe {
                libc::mount(
                    src.as_ptr(),
                    c"/mnt".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                );
            }
            // Reaching this line means the filter did not hold.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("wait") {
            WaitStatus::Signaled(_, sig, _) if sig == nix::sys::signal::Signal::SIGSYS => {
                println!("PASS: the child was killed by {sig:?} at mount(); the kill action held");
            }
            other => {
                println!("FAIL: the child ended with {other:?}, not SIGSYS");
                std::process::exit(1);
            }
        },
    }
}
