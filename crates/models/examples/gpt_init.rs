//! Writes a freshly initialized GPT's weights (with its config as metadata) to a
//! safetensors file: the starting point of the PyTorch parity script.
//!
//! cargo run -p trainer-models --example gpt_init -- OUT VOCAB BLOCK N_LAYER N_HEAD N_EMBD SEED

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use trainer_core::{DType, Device};
use trainer_models::gpt::{Gpt, GptConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, nums @ ..] = args.as_slice() else { bail!("usage: gpt_init OUT VOCAB BLOCK N_LAYER N_HEAD N_EMBD SEED") };
    let nums: Vec<u64> =
        nums.iter().map(|s| s.parse().with_context(|| format!("not a number: {s}"))).collect::<Result<_>>()?;
    let [vocab, block, n_layer, n_head, n_embd, seed] = nums[..] else { bail!("expected 6 numbers after OUT") };
    let config = GptConfig {
        vocab_size: vocab as usize,
        block_size: block as usize,
        n_layer: n_layer as usize,
        n_head: n_head as usize,
        n_embd: n_embd as usize,
    };
    let mut model = Gpt::new(config, DType::F32, &Device::Cpu)?;
    model.init(seed)?;
    model.save_weights(&PathBuf::from(out))?;
    Ok(())
}
