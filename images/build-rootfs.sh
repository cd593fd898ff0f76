#!/usr/bin/env bash
# Build a NeuroVisor guest root filesystem image (read-only ext4) with the guest agent as init.
#
#   build-rootfs.sh [--image default|full|desktop] [--packages P1,P2 --name IMAGE+HASH] --agent PATH_TO_AGENT_BINARY
#
# --packages adds Debian packages to the image's own (a sandbox profile's capabilities); the result is
# published under --name, which `neurovisor` derives from the base image and the package list.
#
# Base (debootstrap, cached):  $CACHE/rootfs-base/<basekey>/root/   (+ .complete marker, written last)
# Final image (cached):        $CACHE/rootfs/<key>/rootfs.ext4, languages.json
# Published symlink:           $CACHE/images/<name> -> $CACHE/rootfs/<key>
# basekey = sha256(name + package list + this script); key = sha256(basekey + sha256(agent)).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
CACHE="${NEUROVISOR_CACHE_DIR:-$HOME/.cache/neurovisor}"
MIRROR="${NEUROVISOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

die() { echo "build-rootfs: error: $*" >&2; exit 1; }
log() { echo "build-rootfs: $*"; }
usage() { echo "usage: $0 [--image default|full|desktop] [--packages P1,P2 --name IMAGE+HASH] --agent PATH_TO_AGENT_BINARY" >&2; exit 2; }

image=default
apt_packages=""
agent=""
extra=""
name=""
while (($#)); do
    case "$1" in
        --image) [[ $# -ge 2 ]] || usage; image="$2"; shift 2 ;;
        --image=*) image="${1#*=}"; shift ;;
        --agent) [[ $# -ge 2 ]] || usage; agent="$2"; shift 2 ;;
        --agent=*) agent="${1#*=}"; shift ;;
        --packages) [[ $# -ge 2 ]] || usage; extra="$2"; shift 2 ;;
        --name) [[ $# -ge 2 ]] || usage; name="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "build-rootfs: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n "$agent" ]] || usage
[[ -f "$agent" ]] || die "agent binary not found: $agent"

case "$image" in
    # pip and git (with CA certificates) for `neurovisor install` and `repo`, which reach a package index
    # and a repository through the VM's gateway (--network).
    default) packages="python3,bash,nodejs,python3-pip,git,ca-certificates" ;;
    # rustc needs a linker (`cc`) and libc headers/crt files to link binaries.
    full) packages="python3,bash,nodejs,python3-pip,git,ca-certificates,golang-go,rustc,gcc,libc6-dev" ;;
    # A desktop for computer-use agents: Xvnc (an X server that is its own VNC server, so no X driver and
    # no second process), openbox + tint2 (lighter than XFCE; starts in about a second under TCG), a
    # terminal, Chromium, and the tools the host drives it with (xdotool: input; scrot: screenshots).
    # debootstrap's own resolver leaves GTK's dconf chain unconfigured, so these go in with apt afterwards.
    desktop)
        packages="python3,bash,ca-certificates"
        apt_packages="tigervnc-standalone-server xfonts-base openbox tint2 xterm x11-xserver-utils xdotool scrot chromium fonts-dejavu-core"
        ;;
    *) die "unknown image '$image' (expected default, full or desktop)" ;;
esac
if [[ -n "$extra" || -n "$name" ]]; then
    [[ "$extra" =~ ^[a-z0-9][a-z0-9.+-]+(,[a-z0-9][a-z0-9.+-]+)*$ ]] || die "--packages: '$extra' is not a comma-separated list of Debian package names"
    [[ "$name" =~ ^$image\+[0-9a-f]{12}$ ]] || die "--name: '$name' is not $image+HASH"
    packages="$packages,$extra"
else
    name="$image"
fi

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot, file ownership)"
for tool in debootstrap chroot unshare mkfs.ext4 sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing tool '$tool' (apt-get install debootstrap e2fsprogs util-linux)"
done

sha() { sha256sum | cut -c1-16; }
basekey="$(cat <(printf '%s\n%s\n%s\n%s\n' "$name" "$packages" "$apt_packages" "$SUITE") "$SCRIPT_PATH" | sha)"
agent_sha="$(sha256sum "$agent" | cut -d' ' -f1)"
key="$(printf '%s\n%s\n' "$basekey" "$agent_sha" | sha)"

base="$CACHE/rootfs-base/$basekey"
out="$CACHE/rootfs/$key"
link="$CACHE/images/$name"

# Atomically point $CACHE/images/<image> at the final image directory.
publish() {
    mkdir -p "$CACHE/images"
    ln -sfn "$out" "$link.tmp.$$"
    mv -Tf "$link.tmp.$$" "$link"
}

if [[ -f "$out/rootfs.ext4" ]]; then
    publish
    log "cached: $link -> $out"
    exit 0
fi

mkdir -p "$CACHE/rootfs" "$CACHE/rootfs-base"
exec 9>"$CACHE/rootfs/.lock-$name"
flock 9
start=$SECONDS

# Run a shell snippet inside the rootfs with a private /proc (unmounted automatically with the namespace).
in_root() {
    # shellcheck disable=SC2016 # $0 expands in the inner shell
    unshare --mount --propagation private -- \
        chroot "$1" /bin/sh -c 'mount -t proc proc /proc && exec /bin/sh -c "$0"' "$2"
}

# The desktop image's session: started by the host (as the sandbox user, through the agent's process
# service) when a desktop sandbox is created; its "desktop ready" line is what the host waits for. VNC
# listens on the guest's loopback only: the host reaches it through the agent (Bridge/Dial), never a network.
write_desktop() {
    local r="$1"
    cat >"$r/usr/local/bin/neurovisor-desktop" <<'SESSION'
#!/bin/sh
# neurovisor-desktop WIDTHxHEIGHT: the desktop on display :0, VNC on 127.0.0.1:5900.
set -u
geometry="${1:-1280x800}"
export DISPLAY=:0 HOME="${HOME:-/home/user}"
cd "$HOME" || exit 1
Xvnc :0 -geometry "$geometry" -depth 24 -rfbport 5900 -localhost -SecurityTypes None \
    -AlwaysShared -AcceptSetDesktopSize=0 -nolisten tcp -dpi 96 >/tmp/.Xvnc.log 2>&1 &
x=$!
i=0
until xsetroot -solid '#2b5f8a' 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 600 ] || ! kill -0 "$x" 2>/dev/null; then
        echo "desktop failed: Xvnc did not start" >&2
        cat /tmp/.Xvnc.log >&2
        exit 1
    fi
    sleep 0.05
done
openbox >/dev/null 2>&1 &
tint2 >/dev/null 2>&1 &
xterm -geometry 90x24+60+60 -fa 'DejaVu Sans Mono' -fs 12 -title terminal &
xdotool search --sync --onlyvisible --class xterm >/dev/null 2>&1
echo "desktop ready"
wait "$x"
SESSION
    chmod 0755 "$r/usr/local/bin/neurovisor-desktop"
    printf '%s\n' '{"vnc_port": 5900, "session": "/usr/local/bin/neurovisor-desktop"}' >"$r/etc/neurovisor/desktop.json"
}

build_base() {
    local tmp="$base.tmp"
    rm -rf "$base" "$tmp"
    mkdir -p "$tmp"
    log "base: debootstrap --variant=minbase $SUITE with $packages (mirror $MIRROR)"
    local dlog="$CACHE/rootfs-base/$basekey.debootstrap.log"
    if ! debootstrap --variant=minbase --include="$packages" "$SUITE" "$tmp/root" "$MIRROR" >"$dlog" 2>&1; then
        tail -n 40 "$dlog" >&2
        [[ -f "$tmp/root/debootstrap/debootstrap.log" ]] && tail -n 40 "$tmp/root/debootstrap/debootstrap.log" >&2
        die "debootstrap failed (log: $dlog)"
    fi
    rm -f "$dlog"
    local r="$tmp/root"
    if [[ -n "$apt_packages" ]]; then
        log "base: apt-get install $apt_packages"
        printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$r/etc/apt/sources.list"
        # No daemon starts inside the chroot (dbus and friends).
        printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
        chmod 0755 "$r/usr/sbin/policy-rc.d"
        local alog="$CACHE/rootfs-base/$basekey.apt.log"
        if ! in_root "$r" "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q --no-install-recommends $apt_packages" >"$alog" 2>&1; then
            tail -n 40 "$alog" >&2
            die "apt-get install failed (log: $alog)"
        fi
        rm -f "$alog" "$r/usr/sbin/policy-rc.d"
    fi

    log "base: sandbox user, directories, languages.json"
    in_root "$r" '
        set -e
        groupadd -g 1000 user
        useradd -u 1000 -g 1000 -m -d /home/user -s /bin/bash user
        mkdir -p /overlay /proc /sys /dev /run /tmp /etc/neurovisor
        chmod 1777 /tmp
        chmod 0755 /overlay /run
    '
    # Interpreter versions, as plain version strings.
    local versions
    # shellcheck disable=SC2016 # expands inside the chroot
    versions="$(in_root "$r" '
        command -v python3 >/dev/null && echo "python $(python3 --version 2>&1 | cut -d" " -f2)"
        command -v bash >/dev/null && echo "bash $(bash --version | head -n1 | sed -E "s/.*version ([0-9.]+).*/\1/")"
        command -v node >/dev/null && echo "javascript $(node --version | sed "s/^v//")"
        command -v go >/dev/null && echo "go $(go version | cut -d" " -f3 | sed "s/^go//")"
        command -v rustc >/dev/null && echo "rust $(rustc --version | cut -d" " -f2)"
        true
    ')"
    local json="[" sep="" name version
    while read -r name version; do
        [[ -n "$name" && "$version" =~ ^[0-9][0-9A-Za-z.+~-]*$ ]] || die "bad version line: '$name $version'"
        json+="$sep{\"name\": \"$name\", \"version\": \"$version\"}"
        sep=", "
    done <<<"$versions"
    json+="]"
    printf '%s\n' "$json" >"$r/etc/neurovisor/languages.json"
    log "base: languages: $json"

    if [[ "$image" == desktop ]]; then
        log "base: desktop session (/usr/local/bin/neurovisor-desktop, /etc/neurovisor/desktop.json)"
        write_desktop "$r"
    fi

    log "base: trimming apt caches, docs, man pages, locales"
    rm -rf "$r"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/var/cache/debconf/*-old \
        "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/usr/share/lintian \
        "$r"/usr/share/locale/* "$r"/var/log/* "$r"/debootstrap
    find "$r/var/cache" "$r/tmp" -mindepth 1 -delete 2>/dev/null || true

    printf '%s\n' "$name" >"$tmp/image"
    touch "$tmp/.complete"
    mv -T "$tmp" "$base"

    # An older base of the same image name is superseded (its package list or this script changed).
    local old
    for old in "$CACHE"/rootfs-base/*/; do
        old="${old%/}"
        [[ "$old" != "$base" && -f "$old/image" && "$(cat "$old/image")" == "$name" ]] || continue
        log "base: pruning superseded $old"
        rm -rf "$old"
    done
}

if [[ -f "$base/.complete" ]]; then
    log "base: cached $base"
else
    build_base
    log "base: built in $((SECONDS - start))s: $base"
fi

# Final image: hardlinked staging copy + agent, then mkfs.ext4 -d (no loop mounts).
staging="$CACHE/rootfs/.staging-$key"
tmp_out="$CACHE/rootfs/.tmp-$key"
rm -rf "$staging" "$tmp_out"
trap 'rm -rf "$staging" "$tmp_out"' EXIT
cp -al "$base/root" "$staging"

log "installing agent $agent as /sbin/neurovisor-agent"
agent_dst="$staging/usr/sbin/neurovisor-agent"
[[ -L "$staging/sbin" ]] || agent_dst="$staging/sbin/neurovisor-agent"
rm -f "$agent_dst"  # never write through a hardlink into the cached base
cp "$agent" "$agent_dst.new"
chown 0:0 "$agent_dst.new"
chmod 0755 "$agent_dst.new"
mv -f "$agent_dst.new" "$agent_dst"

used_kib="$(du -sk "$staging" | cut -f1)"
files="$(find "$staging" -xdev | wc -l)"
size_mib=$(((used_kib * 12 / 10) / 1024 + 64))
inodes=$((files * 12 / 10 + 4096))
mkdir -p "$tmp_out"
log "mkfs.ext4: ${size_mib} MiB, $inodes inodes ($((used_kib / 1024)) MiB of files)"
truncate -s "${size_mib}M" "$tmp_out/rootfs.ext4"
# Read-only root: no journal, no reserved blocks.
mkfs.ext4 -q -F -d "$staging" -L neurovisor-root -N "$inodes" -m 0 -O ^has_journal \
    "$tmp_out/rootfs.ext4"
cp "$staging/etc/neurovisor/languages.json" "$tmp_out/languages.json"
[[ -f "$staging/etc/neurovisor/desktop.json" ]] && cp "$staging/etc/neurovisor/desktop.json" "$tmp_out/desktop.json"
printf '%s\n' "$name" >"$tmp_out/image"
printf '%s\n' "$agent_sha" >"$tmp_out/agent.sha256"
rm -rf "$out"
mv -T "$tmp_out" "$out"
rm -rf "$staging"
trap - EXIT
publish

# Prune older final images of this image name that no published symlink points to.
for dir in "$CACHE"/rootfs/*/; do
    dir="${dir%/}"
    [[ -f "$dir/image" && "$(cat "$dir/image")" == "$name" ]] || continue
    referenced=false
    for l in "$CACHE"/images/*; do
        [[ -L "$l" && "$(readlink -f "$l")" == "$(readlink -f "$dir")" ]] && referenced=true
    done
    if ! $referenced; then
        log "pruning unreferenced $dir"
        rm -rf "$dir"
    fi
done

log "done in $((SECONDS - start))s ($(du -h --apparent-size "$out/rootfs.ext4" | cut -f1) image)"
log "image: $link/rootfs.ext4 -> $out/rootfs.ext4"
