use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The shape of a GPT model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Real vocabulary size (50257 for GPT-2's BPE).
    pub vocab_size: usize,
    /// Longest sequence the position embedding covers.
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
}

/// Named sizes: (name, n_layer, n_head, n_embd). The GPT-2 family uses
/// vocab 50257 and block size 1024; the small ones are for tests and laptops.
pub const PRESETS: &[(&str, usize, usize, usize)] = &[
    ("gpt2-124m", 12, 12, 768),
    ("gpt2-350m", 24, 16, 1024),
    ("gpt2-774m", 36, 20, 1280),
    ("gpt2-1.5b", 48, 25, 1600),
    // About 7.3M parameters (6.4M of them the tied embedding): trains on two CPU
    // cores in about a minute.
    ("tiny", 4, 4, 128),
    // About 0.1M parameters: fast unit and parity tests.
    ("test", 2, 4, 32),
];

impl GptConfig {
    /// A preset with GPT-2's vocabulary and block size.
    pub fn preset(name: &str) -> Option<Self> {
        PRESETS.iter().find(|p| p.0 == name).map(|&(_, n_layer, n_head, n_embd)| GptConfig {
            vocab_size: 50257,
            block_size: 1024,
            n_layer,
            n_head,
            n_embd,
        })
    }

    /// The vocabulary rounded up to a multiple of 128: GEMMs over it tile evenly.
    /// Padded rows of the embedding are never looked up and never receive a
    /// gradient (the loss ignores padded logits), so they stay zero.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size.div_ceil(128) * 128
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                return err(format!("model.{k} must be at least 1"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return err(format!("model.n_embd = {} must be divisible by model.n_head = {}", self.n_embd, self.n_head));
        }
        if self.vocab_size > u32::MAX as usize {
            return err(format!("model.vocab_size = {} exceeds the u32 token range", self.vocab_size));
        }
        Ok(())
    }

    /// Parameter count, counting the padded embedding rows and the tied head once.
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        let per_block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c);
        self.padded_vocab_size() * c + self.block_size * c + self.n_layer * per_block + 2 * c
    }

    /// Training FLOPs per token at sequence length t, PaLM's count as the peer
    /// benchmark (../shared/bench/torch_gpt_bench.py) uses it for MFU:
    /// 6N + 12 L C T, with N the parameters without the position table (a
    /// lookup) but with the tied LM head. (It counts causal attention in full.)
    pub fn flops_per_token(&self, t: usize) -> f64 {
        let n = (self.num_params() - self.block_size * self.n_embd) as f64;
        6.0 * n + 12.0 * (self.n_layer * self.n_embd * t) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_the_known_parameter_count() {
        let c = GptConfig::preset("gpt2-124m").unwrap();
        assert_eq!(c.padded_vocab_size(), 50304);
        // 124,439,808 with the real vocabulary (the published count) plus 47 padded rows.
        assert_eq!(c.num_params() - 47 * 768, 124_439_808);
        c.validate().unwrap();
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = GptConfig::preset("test").unwrap();
        c.n_head = 5;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("model.n_embd") && e.contains("model.n_head"), "{e}");
    }
}
