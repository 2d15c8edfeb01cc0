//! Layers with explicit forward and backward passes, written the way llm.c and
//! Megatron write them, plus the optimizer and the learning-rate schedule.
//!
//! Conventions (every layer follows them; the core ops document the same):
//! - A layer owns its parameters and their gradients ([`Param`]).
//! - `forward` reads its input and writes activations into a per-layer
//!   activation struct allocated once for a (B, T) shape; `backward` reads them.
//! - Parameter gradients accumulate (`+=`): gradient accumulation is free.
//!   Activation gradients overwrite, except the residual stream's, which flows
//!   through a block in place (see [`Block::backward`]).
//! - Shapes are given in comments as (B, T, C) with C = n_embd.

mod attention;
mod block;
mod block_stack;
mod flat;
pub mod init;
mod layernorm;
mod linear;
mod mlp;
mod optim;
mod param;
mod schedule;
pub mod tensor_parallel;

pub use attention::{AttentionActs, SelfAttention};
pub use block::{Block, BlockActs, BlockGrads, BlockKind, BlockScratch};
pub use block_stack::{Recompute, StackActs};
pub use flat::{FlatEntry, FlatLayout, FlatPiece};
pub use layernorm::{LayerNorm, LayerNormStats};
pub use linear::Linear;
pub use mlp::{Mlp, MlpActs};
pub use optim::{AdamW, AdamWConfig, Placement, clip_coefficient, global_grad_norm};
pub use param::{Module, Param, ParamId, number_params, trainable, trainable_mut};
pub use schedule::{Decay, LrSchedule};
