// Shared by every kernel module (prepended to each source before NVRTC).
// Conventions: all arithmetic in float (fp32 accumulation for bf16 data);
// reductions run in a fixed order so results are deterministic run to run.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

// NVRTC has no <math.h>: INFINITY from the float bit pattern.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block whose size is a multiple of 32; every thread gets the total.
// `scratch`: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? scratch[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? scratch[lane] : -INFINITY);
}

// Attention shapes, shared by the attention*.cu modules (mirrored by
// AttnDims in crates/core/src/cuda/launch.rs). qkv (B, T, 3C) = q | k | v with
// head h at columns [h*hs, (h+1)*hs) of each third; out (B, T, C).
struct Dims {
    int T, H, hs;
    float scale;
    int causal;
};

__device__ __forceinline__ i64 qkv_index(const Dims& d, int b, int t, int part, int h, int e) {
    const i64 C = (i64)d.H * d.hs;
    return ((i64)b * d.T + t) * 3 * C + part * C + (i64)h * d.hs + e;
}

__device__ __forceinline__ i64 out_index(const Dims& d, int b, int t, int h, int e) {
    return ((i64)b * d.T + t) * d.H * d.hs + (i64)h * d.hs + e;
}

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// P consecutive elements moved as one 16-byte access (P = 16 / sizeof(T)), or
// one element when P == 1. The address must be 16-byte aligned: allocations
// are, so are offsets that are multiples of P.
template <typename T, int P>
__device__ __forceinline__ void load_pack(T (&vals)[P], const T* src) {
    if constexpr (P == 1) {
        vals[0] = *src;
    } else {
        *reinterpret_cast<uint4*>(vals) = *reinterpret_cast<const uint4*>(src);
    }
}

template <typename T, int P>
__device__ __forceinline__ void store_pack(T* dst, const T (&vals)[P]) {
    if constexpr (P == 1) {
        *dst = vals[0];
    } else {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    }
}

// Elementwise over n elements in 16-byte packs, then a scalar tail: the body
// sees `T v[P]` per operand through the given load/store code. Every pointer
// must be an allocation's start (aligned).
#define PACK_OF(T) (16 / (int)sizeof(T))
#define PACKED_STRIDE(j, n, P) GRID_STRIDE(j, (n) / (P))
#define TAIL_STRIDE(i, n, P) \
    for (i64 i = (n) / (P) * (P) + (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Column sums in two deterministic stages, one launch. Stage 1, block (32, 8),
// grid (ceil(cols / 32), ceil(rows / COLUMN_CHUNK)): block (x, y) sums rows
// [y * COLUMN_CHUNK, (y + 1) * COLUMN_CHUNK) of 32 columns (a strip), thread
// (tx, ty) taking every 8th row from ty, then row group 0 adds the 8 partials
// in order and writes partials[blockIdx.y * cols + c]. `value(r, c)` gives the
// term. Stage 2 runs in the strip's last block to finish (column_strip_last):
// it adds the strip's chunk partials in a fixed order, so the result does not
// depend on which block came last. A separate finishing launch per column
// reduction cost ~10 us each, latency-bound (98 per GPT-2 124M step, 0.95 ms).
#define COLUMN_CHUNK 256
#define COLUMN_PARTIALS(partials, rows, cols, value)                            \
    {                                                                           \
        __shared__ float partial_[8][33];                                       \
        const i64 c_ = (i64)blockIdx.x * 32 + threadIdx.x;                      \
        const i64 r0_ = (i64)blockIdx.y * COLUMN_CHUNK;                         \
        const i64 r1_ = min(r0_ + COLUMN_CHUNK, (i64)(rows));                   \
        float s_ = 0.f;                                                         \
        if (c_ < (cols))                                                        \
            for (i64 r_ = r0_ + threadIdx.y; r_ < r1_; r_ += 8) s_ += value(r_, c_); \
        partial_[threadIdx.y][threadIdx.x] = s_;                                \
        __syncthreads();                                                        \
        if (threadIdx.y == 0 && c_ < (cols)) {                                  \
            float t_ = 0.f;                                                     \
            for (int y_ = 0; y_ < 8; ++y_) t_ += partial_[y_][threadIdx.x];     \
            (partials)[(i64)blockIdx.y * (cols) + c_] = t_;                     \
        }                                                                       \
    }

// Called by every thread of a COLUMN_PARTIALS block after its partials are
// written: true in the last block of the strip to get here, which then sees
// every block's partials. `counters[blockIdx.x]` counts the strip's finished
// blocks; it is zero on entry and the last block sets it back to zero, ready
// for the next reduction on the stream.
__device__ __forceinline__ bool column_strip_last(unsigned* counters) {
    __shared__ bool last_;
    __threadfence();  // this thread's partials are visible device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last_ = atomicAdd(&counters[blockIdx.x], 1u) + 1 == gridDim.y;
        if (last_) counters[blockIdx.x] = 0;
    }
    __syncthreads();
    return last_;
}

// In the strip's last block: dst[c] += the strip's chunk partials (gridDim.y of
// them), thread row ty adding chunks ty, ty + 8, ... then row 0 the 8 sums in
// order. Loads bypass L1 (other blocks wrote the partials).
template <typename T>
__device__ void column_strip_finish(T* dst, const float* partials, i64 cols) {
    __shared__ float finish_[8][33];
    const i64 c = (i64)blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < cols)
        for (i64 k = threadIdx.y; k < gridDim.y; k += 8) s += __ldcg(partials + k * cols + c);
    finish_[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.f;
        for (int y = 0; y < 8; ++y) t += finish_[y][threadIdx.x];
        dst[c] = from_float<T>(to_float(dst[c]) + t);
    }
    __syncthreads();
}
