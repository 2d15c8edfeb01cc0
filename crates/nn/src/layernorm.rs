use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Module, Param};

/// LayerNorm over the last dimension with a gain and a bias (eps 1e-5, as GPT-2).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

/// What the forward saves per row for the backward: mean and 1/std, each (B*T).
#[derive(Debug)]
pub struct LayerNormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl LayerNormStats {
    /// `dtype` is the activations'; statistics use its `stats_dtype`.
    pub fn new(rows: usize, dtype: DType, device: &Device) -> Result<Self> {
        let dtype = dtype.stats_dtype();
        Ok(LayerNormStats { mean: Tensor::zeros([rows], dtype, device)?, rstd: Tensor::zeros([rows], dtype, device)? })
    }
}

impl LayerNorm {
    pub fn new(name: &str, c: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(LayerNorm {
            weight: Param::zeros(format!("{name}.weight"), &[c], dtype, device)?,
            bias: Param::zeros(format!("{name}.bias"), &[c], dtype, device)?,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, out: &mut Tensor, stats: &mut LayerNormStats, inp: &Tensor) -> Result<()> {
        ops::layernorm_forward(
            out,
            &mut stats.mean,
            &mut stats.rstd,
            inp,
            &self.weight.value,
            &self.bias.value,
            self.eps,
        )
    }

    /// resid = a + b (a residual connection), then out = LayerNorm(resid): one
    /// pass over the rows where the backend fuses them.
    pub fn forward_residual(
        &self,
        resid: &mut Tensor,
        out: &mut Tensor,
        stats: &mut LayerNormStats,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<()> {
        ops::residual_layernorm_forward(
            resid,
            out,
            &mut stats.mean,
            &mut stats.rstd,
            a,
            b,
            &self.weight.value,
            &self.bias.value,
            self.eps,
        )
    }

    /// dinp accumulates (it is the residual stream's gradient).
    pub fn backward(&mut self, dinp: &mut Tensor, dout: &Tensor, inp: &Tensor, stats: &LayerNormStats) -> Result<()> {
        const OP: &str = "layernorm backward";
        let dbias = self.bias.grad_mut(OP)?;
        let (weight, dweight) = self.weight.value_and_grad(OP)?;
        ops::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, &stats.mean, &stats.rstd)
    }
}

impl Module for LayerNorm {
    fn params(&self) -> Vec<&Param> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        vec![&mut self.weight, &mut self.bias]
    }
}
