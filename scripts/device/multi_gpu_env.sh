# Sourced by the multi-GPU scripts (dp_checks.sh, layout_checks.sh,
# scaling_diag.sh), from the repository root with the release `trainer` in
# .dev/: the environment every rank needs, a warning when fewer than 4 GPUs
# are visible, and KJV twice (~2.1M tokens) prepared in $data (/tmp/kjv2), so
# that runs of a few tens of steps stay inside one epoch.
# NVLink multicast must stay off on these machines (DESIGN.md), on every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export TRAINER_KERNEL_CACHE=/tmp/trainer-kernels
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge 4 ] || echo "warning: $gpus GPU(s) visible; the 4-GPU runs will fail"
data=/tmp/kjv2
if [ ! -f "$data/train_000000.bin" ]; then
  mkdir -p "$data" && cat data/kjv/kjv.txt data/kjv/kjv.txt > "$data/kjv2.txt"
  .dev/trainer prepare --input "$data/kjv2.txt" --output "$data" --val-tokens 65536 --overwrite > /dev/null
fi
