#!/usr/bin/env bash
# The quick starts: install what the build needs (Debian/Ubuntu), build the
# release `trainer`, prepare the data and train on the CPU.
#   ./scripts/quickstart.sh       GPT: tokenizes the bundled King James Bible and
#                                 trains configs/tiny.toml (about a minute on two cores)
#   ./scripts/quickstart.sh vit   ViT: installs Debian's dataset-fashion-mnist, prepares
#                                 it and trains configs/vit-fashion.toml (about 2.5 minutes)
# Extra arguments go to `trainer`, e.g. --set training.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."

model=gpt
if [ "${1:-}" = vit ] || [ "${1:-}" = gpt ]; then
  model=$1
  shift
fi
fashion=/usr/share/datasets/fashion-mnist

missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
# MPI: the trainer links Open MPI (multi-process runs); building it runs bindgen.
command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev)
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
# Fashion-MNIST (MIT licence) as gzipped IDX files, from Debian's archive.
[ "$model" != vit ] || [ -f "$fashion/train-images-idx3-ubyte.gz" ] || missing+=(dataset-fashion-mnist)
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
if [ "$model" = vit ]; then
  if [ ! -f data/fashion-mnist/val_000000.img ]; then
    "$trainer" prepare --idx-train "$fashion/train-images-idx3-ubyte.gz" "$fashion/train-labels-idx1-ubyte.gz" \
      --idx-val "$fashion/t10k-images-idx3-ubyte.gz" "$fashion/t10k-labels-idx1-ubyte.gz" \
      --class-names configs/fashion-mnist-classes.txt --output data/fashion-mnist --overwrite
  fi
  exec "$trainer" --config configs/vit-fashion.toml "$@"
fi
if [ ! -f data/kjv/shards/train_000000.bin ]; then
  "$trainer" prepare --input data/kjv/kjv.txt --output data/kjv/shards --val-tokens 65536 --overwrite
fi
exec "$trainer" --config configs/tiny.toml "$@"
