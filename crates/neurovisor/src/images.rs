//! Guest images: the kernel and the root filesystems, where they are and what they can run.
//!
//! Images are built by the scripts under `images/` in the repository (embedded in
//! the binary, run by `neurovisor images build`) and cached outside the repo,
//! keyed by a hash of their inputs. Stable names point at the current build:
//! `<cache>/vmlinux` and `<cache>/images/<name>/{rootfs.ext4,languages.json}`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::cache_dir;

/// The command that builds missing images, quoted in every error about them.
pub const BUILD_HINT: &str = "neurovisor images build";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest kernel not found at {0}; build it with `{BUILD_HINT}` (or pass --kernel PATH)")]
    MissingKernel(PathBuf),
    #[error("root filesystem image '{name}' not found at {path}; build it with `{BUILD_HINT}{extra}` (or pass --rootfs PATH)")]
    MissingRootfs {
        name: String,
        path: PathBuf,
        extra: String,
    },
    #[error("cannot read the language list {path}: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("image build failed: {0}")]
    Build(String),
}

/// One language an image can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Language {
    pub name: String,
    pub version: String,
}

/// A kernel plus a root filesystem, ready to boot.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub name: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub languages: Vec<Language>,
    /// Its desktop (`desktop.json` beside the language list), if it has one.
    pub desktop: Option<crate::desktop::DesktopSpec>,
}

/// Which images to use; `None` fields take the cached defaults.
#[derive(Debug, Clone, Default)]
pub struct ImageSelection {
    pub image: Option<String>,
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
}

pub fn default_kernel() -> PathBuf {
    cache_dir().join("vmlinux")
}

pub fn image_dir(name: &str) -> PathBuf {
    cache_dir().join("images").join(name)
}

impl ImageSet {
    pub fn resolve(sel: &ImageSelection) -> Result<Self, ImageError> {
        let name = sel.image.clone().unwrap_or_else(|| "default".to_string());
        let kernel = sel.kernel.clone().unwrap_or_else(default_kernel);
        if !kernel.is_file() {
            return Err(ImageError::MissingKernel(kernel));
        }
        let rootfs = sel
            .rootfs
            .clone()
            .unwrap_or_else(|| image_dir(&name).join("rootfs.ext4"));
        if !rootfs.is_file() {
            let extra = if name == "default" {
                String::new()
            } else {
                format!(" --image {name}")
            };
            return Err(ImageError::MissingRootfs {
                name,
                path: rootfs,
                extra,
            });
        }
        let languages = read_manifest(&rootfs.with_file_name("languages.json"))?;
        let desktop_file = rootfs.with_file_name("desktop.json");
        let desktop =
            crate::desktop::DesktopSpec::read(&desktop_file).map_err(|reason| ImageError::BadManifest {
                path: desktop_file,
                reason,
            })?;
        Ok(Self {
            name,
            kernel,
            rootfs,
            languages,
            desktop,
        })
    }

    pub fn language_names(&self) -> String {
        self.languages
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn has_language(&self, name: &str) -> bool {
        self.languages.iter().any(|l| l.name == name)
    }
}

/// The manifest is optional for a custom `--rootfs`: then the guest alone decides.
fn read_manifest(path: &Path) -> Result<Vec<Language>, ImageError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| ImageError::BadManifest {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(ImageError::BadManifest {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_name_the_fix() {
        let sel = ImageSelection {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..Default::default()
        };
        let e = ImageSet::resolve(&sel).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/vmlinux") && e.contains(BUILD_HINT),
            "{e}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"x").expect("write");
        let sel = ImageSelection {
            image: Some("full".into()),
            kernel: Some(k.clone()),
            rootfs: Some(dir.path().join("nope.ext4")),
        };
        let e = ImageSet::resolve(&sel).unwrap_err().to_string();
        assert!(e.contains("--image full") && e.contains("nope.ext4"), "{e}");

        let r = dir.path().join("rootfs.ext4");
        std::fs::write(&r, b"x").expect("write");
        std::fs::write(
            dir.path().join("languages.json"),
            r#"[{"name":"python","version":"3.11.2"}]"#,
        )
        .expect("write");
        let set = ImageSet::resolve(&ImageSelection {
            image: None,
            kernel: Some(k),
            rootfs: Some(r),
        })
        .expect("resolves");
        assert!(set.has_language("python") && !set.has_language("go"));
    }
}
