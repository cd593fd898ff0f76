//! `neurovisor images`: build and list the guest images.
//!
//! The build scripts are embedded in the binary, so `neurovisor images build`
//! works from any directory; they cache their outputs outside the repository,
//! keyed by a hash of their inputs.

use std::path::PathBuf;

use clap::Subcommand;
use neurovisor::images::{default_kernel, image_dir, ImageSelection, ImageSet};

use super::EXIT_SANDBOX_ERROR;

const SCRIPTS: &[(&str, &str)] = &[
    (
        "build-kernel.sh",
        include_str!("../../../../images/build-kernel.sh"),
    ),
    (
        "build-rootfs.sh",
        include_str!("../../../../images/build-rootfs.sh"),
    ),
    (
        "kernel/microvm.config",
        include_str!("../../../../images/kernel/microvm.config"),
    ),
];

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build (or find cached) the guest kernel and a root filesystem image.
    Build {
        /// Which image: `default` (python, bash, javascript), `full` (adds go, rust) or `desktop` (a desktop with Chromium, for desktop sandboxes).
        #[arg(long, default_value = "default", conflicts_with = "profile")]
        image: String,
        /// The image a sandbox profile's VMs boot: its base image with the
        /// packages of its capabilities installed (cached by the package list).
        #[arg(long, value_name = "NAME|FILE")]
        profile: Option<String>,
        /// Guest agent binary to install as the VM's init
        /// (default: `neurovisor-agent` next to this executable).
        #[arg(long, env = "NEUROVISOR_AGENT_BIN")]
        agent: Option<PathBuf>,
    },
    /// Show the images in use and what they can run.
    List,
}

fn agent_binary(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("guest agent binary {} does not exist", p.display()))
        };
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("neurovisor-agent")))
        .filter(|p| p.is_file());
    sibling.ok_or_else(|| {
        "guest agent binary `neurovisor-agent` not found next to this executable; build it with \
         `cargo build --release -p neurovisor-guest-agent` or pass --agent PATH"
            .to_string()
    })
}

async fn run_script(dir: &std::path::Path, script: &str, args: &[String]) -> Result<(), String> {
    let status = tokio::process::Command::new("bash")
        .arg(dir.join(script))
        .args(args)
        .status()
        .await
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{script} failed ({status})"))
    }
}

async fn build(image: String, profile: Option<String>, agent: Option<PathBuf>) -> Result<(), String> {
    let mut extra = Vec::new();
    let image = match profile {
        None => image,
        Some(name) => {
            let p = super::profile::store().load(&name).map_err(|e| e.to_string())?;
            if p.needs_derived_image() {
                println!(
                    "neurovisor: profile {}: image {} = {} + {}",
                    p.name,
                    p.image,
                    p.base_image,
                    p.capabilities.packages.join(", ")
                );
                extra = vec![
                    "--packages".to_string(),
                    p.capabilities.packages.join(","),
                    "--name".to_string(),
                    p.image.clone(),
                ];
            }
            p.base_image
        }
    };
    if !image
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || image.is_empty()
    {
        return Err(format!(
            "invalid image name '{image}' (use default, full or desktop)"
        ));
    }
    let agent = agent_binary(agent)?;
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    for (name, text) in SCRIPTS {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    run_script(dir.path(), "build-kernel.sh", &[]).await?;
    run_script(
        dir.path(),
        "build-rootfs.sh",
        &[
            vec![
                "--image".into(),
                image,
                "--agent".into(),
                agent.display().to_string(),
            ],
            extra,
        ]
        .concat(),
    )
    .await
}

pub async fn images(cmd: ImagesCommand) -> u8 {
    match cmd {
        ImagesCommand::Build {
            image,
            profile,
            agent,
        } => match build(image, profile, agent).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("neurovisor: image build failed: {e}");
                EXIT_SANDBOX_ERROR
            }
        },
        ImagesCommand::List => {
            println!("kernel   {}", default_kernel().display());
            for name in ["default", "full", "desktop"] {
                let sel = ImageSelection {
                    image: Some(name.into()),
                    ..Default::default()
                };
                match ImageSet::resolve(&sel) {
                    Ok(set) => {
                        let langs: Vec<String> = set
                            .languages
                            .iter()
                            .map(|l| format!("{} {}", l.name, l.version))
                            .collect();
                        println!("{name:<8} {} ({})", set.rootfs.display(), langs.join(", "));
                    }
                    Err(_) => println!("{name:<8} not built ({})", image_dir(name).display()),
                }
            }
            0
        }
    }
}
