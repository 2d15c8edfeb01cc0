use rayon::prelude::*;

use super::ELEMS_PER_TASK;
use crate::Float;

pub(crate) fn add<F: Float>(out: &mut [F], a: &[F], b: &[F]) {
    out.par_chunks_mut(ELEMS_PER_TASK).zip(a.par_chunks(ELEMS_PER_TASK).zip(b.par_chunks(ELEMS_PER_TASK))).for_each(
        |(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        },
    );
}

pub(crate) fn add_assign<F: Float>(acc: &mut [F], x: &[F]) {
    acc.par_chunks_mut(ELEMS_PER_TASK).zip(x.par_chunks(ELEMS_PER_TASK)).for_each(|(acc, x)| {
        for (a, &x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    });
}

pub(crate) fn fill<F: Float>(out: &mut [F], value: F) {
    out.par_chunks_mut(ELEMS_PER_TASK).for_each(|o| o.fill(value));
}

pub(crate) fn scale<F: Float>(x: &mut [F], s: F) {
    x.par_chunks_mut(ELEMS_PER_TASK).for_each(|x| {
        for v in x {
            *v = *v * s;
        }
    });
}

/// Sum of squares in f64, over fixed chunks summed in order (deterministic).
pub(crate) fn sum_squares<F: Float>(x: &[F]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(ELEMS_PER_TASK)
        .map(|c| {
            c.iter()
                .map(|&v| {
                    let v = v.to_f64();
                    v * v
                })
                .sum::<f64>()
        })
        .collect();
    partials.iter().sum()
}

/// Sum in f64, deterministic like `sum_squares`.
pub(crate) fn sum<F: Float>(x: &[F]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(ELEMS_PER_TASK).map(|c| c.iter().map(|&v| v.to_f64()).sum::<f64>()).collect();
    partials.iter().sum()
}
