#!/usr/bin/env bash
# The Vision Transformer on the GPU machine, with release binaries carried in
# .dev/: trainer, cuda_ops (`cargo test --release -p trainer-core --test
# cuda_ops --no-run`), torch_vit_bench.py (the peer) and Fashion-MNIST's
# gzipped IDX files in .dev/fashion-idx (Debian's dataset-fashion-mnist).
# Usage, from the repository root:  bash scripts/device/vit_checks.sh
# Checks: the ViT ops and the erf GELU against the CPU; configs/vit-fashion.toml
# on the GPU in fp32 and bf16 (the whole run: accuracy and wall time) beside the
# CPU's first 50 steps; ViT-B/16 images/s at
# 224x224 (synthetic images, bf16) beside the peer (torch.compile), same call.
# Logs go to $OUT (or /tmp/vit_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/vit_checks}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
status() { if [ "$1" -eq 0 ]; then echo pass; else echo "FAIL($1)"; fi; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"

.dev/cuda_ops --nocapture image_tokens patchify gelu linear_layernorm > "$out/cuda_ops.log" 2>&1; ops=$?
i=.dev/fashion-idx
.dev/trainer prepare --idx-train $i/train-images-idx3-ubyte.gz $i/train-labels-idx1-ubyte.gz \
  --idx-val $i/t10k-images-idx3-ubyte.gz $i/t10k-labels-idx1-ubyte.gz --class-names configs/fashion-mnist-classes.txt \
  --output /tmp/fashion --overwrite > "$out/prepare.log" 2>&1

fm=(--config configs/vit-fashion.toml --set 'data.train="/tmp/fashion/train_*.img"'
    --set 'data.val="/tmp/fashion/val_*.img"' --set eval.interval=0
    --set checkpoint.interval=0 --set logging.interval=50)
.dev/trainer "${fm[@]}" --set training.device=cuda --set logging.run_dir='"/tmp/v_f32"' > "$out/fashion_f32.log" 2>&1; f32=$?
.dev/trainer "${fm[@]}" --set training.device=cuda --set training.dtype=bf16 --set logging.run_dir='"/tmp/v_bf16"' \
  > "$out/fashion_bf16.log" 2>&1; bf=$?
.dev/trainer "${fm[@]}" --set training.max_steps=50 --set logging.run_dir='"/tmp/v_cpu"' > "$out/fashion_cpu.log" 2>&1; cpu=$?

# ViT-B/16 speed: one shard of 512 synthetic 224x224 RGB images in 1000 classes.
python3 - /tmp/synth.img <<'PY'
import struct, sys, numpy as np
n, h, w, c, k = 512, 224, 224, 3, 1000
rng = np.random.default_rng(0)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<16I", 0x474D4954, 1, n, 0, h, w, c, k, 2, *[0] * 7))
    f.write(rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8).tobytes())
    f.write(rng.integers(0, k, size=n, dtype=np.uint16).tobytes())
PY
speed=()
for b in ${VIT_BATCHES:-128}; do
  rm -rf /tmp/v_speed
  .dev/trainer --config configs/vit-fashion.toml --set 'model.preset="vit-b16"' --set model.patch_size=16 --set 'model.pool="class"' --set 'data.train="/tmp/synth.img"' \
    --set 'data.val=""' --set training.device=cuda --set training.dtype=bf16 --set training.micro_batch_size=$b \
    --set training.max_steps=20 --set logging.interval=1 --set checkpoint.interval=0 --set eval.interval=0 \
    --set data.random_crop_min_area=0.08 --set logging.run_dir='"/tmp/v_speed"' > "$out/speed_b16_b$b.log" 2>&1
  v=$(python3 -c "
import json, statistics
r = [json.loads(l) for l in open('/tmp/v_speed/metrics.jsonl') if '\"img_per_s\"' in l]
x = [y for y in r if y['step'] > 5]
print(f'img_s={statistics.median(y[\"img_per_s\"] for y in x):.0f} mfu={100*statistics.median(y[\"mfu\"] for y in x):.1f}% mem_GB={max(y[\"peak_mem_gb\"] for y in x):.1f}')" 2>/dev/null)
  speed+=("$(printf 'vit-b16 B=%-4s ours          %s' "$b" "${v:-fail}")")
  [ "${VIT_PEER:-1}" = 1 ] && python3 .dev/torch_vit_bench.py --size b16 --batch "$b" --compile > "$out/peer_b16_b$b.log" 2>&1
  [ "${VIT_PEER:-1}" = 1 ] && speed+=("$(printf 'vit-b16 B=%-4s torch.compile %s' "$b" "$(grep -oE 'img_s=[0-9]+ mfu=[0-9.]+% mem_GB=[0-9.]+' "$out/peer_b16_b$b.log")")")
done

# Decoding: 2,000 JPEGs of 500x375 (ImageNet's typical size) in 10 class folders
# through `trainer prepare --images` on this machine's cores.
python3 - /tmp/jpegs <<'PY'
import os, sys, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(2000):
    d = os.path.join(sys.argv[1], f"class{i % 10}")
    os.makedirs(d, exist_ok=True)
    # Smooth noise, so the JPEG is of a photo's size rather than pure noise's.
    small = rng.integers(0, 256, size=(47, 63, 3), dtype=np.uint8)
    Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
PY
.dev/trainer prepare --images /tmp/jpegs --size 256 --output /tmp/jpeg_shards --overwrite > "$out/prepare_jpegs.log" 2>&1
decode=$(grep -oE "train_images=[0-9]+ .*secs=[0-9.]+" "$out/prepare_jpegs.log")

echo "--- failures"; grep -E "panicked|FAILED|^error" "$out"/*.log | head -10
echo "--- cuda_ops"; grep -E "rel err" "$out/cuda_ops.log" | grep -iE "image_tokens|pool|erf|patchify" | head -20
echo "--- fashion: step 50 cpu / gpu fp32 / gpu bf16"
for f in cpu f32 bf16; do grep -E "^step=50 train_loss" "$out/fashion_$f.log"; done
for f in f32 bf16; do grep -E "^step=1400 val_loss|^done" "$out/fashion_$f.log"; done
echo "--- speed"; printf '%s\n' "${speed[@]}"
echo "jpeg decode (500x375 -> 256, $(nproc) cores): $decode"
printf '\n%-26s %s\n' check result
printf '%-26s %s\n' cuda_ops "$(status $ops)" fashion_gpu_fp32 "$(status $f32)" fashion_gpu_bf16 "$(status $bf)" \
  fashion_cpu "$(status $cpu)"
