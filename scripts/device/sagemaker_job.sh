#!/usr/bin/env bash
# Runs on the GPU machine (no Rust, no Docker there): the SageMaker job path on
# a GPU, from a fake /opt/ml tree, with the image's default config
# (configs/sagemaker-gpt2-124m.toml: GPT-2 124M, cuda, bf16) shortened by
# hyperparameters. Checks the exit status, the outputs, that no failure file
# was left, and that docker/README.md's metric regexes (with Python's `re`,
# as SageMaker's are Python-style) read the GPU metric lines, mfu included,
# with and without mpirun's rank prefix. Needs the release binary in .dev/trainer.
# Usage, from the repository root:
#   bash scripts/device/sagemaker_job.sh
# (CONFIG=configs/tiny.toml runs the same checks on a CPU; PPH=2 runs 2
# processes on this host under the leader's mpirun: data-parallel on 2 GPUs.)
set -euo pipefail
config=${CONFIG:-configs/sagemaker-gpt2-124m.toml}
out=${OUT:-/tmp/sagemaker_job}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
root=/tmp/sm; rm -rf "$root"; mkdir -p "$root"
.dev/trainer prepare --input data/kjv/kjv.txt --output "$root/shards" --val-tokens 65536 > /dev/null
ml="$root/ml"
mkdir -p "$ml/input/config" "$ml/input/data/train" "$ml/input/data/validation"
cp "$root"/shards/train_*.bin "$ml/input/data/train/"
cp "$root"/shards/val_*.bin "$ml/input/data/validation/"
pph=${PPH:+", \"processes_per_host\": \"$PPH\""}
cat > "$ml/input/config/hyperparameters.json" <<EOF
{"training.max_steps": "30", "training.micro_batch_size": "8", "training.grad_accum_steps": "\\"1\\"",
 "eval.interval": "15", "eval.batches": "2", "logging.interval": "5", "sagemaker_program": "\\"unused\\""$pph}
EOF
# NVLink multicast stays off on these machines (DESIGN.md); NCCL_* reaches every rank.
export NCCL_NVLS_ENABLE=0
echo '{"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}' > "$ml/input/config/resourceconfig.json"
echo '{"train": {"TrainingInputMode": "File"}, "validation": {"TrainingInputMode": "File"}}' > "$ml/input/config/inputdataconfig.json"

set +e
( cd "$root" && SAGEMAKER_BASE_DIR="$ml" TRAINER_SAGEMAKER_CONFIG="$OLDPWD/$config" \
    TRAINER_CUDA_INCLUDE=/usr/local/cuda/include "$OLDPWD/.dev/trainer" train ) > "$out/job.log" 2>&1
rc=$?
set -e
cat "$out/job.log"
echo "--- exit status $rc"
echo "--- outputs"; find "$ml" -path "$ml/input" -prune -o -type f -print | sort
[ -f "$ml/output/failure" ] && { echo "--- failure file"; cat "$ml/output/failure"; echo; }
echo "--- README metric regexes on the log (python re), first and last capture per metric"
set +e
python3 - "$out/job.log" <<'EOF'
import re, sys
defs = re.findall(r'\{"Name": "([^"]+)", "Regex": r"([^"]+)"\}', open("docker/README.md").read())
lines = open(sys.argv[1]).read().splitlines()
bad = 0
for name, rx in defs:
    plain = [m.group(1) for l in lines if (m := re.search(rx, l))]
    tagged = [m.group(1) for l in lines if (m := re.search(rx, "[1,0]<stdout>:" + l))]
    ok = bool(plain) and plain == tagged and all(float(v) == float(v) for v in plain)
    bad += not ok
    print(f"{name:12s} {'ok' if ok else 'FAIL'} n={len(plain)} first={plain[:1]} last={plain[-1:]}")
sys.exit(1 if bad else 0)
EOF
m=$?
test "$rc" -eq 0 && test -f "$ml/model/model.safetensors" && test -f "$ml/model/config.json" \
  && test ! -e "$ml/output/failure" && test "$m" -eq 0 \
  && echo "sagemaker_job: pass" || { echo "sagemaker_job: FAIL"; exit 1; }
