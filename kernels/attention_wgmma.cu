// Flash attention forward for bf16 on Hopper tensor cores (wgmma, sm_90a),
// head size 64. Milestone 1 of kernels/HOPPER_ATTENTION.md: two warpgroups
// (256 threads) own 128 query rows (64 each); key/value tiles of 128 rows are
// staged by cp.async into 128-byte-swizzled shared memory, double-buffered;
// S = Q K^T is one m64n128k16 wgmma chain per warpgroup (A and B from shared
// memory), the online softmax runs on the accumulators in registers, and
// O += P V takes P from registers (m64n64k16, V read N-major, no transpose
// in memory). Same layouts and semantics as attention_forward_mma_d64.
//
// Compiled for compute_90a only (crates/core/src/cuda/compile.rs); for other
// targets the kernel is an empty stub that is never launched.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define WG_ROWS 128   // query rows per block: 2 warpgroups x 64
#define WG_KEYS 128   // keys per staged tile
#define WG_D 64       // head size: one 128-byte swizzle row per tile row
#define WG_TILE_BYTES (WG_KEYS * WG_D * 2)  // 16 KB, a multiple of the 1 KB swizzle atom

// Byte offset of 16-byte chunk c (0..7) of row r in a 128B-swizzled tile of
// 128-byte rows: the chunk index is XOR-ed with the row's low three bits.
__device__ __forceinline__ unsigned swizzled(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Shared-memory matrix descriptor: start address, leading and stride byte
// offsets (each in 16-byte units), layout 1 = 128-byte swizzle.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

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

// d (64 x 128, f32) = [d +] A (64 x 16, smem) B (16 x 128, smem, K-major).
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

// Stage rows [r0, r0 + 128) x 64 of one part of head h into the swizzled tile
// at shared address `tile`: 1024 chunks of 16 bytes, 4 per thread. Rows past T
// are zero-filled.
__device__ __forceinline__ void wg_stage(unsigned tile, const bf16* qkv, const Dims& d, int b, int h, int part, int r0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int idx = threadIdx.x + 256 * k, r = idx >> 3, c = idx & 7, row = r0 + r;
        const bool ok = row < d.T;
        const bf16* src = ok ? qkv + qkv_index(d, b, row, part, h, c * 8) : qkv;
        wg_cp_async16(tile + swizzled(r, c), src, ok);
    }
}

__device__ __forceinline__ unsigned wg_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Grid (B * H, ceil(T / 128)), block 256, dynamic shared memory 5 tiles + 1 KB.
extern "C" __global__ void __launch_bounds__(256, 1) attention_forward_wgmma_d64(bf16* out, float* lse, const bf16* qkv, Dims d) {
    extern __shared__ unsigned char smem_raw[];
    // Swizzle atoms must start on 1 KB boundaries: align the base ourselves.
    const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
    const unsigned base = (raw + 1023) & ~1023u;
    // Tiles: Q, K stage 0, K stage 1, V stage 0, V stage 1 (addresses computed,
    // not indexed, so that nothing lands in local memory).
    const unsigned sq = base;
    auto sk = [&](int s) { return base + (1 + s) * WG_TILE_BYTES; };
    auto sv = [&](int s) { return base + (3 + s) * WG_TILE_BYTES; };
    const int b = blockIdx.x / d.H, h = blockIdx.x % d.H;
    const int qb = d.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;  // longest blocks first
    const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int q_first = qb * WG_ROWS;
    const int q_last = min(q_first + WG_ROWS, d.T) - 1;
    const int tiles = d.causal ? q_last / WG_KEYS + 1 : (d.T + WG_KEYS - 1) / WG_KEYS;
    // Tiles go from the last (the diagonal, the only ones needing the causal mask) down to 0.
    wg_stage(sq, qkv, d, b, h, 0, q_first);
    wg_stage(sk(0), qkv, d, b, h, 1, (tiles - 1) * WG_KEYS);
    wg_stage(sv(0), qkv, d, b, h, 2, (tiles - 1) * WG_KEYS);
    wg_commit();
    if (tiles >= 2) {
        wg_stage(sk(1), qkv, d, b, h, 1, (tiles - 2) * WG_KEYS);
        wg_stage(sv(1), qkv, d, b, h, 2, (tiles - 2) * WG_KEYS);
    }
    wg_commit();  // possibly empty: every iteration then waits for all but the newest group

    const float scale_log2 = d.scale * 1.4426950408889634f;
    // Rows of this thread: q_first + 64 wg + 16 warp + g + 8 half.
    const int row0 = q_first + 64 * wg + 16 * warp + g;
    float o[32], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.f;
    const unsigned long long desc_q = smem_desc(sq + wg * 64 * 128, 16, 1024);

    for (int it = 0; it < tiles; ++it) {
        const int n = tiles - 1 - it, s = it & 1, k0 = n * WG_KEYS;
        wg_wait_copies_but_one();
        fence_proxy_async();
        __syncthreads();

        // S (64 x 128 per warpgroup) = Q K^T over 4 k-steps of 16 (32 bytes of each 128-byte row).
        float sacc[64];
        fence_regs(sacc);
        wgmma_fence();
        const unsigned long long desc_k = smem_desc(sk(s), 16, 1024);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_ss_m64n128(sacc, desc_q + 2 * ks, desc_k + 2 * ks, ks > 0);
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(sacc);

        // Online softmax in base 2 on the accumulators: element i is row
        // row0 + 8 ((i >> 1) & 1), key k0 + 8 (i >> 2) + 2 t + (i & 1).
        const bool full = k0 + WG_KEYS <= d.T && !(d.causal && k0 + WG_KEYS - 1 > q_first + 64 * wg + 16 * warp);
        unsigned pf[32];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + 8 * half;
            float mx = -INFINITY;
#pragma unroll
            for (int i = 2 * half; i < 64; i += 4)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = k0 + 8 * (i >> 2) + 2 * t + e;
                    float v = sacc[i + e] * scale_log2;
                    if (!full && (col >= d.T || (d.causal && col > row))) v = -INFINITY;
                    sacc[i + e] = v;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[half], mx);
            const float ref = m_new == -INFINITY ? 0.f : m_new;  // a row with no valid key yet
            const float alpha = exp2f(m[half] - ref);
            float sum = 0.f;
#pragma unroll
            for (int i = 2 * half; i < 64; i += 4)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(sacc[i + e] - ref);
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
        // P as A fragments: k-step ks (keys 16 ks ..) register j packs elements 8 ks + 2 j, + 1.
#pragma unroll
        for (int ks = 0; ks < 8; ++ks)
#pragma unroll
            for (int j = 0; j < 4; ++j) pf[4 * ks + j] = wg_pack(sacc[8 * ks + 2 * j], sacc[8 * ks + 2 * j + 1]);

        // O (64 x 64 per warpgroup) += P V over 8 k-steps of 16 keys (2 KB of the tile each).
        fence_regs(o);
        fence_regs(pf);
        wgmma_fence();
        const unsigned long long desc_v = smem_desc(sv(s), WG_TILE_BYTES, 1024);
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
            const unsigned a[4] = {pf[4 * ks], pf[4 * ks + 1], pf[4 * ks + 2], pf[4 * ks + 3]};
            wgmma_rs_m64n64(o, a, desc_v + 128 * ks);
        }
        wgmma_commit();
        wgmma_wait_all();
        fence_regs(o);

        __syncthreads();  // both warpgroups are done with stage s
        if (n - 2 >= 0) {
            wg_stage(sk(s), qkv, d, b, h, 1, (n - 2) * WG_KEYS);
            wg_stage(sv(s), qkv, d, b, h, 2, (n - 2) * WG_KEYS);
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

#else

extern "C" __global__ void attention_forward_wgmma_d64(bf16*, float*, const bf16*, Dims) {}

#endif
