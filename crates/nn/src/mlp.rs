use trainer_core::ops::{self, Gelu};
use trainer_core::{DType, Device, Result, Tensor};

use crate::{Linear, Module, Param};

/// The transformer MLP: (C) -> (4C) -> GELU -> (C).
#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    /// GPT-2's tanh form or ViT's exact one.
    pub gelu: Gelu,
}

/// Saved by the forward: the pre-activation (for GELU's backward) and the
/// activation (c_proj's input, for its weight gradient). Recomputing the
/// activation in the backward instead (as llm.c does) saves a (B, T, 4C)
/// tensor per layer (1.2 GB for GPT-2 124M at B=16, T=1024, bf16) but costs an
/// elementwise pass per layer: 0.6 ms of a 39 ms step on an H200, while our
/// peak memory stayed below PyTorch's either way (benches/RESULTS.md).
#[derive(Debug)]
pub struct MlpActs {
    /// (B, T, 4C)
    pub fc: Tensor,
    /// (B, T, 4C): GELU(fc).
    pub gelu: Tensor,
}

impl MlpActs {
    pub fn new(b: usize, t: usize, hidden: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(MlpActs {
            fc: Tensor::zeros([b, t, hidden], dtype, device)?,
            gelu: Tensor::zeros([b, t, hidden], dtype, device)?,
        })
    }
}

impl Mlp {
    pub fn new(name: &str, c: usize, hidden: usize, gelu: Gelu, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Mlp {
            c_fc: Linear::new(&format!("{name}.c_fc"), c, hidden, true, dtype, device)?,
            c_proj: Linear::new(&format!("{name}.c_proj"), hidden, c, true, dtype, device)?,
            gelu,
        })
    }

    pub fn forward(&self, out: &mut Tensor, inp: &Tensor, acts: &mut MlpActs) -> Result<()> {
        let fc_bias = self.c_fc.bias.as_ref().map(|b| &b.value);
        ops::linear_gelu_forward(&mut acts.gelu, &mut acts.fc, inp, &self.c_fc.weight.value, fc_bias, self.gelu)?;
        self.c_proj.forward(out, &acts.gelu)
    }

    /// dinp (B, T, C) overwritten; `dgelu` and `dfc` (B, T, 4C) are scratch
    /// (`dgelu` unused where the GELU backward is fused into c_proj's GEMM).
    pub fn backward(
        &mut self,
        dinp: &mut Tensor,
        dout: &Tensor,
        inp: &Tensor,
        acts: &MlpActs,
        dgelu: &mut Tensor,
        dfc: &mut Tensor,
    ) -> Result<()> {
        const OP: &str = "MLP projection backward";
        let proj = &mut self.c_proj;
        let dbias = proj.bias.as_mut().map(|b| b.grad_mut(OP)).transpose()?;
        let (weight, dweight) = proj.weight.value_and_grad(OP)?;
        ops::linear_backward_gelu(dfc, dweight, dbias, dout, &acts.gelu, &acts.fc, weight, dgelu, self.gelu)?;
        self.c_fc.backward(dinp, dfc, inp)
    }
}

impl Module for Mlp {
    fn params(&self) -> Vec<&Param> {
        let mut p = self.c_fc.params();
        p.extend(self.c_proj.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = self.c_fc.params_mut();
        p.extend(self.c_proj.params_mut());
        p
    }
}
