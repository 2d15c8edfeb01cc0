#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): binaries built here and carried in
# .dev/ (trainer, and the test executables cuda_ops, gpt_parity, kernels_compile
# from `cargo test --release --no-run`). Usage, from the repository root:
#   bash scripts/device/gpu_checks.sh
# Logs go to $OUT (or /tmp); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/gpu_checks}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
# Test binaries look for data at the path they were built from.
mkdir -p /work && [ -e /work/main ] || ln -s "$PWD" /work/main
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

status() { if [ "$1" -eq 0 ]; then echo pass; else echo "FAIL($1)"; fi; }
.dev/kernels_compile --nocapture > "$out/kernels_compile.log" 2>&1; k=$?
.dev/cuda_ops --nocapture --test-threads 1 > "$out/cuda_ops.log" 2>&1; c=$?
# On Hopper the same attention cases again through the portable (mma.sync) kernels.
TRAINER_PORTABLE_ATTENTION=1 .dev/cuda_ops --nocapture --test-threads 1 attention > "$out/cuda_ops_portable.log" 2>&1; ca=$?
.dev/gpt_parity --nocapture cuda > "$out/gpt_parity.log" 2>&1; p=$?

# Tiny model, same seed, CPU vs GPU (fp32): the loss trajectories should agree
# up to reduction order.
.dev/trainer prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
rm -rf /tmp/r_cpu /tmp/r_gpu /tmp/r_124m  # run directories with checkpoints would be resumed
common=(--config configs/tiny.toml --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val="/tmp/kjv/val_*.bin"'
        --set training.max_steps=60 --set eval.interval=30)
( time .dev/trainer "${common[@]}" --set training.device=cpu --set logging.run_dir='"/tmp/r_cpu"' ) > "$out/tiny_cpu.log" 2>&1; tc=$?
( time .dev/trainer "${common[@]}" --set training.device=cuda --set logging.run_dir='"/tmp/r_gpu"' ) > "$out/tiny_gpu.log" 2>&1; tg=$?
# GPT-2 124M fp32 on the GPU, a few steps, for a first throughput number.
.dev/trainer --config configs/gpt2-124m.toml --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val="/tmp/kjv/val_*.bin"' \
  --set training.micro_batch_size=8 --set training.grad_accum_steps=1 --set training.max_steps=8 --set eval.interval=0 \
  --set eval.batches=2 --set logging.run_dir='"/tmp/r_124m"' > "$out/gpt2_124m_gpu.log" 2>&1; g=$?

grep -E "rel err" "$out/cuda_ops.log" | sort -t' ' -k1,1 | awk '{print}' > "$out/cuda_ops_errs.txt"
echo "--- worst cuda_ops errors"; sort -g -k1,1 <(grep -oE "^[^:]+: rel err [0-9.e+-]+" "$out/cuda_ops.log" | awk '{print $NF, $0}') | tail -5
echo "--- failures"; grep -E "panicked|FAILED|error" "$out"/*.log | head -20
echo "--- tiny cpu vs gpu (step train_loss)"
paste <(grep -oE "^step=[0-9]+ train_loss=[0-9.]+" "$out/tiny_cpu.log") <(grep -oE "train_loss=[0-9.]+" "$out/tiny_gpu.log") | awk 'NR%10==0'
grep -E "^done|real" "$out/tiny_cpu.log" "$out/tiny_gpu.log"
echo "--- gpt2-124m fp32 gpu"; tail -3 "$out/gpt2_124m_gpu.log"
printf '\n%-22s %s\n' check result
printf '%-22s %s\n' kernels_compile "$(status $k)" cuda_ops "$(status $c)" cuda_ops_portable_attn "$(status $ca)" \
  gpt_parity_cuda "$(status $p)" \
  tiny_cpu "$(status $tc)" tiny_gpu "$(status $tg)" gpt2_124m_gpu "$(status $g)"
