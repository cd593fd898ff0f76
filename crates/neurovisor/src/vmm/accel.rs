//! Chooses between hardware KVM and QEMU's TCG emulation.
//!
//! `/dev/kvm` existing is not enough: on PVM hosts (`kvm_pvm`, pagetable-based
//! virtualization without VMX/SVM) a standard guest kernel runs only in
//! instruction emulation and effectively never boots, so PVM counts as unusable.

use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// An accelerator and why it was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// What the host offers, gathered from the filesystem so detection can be tested.
#[derive(Debug, Clone, Default)]
pub struct KvmProbe {
    pub dev_kvm_exists: bool,
    /// Error from opening `/dev/kvm` read-write, if it failed.
    pub open_error: Option<String>,
    /// `KVM_GET_API_VERSION`, when the device opened.
    pub api_version: Option<i32>,
    pub pvm_module: bool,
    /// `kvm_intel` or `kvm_amd` is loaded.
    pub hw_module: bool,
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: i32 = 12;

impl KvmProbe {
    pub fn host() -> Self {
        let sys = Path::new("/sys/module");
        let mut probe = Self {
            dev_kvm_exists: Path::new("/dev/kvm").exists(),
            pvm_module: sys.join("kvm_pvm").exists(),
            hw_module: sys.join("kvm_intel").exists() || sys.join("kvm_amd").exists(),
            ..Default::default()
        };
        if probe.dev_kvm_exists {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a value.
                Ok(f) => probe.api_version = Some(unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION) }),
                Err(e) => probe.open_error = Some(e.to_string()),
            }
        }
        probe
    }

    /// Is hardware KVM usable, and why (not)?
    pub fn verdict(&self) -> Result<String, String> {
        if !self.dev_kvm_exists {
            return Err("/dev/kvm does not exist (no KVM on this host)".into());
        }
        if let Some(e) = &self.open_error {
            return Err(format!("/dev/kvm cannot be opened read-write: {e}"));
        }
        if self.pvm_module {
            return Err("/dev/kvm is PVM (kvm_pvm module): standard guest kernels run only in instruction emulation there".into());
        }
        if self.api_version != Some(KVM_API_VERSION) {
            return Err(format!("unexpected KVM API version {:?}", self.api_version));
        }
        if !self.hw_module {
            return Err("neither kvm_intel nor kvm_amd is loaded (no hardware virtualization)".into());
        }
        Ok("hardware KVM is available".into())
    }
}

/// Picks the accelerator: `forced` wins, else KVM when it is usable, else TCG.
pub fn choose(forced: Option<Accel>, probe: &KvmProbe) -> AccelChoice {
    match (forced, probe.verdict()) {
        (Some(Accel::Tcg), _) => AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG requested".into(),
        },
        (Some(Accel::Kvm), v) => AccelChoice {
            accel: Accel::Kvm,
            reason: match v {
                Ok(r) => format!("KVM requested; {r}"),
                Err(r) => format!("KVM requested although {r}"),
            },
        },
        (None, Ok(r)) => AccelChoice {
            accel: Accel::Kvm,
            reason: r,
        },
        (None, Err(r)) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!("using TCG emulation: {r}"),
        },
    }
}

/// The host's TSC rate in kHz, measured once per process (~10 ms).
///
/// Under TCG the guest's `rdtsc` returns the host's TSC, and microvm offers the
/// guest nothing but the PIT to calibrate it against; on a busy host those
/// calibrations fail or hang. `tsc_early_khz=` and `lpj=` derived from this
/// rate skip them (see [`super::qemu::tcg_timer_cmdline`]).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    use std::time::{Duration, Instant};
    // SAFETY: rdtsc has no preconditions on x86-64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(10));
    let (c1, t1) = (tsc(), Instant::now());
    let nanos = t1.duration_since(t0).as_nanos() as u64;
    let khz = c1.checked_sub(c0)?.checked_mul(1_000_000)? / nanos.max(1);
    // Anything outside 100 MHz .. 10 GHz is a measurement gone wrong.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_rate_is_plausible() {
        let khz = host_tsc_khz().expect("x86-64 host");
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
    }

    fn good() -> KvmProbe {
        KvmProbe {
            dev_kvm_exists: true,
            open_error: None,
            api_version: Some(12),
            pvm_module: false,
            hw_module: true,
        }
    }

    #[test]
    fn pvm_is_unusable() {
        let probe = KvmProbe {
            pvm_module: true,
            ..good()
        };
        let c = choose(None, &probe);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("PVM"), "{}", c.reason);
    }

    #[test]
    fn hardware_kvm_is_used_and_overrides_win() {
        assert_eq!(choose(None, &good()).accel, Accel::Kvm);
        assert_eq!(choose(Some(Accel::Tcg), &good()).accel, Accel::Tcg);
        let none = KvmProbe::default();
        assert_eq!(choose(None, &none).accel, Accel::Tcg);
        assert!(choose(None, &none).reason.contains("does not exist"));
        let denied = KvmProbe {
            open_error: Some("Permission denied".into()),
            ..good()
        };
        assert!(choose(None, &denied).reason.contains("Permission denied"));
    }
}
