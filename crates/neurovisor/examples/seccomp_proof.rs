//! Proves that the daemon's API-thread seccomp filter kills the process on a
//! forbidden syscall: a child installs the real `api` allowlist, shows that an
//! allowed call still works, then calls `mount` and must die of SIGSYS.
//! Then the guest-I/O role (`nv-guest` threads, which read guest bytes): a
//! child confined to it still uses AF_UNIX sockets, and dies of SIGSYS at
//! execve, mount, openat, an AF_INET socket and a clone into a new namespace.
//! Argument conditions: the api role dies at socket(AF_ALG) and at
//! ioctl(TIOCSTI) (typing into a terminal) while isatty's TCGETS works; under
//! the vm role io_uring_setup answers ENOSYS (QEMU then uses epoll).
//! Run: `cargo run --example seccomp_proof`. Exits non-zero if the protection did not hold.

use neurovisor::security::{caps, seccomp};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// Forks a child confined to the guest role that runs `call`; returns how it ended.
fn in_guest_role(filters: &seccomp::RoleFilters, call: fn() -> i32) -> WaitStatus {
    // SAFETY: single-threaded here; the child makes raw syscalls and exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            if let Err(e) = filters.install(seccomp::Role::Guest) {
                eprintln!("install failed: {e}");
                unsafe { libc::_exit(3) };
            }
            let code = call();
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("wait"),
    }
}

fn guest_role() -> bool {
    let filters = seccomp::RoleFilters::new(caps::vm_role_caps(false, false, false), "vm").expect("filters");
    let allowed = seccomp::allowed("guest").expect("guest filter");
    println!("guest filter: {} syscalls allowed", allowed.len());
    let mut ok = true;
    // Allowed: a Unix socket (the vsock CONNECT), write, close.
    match in_guest_role(&filters, || unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return 1;
        }
        libc::close(fd);
        0
    }) {
        WaitStatus::Exited(_, 0) => println!("PASS: guest role: socket(AF_UNIX) and close work"),
        other => {
            println!("FAIL: guest role: an allowed socket(AF_UNIX) ended with {other:?}");
            ok = false;
        }
    }
    type Probe = (&'static str, fn() -> i32);
    let forbidden: [Probe; 5] = [
        ("execve", || unsafe {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null());
            0
        }),
        ("mount", || unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/mnt".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            );
            0
        }),
        ("openat", || unsafe {
            libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
            0
        }),
        ("socket(AF_INET)", || unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            0
        }),
        ("clone(CLONE_NEWNS)", || unsafe {
            libc::syscall(libc::SYS_clone, libc::CLONE_NEWNS | libc::SIGCHLD, 0, 0, 0, 0);
            0
        }),
    ];
    for (name, call) in forbidden {
        match in_guest_role(&filters, call) {
            WaitStatus::Signaled(_, sig, _) if sig == nix::sys::signal::Signal::SIGSYS => {
                println!("PASS: guest role: killed by {sig:?} at {name}")
            }
            other => {
                println!("FAIL: guest role: {name} ended with {other:?}, not SIGSYS");
                ok = false;
            }
        }
    }
    ok
}

fn main() {
    if !guest_role() {
        std::process::exit(1);
    }
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
            // socket(): the api role allows AF_INET (and AF_UNIX, AF_INET6, AF_NETLINK) only.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                unsafe { libc::_exit(4) };
            }
            let msg = format!(
                "child {pid}: filter installed, getpid() and socket(AF_INET) work; now calling mount()\n"
            );
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
    // Argument conditions: the api role may not open other socket families
    // (AF_ALG: the kernel's crypto API, an attack surface it never needs),
    // nor make ioctls beyond the terminal/descriptor ones std and tokio use;
    // under the vm role io_uring answers ENOSYS (QEMU probes it).
    let killed = |s: &WaitStatus| matches!(s, WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _));
    let exited_0 = |s: &WaitStatus| matches!(s, WaitStatus::Exited(_, 0));
    type Check = (&'static str, &'static str, fn() -> i32, fn(&WaitStatus) -> bool);
    let checks: [Check; 4] = [
        (
            "api",
            "killed by SIGSYS at socket(AF_ALG)",
            || unsafe {
                libc::socket(libc::AF_ALG, libc::SOCK_SEQPACKET, 0);
                0
            },
            killed,
        ),
        (
            "api",
            "ioctl(TCGETS) (isatty) works",
            || unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                // fd 0 need not be a terminal: any answer but a kill is fine.
                libc::ioctl(0, libc::TCGETS, &mut t);
                0
            },
            exited_0,
        ),
        (
            "api",
            "killed by SIGSYS at ioctl(TIOCSTI)",
            || unsafe {
                let c: libc::c_char = b'x' as libc::c_char;
                libc::ioctl(0, libc::TIOCSTI, &c);
                0
            },
            killed,
        ),
        (
            "vm",
            "io_uring_setup answers ENOSYS",
            || unsafe {
                let mut params = [0u8; 120];
                let r = libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr());
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                i32::from(!(r < 0 && errno == libc::ENOSYS))
            },
            exited_0,
        ),
    ];
    for (role, what, call, expected) in checks {
        let status = in_filter(role, call);
        if expected(&status) {
            println!("PASS: {role} role: {what}");
        } else {
            println!("FAIL: {role} role: expected \"{what}\", got {status:?}");
            std::process::exit(1);
        }
    }
}

/// Forks a child under filter `name` (with its ENOSYS filter) that runs
/// `call` and exits with its result; returns how the child ended.
fn in_filter(name: &str, call: fn() -> i32) -> WaitStatus {
    // SAFETY: single-threaded here; the child makes raw syscalls and exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            if seccomp::apply_to_current_thread(name).is_err() {
                unsafe { libc::_exit(3) };
            }
            let code = call();
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("wait"),
    }
}
