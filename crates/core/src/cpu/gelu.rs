//! GELU with the tanh approximation, as GPT-2 defines it:
//! gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

use rayon::prelude::*;

use super::ELEMS_PER_TASK;
use crate::Float;

fn consts<F: Float>() -> (F, F) {
    (F::from_f64(std::f64::consts::FRAC_2_PI.sqrt()), F::from_f64(0.044715))
}

pub(crate) fn forward<F: Float>(out: &mut [F], inp: &[F]) {
    let (s, c) = consts::<F>();
    let half = F::from_f64(0.5);
    out.par_chunks_mut(ELEMS_PER_TASK).zip(inp.par_chunks(ELEMS_PER_TASK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            let u = s * (x + c * x * x * x);
            *o = half * x * (F::one() + u.tanh());
        }
    });
}

/// dinp = dout * gelu'(inp) (overwrites dinp).
pub(crate) fn backward<F: Float>(dinp: &mut [F], inp: &[F], dout: &[F]) {
    let (s, c) = consts::<F>();
    let half = F::from_f64(0.5);
    let three = F::from_f64(3.0);
    dinp.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK).zip(dout.par_chunks(ELEMS_PER_TASK)))
        .for_each(|(d, (x, g))| {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let u = s * (x + c * x * x * x);
                let th = u.tanh();
                let sech2 = F::one() - th * th;
                let local = half * (F::one() + th) + half * x * sech2 * s * (F::one() + three * c * x * x);
                *d = local * g;
            }
        });
}
