// Token + position embedding. The backward is deterministic: no float atomics.
// dwte is accumulated per distinct token from a token index built on the host
// (positions sorted by token, then position), so a token repeated in the batch
// sums its gradients in a fixed order.

// out (B*T, C) = wte[tokens] + wpe[t]
template <typename T>
__device__ void embedding_forward_impl(T* out, const unsigned* tokens, const T* wte, const T* wpe, i64 BT, int Tn, int C) {
    GRID_STRIDE(i, BT * C) {
        const i64 row = i / C;
        const int c = i % C;
        const int t = row % Tn;
        out[i] = from_float<T>(to_float(wte[(i64)tokens[row] * C + c]) + to_float(wpe[(i64)t * C + c]));
    }
}

// dwpe[t, c] += sum over b of dout[b, t, c], b in order.
template <typename T>
__device__ void embedding_backward_wpe_impl(T* dwpe, const T* dout, int B, int Tn, int C) {
    GRID_STRIDE(i, (i64)Tn * C) {
        const i64 t = i / C;
        const int c = i % C;
        float s = 0.f;
        for (int b = 0; b < B; ++b) s += to_float(dout[((i64)b * Tn + t) * C + c]);
        dwpe[i] = from_float<T>(to_float(dwpe[i]) + s);
    }
}

// Block u handles distinct token ids[u]: positions order[starts[u] .. starts[u+1]).
template <typename T>
__device__ void embedding_backward_wte_impl(T* dwte, const T* dout, const unsigned* ids, const unsigned* starts,
                                            const unsigned* order, int C) {
    const unsigned u = blockIdx.x;
    const i64 tok = ids[u];
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.f;
        for (unsigned k = starts[u]; k < starts[u + 1]; ++k) s += to_float(dout[(i64)order[k] * C + c]);
        dwte[tok * C + c] = from_float<T>(to_float(dwte[tok * C + c]) + s);
    }
}

#define EMBEDDING(T, S)                                                                                             \
    extern "C" __global__ void embedding_forward_##S(T* out, const unsigned* tokens, const T* wte, const T* wpe,    \
                                                     i64 BT, int Tn, int C) {                                       \
        embedding_forward_impl<T>(out, tokens, wte, wpe, BT, Tn, C);                                                \
    }                                                                                                               \
    extern "C" __global__ void embedding_backward_wpe_##S(T* dwpe, const T* dout, int B, int Tn, int C) {           \
        embedding_backward_wpe_impl<T>(dwpe, dout, B, Tn, C);                                                       \
    }                                                                                                               \
    extern "C" __global__ void embedding_backward_wte_##S(T* dwte, const T* dout, const unsigned* ids,              \
                                                          const unsigned* starts, const unsigned* order, int C) {    \
        embedding_backward_wte_impl<T>(dwte, dout, ids, starts, order, C);                                          \
    }

EMBEDDING(float, f32)
EMBEDDING(bf16, bf16)
