// Multi-tensor ops: one launch over many tensors, or ranges of them, instead
// of one launch per parameter (GPT-2 has 148 parameter tensors; launched one
// by one, the optimizer, the gradient norm and the gradient zeroing were ~450
// tiny kernels a step, paced by the host right after a synchronization).
//
// The host uploads a table of spans, a few i64 words each, with pointers
// already offset to the span's first element. Block (x, s) grid-strides over
// span s with stride gridDim.x * blockDim.x, so one launch serves a
// 768-element bias and a 38M-element embedding alike; blocks that find their
// span short simply exit.

#define SPAN_LOOP(i, len) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (i64)gridDim.x * blockDim.x)

// table: {ptr, len} per span.
template <typename T>
__device__ void fill_spans_impl(const i64* table, float value) {
    const i64* s = table + 2 * blockIdx.y;
    T* x = (T*)s[0];
    const T v = from_float<T>(value);
    SPAN_LOOP(i, s[1]) x[i] = v;
}

extern "C" __global__ void fill_spans_f32(const i64* table, float value) { fill_spans_impl<float>(table, value); }
extern "C" __global__ void fill_spans_bf16(const i64* table, float value) { fill_spans_impl<bf16>(table, value); }

// table: {dst, src, len} per span.
template <typename T>
__device__ void copy_spans_impl(const i64* table) {
    const i64* s = table + 3 * blockIdx.y;
    T* dst = (T*)s[0];
    const T* src = (const T*)s[1];
    SPAN_LOOP(i, s[2]) dst[i] = src[i];
}

extern "C" __global__ void copy_spans_f32(const i64* table) { copy_spans_impl<float>(table); }
extern "C" __global__ void copy_spans_bf16(const i64* table) { copy_spans_impl<bf16>(table); }

// Sums (of values or of squares), deterministic: block (x, s) writes its
// strided partial to partials[s * gridDim.x + x]; the host adds them in order.
// table: {ptr, len}.
template <typename T, bool SQUARE>
__device__ void sum_spans_impl(float* partials, const i64* table) {
    __shared__ float scratch[32];
    const i64* s = table + 2 * blockIdx.y;
    const T* x = (const T*)s[0];
    float acc = 0.f;
    SPAN_LOOP(i, s[1]) {
        const float v = to_float(x[i]);
        acc += SQUARE ? v * v : v;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[(i64)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

extern "C" __global__ void sum_spans_f32(float* partials, const i64* table) { sum_spans_impl<float, false>(partials, table); }
extern "C" __global__ void sum_spans_bf16(float* partials, const i64* table) { sum_spans_impl<bf16, false>(partials, table); }
extern "C" __global__ void sumsq_spans_f32(float* partials, const i64* table) { sum_spans_impl<float, true>(partials, table); }
extern "C" __global__ void sumsq_spans_bf16(float* partials, const i64* table) { sum_spans_impl<bf16, true>(partials, table); }

// AdamW over spans, PyTorch's order of operations (crates/core/src/cpu/adamw.rs).
// table: {param, grad, state_start, len, decays} per span; the moments (and
// for bf16 the f32 master weights) are flat arrays indexed from state_start.
// `lr_decay` (1 - lr * weight_decay) applies only where `decays` is set.
struct AdamWScalars {
    float lr_decay, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps, grad_scale;
};

__device__ __forceinline__ float adamw_step(float p, float g, float* m, float* v, const AdamWScalars& h, bool decays) {
    g *= h.grad_scale;
    const float mi = *m + h.one_minus_b1 * (g - *m);
    const float vi = *v * h.b2 + h.one_minus_b2 * g * g;
    *m = mi;
    *v = vi;
    return p * (decays ? h.lr_decay : 1.f) - h.step_size * mi / (sqrtf(vi) / h.bc2_sqrt + h.eps);
}

extern "C" __global__ void adamw_spans_f32(const i64* table, float* m, float* v, AdamWScalars h) {
    const i64* s = table + 5 * blockIdx.y;
    float* p = (float*)s[0];
    const float* g = (const float*)s[1];
    const i64 off = s[2];
    const bool decays = s[4] != 0;
    SPAN_LOOP(i, s[3]) p[i] = adamw_step(p[i], g[i], &m[off + i], &v[off + i], h, decays);
}

// Mixed precision: the update runs on the f32 master copy and the bf16
// parameter the model computes with is rewritten from it (round to nearest).
extern "C" __global__ void adamw_spans_bf16(const i64* table, float* master, float* m, float* v, AdamWScalars h) {
    const i64* s = table + 5 * blockIdx.y;
    bf16* p = (bf16*)s[0];
    const bf16* g = (const bf16*)s[1];
    const i64 off = s[2];
    const bool decays = s[4] != 0;
    SPAN_LOOP(i, s[3]) {
        const float pi = adamw_step(master[off + i], __bfloat162float(g[i]), &m[off + i], &v[off + i], h, decays);
        master[off + i] = pi;
        p[i] = __float2bfloat16_rn(pi);
    }
}
