#!/usr/bin/env bash
# Per-kernel time breakdown of 3 GPT-2 124M steps after a warm-up step (bf16, B=16, T=1024) on the GPU
# machine: every launch timed alone between stream synchronizations
# (TRAINER_PROFILE_KERNELS=1), so the total exceeds a normal step; the shares
# say where the time goes. Run from the repository root with .dev/trainer.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
[ -f /tmp/kjv/train_000000.bin ] ||
  .dev/trainer prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
rm -rf /tmp/run_profile  # a run directory with checkpoints would be resumed, not profiled
TRAINER_PROFILE_KERNELS=1 .dev/trainer --config configs/gpt2-124m.toml --set training.micro_batch_size=16 \
  --set training.grad_accum_steps=1 --set training.max_steps=4 --set 'data.train="/tmp/kjv/train_*.bin"' \
  --set 'data.val=""' --set logging.run_dir='"/tmp/run_profile"' 2>&1 | grep -A40 "kernel profile"
