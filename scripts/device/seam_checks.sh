#!/usr/bin/env bash
# The model seam and layout-free checkpoints on the GPU machine, with the
# release binaries carried in .dev/: trainer (this build), trainer-old (the
# build before the seam, d3ea322), gpt_parity (`cargo test --release -p
# trainer-models --test gpt_parity --no-run`) and torch_gpt_bench.py (the peer).
# Usage, from the repository root:  bash scripts/device/seam_checks.sh
# Checks: GPT-2 parity on CUDA; tiny GPT CPU vs GPU; bf16 checkpoints of the new
# format (scripts/device/checkpoint_checks.sh); a format-1 checkpoint written by
# the old binary resumed by the new one against the old binary's uninterrupted
# run; GPT-2 124M tokens/s, old and new binaries alternating, beside PyTorch.
# Logs go to $OUT (or /tmp/seam_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/seam_checks}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
mkdir -p /work && [ -e /work/main ] || ln -s "$PWD" /work/main   # test binaries find data where they were built
status() { if [ "$1" -eq 0 ]; then echo pass; else echo "FAIL($1)"; fi; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"

.dev/gpt_parity --nocapture cuda > "$out/gpt_parity.log" 2>&1; p=$?
.dev/trainer prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
rm -rf /tmp/s_*
tiny=(--config configs/tiny.toml --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val="/tmp/kjv/val_*.bin"'
      --set training.max_steps=40 --set eval.interval=0 --set checkpoint.interval=20 --set checkpoint.keep_last=5)
.dev/trainer "${tiny[@]}" --set training.device=cpu --set logging.run_dir='"/tmp/s_cpu"' > "$out/tiny_cpu.log" 2>&1; tc=$?
.dev/trainer "${tiny[@]}" --set training.device=cuda --set logging.run_dir='"/tmp/s_gpu"' > "$out/tiny_gpu.log" 2>&1; tg=$?

# SEAM_QUICK=1 leaves out the slower parts (checkpoint_checks.sh, the peer) when device time is short.
quick=${SEAM_QUICK:-0}
ck=0
[ "$quick" = 1 ] || { OUT="$out/ck" bash scripts/device/checkpoint_checks.sh > "$out/checkpoint_checks.log" 2>&1; ck=$?; }

# A format-1 checkpoint (old binary, bf16 on CUDA) resumed by the new binary.
bf=("${tiny[@]}" --set training.device=cuda --set training.dtype=bf16)
.dev/trainer-old "${bf[@]}" --set logging.run_dir='"/tmp/s_old"' > "$out/v1_old.log" 2>&1; o1=$?
.dev/trainer "${bf[@]}" --set logging.run_dir='"/tmp/s_new"' --set checkpoint.resume=/tmp/s_old/checkpoints/step_00000020 \
  > "$out/v1_resumed.log" 2>&1; o2=$?
python3 - /tmp/s_old/metrics.jsonl /tmp/s_new/metrics.jsonl > "$out/v1_compare.txt" 2>&1 <<'PY'
import json, sys
def losses(p):
    return {r["step"]: r["train_loss"] for r in map(json.loads, open(p)) if r.get("train_loss") is not None}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(b)
same = sum(a[s] == b[s] for s in steps)
diff = max(abs(a[s] - b[s]) for s in steps)
print(f"steps {steps[0]}-{steps[-1]}: {same}/{len(steps)} bit-identical to the old binary's run, max |diff| {diff:.3e}")
sys.exit(0 if len(steps) == 20 and same == len(steps) else 1)
PY
v1=$?

# Speed: GPT-2 124M bf16 B=32, old and new alternating (median tok/s of steps 6-20), then PyTorch.
speed=()
for b in ${SEAM_BATCHES:-32}; do   # e.g. SEAM_BATCHES="16 32"
  for round in 1 2; do
    for bin in trainer-old trainer; do
      rm -rf /tmp/s_speed
      .dev/$bin --config configs/gpt2-124m.toml --set training.micro_batch_size=$b --set training.grad_accum_steps=1 \
        --set training.max_steps=20 --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val=""' \
        --set logging.run_dir='"/tmp/s_speed"' > "$out/speed_${bin}_b${b}_$round.log" 2>&1
      v=$(python3 -c "
import json, statistics
r = [json.loads(l) for l in open('/tmp/s_speed/metrics.jsonl') if '\"tok_per_s\"' in l]
print(f'{statistics.median(x[\"tok_per_s\"] for x in r if x[\"step\"] > 5):.0f}')" 2>/dev/null)
      mem=$(grep -oE "peak_mem_gb=[0-9.]+" "$out/speed_${bin}_b${b}_$round.log" | tail -1 | cut -d= -f2)
      speed+=("$(printf '124m B=%-3s round %s %-12s tok/s=%-8s mem_GB=%s' $b $round $bin "${v:-fail}" "${mem:-?}")")
    done
  done
done
# The peer once, at the larger batch (its compile takes a minute or more).
[ "$quick" = 1 ] || python3 .dev/torch_gpt_bench.py --size 124m --batch 32 --compile > "$out/peer_b32.log" 2>&1
[ "$quick" = 1 ] || speed+=("$(printf '124m B=32            %-12s %s' torch.compile "$(grep -oE 'tok_s=[0-9]+ mfu=[0-9.]+% mem_GB=[0-9.]+' "$out/peer_b32.log")")")

echo "--- failures"; grep -E "panicked|FAILED|^error" "$out"/*.log | head -10
echo "--- tiny cpu vs gpu (every 10th step)"
paste <(grep -oE "^step=[0-9]+ train_loss=[0-9.]+" "$out/tiny_cpu.log") <(grep -oE "train_loss=[0-9.]+" "$out/tiny_gpu.log") | awk 'NR%10==0'
[ "$quick" = 1 ] || { echo "--- checkpoint_checks"; tail -8 "$out/checkpoint_checks.log"; }
echo "--- format 1 -> 2"; cat "$out/v1_compare.txt"
echo "--- speed"; printf '%s\n' "${speed[@]}"
printf '\n%-26s %s\n' check result
printf '%-26s %s\n' gpt_parity_cuda "$(status $p)" tiny_cpu "$(status $tc)" tiny_gpu "$(status $tg)" \
  checkpoint_checks "$(status $ck)" v1_written_by_old "$(status $o1)" v1_resumed_by_new "$(status $o2)" \
  v1_resume_bit_identical "$(status $v1)"
