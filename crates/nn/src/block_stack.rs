//! The activations of a stack of transformer blocks, and activation
//! recomputation: a block whose activations are not kept saves only its
//! output (the next block's input) in the forward pass, and its backward
//! first runs its forward again, from its saved input, into one workspace
//! that every such block shares. The recomputed forward is the same ops on
//! the same input, so the gradients are exactly those without recomputation;
//! the cost is one more forward pass of those blocks.

use trainer_core::{DType, Device, Result, Tensor, ops};

use crate::{Block, BlockActs, BlockGrads, BlockScratch};

/// Which blocks recompute their forward pass in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Every block keeps its activations.
    #[default]
    None,
    /// The first `layers` blocks (all of them when there are fewer) keep only
    /// their output and recompute the rest in the backward.
    Full { layers: usize },
}

impl Recompute {
    fn recomputes(self, block: usize) -> bool {
        match self {
            Recompute::None => false,
            Recompute::Full { layers } => block < layers,
        }
    }
}

/// What one block's forward keeps.
#[derive(Debug)]
enum Kept {
    All(Box<BlockActs>),
    /// (B, T, C): the block's output only.
    Output(Tensor),
}

/// Activations of a stack of blocks for micro-batches of (B, T), with the
/// scratch their forward and backward passes share.
#[derive(Debug)]
pub struct StackActs {
    kept: Vec<Kept>,
    /// One block's activations, refilled by each recomputing block's backward.
    work: Option<BlockActs>,
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
                Ok(if recompute.recomputes(i) {
                    Kept::Output(Tensor::zeros([b, t, c], dtype, device)?)
                } else {
                    Kept::All(Box::new(blk.new_acts(b, t, dtype, device)?))
                })
            })
            .collect::<Result<_>>()?;
        let work = match blocks.first() {
            Some(first) if recompute.recomputes(0) => Some(first.new_acts(b, t, dtype, device)?),
            _ => None,
        };
        Ok(StackActs {
            kept,
            work,
            grads: BlockGrads::new(b, t, c, 4 * c, dtype, device)?,
            scratch: BlockScratch::new(b, t, c, dtype, device)?,
        })
    }

    /// Block `i`'s output.
    fn out(&self, i: usize) -> &Tensor {
        match &self.kept[i] {
            Kept::All(a) => &a.out,
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
            Some(Kept::All(a)) => &a.out,
            Some(Kept::Output(out)) => out,
        }
    }

    /// x (B, T, C) through every block.
    pub fn forward(&mut self, blocks: &[Block], x: &Tensor) -> Result<()> {
        let StackActs { kept, work, scratch, .. } = self;
        for (i, block) in blocks.iter().enumerate() {
            let (before, rest) = kept.split_at_mut(i);
            let input = Self::input(before, x, i);
            match &mut rest[0] {
                Kept::All(a) => block.forward(input, a, scratch)?,
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
        let StackActs { kept, work, grads, scratch } = self;
        let (before, rest) = kept.split_at_mut(i);
        let input = Self::input(before, x, i);
        match &mut rest[0] {
            Kept::All(a) => block.backward(dresid, input, a, grads),
            Kept::Output(_) => {
                let w = work.as_mut().ok_or_else(missing_work)?;
                block.forward(input, w, scratch)?;
                block.backward(dresid, input, w, grads)
            }
        }
    }
}

fn missing_work() -> trainer_core::Error {
    trainer_core::Error::Shape { op: "block recompute", msg: "no recompute workspace was allocated".into() }
}
