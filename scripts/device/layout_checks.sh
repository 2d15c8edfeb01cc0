#!/usr/bin/env bash
# Resume on another layout and split validation, on a 4-GPU machine, with the
# release `trainer` in .dev/:
#   cargo build --release -p trainer-cli && cp target/release/trainer .dev/
#   bash scripts/device/layout_checks.sh         (from the repository root)
# (a) GPT-2 124M bf16, global batch 64 x 1024 tokens, 12 steps on 2 GPUs with
#     ZeRO-1 and a checkpoint at step 6; that checkpoint resumed on 1 GPU and
#     on 4 GPUs without ZeRO: steps 7-12 against the uninterrupted run;
# (b) val_loss at step 0 (the same initial weights) with eval.batches = 7 on
#     1, 2 and 4 GPUs: each rank evaluates its share, the mean is one GPU's.
# Logs go to $OUT (or /tmp/layout_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/layout_checks}; mkdir -p "$out"
# 12 steps of 64 sequences stay inside one epoch of $data.
source scripts/device/multi_gpu_env.sh

# ranks, name, --set arguments... (the run directory is /tmp/layout_<name>)
train() {
  local n=$1 name=$2; shift 2
  local sets=(--config configs/gpt2-124m.toml --set 'data.train="/tmp/kjv2/train_*.bin"'
    --set 'data.val="/tmp/kjv2/val_*.bin"' --set "logging.run_dir=\"/tmp/layout_$name\""
    --set training.micro_batch_size=16 --set training.grad_accum_steps=$((4 / n)) --set lr_schedule.warmup_steps=2)
  for s in "$@"; do sets+=(--set "$s"); done
  mpirun --allow-run-as-root --oversubscribe --timeout 400 -np "$n" -x NCCL_NVLS_ENABLE \
    -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH -x TRAINER_KERNEL_CACHE \
    .dev/trainer "${sets[@]}" > "$out/$name.log" 2>&1
  local rc=$?
  cp "/tmp/layout_$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
  echo "$name: exit $rc"
}

rm -rf /tmp/layout_*
# (a)
common=(training.max_steps=12 checkpoint.interval=6 eval.interval=0 eval.batches=2)
train 2 full "${common[@]}" parallel.zero_stage=1
for to in "1 to1 parallel.zero_stage=0" "4 to4 parallel.zero_stage=0"; do
  set -- $to
  mkdir -p "/tmp/layout_$2/checkpoints" && cp -r /tmp/layout_full/checkpoints/step_00000006 "/tmp/layout_$2/checkpoints/"
  train "$1" "$2" "${common[@]}" "$3"
done
# (b)
for n in 1 2 4; do train "$n" val$n training.max_steps=1 eval.batches=7 checkpoint.interval=0; done
rm -rf /tmp/layout_*  # checkpoints: ~1.5 GB each

echo "--- errors and warnings"; grep -hE "^(error|warning)|panicked" "$out"/*.log | head -20
echo "--- resumes"; grep -h "resumed from" "$out"/*.log
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def recs(name, key):
    p = os.path.join(out, name + ".metrics.jsonl")
    if not os.path.exists(p):
        return {}
    return {r["step"]: r[key] for r in map(json.loads, open(p)) if r.get(key) is not None}
full = recs("full", "train_loss")
ok = len(full) == 12
print(f'{"step":>4} {"full (2 GPUs)":>14} {"to 1 GPU":>10} {"to 4 GPUs":>10}')
runs = {r: recs(r, "train_loss") for r in ["to1", "to4"]}
for s in range(7, 13):
    print(f"{s:>4} {full.get(s, float('nan')):>14.4f} " + " ".join(f"{runs[r].get(s, float('nan')):>10.4f}" for r in runs))
# bf16: as in dp_checks.sh, a few bf16 ulps of the loss.
for r, l in runs.items():
    d = max((abs(l[s] - full[s]) for s in range(7, 13) if s in l and s in full), default=float("nan"))
    good = d == d and d <= 0.05 and len(l) == 6
    ok &= good
    print(f"(a) resumed {r}: max |loss - uninterrupted| {d:.4f} {'pass' if good else 'FAIL'}")
val = {n: recs(f"val{n}", "val_loss").get(0) for n in (1, 2, 4)}
for n in (2, 4):
    a, b = val[1], val[n]
    d = abs(a - b) if a is not None and b is not None else float("nan")
    # The same weights and batches: only the order of the batches' sum differs (bf16 logits either way).
    good = d == d and d <= 1e-3
    ok &= good
    print(f"(b) val_loss step 0, {n} GPUs {b} vs 1 GPU {a}: {'pass' if good else 'FAIL'}")
print("all pass" if ok else "SOME FAIL")
PY
