//! GPT-2: learned token and position embeddings, pre-LN blocks with causal
//! multi-head attention and a GELU(tanh) MLP, a final LayerNorm, and an LM head
//! tied to the token embedding.

mod config;
mod model;

pub use config::{GptConfig, PRESETS};
pub use model::{Gpt, GptActs, GradsReady};
