use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Module, Param};

/// y = x W^T + b, with W (out, in) as in PyTorch's nn.Linear.
#[derive(Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
}

impl Linear {
    pub fn new(name: &str, inp: usize, out: usize, bias: bool, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Linear {
            weight: Param::zeros(format!("{name}.weight"), &[out, inp], dtype, device)?,
            bias: if bias { Some(Param::zeros(format!("{name}.bias"), &[out], dtype, device)?) } else { None },
        })
    }

    /// out (N, out) = inp (N, in) @ W^T + b.
    pub fn forward(&self, out: &mut Tensor, inp: &Tensor) -> Result<()> {
        ops::linear_forward(out, inp, &self.weight.value, self.bias.as_ref().map(|b| &b.value))
    }

    /// dinp (N, in) overwritten; dW and db accumulate.
    pub fn backward(&mut self, dinp: &mut Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        const OP: &str = "linear backward";
        let dbias = self.bias.as_mut().map(|b| b.grad_mut(OP)).transpose()?;
        let (weight, dweight) = self.weight.value_and_grad(OP)?;
        ops::linear_backward(dinp, dweight, dbias, dout, inp, weight)
    }

    /// dW and db accumulate; no input gradient (the input is data, not an activation).
    pub fn backward_params(&mut self, dout: &Tensor, inp: &Tensor) -> Result<()> {
        const OP: &str = "linear backward";
        let dbias = self.bias.as_mut().map(|b| b.grad_mut(OP)).transpose()?;
        ops::linear_param_grads(self.weight.grad_mut(OP)?, dbias, dout, inp)
    }
}

impl Module for Linear {
    fn params(&self) -> Vec<&Param> {
        std::iter::once(&self.weight).chain(&self.bias).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        std::iter::once(&mut self.weight).chain(&mut self.bias).collect()
    }
}
