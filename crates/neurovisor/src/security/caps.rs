//! Capabilities the daemon keeps after start-up, per thread role.
//!
//! Linux capability sets are per thread, so each daemon thread drops to its
//! role's set when it is confined (see [`super::seccomp`]): API threads keep
//! nothing; VM management threads keep [`VM_ROLE_CAPS`], because they build
//! the VMM processes' jails (those drop everything before exec). Everything
//! else leaves the effective, permitted, inheritable, ambient *and* bounding
//! sets, and NoNewPrivs is set, so nothing can be regained, not even by
//! exec'ing a set-uid or file-capability binary.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("cannot change capabilities ({what}): {source}")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set NoNewPrivs: {0}")]
    NoNewPrivs(std::io::Error),
}

/// What VM management threads keep, and why.
pub const VM_ROLE_CAPS: &[(Capability, &str)] = &[
    (
        Capability::CAP_SYS_ADMIN,
        "new mount/PID/network/IPC/UTS namespaces, mounts and pivot_root for a VMM's jail",
    ),
    (Capability::CAP_SETUID, "switch a jailed VMM to its VM's uid"),
    (
        Capability::CAP_SETGID,
        "switch a jailed VMM to its VM's gid and groups",
    ),
    (
        Capability::CAP_SETPCAP,
        "empty a jailed VMM's bounding set before it execs",
    ),
    (
        Capability::CAP_CHOWN,
        "give a VM directory's group to the VM's jail gid",
    ),
    (
        Capability::CAP_KILL,
        "signal VMM processes that run under jail uids",
    ),
];

/// Extra capabilities for Firecracker's jailer (it creates device nodes and
/// chroots itself) and for updating BPF maps (feature `ebpf`).
pub const FIRECRACKER_JAILER_CAPS: &[Capability] = &[
    Capability::CAP_MKNOD,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_FOWNER,
    Capability::CAP_NET_ADMIN,
];
pub const EBPF_CAPS: &[Capability] = &[Capability::CAP_BPF, Capability::CAP_PERFMON];
/// For `--network`: each VM's gateway creates its TAP, address and nftables
/// rules inside the VM's own network namespace (then drops every capability).
pub const NETWORK_CAPS: &[Capability] = &[Capability::CAP_NET_ADMIN];

/// The capability set of VM management threads.
pub fn vm_role_caps(firecracker_jailer: bool, ebpf: bool, network: bool) -> Vec<Capability> {
    let mut v: Vec<Capability> = VM_ROLE_CAPS.iter().map(|(c, _)| *c).collect();
    if firecracker_jailer {
        v.extend_from_slice(FIRECRACKER_JAILER_CAPS);
    }
    if network && !v.contains(&Capability::CAP_NET_ADMIN) {
        v.extend_from_slice(NETWORK_CAPS);
    }
    if ebpf {
        v.extend_from_slice(EBPF_CAPS);
    }
    v
}

/// The `/proc/<pid>/status` hex mask (`CapEff:` etc.) of a set.
pub fn mask(set: &[Capability]) -> u64 {
    set.iter().fold(0, |m, c| m | c.bitmask())
}

/// Restricts the calling thread to `keep`: the bounding set loses everything
/// else, ambient and inheritable are emptied, permitted and effective become
/// `keep` (as far as the thread has them), and NoNewPrivs is set.
pub fn restrict_thread(keep: &[Capability]) -> Result<(), CapsError> {
    let keep_set: CapsHashSet = keep.iter().copied().collect();
    let err = |what| move |source| CapsError::Caps { what, source };
    // Bounding-set drops need CAP_SETPCAP in effect, so that one goes last.
    let mut bounding: Vec<Capability> = caps::read(None, CapSet::Bounding)
        .map_err(err("read bounding"))?
        .into_iter()
        .filter(|c| !keep_set.contains(c))
        .collect();
    bounding.sort_by_key(|c| *c == Capability::CAP_SETPCAP);
    let may_drop = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false);
    if may_drop {
        for c in bounding {
            caps::drop(None, CapSet::Bounding, c).map_err(err("drop from bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err("clear ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(err("clear inheritable"))?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(err("read permitted"))?;
    let new: CapsHashSet = keep_set.intersection(&permitted).copied().collect();
    caps::set(None, CapSet::Effective, &new).map_err(err("set effective"))?;
    caps::set(None, CapSet::Permitted, &new).map_err(err("set permitted"))?;
    set_no_new_privs()
}

/// Sets NoNewPrivs on the calling thread (inherited by its children).
pub fn set_no_new_privs() -> Result<(), CapsError> {
    // SAFETY: plain prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(CapsError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_the_kernel_numbering() {
        assert_eq!(mask(&[Capability::CAP_CHOWN]), 1);
        assert_eq!(mask(&[Capability::CAP_SYS_ADMIN]), 1 << 21);
        let vm = vm_role_caps(false, false, false);
        assert!(!vm.contains(&Capability::CAP_SYS_PTRACE));
        assert!(!vm.contains(&Capability::CAP_NET_RAW));
        assert!(!vm.contains(&Capability::CAP_SYS_MODULE));
    }

    #[test]
    fn a_restricted_thread_cannot_regain_what_it_dropped() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            restrict_thread(&[Capability::CAP_KILL]).expect("restrict");
            let eff = caps::read(None, CapSet::Effective).expect("read");
            assert_eq!(eff, [Capability::CAP_KILL].into_iter().collect());
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_err());
            assert!(!caps::has_cap(None, CapSet::Bounding, Capability::CAP_SYS_ADMIN).expect("bnd"));
        })
        .join()
        .expect("thread");
    }
}
