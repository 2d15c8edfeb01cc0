use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Linear, Module, Param};

/// Multi-head self-attention: a fused q|k|v projection, scaled dot-product
/// attention (causal for GPT, bidirectional for ViT), an output projection.
#[derive(Debug)]
pub struct SelfAttention {
    /// (C) -> (3C): q | k | v, head h at columns [h*hs, (h+1)*hs) of each third.
    pub c_attn: Linear,
    /// (C) -> (C).
    pub c_proj: Linear,
    pub n_head: usize,
    pub causal: bool,
}

/// Saved by the forward for the backward.
#[derive(Debug)]
pub struct AttentionActs {
    /// (B, T, 3C)
    pub qkv: Tensor,
    /// (B, T, C): attention output before the projection.
    pub y: Tensor,
    /// (B, n_head, T): log-sum-exp of each query's scores.
    pub lse: Tensor,
    /// (B, n_head, T): the backward's per-row sum(dout * out) (a workspace).
    pub delta: Tensor,
}

impl AttentionActs {
    pub fn new(b: usize, t: usize, c: usize, n_head: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(AttentionActs {
            qkv: Tensor::zeros([b, t, 3 * c], dtype, device)?,
            y: Tensor::zeros([b, t, c], dtype, device)?,
            lse: Tensor::zeros([b, n_head, t], dtype.stats_dtype(), device)?,
            delta: Tensor::zeros([b, n_head, t], dtype.stats_dtype(), device)?,
        })
    }
}

impl SelfAttention {
    pub fn new(name: &str, c: usize, n_head: usize, causal: bool, dtype: DType, device: &Device) -> Result<Self> {
        Ok(SelfAttention {
            c_attn: Linear::new(&format!("{name}.c_attn"), c, 3 * c, true, dtype, device)?,
            c_proj: Linear::new(&format!("{name}.c_proj"), c, c, true, dtype, device)?,
            n_head,
            causal,
        })
    }

    /// out (B, T, C) from inp (B, T, C).
    pub fn forward(&self, out: &mut Tensor, inp: &Tensor, acts: &mut AttentionActs) -> Result<()> {
        self.c_attn.forward(&mut acts.qkv, inp)?;
        ops::attention_forward(&mut acts.y, &mut acts.lse, &acts.qkv, self.n_head, self.causal)?;
        self.c_proj.forward(out, &acts.y)
    }

    /// dinp (B, T, C) overwritten. `dy` (B, T, C) and `dqkv` (B, T, 3C) are scratch.
    pub fn backward(
        &mut self,
        dinp: &mut Tensor,
        dout: &Tensor,
        inp: &Tensor,
        acts: &mut AttentionActs,
        dy: &mut Tensor,
        dqkv: &mut Tensor,
    ) -> Result<()> {
        self.c_proj.backward(dy, dout, &acts.y)?;
        ops::attention_backward(dqkv, &mut acts.delta, dy, &acts.qkv, &acts.y, &acts.lse, self.n_head, self.causal)?;
        self.c_attn.backward(dinp, dqkv, inp)
    }
}

impl Module for SelfAttention {
    fn params(&self) -> Vec<&Param> {
        let mut p = self.c_attn.params();
        p.extend(self.c_proj.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = self.c_attn.params_mut();
        p.extend(self.c_proj.params_mut());
        p
    }
}
