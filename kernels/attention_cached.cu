// Attention of new queries against a KV cache, for incremental decoding
// (text generation): the prefix's keys and values are computed once and kept.
//
// Layouts: cache (B, Tmax, 3C) holds q | k | v rows exactly as qkv does (head h
// at columns [h*hs, (h+1)*hs) of each third), filled for positions
// [0, past + tq); out (B, tq, C). Query i sits at position past + i and attends
// to keys [0, past + i] (causal).
//
// One warp per (query, batch, head): grid (tq, B * H), block 32. Keys go in
// chunks of 32, one key per lane for the score, with an online softmax; then
// the lanes split the head dimension to accumulate the values. fp32 inside,
// a fixed order: deterministic. Generation is one query per step, so this
// favours simplicity over the tiling of attention.cu.

template <typename T, int R>
__device__ void attention_cached_impl(T* out, const T* cache, int tmax, int past, int tq, int H, int hs, float scale) {
    __shared__ float qs[32 * R];
    const int i = blockIdx.x, b = blockIdx.y / H, h = blockIdx.y % H, lane = threadIdx.x;
    const i64 C = (i64)H * hs, row = 3 * C;
    const T* base = cache + (i64)b * tmax * row;
    const int pos = past + i;
    for (int e = lane; e < 32 * R; e += 32) qs[e] = e < hs ? to_float(base[(i64)pos * row + (i64)h * hs + e]) : 0.f;
    __syncwarp();
    float acc[R];
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int k0 = 0; k0 <= pos; k0 += 32) {
        const int j = k0 + lane;
        float s = -INFINITY;
        if (j <= pos) {
            const T* k = base + (i64)j * row + C + (i64)h * hs;
            float dot = 0.f;
            for (int e = 0; e < hs; ++e) dot += qs[e] * to_float(k[e]);
            s = dot * scale;
        }
        // Key k0 is always valid, so m_new is finite from the first chunk on.
        const float m_new = fmaxf(m, warp_max(s));
        const float p = j <= pos ? expf(s - m_new) : 0.f;
        const float corr = expf(m - m_new);  // 0 on the first chunk (m = -inf)
        l = l * corr + warp_sum(p);
        for (int r = 0; r < R; ++r) acc[r] *= corr;
        const int n = min(32, pos + 1 - k0);  // the same in every lane
        for (int jj = 0; jj < n; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            const T* v = base + (i64)(k0 + jj) * row + 2 * C + (i64)h * hs;
            for (int r = 0; r < R; ++r) {
                const int e = lane + 32 * r;
                if (e < hs) acc[r] += pj * to_float(v[e]);
            }
        }
        m = m_new;
    }
    T* o = out + ((i64)b * tq + i) * C + (i64)h * hs;
    for (int r = 0; r < R; ++r) {
        const int e = lane + 32 * r;
        if (e < hs) o[e] = from_float<T>(acc[r] / l);
    }
}

#define ATTENTION_CACHED_R(T, S, R)                                                                             \
    extern "C" __global__ void attention_cached_##S##_r##R(T* out, const T* cache, int tmax, int past, int tq,  \
                                                           int H, int hs, float scale) {                        \
        attention_cached_impl<T, R>(out, cache, tmax, past, tq, H, hs, scale);                                  \
    }

#define ATTENTION_CACHED(T, S) \
    ATTENTION_CACHED_R(T, S, 1) \
    ATTENTION_CACHED_R(T, S, 2) \
    ATTENTION_CACHED_R(T, S, 3) \
    ATTENTION_CACHED_R(T, S, 4)

ATTENTION_CACHED(float, f32)
ATTENTION_CACHED(bf16, bf16)
