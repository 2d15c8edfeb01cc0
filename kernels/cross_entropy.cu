// Fused softmax + cross-entropy over a padded vocabulary: one block per row.
// The probabilities are never stored; with_grad overwrites the logits in place
// with grad_scale * (softmax - onehot) and zeros the padded columns.

template <typename T>
__device__ void cross_entropy_impl(T* logits, float* losses, const unsigned* targets, i64 vp, i64 v, float grad_scale,
                                   int with_grad) {
    __shared__ float scratch[32];
    T* x = logits + (i64)blockIdx.x * vp;
    float m = -INFINITY;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, to_float(x[i]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) s += expf(to_float(x[i]) - m);
    s = block_sum(s, scratch);
    const float lse = m + logf(s);
    const unsigned target = targets[blockIdx.x];
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - to_float(x[target]);
    if (!with_grad) return;
    __syncthreads();  // the target logit is read above before anyone overwrites it
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
