//! AdamW with bias correction and decoupled weight decay, in the same order of
//! operations as PyTorch's single-tensor implementation (for close parity).
//! Hyper-parameters are f64, like Python floats, and rounded once to the
//! parameter dtype, so an f64 run matches PyTorch's f64 run to rounding.

use rayon::prelude::*;

use super::ELEMS_PER_TASK;
use crate::Float;

#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies the gradient first (global-norm clipping folded in).
    pub grad_scale: f64,
}

pub(crate) fn update<F: Float>(param: &mut [F], grad: &[F], m: &mut [F], v: &mut [F], h: AdamWHyper) {
    let f = |x: f64| F::from_f64(x);
    let (b1, b2) = (h.beta1, h.beta2);
    let bc1 = 1.0 - b1.powi(h.step as i32);
    let bc2_sqrt = (1.0 - b2.powi(h.step as i32)).sqrt();
    let lr = h.lr;
    let (one_minus_b1, b2f, one_minus_b2) = (f(1.0 - b1), f(b2), f(1.0 - b2));
    let decay = f(1.0 - lr * h.weight_decay);
    let step_size = f(lr / bc1);
    let (bc2_sqrt, eps, gs) = (f(bc2_sqrt), f(h.eps), f(h.grad_scale));
    param
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(grad.par_chunks(ELEMS_PER_TASK))
        .zip(m.par_chunks_mut(ELEMS_PER_TASK).zip(v.par_chunks_mut(ELEMS_PER_TASK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * gs;
                m[i] += one_minus_b1 * (g - m[i]);
                v[i] = v[i] * b2f + one_minus_b2 * g * g;
                p[i] = p[i] * decay;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] -= step_size * m[i] / denom;
            }
        });
}
