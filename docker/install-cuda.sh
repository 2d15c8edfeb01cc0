#!/usr/bin/env bash
# Puts the CUDA runtime pieces the trainer loads, from the wheels of
# docker/cuda-wheels.txt, into an image root: the libraries in
# /usr/local/cuda/lib64, the headers NVRTC needs in /usr/local/cuda/include
# (the kernel compiler's default place; crates/core/src/cuda/compile.rs), and
# /usr/local/cuda/wheels.txt naming the wheels they came from. Used by
# docker/build-image.sh and docker/Dockerfile alike, so both images hold the
# same files.
#
#   docker/install-cuda.sh WHEEL_DIR ROOT
#
# WHEEL_DIR holds the downloaded .whl files (all of cuda-wheels.txt: a
# library missing from them is an error). Needs python3 (to unpack the wheels:
# zip files); writes nothing outside ROOT.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
[ "$#" -eq 2 ] || die "usage: $0 WHEEL_DIR ROOT"
wheels=$1 root=$2
[ -d "$wheels" ] || die "no wheel directory $wheels"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to unpack the wheels (apt-get install python3)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
found=()
for whl in "$wheels"/*.whl; do
  python3 -m zipfile -e "$whl" "$tmp/"
  found+=("$(basename "$whl")")
done
((${#found[@]})) || die "no .whl files in $wheels"

cu="$tmp/nvidia/cu13"
nccl="$tmp/nvidia/nccl"
for f in "$cu/lib/libnvrtc.so.13" "$cu/lib/libnvrtc-builtins.so.13.0" "$cu/lib/libcublas.so.13" \
  "$cu/lib/libcublasLt.so.13" "$nccl/lib/libnccl.so.2" "$cu/include/cuda_bf16.h"; do
  [ -f "$f" ] || die "no ${f#"$tmp"/} in the wheels of $wheels (docker/cuda-wheels.txt)"
done

lib="$root/usr/local/cuda/lib64"
inc="$root/usr/local/cuda/include"
mkdir -p "$lib" "$inc"
# Only what is loaded: libnvrtc.alt, libnvblas and libcudart are left out
# (the trainer drives the GPU through the driver API, which cuBLAS and NCCL
# also need no runtime library for).
for f in libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublas.so.13 libcublasLt.so.13; do
  install -m 0644 "$cu/lib/$f" "$lib/$f"
done
install -m 0644 "$nccl/lib/libnccl.so.2" "$lib/libnccl.so.2"
# cudarc looks for libnccl.so (and numbered names other than .2).
ln -sf libnccl.so.2 "$lib/libnccl.so"
cp -R "$cu/include/." "$nccl/include/." "$inc/"
find "$inc" -type f -exec chmod 0644 {} +

mkdir -p "$root/etc/ld.so.conf.d"
echo /usr/local/cuda/lib64 > "$root/etc/ld.so.conf.d/cuda.conf"
printf '%s\n' "${found[@]}" | sort > "$root/usr/local/cuda/wheels.txt"
