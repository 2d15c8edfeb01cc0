#!/usr/bin/env bash
# The quick start: installs what the build needs (Debian/Ubuntu), builds the
# release `trainer`, tokenizes the bundled King James Bible and trains
# configs/tiny.toml on the CPU (about a minute on two cores).
# Extra arguments go to `trainer`, e.g. --set training.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
# MPI: the trainer links Open MPI (multi-process runs); building it runs bindgen.
command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  else
    echo "error: a C compiler and Open MPI with its headers (plus libclang) are needed; install ${missing[*]} and run this again" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: Rust is not installed: install it with rustup (https://rustup.rs), stable 1.85 or newer, and run this again" >&2
  exit 1
fi

cargo build --release -p trainer-cli
trainer=target/release/trainer
if [ ! -f data/kjv/shards/train_000000.bin ]; then
  "$trainer" prepare --input data/kjv/kjv.txt --output data/kjv/shards --val-tokens 65536 --overwrite
fi
exec "$trainer" --config configs/tiny.toml "$@"
