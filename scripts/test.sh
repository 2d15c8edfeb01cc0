#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need,
# then checks formatting and lints and runs every test. GPU tests (once there
# are any) skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v python3 >/dev/null 2>&1 || missing+=(python3)   # writes an llm.c shard in a test
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: Rust is not installed: install it with rustup (https://rustup.rs), stable 1.85 or newer" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
