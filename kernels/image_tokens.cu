// The ViT's token sequence around the blocks. Deterministic: sums over the
// batch run in batch order in one thread, no float atomics.
//
// Forward:  out (B, 1+N, C): row 0 = cls + pos[0], row 1+n = patches[n] + pos[1+n].
// Backward: dpos[t] += sum_b dout[b, t]; dcls += sum_b dout[b, 0];
//           dpatches[b, n] = dout[b, 1+n] (overwritten).
// Pooling:  out (B, C) = x[b, 0] (the class token) or the mean of x[b, 1..T]
//           (the patch tokens); its backward overwrites all of dx (B, T, C).

// Pixels to patches: out (B, N, C*P*P) from uint8 pixels (B, S, S, C) packed
// four to a 32-bit word, each value x * scale[c] - shift[c] (normalization
// folded into one multiply-add per channel, as the CPU reference computes it:
// a float multiply, then a float subtract). Patches in row-major order, each
// flattened (channel, row, column) as a stride-P convolution's kernel.
struct PixelNorm {
    float scale[4];
    float shift[4];
};

template <typename T>
__device__ void patchify_impl(T* out, const unsigned* packed, int B, int S, int P, int C, PixelNorm norm) {
    const unsigned char* px = reinterpret_cast<const unsigned char*>(packed);
    const int grid = S / P, D = C * P * P;
    GRID_STRIDE(i, (i64)B * grid * grid * D) {
        const int d = i % D;
        const i64 patch = (i / D) % (grid * grid);
        const i64 b = i / ((i64)D * grid * grid);
        const int c = d / (P * P), py = (d / P) % P, qx = d % P;
        const i64 y = (patch / grid) * P + py, x = (patch % grid) * P + qx;
        const float v = (float)px[((b * S + y) * S + x) * C + c];
        out[i] = from_float<T>(__fsub_rn(__fmul_rn(v, norm.scale[c]), norm.shift[c]));
    }
}

template <typename T>
__device__ void image_tokens_forward_impl(T* out, const T* patches, const T* cls, const T* pos, int B, int N, int C) {
    const i64 Tn = N + 1;
    GRID_STRIDE(i, (i64)B * Tn * C) {
        const int c = i % C;
        const i64 t = (i / C) % Tn;
        const i64 b = i / (C * Tn);
        const float x = t == 0 ? to_float(cls[c]) : to_float(patches[(b * N + t - 1) * C + c]);
        out[i] = from_float<T>(x + to_float(pos[t * C + c]));
    }
}

template <typename T>
__device__ void image_tokens_backward_impl(T* dpatches, T* dcls, T* dpos, const T* dout, int B, int N, int C) {
    const i64 Tn = N + 1;
    GRID_STRIDE(i, Tn * C) {
        const int c = i % C;
        const i64 t = i / C;
        float s = 0.f;
        for (int b = 0; b < B; ++b) {
            const T g = dout[((i64)b * Tn + t) * C + c];
            s += to_float(g);
            if (t > 0) dpatches[((i64)b * N + t - 1) * C + c] = g;
        }
        dpos[i] = from_float<T>(to_float(dpos[i]) + s);
        if (t == 0) dcls[c] = from_float<T>(to_float(dcls[c]) + s);
    }
}

template <typename T> __device__ void pool_tokens_forward_impl(T* out, const T* x, int B, int Tn, int C, int mean) {
    GRID_STRIDE(i, (i64)B * C) {
        const int c = i % C;
        const i64 b = i / C;
        if (!mean) {
            out[i] = x[b * Tn * C + c];
        } else {
            float s = 0.f;
            for (int t = 1; t < Tn; ++t) s += to_float(x[(b * Tn + t) * C + c]);
            out[i] = from_float<T>(s / (float)(Tn - 1));
        }
    }
}

template <typename T> __device__ void pool_tokens_backward_impl(T* dx, const T* dout, int B, int Tn, int C, int mean) {
    GRID_STRIDE(i, (i64)B * Tn * C) {
        const int c = i % C;
        const i64 t = (i / C) % Tn;
        const i64 b = i / (C * Tn);
        const float g = to_float(dout[b * C + c]);
        float v;
        if (mean) v = t == 0 ? 0.f : g / (float)(Tn - 1);
        else v = t == 0 ? g : 0.f;
        dx[i] = from_float<T>(v);
    }
}

#define IMAGE_TOKENS(T, S)                                                                                          \
    extern "C" __global__ void patchify_##S(T* out, const unsigned* packed, int B, int Sz, int P, int C,             \
                                            PixelNorm norm) {                                                       \
        patchify_impl<T>(out, packed, B, Sz, P, C, norm);                                                           \
    }                                                                                                               \
    extern "C" __global__ void image_tokens_forward_##S(T* out, const T* patches, const T* cls, const T* pos,      \
                                                        int B, int N, int C) {                                      \
        image_tokens_forward_impl<T>(out, patches, cls, pos, B, N, C);                                              \
    }                                                                                                               \
    extern "C" __global__ void image_tokens_backward_##S(T* dpatches, T* dcls, T* dpos, const T* dout, int B,      \
                                                         int N, int C) {                                            \
        image_tokens_backward_impl<T>(dpatches, dcls, dpos, dout, B, N, C);                                         \
    }                                                                                                               \
    extern "C" __global__ void pool_tokens_forward_##S(T* out, const T* x, int B, int Tn, int C, int mean) {       \
        pool_tokens_forward_impl<T>(out, x, B, Tn, C, mean);                                                        \
    }                                                                                                               \
    extern "C" __global__ void pool_tokens_backward_##S(T* dx, const T* dout, int B, int Tn, int C, int mean) {    \
        pool_tokens_backward_impl<T>(dx, dout, B, Tn, C, mean);                                                     \
    }

IMAGE_TOKENS(float, f32)
IMAGE_TOKENS(bf16, bf16)
