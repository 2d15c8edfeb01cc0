#!/usr/bin/env bash
# Is the 4-GPU per-GPU drop of weak scaling communication, or the machine?
# GPT-2 124M bf16, micro-batch 32, 20 steps: 1 GPU alone, then 4 independent
# 1-GPU runs at once (no communication), then 4-rank data parallel; median
# tok/s of steps 6-20 each (the 4-rank line is the total). Needs the release
# `trainer` in .dev/; run from the repository root on a 4-GPU machine:
#   bash scripts/device/scaling_diag.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
.dev/trainer prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
sets() { echo --config configs/gpt2-124m.toml --set training.max_steps=20 --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val=""' --set checkpoint.interval=0 --set training.micro_batch_size=32 --set training.grad_accum_steps=1 --set logging.run_dir=\"/tmp/run_$1\"; }
med() { python3 -c "
import json,statistics,sys
r=[json.loads(l) for l in open('/tmp/run_$1/metrics.jsonl') if '\"tok_per_s\"' in l]
print('$1', round(statistics.median(x['tok_per_s'] for x in r if x['step']>5)))"; }
rm -rf /tmp/run_*
eval .dev/trainer $(sets alone) > /tmp/alone.log 2>&1; med alone
for i in 0 1 2 3; do (CUDA_VISIBLE_DEVICES=$i eval .dev/trainer $(sets ind$i) > /tmp/ind$i.log 2>&1) & done; wait
for i in 0 1 2 3; do med ind$i; done
eval mpirun --allow-run-as-root --oversubscribe -np 4 -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH -x TRAINER_KERNEL_CACHE .dev/trainer $(sets dp4) > /tmp/dp4.log 2>&1; med dp4
nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
