//! The activations of a stack of transformer blocks, and activation
//! recomputation, in two degrees (in the spirit of Korthikanti et al. 2022):
//! - full: a block saves only its output (the next block's input) in the
//!   forward pass, and its backward first runs its forward again, from its
//!   saved input, into one workspace that every such block shares: the
//!   activation memory of one block, for one more forward pass;
//! - selective: a block keeps what is expensive to recompute (the GEMM and
//!   attention outputs, the residual stream) and drops the cheap,
//!   memory-heavy parts (both LayerNorm outputs and the GELU output, 6 of
//!   the 16 (B, T, C)-sized tensors it holds), which its backward
//!   recomputes first into buffers every such block shares.
//!
//! Recomputation runs the same ops on the same inputs, so on the CPU the
//! gradients are exactly those without it. (On CUDA the bf16 forward fuses
//! the residual add into the second LayerNorm and the GELU into its GEMM;
//! the selective recomputation runs them unfused, equal within bf16 rounding.)

use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Block, BlockActs, BlockGrads, BlockScratch};

/// Which blocks recompute what in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Every block keeps its activations.
    #[default]
    None,
    /// The first `layers` blocks (all of them when there are fewer) keep
    /// everything but their LayerNorm and GELU outputs.
    Selective { layers: usize },
    /// The first `layers` blocks keep only their output.
    Full { layers: usize },
}

impl Recompute {
    fn selective(self, block: usize) -> bool {
        matches!(self, Recompute::Selective { layers } if block < layers)
    }

    fn full(self, block: usize) -> bool {
        matches!(self, Recompute::Full { layers } if block < layers)
    }
}

/// What one block's forward keeps.
#[derive(Debug)]
enum Kept {
    All(Box<BlockActs>),
    /// Everything but ln1, ln2 and the GELU output (empty tensors here, the
    /// shared ones lent in for the block's forward and backward).
    Selective(Box<BlockActs>),
    /// (B, T, C): the block's output only.
    Output(Tensor),
}

/// The tensors selective recomputation drops, shared by the blocks that drop them.
#[derive(Debug)]
struct Cheap {
    ln1: Tensor,
    ln2: Tensor,
    gelu: Tensor,
}

impl Cheap {
    /// Swaps these buffers with a block's (lending them, or taking them back).
    fn swap(&mut self, acts: &mut BlockActs) {
        std::mem::swap(&mut self.ln1, &mut acts.ln1);
        std::mem::swap(&mut self.ln2, &mut acts.ln2);
        std::mem::swap(&mut self.gelu, &mut acts.mlp.gelu);
    }
}

/// Activations of a stack of blocks for micro-batches of (B, T), with the
/// scratch their forward and backward passes share.
#[derive(Debug)]
pub struct StackActs {
    kept: Vec<Kept>,
    /// One block's activations, refilled by each fully recomputing block's backward.
    work: Option<BlockActs>,
    /// The dropped tensors of the selectively recomputing blocks.
    cheap: Option<Cheap>,
    pub grads: BlockGrads,
    pub scratch: BlockScratch,
}

impl StackActs {
    pub fn new(
        blocks: &[Block],
        (b, t): (usize, usize),
        recompute: Recompute,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = blocks.first().map_or(0, |blk| blk.ln_1.weight.value.numel());
        let kept = blocks
            .iter()
            .enumerate()
            .map(|(i, blk)| {
                Ok(if recompute.full(i) {
                    Kept::Output(Tensor::zeros([b, t, c], dtype, device)?)
                } else if recompute.selective(i) {
                    let mut acts = blk.new_acts(b, t, dtype, device)?;
                    Cheap { ln1: empty(dtype, device)?, ln2: empty(dtype, device)?, gelu: empty(dtype, device)? }
                        .swap(&mut acts);
                    Kept::Selective(Box::new(acts))
                } else {
                    Kept::All(Box::new(blk.new_acts(b, t, dtype, device)?))
                })
            })
            .collect::<Result<_>>()?;
        let work = match blocks.first() {
            Some(first) if recompute.full(0) => Some(first.new_acts(b, t, dtype, device)?),
            _ => None,
        };
        let cheap = match blocks.first() {
            Some(_) if recompute.selective(0) => Some(Cheap {
                ln1: Tensor::zeros([b, t, c], dtype, device)?,
                ln2: Tensor::zeros([b, t, c], dtype, device)?,
                gelu: Tensor::zeros([b, t, 4 * c], dtype, device)?,
            }),
            _ => None,
        };
        Ok(StackActs {
            kept,
            work,
            cheap,
            grads: BlockGrads::new(b, t, c, 4 * c, dtype, device)?,
            scratch: BlockScratch::new(b, t, c, dtype, device)?,
        })
    }

    /// Block `i`'s output.
    fn out(&self, i: usize) -> &Tensor {
        match &self.kept[i] {
            Kept::All(a) | Kept::Selective(a) => &a.out,
            Kept::Output(out) => out,
        }
    }

    /// The stack's output: the last block's, or `x` when there are no blocks.
    pub fn output<'a>(&'a self, x: &'a Tensor) -> &'a Tensor {
        if self.kept.is_empty() { x } else { self.out(self.kept.len() - 1) }
    }

    /// Block `i`'s input: the previous block's output, or the stack's input `x`.
    fn input<'a>(kept: &'a [Kept], x: &'a Tensor, i: usize) -> &'a Tensor {
        match i.checked_sub(1).map(|p| &kept[p]) {
            None => x,
            Some(Kept::All(a) | Kept::Selective(a)) => &a.out,
            Some(Kept::Output(out)) => out,
        }
    }

    /// x (B, T, C) through every block.
    pub fn forward(&mut self, blocks: &[Block], x: &Tensor) -> Result<()> {
        let StackActs { kept, work, cheap, scratch, .. } = self;
        for (i, block) in blocks.iter().enumerate() {
            let (before, rest) = kept.split_at_mut(i);
            let input = Self::input(before, x, i);
            match &mut rest[0] {
                Kept::All(a) => block.forward(input, a, scratch)?,
                Kept::Selective(a) => {
                    let cheap = cheap.as_mut().ok_or_else(missing_work)?;
                    cheap.swap(a);
                    let done = block.forward(input, a, scratch);
                    cheap.swap(a);
                    done?;
                }
                Kept::Output(out) => {
                    let w = work.as_mut().ok_or_else(missing_work)?;
                    block.forward(input, w, scratch)?;
                    ops::copy(out, &w.out)?;
                }
            }
        }
        Ok(())
    }

    /// Block `i`'s backward (recomputing its forward first where it kept
    /// only its output): `dresid` holds dL/d(its output) on entry and
    /// dL/d(its input) on return. Call for the blocks from the last to the first.
    pub fn backward_block(&mut self, i: usize, block: &mut Block, x: &Tensor, dresid: &mut Tensor) -> Result<()> {
        let StackActs { kept, work, cheap, grads, scratch } = self;
        let (before, rest) = kept.split_at_mut(i);
        let input = Self::input(before, x, i);
        match &mut rest[0] {
            Kept::All(a) => block.backward(dresid, input, a, grads),
            Kept::Selective(a) => {
                let cheap = cheap.as_mut().ok_or_else(missing_work)?;
                cheap.swap(a);
                let done = block.recompute_cheap(input, a).and_then(|()| block.backward(dresid, input, a, grads));
                cheap.swap(a);
                done
            }
            Kept::Output(_) => {
                let w = work.as_mut().ok_or_else(missing_work)?;
                block.forward(input, w, scratch)?;
                block.backward(dresid, input, w, grads)
            }
        }
    }
}

/// A tensor holding nothing, in the place of a dropped one.
fn empty(dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros([0], dtype, device)
}

fn missing_work() -> trainer_core::Error {
    trainer_core::Error::Shape { op: "block recompute", msg: "no recompute workspace was allocated".into() }
}
