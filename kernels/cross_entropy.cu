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

template <typename T>
__device__ void cross_entropy_impl(T* logits, float* losses, const unsigned* targets, i64 vp, i64 v, float grad_scale,
                                   int with_grad) {
    __shared__ float ms[32], ss[32];
    T* x = logits + (i64)blockIdx.x * vp;
    // Pass 1, online: each thread keeps its running max and the sum of exp(x - max).
    float m = -INFINITY, s = 0.f;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
        const float xi = to_float(x[i]);
        if (xi > m) {
            s = s * expf(m - xi) + 1.f;
            m = xi;
        } else {
            s += expf(xi - m);
        }
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
    // Pass 2: the gradient, in place.
    for (i64 i = threadIdx.x; i < vp; i += blockDim.x) {
        float g = 0.f;
        if (i < v) g = grad_scale * (expf(to_float(x[i]) - lse) - (i == target ? 1.f : 0.f));
        x[i] = from_float<T>(g);
    }
}

extern "C" __global__ void cross_entropy_f32(float* logits, float* losses, const unsigned* targets, i64 vp, i64 v,
                                             float grad_scale, int with_grad) {
    cross_entropy_impl<float>(logits, losses, targets, vp, v, grad_scale, with_grad);
}
extern "C" __global__ void cross_entropy_bf16(bf16* logits, float* losses, const unsigned* targets, i64 vp, i64 v,
                                              float grad_scale, int with_grad) {
    cross_entropy_impl<bf16>(logits, losses, targets, vp, v, grad_scale, with_grad);
}
