use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Linear, Module, Param};

/// The transformer MLP: (C) -> (4C) -> GELU(tanh) -> (C).
#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

/// Saved by the forward: only the pre-activation. The activation GELU(fc) is
/// recomputed in the backward (as llm.c does): one elementwise pass per layer
/// instead of keeping a (B, T, 4C) tensor per layer, the largest activation
/// of a block (1.2 GB for GPT-2 124M at B=16, T=1024, bf16).
#[derive(Debug)]
pub struct MlpActs {
    /// (B, T, 4C)
    pub fc: Tensor,
}

impl MlpActs {
    pub fn new(b: usize, t: usize, hidden: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(MlpActs { fc: Tensor::zeros([b, t, hidden], dtype, device)? })
    }
}

impl Mlp {
    pub fn new(name: &str, c: usize, hidden: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Mlp {
            c_fc: Linear::new(&format!("{name}.c_fc"), c, hidden, true, dtype, device)?,
            c_proj: Linear::new(&format!("{name}.c_proj"), hidden, c, true, dtype, device)?,
        })
    }

    /// `gelu` (B, T, 4C) is scratch, shared by every layer.
    pub fn forward(&self, out: &mut Tensor, inp: &Tensor, acts: &mut MlpActs, gelu: &mut Tensor) -> Result<()> {
        self.c_fc.forward(&mut acts.fc, inp)?;
        ops::gelu_forward(gelu, &acts.fc)?;
        self.c_proj.forward(out, gelu)
    }

    /// dinp (B, T, C) overwritten; `dgelu` and `dfc` (B, T, 4C) are scratch.
    pub fn backward(
        &mut self,
        dinp: &mut Tensor,
        dout: &Tensor,
        inp: &Tensor,
        acts: &MlpActs,
        dgelu: &mut Tensor,
        dfc: &mut Tensor,
    ) -> Result<()> {
        // dfc first holds the recomputed GELU(fc), c_proj's input, then the gradient.
        ops::gelu_forward(dfc, &acts.fc)?;
        self.c_proj.backward(dgelu, dout, dfc)?;
        ops::gelu_backward(dfc, &acts.fc, dgelu)?;
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
