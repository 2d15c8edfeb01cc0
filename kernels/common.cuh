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

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Column sums over rows in a fixed order: block (32, 8), grid.x = ceil(cols / 32).
// Thread (x, y) sums rows y, y + 8, ... of column blockIdx.x * 32 + x; then row
// group 0 adds the 8 partials in order. `value(r, c)` gives the term for (r, c).
#define COLUMN_REDUCE(acc_out, rows, cols, value)                       \
    {                                                                   \
        __shared__ float partial_[8][33];                               \
        const i64 c_ = (i64)blockIdx.x * 32 + threadIdx.x;              \
        float s_ = 0.f;                                                 \
        if (c_ < (cols))                                                \
            for (i64 r_ = threadIdx.y; r_ < (rows); r_ += 8) s_ += value(r_, c_); \
        partial_[threadIdx.y][threadIdx.x] = s_;                        \
        __syncthreads();                                                \
        if (threadIdx.y == 0 && c_ < (cols)) {                          \
            float t_ = 0.f;                                             \
            for (int y_ = 0; y_ < 8; ++y_) t_ += partial_[y_][threadIdx.x]; \
            acc_out(c_, t_);                                            \
        }                                                               \
    }
