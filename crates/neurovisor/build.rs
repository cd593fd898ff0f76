//! Build script: compiles the eBPF programs in `bpf/*.bpf.c` when the cargo
//! feature `ebpf` is on, and does nothing otherwise (so a default build needs
//! neither clang nor bpftool).
//!
//! With the feature: `vmlinux.h` is generated into `OUT_DIR` from the build
//! host's kernel BTF (`bpftool btf dump ... format c`; never committed), and
//! each `bpf/NAME.bpf.c` becomes `OUT_DIR/NAME.bpf.o`, embedded by
//! `src/security/ebpf.rs`. The programs use CO-RE (`BPF_CORE_READ`), so the
//! object built here runs on other kernels with BTF too.
//!
//! Overrides: `CLANG` (compiler), `BPFTOOL` (bpftool binary),
//! `NEUROVISOR_VMLINUX_BTF` (BTF file instead of `/sys/kernel/btf/vmlinux`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const FIX: &str = "install the eBPF toolchain: apt-get install -y clang bpftool libbpf-dev \
                   (or build without `--features ebpf`)";

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return ExitCode::SUCCESS;
    }
    match build_bpf() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            // Cargo shows a build script's stderr on failure; one message that
            // names the fix is what the person building needs.
            eprintln!("error: building the eBPF programs (feature `ebpf`) failed: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn build_bpf() -> Result<(), String> {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPFTOOL");
    println!("cargo:rerun-if-env-changed=NEUROVISOR_VMLINUX_BTF");

    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?);
    let bpf_dir = manifest_dir.join("bpf");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let bpftool = find_bpftool()?;
    check_runs(&clang, "--version")?;

    let btf = env::var("NEUROVISOR_VMLINUX_BTF").unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".to_owned());
    if !Path::new(&btf).exists() {
        return Err(format!(
            "kernel BTF {btf} not found: vmlinux.h is generated from it. Build on a kernel \
             with CONFIG_DEBUG_INFO_BTF=y or set NEUROVISOR_VMLINUX_BTF to a BTF file"
        ));
    }
    let vmlinux_h = out_dir.join("vmlinux.h");
    let dump = Command::new(&bpftool)
        .args(["btf", "dump", "file", &btf, "format", "c"])
        .output()
        .map_err(|e| format!("running {}: {e}; {FIX}", bpftool.display()))?;
    if !dump.status.success() {
        return Err(format!(
            "`{} btf dump file {btf} format c` failed: {}",
            bpftool.display(),
            String::from_utf8_lossy(&dump.stderr).trim()
        ));
    }
    std::fs::write(&vmlinux_h, &dump.stdout).map_err(|e| format!("writing {}: {e}", vmlinux_h.display()))?;

    // libbpf-dev ships bpf_helpers.h & co.; check for it up front so the
    // error names the package instead of showing a clang include failure.
    let has_libbpf_headers = [
        "/usr/include/bpf/bpf_helpers.h",
        "/usr/local/include/bpf/bpf_helpers.h",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if !has_libbpf_headers {
        return Err(format!("<bpf/bpf_helpers.h> not found; {FIX}"));
    }

    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok("riscv64") => "riscv",
        Ok("s390x") => "s390",
        Ok(other) => return Err(format!("no BPF target arch mapping for `{other}`")),
        Err(e) => return Err(format!("CARGO_CFG_TARGET_ARCH: {e}")),
    };

    let entries = std::fs::read_dir(&bpf_dir).map_err(|e| format!("reading {}: {e}", bpf_dir.display()))?;
    let mut built = 0;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", bpf_dir.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".bpf.c") else {
            continue;
        };
        println!("cargo:rerun-if-changed={}", path.display());
        let object = out_dir.join(format!("{stem}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-target", "bpf"])
            .arg(format!("-D__TARGET_ARCH_{arch}"))
            .arg(format!("-I{}", out_dir.display()))
            .arg("-c")
            .arg(&path)
            .arg("-o")
            .arg(&object)
            .output()
            .map_err(|e| format!("running {clang}: {e}; {FIX}"))?;
        if !output.status.success() {
            return Err(format!(
                "clang failed on {}:\n{}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        built += 1;
    }
    if built == 0 {
        return Err(format!("no *.bpf.c in {}", bpf_dir.display()));
    }
    Ok(())
}

/// bpftool lives in /usr/sbin on Debian, which is not on every user's PATH.
fn find_bpftool() -> Result<PathBuf, String> {
    if let Ok(explicit) = env::var("BPFTOOL") {
        return Ok(PathBuf::from(explicit));
    }
    let path_dirs = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("bpftool"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("bpftool not found (PATH, /usr/sbin); {FIX}"))
}

fn check_runs(program: &str, arg: &str) -> Result<(), String> {
    match Command::new(program).arg(arg).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`{program} {arg}` failed ({}); {FIX}", out.status)),
        Err(e) => Err(format!("{program} not found ({e}); {FIX}")),
    }
}
