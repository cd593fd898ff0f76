#!/usr/bin/env bash
# The test command (what CI runs): setup, lints, unit and VM integration
# tests, and the boot benchmark (printed, not asserted).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh --full --desktop

echo; echo "== Firecracker and jailer (real binaries for tests/firecracker.rs; built once, cached)"
# Built from the source kept in ../shared (CI's fresh clone has it beside the
# repository); the script installs libseccomp-dev itself and prints the directory.
# Its check for libseccomp (`ldconfig -p | grep libseccomp.so`) is already met by
# the runtime library, libseccomp.so.2; linking needs the -dev package.
if ! dpkg -s libseccomp-dev >/dev/null 2>&1; then
    apt-get install -y -q libseccomp-dev || { apt-get update -q && apt-get install -y -q libseccomp-dev; }
fi
fc_dir=$(bash ../shared/firecracker/build-firecracker.sh)
# Prometheus and promtool (scrape and lint /metrics: tests/limits.rs,
# tests/observability.rs), the Pushgateway (`--pushgateway`), PyYAML for the
# monitoring stack's checker.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-pushgateway >/dev/null 2>&1 \
    || ! python3 -c 'import yaml' 2>/dev/null; then
    pkgs="prometheus prometheus-pushgateway python3-yaml"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $pkgs; }
fi
# Chromium on the host: tests/desktop.rs opens a desktop sandbox's noVNC page in it.
if ! command -v chromium >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
fi
# (The tests start their own servers on free loopback ports.)
export FIRECRACKER_BIN="$fc_dir/firecracker" JAILER_BIN="$fc_dir/jailer"
"$FIRECRACKER_BIN" --version

echo; echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# The test-only misbehaving agent (tests/hostile_guest.rs builds it too, and its image).
cargo clippy --release --locked -p neurovisor-guest-agent --all-targets --features misbehave -- -D warnings
cargo build --release --locked -p neurovisor-guest-agent --features misbehave --bin neurovisor-agent-misbehave

echo; echo "== tests (integration tests boot real VMs)"
# The library's warnings (a restore that failed, a boot that stalled) go into
# each test's captured output, shown when it fails.
export NV_TEST_LOG="${NV_TEST_LOG:-neurovisor=warn}"
cargo test --release --locked --workspace

echo; echo "== soak: 300 executions through the daemon pool, no client-visible failure (5-7 min)"
cargo test --release --locked -p neurovisor --test soak -- --ignored --nocapture

echo; echo "== monitoring stack: configs, rules (promtool), dashboards"
python3 monitoring/check.py

echo; echo "== observability examples (real VMs; each exits non-zero if what it shows did not hold)"
for ex in metrics_demo trace_id_demo streaming_latency; do
    cargo run --release --locked -q -p neurovisor --example "$ex"
done

echo; echo "== security proofs (each exits non-zero if its protection did not hold)"
for ex in seccomp_proof capabilities_proof rate_limit_proof cgroups_demo; do
    cargo run --release --locked -q -p neurovisor --example "$ex"
done
cargo clippy --release --locked -p neurovisor --all-targets --features ebpf -- -D warnings
cargo test --release --locked -p neurovisor --features ebpf --test ebpf
cargo run --release --locked -q -p neurovisor --features ebpf --example ebpf_proof
# Exit 3: this kernel refuses BPF LSM programs (EPERM at load, see the ebpf
# module docs); the policy then runs as a dry run whose decisions are checked.
cargo run --release --locked -q -p neurovisor --features ebpf --example lsm_proof || [ $? -eq 3 ]
echo; echo "== benchmark: neurovisor bench boot"
./target/release/neurovisor bench boot --runs 9 --size small
echo; echo "== benchmark: neurovisor bench snapshot (restore vs cold boot, host CPU and PSS per VM)"
./target/release/neurovisor bench snapshot --runs 5 --vms 4 --size small
