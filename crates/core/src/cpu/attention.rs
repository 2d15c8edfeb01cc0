//! Multi-head scaled dot-product attention, causal or not, the plain way.
//!
//! Layouts: qkv (B, T, 3C) holds q | k | v, each C = H * hs wide with head h at
//! [h*hs, (h+1)*hs). out (B, T, C). lse (B, H, T) is the log-sum-exp of each
//! query's scaled scores: the only thing the forward saves. The backward
//! recomputes the probabilities from it, as flash attention does, so the CPU and
//! CUDA ops share one interface and neither stores a (T, T) matrix.
//! One rayon task per batch element.

use rayon::prelude::*;

use super::dot;
use crate::Float;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub t: usize,
    pub c: usize,
    pub n_head: usize,
    pub causal: bool,
}

impl Dims {
    fn head_size(&self) -> usize {
        self.c / self.n_head
    }
    /// Keys a query at position i attends to: [0, end).
    fn end(&self, i: usize) -> usize {
        if self.causal { i + 1 } else { self.t }
    }
}

pub(crate) fn forward<F: Float>(out: &mut [F], lse: &mut [F], qkv: &[F], d: Dims) {
    let (t, c, nh, hs) = (d.t, d.c, d.n_head, d.head_size());
    let scale = F::one() / F::from_usize(hs).sqrt();
    out.par_chunks_mut(t * c).zip(lse.par_chunks_mut(nh * t)).zip(qkv.par_chunks(t * 3 * c)).for_each(
        |((out, lse), qkv)| {
            let mut p = vec![F::zero(); t];
            for h in 0..nh {
                for i in 0..t {
                    let q = &qkv[i * 3 * c + h * hs..][..hs];
                    let end = d.end(i);
                    let mut max = F::neg_infinity();
                    for (j, pj) in p.iter_mut().enumerate().take(end) {
                        let k = &qkv[j * 3 * c + c + h * hs..][..hs];
                        *pj = dot(q, k) * scale;
                        max = max.max(*pj);
                    }
                    let mut sum = F::zero();
                    for pj in p.iter_mut().take(end) {
                        *pj = (*pj - max).exp();
                        sum += *pj;
                    }
                    let o = &mut out[i * c + h * hs..][..hs];
                    o.fill(F::zero());
                    for (j, &pj) in p.iter().enumerate().take(end) {
                        let w = pj / sum;
                        let v = &qkv[j * 3 * c + 2 * c + h * hs..][..hs];
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += w * v;
                        }
                    }
                    lse[h * t + i] = max + sum.ln();
                }
            }
        },
    );
}

/// dqkv (B, T, 3C) = dL/dqkv, overwritten. Uses the forward's out and lse;
/// delta (B, H, T) receives each row's D = dout . out.
pub(crate) fn backward<F: Float>(
    dqkv: &mut [F],
    delta: &mut [F],
    dout: &[F],
    qkv: &[F],
    out: &[F],
    lse: &[F],
    d: Dims,
) {
    let (t, c, nh, hs) = (d.t, d.c, d.n_head, d.head_size());
    let scale = F::one() / F::from_usize(hs).sqrt();
    dqkv.par_chunks_mut(t * 3 * c)
        .zip(delta.par_chunks_mut(nh * t))
        .zip(dout.par_chunks(t * c).zip(out.par_chunks(t * c)))
        .zip(qkv.par_chunks(t * 3 * c).zip(lse.par_chunks(nh * t)))
        .for_each(|(((dqkv, delta), (dout, out)), (qkv, lse))| {
            dqkv.fill(F::zero());
            let mut p = vec![F::zero(); t];
            let mut dp = vec![F::zero(); t];
            for h in 0..nh {
                let (qo, ko, vo) = (h * hs, c + h * hs, 2 * c + h * hs);
                for i in 0..t {
                    let end = d.end(i);
                    let q = &qkv[i * 3 * c + qo..][..hs];
                    let dout_i = &dout[i * c + h * hs..][..hs];
                    // D_i = sum_j P_ij dP_ij = dout_i . out_i (softmax backward identity).
                    let big_d = dot(dout_i, &out[i * c + h * hs..][..hs]);
                    delta[h * t + i] = big_d;
                    for j in 0..end {
                        let k = &qkv[j * 3 * c + ko..][..hs];
                        let v = &qkv[j * 3 * c + vo..][..hs];
                        p[j] = (dot(q, k) * scale - lse[h * t + i]).exp();
                        dp[j] = dot(dout_i, v);
                    }
                    for j in 0..end {
                        let ds = p[j] * (dp[j] - big_d) * scale;
                        for e in 0..hs {
                            let kj = qkv[j * 3 * c + ko + e];
                            let qi = qkv[i * 3 * c + qo + e];
                            dqkv[i * 3 * c + qo + e] += ds * kj;
                            dqkv[j * 3 * c + ko + e] += ds * qi;
                            dqkv[j * 3 * c + vo + e] += p[j] * dout_i[e];
                        }
                    }
                }
            }
        });
}

/// Attention of `tq` new queries against a KV cache (incremental decoding).
/// cache (B, tmax, 3C) holds q | k | v rows laid out as qkv, filled for
/// positions [0, past + tq); out (B, tq, C). Query i sits at position past + i
/// and attends to keys [0, past + i]. The arithmetic is the forward's, so a
/// cached decode reproduces a full causal forward up to summation order.
pub(crate) fn cached<F: Float>(
    out: &mut [F],
    cache: &[F],
    tmax: usize,
    past: usize,
    tq: usize,
    c: usize,
    n_head: usize,
) {
    let hs = c / n_head;
    let scale = F::one() / F::from_usize(hs).sqrt();
    out.par_chunks_mut(tq * c).zip(cache.par_chunks(tmax * 3 * c)).for_each(|(out, cache)| {
        let mut p = vec![F::zero(); past + tq];
        for h in 0..n_head {
            for i in 0..tq {
                let pos = past + i;
                let q = &cache[pos * 3 * c + h * hs..][..hs];
                let mut max = F::neg_infinity();
                for (j, pj) in p.iter_mut().enumerate().take(pos + 1) {
                    let k = &cache[j * 3 * c + c + h * hs..][..hs];
                    *pj = dot(q, k) * scale;
                    max = max.max(*pj);
                }
                let mut sum = F::zero();
                for pj in p.iter_mut().take(pos + 1) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[i * c + h * hs..][..hs];
                o.fill(F::zero());
                for (j, &pj) in p.iter().enumerate().take(pos + 1) {
                    let w = pj / sum;
                    let v = &cache[j * 3 * c + 2 * c + h * hs..][..hs];
                    for (o, &v) in o.iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
        }
    });
}
