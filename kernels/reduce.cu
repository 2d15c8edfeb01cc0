// Reductions to a scalar, deterministic: block b sums the fixed chunk
// [b * chunk, (b + 1) * chunk) and writes one partial; the host adds the
// partials in order (it needs the value anyway: losses and gradient norms are
// logged). Block size 256.

template <typename T, bool SQUARE>
__device__ void partial_sums_impl(float* partials, const T* x, i64 n, i64 chunk) {
    __shared__ float scratch[32];
    const i64 start = (i64)blockIdx.x * chunk;
    const i64 end = min(start + chunk, n);
    float s = 0.f;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_float(x[i]);
        s += SQUARE ? v * v : v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void sum_partials_f32(float* p, const float* x, i64 n, i64 chunk) { partial_sums_impl<float, false>(p, x, n, chunk); }
extern "C" __global__ void sum_partials_bf16(float* p, const bf16* x, i64 n, i64 chunk) { partial_sums_impl<bf16, false>(p, x, n, chunk); }
extern "C" __global__ void sumsq_partials_f32(float* p, const float* x, i64 n, i64 chunk) { partial_sums_impl<float, true>(p, x, n, chunk); }
extern "C" __global__ void sumsq_partials_bf16(float* p, const bf16* x, i64 n, i64 chunk) { partial_sums_impl<bf16, true>(p, x, n, chunk); }
