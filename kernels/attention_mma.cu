// Flash attention for bf16 on tensor cores (mma.sync m16n8k16, fp32
// accumulate), FlashAttention-2 style: a warp owns 16 rows, a block 64; tiles of
// 64 keys (or queries) staged in shared memory; online softmax; the backward
// recomputes P from the saved log-sum-exp. Head sizes 32, 64, 96 and 128.
// Same layouts and semantics as attention.cu (which serves f32 and other head
// sizes). Deterministic: dQ is one pass over key tiles per query block, dK and
// dV one pass over query tiles per key block; no atomics.
//
// Fragments of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 row-major: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8 (B[k][n]):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C 16x8:            c0, c1 = C[g][2t, 2t+1];  c2, c3 = C[g+8][2t, 2t+1]

#define BR 64   // rows (queries or keys) per block: 4 warps x 16

// Grid (B * H, ceil(T / 64)). Blocks are handed out x first, so block y of
// every head starts before any block y + 1. Under a causal mask a query
// block's work grows with its index and a key block's shrinks: numbering them
// so that the longest come first keeps the last wave short.
__device__ __forceinline__ int query_block(const Dims& d) { return d.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y; }
#define BC 64   // columns per tile
#define PAD 8   // shared-memory row padding (bf16 elements) against bank conflicts

__device__ __forceinline__ unsigned pack_f32(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ unsigned ld32(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// B fragment of a 16x8 block whose B[k][n] = x[n][k] (x rows n0.., columns k0..):
// two 8x8 matrices (columns k0..k0+7 and k0+8..k0+15), lanes 0-15 give row addresses.
template <int D>
__device__ __forceinline__ void ldmatrix_b(unsigned (&b)[2], bf16 (*x)[D + PAD], int n0, int k0) {
    const int lane = threadIdx.x % 32, i = lane & 15;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(&x[n0 + (i & 7)][k0 + (i >> 3) * 8]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

// B fragment of a 16x8 block whose B[k][n] = x[k][n] (x rows k0..k0+15, columns n0..n0+7):
// the transposing load, lanes 0-15 give the 16 row addresses.
template <int D>
__device__ __forceinline__ void ldmatrix_b_trans(unsigned (&b)[2], bf16 (*x)[D + PAD], int k0, int n0) {
    const int lane = threadIdx.x % 32;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(&x[k0 + (lane & 15)][n0]);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Zeroes C-fragment accumulators.
template <int N> __device__ __forceinline__ void zero(float (&acc)[N][4]) {
    #pragma unroll
    for (int i = 0; i < N; ++i)
        #pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][r] = 0.f;
}

// A fragments of 16 rows [r0, r0+16) of one part of head h, all D columns,
// straight from global memory (rows past T read as zero).
template <int D>
__device__ __forceinline__ void load_a_rows(unsigned (&f)[D / 16][4], const bf16* x, bool is_qkv, const Dims& d,
                                            int b, int h, int part, int r0) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = r0 + g + (r & 1) * 8, col = kc * 16 + 2 * t + (r >> 1) * 8;
            f[kc][r] = row < d.T ? ld32(x + (is_qkv ? qkv_index(d, b, row, part, h, col) : out_index(d, b, row, h, col))) : 0u;
        }
}

// 16-byte asynchronous global-to-shared copy (sm_80+); `valid` false zero-fills.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Stage rows [r0, r0 + 64) x D of one part of head h (or of an `out`-shaped x)
// into s[64][D + PAD], asynchronously, 8 bf16 per copy. Rows past T are zero-filled
// (the source address is then the tensor's start, never read).
template <int D>
__device__ __forceinline__ void stage_tile_async(bf16 (*s)[D + PAD], const bf16* x, bool is_qkv, const Dims& d, int b,
                                                 int h, int part, int r0) {
    for (int idx = threadIdx.x; idx < BC * D / 8; idx += blockDim.x) {
        const int r = idx / (D / 8), c = (idx % (D / 8)) * 8, row = r0 + r;
        const bool ok = row < d.T;
        const bf16* src = ok ? x + (is_qkv ? qkv_index(d, b, row, part, h, c) : out_index(d, b, row, h, c)) : x;
        cp_async16(&s[r][c], src, ok);
    }
}

// Tiles in flight: two (the next loads while the current computes) where two
// fit the 48 KB of static shared memory, else one.
template <int D> struct Stages {
    static constexpr int N = D <= 64 ? 2 : 1;
};

// Stage key tile k0 (K and V of head h) into ks, vs and commit the copies.
template <int D>
__device__ __forceinline__ void stage_kv(bf16 (*ks)[D + PAD], bf16 (*vs)[D + PAD], const bf16* qkv, const Dims& d, int b,
                                         int h, int k0) {
    stage_tile_async<D>(ks, qkv, true, d, b, h, 1, k0);
    stage_tile_async<D>(vs, qkv, true, d, b, h, 2, k0);
    cp_async_commit();
}

// The tile pipeline around the compute of one tile. Before: with two stages,
// start the next tile's copies (`prefetch`), then wait until the current tile
// has landed; make it visible to the block. After: barrier (the buffer may be
// refilled next), and with one stage start the next tile's copies only now.
template <int NS, typename F> __device__ __forceinline__ void tile_acquire(bool has_next, F prefetch) {
    if (NS > 1 && has_next) {
        prefetch();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
}

template <int NS, typename F> __device__ __forceinline__ void tile_release(bool has_next, F prefetch) {
    __syncthreads();
    if (NS == 1 && has_next) prefetch();
}

// acc[nt] (16 x 8 NT) += A (16 x D, fragments) @ X^T where X is a staged tile
// from row n0 on: B[k][n] = X[n0 + n][k].
template <int D, int NT>
__device__ __forceinline__ void mma_a_xt(float (&acc)[NT][4], const unsigned (&a)[D / 16][4], bf16 (*x)[D + PAD],
                                         int n0 = 0) {
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt)
        #pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            unsigned bfr[2];
            ldmatrix_b<D>(bfr, x, n0 + nt * 8, kc * 16);
            mma16816(acc[nt], a[kc], bfr);
        }
}

// The A fragment (16 x 16, bf16 pairs) of columns [16 kc, 16 kc + 16) of a
// 16 x 8 NT C-fragment matrix p: a C tile pair (2 kc, 2 kc + 1) is exactly it.
template <int NT> __device__ __forceinline__ void pack_a(unsigned (&a)[4], const float (&p)[NT][4], int kc) {
    a[0] = pack_f32(p[2 * kc][0], p[2 * kc][1]);
    a[1] = pack_f32(p[2 * kc][2], p[2 * kc][3]);
    a[2] = pack_f32(p[2 * kc + 1][0], p[2 * kc + 1][1]);
    a[3] = pack_f32(p[2 * kc + 1][2], p[2 * kc + 1][3]);
}

// Element r of C tile nt (as in p[nt][r]) read back from its packed A fragments.
__device__ __forceinline__ float unpack_a(const unsigned (&a)[BC / 16][4], int nt, int r) {
    const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&a[nt >> 1][(nt & 1) * 2 + (r >> 1)]);
    return (r & 1) ? __high2float(v) : __low2float(v);
}

// acc (16 x D) += A (16 x 64, packed A fragments) @ X where X is a staged tile: B[k][n] = X[k][n].
template <int D>
__device__ __forceinline__ void mma_a_x(float (&acc)[D / 8][4], const unsigned (&a)[4], int kc, bf16 (*x)[D + PAD]) {
    #pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        unsigned bfr[2];
        ldmatrix_b_trans<D>(bfr, x, kc * 16, nt * 8);
        mma16816(acc[nt], a, bfr);
    }
}

// acc (16 x D) += P (16 x 64, C fragments in p) @ X where X is a staged tile: B[k][n] = X[k][n].
template <int D>
__device__ __forceinline__ void mma_p_x(float (&acc)[D / 8][4], const float (&p)[BC / 8][4], bf16 (*x)[D + PAD]) {
    #pragma unroll
    for (int kc = 0; kc < BC / 16; ++kc) {
        unsigned a[4];
        pack_a(a, p, kc);
        mma_a_x<D>(acc, a, kc, x);
    }
}

// Forward: grid (B * H, ceil(T / 64)), block 128.
template <int D>
__device__ void attention_forward_mma(bf16* out, float* lse, const bf16* qkv, Dims d) {
    constexpr int NS = Stages<D>::N;
    __shared__ __align__(16) bf16 ks_all[NS][BC][D + PAD];
    __shared__ __align__(16) bf16 vs_all[NS][BC][D + PAD];
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H, qb = query_block(d);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int q0 = qb * BR + warp * 16;
    stage_kv<D>(ks_all[0], vs_all[0], qkv, d, b, h, 0);
    unsigned qf[D / 16][4];
    load_a_rows<D>(qf, qkv, true, d, b, h, 0, q0);
    float o[D / 8][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int q_last = min(qb * BR + BR, d.T) - 1;
    const int tiles = d.causal ? q_last / BC + 1 : (d.T + BC - 1) / BC;
    for (int kt = 0; kt < tiles; ++kt) {
        const int k0 = kt * BC;
        const bool has_next = kt + 1 < tiles;
        // No key of the tile is past T or after the warp's first query: no mask.
        const bool full = k0 + BC <= d.T && !(d.causal && k0 + BC - 1 > q0);
        auto prefetch = [&] { stage_kv<D>(ks_all[(kt + 1) % NS], vs_all[(kt + 1) % NS], qkv, d, b, h, k0 + BC); };
        tile_acquire<NS>(has_next, prefetch);
        bf16 (*ks)[D + PAD] = ks_all[kt % NS];
        bf16 (*vs)[D + PAD] = vs_all[kt % NS];
        float s[BC / 8][4];
        zero(s);
        mma_a_xt<D>(s, qf, ks);
        #pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = q0 + g + 8 * half;
            float mx = -INFINITY;
            #pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = k0 + nt * 8 + 2 * t + c;
                    float v = s[nt][2 * half + c] * d.scale;
                    if (!full && (col >= d.T || (d.causal && col > row))) v = -INFINITY;
                    s[nt][2 * half + c] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[half], mx);
            // A row with no valid key yet keeps m = -inf; use 0 as the reference so exp gives 0, not NaN.
            const float ref = m_new == -INFINITY ? 0.f : m_new;
            const float corr = __expf(m[half] - ref);
            float sum = 0.f;
            #pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                #pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float p = __expf(s[nt][2 * half + c] - ref);
                    s[nt][2 * half + c] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[half] = l[half] * corr + sum;
            m[half] = m_new;
            #pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[nt][2 * half] *= corr;
                o[nt][2 * half + 1] *= corr;
            }
        }
        mma_p_x<D>(o, s, vs);
        tile_release<NS>(has_next, prefetch);
    }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = q0 + g + 8 * half;
        if (row >= d.T) continue;
        const float inv = 1.f / l[half];
        #pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            const int col = nt * 8 + 2 * t;
            *reinterpret_cast<unsigned*>(out + out_index(d, b, row, h, col)) =
                pack_f32(o[nt][2 * half] * inv, o[nt][2 * half + 1] * inv);
        }
        if (t == 0) lse[((i64)b * d.H + h) * d.T + row] = m[half] + __logf(l[half]);
    }
}

// dQ: grid (B * H, ceil(T / 64)), block 128; a warp owns 16 queries. Also
// computes delta = rowsum(dO * O) (the softmax backward's D) for its rows and
// writes it for the dK/dV kernel, which runs next: a separate pass over O and
// dO cost 50 us a layer (GPT-2 124M, B=16) where this kernel has dO in
// registers already.
template <int D>
__device__ void attention_backward_dq_mma(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv,
                                          const bf16* out, const float* lse, Dims d) {
    constexpr int NS = Stages<D>::N;
    __shared__ __align__(16) bf16 ks_all[NS][BC][D + PAD];
    __shared__ __align__(16) bf16 vs_all[NS][BC][D + PAD];
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H, qb = query_block(d);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int q0 = qb * BR + warp * 16;
    stage_kv<D>(ks_all[0], vs_all[0], qkv, d, b, h, 0);
    unsigned qf[D / 16][4], dof[D / 16][4];
    load_a_rows<D>(qf, qkv, true, d, b, h, 0, q0);
    load_a_rows<D>(dof, dout, false, d, b, h, 0, q0);
    const i64 stat = ((i64)b * d.H + h) * d.T;
    float lse_r[2], del_r[2] = {0.f, 0.f};
    {
        // Fragment element (kc, r) is row g + 8 (r & 1); the quad's 4 lanes hold a row's columns.
        unsigned of[D / 16][4];
        load_a_rows<D>(of, out, false, d, b, h, 0, q0);
        #pragma unroll
        for (int kc = 0; kc < D / 16; ++kc)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&dof[kc][r]));
                const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&of[kc][r]));
                del_r[r & 1] += x.x * y.x + x.y * y.y;
            }
    }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = q0 + g + 8 * half;
        del_r[half] += __shfl_xor_sync(0xffffffffu, del_r[half], 1);
        del_r[half] += __shfl_xor_sync(0xffffffffu, del_r[half], 2);
        lse_r[half] = row < d.T ? lse[stat + row] : 0.f;
        if (row < d.T && t == 0) delta[stat + row] = del_r[half];
    }
    float dq[D / 8][4];
    zero(dq);
    const int q_last = min(qb * BR + BR, d.T) - 1;
    const int tiles = d.causal ? q_last / BC + 1 : (d.T + BC - 1) / BC;
    for (int kt = 0; kt < tiles; ++kt) {
        const int k0 = kt * BC;
        const bool has_next = kt + 1 < tiles;
        // Every (query, key) pair of the warp and tile is valid: no mask.
        const bool full = k0 + BC <= d.T && q0 + 16 <= d.T && !(d.causal && k0 + BC - 1 > q0);
        auto prefetch = [&] { stage_kv<D>(ks_all[(kt + 1) % NS], vs_all[(kt + 1) % NS], qkv, d, b, h, k0 + BC); };
        tile_acquire<NS>(has_next, prefetch);
        bf16 (*ks)[D + PAD] = ks_all[kt % NS];
        bf16 (*vs)[D + PAD] = vs_all[kt % NS];
        // dS = P (dP - delta), scaled for dQ = dS K, in two halves of 32 keys so
        // that S and dP are in f32 registers for half a tile at a time (all of
        // it needed 168 registers, 3 blocks per SM), then as bf16 fragments.
        constexpr int HT = BC / 16;  // C tiles per half
        unsigned dsa[BC / 16][4];
        #pragma unroll
        for (int hv = 0; hv < 2; ++hv) {
            float s[HT][4], dp[HT][4];
            zero(s);
            zero(dp);
            mma_a_xt<D>(s, qf, ks, hv * BC / 2);
            mma_a_xt<D>(dp, dof, vs, hv * BC / 2);
            #pragma unroll
            for (int nt = 0; nt < HT; ++nt)
                #pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int half = r >> 1, row = q0 + g + 8 * half, col = k0 + hv * BC / 2 + nt * 8 + 2 * t + (r & 1);
                    const bool ok = full || (row < d.T && col < d.T && !(d.causal && col > row));
                    const float p = ok ? __expf(s[nt][r] * d.scale - lse_r[half]) : 0.f;
                    s[nt][r] = p * (dp[nt][r] - del_r[half]) * d.scale;
                }
            #pragma unroll
            for (int kc = 0; kc < HT / 2; ++kc) pack_a(dsa[hv * HT / 2 + kc], s, kc);
        }
        #pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) mma_a_x<D>(dq, dsa[kc], kc, ks);
        tile_release<NS>(has_next, prefetch);
    }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = q0 + g + 8 * half;
        if (row >= d.T) continue;
        #pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            const int col = nt * 8 + 2 * t;
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, row, 0, h, col)) =
                pack_f32(dq[nt][2 * half], dq[nt][2 * half + 1]);
        }
    }
}

// dK, dV: grid (B * H, ceil(T / 64)), block 128; a warp owns 16 keys and walks
// the query tiles that can see them.
template <int D>
__device__ void attention_backward_dkv_mma(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                           const float* delta, Dims d) {
    constexpr int NS = Stages<D>::N;
    __shared__ __align__(16) bf16 qs_all[NS][BC][D + PAD];
    __shared__ __align__(16) bf16 dos_all[NS][BC][D + PAD];
    __shared__ float lse_all[NS][BC], del_all[NS][BC];
    // Key block y: under a causal mask block 0 sees every query tile, the longest first.
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H, kb = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int k0w = kb * BR + warp * 16;
    const i64 stat = ((i64)b * d.H + h) * d.T;
    // Stages query tile q0 into buffer `buf`: Q and dO asynchronously, lse and
    // delta with plain loads (64 floats; visible after the next barrier).
    auto stage = [&](int buf, int q0) {
        stage_tile_async<D>(qs_all[buf], qkv, true, d, b, h, 0, q0);
        stage_tile_async<D>(dos_all[buf], dout, false, d, b, h, 0, q0);
        cp_async_commit();
        for (int r = threadIdx.x; r < BC; r += blockDim.x) {
            lse_all[buf][r] = q0 + r < d.T ? lse[stat + q0 + r] : 0.f;
            del_all[buf][r] = q0 + r < d.T ? delta[stat + q0 + r] : 0.f;
        }
    };
    unsigned kf[D / 16][4], vf[D / 16][4];
    load_a_rows<D>(kf, qkv, true, d, b, h, 1, k0w);
    load_a_rows<D>(vf, qkv, true, d, b, h, 2, k0w);
    float dk[D / 8][4], dv[D / 8][4];
    zero(dk);
    zero(dv);
    // Causal: queries before this key block never see it (BR == BC, so tile index = block index).
    const int first = d.causal ? kb : 0;
    const int tiles = (d.T + BC - 1) / BC;
    if (first < tiles) stage(0, first * BC);
    for (int qt = first; qt < tiles; ++qt) {
        const int q0 = qt * BC, cur = (qt - first) % NS;
        const bool has_next = qt + 1 < tiles;
        // Every (key, query) pair of the warp and tile is valid: no mask.
        const bool full = q0 + BC <= d.T && k0w + 16 <= d.T && !(d.causal && k0w + 15 > q0);
        auto prefetch = [&] { stage((qt - first + 1) % NS, q0 + BC); };
        tile_acquire<NS>(has_next, prefetch);
        bf16 (*qs)[D + PAD] = qs_all[cur];
        bf16 (*dos)[D + PAD] = dos_all[cur];
        const float* lse_s = lse_all[cur];
        const float* del_s = del_all[cur];
        // Transposed tiles: rows are keys, columns queries. P^T is kept only as
        // the bf16 fragments that dV = P^T dO consumes, and dV is done before
        // dP^T is computed: with S^T and dP^T in f32 at once the kernel needed
        // 243 registers (2 blocks per SM).
        unsigned pt[BC / 16][4];
        {
            float st[BC / 8][4];
            zero(st);
            mma_a_xt<D>(st, kf, qs);
            #pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
                #pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const int key = k0w + g + 8 * (r >> 1), qi = nt * 8 + 2 * t + (r & 1), query = q0 + qi;
                    const bool ok = full || (key < d.T && query < d.T && !(d.causal && key > query));
                    st[nt][r] = ok ? __expf(st[nt][r] * d.scale - lse_s[qi]) : 0.f;
                }
            #pragma unroll
            for (int kc = 0; kc < BC / 16; ++kc) pack_a(pt[kc], st, kc);
        }
        #pragma unroll
        for (int kc = 0; kc < BC / 16; ++kc) mma_a_x<D>(dv, pt[kc], kc, dos);
        float dpt[BC / 8][4];
        zero(dpt);
        mma_a_xt<D>(dpt, vf, dos);
        // dS^T = P^T (dP^T - delta), for dK = dS^T Q; P^T as rounded to bf16 for dV
        // (dS is rounded to bf16 for its product too).
        #pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int qi = nt * 8 + 2 * t + (r & 1);
                dpt[nt][r] = unpack_a(pt, nt, r) * (dpt[nt][r] - del_s[qi]) * d.scale;
            }
        mma_p_x<D>(dk, dpt, qs);
        tile_release<NS>(has_next, prefetch);
    }
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = k0w + g + 8 * half;
        if (key >= d.T) continue;
        #pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            const int col = nt * 8 + 2 * t;
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, key, 1, h, col)) = pack_f32(dk[nt][2 * half], dk[nt][2 * half + 1]);
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, key, 2, h, col)) = pack_f32(dv[nt][2 * half], dv[nt][2 * half + 1]);
        }
    }
}

// FWD_BLOCKS, DQ_BLOCKS, DKV_BLOCKS: blocks per SM the register allocation must
// allow (__launch_bounds__), where that costs few or no spills (ptxas -v): for
// D = 64 the forward fits 128 registers (4 blocks, was 129) and dK/dV 168 (3, was 2).
#define ATTENTION_MMA(D, FWD_BLOCKS, DQ_BLOCKS, DKV_BLOCKS)                                                         \
    extern "C" __global__ void __launch_bounds__(128, FWD_BLOCKS) attention_forward_mma_d##D(bf16* out, float* lse, \
                                                                                 const bf16* qkv, Dims d) {        \
        attention_forward_mma<D>(out, lse, qkv, d);                                                                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, DQ_BLOCKS) attention_backward_dq_mma_d##D(                   \
        bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse, Dims d) {   \
        attention_backward_dq_mma<D>(dqkv, delta, dout, qkv, out, lse, d);                                          \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, DKV_BLOCKS) attention_backward_dkv_mma_d##D(                 \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* delta, Dims d) {              \
        attention_backward_dkv_mma<D>(dqkv, dout, qkv, lse, delta, d);                                              \
    }

// The head sizes of the GPT-2 family and ViTs (64), small models (32), and larger ones.
ATTENTION_MMA(32, 4, 4, 3)
ATTENTION_MMA(64, 4, 3, 3)
ATTENTION_MMA(96, 1, 1, 1)
ATTENTION_MMA(128, 1, 1, 1)
