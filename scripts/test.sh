#!/usr/bin/env bash
# The test command (what CI runs): setup, lints, unit and VM integration
# tests, and the boot benchmark (printed, not asserted).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/setup.sh --full

echo; echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings

echo; echo "== tests (integration tests boot real VMs)"
cargo test --release --locked --workspace

echo; echo "== benchmark: neurovisor bench boot"
./target/release/neurovisor bench boot --runs 5 --size small
