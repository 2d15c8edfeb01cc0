// Flash attention for bf16 on Hopper tensor cores (wgmma, sm_90a), head size
// 64 (kernels/HOPPER_ATTENTION.md). Same layouts and semantics as the
// mma.sync kernels of attention_mma.cu, which serve every other GPU and head
// size. A warpgroup (4 warps, 128 threads) owns 64 rows (queries, or keys in
// the dK/dV kernel); tiles are staged by cp.async into 128-byte-swizzled
// shared memory, double-buffered, and read by wgmma through descriptors. The
// backward is deterministic as in attention_mma.cu: one dQ pass over key tiles
// per query block, one dK/dV pass over query tiles per key block, no atomics.
//
// Accumulator fragments of m64nN (per warp w, g = lane / 4, t = lane % 4):
// element i is row 16 w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1),
// which is also the A-register layout: k-step ks of a product whose A is such
// an accumulator takes registers pack(x[8 ks + 2 j], x[8 ks + 2 j + 1]), j < 4.
//
// Compiled for compute_90a only (crates/core/src/cuda/compile.rs); for other
// targets the kernels are empty stubs that are never launched.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define WG_D 64  // head size: one 128-byte swizzle row per tile row
#define TILE_BYTES(rows) ((rows) * WG_D * 2)

// Byte offset of 16-byte chunk c (0..7) of row r in a 128B-swizzled tile of
// 128-byte rows: the chunk index is XOR-ed with the row's low three bits.
__device__ __forceinline__ unsigned swizzled(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Shared-memory matrix descriptor: start address, leading and stride byte
// offsets (each in 16-byte units), layout 1 = 128-byte swizzle. Every tile
// here is 64 columns wide, so for both K-major and N-major operands the stride
// offset is one 8-row atom (1 KB) and the leading offset is unused.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}
// K-step ks (16 elements) of a K-major operand: 32 bytes along the row.
__device__ __forceinline__ unsigned long long kmajor_step(unsigned long long desc, int ks) { return desc + 2 * ks; }
// K-step ks of an N-major operand: 16 rows of 128 bytes.
__device__ __forceinline__ unsigned long long nmajor_step(unsigned long long desc, int ks) { return desc + 128 * ks; }

__device__ __forceinline__ void wg_cp_async16(unsigned smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void wg_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void wg_wait_copies_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
// Shared memory written through the generic proxy (cp.async) is read by wgmma
// through the async proxy: order the two.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// The stage this iteration reads has landed (its copies were committed one
// group before the newest) and is visible to the whole block, wgmma's async
// proxy included.
__device__ __forceinline__ void stage_ready() {
    wg_wait_copies_but_one();
    fence_proxy_async();
    __syncthreads();
}

// Keeps the compiler from moving accesses to accumulator registers across the
// asynchronous wgmma (it sees neither the asynchrony nor the dependency).
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(unsigned (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// d (64 x 64, f32) = [d +] A (64 x 16, smem, K-major) B (16 x 64, smem, K-major).
__device__ __forceinline__ void wgmma_ss_m64n64(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(accumulate));
}

// d (64 x 128, f32) = [d +] A (64 x 16, smem, K-major) B (16 x 128, smem, K-major).
__device__ __forceinline__ void wgmma_ss_m64n128(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}

// d (64 x 64, f32) += A (64 x 16, registers) B (16 x 64, smem, N-major: imm-trans-b = 1).
__device__ __forceinline__ void wgmma_rs_m64n64(float (&d)[32], const unsigned (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}


// Stage rows [r0, r0 + ROWS) x 64 of a row-major bf16 matrix x (row stride
// `ld` elements, `n` rows) into the swizzled tile at shared address `tile`,
// 16 bytes per copy; rows past n are zero-filled (the source is then x itself,
// never read). Thread i copies chunk i % 8 of rows i / 8 + STEP k: STEP is a
// multiple of 8, so the swizzle pattern is the same for all of its rows and the
// addresses advance by constants.
template <int ROWS, int THREADS>
__device__ __forceinline__ void wg_stage(unsigned tile, const bf16* x, i64 ld, int n, int r0) {
    constexpr int STEP = THREADS / 8;
    static_assert(STEP % 8 == 0 && ROWS % STEP == 0, "whole swizzle atoms per pass");
    const int r = threadIdx.x / 8, c = threadIdx.x % 8;
    const bf16* src = x + (i64)(r0 + r) * ld + c * 8;
    const unsigned dst = tile + swizzled(r, c);
#pragma unroll
    for (int k = 0; k < ROWS / STEP; ++k) {
        const bool ok = r0 + r + STEP * k < n;
        wg_cp_async16(dst + STEP * k * 128, ok ? src + STEP * k * ld : x, ok);
    }
}

// 2^x in one MUFU.EX2. exp2f is four instructions (it rescales arguments
// below -126 to return denormals), and the softmax is instruction-bound;
// probabilities below 2^-126 flush to zero, far under bf16 resolution of 1.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned wg_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ float wg_unpack(const unsigned (&f)[16], int i) {
    const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&f[i >> 1]);
    return (i & 1) ? __high2float(v) : __low2float(v);
}

// Sets the masked scores of an accumulator tile to -inf (then 2^x is 0):
// element i is row row0 + 8 ((i >> 1) & 1), column col0 + 8 (i >> 2) + 2 t +
// (i & 1); columns past T are masked, and under a causal mask a key after its
// query (keys are columns, or rows when KEYS_ARE_ROWS: the dK/dV kernel's
// transposed tiles). Called only for tiles that need it, so that the full
// tiles' softmax has no index arithmetic and no branches.
template <bool KEYS_ARE_ROWS, int N>
__device__ __forceinline__ void mask_scores(float (&s)[N], int row0, int col0, int t, const Dims& d) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int row = row0 + 8 * ((i >> 1) & 1), col = col0 + 8 * (i >> 2) + 2 * t + (i & 1);
        const bool after = KEYS_ARE_ROWS ? row > col : col > row;
        if (col >= d.T || (d.causal && after)) s[i] = -INFINITY;
    }
}

// The A registers of a 64 x 64 operand from its accumulator (see the top).
__device__ __forceinline__ void pack_a(unsigned (&f)[16], const float (&x)[32]) {
#pragma unroll
    for (int i = 0; i < 16; ++i) f[i] = wg_pack(x[2 * i], x[2 * i + 1]);
}
__device__ __forceinline__ void a_step(unsigned (&a)[4], const unsigned (&f)[16], int ks) {
#pragma unroll
    for (int j = 0; j < 4; ++j) a[j] = f[4 * ks + j];
}

// Dynamic shared memory is aligned to 1 KB here (the swizzle atoms must be).
__device__ __forceinline__ unsigned aligned_smem_base() {
    extern __shared__ unsigned char smem_raw[];
    return ((unsigned)__cvta_generic_to_shared(smem_raw) + 1023) & ~1023u;
}

// ---------------------------------------------------------------- forward
//
// One warpgroup owns 64 query rows; key/value tiles of 128 rows. S = Q K^T is
// one m64n128k16 chain (A and B from shared memory), the online softmax runs on
// the accumulators in registers, and O += P V takes P from registers
// (m64n64k16, V read N-major, no transpose in memory). Grid (B * H,
// ceil(T / 64)), block 128, dynamic shared memory 8 KB (Q) + 4 x 16 KB (K, V,
// two stages) + 1 KB. (Two warpgroups sharing 128-row blocks ran 25% slower on
// an H200: one block per SM, in lockstep at every tile's barrier, where single
// warpgroups fit three blocks whose softmax and products overlap.)
__device__ void attention_forward_wgmma(bf16* out, float* lse, const bf16* qkv, Dims d) {
    constexpr int ROWS = 64, KEYS = 128, THREADS = 128;
    const unsigned base = aligned_smem_base();
    // Tiles: Q, then K stage 0/1, V stage 0/1 (addresses computed, not indexed,
    // so that nothing lands in local memory).
    const unsigned sq = base;
    auto sk = [&](int s) { return base + TILE_BYTES(ROWS) + s * TILE_BYTES(KEYS); };
    auto sv = [&](int s) { return base + TILE_BYTES(ROWS) + (2 + s) * TILE_BYTES(KEYS); };
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H;
    const int qb = d.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;  // longest blocks first
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const i64 ld = 3ll * d.H * d.hs;
    const bf16* qp = qkv + qkv_index(d, b, 0, 0, h, 0);
    const bf16* kp = qkv + qkv_index(d, b, 0, 1, h, 0);
    const bf16* vp = qkv + qkv_index(d, b, 0, 2, h, 0);
    const int q_first = qb * ROWS;
    const int q_last = min(q_first + ROWS, d.T) - 1;
    const int tiles = d.causal ? q_last / KEYS + 1 : (d.T + KEYS - 1) / KEYS;
    // Tiles go from the last (the diagonal, the only ones needing the causal
    // mask, and where every row has a valid key) down to 0.
    wg_stage<ROWS, THREADS>(sq, qp, ld, d.T, q_first);
    wg_stage<KEYS, THREADS>(sk(0), kp, ld, d.T, (tiles - 1) * KEYS);
    wg_stage<KEYS, THREADS>(sv(0), vp, ld, d.T, (tiles - 1) * KEYS);
    wg_commit();
    if (tiles >= 2) {
        wg_stage<KEYS, THREADS>(sk(1), kp, ld, d.T, (tiles - 2) * KEYS);
        wg_stage<KEYS, THREADS>(sv(1), vp, ld, d.T, (tiles - 2) * KEYS);
    }
    wg_commit();  // possibly empty: every iteration then waits for all but the newest group

    const float scale_log2 = d.scale * 1.4426950408889634f;
    const int row0 = q_first + 16 * warp + g;  // and row0 + 8
    float o[32], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.f;
    const unsigned long long desc_q = smem_desc(sq);

    for (int it = 0; it < tiles; ++it) {
        const int n = tiles - 1 - it, s = it & 1, k0 = n * KEYS;
        stage_ready();

        float sacc[64];
        fence_regs(sacc);
        wgmma_fence();
        const unsigned long long desc_k = smem_desc(sk(s));
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n128(sacc, kmajor_step(desc_q, ks), kmajor_step(desc_k, ks), ks > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(sacc);

        // Online softmax in base 2 (scale > 0, so the maximum is taken over the raw
        // scores and the scaling folds into the exponent's FFMA); element i is
        // key k0 + 8 (i >> 2) + 2 t + (i & 1).
        const bool full = k0 + KEYS <= d.T && !(d.causal && k0 + KEYS - 1 > q_first + 16 * warp);
        if (!full) mask_scores<false>(sacc, row0, k0, t, d);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float mx = -INFINITY;
#pragma unroll
            for (int i = 2 * half; i < 64; i += 4) mx = fmaxf(mx, fmaxf(sacc[i], sacc[i + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[half], mx * scale_log2);  // m is in scaled base-2 units
            const float ref = m_new == -INFINITY ? 0.f : m_new;  // a row with no valid key yet
            const float alpha = fast_exp2(m[half] - ref);
            float sum = 0.f;
#pragma unroll
            for (int i = 2 * half; i < 64; i += 4)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = fast_exp2(fmaf(sacc[i + e], scale_log2, -ref));
                    sacc[i + e] = p;
                    sum += p;
                }
            l[half] = l[half] * alpha + sum;  // this thread's columns; the quad adds up at the end
            m[half] = m_new;
#pragma unroll
            for (int i = 2 * half; i < 32; i += 4) {
                o[i] *= alpha;
                o[i + 1] *= alpha;
            }
        }
        unsigned pf[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) pf[i] = wg_pack(sacc[2 * i], sacc[2 * i + 1]);

        // O (64 x 64 per warpgroup) += P V over 8 k-steps of 16 keys.
        fence_regs(o);
        fence_regs(pf);
        wgmma_fence();
        const unsigned long long desc_v = smem_desc(sv(s));
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
            const unsigned a[4] = {pf[4 * ks], pf[4 * ks + 1], pf[4 * ks + 2], pf[4 * ks + 3]};
            wgmma_rs_m64n64(o, a, nmajor_step(desc_v, ks));
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(o);

        __syncthreads();  // the block is done with stage s
        if (n - 2 >= 0) {
            wg_stage<KEYS, THREADS>(sk(s), kp, ld, d.T, (n - 2) * KEYS);
            wg_stage<KEYS, THREADS>(sv(s), vp, ld, d.T, (n - 2) * KEYS);
        }
        wg_commit();
    }

#pragma unroll
    for (int half = 0; half < 2; ++half) {
        float lsum = l[half];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const int row = row0 + 8 * half;
        if (row >= d.T) continue;
        const float inv = 1.f / lsum;
#pragma unroll
        for (int i = 2 * half; i < 32; i += 4) {
            const int col = 8 * (i >> 2) + 2 * t;
            *reinterpret_cast<unsigned*>(out + out_index(d, b, row, h, col)) = wg_pack(o[i] * inv, o[i + 1] * inv);
        }
        // Natural-log LSE of the scaled scores, as the other kernels write it.
        if (t == 0) lse[((i64)b * d.H + h) * d.T + row] = (m[half] + __log2f(lsum)) * 0.6931471805599453f;
    }
}

// ---------------------------------------------------------------- backward
//
// Both kernels: one warpgroup, 64 rows, tiles of 64, dynamic shared memory
// 48 KB of tiles + 1 KB for alignment (+ 1 KB of lse/delta for dK/dV). Small blocks
// so that several share an SM (dQ 4 at 122 registers, dK/dV 3 at 164) and
// one's softmax overlaps another's products.

// dQ and delta: grid (B * H, ceil(T / 64)). Q and dO of the block's 64 queries
// stay in shared memory; K/V tiles stream through. Per key tile: S = Q K^T and
// dP = dO V^T (both SS), dS = P (dP - delta) scale, dQ += dS K (RS, K read
// N-major). delta = rowsum(dO O) is computed here first and written for the
// dK/dV kernel, which runs next.
__device__ void attention_backward_dq_wgmma(bf16* dqkv, float* delta, const bf16* dout, const bf16* qkv,
                                            const bf16* out, const float* lse, Dims d) {
    const unsigned base = aligned_smem_base();
    const unsigned sq = base, sdo = base + TILE_BYTES(64);
    auto sk = [&](int s) { return base + (2 + s) * TILE_BYTES(64); };
    auto sv = [&](int s) { return base + (4 + s) * TILE_BYTES(64); };
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H;
    const int qb = d.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;  // longest blocks first
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const i64 ld = 3ll * d.H * d.hs, ldo = (i64)d.H * d.hs;
    const bf16* qp = qkv + qkv_index(d, b, 0, 0, h, 0);
    const bf16* kp = qkv + qkv_index(d, b, 0, 1, h, 0);
    const bf16* vp = qkv + qkv_index(d, b, 0, 2, h, 0);
    const bf16* dop = dout + out_index(d, b, 0, h, 0);
    const int q_first = qb * 64;
    const int tiles = d.causal ? (min(q_first + 64, d.T) - 1) / 64 + 1 : (d.T + 63) / 64;
    wg_stage<64, 128>(sq, qp, ld, d.T, q_first);
    wg_stage<64, 128>(sdo, dop, ldo, d.T, q_first);
    wg_stage<64, 128>(sk(0), kp, ld, d.T, 0);
    wg_stage<64, 128>(sv(0), vp, ld, d.T, 0);
    wg_commit();
    if (tiles >= 2) {
        wg_stage<64, 128>(sk(1), kp, ld, d.T, 64);
        wg_stage<64, 128>(sv(1), vp, ld, d.T, 64);
    }
    wg_commit();

    // Rows of this thread: row0 and row0 + 8. delta from global memory while
    // the tiles land: the quad's 4 lanes take 16 columns each.
    const int row0 = q_first + 16 * warp + g;
    const i64 stat = ((i64)b * d.H + h) * d.T;
    const float log2e = 1.4426950408889634f, scale_log2 = d.scale * log2e;
    float del[2], lse2[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        float acc = 0.f;
        if (row < d.T) {
#pragma unroll
            for (int c = 0; c < 16; c += 8) {
                const uint4 x = *reinterpret_cast<const uint4*>(dop + row * ldo + 16 * t + c);
                const uint4 y = *reinterpret_cast<const uint4*>(out + out_index(d, b, row, h, 16 * t + c));
                const unsigned xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&xs[j]));
                    const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ys[j]));
                    acc += a.x * o.x + a.y * o.y;
                }
            }
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        del[half] = acc;
        lse2[half] = row < d.T ? lse[stat + row] * log2e : 0.f;
        if (row < d.T && t == 0) delta[stat + row] = acc;
    }

    float dq[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) dq[i] = 0.f;
    const unsigned long long desc_q = smem_desc(sq), desc_do = smem_desc(sdo);
    for (int kt = 0; kt < tiles; ++kt) {
        const int s = kt & 1, k0 = kt * 64;
        stage_ready();

        float sacc[32], dpacc[32];
        fence_regs(sacc);
        fence_regs(dpacc);
        wgmma_fence();
        const unsigned long long desc_k = smem_desc(sk(s)), desc_v = smem_desc(sv(s));
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n64(sacc, kmajor_step(desc_q, ks), kmajor_step(desc_k, ks), ks > 0);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n64(dpacc, kmajor_step(desc_do, ks), kmajor_step(desc_v, ks), ks > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(sacc);
        fence_regs(dpacc);

        // Every (query, key) pair of the warp's rows and this tile is valid: no mask.
        const bool full = k0 + 64 <= d.T && !(d.causal && k0 + 63 > q_first + 16 * warp);
        if (!full) mask_scores<false>(sacc, row0, k0, t, d);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int half = (i >> 1) & 1;
            const float p = fast_exp2(fmaf(sacc[i], scale_log2, -lse2[half]));
            sacc[i] = p * (dpacc[i] - del[half]);  // dS / scale: the scale is applied to dQ at the end
        }
        unsigned dsf[16];
        pack_a(dsf, sacc);

        fence_regs(dq);
        fence_regs(dsf);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            unsigned a[4];
            a_step(a, dsf, ks);
            wgmma_rs_m64n64(dq, a, nmajor_step(desc_k, ks));
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(dq);

        __syncthreads();  // the block is done with stage s
        if (kt + 2 < tiles) {
            wg_stage<64, 128>(sk(s), kp, ld, d.T, k0 + 128);
            wg_stage<64, 128>(sv(s), vp, ld, d.T, k0 + 128);
        }
        wg_commit();
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        if (row >= d.T) continue;
#pragma unroll
        for (int i = 2 * half; i < 32; i += 4) {
            const int col = 8 * (i >> 2) + 2 * t;
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, row, 0, h, col)) =
                wg_pack(dq[i] * d.scale, dq[i + 1] * d.scale);
        }
    }
}

// dK, dV: grid (B * H, ceil(T / 64)). K and V of the block's 64 keys stay in
// shared memory; Q/dO tiles (with their lse and delta) stream through. Per
// query tile, transposed so that keys are rows: S^T = K Q^T (SS), P^T in
// registers, dV += P^T dO (RS, dO read N-major), dP^T = V dO^T (SS),
// dS^T = P^T (dP^T - delta) scale, dK += dS^T Q (RS, Q read N-major).
__device__ void attention_backward_dkv_wgmma(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                             const float* delta, Dims d) {
    const unsigned base = aligned_smem_base();
    const unsigned sk = base, sv = base + TILE_BYTES(64);
    auto sq = [&](int s) { return base + (2 + s) * TILE_BYTES(64); };
    auto sdo = [&](int s) { return base + (4 + s) * TILE_BYTES(64); };
    // lse and delta of stage s's 64 queries, after the tiles.
    extern __shared__ unsigned char smem_raw[];
    float* stats = reinterpret_cast<float*>(smem_raw + (base - (unsigned)__cvta_generic_to_shared(smem_raw)) +
                                            6 * TILE_BYTES(64));
    // Key block y: under a causal mask block 0 sees every query tile, the longest first.
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H, kb = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const i64 ld = 3ll * d.H * d.hs, ldo = (i64)d.H * d.hs;
    const bf16* qp = qkv + qkv_index(d, b, 0, 0, h, 0);
    const bf16* dop = dout + out_index(d, b, 0, h, 0);
    const i64 stat = ((i64)b * d.H + h) * d.T;
    const float log2e = 1.4426950408889634f, scale_log2 = d.scale * log2e;
    const int k_first = kb * 64;
    // Causal: queries before this key block never see it (tiles are 64 wide too).
    const int first = d.causal ? kb : 0, tiles = (d.T + 63) / 64;
    // Q, dO, lse and delta of query tile qt into stage s, all asynchronously
    // (the statistics 4 bytes a thread: rows of T floats need not be 16-byte
    // aligned; a synchronous load here stalled the warps that made it).
    const unsigned stats_smem = base + 6 * TILE_BYTES(64);
    auto stage = [&](int s, int qt) {
        wg_stage<64, 128>(sq(s), qp, ld, d.T, qt * 64);
        wg_stage<64, 128>(sdo(s), dop, ldo, d.T, qt * 64);
        const int q = qt * 64 + threadIdx.x % 64;
        const float* src = threadIdx.x < 64 ? lse : delta;
        const bool ok = q < d.T;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(stats_smem + 4 * (128 * s + threadIdx.x)),
                     "l"(ok ? src + stat + q : src), "r"(ok ? 4 : 0));
    };
    wg_stage<64, 128>(sk, qkv + qkv_index(d, b, 0, 1, h, 0), ld, d.T, k_first);
    wg_stage<64, 128>(sv, qkv + qkv_index(d, b, 0, 2, h, 0), ld, d.T, k_first);
    stage(0, first);
    wg_commit();
    if (first + 1 < tiles) stage(1, first + 1);
    wg_commit();

    const int key0 = k_first + 16 * warp + g;  // and key0 + 8
    float dk[32], dv[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[i] = dv[i] = 0.f;
    const unsigned long long desc_k = smem_desc(sk), desc_v = smem_desc(sv);
    for (int qt = first; qt < tiles; ++qt) {
        const int s = (qt - first) & 1, q0 = qt * 64;
        stage_ready();
        const float* lse_s = stats + 128 * s;
        const float* del_s = lse_s + 64;
        const unsigned long long desc_q = smem_desc(sq(s)), desc_do = smem_desc(sdo(s));

        float acc[32];
        fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n64(acc, kmajor_step(desc_k, ks), kmajor_step(desc_q, ks), ks > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(acc);

        // Every (key, query) pair of the warp's keys and this tile is valid: no mask.
        const bool full = q0 + 64 <= d.T && !(d.causal && k_first + 16 * warp + 15 > q0);
        if (!full) mask_scores<true>(acc, key0, q0, t, d);
        // P^T, kept only as the bf16 A registers of dV = P^T dO.
#pragma unroll
        for (int i = 0; i < 32; ++i)
            acc[i] = fast_exp2(fmaf(acc[i], scale_log2, -log2e * lse_s[8 * (i >> 2) + 2 * t + (i & 1)]));
        unsigned pt[16];
        pack_a(pt, acc);

        float dpt[32];
        fence_regs(dv);
        fence_regs(pt);
        fence_regs(dpt);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            unsigned a[4];
            a_step(a, pt, ks);
            wgmma_rs_m64n64(dv, a, nmajor_step(desc_do, ks));
        }
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n64(dpt, kmajor_step(desc_v, ks), kmajor_step(desc_do, ks), ks > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(dv);
        fence_regs(dpt);

        // dS^T / scale (the scale is applied to dK at the end), with P^T as
        // rounded to bf16 for dV (dS is rounded for its product too).
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int qi = 8 * (i >> 2) + 2 * t + (i & 1);
            dpt[i] = wg_unpack(pt, i) * (dpt[i] - del_s[qi]);
        }
        unsigned dst[16];
        pack_a(dst, dpt);
        fence_regs(dk);
        fence_regs(dst);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            unsigned a[4];
            a_step(a, dst, ks);
            wgmma_rs_m64n64(dk, a, nmajor_step(desc_q, ks));
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(dk);

        __syncthreads();  // the block is done with stage s
        if (qt + 2 < tiles) stage(s, qt + 2);
        wg_commit();
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = key0 + 8 * half;
        if (key >= d.T) continue;
#pragma unroll
        for (int i = 2 * half; i < 32; i += 4) {
            const int col = 8 * (i >> 2) + 2 * t;
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, key, 1, h, col)) =
                wg_pack(dk[i] * d.scale, dk[i + 1] * d.scale);
            *reinterpret_cast<unsigned*>(dqkv + qkv_index(d, b, key, 2, h, col)) = wg_pack(dv[i], dv[i + 1]);
        }
    }
}

#define FWD_ARGS bf16 *out, float *lse, const bf16 *qkv, Dims d
#define DQ_ARGS bf16 *dqkv, float *delta, const bf16 *dout, const bf16 *qkv, const bf16 *out, const float *lse, Dims d
#define DKV_ARGS bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const float *lse, const float *delta, Dims d

extern "C" __global__ void __launch_bounds__(128, 3) attention_forward_wgmma_d64(FWD_ARGS) {
    attention_forward_wgmma(out, lse, qkv, d);
}
extern "C" __global__ void __launch_bounds__(128, 4) attention_backward_dq_wgmma_d64(DQ_ARGS) {
    attention_backward_dq_wgmma(dqkv, delta, dout, qkv, out, lse, d);
}
extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_dkv_wgmma_d64(DKV_ARGS) {
    attention_backward_dkv_wgmma(dqkv, dout, qkv, lse, delta, d);
}

#else

#define FWD_ARGS bf16*, float*, const bf16*, Dims
extern "C" __global__ void attention_forward_wgmma_d64(FWD_ARGS) {}
extern "C" __global__ void attention_backward_dq_wgmma_d64(bf16*, float*, const bf16*, const bf16*, const bf16*,
                                                           const float*, Dims) {}
extern "C" __global__ void attention_backward_dkv_wgmma_d64(bf16*, const bf16*, const bf16*, const float*,
                                                            const float*, Dims) {}

#endif
