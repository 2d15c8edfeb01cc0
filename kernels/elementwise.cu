// Elementwise kernels: fill, add, add-assign, scale, casts, bias add and
// bias gradient, GELU (tanh approximation) forward and backward.

#define GELU_SCALE 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_CUBIC 0.044715f

// The maps below move 16-byte packs (8 bf16 or 4 f32 per access, then a
// scalar tail): with 2-byte accesses the bf16 kernels ran at a third of the
// memory bandwidth.

// out[i] = f(a[i], b[i]); out may alias a or b (each element is read, then written, by one thread).
template <typename T, typename F> __device__ void map2(T* out, const T* a, const T* b, i64 n, F f) {
    constexpr int P = PACK_OF(T);
    PACKED_STRIDE(j, n, P) {
        T va[P], vb[P];
        load_pack<T, P>(va, a + j * P);
        load_pack<T, P>(vb, b + j * P);
#pragma unroll
        for (int k = 0; k < P; k++) va[k] = from_float<T>(f(to_float(va[k]), to_float(vb[k])));
        store_pack<T, P>(out + j * P, va);
    }
    TAIL_STRIDE(i, n, P) out[i] = from_float<T>(f(to_float(a[i]), to_float(b[i])));
}

// out[i] = f(a[i]); out may alias a.
template <typename T, typename F> __device__ void map1(T* out, const T* a, i64 n, F f) {
    constexpr int P = PACK_OF(T);
    PACKED_STRIDE(j, n, P) {
        T va[P];
        load_pack<T, P>(va, a + j * P);
#pragma unroll
        for (int k = 0; k < P; k++) va[k] = from_float<T>(f(to_float(va[k])));
        store_pack<T, P>(out + j * P, va);
    }
    TAIL_STRIDE(i, n, P) out[i] = from_float<T>(f(to_float(a[i])));
}

template <typename T> __device__ void fill_impl(T* out, float v, i64 n) {
    constexpr int P = PACK_OF(T);
    T vv[P];
#pragma unroll
    for (int k = 0; k < P; k++) vv[k] = from_float<T>(v);
    PACKED_STRIDE(j, n, P) store_pack<T, P>(out + j * P, vv);
    TAIL_STRIDE(i, n, P) out[i] = vv[0];
}

template <typename T> __device__ void add_impl(T* out, const T* a, const T* b, i64 n) {
    map2(out, a, b, n, [](float x, float y) { return x + y; });
}

template <typename T> __device__ void add_assign_impl(T* acc, const T* x, i64 n) {
    map2(acc, acc, x, n, [](float a, float y) { return a + y; });
}

template <typename T> __device__ void scale_impl(T* x, float s, i64 n) {
    map1(x, x, n, [s](float v) { return v * s; });
}

// out (rows, cols) += bias (cols)
template <typename T> __device__ void add_bias_impl(T* out, const T* bias, i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) out[i] = from_float<T>(to_float(out[i]) + to_float(bias[i % cols]));
}

// dbias (cols) += column sums of dout (rows, cols); the column reduction of
// common.cuh, `partials` holding gridDim.y * cols floats.
template <typename T>
__device__ void bias_grad_impl(T* dbias, float* partials, unsigned* counters, const T* dout, i64 rows, i64 cols) {
#define BG_VALUE(r, c) to_float(dout[(r) * cols + (c)])
    COLUMN_PARTIALS(partials, rows, cols, BG_VALUE)
#undef BG_VALUE
    if (column_strip_last(counters)) column_strip_finish<T>(dbias, partials, cols);
}

// tanh for GELU: exact for f32; for bf16 the hardware approximation
// (tanh.approx, ~2^-11 relative), far below bf16's 2^-8 rounding, where tanhf
// made the GELU kernels compute-bound.
template <typename T> __device__ __forceinline__ float gelu_tanh(float u) { return tanhf(u); }
template <> __device__ __forceinline__ float gelu_tanh<bf16>(float u) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(u));
    return y;
}

template <typename T> __device__ void gelu_forward_impl(T* out, const T* inp, i64 n) {
    map1(out, inp, n, [](float x) {
        const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
        return 0.5f * x * (1.f + gelu_tanh<T>(u));
    });
}

// dinp = dout * gelu'(inp), overwritten
template <typename T> __device__ void gelu_backward_impl(T* dinp, const T* inp, const T* dout, i64 n) {
    map2(dinp, inp, dout, n, [](float x, float d) {
        const float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
        const float th = gelu_tanh<T>(u);
        const float sech2 = 1.f - th * th;
        const float local = 0.5f * (1.f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.f + 3.f * GELU_CUBIC * x * x);
        return local * d;
    });
}

// The exact GELU, x Phi(x) (ViT); erff is accurate to 2 ulp in f32.
template <typename T> __device__ void gelu_erf_forward_impl(T* out, const T* inp, i64 n) {
    map1(out, inp, n, [](float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); });
}

// dinp = dout * (Phi(x) + x phi(x)), overwritten
template <typename T> __device__ void gelu_erf_backward_impl(T* dinp, const T* inp, const T* dout, i64 n) {
    map2(dinp, inp, dout, n, [](float x, float d) {
        const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * __expf(-0.5f * x * x);
        return (cdf + x * pdf) * d;
    });
}

#define ELEMENTWISE(T, S)                                                                                         \
    extern "C" __global__ void fill_##S(T* out, float v, i64 n) { fill_impl<T>(out, v, n); }                       \
    extern "C" __global__ void add_##S(T* out, const T* a, const T* b, i64 n) { add_impl<T>(out, a, b, n); }      \
    extern "C" __global__ void add_assign_##S(T* acc, const T* x, i64 n) { add_assign_impl<T>(acc, x, n); }      \
    extern "C" __global__ void scale_##S(T* x, float s, i64 n) { scale_impl<T>(x, s, n); }                        \
    extern "C" __global__ void add_bias_##S(T* out, const T* bias, i64 rows, i64 cols) {                         \
        add_bias_impl<T>(out, bias, rows, cols);                                                                   \
    }                                                                                                              \
    extern "C" __global__ void bias_grad_##S(T* dbias, float* partials, unsigned* counters, const T* dout,       \
                                             i64 rows, i64 cols) {                                                 \
        bias_grad_impl<T>(dbias, partials, counters, dout, rows, cols);                                            \
    }                                                                                                              \
    extern "C" __global__ void gelu_forward_##S(T* out, const T* inp, i64 n) { gelu_forward_impl<T>(out, inp, n); } \
    extern "C" __global__ void gelu_backward_##S(T* dinp, const T* inp, const T* dout, i64 n) {                  \
        gelu_backward_impl<T>(dinp, inp, dout, n);                                                                 \
    }                                                                                                              \
    extern "C" __global__ void gelu_erf_forward_##S(T* out, const T* inp, i64 n) {                               \
        gelu_erf_forward_impl<T>(out, inp, n);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void gelu_erf_backward_##S(T* dinp, const T* inp, const T* dout, i64 n) {              \
        gelu_erf_backward_impl<T>(dinp, inp, dout, n);                                                             \
    }

ELEMENTWISE(float, f32)
ELEMENTWISE(bf16, bf16)

extern "C" __global__ void fill_u32(unsigned* out, unsigned v, i64 n) { GRID_STRIDE(i, n) out[i] = v; }
extern "C" __global__ void cast_f32_bf16(bf16* out, const float* in, i64 n) { GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(in[i]); }
extern "C" __global__ void cast_bf16_f32(float* out, const bf16* in, i64 n) { GRID_STRIDE(i, n) out[i] = __bfloat162float(in[i]); }
