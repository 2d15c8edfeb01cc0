//! LayerNorm over the last dimension C, one row per (b, t).
//! Forward saves each row's mean and 1/std for the backward.

use rayon::prelude::*;

use super::ROWS_PER_TASK;
use crate::Float;

/// out (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd: (N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<F: Float>(
    out: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
    inp: &[F],
    weight: &[F],
    bias: &[F],
    c: usize,
    eps: F,
) {
    let cf = F::from_usize(c);
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, x), (mean, rstd))| {
            let m = x.iter().copied().sum::<F>() / cf;
            let var = x.iter().map(|&v| (v - m) * (v - m)).sum::<F>() / cf;
            let r = F::one() / (var + eps).sqrt();
            for i in 0..c {
                o[i] = (x[i] - m) * r * weight[i] + bias[i];
            }
            *mean = m;
            *rstd = r;
        });
}

/// dinp += dL/dinp; dweight += dL/dweight; dbias += dL/dbias.
/// dinp accumulates because in a pre-LN block it is the residual stream's gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<F: Float>(
    dinp: &mut [F],
    dweight: &mut [F],
    dbias: &mut [F],
    dout: &[F],
    inp: &[F],
    weight: &[F],
    mean: &[F],
    rstd: &[F],
    c: usize,
) {
    let cf = F::from_usize(c);
    let rows_chunk = ROWS_PER_TASK * c;
    // Each task returns its partial dweight and dbias; they are summed in chunk
    // order below so the result does not depend on the thread count.
    let partials: Vec<(Vec<F>, Vec<F>)> = dinp
        .par_chunks_mut(rows_chunk)
        .zip(dout.par_chunks(rows_chunk).zip(inp.par_chunks(rows_chunk)))
        .enumerate()
        .map(|(chunk, (dx, (dy, x)))| {
            let mut dw = vec![F::zero(); c];
            let mut db = vec![F::zero(); c];
            for r in 0..dx.len() / c {
                let row = chunk * ROWS_PER_TASK + r;
                let (m, rs) = (mean[row], rstd[row]);
                let x = &x[r * c..(r + 1) * c];
                let dy = &dy[r * c..(r + 1) * c];
                let dx = &mut dx[r * c..(r + 1) * c];
                // Two reductions over the row: mean(dnorm) and mean(dnorm * norm).
                let mut dnorm_mean = F::zero();
                let mut dnorm_norm_mean = F::zero();
                for i in 0..c {
                    let norm = (x[i] - m) * rs;
                    let dnorm = weight[i] * dy[i];
                    dnorm_mean += dnorm;
                    dnorm_norm_mean += dnorm * norm;
                }
                dnorm_mean = dnorm_mean / cf;
                dnorm_norm_mean = dnorm_norm_mean / cf;
                for i in 0..c {
                    let norm = (x[i] - m) * rs;
                    let dnorm = weight[i] * dy[i];
                    db[i] += dy[i];
                    dw[i] += norm * dy[i];
                    dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rs;
                }
            }
            (dw, db)
        })
        .collect();
    for (dw, db) in partials {
        for i in 0..c {
            dweight[i] += dw[i];
            dbias[i] += db[i];
        }
    }
}
