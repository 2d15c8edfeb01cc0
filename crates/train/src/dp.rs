//! Data parallelism for the training loop: after the last micro-step's
//! backward, the gradients of every parameter are gathered into one flat
//! buffer (the optimizer's [`FlatLayout`]) and averaged over the data-parallel
//! group; then either every rank updates every parameter (ZeRO stage 0), or
//! each rank updates the parameters of its own shard of the layout and the
//! shards are all-gathered back (ZeRO-1, which keeps 1/dp of the master
//! weights and moments per rank).
//!
//! Under ZeRO stage 0 the buckets are launched during the last micro-step's
//! backward pass, each as soon as the gradients of every parameter it holds
//! are final (the model reports them block by block), on the communication
//! stream and a communicator capped at a few thread blocks, so that
//! communication overlaps the rest of the backward pass; the buckets its last
//! gradients complete (and all of them without overlap) go out after it as
//! one all-reduce per contiguous run, at NCCL's full speed.
//!
//! Nothing here runs with a single data-parallel rank: the trainer keeps its
//! plain path (per-parameter gradients, no flat buffer), so one GPU pays
//! neither time nor memory for it.

use std::ops::Range;

use trainer_comm::{ProcessGroup, ReduceOp, Work};
use trainer_core::Tensor;
use trainer_core::ops::{self, Span};
use trainer_models::Model;
use trainer_nn::{AdamW, FlatLayout, FlatPiece, Param, ParamId, Placement, trainable, trainable_mut};

use crate::Result;

/// The gradient synchronization and sharded update of one data-parallel rank.
#[derive(Debug)]
pub(crate) struct DataParallel {
    group: ProcessGroup,
    zero_stage: u32,
    layout: FlatLayout,
    /// Every parameter's place in the flat buffer.
    pieces: Vec<FlatPiece>,
    /// This rank's pieces (ZeRO-1): the parameters it updates.
    own: Vec<FlatPiece>,
    /// (layout.len) gradients, in the parameters' dtype; padding stays zero.
    /// Under ZeRO-1 it carries the updated parameters back after the step.
    flat: Tensor,
    buckets: Vec<Bucket>,
    /// Launch buckets during the backward pass (ZeRO stage 0 only).
    overlap: bool,
    /// The buckets each parameter (by position in the model's order) has elements in.
    param_buckets: Vec<Vec<usize>>,
    /// Each parameter id's position in the model's order.
    positions: std::collections::HashMap<ParamId, usize>,
    /// Parameters whose gradients are not final yet in this step.
    unfinished: usize,
    /// This step's all-reduces so far.
    work: Vec<Work>,
}

/// One all-reduce of a range of the flat buffer.
#[derive(Debug)]
struct Bucket {
    range: Range<usize>,
    /// (in the flat buffer, in the parameter) for every piece of a parameter in the range.
    pairs: Vec<(Span, Span)>,
    /// Parameters whose gradients are not final yet in this step.
    waiting: usize,
    /// Parameters with elements in the range.
    params: usize,
    launched: bool,
}

/// Splits `0..len` into consecutive ranges of at most `size` elements.
pub(crate) fn buckets(len: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    (0..len.div_ceil(size)).map(|i| i * size..((i + 1) * size).min(len)).collect()
}

impl DataParallel {
    /// `layout` must be the optimizer's (sharded into `group.size()` for ZeRO-1).
    pub(crate) fn new(
        group: ProcessGroup,
        zero_stage: u32,
        (bucket_bytes, overlap): (usize, bool),
        layout: FlatLayout,
        model: &dyn Model,
    ) -> Result<Self> {
        let (dtype, device) = (model.dtype(), model.device().clone());
        // Positions in the list of trainable parameters (frozen ones have no gradient to reduce).
        let positions = trainable(&model.params()).iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        let pieces = layout.pieces(0..layout.len);
        let own = if zero_stage == 1 { layout.pieces(layout.shard(group.rank())) } else { Vec::new() };
        let flat = Tensor::zeros([layout.len], dtype, &device)?;
        let mut param_buckets = vec![Vec::new(); trainable(&model.params()).len()];
        let buckets = buckets(layout.len, bucket_bytes / dtype.size_in_bytes())
            .into_iter()
            .enumerate()
            .map(|(b, range)| {
                let inside = layout.pieces(range.clone());
                for p in &inside {
                    param_buckets[p.param].push(b);
                }
                let pairs = inside.iter().map(|p| (p.in_flat(0), p.in_param())).collect();
                Bucket { range, pairs, waiting: inside.len(), params: inside.len(), launched: false }
            })
            .collect();
        let overlap = overlap && zero_stage == 0;
        Ok(DataParallel {
            group,
            zero_stage,
            layout,
            pieces,
            own,
            flat,
            buckets,
            overlap,
            param_buckets,
            positions,
            unfinished: 0,
            work: Vec::new(),
        })
    }

    /// Whether [`DataParallel::grads_ready`] should hear of the last
    /// micro-step's finished gradients.
    pub(crate) fn overlaps(&self) -> bool {
        self.overlap
    }

    /// Before the last micro-step's backward pass: no bucket is launched yet.
    pub(crate) fn begin_step(&mut self) {
        for b in &mut self.buckets {
            b.waiting = b.params;
            b.launched = false;
        }
        self.unfinished = self.param_buckets.len();
        self.work.clear();
    }

    /// The gradients of parameters `ids` are final: launches every bucket
    /// that now has all of its gradients (a parameter spans one or more
    /// buckets, and a bucket one or more parameters); after the backward
    /// pass's last gradients, everything left. `params` are the model's.
    pub(crate) fn grads_ready(&mut self, params: &[&Param], ids: &[ParamId]) -> Result<()> {
        let params = trainable(params);
        let ours: Vec<usize> = ids.iter().filter_map(|id| self.positions.get(id).copied()).collect();
        self.unfinished = self.unfinished.saturating_sub(ours.len());
        if self.unfinished == 0 {
            return self.launch_rest(&params);
        }
        for p in ours {
            for i in 0..self.param_buckets[p].len() {
                let b = self.param_buckets[p][i];
                self.buckets[b].waiting = self.buckets[b].waiting.saturating_sub(1);
                if self.buckets[b].waiting == 0 && !self.buckets[b].launched {
                    self.launch(&params, b)?;
                }
            }
        }
        Ok(())
    }

    /// Copies bucket `b`'s gradients (`params`: the trainable ones) into the flat buffer and starts its
    /// all-reduce (after the copy, on the communication stream), with few
    /// thread blocks: it runs beside the rest of the backward pass.
    fn launch(&mut self, params: &[&Param], b: usize) -> Result<()> {
        let grads = params.iter().map(|p| p.grad()).collect::<trainer_core::Result<Vec<_>>>()?;
        let bucket = &mut self.buckets[b];
        ops::copy_spans(&mut [&mut self.flat], &grads, &bucket.pairs)?;
        let range = bucket.range.clone();
        self.work.push(self.group.start_background_all_reduce(&mut self.flat, range, ReduceOp::Avg)?);
        bucket.launched = true;
        Ok(())
    }

    /// Launches every bucket not launched yet, after the backward pass: with
    /// no compute left to hide behind, each contiguous run of them goes out
    /// as one all-reduce with NCCL's full choice of thread blocks (one large
    /// all-reduce moves data faster than several small ones: ~310 GB/s bus
    /// bandwidth at 64 MiB against ~260 at 16 MiB on 4 H200s).
    fn launch_rest(&mut self, params: &[&Param]) -> Result<()> {
        let grads = params.iter().map(|p| p.grad()).collect::<trainer_core::Result<Vec<_>>>()?;
        let rest: Vec<usize> = (0..self.buckets.len()).filter(|&b| !self.buckets[b].launched).collect();
        if rest.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(Span, Span)> = rest.iter().flat_map(|&b| self.buckets[b].pairs.iter().copied()).collect();
        ops::copy_spans(&mut [&mut self.flat], &grads, &pairs)?;
        for run in rest.chunk_by(|a, b| a + 1 == *b) {
            let range = self.buckets[run[0]].range.start..self.buckets[run[run.len() - 1]].range.end;
            self.work.push(self.group.start_all_reduce(&mut self.flat, range, ReduceOp::Avg)?);
            for &b in run {
                self.buckets[b].launched = true;
            }
        }
        Ok(())
    }

    pub(crate) fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// Averages the accumulated gradients over the group (what the backward
    /// pass has not launched yet, then waits for all); returns the global
    /// gradient norm (of the averaged gradients, as one process would see it).
    pub(crate) fn reduce_gradients(&mut self, model: &dyn Model) -> Result<f64> {
        if self.zero_stage == 1 {
            let params = trainable(&model.params());
            let grads = params.iter().map(|p| p.grad()).collect::<trainer_core::Result<Vec<_>>>()?;
            let pairs: Vec<(Span, Span)> = self.pieces.iter().map(|p| (p.in_flat(0), p.in_param())).collect();
            ops::copy_spans(&mut [&mut self.flat], &grads, &pairs)?;
            self.group.reduce_scatter_range(&mut self.flat, 0..self.layout.len, ReduceOp::Avg)?;
            let mine = self.layout.shard(self.group.rank());
            let mut sum =
                [ops::sum_squares_spans(&[&self.flat], &[Span { tensor: 0, start: mine.start, len: mine.len() }])?];
            self.group.all_reduce_host(&mut sum, ReduceOp::Sum)?;
            return Ok(sum[0].sqrt());
        }
        if !self.overlap {
            self.begin_step();
        }
        // Everything is queued before anything is waited for, so that the
        // all-reduces follow one another on the communication stream without
        // host round trips.
        self.launch_rest(&trainable(&model.params()))?;
        for w in self.work.drain(..) {
            w.wait()?;
        }
        Ok(ops::sum_squares_all(&[&self.flat])?.sqrt())
    }

    /// One optimizer update from the averaged gradients; afterwards every
    /// rank holds the same parameters.
    pub(crate) fn update(&mut self, opt: &mut AdamW, model: &mut dyn Model, lr: f64, grad_scale: f64) -> Result<()> {
        {
            let mut values: Vec<&mut Tensor> =
                trainable_mut(model.params_mut()).into_iter().map(|p| &mut p.value).collect();
            // Under ZeRO-1 the optimizer covers only this rank's shard, so
            // only those parameter elements change here.
            opt.step(&mut values, Placement::PerParam, &[&self.flat], Placement::Flat, lr, grad_scale)?;
        }
        if self.zero_stage == 0 {
            return Ok(());
        }
        // The gradient buffer is spent: it carries the updated shards to every rank.
        let all = model.params();
        let params = trainable(&all);
        let values: Vec<&Tensor> = params.iter().map(|p| &p.value).collect();
        let mine: Vec<(Span, Span)> = self.own.iter().map(|p| (p.in_flat(0), p.in_param())).collect();
        ops::copy_spans(&mut [&mut self.flat], &values, &mine)?;
        drop(values);
        drop(params);
        self.group.all_gather_range(&mut self.flat, 0..self.layout.len)?;
        let back: Vec<(Span, Span)> = self.pieces.iter().map(|p| (p.in_param(), p.in_flat(0))).collect();
        drop(all);
        let mut values: Vec<&mut Tensor> =
            trainable_mut(model.params_mut()).into_iter().map(|p| &mut p.value).collect();
        ops::copy_spans(&mut values, &[&self.flat], &back)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_in_order() {
        assert_eq!(buckets(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(buckets(8, 4), vec![0..4, 4..8]);
        assert_eq!(buckets(0, 4), Vec::<Range<usize>>::new());
        assert_eq!(buckets(3, 0), vec![0..1, 1..2, 2..3]);
    }
}
