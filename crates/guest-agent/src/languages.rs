//! The languages this image can run: how to run each one, and which are installed.

use std::path::Path;

use serde::Deserialize;

/// Written into the image at build time (see `images/build-rootfs.sh`), so no
/// interpreter has to start at boot just to report its version.
pub const MANIFEST: &str = "/etc/neurovisor/languages.json";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Language {
    pub name: String,
    pub version: String,
}

/// How one language is run: the source file name and the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub file: &'static str,
    pub program: &'static str,
    pub argv: Vec<String>,
}

/// Known languages and the binary each one needs.
const KNOWN: &[(&str, &str)] = &[
    ("python", "/usr/bin/python3"),
    ("bash", "/bin/bash"),
    ("javascript", "/usr/bin/node"),
    ("go", "/usr/bin/go"),
    ("rust", "/usr/bin/rustc"),
];

pub fn recipe(language: &str, args: &[String]) -> Option<Recipe> {
    let (file, program, mut argv): (&str, &str, Vec<String>) = match language {
        "python" => ("main.py", "/usr/bin/python3", vec!["-u".into(), "main.py".into()]),
        "bash" => ("main.sh", "/bin/bash", vec!["main.sh".into()]),
        "javascript" => ("main.js", "/usr/bin/node", vec!["main.js".into()]),
        "go" => ("main.go", "/usr/bin/go", vec!["run".into(), "main.go".into()]),
        // Compile, then run: a compile error is the program's stderr and exit code.
        "rust" => (
            "main.rs",
            "/bin/bash",
            vec![
                "-c".into(),
                "rustc --edition 2021 -C debuginfo=0 -o main main.rs && exec ./main \"$@\"".into(),
                "main".into(),
            ],
        ),
        _ => return None,
    };
    argv.extend(args.iter().cloned());
    Some(Recipe { file, program, argv })
}

/// The installed languages: those in the manifest whose binary exists (the
/// manifest could list a language an image variant dropped).
pub fn installed(manifest: &str, root: &Path) -> Vec<Language> {
    let listed: Vec<Language> = serde_json::from_str(manifest).unwrap_or_default();
    KNOWN
        .iter()
        .filter(|(_, bin)| root.join(bin.trim_start_matches('/')).exists())
        .map(|(name, _)| {
            listed
                .iter()
                .find(|l| l.name == *name)
                .cloned()
                .unwrap_or_else(|| Language {
                    name: (*name).to_string(),
                    version: "unknown".to_string(),
                })
        })
        .collect()
}

pub fn load() -> Vec<Language> {
    installed(
        &std::fs::read_to_string(MANIFEST).unwrap_or_default(),
        Path::new("/"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_language_has_a_recipe() {
        for (name, _) in KNOWN {
            let r = recipe(name, &["a".into()]).expect("recipe");
            assert_eq!(r.argv.last().map(String::as_str), Some("a"));
        }
        assert!(recipe("cobol", &[]).is_none());
    }

    #[test]
    fn installed_filters_by_binary_and_keeps_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("usr/bin")).expect("mkdir");
        std::fs::write(dir.path().join("usr/bin/python3"), "").expect("write");
        let manifest = r#"[{"name":"python","version":"3.11.2"},{"name":"javascript","version":"18.19.0"}]"#;
        let langs = installed(manifest, dir.path());
        assert_eq!(
            langs,
            vec![Language {
                name: "python".into(),
                version: "3.11.2".into()
            }]
        );
        assert!(installed("not json", dir.path())[0].version == "unknown");
    }
}
