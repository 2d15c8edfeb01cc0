// Fused softmax + cross-entropy over a padded vocabulary: one block per row,
// two passes over the logits (an online max-and-sum, then the gradient).
// The probabilities are never stored; with_grad overwrites the logits in place
// with grad_scale * (softmax - onehot) and zeros the padded columns.

// Merges two (max, sum of exp(x - max)) pairs of an online softmax.
__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;  // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// P elements per thread and iteration: 16-byte packs (load_pack, 8 bf16 or 4
// f32) where the padded row length allows, single elements otherwise. The
// exponentials use the fast hardware approximation (__expf, a few ulp): with
// 50k columns the kernel is bound by them, not by memory, when they are exact.
template <typename T, int P>
__device__ void cross_entropy_impl(T* logits, float* losses, const unsigned* targets, i64 vp, i64 v, float grad_scale,
                                   int with_grad) {
    __shared__ float ms[32], ss[32];
    T* x = logits + (i64)blockIdx.x * vp;
    // Pass 1, online: each thread keeps its running max and the sum of
    // exp(x - max), rescaled once per pack whose max is new.
    float m = -INFINITY, s = 0.f;
    for (i64 base = (i64)threadIdx.x * P; base < v; base += (i64)blockDim.x * P) {
        T vals[P];
        load_pack<T, P>(vals, x + base);
        float pm = -INFINITY;
#pragma unroll
        for (int k = 0; k < P; k++)
            if (base + k < v) pm = fmaxf(pm, to_float(vals[k]));
        if (pm > m) {
            s *= __expf(m - pm);
            m = pm;
        }
#pragma unroll
        for (int k = 0; k < P; k++)
            if (base + k < v) s += __expf(to_float(vals[k]) - m);
    }
    // Merge across the warp, then across warps in a fixed order.
    for (int o = 16; o > 0; o >>= 1) softmax_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) {
        ms[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? ms[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) softmax_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    const float lse = m + logf(s);
    const unsigned target = targets[blockIdx.x];
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - to_float(x[target]);
    if (!with_grad) return;
    __syncthreads();  // the target logit is read above before anyone overwrites it
    // Pass 2: the gradient, in place; padded columns get zero.
    for (i64 base = (i64)threadIdx.x * P; base < vp; base += (i64)blockDim.x * P) {
        T vals[P];
        load_pack<T, P>(vals, x + base);
#pragma unroll
        for (int k = 0; k < P; k++) {
            const i64 i = base + k;
            float g = 0.f;
            if (i < v) g = grad_scale * (__expf(to_float(vals[k]) - lse) - (i == target ? 1.f : 0.f));
            vals[k] = from_float<T>(g);
        }
        store_pack<T, P>(x + base, vals);
    }
}

#define CROSS_ENTROPY(name, T, P)                                                                                    \
    extern "C" __global__ void name(T* logits, float* losses, const unsigned* targets, i64 vp, i64 v, float grad_scale, \
                                    int with_grad) {                                                                 \
        cross_entropy_impl<T, P>(logits, losses, targets, vp, v, grad_scale, with_grad);                             \
    }

CROSS_ENTROPY(cross_entropy_f32, float, 1)
CROSS_ENTROPY(cross_entropy_bf16, bf16, 1)
// Rows of a multiple of 16 bytes (the models pad the vocabulary to 128).
CROSS_ENTROPY(cross_entropy_vec_f32, float, 4)
CROSS_ENTROPY(cross_entropy_vec_bf16, bf16, 8)
