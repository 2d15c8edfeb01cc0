use std::ops::Range;
use std::path::{Path, PathBuf};

use trainer_comm::{ProcessGroup, ReduceOp};
use trainer_data::{Loader, LoaderPosition};
use trainer_models::{Acts, Model};

use crate::Result;
use crate::checkpoint;
use crate::config::Config;
use crate::format::MODEL_FILE;
use crate::trainer::{Split, compute_dtype, open_device, open_loader};

#[derive(Debug, Clone, Copy)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    /// A classifier's top-1 and top-5 accuracy (fractions of the samples).
    pub accuracy: Option<Accuracy>,
    pub batches: usize,
    /// Sequences (or images) evaluated.
    pub samples: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

/// Mean loss over the first `batches` validation batches (always the same ones).
pub fn evaluate(model: &dyn Model, acts: &mut Acts, loader: &mut dyn Loader, batches: usize) -> Result<EvalReport> {
    evaluate_in(model, acts, loader, batches, &ProcessGroup::single("dp"))
}

/// The batches of `0..n` that rank `rank` of `size` evaluates: a contiguous
/// block, the blocks in rank order and their sizes differing by at most one
/// (ranks past `n` get none).
pub(crate) fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    n * rank / size..n * (rank + 1) / size
}

/// [`evaluate`] split over the data-parallel ranks of `group`: each runs its
/// share of the same first `batches` validation batches, and the sums of the
/// batches' losses and their count are added over the group, so the result is
/// the mean over all of them, as one process computes it up to the order of
/// the sums. `loader` must be the whole validation set (rank 0 of 1) on every rank.
pub fn evaluate_in(
    model: &dyn Model,
    acts: &mut Acts,
    loader: &mut dyn Loader,
    batches: usize,
    group: &ProcessGroup,
) -> Result<EvalReport> {
    let n = batches.min(loader.batches_per_epoch());
    let mut batch = loader.new_batch();
    let mine = share(n, group.rank(), group.size());
    // Unshuffled, window i of the epoch is validation batch i.
    loader.seek(LoaderPosition { epoch: 0, index: mine.start });
    // Loss sum, batches, top-1 and top-5 hits, and whether the model counts hits.
    let mut totals = [0.0; 5];
    for _ in mine.clone() {
        loader.next_batch(&mut batch);
        let e = model.evaluate(acts, &batch)?;
        totals[0] += e.loss;
        totals[1] += 1.0;
        if let Some(h) = e.hits {
            totals[2] += h.top1 as f64;
            totals[3] += h.top5 as f64;
            totals[4] = 1.0;
        }
    }
    // A rank with no batches does not know whether the model counts hits: Max over the flag.
    let mut flag = [totals[4]];
    group.all_reduce_host(&mut flag, ReduceOp::Max)?;
    let mut sums = [totals[0], totals[1], totals[2], totals[3]];
    group.all_reduce_host(&mut sums, ReduceOp::Sum)?;
    // Every batch has the same number of samples, so the mean of the batch means is the sample mean.
    let loss = sums[0] / sums[1];
    let samples = n * batch.samples();
    let accuracy = (flag[0] > 0.0).then(|| Accuracy { top1: sums[2] / samples as f64, top5: sums[3] / samples as f64 });
    Ok(EvalReport { loss, perplexity: loss.exp(), accuracy, batches: n, samples })
}

/// `trainer eval`: the model in `weights` (its shape comes from the file) on the
/// config's validation data.
pub fn evaluate_weights(cfg: &Config, weights: &Path) -> Result<EvalReport> {
    let device = open_device(cfg)?;
    let model = trainer_models::from_weights(weights, compute_dtype(cfg), &device)?;
    let pattern =
        cfg.data.val.as_deref().ok_or_else(|| cfg.error("data.val is not set: evaluation needs validation shards"))?;
    let mut loader = open_loader(cfg, Split::Val, pattern, model.input(), (0, 1))?;
    let mut acts = model.new_acts(&loader.new_batch())?;
    evaluate(model.as_ref(), &mut acts, loader.as_mut(), cfg.eval.batches)
}

/// `trainer eval --checkpoint`: the model of a checkpoint directory, or of the
/// newest complete one in a directory of checkpoints (newer ones that do not
/// check out are skipped with a warning on stderr). Returns the checkpoint used.
pub fn evaluate_checkpoint(cfg: &Config, path: &Path) -> Result<(EvalReport, PathBuf)> {
    let only_model = |f: &checkpoint::FileEntry| f.name == MODEL_FILE;
    let dir = checkpoint::resolve(path, &only_model, &|w| eprintln!("warning: {w}"))?.dir;
    Ok((evaluate_weights(cfg, &dir.join(MODEL_FILE))?, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_the_batches_in_order_whatever_the_ranks() {
        assert_eq!((0..2).map(|r| share(7, r, 2)).collect::<Vec<_>>(), vec![0..3, 3..7]);
        assert_eq!((0..4).map(|r| share(7, r, 4)).collect::<Vec<_>>(), vec![0..1, 1..3, 3..5, 5..7]);
        // Fewer batches than ranks: some evaluate nothing.
        assert_eq!((0..4).map(|r| share(2, r, 4)).collect::<Vec<_>>(), vec![0..0, 0..1, 1..1, 1..2]);
        assert_eq!(share(5, 0, 1), 0..5);
        for n in 0..20 {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let s = share(n, r, size);
                    assert_eq!(s.start, next, "n={n} size={size}");
                    assert!(s.len() <= n.div_ceil(size) && s.len() >= n / size);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }
}
