//! GPT-2: learned token and position embeddings, pre-LN blocks with causal
//! multi-head attention and a GELU(tanh) MLP, a final LayerNorm, and an LM head
//! tied to the token embedding. `hf` converts to and from transformers'
//! GPT2LMHeadModel directories; `generate` decodes with a KV cache and samples.

mod config;
mod generate;
pub mod hf;
mod model;

pub use config::{GptConfig, PRESETS};
pub use generate::{Decoder, Generation, Sampling, StopReason, generate, sample};
pub use model::{CONFIG_KEY, Gpt, GptActs, read_weights};
