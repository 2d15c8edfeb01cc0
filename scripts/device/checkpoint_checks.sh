#!/usr/bin/env bash
# Checkpoints on the GPU machine, with the release binary carried in .dev/trainer.
# Usage, from the repository root:  bash scripts/device/checkpoint_checks.sh
# Checks: bf16 exact resume on CUDA (losses after a resume against the
# uninterrupted run), SIGTERM -> checkpoint -> exit 143 -> resume, peak memory in
# the step records, and the save/load time and size of a GPT-2 124M bf16 checkpoint.
# Logs go to $OUT (or /tmp/checkpoint_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/checkpoint_checks}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
T=.dev/trainer
status() { if [ "$1" -eq 0 ]; then echo pass; else echo "FAIL($1)"; fi; }

$T prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
rm -rf /tmp/ck_a /tmp/ck_b /tmp/ck_s /tmp/ck_124m
common=(--config configs/tiny.toml --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val="/tmp/kjv/val_*.bin"'
        --set training.device=cuda --set training.dtype=bf16 --set training.max_steps=40 --set eval.interval=0
        --set logging.interval=1 --set checkpoint.interval=20 --set checkpoint.keep_last=5)

# 1. Resume: 40 steps straight, then steps 21-40 again from the step-20 checkpoint.
$T "${common[@]}" --set logging.run_dir='"/tmp/ck_a"' > "$out/resume_a.log" 2>&1; a=$?
$T "${common[@]}" --set logging.run_dir='"/tmp/ck_b"' --set checkpoint.resume=/tmp/ck_a/checkpoints/step_00000020 \
  > "$out/resume_b.log" 2>&1; b=$?
python3 - /tmp/ck_a/metrics.jsonl /tmp/ck_b/metrics.jsonl > "$out/resume_compare.txt" <<'PY'
import json, sys
def losses(p):
    return {r["step"]: r["train_loss"] for r in map(json.loads, open(p)) if r.get("train_loss") is not None}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(b)
diff = max(abs(a[s] - b[s]) for s in steps)
same = sum(a[s] == b[s] for s in steps)
print(f"steps {steps[0]}-{steps[-1]}: {same}/{len(steps)} bit-identical, max |diff| {diff:.3e}")
sys.exit(0 if len(steps) == 20 and diff < 1e-2 else 1)
PY
r=$?
grep -c "peak_mem_gb=" "$out/resume_a.log" > "$out/peak_mem_lines.txt"; m=$([ "$(cat "$out/peak_mem_lines.txt")" -ge 40 ] && echo 0 || echo 1)

# 2. SIGTERM during a long run: a checkpoint, exit status 143, then resume.
$T "${common[@]}" --set logging.run_dir='"/tmp/ck_s"' --set training.max_steps=100000 > "$out/sigterm.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "^step=30 train_loss" "$out/sigterm.log" && break; sleep 0.2; done
kill -TERM $pid; wait $pid; code=$?
s=$([ $code -eq 143 ] && grep -q "stopped by SIGTERM" "$out/sigterm.log" && echo 0 || echo 1)
$T eval "${common[@]}" --set logging.run_dir='"/tmp/ck_s"' --checkpoint /tmp/ck_s/checkpoints > "$out/sigterm_eval.log" 2>&1; e=$?

# 3. GPT-2 124M bf16: save and resume time, checkpoint size.
big=(--config configs/gpt2-124m.toml --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val="/tmp/kjv/val_*.bin"'
     --set training.micro_batch_size=8 --set training.grad_accum_steps=1 --set eval.interval=0 --set eval.batches=2
     --set logging.run_dir='"/tmp/ck_124m"' --set checkpoint.interval=2)
$T "${big[@]}" --set training.max_steps=4 > "$out/gpt2_124m_save.log" 2>&1; g1=$?
( time $T "${big[@]}" --set training.max_steps=6 ) > "$out/gpt2_124m_resume.log" 2>&1; g2=$?
du -sh /tmp/ck_124m/checkpoints/* > "$out/gpt2_124m_sizes.txt"

echo "--- resume (bf16, CUDA)"; cat "$out/resume_compare.txt"
echo "--- sigterm"; grep -E "stopped|checkpoint step" "$out/sigterm.log" | tail -3; echo "exit status $code"; cat "$out/sigterm_eval.log"
echo "--- gpt2-124m checkpoints"; grep -E "^checkpoint|resumed" "$out"/gpt2_124m_*.log; cat "$out/gpt2_124m_sizes.txt"; grep real "$out/gpt2_124m_resume.log"
echo "--- failures"; grep -E "panicked|^error" "$out"/*.log | head -20
printf '\n%-22s %s\n' check result
printf '%-22s %s\n' run_a "$(status $a)" resume_b "$(status $b)" resume_losses "$(status $r)" peak_mem_in_records "$(status $m)" \
  sigterm_143 "$(status $s)" eval_checkpoint "$(status $e)" gpt2_124m_save "$(status $g1)" gpt2_124m_resume "$(status $g2)"
