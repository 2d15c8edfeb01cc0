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

// dweight += sum_r dout * norm and dbias += sum_r dout: the column reduction
// of common.cuh, partials for dweight in partials[0 .. chunks*C), for dbias in
// partials[chunks*C ..), one counter per strip for both.
template <typename T>
__device__ void layernorm_params_impl(T* dweight, T* dbias, float* partials, unsigned* counters, const T* dout,
                                      const T* inp, const float* mean, const float* rstd, i64 rows, i64 C) {
#define LN_DW(r, c) (to_float(dout[(r) * C + (c)]) * (to_float(inp[(r) * C + (c)]) - mean[r]) * rstd[r])
#define LN_DB(r, c) to_float(dout[(r) * C + (c)])
    COLUMN_PARTIALS(partials, rows, C, LN_DW)
    __syncthreads();
    COLUMN_PARTIALS(partials + (i64)gridDim.y * C, rows, C, LN_DB)
#undef LN_DW
#undef LN_DB
    if (column_strip_last(counters)) {
        column_strip_finish<T>(dweight, partials, C);
        column_strip_finish<T>(dbias, partials + (i64)gridDim.y * C, C);
    }
}

// bf16 dweight and dbias for even C, the scheme of COLUMN_PARTIALS with column
// pairs: block (32, 8) sums rows [y * COLUMN_CHUNK, (y + 1) * COLUMN_CHUNK) of
// a strip of 64 columns, lane tx owning pair tx (one bfloat162 of dout and of
// inp a row), row group ty every 8th row from ty; both sums in one pass. The
// generic kernel makes a pass per sum (dout read twice), loads 2 bytes at a
// time plus mean and rstd from global memory per row, and its 32-column strips
// give 1536 blocks at C = 768, 1.45 waves of a 132-SM GPU; this one has 768
// blocks (one wave), half the load instructions per byte, and the chunk's mean
// and rstd in shared memory. Deterministic: each sum has a fixed order (rows of
// a thread in order, then row groups 0..7, then chunks 0.. by
// layernorm_params_pairs_finish), whichever block finishes last.
__device__ void layernorm_params_pairs_finish(bf16* dst, const float* partials, i64 C) {
    __shared__ float2 finish_[8][33];
    const i64 j = (i64)blockIdx.x * 32 + threadIdx.x;
    float2 t = make_float2(0.f, 0.f);
    if (j < C / 2)
        for (i64 k = threadIdx.y; k < gridDim.y; k += 8) {
            // Bypass L1: other blocks wrote the partials.
            const float2 p = __ldcg(reinterpret_cast<const float2*>(partials + k * C) + j);
            t.x += p.x;
            t.y += p.y;
        }
    finish_[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.y == 0 && j < C / 2) {
        float2 sum = make_float2(0.f, 0.f);
        for (int y = 0; y < 8; ++y) {
            sum.x += finish_[y][threadIdx.x].x;
            sum.y += finish_[y][threadIdx.x].y;
        }
        __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst) + j;
        const float2 old = __bfloat1622float2(*d);
        *d = __floats2bfloat162_rn(old.x + sum.x, old.y + sum.y);
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256) layernorm_params_pairs_bf16(
    bf16* __restrict__ dweight, bf16* __restrict__ dbias, float* partials, unsigned* counters,
    const bf16* __restrict__ dout, const bf16* __restrict__ inp, const float* __restrict__ mean,
    const float* __restrict__ rstd, i64 rows, i64 C) {
    __shared__ float stats_[2][COLUMN_CHUNK];
    __shared__ float2 dw_[8][33], db_[8][33];
    const int tid = threadIdx.y * 32 + threadIdx.x;
    const i64 r0 = (i64)blockIdx.y * COLUMN_CHUNK;
    const int n = (int)min((i64)COLUMN_CHUNK, rows - r0);
    for (int i = tid; i < n; i += 256) {
        stats_[0][i] = mean[r0 + i];
        stats_[1][i] = rstd[r0 + i];
    }
    __syncthreads();
    const i64 pairs = C / 2, j = (i64)blockIdx.x * 32 + threadIdx.x;
    float2 dw = make_float2(0.f, 0.f), db = make_float2(0.f, 0.f);
    if (j < pairs) {
        const __nv_bfloat162* dy2 = reinterpret_cast<const __nv_bfloat162*>(dout + r0 * C) + j;
        const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(inp + r0 * C) + j;
        // 8 rows' loads issued before their use, 16 in flight per thread (the
        // compiler interleaves a plain unrolled loop's loads with the math,
        // two in flight).
        for (int i0 = threadIdx.y; i0 < n; i0 += 64) {
            __nv_bfloat162 dv[8], xv[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = i0 + 8 * u;
                if (i < n) {
                    dv[u] = dy2[i * pairs];
                    xv[u] = x2[i * pairs];
                }
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = i0 + 8 * u;
                if (i < n) {
                    const float2 d = __bfloat1622float2(dv[u]), x = __bfloat1622float2(xv[u]);
                    const float m = stats_[0][i], r = stats_[1][i];
                    dw.x += d.x * (x.x - m) * r;
                    dw.y += d.y * (x.y - m) * r;
                    db.x += d.x;
                    db.y += d.y;
                }
            }
        }
    }
    dw_[threadIdx.y][threadIdx.x] = dw;
    db_[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && j < pairs) {
        float2 w = make_float2(0.f, 0.f), b = make_float2(0.f, 0.f);
        for (int y = 0; y < 8; ++y) {
            w.x += dw_[y][threadIdx.x].x;
            w.y += dw_[y][threadIdx.x].y;
            b.x += db_[y][threadIdx.x].x;
            b.y += db_[y][threadIdx.x].y;
        }
        reinterpret_cast<float2*>(partials + (i64)blockIdx.y * C)[j] = w;
        reinterpret_cast<float2*>(partials + (i64)(gridDim.y + blockIdx.y) * C)[j] = b;
    }
    if (column_strip_last(counters)) {
        layernorm_params_pairs_finish(dweight, partials, C);
        layernorm_params_pairs_finish(dbias, partials + (i64)gridDim.y * C, C);
    }
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
    extern "C" __global__ void layernorm_params_##S(T* dweight, T* dbias, float* partials, unsigned* counters,     \
                                                    const T* dout, const T* inp, const float* mean, const float* rstd, \
                                                    i64 rows, i64 C) {                                               \
        layernorm_params_impl<T>(dweight, dbias, partials, counters, dout, inp, mean, rstd, rows, C);               \
    }

LAYERNORM(float, f32)
LAYERNORM(bf16, bf16)

// bf16 input backward with the row held in registers: lane l owns column pairs
// l, l + 32, ... (P pairs at most, so C <= 64 P), loaded once as bfloat162 and
// reused by both passes; dinp is read and written as pairs. The generic kernel
// above re-reads global memory in its second pass and, with 2-byte accesses and
// a read-modify-write that the compiler cannot reorder, is latency-bound.
template <int P>
__device__ void layernorm_backward_input_pairs(bf16* __restrict__ dinp, const bf16* __restrict__ dout,
                                               const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                                               const float* __restrict__ mean, const float* __restrict__ rstd,
                                               i64 rows, int C) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(inp + row * C);
    const __nv_bfloat162* dy = reinterpret_cast<const __nv_bfloat162*>(dout + row * C);
    const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(weight);
    const int pairs = C / 2;
    __nv_bfloat162 xv[P], dyv[P], wv[P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < pairs) {
            xv[k] = x[j];
            dyv[k] = dy[j];
            wv[k] = w[j];
        }
    }
    const float m = mean[row], r = rstd[row];
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        if (lane + 32 * k < pairs) {
            const float2 xf = __bfloat1622float2(xv[k]), df = __bfloat1622float2(dyv[k]), wf = __bfloat1622float2(wv[k]);
            const float n0 = (xf.x - m) * r, n1 = (xf.y - m) * r, g0 = wf.x * df.x, g1 = wf.y * df.y;
            a += g0 + g1;
            b += g0 * n0 + g1 * n1;
        }
    }
    const float dnorm_mean = warp_sum(a) / C, dnorm_norm_mean = warp_sum(b) / C;
    __nv_bfloat162* dx = reinterpret_cast<__nv_bfloat162*>(dinp + row * C);
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < pairs) {
            const float2 xf = __bfloat1622float2(xv[k]), df = __bfloat1622float2(dyv[k]), wf = __bfloat1622float2(wv[k]);
            const float2 old = __bfloat1622float2(dx[j]);
            const float n0 = (xf.x - m) * r, n1 = (xf.y - m) * r;
            const float v0 = old.x + (wf.x * df.x - dnorm_mean - n0 * dnorm_norm_mean) * r;
            const float v1 = old.y + (wf.y * df.y - dnorm_mean - n1 * dnorm_norm_mean) * r;
            dx[j] = __floats2bfloat162_rn(v0, v1);
        }
    }
}

// bf16 input backward with 16-byte accesses, for C a multiple of 8: lane l
// owns the 8-column packs l, l + 32, ... (P at most, so C <= 256 P). Every
// load a row needs (x, dy, weight and the old dinp) is issued up front, before
// the two warp sums: the pairs kernel above reads the old dinp only after them,
// a second dependent round trip to memory per row, and with 4-byte accesses and
// ~100 registers (two blocks an SM at C = 768) it keeps little in flight. This
// one holds 16 registers of row data per pack (80 registers in all at C = 768,
// three blocks an SM, ptxas -v), issues 4x fewer load instructions, and reads
// and writes dinp as whole packs.
template <int P>
__device__ void layernorm_backward_input_packs(bf16* __restrict__ dinp, const bf16* __restrict__ dout,
                                               const bf16* __restrict__ inp, const bf16* __restrict__ weight,
                                               const float* __restrict__ mean, const float* __restrict__ rstd,
                                               i64 rows, int C) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const uint4* x = reinterpret_cast<const uint4*>(inp + row * C);
    const uint4* dy = reinterpret_cast<const uint4*>(dout + row * C);
    const uint4* w = reinterpret_cast<const uint4*>(weight);
    uint4* dx = reinterpret_cast<uint4*>(dinp + row * C);
    const int packs = C / 8;
    uint4 xv[P], dyv[P], wv[P], dxv[P];
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < packs) {
            xv[k] = x[j];
            dyv[k] = dy[j];
            wv[k] = w[j];
            dxv[k] = dx[j];
        }
    }
    const float m = mean[row], r = rstd[row];
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        if (lane + 32 * k < packs) {
            const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv[k]);
            const __nv_bfloat162* dy2 = reinterpret_cast<const __nv_bfloat162*>(&dyv[k]);
            const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv[k]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 xf = __bfloat1622float2(x2[e]), df = __bfloat1622float2(dy2[e]),
                             wf = __bfloat1622float2(w2[e]);
                const float n0 = (xf.x - m) * r, n1 = (xf.y - m) * r, g0 = wf.x * df.x, g1 = wf.y * df.y;
                a += g0 + g1;
                b += g0 * n0 + g1 * n1;
            }
        }
    }
    const float dnorm_mean = warp_sum(a) / C, dnorm_norm_mean = warp_sum(b) / C;
    // Left alone, the compiler keeps the first loop's widened floats (twice
    // the registers of the packed row) alive across the sums and spills; an
    // empty asm that "may change" the packs makes it widen them again instead
    // (a few ALU instructions).
#pragma unroll
    for (int k = 0; k < P; ++k) {
        asm volatile("" : "+r"(xv[k].x), "+r"(xv[k].y), "+r"(xv[k].z), "+r"(xv[k].w));
        asm volatile("" : "+r"(dyv[k].x), "+r"(dyv[k].y), "+r"(dyv[k].z), "+r"(dyv[k].w));
        asm volatile("" : "+r"(wv[k].x), "+r"(wv[k].y), "+r"(wv[k].z), "+r"(wv[k].w));
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < packs) {
            const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv[k]);
            const __nv_bfloat162* dy2 = reinterpret_cast<const __nv_bfloat162*>(&dyv[k]);
            const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv[k]);
            __nv_bfloat162* dx2 = reinterpret_cast<__nv_bfloat162*>(&dxv[k]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 xf = __bfloat1622float2(x2[e]), df = __bfloat1622float2(dy2[e]),
                             wf = __bfloat1622float2(w2[e]), old = __bfloat1622float2(dx2[e]);
                const float n0 = (xf.x - m) * r, n1 = (xf.y - m) * r;
                const float v0 = old.x + (wf.x * df.x - dnorm_mean - n0 * dnorm_norm_mean) * r;
                const float v1 = old.y + (wf.y * df.y - dnorm_mean - n1 * dnorm_norm_mean) * r;
                dx2[e] = __floats2bfloat162_rn(v0, v1);
            }
            dx[j] = dxv[k];
        }
    }
}

#define LAYERNORM_BACKWARD_PACKS(P)                                                                                 \
    extern "C" __global__ void layernorm_backward_input_bf16_v##P(bf16* dinp, const bf16* dout, const bf16* inp,    \
                                                                  const bf16* w, const float* mean,                \
                                                                  const float* rstd, i64 rows, int C) {            \
        layernorm_backward_input_packs<P>(dinp, dout, inp, w, mean, rstd, rows, C);                                 \
    }

// Packs per lane: C up to 256 P (768: P = 3).
LAYERNORM_BACKWARD_PACKS(1)
LAYERNORM_BACKWARD_PACKS(2)
LAYERNORM_BACKWARD_PACKS(3)
LAYERNORM_BACKWARD_PACKS(4)
LAYERNORM_BACKWARD_PACKS(5)
LAYERNORM_BACKWARD_PACKS(6)
LAYERNORM_BACKWARD_PACKS(7)
LAYERNORM_BACKWARD_PACKS(8)

// bf16 forward with the row in registers, as bfloat162 pairs (lane l owns pairs
// l, l + 32, ...): one read of the input, statistics from registers (mean, then
// the centred sum of squares), one write. The generic kernel above reads the row
// three times with 2-byte accesses (25 us a row block of GPT-2 124M at B=16).
// With `resid` non-null the input is a + b, rounded to bf16 as the add kernel
// does and stored to `resid` (the residual stream): the add's own pass is saved.
template <int P>
__device__ void layernorm_forward_pairs(bf16* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                        bf16* __restrict__ resid, const bf16* __restrict__ a,
                                        const bf16* __restrict__ b, const bf16* __restrict__ weight,
                                        const bf16* __restrict__ bias, i64 rows, int C, float eps) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int pairs = C / 2;
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(a + row * C);
    const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(b + row * C);
    __nv_bfloat162* r2 = reinterpret_cast<__nv_bfloat162*>(resid + row * C);
    float2 xv[P];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < pairs) {
            float2 x = __bfloat1622float2(a2[j]);
            if (resid != nullptr) {
                const float2 y = __bfloat1622float2(b2[j]);
                const __nv_bfloat162 sum = __floats2bfloat162_rn(x.x + y.x, x.y + y.y);
                r2[j] = sum;
                x = __bfloat1622float2(sum);
            }
            xv[k] = x;
            s += x.x + x.y;
        }
    }
    const float m = warp_sum(s) / C;
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k)
        if (lane + 32 * k < pairs) v += (xv[k].x - m) * (xv[k].x - m) + (xv[k].y - m) * (xv[k].y - m);
    const float r = rsqrtf(warp_sum(v) / C + eps);
    const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(weight);
    const __nv_bfloat162* bb2 = reinterpret_cast<const __nv_bfloat162*>(bias);
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(out + row * C);
#pragma unroll
    for (int k = 0; k < P; ++k) {
        const int j = lane + 32 * k;
        if (j < pairs) {
            const float2 w = __bfloat1622float2(w2[j]), bv = __bfloat1622float2(bb2[j]);
            o2[j] = __floats2bfloat162_rn((xv[k].x - m) * r * w.x + bv.x, (xv[k].y - m) * r * w.y + bv.y);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

#define LAYERNORM_PAIRS(P)                                                                                          \
    extern "C" __global__ void layernorm_backward_input_bf16_p##P(bf16* dinp, const bf16* dout, const bf16* inp,    \
                                                                  const bf16* w, const float* mean,                \
                                                                  const float* rstd, i64 rows, int C) {            \
        layernorm_backward_input_pairs<P>(dinp, dout, inp, w, mean, rstd, rows, C);                                 \
    }                                                                                                               \
    extern "C" __global__ void layernorm_forward_bf16_p##P(bf16* out, float* mean, float* rstd, bf16* resid,       \
                                                           const bf16* a, const bf16* b, const bf16* w,            \
                                                           const bf16* bias, i64 rows, int C, float eps) {         \
        layernorm_forward_pairs<P>(out, mean, rstd, resid, a, b, w, bias, rows, C, eps);                            \
    }

// Pairs per lane: C up to 384, 768, 1024, 1280, 1600, 2048.
LAYERNORM_PAIRS(6)
LAYERNORM_PAIRS(12)
LAYERNORM_PAIRS(16)
LAYERNORM_PAIRS(20)
LAYERNORM_PAIRS(25)
LAYERNORM_PAIRS(32)
