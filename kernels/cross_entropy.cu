// Fused softmax + cross-entropy over a padded vocabulary: one block per row.
// The probabilities are never stored; with_grad overwrites the logits in place
// with grad_scale * (softmax - onehot) and zeros the padded columns. Two
// kernels: bf16 rows that fit hold the row in registers and read it once
// (cross_entropy_rows_bf16_p*); the others make two passes over memory (an
// online max-and-sum, then the gradient).

// Merges two (max, sum of exp(x - max)) pairs of an online softmax.
__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;  // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// log(sum of exp) of a row from each thread's (max, sum of exp(x - max)):
// merged across the warp, then across warps in a fixed order. Every thread of
// the block (a multiple of 32 threads) must call it; every thread gets it.
__device__ __forceinline__ float softmax_block_lse(float m, float s) {
    __shared__ float ms[32], ss[32];
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
    return m + logf(s);
}

// P elements per thread and iteration: 16-byte packs (load_pack, 8 bf16 or 4
// f32) where the padded row length allows, single elements otherwise. The
// exponentials use the fast hardware approximation (__expf, a few ulp): with
// 50k columns the kernel is bound by them, not by memory, when they are exact.
template <typename T, int P>
__device__ void cross_entropy_impl(T* logits, float* losses, const unsigned* targets, i64 vp, i64 v, float grad_scale,
                                   int with_grad) {
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
    const float lse = softmax_block_lse(m, s);
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

// bf16 rows of vp = 8 * packs columns (vp a multiple of 8, packs <= NP *
// blockDim.x), the row held in registers: thread t owns the 16-byte packs t,
// t + blockDim.x, ... (NP at most), loaded once as uint4, reduced, then turned
// into the gradient and stored. Memory traffic is one read and one write of the
// row, against three for the two-pass kernel. The arithmetic is the two-pass
// kernel's: an online max-and-sum per thread pack by pack (so the exponentials
// of the first packs overlap the arrival of the later ones), the same __expf
// terms, the same block merge and the same gradient expression.
// __launch_bounds__(1024, 1): at most 64 registers a thread, so a block of
// 1024 threads always launches; NP <= 7 keeps the row (28 registers) plus the
// working set under that without spills for sm_80 and sm_90 (ptxas -v; NP = 8
// spills on sm_80).
template <int NP>
__device__ __forceinline__ void cross_entropy_rows_impl(bf16* __restrict__ logits, float* __restrict__ losses,
                                                        const unsigned* __restrict__ targets, int vp, int v,
                                                        float grad_scale, int with_grad) {
    __shared__ float target_logit;
    bf16* x = logits + (i64)blockIdx.x * vp;
    const unsigned target = targets[blockIdx.x];
    const int packs = vp / 8;
    uint4 row[NP];
#pragma unroll
    for (int k = 0; k < NP; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (p < packs) row[k] = reinterpret_cast<const uint4*>(x)[p];
    }
    float m = -INFINITY, s = 0.f;
#pragma unroll
    for (int k = 0; k < NP; ++k) {
        const int base = (threadIdx.x + k * blockDim.x) * 8;
        if (base < vp) {
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&row[k]);
            float f[8];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 t = __bfloat1622float2(h[e]);
                f[2 * e] = t.x;
                f[2 * e + 1] = t.y;
            }
            // The target's owner hands its logit to thread 0 through shared
            // memory (visible after the block merge's barrier): no second
            // global read, whose latency would sit on the critical path.
            if (target / 8 == (unsigned)(base / 8)) {
                const unsigned t = target % 8, w = t < 2 ? row[k].x : t < 4 ? row[k].y : t < 6 ? row[k].z : row[k].w;
                target_logit = __uint_as_float((t % 2 ? w >> 16 : w & 0xffffu) << 16);  // bf16 bits -> float
            }
            float pm = -INFINITY;
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (base + e < v) pm = fmaxf(pm, f[e]);
            if (pm > m) {
                s *= __expf(m - pm);
                m = pm;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (base + e < v) s += __expf(f[e] - m);
        }
    }
    const float lse = softmax_block_lse(m, s);
    // A target outside the row (an invalid id) leaves target_logit unset: the
    // loss is then garbage, as the two-pass kernel's out-of-row read makes it.
    if (threadIdx.x == 0) losses[blockIdx.x] = lse - target_logit;
    if (!with_grad) return;
    // The gradient from the registers, in place; padded columns get zero.
#pragma unroll
    for (int k = 0; k < NP; ++k) {
        const int base = (threadIdx.x + k * blockDim.x) * 8;
        if (base < vp) {
            __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&row[k]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 t = __bfloat1622float2(h[e]);
                const int i0 = base + 2 * e, i1 = i0 + 1;
                float g0 = 0.f, g1 = 0.f;
                if (i0 < v) g0 = grad_scale * (__expf(t.x - lse) - (i0 == (int)target ? 1.f : 0.f));
                if (i1 < v) g1 = grad_scale * (__expf(t.y - lse) - (i1 == (int)target ? 1.f : 0.f));
                h[e] = __floats2bfloat162_rn(g0, g1);
            }
            reinterpret_cast<uint4*>(x)[base / 8] = row[k];
        }
    }
}

#define CROSS_ENTROPY_ROWS(NP)                                                                                       \
    extern "C" __global__ void __launch_bounds__(1024, 1)                                                            \
        cross_entropy_rows_bf16_p##NP(bf16* logits, float* losses, const unsigned* targets, int vp, int v,           \
                                      float grad_scale, int with_grad) {                                             \
        cross_entropy_rows_impl<NP>(logits, losses, targets, vp, v, grad_scale, with_grad);                          \
    }

// Packs per thread: with 1024 threads, rows up to 8192 * NP bf16 (50304: NP = 7).
CROSS_ENTROPY_ROWS(1)
CROSS_ENTROPY_ROWS(2)
CROSS_ENTROPY_ROWS(3)
CROSS_ENTROPY_ROWS(4)
CROSS_ENTROPY_ROWS(5)
CROSS_ENTROPY_ROWS(6)
CROSS_ENTROPY_ROWS(7)
