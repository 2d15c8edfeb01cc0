//! Softmax + cross-entropy over a padded vocabulary, fused: the probabilities are
//! never stored; with a gradient scale the logits are overwritten by dL/dlogits.

use rayon::prelude::*;

use crate::Float;

/// logits (N, vp), of which the first `v` columns are real; targets (N) < v.
/// losses[n] = logsumexp(logits[n, :v]) - logits[n, target].
/// With `grad_scale = Some(s)`: logits[n, i] = s * (softmax_i - [i == target]) for
/// i < v, and 0 for padded columns, so padding never receives a gradient.
pub(crate) fn forward_backward<F: Float>(
    logits: &mut [F],
    losses: &mut [F],
    targets: &[u32],
    vp: usize,
    v: usize,
    grad_scale: Option<F>,
) {
    logits.par_chunks_mut(vp).zip(losses.par_iter_mut().zip(targets.par_iter())).for_each(|(row, (loss, &target))| {
        let real = &row[..v];
        let max = real.iter().copied().fold(F::neg_infinity(), F::max);
        let sum: F = real.iter().map(|&x| (x - max).exp()).sum();
        let lse = max + sum.ln();
        *loss = lse - real[target as usize];
        if let Some(s) = grad_scale {
            for (i, x) in row.iter_mut().enumerate() {
                *x = if i < v {
                    let p = (*x - lse).exp();
                    let y = if i == target as usize { F::one() } else { F::zero() };
                    s * (p - y)
                } else {
                    F::zero()
                };
            }
        }
    });
}
