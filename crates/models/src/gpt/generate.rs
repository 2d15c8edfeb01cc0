//! Text generation: incremental decoding with a KV cache, and sampling with
//! temperature, top-k and top-p (greedy at temperature 0).
//!
//! The cache keeps, per layer, every position's q | k | v row exactly as the
//! attention's qkv projection produced it, so appending a step is one row copy
//! and the prefix is never recomputed: each step runs the blocks over the new
//! tokens only and attends over the cache ([`ops::attention_cached`]). Logits
//! are computed for the last position only. Batch size 1.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::{DType, Tensor, ops};
use trainer_nn::{LayerNormStats, MlpActs};

use super::Gpt;
use crate::{Error, Result};

fn gen_err(msg: impl Into<String>) -> Error {
    Error::Generation(msg.into())
}

/// Buffers for one step of `t` new tokens.
#[derive(Debug)]
struct Step {
    t: usize,
    /// (1, t) token ids.
    tokens: Tensor,
    /// (t, C): the position embeddings of the new positions.
    pos: Tensor,
    /// (1, t, C): the residual stream.
    x: Tensor,
    /// (1, t, C) and its stats: a LayerNorm's output.
    ln: Tensor,
    stats: LayerNormStats,
    /// (1, t, 3C)
    qkv: Tensor,
    /// (1, t, C): attention output before the projection.
    y: Tensor,
    /// (1, t, C): a branch's output before it joins the residual stream.
    branch: Tensor,
    mlp: MlpActs,
}

impl Step {
    fn new(model: &Gpt, t: usize) -> Result<Self> {
        let (c, dt, dev) = (model.config.n_embd, model.dtype(), model.device());
        Ok(Step {
            t,
            tokens: Tensor::zeros([1, t], DType::U32, dev)?,
            pos: Tensor::zeros([t, c], dt, dev)?,
            x: Tensor::zeros([1, t, c], dt, dev)?,
            ln: Tensor::zeros([1, t, c], dt, dev)?,
            stats: LayerNormStats::new(t, dt, dev)?,
            qkv: Tensor::zeros([1, t, 3 * c], dt, dev)?,
            y: Tensor::zeros([1, t, c], dt, dev)?,
            branch: Tensor::zeros([1, t, c], dt, dev)?,
            mlp: MlpActs::new(1, t, 4 * c, dt, dev)?,
        })
    }
}

/// Incremental decoding of one sequence: feed tokens (the prompt at once, then
/// one per step) and get the next-token logits after each feed.
#[derive(Debug)]
pub struct Decoder<'m> {
    model: &'m Gpt,
    /// Per layer (1, capacity, 3C): the q | k | v rows of every fed position.
    cache: Vec<Tensor>,
    capacity: usize,
    len: usize,
    step: Option<Step>,
    /// (1, C) twice, the final LayerNorm's stats for one row, and (1, Vp):
    /// the LM head over the last position.
    last: Tensor,
    last_ln: Tensor,
    last_stats: LayerNormStats,
    logits: Tensor,
}

impl<'m> Decoder<'m> {
    /// A decoder for sequences of up to `capacity` tokens (at most the model's
    /// block_size; the cache is allocated once for that many).
    pub fn new(model: &'m Gpt, capacity: usize) -> Result<Self> {
        let cfg = &model.config;
        if capacity == 0 || capacity > cfg.block_size {
            return Err(gen_err(format!(
                "a sequence of {capacity} tokens: must be between 1 and the model's block_size ({})",
                cfg.block_size
            )));
        }
        let (c, dt, dev) = (cfg.n_embd, model.dtype(), model.device());
        Ok(Decoder {
            model,
            cache: (0..cfg.n_layer)
                .map(|_| Tensor::zeros([1, capacity, 3 * c], dt, dev))
                .collect::<trainer_core::Result<_>>()?,
            capacity,
            len: 0,
            step: None,
            last: Tensor::zeros([1, c], dt, dev)?,
            last_ln: Tensor::zeros([1, c], dt, dev)?,
            last_stats: LayerNormStats::new(1, dt, dev)?,
            logits: Tensor::zeros([1, cfg.padded_vocab_size()], dt, dev)?,
        })
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Starts a new sequence (the cache is overwritten as it refills).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Appends `tokens` at positions len .. len + tokens.len() and returns the
    /// logits over the real vocabulary that follow the last of them.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f64>> {
        let model = self.model;
        let cfg = &model.config;
        let t = tokens.len();
        if t == 0 {
            return Err(gen_err("no tokens to feed"));
        }
        if self.len + t > self.capacity {
            return Err(gen_err(format!(
                "{} tokens exceed the decoder's capacity of {} (block_size {})",
                self.len + t,
                self.capacity,
                cfg.block_size
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(gen_err(format!(
                "token id {bad} is outside the model's vocabulary (vocab_size {})",
                cfg.vocab_size
            )));
        }
        let mut s = match self.step.take() {
            Some(s) if s.t == t => s,
            _ => Step::new(model, t)?,
        };
        let past = self.len;
        s.tokens.copy_from_slice(tokens)?;
        ops::copy_rows(&mut s.pos, 0, &model.wpe.value, past, t)?;
        ops::embedding_forward(&mut s.x, &s.tokens, &model.wte.value, &s.pos)?;
        // Block::forward, with the attention reading the cache.
        for (block, cache) in model.blocks.iter().zip(&mut self.cache) {
            block.ln_1.forward(&mut s.ln, &mut s.stats, &s.x)?;
            block.attn.c_attn.forward(&mut s.qkv, &s.ln)?;
            ops::copy_rows(cache, past, &s.qkv, 0, t)?;
            ops::attention_cached(&mut s.y, cache, past, block.attn.n_head)?;
            block.attn.c_proj.forward(&mut s.branch, &s.y)?;
            ops::add_assign(&mut s.x, &s.branch)?;
            block.ln_2.forward(&mut s.ln, &mut s.stats, &s.x)?;
            block.mlp.forward(&mut s.branch, &s.ln, &mut s.mlp)?;
            ops::add_assign(&mut s.x, &s.branch)?;
        }
        self.len += t;
        ops::copy_rows(&mut self.last, 0, &s.x, t - 1, 1)?;
        model.ln_f.forward(&mut self.last_ln, &mut self.last_stats, &self.last)?;
        ops::linear_forward(&mut self.logits, &self.last_ln, &model.wte.value, None)?;
        self.step = Some(s);
        let mut logits = self.logits.to_vec_f64()?;
        logits.truncate(cfg.vocab_size);
        Ok(logits)
    }
}

/// How the next token is chosen from the logits, in transformers' order:
/// temperature, then top-k, then top-p, then a draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the k most likely tokens (ties with the k-th kept); 0 keeps all.
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least top_p
    /// (nucleus sampling); 1 keeps all.
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    /// Errors name the option and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(gen_err(format!("temperature = {}: must be a finite number >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(gen_err(format!("top_p = {}: must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// The most likely token; the first of equal maxima, as torch.argmax.
fn argmax(logits: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| v > logits[b]) {
            best = Some(i);
        }
    }
    best
}

/// Chooses the next token from `logits` (the real vocabulary).
pub fn sample(logits: &[f64], s: &Sampling, rng: &mut ChaCha8Rng) -> Result<u32> {
    if logits.iter().any(|v| v.is_nan()) {
        return Err(gen_err("the model produced NaN logits"));
    }
    if s.temperature == 0.0 {
        return argmax(logits).map(|i| i as u32).ok_or_else(|| gen_err("no logits to choose from"));
    }
    let mut scores: Vec<f64> = logits.iter().map(|&l| l / s.temperature).collect();
    if s.top_k > 0 && s.top_k < scores.len() {
        let mut sorted = scores.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        for v in scores.iter_mut().filter(|v| **v < kth) {
            *v = f64::NEG_INFINITY;
        }
    }
    let mut probs = softmax(&scores).ok_or_else(|| gen_err("every logit is -inf or +inf"))?;
    if s.top_p < 1.0 {
        // transformers' rule: in ascending order of probability, drop tokens
        // while the running sum stays <= 1 - top_p; the most likely one stays.
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a)));
        let mut cum = 0.0;
        for &i in &order[..order.len() - 1] {
            cum += probs[i];
            if cum > 1.0 - s.top_p {
                break;
            }
            scores[i] = f64::NEG_INFINITY;
        }
        probs = softmax(&scores).ok_or_else(|| gen_err("every logit is -inf or +inf"))?;
    }
    let u: f64 = rng.random();
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p;
            last = i;
            if u < cum {
                return Ok(i as u32);
            }
        }
    }
    // u landed in the rounding gap above the total: the last kept token.
    Ok(last as u32)
}

/// Probabilities from scores (-inf allowed); None when no score is finite.
fn softmax(scores: &[f64]) -> Option<Vec<f64>> {
    let max = scores.iter().copied().filter(|v| v.is_finite()).fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let e: Vec<f64> = scores.iter().map(|&v| if v == f64::NEG_INFINITY { 0.0 } else { (v - max).exp() }).collect();
    let sum: f64 = e.iter().sum();
    Some(e.into_iter().map(|x| x / sum).collect())
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The end-of-text token was generated (it is the last generated token).
    EndOfText,
    /// max_new_tokens were generated.
    MaxTokens,
    /// Prompt plus generated tokens filled the model's block_size.
    BlockSize,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::EndOfText => "eot",
            StopReason::MaxTokens => "max_tokens",
            StopReason::BlockSize => "block_size",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens (the prompt not included).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Continues `prompt` by up to `max_new_tokens` tokens, stopping early at
/// `eot` or when the sequence fills the model's block_size. `on_token` sees
/// each token as it is chosen (for streaming output).
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    eot: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    sampling.validate()?;
    let block = model.config.block_size;
    if prompt.is_empty() {
        return Err(gen_err("the prompt is empty: generation needs at least one token"));
    }
    if prompt.len() > block {
        return Err(gen_err(format!(
            "the prompt has {} tokens, more than the model's block_size ({block})",
            prompt.len()
        )));
    }
    let mut tokens = Vec::new();
    if max_new_tokens == 0 {
        return Ok(Generation { tokens, stop: StopReason::MaxTokens });
    }
    if prompt.len() == block {
        return Ok(Generation { tokens, stop: StopReason::BlockSize });
    }
    // The last generated token is never fed, so the cache needs one row less.
    let capacity = (prompt.len() + max_new_tokens - 1).min(block);
    let mut decoder = Decoder::new(model, capacity)?;
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut logits = decoder.feed(prompt)?;
    loop {
        let next = sample(&logits, sampling, &mut rng)?;
        tokens.push(next);
        on_token(next);
        let stop = if Some(next) == eot {
            Some(StopReason::EndOfText)
        } else if tokens.len() == max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if prompt.len() + tokens.len() == block {
            Some(StopReason::BlockSize)
        } else {
            None
        };
        if let Some(stop) = stop {
            return Ok(Generation { tokens, stop });
        }
        logits = decoder.feed(&[next])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    const LOGITS: [f64; 6] = [1.0, 3.0, -2.0, 2.5, 3.0, 0.0];

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample(&LOGITS, &Sampling::greedy(), &mut rng()).unwrap(), 1);
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy_whatever_the_temperature() {
        let k1 = Sampling { temperature: 5.0, top_k: 1, top_p: 1.0, seed: 0 };
        let p = Sampling { temperature: 5.0, top_k: 0, top_p: 1e-9, seed: 0 };
        let logits = [0.1, 0.7, 0.3];
        let mut r = rng();
        for _ in 0..50 {
            assert_eq!(sample(&logits, &k1, &mut r).unwrap(), 1);
            assert_eq!(sample(&logits, &p, &mut r).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_keeps_ties_and_only_the_top() {
        // top_k = 2 keeps the 3.0s (ids 1 and 4); at a high temperature both appear.
        let s = Sampling { temperature: 100.0, top_k: 2, top_p: 1.0, seed: 0 };
        let mut seen = [0usize; 6];
        let mut r = rng();
        for _ in 0..400 {
            seen[sample(&LOGITS, &s, &mut r).unwrap() as usize] += 1;
        }
        assert!(seen[1] > 100 && seen[4] > 100, "{seen:?}");
        assert_eq!(seen[0] + seen[2] + seen[3] + seen[5], 0, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.75 keeps the first two
        // (0.8 >= 0.75), top_p = 0.85 the first three.
        let logits: Vec<f64> = [0.5f64, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        for (top_p, kept) in [(0.75, 2), (0.85, 3), (1.0, 4)] {
            let s = Sampling { temperature: 1.0, top_k: 0, top_p, seed: 0 };
            let mut seen = [false; 4];
            let mut r = rng();
            for _ in 0..2000 {
                seen[sample(&logits, &s, &mut r).unwrap() as usize] = true;
            }
            assert_eq!(seen.iter().filter(|&&x| x).count(), kept, "top_p {top_p}: {seen:?}");
            assert!(seen[..kept].iter().all(|&x| x), "top_p {top_p}: {seen:?}");
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits: Vec<f64> = [0.7f64, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let s = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 };
        let draw = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..3000).map(|_| sample(&logits, &s, &mut r).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let share = a.iter().filter(|&&t| t == 0).count() as f64 / a.len() as f64;
        assert!((share - 0.7).abs() < 0.05, "{share}");
    }

    #[test]
    fn bad_options_and_logits_are_errors() {
        let bad = [
            Sampling { temperature: -1.0, ..Sampling::greedy() },
            Sampling { temperature: f64::NAN, ..Sampling::greedy() },
            Sampling { top_p: 0.0, ..Sampling::greedy() },
            Sampling { top_p: 1.5, ..Sampling::greedy() },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(sample(&[1.0, f64::NAN], &Sampling::greedy(), &mut rng()).is_err());
    }
}
