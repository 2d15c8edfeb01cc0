#!/usr/bin/env bash
# GPT-2 throughput, ours vs PyTorch (../shared/bench/torch_gpt_bench.py, carried
# in .dev/), same shapes, same GPU, one call. Run from the repository root on
# the GPU machine with the release `trainer` in .dev/:
#   bash scripts/device/gpt_bench.sh [configs...]     e.g. "124m:16 124m:32 350m:16"
# Ours: median tok/s over steps 6-20 (as the peer: median after warm-up), MFU with
# the peer's formula and peak, peak memory held by tensors (max_memory_allocated).
set -uo pipefail
out=${OUT:-/tmp/gpt_bench}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
runs=${*:-"124m:16 124m:32 350m:16"}
[ -f /tmp/kjv/train_000000.bin ] ||
  .dev/trainer prepare --input data/kjv/kjv.txt --output /tmp/kjv --val-tokens 65536 --overwrite > /dev/null
declare -A preset=([124m]=gpt2-124m [350m]=gpt2-350m [774m]=gpt2-774m [1558m]=gpt2-1.5b)
table=()
for r in $runs; do
  size=${r%:*}; b=${r#*:}; name="${size}_b$b"
  rm -rf "/tmp/run_$name"  # a run directory with checkpoints would be resumed, not benchmarked
  .dev/trainer --config configs/gpt2-124m.toml --set model.preset="\"${preset[$size]}\"" \
    --set training.micro_batch_size="$b" --set training.grad_accum_steps=1 --set training.max_steps=20 \
    --set 'data.train="/tmp/kjv/train_*.bin"' --set 'data.val=""' --set logging.run_dir="\"/tmp/run_$name\"" \
    > "$out/ours_$name.log" 2>&1
  ours=$(python3 - "/tmp/run_$name/metrics.jsonl" <<'PY'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"tok_per_s"' in l]
recs = [r for r in recs if r["step"] > 5]
print(f'{statistics.median(r["tok_per_s"] for r in recs):.0f} {100*statistics.median(r.get("mfu") or 0 for r in recs):.1f}%')
PY
)
  mem=$(grep -oE "peak_mem_gb=[0-9.]+" "$out/ours_$name.log" | tail -1 | cut -d= -f2)  # step records carry it too: the run's last
  python3 .dev/torch_gpt_bench.py --size "$size" --batch "$b" --compile > "$out/peer_$name.log" 2>&1
  rm -rf "/tmp/run_$name"  # its final checkpoint: up to 21 GB for 1.5B
  peer=$(grep -oE "tok_s=[0-9]+ mfu=[0-9.]+% mem_GB=[0-9.]+" "$out/peer_$name.log" | tr '\n' ' ')
  table+=("$(printf '%-10s ours tok/s=%s mfu=%s mem_GB=%s | peer %s' "$name" ${ours:-fail fail} "${mem:-?}" "${peer:-fail}")")
done
tail -3 "$out"/ours_*.log
printf '%s\n' "${table[@]}"
