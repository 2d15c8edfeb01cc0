//! Weight initialization: draws on the host, then fills the parameter.

use rand::Rng;
use rand_distr::{Distribution, Normal};
use trainer_core::{Device, Result, Tensor, ops};

use crate::Param;

/// Fills `rows` leading rows of `param` (all of it when `rows` is None) with
/// N(0, std^2) drawn from `rng`, the rest with zeros. f64 draws are rounded to the
/// parameter's dtype. Partial fills serve padded embedding rows, which stay zero.
pub fn normal(param: &mut Param, std: f64, rows: Option<usize>, rng: &mut impl Rng) -> Result<()> {
    let (total_rows, cols) = param.value.shape().as_rows_cols();
    let rows = rows.unwrap_or(total_rows).min(total_rows);
    let dist = Normal::new(0.0, std).unwrap_or_else(|_| unreachable!("std is finite and >= 0 by construction"));
    let mut v: Vec<f64> = (0..rows * cols).map(|_| dist.sample(rng)).collect();
    v.resize(total_rows * cols, 0.0);
    set_from_f64(&mut param.value, v)
}

/// Fills `param` with N(0, std^2) truncated to [-bound, bound] (redrawn until
/// inside). timm and DeiT initialize ViT weights with `trunc_normal_(std=.02)`,
/// whose bound is 2 in absolute terms (100 std: it never binds); callers pass
/// the bound they mean to match.
pub fn truncated_normal(param: &mut Param, std: f64, bound: f64, rng: &mut impl Rng) -> Result<()> {
    let dist = Normal::new(0.0, std).unwrap_or_else(|_| unreachable!("std is finite and >= 0 by construction"));
    let v: Vec<f64> = (0..param.value.numel())
        .map(|_| {
            loop {
                let x: f64 = dist.sample(rng);
                if x.abs() <= bound {
                    break x;
                }
            }
        })
        .collect();
    set_from_f64(&mut param.value, v)
}

/// Sets every element to `value` (LayerNorm gains, zero biases).
pub fn constant(param: &mut Param, value: f64) -> Result<()> {
    ops::fill(&mut param.value, value)
}

fn set_from_f64(t: &mut Tensor, v: Vec<f64>) -> Result<()> {
    let src = Tensor::from_vec(v, t.dims(), &Device::Cpu)?.to_dtype(t.dtype())?.to_device(&t.device())?;
    ops::copy(t, &src)
}
