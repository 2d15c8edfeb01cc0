#!/usr/bin/env bash
# The SageMaker image, built and run here (scripts/test.sh calls this; alone,
# as root: scripts/test-image.sh). docker/build-image.sh builds the image
# (no Docker daemon, no base image pulled) from the release trainer it builds
# first; then the OCI image is checked (skopeo, umoci; its configuration
# against docker/Dockerfile and docker/README.md) and unpacked, and runc (the
# runtime under Docker) runs it the way `docker run` does, with what SageMaker
# adds: the image's entrypoint, env and working directory, tini as PID 1,
# Docker's default capabilities, its own network namespace, host name algo-1,
# a fake /opt/ml mounted in, `train` as the argument.
# Inside: trainer --version, the CUDA libraries and headers where the trainer
# looks for them, mpirun and sshd, then SageMaker jobs on the CPU (one process
# and processes_per_host=2 under mpirun): model, metrics, failure file, and
# SIGTERM -> checkpoint -> exit 0.
#
# Needs root, namespaces and the Debian archive and PyPI; installs mmdebstrap,
# umoci, skopeo, runc and jq with apt-get. Where it cannot run it says why and
# skips, except with CI=true or TRAINER_REQUIRE_IMAGE=1, where that is a
# failure. TRAINER_SKIP_IMAGE=1 skips it (outside CI); TRAINER_IMAGE_REUSE=1
# tests the image an earlier run left in target/image/oci (tag latest) instead
# of building it again.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

required=0
if [ "${CI:-}" = true ] || [ "${TRAINER_REQUIRE_IMAGE:-}" = 1 ]; then required=1; fi
skip() {
  if ((required)); then
    echo "error: the image test cannot run: $* (it is required where CI=true or TRAINER_REQUIRE_IMAGE=1)" >&2
    exit 1
  fi
  echo "skipping the image test (scripts/test-image.sh): $*"
  exit 0
}
[ "${TRAINER_SKIP_IMAGE:-}" != 1 ] || skip "TRAINER_SKIP_IMAGE=1"
[ "$(id -u)" -eq 0 ] || skip "it needs root (mmdebstrap's chroot, runc)"
command -v apt-get >/dev/null 2>&1 || skip "no apt-get: docker/build-image.sh needs a Debian or Ubuntu machine"
tools=()
for t in mmdebstrap umoci skopeo runc jq; do command -v "$t" >/dev/null 2>&1 || tools+=("$t"); done
python3 -m pip --version >/dev/null 2>&1 || tools+=(python3-pip)
if ((${#tools[@]})); then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null; } \
    || skip "apt-get could not install ${tools[*]}"
fi
unshare --mount --pid --net --fork true 2>/dev/null || skip "no namespaces here (mmdebstrap's chroot and runc need them)"

out="$repo/target/image"
runs="$out/runs"
ids=()
cleanup() {
  local id
  for id in "${ids[@]}"; do runc delete --force "$id" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
fail() { echo "FAIL (image): $*" >&2; exit 1; }
pass() { echo "ok (image): $*"; }
t0=$SECONDS
timing=()
lap() { timing+=("$(printf '%-34s %5d s' "$1" "$((SECONDS - t0))")"); t0=$SECONDS; }

echo "--- the release trainer"
cargo build --release --locked -p trainer-cli
lap "cargo build --release"
# Two test programs run inside the image as probes: the kernel compiler's own
# header search and cudarc's own library loading. The whole workspace's tests,
# as scripts/test.sh's `cargo test --workspace` built them (naming only these
# two would build them again with other features).
probes=$(cargo test --workspace --locked --no-run --message-format=json \
  | jq -r 'select(.reason == "compiler-artifact" and .executable != null) | .executable')
kernels_compile=$(grep '/kernels_compile-' <<< "$probes") || fail "no kernels_compile test program"
cuda_libraries=$(grep '/cuda_libraries-' <<< "$probes") || fail "no cuda_libraries test program"
lap "cargo test --no-run (probes)"

if [ "${TRAINER_IMAGE_REUSE:-}" = 1 ] && [ -d "$out/oci" ]; then
  echo "--- TRAINER_IMAGE_REUSE=1: testing the image already in $out/oci"
else
  echo "--- docker/build-image.sh $out"
  bash docker/build-image.sh "$out"
fi
lap "docker/build-image.sh"

echo "--- the OCI image"
image="$out/oci:latest"
skopeo inspect "oci:$image" > "$out/inspect.json" || fail "skopeo cannot read oci:$image"
skopeo inspect --config "oci:$image" > "$out/config.json"
umoci stat --image "$image" > /dev/null || fail "umoci cannot read $image"
jq -e '.Architecture == "amd64" and .Os == "linux" and (.Layers | length) == 1' "$out/inspect.json" > /dev/null \
  || fail "expected one linux/amd64 layer: $(cat "$out/inspect.json")"
pass "skopeo and umoci read the OCI image"
# What `docker load` and `podman load` take.
rm -f "$out/trainer.tar"
skopeo copy --quiet "oci:$image" "docker-archive:$out/trainer.tar:trainer:latest"
skopeo inspect "docker-archive:$out/trainer.tar" > /dev/null || fail "skopeo cannot read the docker-archive copy"
tar -xOf "$out/trainer.tar" manifest.json \
  | jq -e '.[0].RepoTags == ["docker.io/library/trainer:latest"] and (.[0].Layers | length) == 1' > /dev/null \
  || fail "the docker-archive copy is not trainer:latest with one layer"
echo "image: $(du -m "$out/trainer.tar" | cut -f1) MiB as a docker-archive tar"
rm -f "$out/trainer.tar"
pass "skopeo copies it into a docker-archive (docker load, podman load)"

# The configuration, as Dockerfile lines, three ways: the image's, the
# Dockerfile's last stage, and the block docker/README.md documents.
normalize() {
  local line
  while IFS= read -r line; do
    case $line in
      ENTRYPOINT\ *) printf 'ENTRYPOINT %s\n' "$(jq -c . <<< "${line#ENTRYPOINT }")" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done | sort
}
jq -r '.config
  | ("ENTRYPOINT " + (.Entrypoint | tojson)), ("WORKDIR " + .WorkingDir), (.Env[] | "ENV " + .),
    (.Labels // {} | to_entries[] | "LABEL " + .key + "=\"" + .value + "\""),
    (if .Cmd then "CMD " + (.Cmd | tojson) else empty end)' "$out/config.json" | normalize > "$out/config.image"
awk '/^FROM /{n = 0} /^(ENV|LABEL|WORKDIR|ENTRYPOINT) /{line[n++] = $0} END{for (i = 0; i < n; i++) print line[i]}' \
  docker/Dockerfile | normalize > "$out/config.dockerfile"
awk '/<!-- image config -->/{on = 1; next} on && /^```/{if (++fence == 2) exit; next} on && fence == 1' docker/README.md \
  | normalize > "$out/config.readme"
diff -u "$out/config.dockerfile" "$out/config.image" || fail "the image's configuration differs from docker/Dockerfile's"
diff -u "$out/config.readme" "$out/config.image" || fail "the image's configuration differs from docker/README.md's"
grep -q '^ENTRYPOINT \["/usr/bin/tini","--","/usr/local/bin/trainer"\]$' "$out/config.image" || fail "entrypoint"
pass "entrypoint, environment and labels as docker/Dockerfile and docker/README.md say ($(wc -l < "$out/config.image") settings)"

rm -rf "$out/bundle" "$runs"
umoci unpack --image "$image" "$out/bundle" > /dev/null
rootfs="$out/bundle/rootfs"
for absent in usr/bin/gcc usr/bin/cc usr/bin/ld usr/bin/rustc usr/bin/cargo root/.cargo root/.rustup \
  usr/bin/python3 usr/bin/pip usr/bin/pip3; do
  [ ! -e "$rootfs/$absent" ] || fail "the image holds /$absent"
done
[ -z "$(find "$rootfs/var/lib/apt/lists" "$rootfs/var/cache/apt" -type f ! -name lock 2>/dev/null)" ] \
  || fail "the image holds apt lists or caches"
echo "image: $(du -sm "$out/oci" | cut -f1) MiB compressed (OCI layout), $(du -sm "$rootfs" | cut -f1) MiB unpacked"
pass "no compiler, Rust, Python, pip or apt lists in the image"
lap "OCI checks and unpack"

# --- Running it. container [OPTIONS] ID ML_DIR [ARG...]: runs the image's
# entrypoint with ARGs (like `docker run`) in the foreground; options:
# -e NAME=VALUE (set), -u NAME (unset), -v SRC:DST (read-only bind),
# --entrypoint PATH, -d (in the background; its output in $runs/ID.log).
mkdir -p "$runs"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\talgo-1\n' > "$runs/hosts"
json_array() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"; } # any strings
container() {
  local set=() unset=() binds=() entry="" background=0
  while (($#)); do
    case $1 in
      -e) set+=("$2"); shift 2 ;;
      -u) unset+=("$2"); shift 2 ;;
      -v) binds+=("$2"); shift 2 ;;
      --entrypoint) entry=$2; shift 2 ;;
      -d) background=1; shift ;;
      *) break ;;
    esac
  done
  local id="trainer-image-test-$$-$1" ml=$2
  shift 2
  mkdir -p "$runs/$id"
  # Docker's default capabilities and no no-new-privileges, as `docker run`.
  jq --arg rootfs "$rootfs" --arg ml "$ml" --arg hosts "$runs/hosts" --arg entry "$entry" \
    --argjson args "$(json_array "$@")" --argjson set "$(json_array "${set[@]}")" \
    --argjson unset "$(json_array "${unset[@]}")" --argjson binds "$(json_array "${binds[@]}")" '
    ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
     "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
     "CAP_AUDIT_WRITE"] as $caps
    | ($set | map(split("=")[0])) as $names
    | .process.terminal = false
    | .process.args = (if $entry == "" then .process.args else [$entry] end) + $args
    | .process.env = [.process.env[] | select((split("=")[0]) as $n | ($names + $unset) | index($n) | not)] + $set
    | .process.capabilities = {bounding: $caps, effective: $caps, permitted: $caps}
    | .process.noNewPrivileges = false
    | del(.process.rlimits)
    | .root = {path: $rootfs, readonly: false}
    | .hostname = "algo-1"
    | .mounts += [{destination: "/opt/ml", type: "bind", source: $ml, options: ["rbind", "rw"]},
                  {destination: "/etc/hosts", type: "bind", source: $hosts, options: ["rbind", "ro"]},
                  {destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "mode=1777"]}]
                 + [$binds[] | split(":") | {destination: .[1], type: "bind", source: .[0], options: ["rbind", "ro"]}]
    ' "$out/bundle/config.json" > "$runs/$id/config.json"
  ids+=("$id")
  # A hung container is a failure, never a wait.
  if ((background)); then
    timeout -k 10 900 runc run --bundle "$runs/$id" "$id" > "$runs/$id.log" 2>&1 < /dev/null &
  else
    timeout -k 10 900 runc run --bundle "$runs/$id" "$id" < /dev/null
  fi
}

echo "--- inside the image"
mkdir -p "$runs/empty-ml"
want=$("$repo/target/release/trainer" --version)
got=$(container version "$runs/empty-ml" --version) || fail "trainer --version in the image"
[ "$got" = "$want" ] || fail "trainer --version in the image: $got, not $want"
pass "trainer --version: $got"

# shellcheck disable=SC2016 # expanded inside the image
container --entrypoint /bin/sh libs "$runs/empty-ml" -c '
  set -eu
  ldd /usr/local/bin/trainer | grep "not found" && exit 1
  for f in /usr/local/cuda/lib64/*.so*; do
    ldd "$f" | grep "not found" && { echo "$f: unresolved"; exit 1; }
  done
  for l in libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublas.so.13 libcublasLt.so.13 libnccl.so.2 libnccl.so; do
    ldconfig -p | grep -q "^[[:space:]]$l (" || { echo "$l is not in the loader cache"; exit 1; }
  done
  test -f "$TRAINER_CUDA_INCLUDE/cuda_bf16.h"
  ls /usr/local/cuda/lib64
  echo libraries-resolve' > "$runs/libs.log" 2>&1 || { cat "$runs/libs.log"; fail "the CUDA libraries do not resolve"; }
[ "$(tail -n 1 "$runs/libs.log")" = libraries-resolve ] || { cat "$runs/libs.log"; fail "the library check did not run to its end"; }
pass "ldd: the trainer and every CUDA library resolve; NVRTC, cuBLAS, cuBLASLt, NCCL in the loader cache"
container -v "$cuda_libraries:/probe/cuda_libraries" --entrypoint /probe/cuda_libraries \
  -e TRAINER_REQUIRE_CUDA_LIBS=nvrtc,cublas,cublaslt,nccl culibs "$runs/empty-ml" --nocapture > "$runs/culibs.log" 2>&1 \
  || { cat "$runs/culibs.log"; fail "cudarc does not load the CUDA libraries in the image"; }
pass "cudarc's loader opens $(grep -c ': found$' "$runs/culibs.log") libraries: $(grep -E ': (not )?found$' "$runs/culibs.log" | paste -sd, -) (the driver comes from a GPU host)"
# Without TRAINER_CUDA_INCLUDE, so the kernel compiler's own search finds the headers.
container -v "$kernels_compile:/probe/kernels_compile" --entrypoint /probe/kernels_compile \
  -u TRAINER_CUDA_INCLUDE -e TRAINER_REQUIRE_NVRTC=1 kernels "$runs/empty-ml" --nocapture > "$runs/kernels.log" 2>&1 \
  || { tail -n 30 "$runs/kernels.log"; fail "NVRTC does not compile the kernels in the image"; }
pass "NVRTC compiles every kernel in the image, headers found by the default search ($(grep -c 'bytes of PTX' "$runs/kernels.log") modules x archs)"

got=$(container --entrypoint mpirun mpirun "$runs/empty-ml" --allow-run-as-root -np 2 hostname 2>&1) \
  || fail "mpirun in the image: $got"
[ "$(sort -u <<< "$got")" = algo-1 ] || fail "mpirun -np 2 hostname: $got"
pass "mpirun starts 2 processes"
got=$(container --entrypoint /bin/sh sshd "$runs/empty-ml" -c '/usr/sbin/sshd && ssh -o BatchMode=yes algo-1 echo ssh-ok' 2>&1) \
  || fail "sshd and ssh in the image: $got"
[ "$got" = ssh-ok ] || fail "ssh to the image's own sshd: $got"
pass "sshd starts and takes the image's own key (the hop mpirun makes between hosts)"
lap "library, NVRTC, mpirun, sshd checks"

# --- SageMaker jobs: a fake /opt/ml per job, as tests/sagemaker.rs makes them,
# the job's config (tests/fixtures/sagemaker-job.toml) as a `config` channel.
"$repo/target/release/trainer" --version > /dev/null
head -c 120000 data/kjv/kjv.txt > "$runs/corpus.txt"
"$repo/target/release/trainer" prepare --input "$runs/corpus.txt" --output "$runs/shards" --val-tokens 4096 > /dev/null
new_job() { # new_job NAME HYPERPARAMETERS: prints the job's /opt/ml
  local ml="$runs/$1/ml"
  mkdir -p "$ml/input/config" "$ml/input/data/train" "$ml/input/data/validation" "$ml/input/data/config"
  printf '%s\n' "$2" > "$ml/input/config/hyperparameters.json"
  echo '{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"},
         "validation": {"TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated"},
         "config": {"TrainingInputMode": "File"}}' > "$ml/input/config/inputdataconfig.json"
  echo '{"current_host": "algo-1", "current_instance_type": "ml.p4d.24xlarge", "hosts": ["algo-1"],
         "network_interface_name": "eth0"}' > "$ml/input/config/resourceconfig.json"
  cp "$runs/shards/train_000000.bin" "$ml/input/data/train/"
  cp "$runs/shards/val_000000.bin" "$ml/input/data/validation/"
  cp tests/fixtures/sagemaker-job.toml "$ml/input/data/config/job.toml"
  echo "$ml"
}
outputs() { (cd "$1" && find . -path ./input -prune -o -type f -print | sed 's|^\./||' | sort | paste -sd' ' -); }
steps() { sed 's/^\[[0-9,]*\]<stdout>://' "$1" | grep -c '^step=.*train_loss=' || true; }
expect_outputs() { # expect_outputs ML STEP
  local s got want
  s=$(printf '%08d' "$2")
  want="checkpoints/step_$s/manifest.json checkpoints/step_$s/model.safetensors checkpoints/step_$s/optim_rank00000.safetensors"
  want+=" model/config.json model/model.safetensors model/trainer.toml output/data/metrics.jsonl output/data/report.png"
  got=$(outputs "$1")
  [ "$got" = "$want" ] || fail "outputs in /opt/ml: $got; expected $want"
  [ ! -e "$1/output/failure" ] || fail "a failure file: $(cat "$1/output/failure")"
  jq -e '.model_type == "gpt2" and .architectures[0] == "GPT2LMHeadModel"' "$1/model/config.json" > /dev/null \
    || fail "model/config.json is not a GPT-2 config: $(cat "$1/model/config.json")"
  python3 - "$1/model" << 'EOF' || fail "model/model.safetensors"
import json, struct, sys
d = sys.argv[1]
with open(f"{d}/model.safetensors", "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
vocab = json.load(open(f"{d}/config.json"))["vocab_size"]
assert header["transformer.wte.weight"]["shape"][0] == vocab, (header["transformer.wte.weight"], vocab)
EOF
}

ml=$(new_job one '{"config": "config/job.toml", "training.max_steps": "\"6\"", "optimizer.lr": "0.005", "sagemaker_program": "\"train.py\""}')
container job-one "$ml" train > "$runs/job-one.log" 2>&1 || { cat "$runs/job-one.log"; fail "the one-process job failed"; }
[ "$(steps "$runs/job-one.log")" = 6 ] || { cat "$runs/job-one.log"; fail "6 step lines"; }
grep -q 'role=Leader' "$runs/job-one.log" || fail "no role=Leader line"
expect_outputs "$ml" 6
grep -q '^max_steps = 6$' "$ml/model/trainer.toml" || fail "trainer.toml lacks max_steps = 6"
[ "$(wc -l < "$ml/output/data/metrics.jsonl")" -ge 6 ] || fail "metrics.jsonl"
pass "a one-process job: 6 steps, model (HF GPT-2), checkpoint, metrics and report where SageMaker collects them"

ml=$(new_job two '{"config": "config/job.toml", "training.max_steps": "3", "processes_per_host": "2"}')
container job-two "$ml" train > "$runs/job-two.log" 2>&1 || { cat "$runs/job-two.log"; fail "the processes_per_host=2 job failed"; }
for want in world_size=2 dp=2; do
  grep -q "$want" "$runs/job-two.log" || { cat "$runs/job-two.log"; fail "no $want: not 2 ranks under mpirun"; }
done
[ "$(steps "$runs/job-two.log")" = 3 ] || { cat "$runs/job-two.log"; fail "3 step lines (rank 0's)"; }
expect_outputs "$ml" 3
pass "processes_per_host=2: mpirun in the image, 2 data-parallel ranks, rank 0 publishes"

for case in 'optimizer.lrx|unknown field' 'processes_per_host|processes_per_host'; do
  key=${case%%|*} needle=${case#*|}
  value=1; [ "$key" = processes_per_host ] && value=0
  ml=$(new_job "bad-${key}" "{\"config\": \"config/job.toml\", \"$key\": \"$value\"}")
  set +e
  container "bad-${key}" "$ml" train > "$runs/bad-$key.out" 2> "$runs/bad-$key.err"
  rc=$?
  set -e
  [ "$rc" = 1 ] || { cat "$runs/bad-$key.err"; fail "$key = $value: exit status $rc, not 1"; }
  err=$(grep -v '^warning: ' "$runs/bad-$key.err")
  [ "$(wc -l <<< "$err")" = 1 ] || fail "$key = $value: not one error line: $err"
  [[ $err == "error: "*"$needle"* ]] || fail "$key = $value: the error does not name $needle: $err"
  [ "$(cat "$ml/output/failure")" = "${err#error: }" ] || fail "$key = $value: the failure file is not the error line"
  [ ! -e "$ml/model/model.safetensors" ] || fail "$key = $value: a model was written"
done
pass "a bad hyperparameter: exit 1, one error line, the same in /opt/ml/output/failure"
ml=$(new_job serve '{}')
container serve "$ml" serve > /dev/null 2>&1 && fail "serve was not refused"
grep -qF "\`serve\` is not supported" "$ml/output/failure" || fail "serve: $(cat "$ml/output/failure")"
pass "serve is refused, with its reason in the failure file"

# SIGTERM to the container (docker stop; StopTrainingJob) once training runs.
stop_test() { # stop_test NAME HYPERPARAMETERS
  local ml id="trainer-image-test-$$-$1" i
  ml=$(new_job "$1" "$2")
  container -d "$1" "$ml" train
  local pid=$!
  for ((i = 0; i < 600; i++)); do
    [ "$(steps "$runs/$id.log")" -gt 0 ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$runs/$id.log"; fail "$1: ended before its first step"; }
    sleep 0.5
  done
  [ "$(steps "$runs/$id.log")" -gt 0 ] || { cat "$runs/$id.log"; fail "$1: no step in 300 s"; }
  runc kill "$id" TERM
  local rc=0
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || { cat "$runs/$id.log"; fail "$1: exit status $rc after SIGTERM, not 0"; }
  [ -n "$(ls -A "$ml/checkpoints" 2>/dev/null)" ] || { cat "$runs/$id.log"; fail "$1: no checkpoint after SIGTERM"; }
  [ ! -e "$ml/output/failure" ] || fail "$1: a failure file after SIGTERM: $(cat "$ml/output/failure")"
}
stop_test stop-one '{"config": "config/job.toml", "training.max_steps": "100000"}'
pass "SIGTERM to the container: a checkpoint, then exit 0"
stop_test stop-two '{"config": "config/job.toml", "training.max_steps": "100000", "processes_per_host": "2"}'
pass "SIGTERM with processes_per_host=2: the ranks checkpoint, then exit 0"
lap "SageMaker jobs in the image"

echo "--- image test times"
printf '%s\n' "${timing[@]}"
