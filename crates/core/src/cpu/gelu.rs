//! GELU in its two forms (see [`crate::ops::Gelu`]):
//! tanh, as GPT-2 defines it: gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
//! erf, the exact one:         gelu(x) = 0.5 x (1 + erf(x / sqrt(2))) = x Phi(x).

use rayon::prelude::*;

use super::ELEMS_PER_TASK;
use crate::Float;
use crate::ops::Gelu;

fn consts<F: Float>() -> (F, F) {
    (F::from_f64(std::f64::consts::FRAC_2_PI.sqrt()), F::from_f64(0.044715))
}

/// (gelu(x), gelu'(x)) of one element.
#[inline]
fn value_and_slope<F: Float>(kind: Gelu, x: F) -> (F, F) {
    let half = F::from_f64(0.5);
    match kind {
        Gelu::Tanh => {
            let (s, c) = consts::<F>();
            let u = s * (x + c * x * x * x);
            let th = u.tanh();
            let sech2 = F::one() - th * th;
            let slope = half * (F::one() + th) + half * x * sech2 * s * (F::one() + F::from_f64(3.0) * c * x * x);
            (half * x * (F::one() + th), slope)
        }
        Gelu::Erf => {
            // Phi(x) = 0.5 (1 + erf(x / sqrt 2)); phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
            let cdf = half * (F::one() + (x * F::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-half * x * x).exp()
                * F::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
            (x * cdf, cdf + x * pdf)
        }
    }
}

pub(crate) fn forward<F: Float>(out: &mut [F], inp: &[F], kind: Gelu) {
    out.par_chunks_mut(ELEMS_PER_TASK).zip(inp.par_chunks(ELEMS_PER_TASK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = value_and_slope(kind, x).0;
        }
    });
}

/// dinp = dout * gelu'(inp) (overwrites dinp).
pub(crate) fn backward<F: Float>(dinp: &mut [F], inp: &[F], dout: &[F], kind: Gelu) {
    dinp.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK).zip(dout.par_chunks(ELEMS_PER_TASK)))
        .for_each(|(d, (x, g))| {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                *d = value_and_slope(kind, x).1 * g;
            }
        });
}
