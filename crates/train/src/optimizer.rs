//! The optimizer with its data-parallel wrapper: AdamW over this rank's part
//! of the trainable parameters, the learning-rate schedule and clipping, and,
//! with several data-parallel ranks, the gradient all-reduce (overlapped with
//! the last micro-step's backward pass) and ZeRO-1's sharded update (dp.rs).
//! The training loop asks it for three things a step: a gradients-final
//! callback for the backward pass, the reduced loss and gradient norm, and
//! the update.

use std::time::Instant;

use trainer_comm::{Mesh, ReduceOp};
use trainer_models::{Model, ReadyResult};
use trainer_nn::{
    AdamW, AdamWConfig, Decay, FlatLayout, LrSchedule, Param, ParamId, clip_coefficient, global_grad_norm, trainable,
    trainable_mut,
};

use crate::Result;
use crate::config::{Config, DecayKind};
use crate::dp::DataParallel;

#[derive(Debug)]
pub(crate) struct Optimizer {
    adamw: AdamW,
    /// Gradient averaging across data-parallel ranks; None with one rank.
    dp: Option<DataParallel>,
    schedule: LrSchedule,
    grad_clip: f64,
}

/// What one step's gradients came to: the mean loss over the global batch,
/// the global gradient norm, and the seconds spent after the backward pass
/// waiting for the gradient all-reduce and the norm and loss averages (the
/// data-parallel overhead the overlap did not hide; None with one rank).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reduced {
    pub loss: f64,
    pub norm: f64,
    pub sync_secs: Option<f64>,
}

fn schedule(cfg: &Config, dp: usize) -> LrSchedule {
    let lr = cfg.peak_lr(dp);
    LrSchedule {
        base_lr: lr,
        min_lr: lr * cfg.lr_schedule.min_lr_ratio,
        warmup_steps: cfg.lr_schedule.warmup_steps,
        total_steps: cfg.training.max_steps,
        decay: match cfg.lr_schedule.kind {
            DecayKind::Cosine => Decay::Cosine,
            DecayKind::Linear => Decay::Linear,
            DecayKind::Constant => Decay::Constant,
        },
    }
}

impl Optimizer {
    /// The optimizer of this rank of `mesh`'s data-parallel group, sharded
    /// under ZeRO stage 1.
    pub(crate) fn new(cfg: &Config, model: &dyn Model, mesh: &Mesh, zero_stage: u32) -> Result<Self> {
        let (ranks, dp_rank) = (mesh.dp().size(), mesh.dp().rank());
        let o = &cfg.optimizer;
        let config = AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay };
        let shards = if zero_stage == 1 { ranks } else { 1 };
        // The optimizer and data parallelism see only trainable parameters.
        let params = trainable(&model.params());
        let layout = FlatLayout::new(&params, shards);
        let range = layout.shard(if zero_stage == 1 { dp_rank } else { 0 });
        let adamw = AdamW::for_range(config, &params, layout.clone(), range)?;
        let dp = if ranks > 1 {
            let bucket_bytes = (cfg.parallel.bucket_mb * (1 << 20) as f64) as usize;
            let buckets = (bucket_bytes, cfg.parallel.overlap);
            Some(DataParallel::new(mesh.dp().clone(), zero_stage, buckets, layout, model)?)
        } else {
            None
        };
        Ok(Optimizer { adamw, dp, schedule: schedule(cfg, ranks), grad_clip: cfg.training.grad_clip })
    }

    pub(crate) fn adamw(&self) -> &AdamW {
        &self.adamw
    }

    pub(crate) fn adamw_mut(&mut self) -> &mut AdamW {
        &mut self.adamw
    }

    /// The peak learning rate.
    pub(crate) fn base_lr(&self) -> f64 {
        self.schedule.base_lr
    }

    /// Bytes of optimizer state this rank holds, and what one rank would hold unsharded.
    pub(crate) fn state_bytes(&self) -> (usize, usize) {
        let held: usize = self.adamw.state().iter().map(|(_, t)| t.size_in_bytes()).sum();
        (held, held / self.adamw.range().len().max(1) * self.adamw.layout().len)
    }

    /// Before the backward pass of micro-step `micro` of `accum`: on the last
    /// one, when buckets overlap the backward pass, the callback that starts
    /// each bucket's all-reduce as its gradients become final.
    pub(crate) fn overlap(
        &mut self,
        micro: usize,
        accum: usize,
    ) -> Option<impl FnMut(&[&Param], &[ParamId]) -> ReadyResult + '_> {
        let dp = self.dp.as_mut().filter(|dp| dp.overlaps() && micro + 1 == accum)?;
        dp.begin_step();
        Some(move |params: &[&Param], ids: &[ParamId]| -> ReadyResult { Ok(dp.grads_ready(params, ids)?) })
    }

    /// After the last micro-step: the gradients averaged over the ranks (this
    /// rank's mean loss `loss` too), and their norm.
    pub(crate) fn reduce(&mut self, model: &dyn Model, loss: f64) -> Result<Reduced> {
        let Some(dp) = &mut self.dp else {
            return Ok(Reduced { loss, norm: global_grad_norm(&model.params())?, sync_secs: None });
        };
        // The loss was read back after the backward pass: from here on the
        // GPU only waits for communication.
        let started = Instant::now();
        let norm = dp.reduce_gradients(model)?;
        let mut mean = [loss];
        dp.group().all_reduce_host(&mut mean, ReduceOp::Avg)?;
        Ok(Reduced { loss: mean[0], norm, sync_secs: Some(started.elapsed().as_secs_f64()) })
    }

    /// The update of step `step` (updates applied so far) from gradients of
    /// global norm `norm`, clipped; returns its learning rate.
    pub(crate) fn apply(&mut self, model: &mut dyn Model, step: u64, norm: f64) -> Result<f64> {
        let lr = self.schedule.lr(step);
        let clip = clip_coefficient(norm, self.grad_clip);
        match &mut self.dp {
            None => self.adamw.update(trainable_mut(model.params_mut()), lr, clip)?,
            Some(dp) => dp.update(&mut self.adamw, model, lr, clip)?,
        }
        Ok(lr)
    }
}
