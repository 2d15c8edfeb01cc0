#!/usr/bin/env bash
# Data parallelism on a 4-GPU machine, with the release `trainer` in .dev/ and
# the peer benchmark in .dev/torch_gpt_bench.py (from ../shared/bench/):
#   cargo build --release -p trainer-cli && cp target/release/trainer .dev/
#   bash scripts/device/dp_checks.sh            (from the repository root)
# (a) GPT-2 124M bf16 on 1, 2 and 4 GPUs at the same global batch (64 x 1024
#     tokens: micro-batch 16 x grad_accum 4/2/1), 20 steps: loss trajectories
#     side by side and the largest difference from 1 GPU;
# (b) weak scaling: micro-batch 32, grad_accum 1, 1 GPU vs 4 GPUs: tokens/s
#     per GPU and the efficiency; and 4 GPUs without overlapping the gradient
#     all-reduce with the backward pass (parallel.overlap = false);
# (c) ZeRO-1 on 4 GPUs against (b)'s ZeRO-0: tokens/s, peak memory, optimizer
#     state per rank;
# (d) the peer: PyTorch DDP, 4 GPUs, micro-batch 32, torch.compile.
# Throughput: the median of steps 6-20 (the peer: median after warm-up).
# Logs go to $OUT (or /tmp/dp_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/dp_checks}; mkdir -p "$out"
source scripts/device/multi_gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# The 20 steps of (a) (80 windows of 16 x 1024) stay inside one epoch of
# $data, so every layout sees the same batches.

# ranks (1: a plain process), name, --set arguments...
train() {
  local n=$1 name=$2; shift 2
  local run=/tmp/dp_run_$name
  rm -rf "$run"  # a run directory with checkpoints would be resumed, not measured
  local sets=(--config configs/gpt2-124m.toml --set training.max_steps=20 --set 'data.train="/tmp/kjv2/train_*.bin"'
    --set 'data.val=""' --set "logging.run_dir=\"$run\"" --set checkpoint.interval=0)
  for s in "$@"; do sets+=(--set "$s"); done
  if [ "$n" -eq 1 ]; then
    timeout 300 .dev/trainer "${sets[@]}" > "$out/$name.log" 2>&1
  else
    mpirun --allow-run-as-root --oversubscribe --timeout 300 -np "$n" -x NCCL_NVLS_ENABLE \
      -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH -x TRAINER_KERNEL_CACHE \
      .dev/trainer "${sets[@]}" > "$out/$name.log" 2>&1
  fi
  local rc=$?
  cp "$run/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
  rm -rf "$run"  # the final checkpoint: ~1.5 GB
  echo "$name: exit $rc"
}

# (a) same global batch (64 sequences) on 1, 2 and 4 GPUs.
# (configs/gpt2-124m.toml states grad_accum_steps, so the global batch is set through it.)
train 1 a_1gpu training.micro_batch_size=16 training.grad_accum_steps=4
train 2 a_2gpu training.micro_batch_size=16 training.grad_accum_steps=2
train 4 a_4gpu training.micro_batch_size=16 training.grad_accum_steps=1
# (b) weak scaling, (c) ZeRO-1.
train 1 b_1gpu training.micro_batch_size=32 training.grad_accum_steps=1
train 4 b_4gpu training.micro_batch_size=32 training.grad_accum_steps=1
train 4 b_4gpu_no_overlap training.micro_batch_size=32 training.grad_accum_steps=1 parallel.overlap=false
train 4 c_4gpu_zero1 training.micro_batch_size=32 training.grad_accum_steps=1 parallel.zero_stage=1
# (d) the peer.
timeout 400 torchrun --nproc_per_node 4 .dev/torch_gpt_bench.py --size 124m --batch 32 --compile \
  > "$out/d_peer.log" 2>&1
echo "d_peer: exit $?"

echo "--- errors"; grep -hE "^error|panicked" "$out"/*.log | head -20
echo "--- headers"; grep -hE "^parallel " "$out"/*.log
python3 - "$out" <<'PY'
import json, os, statistics, sys, re
out = sys.argv[1]
def recs(name):
    p = os.path.join(out, name + ".metrics.jsonl")
    if not os.path.exists(p):
        return []
    return [json.loads(l) for l in open(p) if '"train_loss"' in l and '"skipped"' not in l]
def tok(name, n):
    r = [x["tok_per_s"] for x in recs(name) if x["step"] > 5 and x.get("tok_per_s")]
    return statistics.median(r) / n if r else float("nan")
def mem(name):
    r = [x.get("peak_mem_gb") or 0 for x in recs(name)]
    return max(r) if r else float("nan")
def state(name):
    m = re.search(r"optimizer_state_bytes_per_rank=(\d+)", open(os.path.join(out, name + ".log")).read())
    return int(m.group(1)) / 1e9 if m else float("nan")

print("--- (a) train_loss, global batch 64 x 1024 tokens")
runs = ["a_1gpu", "a_2gpu", "a_4gpu"]
loss = {r: {x["step"]: x["train_loss"] for x in recs(r)} for r in runs}
print(f'{"step":>4} ' + " ".join(f"{r:>10}" for r in runs))
for s in range(1, 21):
    print(f"{s:>4} " + " ".join(f'{loss[r].get(s, float("nan")):>10.4f}' for r in runs))
diffs = {r: max((abs(loss[r][s] - loss["a_1gpu"][s]) for s in loss["a_1gpu"] if s in loss[r]), default=float("nan"))
         for r in runs[1:]}
# bf16: gradients are reduced in bf16 (8 bits of mantissa) in another order;
# 0.05 on a loss of ~4-11 is a few bf16 ulps of it after 20 steps.
ok = all(d == d and d <= 0.05 for d in diffs.values()) and all(len(loss[r]) == 20 for r in runs)

t1, t4 = tok("b_1gpu", 1), tok("b_4gpu", 4)
t4z = tok("c_4gpu_zero1", 4)
t4n = tok("b_4gpu_no_overlap", 4)
peer = re.search(r"tok_s=(\d+) mfu=([0-9.]+)% mem_GB=([0-9.]+)", open(os.path.join(out, "d_peer.log")).read())
print()
print(f'{"check":<42} result')
for r, d in diffs.items():
    print(f'{"(a) max |loss - 1 GPU| " + r:<42} {d:.4f}')
print(f'{"(a) trajectories match (bf16, <= 0.05)":<42} {"pass" if ok else "FAIL"}')
print(f'{"(b) 1 GPU tok/s per GPU (b32)":<42} {t1:.0f}  peak_mem_gb={mem("b_1gpu"):.2f}')
print(f'{"(b) 4 GPUs tok/s per GPU (b32)":<42} {t4:.0f}  total={4*t4:.0f} peak_mem_gb={mem("b_4gpu"):.2f} optimizer_state_gb={state("b_4gpu"):.3f}')
print(f'{"(b) weak-scaling efficiency (target 95%)":<42} {100*t4/t1:.1f}%')
print(f'{"(b) 4 GPUs without overlap, tok/s per GPU":<42} {t4n:.0f}  efficiency={100*t4n/t1:.1f}%')
print(f'{"(c) 4 GPUs ZeRO-1 tok/s per GPU":<42} {t4z:.0f}  total={4*t4z:.0f} peak_mem_gb={mem("c_4gpu_zero1"):.2f} optimizer_state_gb={state("c_4gpu_zero1"):.3f}')
if peer:
    print(f'{"(d) PyTorch DDP 4 GPUs b32 compile":<42} total={peer.group(1)} per_gpu={int(peer.group(1))/4:.0f} mfu={peer.group(2)}% mem_GB={peer.group(3)}')
    print(f'{"(d) ours / peer at 4 GPUs":<42} {4*t4/int(peer.group(1)):.3f}')
else:
    print(f'{"(d) PyTorch DDP 4 GPUs":<42} FAIL (see d_peer.log)')
PY
