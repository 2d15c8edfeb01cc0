#!/usr/bin/env bash
# Builds the SageMaker training image without Docker and without pulling a base
# image: a minimal Debian 12 root filesystem from the Debian archive
# (mmdebstrap), the packages of docker/packages.txt, the CUDA libraries of
# docker/cuda-wheels.txt (docker/install-cuda.sh), the release trainer and
# configs/, finished by docker/setup-image.sh; then an OCI image (umoci) with
# the ENV, LABEL, WORKDIR and ENTRYPOINT of docker/Dockerfile's last stage.
#
#   docker/build-image.sh [--trainer PATH] [--mirror URL] OUT_DIR
#
# Runs as root on a Debian or Ubuntu machine with network access to the Debian
# archive and PyPI; installs mmdebstrap, umoci and pip with apt-get when they
# are missing. Writes:
#   OUT_DIR/oci      the OCI image layout, tag `latest`: push it with
#                    skopeo copy oci:OUT_DIR/oci:latest docker://ACCOUNT.dkr.ecr.REGION.amazonaws.com/trainer:latest
#   OUT_DIR/wheels   the downloaded CUDA wheels (kept: a rebuild reuses them)
# Options:
#   --trainer PATH    the trainer binary (default: target/release/trainer of this
#                     repository; build it with cargo build --release -p trainer-cli
#                     on Debian 12 or a system with an older glibc)
#   --mirror URL      a Debian mirror instead of deb.debian.org (apt proxies too)
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
usage="usage: $0 [--trainer PATH] [--mirror URL] OUT_DIR"

repo=$(cd "$(dirname "$0")/.." && pwd)
trainer="$repo/target/release/trainer"
mirror=()
out=""
while (($#)); do
  case $1 in
    --trainer) [ "$#" -ge 2 ] || die "--trainer needs a path; $usage"; trainer=$2; shift 2 ;;
    --mirror) [ "$#" -ge 2 ] || die "--mirror needs a URL; $usage"; mirror=("$2"); shift 2 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    -*) die "unknown option $1; $usage" ;;
    *) [ -z "$out" ] || die "one OUT_DIR only (got $out and $1); $usage"; out=$1; shift ;;
  esac
done
[ -n "$out" ] || die "no OUT_DIR given; $usage"
[ "$(id -u)" -eq 0 ] || die "run as root: mmdebstrap builds the root filesystem in a chroot"
[ -f "$trainer" ] || die "no trainer binary at $trainer: build it with cargo build --release -p trainer-cli, or pass --trainer PATH"
[ -x "$trainer" ] || die "$trainer is not executable"
command -v apt-get >/dev/null 2>&1 || die "this script needs a Debian or Ubuntu machine (apt-get)"

# The build tools, from the distribution.
tools=()
command -v mmdebstrap >/dev/null 2>&1 || tools+=(mmdebstrap)
command -v umoci >/dev/null 2>&1 || tools+=(umoci)
command -v python3 >/dev/null 2>&1 || tools+=(python3)
python3 -m pip --version >/dev/null 2>&1 || tools+=(python3-pip)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || tools+=(debian-archive-keyring)
if ((${#tools[@]})); then
  echo "build-image: installing ${tools[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work" "$out/oci"
mkdir -p "$work" "$out/wheels"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# 1. The CUDA wheels (pinned in docker/cuda-wheels.txt), downloaded once.
wheels="$work/wheels"
mkdir -p "$wheels"
mapfile -t wheel_pins < <(grep -v -e '^#' -e '^[[:space:]]*$' "$repo/docker/cuda-wheels.txt")
echo "build-image: CUDA wheels ${wheel_pins[*]}"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$out/wheels" "${wheel_pins[@]}"
for r in "${wheel_pins[@]}"; do
  name=${r%%==*} version=${r#*==}
  f=$(find "$out/wheels" -maxdepth 1 -name "${name//-/_}-${version}-*.whl" | head -n 1)
  [ -n "$f" ] || die "pip download left no wheel for $r in $out/wheels"
  ln -s "$f" "$wheels/"
done

# 2. What goes into the image besides the packages, under a staging root.
stage="$work/stage"
bash "$repo/docker/install-cuda.sh" "$wheels" "$stage"
install -D -m 0755 "$trainer" "$stage/usr/local/bin/trainer"
mkdir -p "$stage/opt/trainer"
cp -R "$repo/configs" "$stage/opt/trainer/configs"
find "$stage" -type d -exec chmod 0755 {} +
find "$stage/opt" -type f -exec chmod 0644 {} +

# 3. The root filesystem: Debian 12 minbase (the package set of
# debian:bookworm-slim, with its documentation excludes) and the packages of
# docker/packages.txt, without recommendations; apt's lists and caches are
# removed by mmdebstrap. /run is kept: sshd needs /run/sshd. The build
# machine's resolv.conf and hostname, which mmdebstrap copies in, are emptied
# (a container runtime mounts its own).
packages=$(grep -v -e '^#' -e '^[[:space:]]*$' "$repo/docker/packages.txt" | paste -sd, -)
echo "build-image: mmdebstrap bookworm with $packages"
# shellcheck disable=SC2016 # "$1" is the chroot, expanded by mmdebstrap's hooks
mmdebstrap --mode=root --variant=minbase --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include="$packages" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --skip=cleanup/run \
  --customize-hook="sync-in '$stage/usr/local' /usr/local" \
  --customize-hook="sync-in '$stage/opt' /opt" \
  --customize-hook="sync-in '$stage/etc' /etc" \
  --customize-hook="upload '$repo/docker/setup-image.sh' /setup-image.sh" \
  --customize-hook='chroot "$1" bash /setup-image.sh' \
  --customize-hook='rm -f "$1/setup-image.sh"' \
  --customize-hook='for f in resolv.conf hostname; do : > "$1/etc/$f"; chmod 0644 "$1/etc/$f"; done' \
  bookworm - "${mirror[@]}" \
  | mmtarfilter --path-exclude='/dev/*' > "$work/rootfs.tar"

# 4. The OCI image: one layer, the configuration of docker/Dockerfile's last stage.
last_stage=()
while IFS= read -r line; do
  case $line in
    FROM\ *) last_stage=() ;;
    *) last_stage+=("$line") ;;
  esac
done < "$repo/docker/Dockerfile"
config=()
for line in "${last_stage[@]}"; do
  case $line in
    ENV\ *)
      kv=${line#ENV }
      [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= && $kv != *[[:space:]\"\'\$]* ]] \
        || die "docker/Dockerfile: cannot read '$line' (one NAME=value a line, no spaces, quotes or \$)"
      config+=(--config.env "$kv") ;;
    LABEL\ *)
      kv=${line#LABEL }
      name=${kv%%=*} value=${kv#*=}
      [[ $name =~ ^[a-z0-9._-]+$ && $value == \"*\" && ${value:1:-1} != *[\"\\\$]* ]] \
        || die "docker/Dockerfile: cannot read '$line' (one name=\"value\" a line, no quotes, \\ or \$ inside)"
      config+=(--config.label "$name=${value:1:-1}") ;;
    WORKDIR\ *) config+=(--config.workingdir "${line#WORKDIR }") ;;
    ENTRYPOINT\ *)
      args=$(python3 -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "${line#ENTRYPOINT }") \
        || die "docker/Dockerfile: ENTRYPOINT is not a JSON array: $line"
      mapfile -t entry <<< "$args"
      for a in "${entry[@]}"; do config+=(--config.entrypoint "$a"); done ;;
    CMD\ * | USER\ * | EXPOSE\ * | VOLUME\ * | STOPSIGNAL\ *)
      die "docker/Dockerfile: build-image.sh does not carry '${line%% *}' over; add it to build-image.sh" ;;
  esac
done

image="$out/oci:latest"
umoci init --layout "$out/oci"
umoci new --image "$image"
umoci raw add-layer --image "$image" "$work/rootfs.tar"
umoci config --image "$image" --author "docker/build-image.sh" "${config[@]}"
umoci gc --layout "$out/oci"

layer_mib=$(($(stat -c %s "$work/rootfs.tar") / 1048576))
echo "build-image: $image in $((SECONDS - start)) s: $(du -sm "$out/oci" | cut -f1) MiB compressed (the OCI layout)," \
  "$layer_mib MiB unpacked"
