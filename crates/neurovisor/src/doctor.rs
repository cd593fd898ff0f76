//! Host checks: can this machine run NeuroVisor VMs, and what fixes what is missing.

use std::path::Path;

use serde::Serialize;

use crate::images::{self, ImageSelection, ImageSet, BUILD_HINT};
use crate::vmm::accel::KvmProbe;
use crate::vmm::find_binary;
use crate::vmm::firecracker::{decide_jailer, FIRECRACKER_HINT, JAILER_HINT};
use crate::vmm::qemu::{QemuOptions, QEMU_HINT, VHOST_VSOCK_HINT};
use crate::vmm::select::{choice_for_host, firecracker_binary, BackendKind, BackendOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, but not at full strength (e.g. TCG instead of KVM).
    Warn,
    /// Optional part missing.
    Info,
    /// NeuroVisor cannot run until this is fixed.
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// The command or step that fixes it, when not OK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.map(str::to_string),
    }
}

fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "version unknown".into())
}

/// How cgroups are mounted on this host.
pub fn cgroup_mode() -> &'static str {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let is_v2 = |p: &str| {
        statfs(p)
            .map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
    };
    if is_v2("/sys/fs/cgroup") {
        "v2 (unified)"
    } else if is_v2("/sys/fs/cgroup/unified") {
        "hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified)"
    } else if Path::new("/sys/fs/cgroup/memory").exists() {
        "v1"
    } else {
        "none"
    }
}

pub fn run_checks(qemu: &QemuOptions, sel: &ImageSelection) -> Vec<Check> {
    run_checks_with(
        &BackendOptions {
            qemu: qemu.clone(),
            ..Default::default()
        },
        sel,
    )
}

/// Firecracker and its jailer, and which backend `--backend` picks here and why.
pub fn backend_checks(opts: &BackendOptions) -> Vec<Check> {
    let mut out = Vec::new();
    let fc = &opts.firecracker;
    out.push(match firecracker_binary(fc) {
        Some(p) => check(
            "firecracker",
            Level::Ok,
            format!("{} ({})", p.display(), version_of(&p)),
            None,
        ),
        None => check(
            "firecracker",
            Level::Info,
            "not found: VMs run on QEMU (Firecracker is for hosts with hardware KVM)",
            Some(FIRECRACKER_HINT),
        ),
    });
    let jailer = match fc.jailer {
        Some(false) => None,
        _ => find_binary(fc.jailer_bin.as_deref(), "jailer"),
    };
    let is_root = nix::unistd::geteuid().is_root();
    out.push(
        match (decide_jailer(fc.jailer, jailer.as_deref(), is_root), &jailer) {
            (Ok((Some(p), _)), _) => check(
                "jailer",
                Level::Ok,
                format!("{} ({}): Firecracker VMs run jailed", p.display(), version_of(&p)),
                None,
            ),
            (Ok((None, why)), None) if fc.jailer.is_none() => {
                check("jailer", Level::Info, why, Some(JAILER_HINT))
            }
            (Ok((None, why)), _) => check("jailer", Level::Info, why, None),
            (Err(e), _) => check("jailer", Level::Fail, e.to_string(), Some(JAILER_HINT)),
        },
    );
    let choice = choice_for_host(opts);
    let kind = |k: BackendKind| match k {
        BackendKind::Auto => "auto",
        BackendKind::Firecracker => "firecracker",
        BackendKind::Qemu => "qemu",
    };
    out.push(check(
        "backend",
        Level::Ok,
        format!("{} -> {}: {}", kind(opts.kind), kind(choice.kind), choice.reason),
        None,
    ));
    out
}

pub fn run_checks_with(opts: &BackendOptions, sel: &ImageSelection) -> Vec<Check> {
    let qemu = &opts.qemu;
    let mut out = Vec::new();
    let probe = KvmProbe::host();
    out.push(match probe.verdict() {
        Ok(r) => check("kvm", Level::Ok, r, None),
        Err(r) => check(
            "kvm",
            Level::Warn,
            format!("{r}; VMs run under QEMU TCG emulation (slower, still isolated)"),
            Some("on a host with VMX/SVM: load kvm_intel or kvm_amd and give this user access to /dev/kvm"),
        ),
    });
    out.push(
        match find_binary(qemu.qemu_bin.as_deref(), "qemu-system-x86_64") {
            Some(p) => check(
                "qemu",
                Level::Ok,
                format!("{} ({})", p.display(), version_of(&p)),
                None,
            ),
            None => check(
                "qemu",
                Level::Fail,
                "qemu-system-x86_64 not found",
                Some(QEMU_HINT),
            ),
        },
    );
    out.push(
        match find_binary(qemu.vhost_vsock_bin.as_deref(), "vhost-device-vsock") {
            Some(p) => check(
                "vhost-device-vsock",
                Level::Ok,
                format!("{} ({})", p.display(), version_of(&p)),
                None,
            ),
            None => check(
                "vhost-device-vsock",
                Level::Fail,
                "not found on PATH or in ~/.cargo/bin",
                Some(VHOST_VSOCK_HINT),
            ),
        },
    );
    out.extend(backend_checks(opts));
    match ImageSet::resolve(sel) {
        Ok(set) => {
            out.push(check("kernel", Level::Ok, set.kernel.display().to_string(), None));
            out.push(check(
                "rootfs",
                Level::Ok,
                format!(
                    "image '{}' at {} ({})",
                    set.name,
                    set.rootfs.display(),
                    set.language_names()
                ),
                None,
            ));
        }
        Err(images::ImageError::MissingKernel(p)) => {
            out.push(check(
                "kernel",
                Level::Fail,
                format!("missing: {}", p.display()),
                Some(BUILD_HINT),
            ));
        }
        Err(e) => out.push(check("rootfs", Level::Fail, e.to_string(), Some(BUILD_HINT))),
    }
    if sel.image.as_deref().unwrap_or("default") == "default" && sel.rootfs.is_none() {
        let full = images::image_dir("full").join("rootfs.ext4");
        out.push(if full.is_file() {
            check("rootfs (full)", Level::Ok, full.display().to_string(), None)
        } else {
            check(
                "rootfs (full)",
                Level::Info,
                "optional image with Go and Rust is not built",
                Some("neurovisor images build --image full"),
            )
        });
    }
    let mode = cgroup_mode();
    out.push(check(
        "cgroups",
        if mode == "none" { Level::Warn } else { Level::Ok },
        mode,
        None,
    ));
    out.extend(security_checks());
    out
}

/// The host-side defense layers this host can run.
fn security_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(if root {
        check(
            "jail",
            Level::Ok,
            "VMM processes jailed (own uid, namespaces, private root); daemon threads confined (seccomp, capabilities)",
            None,
        )
    } else {
        check(
            "jail",
            Level::Warn,
            "not root: VMM processes run unjailed and the daemon keeps its privileges",
            Some("run neurovisor as root"),
        )
    });
    out.push(match crate::security::seccomp::compile("api") {
        Ok(_) => check(
            "seccomp",
            Level::Ok,
            "allowlists compile for this architecture",
            None,
        ),
        Err(e) => check("seccomp", Level::Fail, e.to_string(), None),
    });
    use crate::security::lsm;
    out.push(match lsm::bpf_lsm_status() {
        Ok(true) => check(
            "bpf lsm",
            Level::Ok,
            if cfg!(feature = "ebpf") {
                "active; the daemon loads its file_open policy"
            } else {
                "active (build with --features ebpf to use it)"
            },
            None,
        ),
        Ok(false) => check(
            "bpf lsm",
            Level::Info,
            lsm::enable_hint(&lsm::active_lsms().unwrap_or_default()),
            None,
        ),
        Err(e) => check(
            "bpf lsm",
            Level::Info,
            e.to_string(),
            Some("mount -t securityfs securityfs /sys/kernel/security"),
        ),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::FirecrackerOptions;

    #[test]
    fn backend_checks_report_firecracker_jailer_and_the_choice() {
        let opts = BackendOptions {
            firecracker: FirecrackerOptions {
                firecracker_bin: Some("/nonexistent/firecracker".into()),
                jailer: Some(false),
                ..Default::default()
            },
            ..Default::default()
        };
        let checks = backend_checks(&opts);
        let get = |n: &str| checks.iter().find(|c| c.name == n).expect(n);
        assert_eq!(get("firecracker").level, Level::Info);
        assert!(
            get("jailer").detail.contains("disabled"),
            "{}",
            get("jailer").detail
        );
        let b = get("backend");
        assert!(
            b.detail.starts_with("auto -> qemu: QEMU: no firecracker binary"),
            "{}",
            b.detail
        );
    }
}
