//! Sandbox profiles: one YAML file says what a sandbox is (image, size,
//! limits, environment), what it may reach (egress presets and domains),
//! what is installed in it (capability presets and Debian packages) and, for
//! agent mode, what the model is told (a role and prompt presets).
//!
//! Presets and a few profiles ship in the binary (the files under
//! `crates/neurovisor/config/`); a user adds or overrides them with files of
//! the same layout in the configuration directory (`profiles/NAME.yaml`,
//! `presets/{egress,capabilities,prompts}/NAME.yaml`). [`ProfileStore::load`]
//! parses and validates a profile once and compiles it into a flat
//! [`Profile`], the value every command takes its settings from. Errors name
//! the file, the line and the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::VmSize;
use crate::exec::{valid_env_name, MAX_OUTPUT_CAP, MAX_TIMEOUT};

/// The images a profile can build on (those `images build` knows).
pub const BASE_IMAGES: [&str; 2] = ["default", "full"];

/// The three kinds of preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PresetKind {
    /// Groups of domains a VM may reach.
    Egress,
    /// Groups of Debian packages installed into a profile's image.
    Capabilities,
    /// Instructions added to an agent's system prompt.
    Prompts,
}

impl PresetKind {
    pub const ALL: [PresetKind; 3] = [Self::Egress, Self::Capabilities, Self::Prompts];

    pub fn dir(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Capabilities => "capabilities",
            Self::Prompts => "prompts",
        }
    }
}

macro_rules! builtin {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../config/", $path)))),*]
    };
}

/// The files under `crates/neurovisor/config/`, by their path there.
const BUILTIN: &[(&str, &str)] = builtin!(
    "profiles/data-analyst.yaml",
    "profiles/python-dev.yaml",
    "presets/egress/crates.yaml",
    "presets/egress/debian.yaml",
    "presets/egress/github.yaml",
    "presets/egress/huggingface.yaml",
    "presets/egress/npm.yaml",
    "presets/egress/pypi.yaml",
    "presets/egress/python-dev.yaml",
    "presets/capabilities/build-tools.yaml",
    "presets/capabilities/debugging.yaml",
    "presets/capabilities/git.yaml",
    "presets/capabilities/node-dev.yaml",
    "presets/capabilities/python-data.yaml",
    "presets/capabilities/python-dev.yaml",
    "presets/prompts/code-execution.yaml",
    "presets/prompts/data-analysis.yaml",
    "presets/prompts/debugging-workflow.yaml",
    "presets/prompts/report-output.yaml",
);

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A file that does not say what a profile or preset may say.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no profile named '{name}'; available: {available} (or give a file: --profile ./NAME.yaml)")]
    Unknown { name: String, available: String },
}

/// Where profiles and presets come from: the built-in ones and, when set, a
/// user configuration directory whose files add to them or replace them.
#[derive(Debug, Clone, Default)]
pub struct ProfileStore {
    user_dir: Option<PathBuf>,
}

/// One preset as listed.
#[derive(Debug, Clone, Serialize)]
pub struct PresetInfo {
    pub kind: PresetKind,
    pub name: String,
    pub description: String,
    /// `built-in` or the file it came from.
    pub source: String,
}

/// A profile compiled: presets expanded, names checked, lists sorted. What
/// `profile show` prints and what commands read their settings from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    pub name: String,
    /// `built-in` or the file it came from.
    pub source: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The image it builds on.
    pub base_image: String,
    /// The image its VMs boot: `base_image`, or a derived image with the
    /// capability packages installed (`BASE+HASH`).
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<VmSize>,
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde_opt")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub egress: Egress,
    pub capabilities: Capabilities,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompt_presets: Vec<String>,
}

/// What a profile's VMs may reach, flattened.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Egress {
    /// The egress presets it uses, including those reached through others.
    pub presets: Vec<String>,
    /// Exact names and `*.`-wildcards, sorted.
    pub domains: Vec<String>,
    /// Address ranges named on purpose (private ranges are refused unless here).
    pub cidrs: Vec<String>,
}

impl Egress {
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty() && self.cidrs.is_empty()
    }
}

/// What a profile installs, flattened.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Capabilities {
    pub presets: Vec<String>,
    /// Debian packages added to the base image, sorted.
    pub packages: Vec<String>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

// ---- the files as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    size: Option<VmSize>,
    #[serde(default)]
    limits: Option<LimitsFile>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    egress: Option<EgressFile>,
    #[serde(default)]
    capabilities: Option<CapabilitiesFile>,
    #[serde(default)]
    prompt: Option<PromptFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    /// `90s`, `2m`, or a number of seconds.
    #[serde(default)]
    timeout: Option<Seconds>,
    #[serde(default)]
    max_output_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressFile {
    #[serde(default)]
    presets: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesFile {
    #[serde(default)]
    presets: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptFile {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    presets: Vec<String>,
}

/// A preset file of any kind; which fields it may have depends on its kind.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetFile {
    #[serde(default)]
    description: String,
    /// Other presets of the same kind it includes (egress and capabilities).
    #[serde(default)]
    presets: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    text: Option<String>,
}

/// One file's text and where it came from, for error positions.
struct Source<'a> {
    label: String,
    text: &'a str,
}

impl Source<'_> {
    fn yaml<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProfileError> {
        serde_yaml_ng::from_str(self.text).map_err(|e| {
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            // The position is ours; the message without its own copy of it.
            let message = e.to_string();
            let mut message = match message.rfind(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            // Our type names mean nothing to the file's author.
            for (ours, theirs) in [
                (
                    "struct ProfileFile",
                    "a mapping of image, size, limits, env, egress, capabilities, prompt",
                ),
                ("struct LimitsFile", "a mapping of timeout, max_output_bytes"),
                ("struct EgressFile", "a mapping of presets, domains, cidrs"),
                ("struct CapabilitiesFile", "a mapping of presets, packages"),
                ("struct PromptFile", "a mapping of role, presets"),
                (
                    "struct PresetFile",
                    "a mapping of description and the preset's fields",
                ),
                (
                    "data did not match any variant of untagged enum Seconds",
                    "expected a duration such as 90s or 2m",
                ),
            ] {
                message = message.replace(ours, theirs);
            }
            self.invalid_at(line, column, message)
        })
    }

    fn invalid_at(&self, line: usize, column: usize, message: String) -> ProfileError {
        ProfileError::Invalid {
            file: self.label.clone(),
            line,
            column,
            message,
        }
    }

    /// An error about `value` under `key` (e.g. `egress` / `presets`): the
    /// position is where the value is written after the key, or the key.
    fn invalid(&self, keys: &[&str], value: Option<&str>, message: String) -> ProfileError {
        let (line, column) = self.locate(keys, value);
        self.invalid_at(line, column, message)
    }

    fn locate(&self, keys: &[&str], value: Option<&str>) -> (usize, usize) {
        let lines: Vec<&str> = self.text.lines().collect();
        let mut from = 0;
        let mut found = (1, 1);
        for key in keys {
            let pat = format!("{key}:");
            if let Some((i, col)) = lines.iter().enumerate().skip(from).find_map(|(i, l)| {
                let t = l.trim_start();
                let t = t.strip_prefix("- ").unwrap_or(t);
                t.starts_with(&pat).then(|| (i, l.len() - t.len()))
            }) {
                found = (i + 1, col + 1);
                from = i;
            }
        }
        if let Some(v) = value {
            for (i, l) in lines.iter().enumerate().skip(from) {
                if let Some(col) = find_token(l, v) {
                    return (i + 1, col + 1);
                }
            }
        }
        found
    }
}

/// Where `token` appears in `line` as a whole YAML scalar (not inside a longer word).
fn find_token(line: &str, token: &str) -> Option<usize> {
    let before_ok = |c: Option<char>| c.is_none_or(|c| matches!(c, ' ' | '\t' | '[' | ',' | '"' | '\''));
    let after_ok =
        |c: Option<char>| c.is_none_or(|c| matches!(c, ' ' | '\t' | ']' | ',' | '"' | '\'' | ':' | '#'));
    if token.is_empty() {
        return None;
    }
    let mut start = 0;
    while let Some(i) = line[start..].find(token) {
        let at = start + i;
        if before_ok(line[..at].chars().next_back()) && after_ok(line[at + token.len()..].chars().next()) {
            return Some(at);
        }
        start = at + token.len();
    }
    None
}

impl ProfileStore {
    /// Built-in profiles and presets, plus those in `user_dir` (which win).
    pub fn new(user_dir: Option<PathBuf>) -> Self {
        Self { user_dir }
    }

    /// The user's configuration directory: `NEUROVISOR_CONFIG_DIR`, else
    /// `$XDG_CONFIG_HOME/neurovisor`, else `~/.config/neurovisor`.
    pub fn default_user_dir() -> Option<PathBuf> {
        let var = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
        var("NEUROVISOR_CONFIG_DIR")
            .or_else(|| var("XDG_CONFIG_HOME").map(|p| p.join("neurovisor")))
            .or_else(|| var("HOME").map(|p| p.join(".config/neurovisor")))
    }

    /// The text of `rel` (a path under the profiles tree) and its label:
    /// the user's file when there is one, else the built-in one.
    fn read(&self, rel: &str) -> Result<Option<(String, String)>, ProfileError> {
        if let Some(dir) = &self.user_dir {
            let p = dir.join(rel);
            match std::fs::read_to_string(&p) {
                Ok(t) => return Ok(Some((t, p.display().to_string()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ProfileError::Read { path: p, source: e }),
            }
        }
        Ok(BUILTIN
            .iter()
            .find(|(p, _)| *p == rel)
            .map(|(_, t)| (t.to_string(), format!("built-in {rel}"))))
    }

    /// Names of the `.yaml` files in `dir` of the tree, built-in and the user's.
    fn names(&self, dir: &str) -> BTreeSet<String> {
        let prefix = format!("{dir}/");
        let mut names: BTreeSet<String> = BUILTIN
            .iter()
            .filter_map(|(p, _)| p.strip_prefix(prefix.as_str()))
            .filter_map(|f| f.strip_suffix(".yaml"))
            .map(str::to_string)
            .collect();
        if let Some(user) = &self.user_dir {
            for e in std::fs::read_dir(user.join(dir)).into_iter().flatten().flatten() {
                if let Some(n) = e.file_name().to_str().and_then(|f| f.strip_suffix(".yaml")) {
                    if valid_preset_name(n) {
                        names.insert(n.to_string());
                    }
                }
            }
        }
        names
    }

    /// Profile names (built-in and the user's).
    pub fn profile_names(&self) -> Vec<String> {
        self.names("profiles").into_iter().collect()
    }

    /// Every preset, by kind and name.
    pub fn list_presets(&self) -> Result<Vec<PresetInfo>, ProfileError> {
        let mut out = Vec::new();
        for kind in PresetKind::ALL {
            for name in self.names(&format!("presets/{}", kind.dir())) {
                let (src, file) = self.preset(kind, &name)?.ok_or_else(|| ProfileError::Read {
                    path: name.clone().into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })?;
                out.push(PresetInfo {
                    kind,
                    name,
                    description: file.description,
                    source: if src.starts_with("built-in ") {
                        "built-in".into()
                    } else {
                        src
                    },
                });
            }
        }
        Ok(out)
    }

    fn preset(&self, kind: PresetKind, name: &str) -> Result<Option<(String, PresetFile)>, ProfileError> {
        if !valid_preset_name(name) {
            return Ok(None);
        }
        let rel = format!("presets/{}/{name}.yaml", kind.dir());
        let Some((text, label)) = self.read(&rel)? else {
            return Ok(None);
        };
        let src = Source {
            label: label.clone(),
            text: &text,
        };
        let file: PresetFile = src.yaml()?;
        check_preset_fields(&src, kind, &file)?;
        Ok(Some((label, file)))
    }

    /// Loads `name_or_path`: a file when it has a `/` or ends in `.yaml`,
    /// else the user's `profiles/NAME.yaml`, else a built-in profile.
    pub fn load(&self, name_or_path: &str) -> Result<Profile, ProfileError> {
        if name_or_path.contains('/') || name_or_path.ends_with(".yaml") || name_or_path.ends_with(".yml") {
            let path = Path::new(name_or_path);
            let text = std::fs::read_to_string(path).map_err(|e| ProfileError::Read {
                path: path.to_path_buf(),
                source: e,
            })?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("profile")
                .to_string();
            return self.compile(&stem, &text, &path.display().to_string());
        }
        let unknown = || ProfileError::Unknown {
            name: crate::channel::text::sanitize_capped(name_or_path, 64),
            available: self.profile_names().join(", "),
        };
        if !valid_preset_name(name_or_path) {
            return Err(unknown());
        }
        match self.read(&format!("profiles/{name_or_path}.yaml"))? {
            Some((text, label)) => self.compile(name_or_path, &text, &label),
            None => Err(unknown()),
        }
    }

    /// Parses, checks and flattens one profile's text.
    pub fn compile(&self, default_name: &str, text: &str, label: &str) -> Result<Profile, ProfileError> {
        let src = Source {
            label: label.to_string(),
            text,
        };
        let file: ProfileFile = src.yaml()?;
        let name = file.name.clone().unwrap_or_else(|| default_name.to_string());
        if !valid_preset_name(&name) {
            return Err(src.invalid(&["name"], None, format!(
                "name: '{name}' is not a profile name; use lower-case letters, digits and - (e.g. data-analyst)"
            )));
        }
        let base_image = file.image.clone().unwrap_or_else(|| "default".into());
        if !BASE_IMAGES.contains(&base_image.as_str()) {
            return Err(src.invalid(
                &["image"],
                Some(&base_image),
                format!(
                    "image: unknown image '{base_image}'; available: {}",
                    BASE_IMAGES.join(", ")
                ),
            ));
        }
        let (timeout, max_output_bytes) = match &file.limits {
            None => (None, None),
            Some(l) => (
                check_timeout(&src, l.timeout.as_ref())?,
                check_output(&src, l.max_output_bytes)?,
            ),
        };
        for (k, v) in &file.env {
            if !valid_env_name(k) {
                return Err(src.invalid(&["env"], Some(k), format!(
                    "env: '{k}' is not a variable name; names are letters, digits and _, not starting with a digit"
                )));
            }
            if k == "NEUROVISOR_TRACE_ID" {
                return Err(src.invalid(
                    &["env"],
                    Some(k),
                    "env: NEUROVISOR_TRACE_ID is set by NeuroVisor for each request; remove it".into(),
                ));
            }
            if v.contains('\0') {
                return Err(src.invalid(
                    &["env"],
                    Some(k),
                    format!("env: the value of {k} contains a NUL byte"),
                ));
            }
        }

        let ef = file.egress.unwrap_or_default();
        let mut egress = Egress::default();
        let mut seen = BTreeSet::new();
        for p in &ef.presets {
            let keys = ["egress", "presets"];
            let parts = self.expand(
                &src,
                PresetKind::Egress,
                p,
                &keys,
                &mut Vec::new(),
                &mut seen,
                &mut |f| (f.domains.clone(), f.cidrs.clone()),
            )?;
            for (domains, cidrs) in parts {
                for d in domains {
                    // Checked when the preset was read.
                    egress.domains.extend(check_domain(&d).unwrap_or_default());
                }
                egress.cidrs.extend(cidrs);
            }
        }
        egress.presets = seen.into_iter().collect();
        for d in &ef.domains {
            egress.domains.extend(
                check_domain(d).map_err(|m| {
                    src.invalid(&["egress", "domains"], Some(d), format!("egress.domains: {m}"))
                })?,
            );
        }
        for c in &ef.cidrs {
            check_cidr(c)
                .map_err(|m| src.invalid(&["egress", "cidrs"], Some(c), format!("egress.cidrs: {m}")))?;
            egress.cidrs.push(c.clone());
        }
        egress.domains = sorted(egress.domains);
        egress.cidrs = sorted(egress.cidrs);

        let cf = file.capabilities.unwrap_or_default();
        let mut caps = Capabilities::default();
        let mut seen = BTreeSet::new();
        for p in &cf.presets {
            for pk in self.expand(
                &src,
                PresetKind::Capabilities,
                p,
                &["capabilities", "presets"],
                &mut Vec::new(),
                &mut seen,
                &mut |f| f.packages.clone(),
            )? {
                caps.packages.extend(pk);
            }
        }
        caps.presets = seen.into_iter().collect();
        for pk in &cf.packages {
            check_package(pk).map_err(|m| {
                src.invalid(
                    &["capabilities", "packages"],
                    Some(pk),
                    format!("capabilities.packages: {m}"),
                )
            })?;
            caps.packages.push(pk.clone());
        }
        caps.packages = sorted(caps.packages);

        let pf = file.prompt.unwrap_or_default();
        let mut parts: Vec<String> = pf
            .role
            .iter()
            .map(|r| r.trim_end().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        let mut prompt_presets = Vec::new();
        for p in &pf.presets {
            let Some((_, f)) = self.preset(PresetKind::Prompts, p)? else {
                return Err(self.unknown_preset(&src, PresetKind::Prompts, p, &["prompt", "presets"]));
            };
            if prompt_presets.contains(p) {
                return Err(src.invalid(
                    &["prompt", "presets"],
                    Some(p),
                    format!("prompt.presets: '{p}' is listed twice"),
                ));
            }
            prompt_presets.push(p.clone());
            parts.push(f.text.unwrap_or_default().trim_end().to_string());
        }
        let prompt = (!parts.is_empty()).then(|| parts.join("\n\n"));

        let image = derived_image(&base_image, &caps.packages);
        Ok(Profile {
            name,
            source: if label.starts_with("built-in ") {
                "built-in".into()
            } else {
                label.to_string()
            },
            description: file.description.unwrap_or_default().trim().to_string(),
            base_image,
            image,
            size: file.size,
            timeout,
            max_output_bytes,
            env: file.env,
            egress,
            capabilities: caps,
            prompt,
            prompt_presets,
        })
    }

    /// Expands preset `name` of `kind` and the presets it includes, depth
    /// first, each once; `take` picks what each contributes.
    #[allow(clippy::too_many_arguments)]
    fn expand<T>(
        &self,
        src: &Source<'_>,
        kind: PresetKind,
        name: &str,
        keys: &[&str],
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
        take: &mut dyn FnMut(&PresetFile) -> T,
    ) -> Result<Vec<T>, ProfileError> {
        if path.iter().any(|p| p == name) {
            path.push(name.to_string());
            return Err(src.invalid(
                keys,
                Some(&path[0]),
                format!(
                    "{}: {} preset '{}' includes itself ({})",
                    keys.join("."),
                    kind.dir(),
                    path[0],
                    path.join(" -> ")
                ),
            ));
        }
        let Some((_, file)) = self.preset(kind, name)? else {
            let Some(parent) = path.last() else {
                return Err(self.unknown_preset(src, kind, name, keys));
            };
            let available: Vec<String> = self
                .names(&format!("presets/{}", kind.dir()))
                .into_iter()
                .collect();
            return Err(src.invalid(
                keys,
                Some(&path[0]),
                format!(
                "{}: {} preset '{parent}' (through {}) includes '{}', which is not a preset; available: {}",
                keys.join("."),
                kind.dir(),
                path.join(" -> "),
                crate::channel::text::sanitize_capped(name, 64),
                available.join(", ")
            ),
            ));
        };
        let mut out = Vec::new();
        if seen.insert(name.to_string()) {
            out.push(take(&file));
        }
        path.push(name.to_string());
        for inner in &file.presets {
            out.extend(self.expand(src, kind, inner, keys, path, seen, take)?);
        }
        path.pop();
        Ok(out)
    }

    fn unknown_preset(&self, src: &Source<'_>, kind: PresetKind, name: &str, keys: &[&str]) -> ProfileError {
        let available: Vec<String> = self
            .names(&format!("presets/{}", kind.dir()))
            .into_iter()
            .collect();
        let hint = closest(name, &available)
            .map(|c| format!(" (did you mean '{c}'?)"))
            .unwrap_or_default();
        src.invalid(
            keys,
            Some(name),
            format!(
                "{}: unknown {} preset '{}'{hint}; available: {} (`neurovisor profile list-presets`)",
                keys.join("."),
                kind.dir(),
                crate::channel::text::sanitize_capped(name, 64),
                available.join(", ")
            ),
        )
    }
}

impl Profile {
    /// Whether its VMs boot a derived image (capability packages).
    pub fn needs_derived_image(&self) -> bool {
        !self.capabilities.packages.is_empty()
    }

    /// The compiled profile as YAML (`profile show`).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

/// The name of `base` with `packages` installed: `base` itself without
/// packages, else `base+` and a hash of the list (so a changed list is a new image).
pub fn derived_image(base: &str, packages: &[String]) -> String {
    if packages.is_empty() {
        return base.to_string();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(packages.join(",").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{base}+{hex}")
}

fn sorted(v: Vec<String>) -> Vec<String> {
    v.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

fn valid_preset_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
}

fn check_preset_fields(src: &Source<'_>, kind: PresetKind, f: &PresetFile) -> Result<(), ProfileError> {
    let wrong = |field: &str| {
        Err(src.invalid(&[field], None, format!(
            "{field}: {} presets do not have this field (egress: presets, domains, cidrs; capabilities: presets, packages; prompts: text)",
            kind.dir()
        )))
    };
    match kind {
        PresetKind::Egress => {
            if !f.packages.is_empty() {
                return wrong("packages");
            }
            if f.text.is_some() {
                return wrong("text");
            }
            for d in &f.domains {
                check_domain(d).map_err(|m| src.invalid(&["domains"], Some(d), format!("domains: {m}")))?;
            }
            for c in &f.cidrs {
                check_cidr(c).map_err(|m| src.invalid(&["cidrs"], Some(c), format!("cidrs: {m}")))?;
            }
        }
        PresetKind::Capabilities => {
            if !f.domains.is_empty() {
                return wrong("domains");
            }
            if !f.cidrs.is_empty() {
                return wrong("cidrs");
            }
            if f.text.is_some() {
                return wrong("text");
            }
            for p in &f.packages {
                check_package(p)
                    .map_err(|m| src.invalid(&["packages"], Some(p), format!("packages: {m}")))?;
            }
        }
        PresetKind::Prompts => {
            for (field, empty) in [
                ("presets", f.presets.is_empty()),
                ("domains", f.domains.is_empty()),
                ("cidrs", f.cidrs.is_empty()),
                ("packages", f.packages.is_empty()),
            ] {
                if !empty {
                    return wrong(field);
                }
            }
            if f.text.as_deref().is_none_or(|t| t.trim().is_empty()) {
                return Err(src.invalid(&["text"], None, "text: a prompt preset needs its text".into()));
            }
        }
    }
    Ok(())
}

fn check_timeout(src: &Source<'_>, t: Option<&Seconds>) -> Result<Option<Duration>, ProfileError> {
    let d = match t {
        None => return Ok(None),
        Some(Seconds::Number(n)) => Duration::from_secs(*n),
        Some(Seconds::Text(s)) => humantime::parse_duration(s.trim()).map_err(|e| {
            src.invalid(
                &["limits", "timeout"],
                Some(s),
                format!("limits.timeout: '{s}' is not a duration ({e}); write e.g. 90s, 2m or 1h"),
            )
        })?,
    };
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(src.invalid(
            &["limits", "timeout"],
            None,
            format!(
                "limits.timeout: {} is out of range; it must be between 1ms and {}s",
                humantime::format_duration(d),
                MAX_TIMEOUT.as_secs()
            ),
        ));
    }
    Ok(Some(d))
}

fn check_output(src: &Source<'_>, n: Option<u64>) -> Result<Option<u64>, ProfileError> {
    match n {
        Some(n) if n == 0 || n > MAX_OUTPUT_CAP => Err(src.invalid(
            &["limits", "max_output_bytes"],
            None,
            format!(
                "limits.max_output_bytes: {n} is out of range; it must be between 1 and {MAX_OUTPUT_CAP}"
            ),
        )),
        n => Ok(n),
    }
}

/// Checks one allowlist entry; returns the names it stands for (Squid's
/// `.example.com` is `example.com` and `*.example.com`).
pub fn check_domain(d: &str) -> Result<Vec<String>, String> {
    let shown = crate::channel::text::sanitize_capped(d, 80);
    if d.parse::<std::net::IpAddr>().is_ok() || d.contains('/') {
        return Err(format!(
            "'{shown}' is an address; list names here and address ranges under cidrs"
        ));
    }
    let lower = d.to_ascii_lowercase();
    let (wild, rest, both) = if let Some(r) = lower.strip_prefix("*.") {
        (true, r, false)
    } else if let Some(r) = lower.strip_prefix('.') {
        (true, r, true)
    } else {
        (false, lower.as_str(), false)
    };
    let labels: Vec<&str> = rest.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if rest.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(format!(
            "'{shown}' is not a domain name; write names like api.example.com, or *.example.com for its subdomains"
        ));
    }
    if labels
        .last()
        .is_some_and(|t| t.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "'{shown}' is not a domain name (its last label is a number)"
        ));
    }
    Ok(match (wild, both) {
        (false, _) => vec![rest.to_string()],
        (true, false) => vec![format!("*.{rest}")],
        (true, true) => vec![rest.to_string(), format!("*.{rest}")],
    })
}

fn check_cidr(c: &str) -> Result<(), String> {
    let shown = crate::channel::text::sanitize_capped(c, 80);
    let bad = || format!("'{shown}' is not an address range; write e.g. 10.1.2.0/24 or fd00:1::/64");
    let (addr, len) = c.split_once('/').ok_or_else(bad)?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok(())
}

/// A Debian package name (policy 5.6.1): lower case, digits, `+ - .`, at
/// least two characters, starting with a letter or digit.
fn check_package(p: &str) -> Result<(), String> {
    let ok = p.len() >= 2
        && p.len() <= 128
        && p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not a Debian package name (lower-case letters, digits, + - .)",
            crate::channel::text::sanitize_capped(p, 80)
        ))
    }
}

/// The name in `options` closest to `name`, when it is a likely typo.
fn closest<'a>(name: &str, options: &'a [String]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (strsim_distance(name, o), o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o.as_str())
}

/// Levenshtein distance (presets are short names; no crate needed for this).
fn strsim_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        ProfileStore::default()
            .compile("t", text, "t.yaml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_shipped_file_is_built_in_and_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    on_disk.push(e.path().strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        on_disk.sort();
        let mut built_in: Vec<String> = BUILTIN.iter().map(|(p, _)| p.to_string()).collect();
        built_in.sort();
        assert_eq!(on_disk, built_in, "add new files to BUILTIN");
        let store = ProfileStore::default();
        assert_eq!(store.list_presets().unwrap().len(), BUILTIN.len() - 2);
        for name in store.profile_names() {
            store.load(&name).unwrap();
        }
    }

    #[test]
    fn presets_compose_into_a_flat_profile() {
        let p = ProfileStore::default().load("python-dev").unwrap();
        assert_eq!(p.egress.presets, ["github", "pypi", "python-dev"]);
        assert!(p.egress.domains.contains(&"files.pythonhosted.org".to_string()));
        assert!(p.egress.domains.contains(&"github.com".to_string()));
        assert_eq!(p.capabilities.presets, ["git", "python-dev"]);
        assert_eq!(
            p.capabilities.packages,
            [
                "ca-certificates",
                "git",
                "python3-pip",
                "python3-pytest",
                "python3-venv"
            ]
        );
        assert!(
            p.image.starts_with("default+") && p.image.len() == "default+".len() + 12,
            "{}",
            p.image
        );
        let prompt = p.prompt.unwrap();
        assert!(
            prompt.starts_with("You are a Python developer.\n\nDebug in order"),
            "{prompt}"
        );
        assert!(prompt.ends_with("print exactly the values you need."), "{prompt}");
        assert_eq!(p.env["PIP_DISABLE_PIP_VERSION_CHECK"], "1");
        // The same packages in another order are the same image.
        assert_eq!(
            derived_image("default", &["a".into(), "b".into()]),
            derived_image("default", &sorted(vec!["b".into(), "a".into()]))
        );
    }

    #[test]
    fn a_bare_profile_changes_nothing() {
        let p = ProfileStore::default()
            .compile("bare", "description: nothing\n", "bare.yaml")
            .unwrap();
        assert_eq!((p.image.as_str(), p.size, p.timeout), ("default", None, None));
        assert!(p.egress.is_empty() && p.prompt.is_none() && !p.needs_derived_image());
    }

    #[test]
    fn validation_errors_name_the_file_line_and_fix() {
        assert_eq!(
            err("image: default\negress:\n  presets: [github, pipy]\n"),
            "t.yaml:3:21: egress.presets: unknown egress preset 'pipy' (did you mean 'pypi'?); available: crates, debian, github, huggingface, npm, pypi, python-dev (`neurovisor profile list-presets`)"
        );
        assert_eq!(
            err("size: huge\n"),
            "t.yaml:1:7: size: unknown variant `huge`, expected one of `small`, `medium`, `large`"
        );
        assert_eq!(
            err("egress: 5\n"),
            "t.yaml:1:9: egress: invalid type: integer `5`, expected a mapping of presets, domains, cidrs"
        );
        let e = err("image: default\nlimit:\n  timeout: 5s\n");
        assert!(
            e.starts_with("t.yaml:2:1: unknown field `limit`, expected one of"),
            "{e}"
        );
        assert_eq!(
            err("egress:\n  domains:\n    - api.example.com\n    - 10.0.0.1\n"),
            "t.yaml:4:7: egress.domains: '10.0.0.1' is an address; list names here and address ranges under cidrs"
        );
        assert_eq!(
            err("egress:\n  domains: [\"*.*.example.com\"]\n"),
            "t.yaml:2:14: egress.domains: '*.*.example.com' is not a domain name; write names like api.example.com, or *.example.com for its subdomains"
        );
        assert_eq!(
            err("limits:\n  timeout: forever\n"),
            "t.yaml:2:12: limits.timeout: 'forever' is not a duration (expected number at 0); write e.g. 90s, 2m or 1h"
        );
        assert_eq!(
            err("image: fat\n"),
            "t.yaml:1:8: image: unknown image 'fat'; available: default, full"
        );
        assert_eq!(
            err("env:\n  1X: y\n"),
            "t.yaml:2:3: env: '1X' is not a variable name; names are letters, digits and _, not starting with a digit"
        );
        assert_eq!(
            err("capabilities:\n  packages: [Numpy]\n"),
            "t.yaml:2:14: capabilities.packages: 'Numpy' is not a Debian package name (lower-case letters, digits, + - .)"
        );
        assert_eq!(
            err("prompt:\n  presets: [report-output, report-output]\n"),
            "t.yaml:2:13: prompt.presets: 'report-output' is listed twice"
        );
    }

    #[test]
    fn user_presets_add_to_and_replace_the_built_in_ones() {
        let dir = tempfile::tempdir().unwrap();
        let egress = dir.path().join("presets/egress");
        std::fs::create_dir_all(&egress).unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::write(
            egress.join("pypi.yaml"),
            "description: our mirror\ndomains: [pypi.internal.example]\n",
        )
        .unwrap();
        std::fs::write(egress.join("a.yaml"), "presets: [b]\n").unwrap();
        std::fs::write(egress.join("b.yaml"), "presets: [a]\n").unwrap();
        std::fs::write(egress.join("c.yaml"), "presets: [gone]\n").unwrap();
        std::fs::write(
            egress.join("d.yaml"),
            "domains: [\".sentry.io\"]\npackages: [git]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("profiles/mine.yaml"),
            "egress:\n  presets: [pypi]\n  domains: [\".sentry.io\"]\n  cidrs: [10.9.0.0/16]\n",
        )
        .unwrap();
        let store = ProfileStore::new(Some(dir.path().to_path_buf()));
        let p = store.load("mine").unwrap();
        assert_eq!(
            p.egress.domains,
            ["*.sentry.io", "pypi.internal.example", "sentry.io"]
        );
        assert_eq!(p.egress.cidrs, ["10.9.0.0/16"]);
        assert!(p.source.ends_with("profiles/mine.yaml"), "{}", p.source);
        let compile = |t: &str| store.compile("x", t, "x.yaml").unwrap_err().to_string();
        assert_eq!(
            compile("egress:\n  presets: [a]\n"),
            "x.yaml:2:13: egress.presets: egress preset 'a' includes itself (a -> b -> a)"
        );
        assert_eq!(
            compile("egress:\n  presets: [c]\n"),
            "x.yaml:2:13: egress.presets: egress preset 'c' (through c) includes 'gone', which is not a preset; available: a, b, c, crates, d, debian, github, huggingface, npm, pypi, python-dev"
        );
        let e = compile("egress:\n  presets: [d]\n");
        assert!(e.ends_with("d.yaml:2:1: packages: egress presets do not have this field (egress: presets, domains, cidrs; capabilities: presets, packages; prompts: text)"), "{e}");
        assert_eq!(
            store.load("nope").unwrap_err().to_string(),
            "no profile named 'nope'; available: data-analyst, mine, python-dev (or give a file: --profile ./NAME.yaml)"
        );
        let listed = store.list_presets().unwrap_err().to_string();
        assert!(listed.contains("d.yaml:2:1"), "{listed}");
    }
}
