//! Which Linux Security Modules the running kernel has active, and whether
//! the BPF LSM is among them.
//!
//! The eBPF file policy ([`super::ebpf`], cargo feature `ebpf`) only takes
//! effect when `bpf` is in the active LSM list; a kernel built with
//! `CONFIG_BPF_LSM=y` still leaves it off unless the boot command line's
//! `lsm=` names it. This module is not feature-gated so start-up and
//! `neurovisor doctor` can say so (with the fix) in every build.

use std::io;
use std::path::{Path, PathBuf};

/// Where securityfs publishes the comma-separated list of active LSMs.
pub const LSM_LIST_PATH: &str = "/sys/kernel/security/lsm";

/// Why the active LSM list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LsmStatusError {
    /// The file is missing: securityfs is not mounted (or the kernel has no
    /// securityfs at all).
    #[error(
        "{} not found: securityfs is not mounted \
         (mount -t securityfs securityfs /sys/kernel/security)",
        path.display()
    )]
    NotMounted {
        /// The path that was read.
        path: PathBuf,
    },
    /// Any other read error (permissions, I/O).
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The path that was read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Whether `bpf` is in the kernel's active LSM list
/// (`/sys/kernel/security/lsm`).
///
/// `Ok(false)` means BPF LSM programs would load but never run; tell the
/// operator [`enable_hint`]. An error means the list could not be read at all
/// (most often securityfs is not mounted).
pub fn bpf_lsm_status() -> Result<bool, LsmStatusError> {
    bpf_lsm_status_at(Path::new(LSM_LIST_PATH))
}

/// [`bpf_lsm_status`] reading the list from `path` (for tests, or a
/// securityfs mounted elsewhere).
pub fn bpf_lsm_status_at(path: &Path) -> Result<bool, LsmStatusError> {
    Ok(active_lsms_at(path)?.iter().any(|name| name == "bpf"))
}

/// The active LSMs in the kernel's order, e.g. `["lockdown", "capability", "bpf"]`.
pub fn active_lsms() -> Result<Vec<String>, LsmStatusError> {
    active_lsms_at(Path::new(LSM_LIST_PATH))
}

/// [`active_lsms`] reading the list from `path`.
pub fn active_lsms_at(path: &Path) -> Result<Vec<String>, LsmStatusError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_lsm_list(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LsmStatusError::NotMounted {
            path: path.to_owned(),
        }),
        Err(source) => Err(LsmStatusError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Splits the comma-separated list (the file has no trailing newline on most
/// kernels, but tolerate one).
pub fn parse_lsm_list(text: &str) -> Vec<String> {
    text.trim()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The message to show when the BPF LSM is not active: the `lsm=` value to
/// put on the kernel command line, keeping the LSMs active now (replacing the
/// list with only `bpf` would silently turn the others off).
pub fn enable_hint(active: &[String]) -> String {
    let mut list: Vec<&str> = active
        .iter()
        .map(String::as_str)
        .filter(|s| *s != "bpf")
        .collect();
    list.push("bpf");
    format!(
        "BPF LSM not active: add lsm={} to the kernel command line and reboot \
         (the kernel also needs CONFIG_BPF_LSM=y)",
        list.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        assert_eq!(
            parse_lsm_list("lockdown,capability,landlock,bpf"),
            ["lockdown", "capability", "landlock", "bpf"]
        );
        assert_eq!(parse_lsm_list("capability,yama\n"), ["capability", "yama"]);
        assert!(parse_lsm_list("").is_empty());
    }

    #[test]
    fn detects_bpf_from_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let on = dir.path().join("on");
        std::fs::write(&on, "lockdown,capability,bpf").expect("write");
        assert!(bpf_lsm_status_at(&on).expect("readable"));
        let off = dir.path().join("off");
        // "bpffoo" must not count as "bpf".
        std::fs::write(&off, "capability,apparmor,bpffoo").expect("write");
        assert!(!bpf_lsm_status_at(&off).expect("readable"));
        let missing = dir.path().join("missing");
        let err = bpf_lsm_status_at(&missing).expect_err("missing file");
        assert!(matches!(err, LsmStatusError::NotMounted { .. }));
        assert!(err.to_string().contains("securityfs"), "{err}");
    }

    #[test]
    fn hint_keeps_the_active_lsms() {
        let active = parse_lsm_list("lockdown,capability,apparmor");
        let hint = enable_hint(&active);
        assert!(hint.contains("lsm=lockdown,capability,apparmor,bpf"), "{hint}");
    }
}
