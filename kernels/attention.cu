// Multi-head attention, causal or not, FlashAttention-2 style: tiles of 32
// keys (or queries) staged in shared memory, online softmax, only the
// log-sum-exp saved for the backward, which recomputes the probabilities.
// This version computes on CUDA cores in fp32, one warp per row; head size
// up to 32 * R (R = 1..4, so <= 128), any sequence length.
//
// Layouts: qkv (B, T, 3C) = q | k | v, head h at columns [h*hs, (h+1)*hs) of
// each third; out and dout (B, T, C); lse and delta (B, H, T).
// Backward: dq by a query-row pass, dk and dv by a key-row pass: each writes
// its own part of dqkv, so no atomics and a deterministic result.

#define ROWS 8    // warps (rows) per block
#define TILE 32   // keys or queries per shared-memory tile

// Stage rows [t0, t0 + TILE) of one part (0 q, 1 k, 2 v) of head h into s[TILE][stride], zero past T.
template <typename T>
__device__ void load_tile(float* s, int stride, const T* qkv, const Dims& d, int b, int h, int t0, int part) {
    for (int idx = threadIdx.x; idx < TILE * d.hs; idx += blockDim.x) {
        const int r = idx / d.hs, e = idx % d.hs, t = t0 + r;
        s[r * stride + e] = t < d.T ? to_float(qkv[qkv_index(d, b, t, part, h, e)]) : 0.f;
    }
}

template <typename T>
__device__ void load_out_tile(float* s, int stride, const T* x, const Dims& d, int b, int h, int t0) {
    for (int idx = threadIdx.x; idx < TILE * d.hs; idx += blockDim.x) {
        const int r = idx / d.hs, e = idx % d.hs, t = t0 + r;
        s[r * stride + e] = t < d.T ? to_float(x[out_index(d, b, t, h, e)]) : 0.f;
    }
}

// grid (ceil(T / ROWS), B * H), block ROWS * 32.
template <typename T, int R>
__device__ void attention_forward_impl(T* out, float* lse, const T* qkv, Dims d) {
    constexpr int HS = 32 * R;
    __shared__ float ks[TILE][HS + 1];
    __shared__ float vs[TILE][HS];
    __shared__ float qs[ROWS][HS];
    const int b = blockIdx.y / d.H, h = blockIdx.y % d.H;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * ROWS + warp;
    for (int e = lane; e < HS; e += 32) qs[warp][e] = (i < d.T && e < d.hs) ? to_float(qkv[qkv_index(d, b, i, 0, h, e)]) : 0.f;
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int last = d.causal ? min(d.T - 1, blockIdx.x * ROWS + ROWS - 1) : d.T - 1;
    for (int k0 = 0; k0 <= last; k0 += TILE) {
        __syncthreads();
        load_tile(&ks[0][0], HS + 1, qkv, d, b, h, k0, 1);
        load_tile(&vs[0][0], HS, qkv, d, b, h, k0, 2);
        __syncthreads();
        if (i >= d.T) continue;
        const int j = k0 + lane;
        const bool valid = j < d.T && (!d.causal || j <= i);
        float s = -INFINITY;
        if (valid) {
            float dot = 0.f;
            for (int e = 0; e < d.hs; ++e) dot += qs[warp][e] * ks[lane][e];
            s = dot * d.scale;
        }
        const float m_new = fmaxf(m, warp_max(s));
        const float p = valid ? expf(s - m_new) : 0.f;
        const float corr = expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * corr + warp_sum(p);
        for (int r = 0; r < R; ++r) acc[r] *= corr;
        for (int jj = 0; jj < TILE; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            for (int r = 0; r < R; ++r) acc[r] += pj * vs[jj][lane + 32 * r];
        }
        m = m_new;
    }
    if (i >= d.T) return;
    for (int r = 0; r < R; ++r) {
        const int e = lane + 32 * r;
        if (e < d.hs) out[out_index(d, b, i, h, e)] = from_float<T>(acc[r] / l);
    }
    if (lane == 0) lse[((i64)b * d.H + h) * d.T + i] = m + logf(l);
}

// delta (B, H, T) = rowsum(dout * out) per head: the softmax backward's D.
template <typename T>
__device__ void attention_delta_impl(float* delta, const T* out, const T* dout, Dims d, i64 rows) {
    const i64 row = (i64)blockIdx.x * ROWS + threadIdx.x / 32;  // row = (b * H + h) * T + t
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = row % d.T, h = (row / d.T) % d.H, b = row / ((i64)d.T * d.H);
    float s = 0.f;
    for (int e = lane; e < d.hs; e += 32) {
        const i64 k = out_index(d, b, t, h, e);
        s += to_float(out[k]) * to_float(dout[k]);
    }
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

// dq: one warp per query row i, looping over key tiles.
template <typename T, int R>
__device__ void attention_backward_dq_impl(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* delta, Dims d) {
    constexpr int HS = 32 * R;
    __shared__ float ks[TILE][HS + 1];
    __shared__ float vs[TILE][HS + 1];
    __shared__ float qs[ROWS][HS];
    __shared__ float dos[ROWS][HS];
    const int b = blockIdx.y / d.H, h = blockIdx.y % d.H;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * ROWS + warp;
    for (int e = lane; e < HS; e += 32) {
        const bool ok = i < d.T && e < d.hs;
        qs[warp][e] = ok ? to_float(qkv[qkv_index(d, b, i, 0, h, e)]) : 0.f;
        dos[warp][e] = ok ? to_float(dout[out_index(d, b, i, h, e)]) : 0.f;
    }
    const i64 stat = ((i64)b * d.H + h) * d.T + i;
    const float lse_i = i < d.T ? lse[stat] : 0.f, delta_i = i < d.T ? delta[stat] : 0.f;
    float dq[R];
    for (int r = 0; r < R; ++r) dq[r] = 0.f;
    const int last = d.causal ? min(d.T - 1, blockIdx.x * ROWS + ROWS - 1) : d.T - 1;
    for (int k0 = 0; k0 <= last; k0 += TILE) {
        __syncthreads();
        load_tile(&ks[0][0], HS + 1, qkv, d, b, h, k0, 1);
        load_tile(&vs[0][0], HS + 1, qkv, d, b, h, k0, 2);
        __syncthreads();
        if (i >= d.T) continue;
        const int j = k0 + lane;
        float ds = 0.f;
        if (j < d.T && (!d.causal || j <= i)) {
            float qk = 0.f, dp = 0.f;
            for (int e = 0; e < d.hs; ++e) {
                qk += qs[warp][e] * ks[lane][e];
                dp += dos[warp][e] * vs[lane][e];
            }
            const float p = expf(qk * d.scale - lse_i);
            ds = p * (dp - delta_i) * d.scale;
        }
        for (int jj = 0; jj < TILE; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
            for (int r = 0; r < R; ++r) dq[r] += dsj * ks[jj][lane + 32 * r];
        }
    }
    if (i >= d.T) return;
    for (int r = 0; r < R; ++r) {
        const int e = lane + 32 * r;
        if (e < d.hs) dqkv[qkv_index(d, b, i, 0, h, e)] = from_float<T>(dq[r]);
    }
}

// dk, dv: one warp per key row j, looping over query tiles (from j's tile on when causal).
template <typename T, int R>
__device__ void attention_backward_dkv_impl(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* delta, Dims d) {
    constexpr int HS = 32 * R;
    __shared__ float qs[TILE][HS + 1];
    __shared__ float dos[TILE][HS + 1];
    __shared__ float ls[TILE], dls[TILE];
    __shared__ float kr[ROWS][HS];
    __shared__ float vr[ROWS][HS];
    const int b = blockIdx.y / d.H, h = blockIdx.y % d.H;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * ROWS + warp;
    for (int e = lane; e < HS; e += 32) {
        const bool ok = j < d.T && e < d.hs;
        kr[warp][e] = ok ? to_float(qkv[qkv_index(d, b, j, 1, h, e)]) : 0.f;
        vr[warp][e] = ok ? to_float(qkv[qkv_index(d, b, j, 2, h, e)]) : 0.f;
    }
    float dk[R], dv[R];
    for (int r = 0; r < R; ++r) dk[r] = dv[r] = 0.f;
    const int first = d.causal ? (blockIdx.x * ROWS) / TILE * TILE : 0;
    const i64 stat0 = ((i64)b * d.H + h) * d.T;
    for (int q0 = first; q0 < d.T; q0 += TILE) {
        __syncthreads();
        load_tile(&qs[0][0], HS + 1, qkv, d, b, h, q0, 0);
        load_out_tile(&dos[0][0], HS + 1, dout, d, b, h, q0);
        for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
            ls[r] = q0 + r < d.T ? lse[stat0 + q0 + r] : 0.f;
            dls[r] = q0 + r < d.T ? delta[stat0 + q0 + r] : 0.f;
        }
        __syncthreads();
        if (j >= d.T) continue;
        const int i = q0 + lane;
        float p = 0.f, ds = 0.f;
        if (i < d.T && (!d.causal || j <= i)) {
            float qk = 0.f, dp = 0.f;
            for (int e = 0; e < d.hs; ++e) {
                qk += qs[lane][e] * kr[warp][e];
                dp += dos[lane][e] * vr[warp][e];
            }
            p = expf(qk * d.scale - ls[lane]);
            ds = p * (dp - dls[lane]) * d.scale;
        }
        for (int ii = 0; ii < TILE; ++ii) {
            const float pi = __shfl_sync(0xffffffffu, p, ii);
            const float dsi = __shfl_sync(0xffffffffu, ds, ii);
            for (int r = 0; r < R; ++r) {
                const int e = lane + 32 * r;
                if (e < HS) {
                    dv[r] += pi * dos[ii][e];
                    dk[r] += dsi * qs[ii][e];
                }
            }
        }
    }
    if (j >= d.T) return;
    for (int r = 0; r < R; ++r) {
        const int e = lane + 32 * r;
        if (e < d.hs) {
            dqkv[qkv_index(d, b, j, 1, h, e)] = from_float<T>(dk[r]);
            dqkv[qkv_index(d, b, j, 2, h, e)] = from_float<T>(dv[r]);
        }
    }
}

#define ATTENTION_R(T, S, R)                                                                                        \
    extern "C" __global__ void attention_forward_##S##_r##R(T* out, float* lse, const T* qkv, Dims d) {             \
        attention_forward_impl<T, R>(out, lse, qkv, d);                                                             \
    }                                                                                                               \
    extern "C" __global__ void attention_backward_dq_##S##_r##R(T* dqkv, const T* dout, const T* qkv,              \
                                                                const float* lse, const float* delta, Dims d) {    \
        attention_backward_dq_impl<T, R>(dqkv, dout, qkv, lse, delta, d);                                           \
    }                                                                                                               \
    extern "C" __global__ void attention_backward_dkv_##S##_r##R(T* dqkv, const T* dout, const T* qkv,             \
                                                                 const float* lse, const float* delta, Dims d) {   \
        attention_backward_dkv_impl<T, R>(dqkv, dout, qkv, lse, delta, d);                                          \
    }

#define ATTENTION(T, S)                                                                                             \
    ATTENTION_R(T, S, 1)                                                                                            \
    ATTENTION_R(T, S, 2)                                                                                            \
    ATTENTION_R(T, S, 3)                                                                                            \
    ATTENTION_R(T, S, 4)                                                                                            \
    extern "C" __global__ void attention_delta_##S(float* delta, const T* out, const T* dout, Dims d, i64 rows) {   \
        attention_delta_impl<T>(delta, out, dout, d, rows);                                                         \
    }

ATTENTION(float, f32)
ATTENTION(bf16, bf16)
