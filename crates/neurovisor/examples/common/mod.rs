//! What the observability examples share: a QEMU sandbox on the default
//! image with its own state directory, and the exit status of a demo.

use std::sync::Arc;

use neurovisor::images::{ImageSelection, ImageSet};
use neurovisor::vmm::qemu::QemuOptions;
use neurovisor::vmm::QemuBackend;
use neurovisor::Sandbox;

/// A sandbox booting the default image on QEMU (TCG where KVM is unusable);
/// its state directory goes with the returned guard.
pub fn qemu_sandbox(prefix: &str) -> Result<(Sandbox, tempfile::TempDir), String> {
    let images = ImageSet::resolve(&ImageSelection {
        image: Some("default".into()),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let state = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| e.to_string())?;
    let backend = QemuBackend::new(&QemuOptions::default()).map_err(|e| e.to_string())?;
    let sandbox = Sandbox::new(Arc::new(backend), images, state.path().to_path_buf());
    Ok((sandbox, state))
}

/// 0 when every check held, 1 when one did not, 2 when the demo could not run.
pub fn exit_status(name: &str, result: Result<bool, String>) -> std::process::ExitCode {
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
