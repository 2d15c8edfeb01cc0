use std::path::{Path, PathBuf};

use trainer_data::BatchLoader;
use trainer_models::gpt::{Gpt, GptActs};

use crate::Result;
use crate::checkpoint;
use crate::config::Config;
use crate::state::MODEL_FILE;
use crate::trainer::{compute_dtype, open_device, open_loader};

#[derive(Debug, Clone, Copy)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    pub batches: usize,
    pub tokens: usize,
}

/// Mean loss over the first `batches` validation batches (always the same ones).
pub fn evaluate(model: &Gpt, acts: &mut GptActs, loader: &mut BatchLoader, batches: usize) -> Result<EvalReport> {
    let n = batches.min(loader.batches_per_epoch());
    let span = acts.b * acts.t;
    let (mut x, mut y) = (vec![0u32; span], vec![0u32; span]);
    loader.reset();
    let mut sum = 0.0;
    for _ in 0..n {
        loader.next_batch(&mut x, &mut y);
        sum += model.forward(acts, &x, Some(&y))?.unwrap_or(f64::NAN);
    }
    let loss = sum / n as f64;
    Ok(EvalReport { loss, perplexity: loss.exp(), batches: n, tokens: n * span })
}

/// `trainer eval`: the model in `weights` (its shape comes from the file) on the
/// config's validation data.
pub fn evaluate_weights(cfg: &Config, weights: &Path) -> Result<EvalReport> {
    let device = open_device(cfg)?;
    let gpt = Gpt::config_from_weights(weights)?;
    let mut model = Gpt::new(gpt, compute_dtype(cfg), &device)?;
    model.load_weights(weights)?;
    let pattern =
        cfg.data.val.as_deref().ok_or_else(|| cfg.error("data.val is not set: evaluation needs validation shards"))?;
    let (b, t) = (cfg.training.micro_batch_size, cfg.training.seq_len);
    let mut loader =
        open_loader("data.val", pattern, model.config.vocab_size, (b, t), cfg.training.seed, false, (0, 1))?;
    let mut acts = model.new_acts(b, t)?;
    evaluate(&model, &mut acts, &mut loader, cfg.eval.batches)
}

/// `trainer eval --checkpoint`: the model of a checkpoint directory, or of the
/// newest complete one in a directory of checkpoints (newer ones that do not
/// check out are skipped with a warning on stderr). Returns the checkpoint used.
pub fn evaluate_checkpoint(cfg: &Config, path: &Path) -> Result<(EvalReport, PathBuf)> {
    let only_model = |f: &checkpoint::FileEntry| f.name == MODEL_FILE;
    let dir = checkpoint::resolve(path, &only_model, &|w| eprintln!("warning: {w}"))?.dir;
    Ok((evaluate_weights(cfg, &dir.join(MODEL_FILE))?, dir))
}
