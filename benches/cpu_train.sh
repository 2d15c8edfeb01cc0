#!/usr/bin/env bash
# CPU training throughput: the tiny quick-start model and a few steps of GPT-2
# 124M, on the KJV shards. Prints a table last. Run from the repository root:
#   benches/cpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p trainer-cli
t=target/release/trainer
[ -f data/kjv/shards/train_000000.bin ] ||
  "$t" prepare --input data/kjv/kjv.txt --output data/kjv/shards --val-tokens 65536 --overwrite >/dev/null
out=$(mktemp -d)
run() { # name, then trainer arguments
  local name=$1; shift
  "$t" --config "$@" --set logging.run_dir="\"$out/$name\"" > "$out/$name.log"
  printf '%-34s %s\n' "$name" "$(grep -o 'avg_tok_per_s=[0-9]*' "$out/$name.log")"
}
echo "cores: $(nproc)  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
run "tiny B=8 T=128 (150 steps)" configs/tiny.toml
run "gpt2-124m B=4 T=1024 (4 steps)" configs/gpt2-124m.toml --set training.device='"cpu"' \
  --set training.dtype='"fp32"' --set training.micro_batch_size=4 --set training.grad_accum_steps=1 \
  --set training.max_steps=4 --set eval.interval=0 --set eval.batches=1 \
  --set data.train='"data/kjv/shards/train_*.bin"' --set data.val='"data/kjv/shards/val_*.bin"'
