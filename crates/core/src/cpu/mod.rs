//! The plain CPU implementation of every op: the oracle for the CUDA kernels and
//! for finite-difference checks, parallel over rows with rayon.
//!
//! Invariants kept by every kernel here:
//! - Slices have exactly the lengths `ops` checked; kernels index without re-checking.
//! - Reductions across rows (parameter gradients, norms) use fixed-size chunks
//!   summed in chunk order, so results are bit-identical whatever the thread
//!   count: exact resume and reproducible runs depend on it.

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod cross_entropy;
pub(crate) mod elementwise;
pub(crate) mod embedding;
pub(crate) mod gelu;
pub(crate) mod image_tokens;
pub(crate) mod layernorm;
pub(crate) mod matmul;

/// Rows handed to one rayon task in row-parallel kernels: small enough to spread
/// a (B*T) batch across cores, large enough to amortize task overhead.
pub(crate) const ROWS_PER_TASK: usize = 16;

/// Elements per rayon task in elementwise kernels and chunked reductions.
pub(crate) const ELEMS_PER_TASK: usize = 1 << 14;

pub(crate) fn dot<F: crate::Float>(a: &[F], b: &[F]) -> F {
    let mut acc = F::zero();
    for (&x, &y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}
