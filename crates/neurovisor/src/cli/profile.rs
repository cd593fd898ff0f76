//! `neurovisor profile`: list, check and show sandbox profiles and presets.

use std::path::PathBuf;

use clap::Subcommand;
use neurovisor::profile::{PresetKind, ProfileStore};

use super::EXIT_BAD_INPUT;

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// The profiles that `--profile NAME` finds (built-in and yours).
    List,
    /// The presets profiles can use: egress (domains), capabilities
    /// (packages), prompts (agent instructions).
    ListPresets {
        /// Only this kind.
        #[arg(long, value_enum)]
        kind: Option<PresetKind>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check profile files; each error names the file, line and fix.
    ///
    /// Exit status: 0 when every file is valid, 2 otherwise.
    Validate {
        /// Profile files (YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// A profile compiled: presets expanded into the domains, packages and
    /// prompt it stands for, and the image its VMs boot.
    Show {
        /// A profile name (see `profile list`) or a file.
        profile: String,
        /// JSON instead of YAML.
        #[arg(long)]
        json: bool,
    },
}

/// Where profiles and presets are looked up: the built-in ones, then the
/// user's configuration directory.
pub fn store() -> ProfileStore {
    ProfileStore::new(ProfileStore::default_user_dir())
}

pub fn profile(cmd: ProfileCommand) -> u8 {
    let store = store();
    match cmd {
        ProfileCommand::List => {
            for name in store.profile_names() {
                match store.load(&name) {
                    Ok(p) => println!("{:<20} {:<12} {}", p.name, p.source, p.description),
                    Err(e) => println!("{name:<20} invalid: {e}"),
                }
            }
            0
        }
        ProfileCommand::ListPresets { kind, json } => {
            let presets = match store.list_presets() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("neurovisor: {e}");
                    return EXIT_BAD_INPUT;
                }
            };
            let presets: Vec<_> = presets
                .into_iter()
                .filter(|p| kind.is_none_or(|k| k == p.kind))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&presets).unwrap_or_default());
            } else {
                println!("{:<13} {:<20} {:<10} DESCRIPTION", "KIND", "NAME", "SOURCE");
                for p in presets {
                    println!(
                        "{:<13} {:<20} {:<10} {}",
                        p.kind.dir(),
                        p.name,
                        p.source,
                        p.description
                    );
                }
            }
            0
        }
        ProfileCommand::Validate { files } => {
            let mut ok = true;
            for f in files {
                match store.load(&path_arg(&f)) {
                    Ok(p) => println!("{}: valid (profile {}, image {})", f.display(), p.name, p.image),
                    Err(e) => {
                        ok = false;
                        eprintln!("{e}");
                    }
                }
            }
            if ok {
                0
            } else {
                EXIT_BAD_INPUT
            }
        }
        ProfileCommand::Show { profile, json } => match store.load(&profile) {
            Ok(p) if json => {
                println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default());
                0
            }
            Ok(p) => {
                print!("{}", p.to_yaml());
                0
            }
            Err(e) => {
                eprintln!("neurovisor: {e}");
                EXIT_BAD_INPUT
            }
        },
    }
}

/// A file argument as `ProfileStore::load` takes it: always read as a file,
/// even without a `/` (`validate mine.yml`).
fn path_arg(f: &std::path::Path) -> String {
    let s = f.display().to_string();
    if s.contains('/') {
        s
    } else {
        format!("./{s}")
    }
}
