//! `neurovisor install` and `neurovisor repo` (Fission's commands): a fresh
//! VM whose egress allows only the package index (and, for `repo`, the
//! repository's host) installs packages or clones a repository, then runs a
//! command there. Both are `run` underneath: a bash program written here,
//! the same validation, streaming, exit codes and cleanup.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use clap::Args;
use neurovisor::VmSize;

use super::run::RunArgs;
use super::{parse_duration, DaemonTarget, VmArgs, EXIT_BAD_INPUT};

/// The Python Package Index and where its files are.
const PYPI: &str = "https://pypi.org/simple";
const PYPI_HOSTS: &[&str] = &["pypi.org", "files.pythonhosted.org"];
/// Installs and clones take longer than a snippet.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Local files travel inside the program (base64), within its size limit.
const MAX_FILES_BYTES: u64 = 512 * 1024;

/// What both commands share.
#[derive(Debug, Args)]
pub struct ScriptArgs {
    /// Language of the packages: python (pip).
    #[arg(short, long = "lang", default_value = "python")]
    lang: String,
    /// Shell command to run afterwards, in the working directory.
    #[arg(long)]
    command: String,
    /// Package index (a PEP 503 simple index) [default: https://pypi.org/simple].
    /// The VM may reach its host and nothing else (plus --allow-host).
    #[arg(long, env = "NEUROVISOR_INDEX_URL", value_name = "URL")]
    index_url: Option<String>,
    /// Wall-clock limit for the whole job (install and command) [default: 5m].
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = super::run::parse_env)]
    env: Vec<(String, String)>,
    /// VM size [default: medium].
    #[arg(long, value_enum)]
    size: Option<VmSize>,
    /// Print one JSON object with the output and the result instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: DaemonTarget,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Packages to install, comma-separated (pip requirement specifiers:
    /// numpy, scipy==1.11, requests[socks]).
    #[arg(long, value_delimiter = ',', required = true)]
    packages: Vec<String>,
    /// A local file copied into the working directory first (repeatable).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    common: ScriptArgs,
}

#[derive(Debug, Args)]
pub struct RepoArgs {
    /// The repository: an http:// or https:// git URL.
    url: String,
    /// Branch or tag to check out [default: the remote's HEAD].
    #[arg(long = "ref", value_name = "REF")]
    git_ref: Option<String>,
    #[command(flatten)]
    common: ScriptArgs,
}

/// A pip requirement specifier without options or URLs: a name, optional
/// extras, optional version clauses.
fn check_package(p: &str) -> Result<(), String> {
    let shown = neurovisor::channel::text::sanitize_capped(p, 80);
    let name_end = p
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .unwrap_or(p.len());
    let (name, rest) = p.split_at(name_end);
    let rest = match rest.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((extras, after))
                if !extras.is_empty()
                    && extras
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ',')) =>
            {
                after
            }
            _ => "\0",
        },
        None => rest,
    };
    let version_ok = rest.is_empty()
        || (rest.starts_with(['=', '<', '>', '~', '!'])
            && rest.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '=' | '<' | '>' | '~' | '!' | '.' | '*' | '+' | ',')
            }));
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !version_ok {
        return Err(format!(
            "--packages: '{shown}' is not a package name with an optional version (e.g. numpy, scipy==1.11)"
        ));
    }
    Ok(())
}

/// The index's URL and the hosts the VM may reach for it.
fn index(url: Option<&str>) -> Result<(String, Vec<String>, bool), String> {
    let Some(url) = url else {
        return Ok((
            PYPI.into(),
            PYPI_HOSTS.iter().map(|h| h.to_string()).collect(),
            false,
        ));
    };
    let (host, plain) = url_host(url, "--index-url")?;
    Ok((url.to_string(), vec![host], plain))
}

/// The host of an http(s) URL; `true` for plain http.
fn url_host(url: &str, what: &str) -> Result<(String, bool), String> {
    let shown = neurovisor::channel::text::sanitize_capped(url, 120);
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{what} {shown}: {e}"))?;
    let plain = match parsed.scheme() {
        "https" => false,
        "http" => true,
        other => return Err(format!("{what} {shown}: scheme {other} is not http or https")),
    };
    match parsed.host_str() {
        Some(h) if h.starts_with('[') || h.parse::<std::net::IpAddr>().is_ok() => Err(format!(
            "{what} {shown}: name the host, not its address (the VM reaches names it resolves)"
        )),
        Some(h) => Ok((h.to_ascii_lowercase(), plain)),
        None => Err(format!("{what} {shown}: no host")),
    }
}

/// Plain file names only: they become paths in the VM.
fn check_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

const PIP_ENV: &str = "export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_INDEX_URL=\"$NV_INDEX_URL\"\n\
[ -n \"${NV_TRUSTED_HOST:-}\" ] && export PIP_TRUSTED_HOST=\"$NV_TRUSTED_HOST\"\n";

fn install_script(files: &[(String, Vec<u8>)]) -> String {
    let mut s = String::from("set -euo pipefail\nmkdir -p /tmp/work && cd /tmp/work\n");
    for (name, bytes) in files {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        s.push_str(&format!("printf '%s' '{b64}' | base64 -d > '{name}'\n"));
    }
    s.push_str(PIP_ENV);
    s.push_str("echo \"neurovisor: installing $* from $NV_INDEX_URL\" >&2\n");
    s.push_str("python3 -m pip install --user --quiet --progress-bar off -- \"$@\" >&2\n");
    s.push_str("exec bash -c \"$NV_COMMAND\"\n");
    s
}

fn repo_script() -> String {
    let mut s = String::from("set -euo pipefail\ncd /tmp\n");
    s.push_str(PIP_ENV);
    s.push_str("echo \"neurovisor: cloning $NV_REPO_URL\" >&2\n");
    s.push_str(
        "git clone --quiet ${NV_REPO_REF:+--branch \"$NV_REPO_REF\"} -- \"$NV_REPO_URL\" repo >&2\ncd repo\n",
    );
    s.push_str(
        "if [ -f requirements.txt ]; then\n  echo \"neurovisor: installing requirements.txt from $NV_INDEX_URL\" >&2\n  \
         python3 -m pip install --user --quiet --progress-bar off -r requirements.txt >&2\nfi\n",
    );
    s.push_str("exec bash -c \"$NV_COMMAND\"\n");
    s
}

fn fail(json: bool, msg: &str) -> u8 {
    if json {
        println!(
            "{}",
            serde_json::json!({"error": {"kind": "invalid_request", "message": msg}})
        );
    } else {
        eprintln!("neurovisor: {msg}");
    }
    EXIT_BAD_INPUT
}

/// The run both commands become: network on, the hosts allowed.
fn scripted(
    c: ScriptArgs,
    script: String,
    args: Vec<String>,
    mut env: Vec<(String, String)>,
    hosts: Vec<String>,
) -> RunArgs {
    let mut vm = c.vm;
    vm.network = true;
    vm.allow_host.extend(hosts);
    env.extend(c.env);
    env.push(("NV_COMMAND".into(), c.command));
    RunArgs::scripted(
        "bash",
        script,
        args,
        env,
        Some(c.timeout.unwrap_or(DEFAULT_TIMEOUT)),
        c.size,
        c.json,
        c.target,
        vm,
    )
}

/// The program's environment, and the hosts the VM may reach.
type Prepared = (Vec<(String, String)>, Vec<String>);

fn common_env(c: &ScriptArgs) -> Result<Prepared, String> {
    if c.lang != "python" {
        return Err(format!(
            "--lang {}: install and repo support python (pip) so far",
            neurovisor::channel::text::sanitize_capped(&c.lang, 40)
        ));
    }
    let (index_url, hosts, plain) = index(c.index_url.as_deref())?;
    let mut env = vec![("NV_INDEX_URL".to_string(), index_url)];
    if plain {
        // pip refuses plain-http indexes unless told the host is trusted.
        env.push(("NV_TRUSTED_HOST".into(), hosts[0].clone()));
    }
    Ok((env, hosts))
}

pub async fn install(a: InstallArgs, pushgateway: Option<String>) -> u8 {
    let json = a.common.json;
    let prepared = (|| {
        for p in &a.packages {
            check_package(p)?;
        }
        let mut files = Vec::new();
        let mut total = 0u64;
        for f in &a.files {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if !check_file_name(&name) {
                return Err(format!(
                    "--file {}: its name must be letters, digits, '.', '_' or '-' (rename it)",
                    f.display()
                ));
            }
            let bytes = std::fs::read(f).map_err(|e| format!("--file {}: {e}", f.display()))?;
            total += bytes.len() as u64;
            if total > MAX_FILES_BYTES {
                return Err(format!(
                    "--file: more than {MAX_FILES_BYTES} bytes of files; copy bigger ones into a sandbox (neurovisor sandbox cp)"
                ));
            }
            files.push((name, bytes));
        }
        let (env, hosts) = common_env(&a.common)?;
        Ok((files, env, hosts))
    })();
    let (files, env, hosts) = match prepared {
        Ok(p) => p,
        Err(m) => return fail(json, &m),
    };
    let run = scripted(a.common, install_script(&files), a.packages, env, hosts);
    super::run::run(run, pushgateway).await
}

pub async fn repo(a: RepoArgs, pushgateway: Option<String>) -> u8 {
    let json = a.common.json;
    let prepared = (|| {
        let (repo_host, _) = url_host(&a.url, "repository")?;
        if let Some(r) = &a.git_ref {
            let ok = !r.is_empty()
                && !r.starts_with('-')
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
            if !ok {
                return Err(format!(
                    "--ref {}: not a branch or tag name",
                    neurovisor::channel::text::sanitize_capped(r, 60)
                ));
            }
        }
        let (mut env, mut hosts) = common_env(&a.common)?;
        env.push(("NV_REPO_URL".into(), a.url.clone()));
        if let Some(r) = &a.git_ref {
            env.push(("NV_REPO_REF".into(), r.clone()));
        }
        hosts.push(repo_host);
        Ok((env, hosts))
    })();
    let (env, hosts) = match prepared {
        Ok(p) => p,
        Err(m) => return fail(json, &m),
    };
    let run = scripted(a.common, repo_script(), Vec::new(), env, hosts);
    super::run::run(run, pushgateway).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_specifiers_are_names_extras_and_versions_only() {
        for ok in [
            "numpy",
            "scipy==1.11",
            "requests[socks]",
            "a.b_c-d>=1,<2",
            "x~=1.4.2",
        ] {
            assert!(check_package(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-r",
            "--index-url=x",
            "https://evil/x.whl",
            "a b",
            "x; rm",
            "pkg @ file:///x",
            "a[",
            "=1",
        ] {
            assert!(check_package(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_index_decides_what_the_vm_may_reach() {
        let (url, hosts, plain) = index(None).expect("pypi");
        assert_eq!((url.as_str(), plain), (PYPI, false));
        assert_eq!(hosts, ["pypi.org", "files.pythonhosted.org"]);
        let (_, hosts, plain) = index(Some("http://pypi.test/simple/")).expect("local");
        assert_eq!((hosts, plain), (vec!["pypi.test".to_string()], true));
        assert!(index(Some("ftp://x.test/"))
            .unwrap_err()
            .contains("not http or https"));
        assert!(index(Some("http://10.0.0.1/simple"))
            .unwrap_err()
            .contains("name the host"));
    }
}
