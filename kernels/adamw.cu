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
        const float pi = p[i] * lr_decay;
        p[i] = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}
