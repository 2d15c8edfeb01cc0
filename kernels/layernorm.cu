// LayerNorm over the last dimension C. One warp per row (block 256 = 8 rows).
// Row statistics (mean, 1/std) are always float.

template <typename T>
__device__ void layernorm_forward_impl(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                       const T* bias, i64 rows, int C, float eps) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* x = inp + row * C;
    float s = 0.f;
    for (int i = lane; i < C; i += 32) s += to_float(x[i]);
    const float m = warp_sum(s) / C;
    float v = 0.f;
    for (int i = lane; i < C; i += 32) {
        const float d = to_float(x[i]) - m;
        v += d * d;
    }
    const float r = rsqrtf(warp_sum(v) / C + eps);
    T* o = out + row * C;
    for (int i = lane; i < C; i += 32) o[i] = from_float<T>((to_float(x[i]) - m) * r * to_float(weight[i]) + to_float(bias[i]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// dinp += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, with dnorm = weight * dout.
template <typename T>
__device__ void layernorm_backward_input_impl(T* dinp, const T* dout, const T* inp, const T* weight, const float* mean,
                                              const float* rstd, i64 rows, int C) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* x = inp + row * C;
    const T* dy = dout + row * C;
    const float m = mean[row], r = rstd[row];
    float a = 0.f, b = 0.f;
    for (int i = lane; i < C; i += 32) {
        const float norm = (to_float(x[i]) - m) * r;
        const float dnorm = to_float(weight[i]) * to_float(dy[i]);
        a += dnorm;
        b += dnorm * norm;
    }
    const float dnorm_mean = warp_sum(a) / C, dnorm_norm_mean = warp_sum(b) / C;
    T* dx = dinp + row * C;
    for (int i = lane; i < C; i += 32) {
        const float norm = (to_float(x[i]) - m) * r;
        const float dnorm = to_float(weight[i]) * to_float(dy[i]);
        dx[i] = from_float<T>(to_float(dx[i]) + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r);
    }
}

// Stage 1 of dweight += sum_r dout * norm and dbias += sum_r dout: partials for
// dweight in partials[0 .. chunks*C), for dbias in partials[chunks*C ..).
// Block (32, 8), grid (ceil(C / 32), chunks); column_finish adds each half.
template <typename T>
__device__ void layernorm_params_partials_impl(float* partials, const T* dout, const T* inp, const float* mean,
                                               const float* rstd, i64 rows, i64 C) {
#define LN_DW(r, c) (to_float(dout[(r) * C + (c)]) * (to_float(inp[(r) * C + (c)]) - mean[r]) * rstd[r])
#define LN_DB(r, c) to_float(dout[(r) * C + (c)])
    COLUMN_PARTIALS(partials, rows, C, LN_DW)
    __syncthreads();
    COLUMN_PARTIALS(partials + (i64)gridDim.y * C, rows, C, LN_DB)
}

#define LAYERNORM(T, S)                                                                                             \
    extern "C" __global__ void layernorm_forward_##S(T* out, float* mean, float* rstd, const T* inp, const T* w,    \
                                                     const T* b, i64 rows, int C, float eps) {                      \
        layernorm_forward_impl<T>(out, mean, rstd, inp, w, b, rows, C, eps);                                        \
    }                                                                                                               \
    extern "C" __global__ void layernorm_backward_input_##S(T* dinp, const T* dout, const T* inp, const T* w,       \
                                                            const float* mean, const float* rstd, i64 rows, int C) { \
        layernorm_backward_input_impl<T>(dinp, dout, inp, w, mean, rstd, rows, C);                                   \
    }                                                                                                               \
    extern "C" __global__ void layernorm_params_partials_##S(float* partials, const T* dout, const T* inp,         \
                                                             const float* mean, const float* rstd, i64 rows, i64 C) { \
        layernorm_params_partials_impl<T>(partials, dout, inp, mean, rstd, rows, C);                                \
    }

LAYERNORM(float, f32)
LAYERNORM(bf16, bf16)
