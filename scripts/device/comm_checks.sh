#!/usr/bin/env bash
# NCCL and MPI checks of trainer-comm on a multi-GPU machine, and the NCCL
# all-reduce bus bandwidth (busbw = algbw * 2(n-1)/n, as nccl-tests). Build the
# program on the development machine and carry it in .dev/:
#   cargo build --release -p trainer-comm --bin comm_check && cp target/release/comm_check .dev/
# Then, from the repository root on the GPU machine:
#   bash scripts/device/comm_checks.sh [ranks]      (default: the visible GPUs, at most 4)
# Logs go to $OUT (or /tmp/comm_checks); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/comm_checks}; mkdir -p "$out"
bin=.dev/comm_check
# NVLink multicast must stay off on these machines (DESIGN.md), on every rank.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
gpus=$(nvidia-smi -L | wc -l)
np=${1:-$((gpus < 4 ? gpus : 4))}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
run() { # ranks, log name, comm_check arguments...
  local n=$1 log=$2; shift 2
  mpirun --oversubscribe --timeout "${MPI_TIMEOUT:-600}" -np "$n" -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST \
    -x NVSHMEM_DISABLE_NVLS -x LD_LIBRARY_PATH "$bin" "$@" > "$out/$log.log" 2>&1
}
status() { if [ "$1" -eq 0 ]; then echo pass; else echo "FAIL($1)"; fi; }
# Expected to fail: passes when the job ended non-zero with the expected line.
expect_abort() { if [ "$1" -ne 0 ] && grep -q "$2" "$out/$3.log"; then echo pass; else echo "FAIL($1)"; fi; }

# collectives: sum/avg/max/min, reduce-scatter, all-gather, broadcast, send/recv
# and batched two-way exchanges on every mesh layout's groups and on groups of
# odd rank lists ({0,n-1}, {1..n-1}, {n-1,0}), and a 1M-element ring exchange
# both ways at once.
run 2 nccl_2 collectives --device cuda; c2=$?
run "$np" nccl_n collectives --device cuda; cn=$?
# Background communicator (the trainer's overlapped buckets): collectives, and
# a failing rank with two communicators to abort.
run "$np" nccl_bg collectives --device cuda --background-ctas 2; cg=$?
run "$np" nccl_bg_fail fail --rank 1 --device cuda --background-ctas 2; fg=$?
run "$np" mpi_n collectives --device cpu; cc=$?
run "$np" nccl_fail fail --rank 1 --device cuda; f=$?
MPI_TIMEOUT=60 run 2 nccl_timeout --timeout-ms 5000 timeout --rank 1 --device cuda; t=$?
# The same with a max all-reduce, and with a batched exchange (--op).
MPI_TIMEOUT=60 run 2 nccl_timeout_max --timeout-ms 5000 timeout --rank 1 --op max --device cuda; tm=$?
MPI_TIMEOUT=60 run 2 nccl_timeout_exchange --timeout-ms 5000 timeout --rank 1 --op exchange --device cuda; te=$?
run "$np" bench_f32 bench --device cuda --dtype f32 --max-mib 1024; b=$?
run "$np" bench_bf16 bench --device cuda --dtype bf16 --max-mib 1024; bb=$?
run "$np" bench_bf16_bg bench --device cuda --dtype bf16 --max-mib 256 --background-ctas 2; bg=$?

echo "--- failures"; grep -hE "error:|panicked" "$out"/nccl_2.log "$out"/nccl_n.log "$out"/nccl_bg.log "$out"/mpi_n.log "$out"/bench_*.log | head -20
echo "--- all_reduce f32, $np ranks"; cat "$out/bench_f32.log"
echo "--- all_reduce bf16, $np ranks"; cat "$out/bench_bf16.log"
echo "--- all_reduce bf16 on the background communicator (2 thread blocks), $np ranks"; cat "$out/bench_bf16_bg.log"
printf '\n%-30s %s\n' check result
printf '%-30s %s\n' "nccl collectives 2 ranks" "$(status $c2)" "nccl collectives $np ranks" "$(status $cn)" \
  "mpi collectives $np ranks" "$(status $cc)" \
  "nccl collectives background" "$(status $cg)" \
  "nccl rank failure" "$(expect_abort $f 'rank 1 of [0-9]*: deliberate failure' nccl_fail)" \
  "nccl failure, background comm" "$(expect_abort $fg 'rank 1 of [0-9]*: deliberate failure' nccl_bg_fail)" \
  "nccl timeout" "$(expect_abort $t 'NCCL all_reduce (sum) of 4 f32 elements.*did not complete within 5 s' nccl_timeout)" \
  "nccl timeout max" "$(expect_abort $tm 'NCCL all_reduce (max) of 4 f32 elements.*did not complete within 5 s' nccl_timeout_max)" \
  "nccl timeout exchange" "$(expect_abort $te 'NCCL exchange (send of 4 f32 elements to rank 1; recv of 4 f32 elements from rank 1).*did not complete within 5 s' nccl_timeout_exchange)" \
  "bench f32" "$(status $b)" "bench bf16" "$(status $bb)" "bench bf16 background" "$(status $bg)"
grep -h "busbw at 1 GiB" "$out"/bench_*.log
