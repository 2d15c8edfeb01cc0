// Fused AdamW, PyTorch's order of operations (see crates/core/src/cpu/adamw.rs):
// one pass over the parameter, its gradient and both moments.

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, i64 n, float lr_decay,
                                     float one_minus_b1, float b2, float one_minus_b2, float step_size,
                                     float bc2_sqrt, float eps, float grad_scale) {
    GRID_STRIDE(i, n) {
        const float gi = g[i] * grad_scale;
        const float mi = m[i] + one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * b2 + one_minus_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * lr_decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// Mixed precision: the update runs on the fp32 master copy, and the bf16
// parameter the model computes with is rewritten from it (round to nearest).
extern "C" __global__ void adamw_bf16(float* master, bf16* p, const bf16* g, float* m, float* v, i64 n, float lr_decay,
                                      float one_minus_b1, float b2, float one_minus_b2, float step_size,
                                      float bc2_sqrt, float eps, float grad_scale) {
    GRID_STRIDE(i, n) {
        const float gi = __bfloat162float(g[i]) * grad_scale;
        const float mi = m[i] + one_minus_b1 * (gi - m[i]);
        const float vi = v[i] * b2 + one_minus_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float pi = master[i] * lr_decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        master[i] = pi;
        p[i] = __float2bfloat16_rn(pi);
    }
}
