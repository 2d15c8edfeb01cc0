#!/usr/bin/env bash
# Where the weak-scaling loss comes from, on a 4-GPU machine. GPT-2 124M bf16,
# micro-batch 32, 20 steps, median of steps 6-20 of each run:
#   - 1 GPU alone, then four independent 1-GPU runs at once (no communication:
#     does the machine itself lose anything with all four GPUs busy?);
#   - 4-rank data parallel with the overlapped all-reduce (defaults: 25 MiB
#     buckets on 2 thread blocks), with NCCL's own choice of thread blocks
#     (overlap_ctas = 0), and without overlap: tok/s per GPU, step time,
#     grad_sync_ms (the time after the backward pass spent waiting for the
#     gradient all-reduce and the loss/norm averages) and the NCCL trace
#     summary (nccl_trace_summary.py: which rank lags, by how much, the tail;
#     the trace adds timed events around each NCCL call, a few per step).
# Needs the release `trainer` in .dev/; from the repository root:
#   bash scripts/device/scaling_diag.sh
set -uo pipefail
source scripts/device/multi_gpu_env.sh
# --set arguments of run $1, plus any extra ones in $2.
sets() { echo --config configs/gpt2-124m.toml --set training.max_steps=20 --set "data.train=\"$data/train_*.bin\"" --set 'data.val=""' --set checkpoint.interval=0 --set training.micro_batch_size=32 --set training.grad_accum_steps=1 --set logging.run_dir=\"/tmp/run_$1\" ${2:-}; }
# Summary of run $1 over $2 GPUs.
med() { python3 -c "
import json,statistics
r=[json.loads(l) for l in open('/tmp/run_$1/metrics.jsonl') if '\"tok_per_s\"' in l]
r=[x for x in r if x['step']>5]
tps=statistics.median(x['tok_per_s'] for x in r)
sync=statistics.median(x.get('grad_sync_ms') or 0 for x in r)
print(f'$1 tok/s/gpu={tps/$2:.0f} step_ms={32768*$2/tps*1e3:.2f} grad_sync_ms={sync:.2f}')"; }
rm -rf /tmp/run_*
eval .dev/trainer $(sets alone) > /tmp/alone.log 2>&1; med alone 1
for i in 0 1 2 3; do (CUDA_VISIBLE_DEVICES=$i eval .dev/trainer $(sets ind$i) > /tmp/ind$i.log 2>&1) & done; wait
for i in 0 1 2 3; do med ind$i 1; done
for v in "dp4" "dp4_ctas0 --set parallel.overlap_ctas=0" "dp4_no_overlap --set parallel.overlap=false"; do
  set -- $v; n=$1; shift
  eval mpirun --allow-run-as-root --oversubscribe -np 4 -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH -x TRAINER_KERNEL_CACHE \
    -x TRAINER_NCCL_TRACE=1 .dev/trainer $(sets $n "$*") > /tmp/$n.log 2>&1 || tail -3 /tmp/$n.log
  med $n 4
  python3 scripts/device/nccl_trace_summary.py /tmp/$n.log
done
nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
