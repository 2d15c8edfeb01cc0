//! The pre-LN transformer block shared by GPT and ViT:
//!   r = x + attn(ln_1(x));  out = r + mlp(ln_2(r)).

use trainer_core::ops::{self, Gelu};
use trainer_core::{DType, Device, Result, Tensor};

use crate::{AttentionActs, LayerNorm, LayerNormStats, Mlp, MlpActs, Module, Param, SelfAttention};

/// What differs between the blocks of the models that share [`Block`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockKind {
    /// Causal attention (GPT) or bidirectional (ViT).
    pub causal: bool,
    pub gelu: Gelu,
    /// LayerNorm epsilon: 1e-5 in GPT-2, 1e-12 in transformers' ViT, 1e-6 in timm's.
    pub ln_eps: f64,
}

impl BlockKind {
    pub const GPT2: BlockKind = BlockKind { causal: true, gelu: Gelu::Tanh, ln_eps: 1e-5 };
}

#[derive(Debug)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: SelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

/// Everything one block's forward saves, each (B, T, C) unless noted.
#[derive(Debug)]
pub struct BlockActs {
    pub ln1: Tensor,
    pub ln1_stats: LayerNormStats,
    pub attn: AttentionActs,
    /// r = x + attn(ln_1(x))
    pub resid_mid: Tensor,
    pub ln2: Tensor,
    pub ln2_stats: LayerNormStats,
    pub mlp: MlpActs,
    /// The block's output: r + mlp(ln_2(r)).
    pub out: Tensor,
}

/// Forward-pass scratch that no backward reads, so one instance serves every
/// block: the branch outputs before their residual add.
#[derive(Debug)]
pub struct BlockScratch {
    /// (B, T, C)
    pub branch: Tensor,
}

impl BlockScratch {
    pub fn new(b: usize, t: usize, c: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(BlockScratch { branch: Tensor::zeros([b, t, c], dtype, device)? })
    }
}

/// Scratch for activation gradients inside a block's backward. One instance
/// serves every block (they run one after another).
#[derive(Debug)]
pub struct BlockGrads {
    /// (B, T, C): gradient into a LayerNorm's output.
    pub dln: Tensor,
    /// (B, T, C): gradient into the attention output before projection.
    pub dy: Tensor,
    /// (B, T, 3C)
    pub dqkv: Tensor,
    /// (B, T, 4C), twice: into the GELU output and into the fc output.
    pub dgelu: Tensor,
    pub dfc: Tensor,
}

impl BlockGrads {
    pub fn new(b: usize, t: usize, c: usize, hidden: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(BlockGrads {
            dln: Tensor::zeros([b, t, c], dtype, device)?,
            dy: Tensor::zeros([b, t, c], dtype, device)?,
            dqkv: Tensor::zeros([b, t, 3 * c], dtype, device)?,
            dgelu: Tensor::zeros([b, t, hidden], dtype, device)?,
            dfc: Tensor::zeros([b, t, hidden], dtype, device)?,
        })
    }
}

impl Block {
    /// `name` prefixes parameter names, e.g. "transformer.h.3".
    pub fn new(name: &str, c: usize, n_head: usize, kind: BlockKind, dtype: DType, device: &Device) -> Result<Self> {
        let mut block = Block {
            ln_1: LayerNorm::new(&format!("{name}.ln_1"), c, dtype, device)?,
            attn: SelfAttention::new(&format!("{name}.attn"), c, n_head, kind.causal, dtype, device)?,
            ln_2: LayerNorm::new(&format!("{name}.ln_2"), c, dtype, device)?,
            mlp: Mlp::new(&format!("{name}.mlp"), c, 4 * c, kind.gelu, dtype, device)?,
        };
        block.ln_1.eps = kind.ln_eps;
        block.ln_2.eps = kind.ln_eps;
        Ok(block)
    }

    pub fn new_acts(&self, b: usize, t: usize, dtype: DType, device: &Device) -> Result<BlockActs> {
        let c = self.ln_1.weight.value.numel();
        let bt = |w| Tensor::zeros([b, t, w], dtype, device);
        Ok(BlockActs {
            ln1: bt(c)?,
            ln1_stats: LayerNormStats::new(b * t, dtype, device)?,
            attn: AttentionActs::new(b, t, c, self.attn.n_head, dtype, device)?,
            resid_mid: bt(c)?,
            ln2: bt(c)?,
            ln2_stats: LayerNormStats::new(b * t, dtype, device)?,
            mlp: MlpActs::new(b, t, 4 * c, dtype, device)?,
            out: bt(c)?,
        })
    }

    /// x (B, T, C) -> acts.out (B, T, C).
    pub fn forward(&self, x: &Tensor, acts: &mut BlockActs, scratch: &mut BlockScratch) -> Result<()> {
        self.ln_1.forward(&mut acts.ln1, &mut acts.ln1_stats, x)?;
        self.attn.forward(&mut scratch.branch, &acts.ln1, &mut acts.attn)?;
        self.ln_2.forward_residual(&mut acts.resid_mid, &mut acts.ln2, &mut acts.ln2_stats, x, &scratch.branch)?;
        self.mlp.forward(&mut scratch.branch, &acts.ln2, &mut acts.mlp)?;
        ops::add(&mut acts.out, &acts.resid_mid, &scratch.branch)
    }

    /// Recomputes what selective recomputation drops from `acts` (see
    /// `StackActs`): both LayerNorm outputs (and their statistics) and the
    /// GELU output, from the block's input `x` and the kept residual stream
    /// and MLP pre-activation.
    pub fn recompute_cheap(&self, x: &Tensor, acts: &mut BlockActs) -> Result<()> {
        self.ln_1.forward(&mut acts.ln1, &mut acts.ln1_stats, x)?;
        self.ln_2.forward(&mut acts.ln2, &mut acts.ln2_stats, &acts.resid_mid)?;
        ops::gelu_forward(&mut acts.mlp.gelu, &acts.mlp.fc, self.mlp.gelu)
    }

    /// The residual stream's gradient flows through in place: on entry `dresid`
    /// holds dL/d(out), on return dL/dx. Each branch's LayerNorm backward adds its
    /// contribution to it, which is exactly the residual connection's backward.
    pub fn backward(
        &mut self,
        dresid: &mut Tensor,
        x: &Tensor,
        acts: &mut BlockActs,
        g: &mut BlockGrads,
    ) -> Result<()> {
        // out = r + mlp(ln_2(r))
        self.mlp.backward(&mut g.dln, dresid, &acts.ln2, &acts.mlp, &mut g.dgelu, &mut g.dfc)?;
        self.ln_2.backward(dresid, &g.dln, &acts.resid_mid, &acts.ln2_stats)?;
        // r = x + attn(ln_1(x))
        self.attn.backward(&mut g.dln, dresid, &acts.ln1, &mut acts.attn, &mut g.dy, &mut g.dqkv)?;
        self.ln_1.backward(dresid, &g.dln, x, &acts.ln1_stats)
    }
}

impl Module for Block {
    fn params(&self) -> Vec<&Param> {
        let mut p = self.ln_1.params();
        p.extend(self.attn.params());
        p.extend(self.ln_2.params());
        p.extend(self.mlp.params());
        p
    }
    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut p = self.ln_1.params_mut();
        p.extend(self.attn.params_mut());
        p.extend(self.ln_2.params_mut());
        p.extend(self.mlp.params_mut());
        p
    }
}
