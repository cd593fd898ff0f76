#!/usr/bin/env bash
# Sets up a fresh Debian 12 host for NeuroVisor: system packages, the
# vhost-device-vsock daemon, the release binaries, and the guest images
# (cached under ~/.cache/neurovisor, keyed by their inputs, so a second run is fast).
#
#   bash scripts/setup.sh            # default image (python, bash, javascript)
#   bash scripts/setup.sh --full     # also the full image (adds go, rust)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

full=0
for arg in "$@"; do
    case "$arg" in
        --full) full=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "setup: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }

# Runtime: qemu, e2fsprogs. Image builds: linux-source + kernel build deps, debootstrap.
packages=(qemu-system-x86 e2fsprogs linux-source-6.1 build-essential flex bison bc
          libelf-dev libssl-dev debootstrap xz-utils cpio python3 ca-certificates)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }

VHOST_VSOCK_VERSION=0.3.0
if ! command -v vhost-device-vsock >/dev/null 2>&1 && [[ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]]; then
    say "installing vhost-device-vsock $VHOST_VSOCK_VERSION (cargo install, ~1 min)"
    cargo install --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION"
fi

say "building neurovisor and the guest agent (release)"
cargo build --release --locked --workspace --bins

say "guest kernel and default image"
./target/release/neurovisor images build --image default
if ((full)); then
    say "full image (go, rust)"
    ./target/release/neurovisor images build --image full
fi

say "doctor"
./target/release/neurovisor doctor
