//! Which VMM backend to use: `--backend auto|firecracker|qemu`.
//!
//! `auto` picks Firecracker when its binary is found and hardware KVM is
//! usable (Firecracker has no emulation fallback), QEMU otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::accel::KvmProbe;
use super::firecracker::{FirecrackerBackend, FirecrackerOptions};
use super::qemu::{QemuBackend, QemuOptions};
use super::{find_binary, VmmBackend, VmmError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Firecracker when its binary and hardware KVM are there, else QEMU.
    #[default]
    Auto,
    /// Firecracker (needs hardware KVM), jailed when the jailer is available.
    Firecracker,
    /// QEMU microvm (KVM, or TCG emulation without it).
    Qemu,
}

/// Options of every backend, and which one to use.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    pub kind: BackendKind,
    pub qemu: QemuOptions,
    pub firecracker: FirecrackerOptions,
}

/// A backend and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendChoice {
    /// `Firecracker` or `Qemu`, never `Auto`.
    pub kind: BackendKind,
    pub reason: String,
}

/// The decision, from what the host offers (`kvm` is [`KvmProbe::verdict`]).
pub fn choose_backend(
    kind: BackendKind,
    firecracker: Option<&Path>,
    kvm: &Result<String, String>,
) -> BackendChoice {
    let (kind, reason) = match kind {
        BackendKind::Qemu => (BackendKind::Qemu, "QEMU requested".to_string()),
        BackendKind::Firecracker => (
            BackendKind::Firecracker,
            match kvm {
                Ok(_) => "Firecracker requested".to_string(),
                Err(e) => format!("Firecracker requested although {e}"),
            },
        ),
        BackendKind::Auto => match (firecracker, kvm) {
            (Some(fc), Ok(k)) => (
                BackendKind::Firecracker,
                format!("Firecracker: {} found and {k}", fc.display()),
            ),
            (None, _) => (
                BackendKind::Qemu,
                "QEMU: no firecracker binary found (--firecracker-bin, NEUROVISOR_FIRECRACKER_BIN or PATH)"
                    .to_string(),
            ),
            (Some(_), Err(e)) => (
                BackendKind::Qemu,
                format!("QEMU: firecracker is installed but needs hardware KVM: {e}"),
            ),
        },
    };
    BackendChoice { kind, reason }
}

/// The `firecracker` binary the options point at (or the one on PATH).
pub fn firecracker_binary(opts: &FirecrackerOptions) -> Option<PathBuf> {
    find_binary(opts.firecracker_bin.as_deref(), "firecracker")
}

/// What `auto` (or the requested kind) means on this host.
pub fn choice_for_host(opts: &BackendOptions) -> BackendChoice {
    let fc = firecracker_binary(&opts.firecracker);
    choose_backend(opts.kind, fc.as_deref(), &KvmProbe::host().verdict())
}

/// Creates the chosen backend; logs and returns why it was chosen.
pub fn select_backend(opts: &BackendOptions) -> Result<(Arc<dyn VmmBackend>, String), VmmError> {
    let choice = choice_for_host(opts);
    tracing::info!(backend = ?choice.kind, "{}", choice.reason);
    let backend: Arc<dyn VmmBackend> = match choice.kind {
        BackendKind::Firecracker => Arc::new(FirecrackerBackend::new(&opts.firecracker)?),
        _ => Arc::new(QemuBackend::new(&opts.qemu)?),
    };
    Ok((backend, choice.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC: &str = "/usr/local/bin/firecracker";

    fn kvm_ok() -> Result<String, String> {
        Ok("hardware KVM is available".into())
    }

    fn kvm_pvm() -> Result<String, String> {
        Err("/dev/kvm is PVM (kvm_pvm module)".into())
    }

    #[test]
    fn auto_needs_both_firecracker_and_hardware_kvm() {
        let c = choose_backend(BackendKind::Auto, Some(Path::new(FC)), &kvm_ok());
        assert_eq!(c.kind, BackendKind::Firecracker);
        assert!(
            c.reason.contains(FC) && c.reason.contains("hardware KVM"),
            "{}",
            c.reason
        );

        let c = choose_backend(BackendKind::Auto, None, &kvm_ok());
        assert_eq!(c.kind, BackendKind::Qemu);
        assert!(c.reason.contains("no firecracker binary"), "{}", c.reason);

        let c = choose_backend(BackendKind::Auto, Some(Path::new(FC)), &kvm_pvm());
        assert_eq!(c.kind, BackendKind::Qemu);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
    }

    #[test]
    fn explicit_choices_win() {
        assert_eq!(
            choose_backend(BackendKind::Qemu, Some(Path::new(FC)), &kvm_ok()).kind,
            BackendKind::Qemu
        );
        let c = choose_backend(BackendKind::Firecracker, None, &kvm_pvm());
        assert_eq!(c.kind, BackendKind::Firecracker);
        assert!(c.reason.contains("although"), "{}", c.reason);
    }

    #[test]
    fn explicit_firecracker_without_binary_is_an_error() {
        let opts = BackendOptions {
            kind: BackendKind::Firecracker,
            firecracker: FirecrackerOptions {
                firecracker_bin: Some("/nonexistent/firecracker".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match select_backend(&opts) {
            Err(VmmError::MissingBinary { what, .. }) => assert_eq!(what, "firecracker"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("no firecracker binary, yet a backend"),
        }
    }
}
