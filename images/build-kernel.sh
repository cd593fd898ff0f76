#!/usr/bin/env bash
# Build the NeuroVisor guest kernel (ELF vmlinux for QEMU microvm/PVH and Firecracker)
# from Debian's linux-source-6.1 and images/kernel/microvm.config.
#
# Output: $CACHE/kernel/<key>/vmlinux (+ config), symlink $CACHE/vmlinux -> it.
# Key: sha256(fragment + this script + installed linux-source-6.1 version).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
FRAGMENT="$SCRIPT_DIR/kernel/microvm.config"
CACHE="${NEUROVISOR_CACHE_DIR:-$HOME/.cache/neurovisor}"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*"; }

[[ -f "$FRAGMENT" ]] || die "missing config fragment $FRAGMENT"
src_version="$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null)" \
    || die "$SRC_PKG is not installed (apt-get install $SRC_PKG)"
[[ -f "$SRC_TARBALL" ]] || die "missing $SRC_TARBALL"

key="$(cat "$FRAGMENT" "$SCRIPT_PATH" <(printf '%s\n' "$src_version") | sha256sum | cut -c1-16)"
out_dir="$CACHE/kernel/$key"
link="$CACHE/vmlinux"

# Atomically point $CACHE/vmlinux at the keyed kernel.
publish() {
    ln -sfn "$out_dir/vmlinux" "$link.tmp.$$"
    mv -Tf "$link.tmp.$$" "$link"
}

if [[ -f "$out_dir/vmlinux" ]]; then
    publish
    log "cached: $out_dir/vmlinux (key $key)"
    exit 0
fi

for tool in make gcc flex bison bc tar xz; do
    command -v "$tool" >/dev/null || die "missing build tool '$tool' (apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils)"
done

mkdir -p "$CACHE/kernel"
# One builder per key at a time.
exec 9>"$CACHE/kernel/.lock-$key"
flock 9
if [[ -f "$out_dir/vmlinux" ]]; then
    publish
    log "cached (built concurrently): $out_dir/vmlinux"
    exit 0
fi

# Remove build trees left by failed builds of other keys (their lock is free).
for stale in "$CACHE"/kernel/build-*/; do
    [[ -d "$stale" ]] || continue
    stale_key="$(basename "$stale")"
    stale_key="${stale_key#build-}"
    [[ "$stale_key" == "$key" ]] && continue
    if (flock -n 8 && rm -rf "$stale" "$CACHE/kernel/build-$stale_key.log") 8>"$CACHE/kernel/.lock-$stale_key"; then
        log "removed stale build tree $stale"
    fi
done

build="$CACHE/kernel/build-$key"
build_log="$CACHE/kernel/build-$key.log"
rm -rf "$build"
mkdir -p "$build"
start=$SECONDS

log "building kernel $src_version, key $key"
log "extracting $SRC_TARBALL into $build"
tar -xJf "$SRC_TARBALL" -C "$build" --strip-components=1

log "configuring: allnoconfig + $FRAGMENT, olddefconfig"
(
    cd "$build"
    # allnoconfig with the fragment as KCONFIG_ALLCONFIG: everything off except what we ask for.
    make KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig
    make olddefconfig
) >"$build_log" 2>&1 || { tail -n 40 "$build_log" >&2; die "configuration failed (log: $build_log)"; }

# Verify every option the fragment asks for survived (Kconfig silently drops unmet dependencies).
missing=()
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" "$build/.config" || missing+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$build/.config" || echo absent))")
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^${BASH_REMATCH[1]}=" "$build/.config"; then
            missing+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$build/.config"))")
        fi
    fi
done <"$FRAGMENT"
if ((${#missing[@]})); then
    printf 'build-kernel: config option not honoured: %s\n' "${missing[@]}" >&2
    die "the final .config does not match $FRAGMENT (see $build/.config)"
fi
log "config verified: all fragment options present"

log "compiling with make -j$(nproc) (log: $build_log)"
make -C "$build" -j"$(nproc)" vmlinux >>"$build_log" 2>&1 &
make_pid=$!
last=$SECONDS
while kill -0 "$make_pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - last >= 15)); then
        last=$SECONDS
        objs="$(grep -c '^  CC ' "$build_log" || true)"
        log "  ... $((SECONDS - start))s elapsed, ${objs} objects compiled"
    fi
done
if ! wait "$make_pid"; then
    tail -n 40 "$build_log" >&2
    die "kernel build failed after $((SECONDS - start))s (log: $build_log, tree: $build)"
fi

mkdir -p "$out_dir"
cp "$build/.config" "$out_dir/config"
cp "$build/vmlinux" "$out_dir/vmlinux.tmp"
mv -f "$out_dir/vmlinux.tmp" "$out_dir/vmlinux"
mv -f "$build_log" "$out_dir/build.log"
rm -rf "$build"
publish
log "built in $((SECONDS - start))s: $out_dir/vmlinux ($(du -h "$out_dir/vmlinux" | cut -f1))"
log "symlink: $link -> $out_dir/vmlinux"
