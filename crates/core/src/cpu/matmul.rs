//! Matrix products through the `gemm` crate (f32 and f64, multi-threaded).

use gemm::{Parallelism, gemm};

use crate::Float;

/// Below this many multiply-adds a product runs on one thread: spawning costs
/// more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// out (m, n) = (accumulate ? out : 0) + op(a) @ op(b), where
/// op(a) is (m, k): `a` is stored (m, k) row-major, or (k, m) when `trans_a`;
/// op(b) is (k, n): `b` is stored (k, n), or (n, k) when `trans_b`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<F: Float>(
    out: &mut [F],
    a: &[F],
    b: &[F],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(out.len() == m * n && a.len() == m * k && b.len() == k * n, "matmul: lengths checked by ops");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(F::zero());
        }
        return;
    }
    // Element (i, p) of op(a) sits at i*lhs_rs + p*lhs_cs; likewise for b and out.
    let (lhs_rs, lhs_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rhs_rs, rhs_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let parallelism = if m * n * k >= PARALLEL_MIN_FLOPS {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above give out m*n, a m*k and b k*n elements, and the
    // strides address exactly those row-major (or transposed) layouts, so every
    // access is in bounds. `out` is a unique borrow, so it aliases neither input.
    // gemm computes dst = alpha*dst + beta*lhs*rhs and reads dst only if `read_dst`.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            F::one(),
            F::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}
