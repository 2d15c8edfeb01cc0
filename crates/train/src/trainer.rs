//! The training loop: micro-batches with gradient accumulation, global-norm
//! clipping, AdamW on a schedule, periodic evaluation and checkpoints, one
//! metrics line per logged step, and the final weights in the run directory.
//!
//! Long jobs: a run continues exactly from a checkpoint (`checkpoint.resume`);
//! a step with a non-finite loss or gradient norm is skipped (no update, the
//! schedule does not advance) and `training.max_bad_steps` of them in a row stop
//! the run with a checkpoint of the last good state; a stop signal ends the run
//! after the current step with a checkpoint.
//!
//! Data parallelism: under `mpirun` every process is one data-parallel rank
//! (one GPU each) that reads its own slice of every global batch; after the
//! last micro-step the gradients are averaged over the ranks (`dp.rs`) and
//! every rank applies the same update; each rank evaluates its share of the
//! validation batches. Only rank 0 prints, records metrics and writes the
//! model; a checkpoint is written by all ranks together, and resumes under
//! any number of data-parallel ranks and ZeRO stage (`format.rs`, `resume.rs`). A plain run
//! is a world of one and takes the single-process path.

use std::path::{Path, PathBuf};
use std::time::Instant;

use trainer_comm::{Mesh, World};
use trainer_core::{DType, Device};
use trainer_data::{
    Batch, BatchLoader, ImageLoader, ImageShard, Loader, LoaderPosition, Prefetcher, SendLoader, Shard, Transform,
    find_files,
};
use trainer_models::{Acts, InputSpec, Model};

use crate::checkpoint::{Layout, Opened};
use crate::checkpointer::{Checkpointer, Counters};
use crate::config::{BatchShape, Config, DeviceKind, LrScaling, Precision};
use crate::eval::evaluate_in;
use crate::format::{self, Place};
use crate::hooks::Hooks;
use crate::metrics::{Metrics, Value};
use crate::optimizer::{Optimizer, Reduced};
use crate::progress::Console;
use crate::resume;
use crate::signals::{StopSignal, signal_name};
use crate::{Error, Result};

/// How a run ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step done.
    Finished,
    /// Stopped by this signal after writing a checkpoint.
    Stopped { signal: i32 },
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub outcome: Outcome,
    /// Optimizer updates applied, counting those before a resume.
    pub steps: u64,
    pub final_train_loss: f64,
    pub first_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// Mean training throughput of the job (all data-parallel ranks together)
    /// in tokens or images (see `throughput_unit`) per second, excluding the
    /// first step (warm-up) unless it was the only one, evaluation and
    /// checkpoints; None when this run trained no step (a finished run started
    /// again has nothing left to do).
    pub throughput: Option<f64>,
    /// "tok" or "img" (see [`InputSpec::unit`]).
    pub throughput_unit: &'static str,
    /// Peak bytes held by tensors on the GPU (None on the CPU).
    pub peak_memory: Option<usize>,
    /// The final weights (not written when stopped by a signal).
    pub weights: Option<PathBuf>,
    /// The newest checkpoint of the run's state.
    pub checkpoint: Option<PathBuf>,
    /// This process's rank in the job (0 in a plain run): only rank 0 reports.
    pub rank: usize,
}

/// The configured device, or an error naming the key when it cannot be used.
pub(crate) fn open_device(cfg: &Config) -> Result<Device> {
    match cfg.training.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::cuda(0).map_err(|e| cfg.error(format!("training.device = \"cuda\": {e}"))),
    }
}

/// The device of this rank: its host's GPU numbered by its local rank.
fn open_rank_device(cfg: &Config, world: &World) -> Result<Device> {
    match cfg.training.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => world.cuda_device().map_err(|e| cfg.error(format!("training.device = \"cuda\": {e}"))),
    }
}

pub(crate) fn compute_dtype(cfg: &Config) -> DType {
    match cfg.training.dtype {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// Which data a loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// `data.train`: shuffled per epoch, augmented (images).
    Train,
    /// `data.val`: in order, the validation transform (images).
    Val,
}

/// Opens every file matching `pattern` (the split's config key) as the data
/// the model reads (`input`), checks it against the model (token ids against
/// the vocabulary; image shape, channels and classes), and builds the loader
/// of rank `part.0` of `part.1` for micro-batches of training.micro_batch_size.
pub(crate) fn open_loader(
    cfg: &Config,
    split: Split,
    pattern: &str,
    input: InputSpec,
    part: (usize, usize),
) -> Result<Box<dyn Loader>> {
    let key = match split {
        Split::Train => "data.train",
        Split::Val => "data.val",
    };
    let ctx = |err| Error::Data { context: format!("{key} = \"{pattern}\""), err };
    let files = find_files(pattern).map_err(ctx)?;
    let (b, t, seed, shuffle) =
        (cfg.training.micro_batch_size, cfg.training.seq_len, cfg.training.seed, split == Split::Train);
    let loader: SendLoader = match input {
        InputSpec::Tokens { vocab_size, .. } => {
            let shards = files
                .iter()
                .map(|f| {
                    let s = Shard::open(f)?;
                    s.check_vocab(vocab_size)?;
                    Ok(s)
                })
                .collect::<trainer_data::Result<Vec<_>>>()
                .map_err(ctx)?;
            Box::new(BatchLoader::new(shards, b, t, seed, shuffle, part.0, part.1).map_err(ctx)?)
        }
        InputSpec::Images { size, channels, classes } => {
            let shards =
                files.iter().map(|f| ImageShard::open(f)).collect::<trainer_data::Result<Vec<_>>>().map_err(ctx)?;
            // ImageLoader::new checks that the shards agree with each other; here, with the model.
            if let Some(s) = shards.iter().find(|s| s.shape().channels != channels || s.classes() != classes) {
                return Err(ctx(trainer_data::Error::Invalid(format!(
                    "{} holds images of {} channel(s) in {} classes, but the model takes {channels} channel(s) and \
                     {classes} classes (model.channels, model.num_classes)",
                    s.path().display(),
                    s.shape().channels,
                    s.classes()
                ))));
            }
            let d = &cfg.data;
            let transform = match split {
                Split::Train => Transform::Random {
                    min_area: d.random_crop_min_area.unwrap_or(0.08),
                    flip: d.random_flip.unwrap_or(true),
                },
                Split::Val => Transform::CentreCrop { crop: d.val_crop.unwrap_or(1.0) },
            };
            Box::new(ImageLoader::new(shards, b, size, transform, (seed, shuffle), part.0, part.1).map_err(ctx)?)
        }
    };
    // Training batches are filled on a thread of their own while the model
    // computes (the same batches and positions); validation reads in order
    // from a seek at every evaluation, where running ahead would be wasted.
    Ok(match split {
        Split::Train => Box::new(Prefetcher::new(loader)),
        Split::Val => loader,
    })
}

/// A training run in progress: the model and its activations, the data, the
/// optimizer (with data parallelism), the checkpointer, metrics, and the
/// counters a checkpoint saves.
struct Run<'a> {
    cfg: &'a Config,
    device: Device,
    /// The ranks and their groups (a world of one in a plain run).
    mesh: Mesh,
    batch: BatchShape,
    model: Box<dyn Model>,
    acts: Acts,
    /// The micro-batch the loader fills and the model reads, reused.
    batch_buf: Batch,
    train_loader: Box<dyn Loader>,
    val_loader: Option<Box<dyn Loader>>,
    opt: Optimizer,
    checkpoints: Checkpointer,
    metrics: Metrics,
    console: Console,
    hooks: Hooks,
    counters: Counters,
    /// Told after every checkpoint what a restart would resume from.
    stop: StopSignal,
}

impl<'a> Run<'a> {
    /// Builds everything, from a checkpoint when `checkpoint.resume` finds one.
    fn new(cfg: &'a Config, world: &World, build: &BuildModel<'_>, stop: &StopSignal) -> Result<Self> {
        let hooks = Hooks::from_env()?;
        let device = open_rank_device(cfg, world)?;
        let mesh = Mesh::new(world, &cfg.mesh_spec(), &device).map_err(|e| match e {
            trainer_comm::Error::Config(msg) => cfg.error(msg),
            e => e.into(),
        })?;
        let (dp, dp_rank) = (mesh.dp().size(), mesh.dp().rank());
        let batch = cfg.batch(dp).map_err(|msg| cfg.error(msg))?;
        // Sharding over one rank would only cost the flat buffers.
        let zero_stage = if dp > 1 { cfg.parallel.zero_stage } else { 0 };
        let rank = world.rank();
        let place = Place { rank, layout: Layout { world_size: world.size(), data_parallel: dp, zero_stage } };
        let t_cfg = &cfg.training;

        // The model's parameters are allocated (zero) but not initialized:
        // the data is checked against it before any work.
        let mut model = build(&device)?;
        // Data first: a missing or corrupt shard should fail before any model work.
        let input = model.input();
        let train_loader = open_loader(cfg, Split::Train, &cfg.data.train, input, (dp_rank, dp))?;
        // Every rank opens all validation batches; each evaluates its share (eval.rs).
        let val_loader = match cfg.data.val.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(open_loader(cfg, Split::Val, p, input, (0, 1))?),
            None => None,
        };
        let console = if rank == 0 { Console::plain() } else { Console::silent() };
        let metrics =
            if rank == 0 { Metrics::open(&PathBuf::from(&cfg.logging.run_dir))? } else { Metrics::disabled() };
        let checkpoints = Checkpointer::new(cfg, place)?;

        let mut resume_from = checkpoints.find_resume(cfg, model.as_ref(), &batch, &console, mesh.world())?;
        // Every rank draws the same initial weights from the seed.
        if resume_from.is_none() {
            // A checkpoint, when there is one, supersedes model.init_from.
            match &cfg.model.init_from {
                Some(dir) => {
                    model.load_pretrained(std::path::Path::new(dir))?;
                    console.line(&format!("init_from={dir}"));
                }
                None => model.init(t_cfg.seed)?,
            }
        }
        let batch_buf = train_loader.new_batch();
        model.set_recompute(t_cfg.recompute()).map_err(|e| cfg.error(format!("training.recompute: {e}")))?;
        let acts = model.new_acts(&batch_buf)?;
        let opt = Optimizer::new(cfg, model.as_ref(), &mesh, zero_stage)?;
        let mut run = Run {
            cfg,
            device,
            mesh,
            batch,
            model,
            acts,
            batch_buf,
            train_loader,
            val_loader,
            opt,
            checkpoints,
            metrics,
            console,
            hooks,
            counters: Counters { step: 0, first_val: None, last_val: None, last_loss: f64::NAN },
            stop: stop.clone(),
        };
        match resume_from.as_mut() {
            Some(from) => {
                run.restore(from)?;
                run.stop.set_restart_point(format!("a restart resumes from checkpoint {}", from.dir.display()));
            }
            None => run.stop.set_restart_point(format!(
                "a restart starts from the beginning (no checkpoint in {} yet)",
                run.checkpoints.dir().display()
            )),
        }
        Ok(run)
    }

    fn restore(&mut self, from: &mut Opened) -> Result<()> {
        let manifest_path = from.dir.join("manifest.json");
        // Each step reads grad_accum_steps micro-batches on every rank.
        let remaining = self.cfg.training.max_steps.saturating_sub(from.manifest.step) as usize
            * self.batch.grad_accum_steps
            * self.batch.dp;
        let (pos, warning) = resume::data_position(
            &from.manifest,
            &manifest_path,
            (self.mesh.dp().rank(), self.batch.dp),
            self.train_loader.micro_batches(),
            remaining,
        )?;
        format::restore(from, self.model.as_mut(), self.opt.adamw_mut())?;
        if let Some(w) = warning {
            self.console.warn(&w);
        }
        let (old, new) = (&from.manifest.layout, &self.checkpoints.place().layout.clone());
        if self.cfg.optimizer.lr_scaling == LrScaling::Linear && old.data_parallel != new.data_parallel {
            self.console.warn(&format!(
                "optimizer.lr_scaling = \"linear\": the peak learning rate is {:e} with data parallel {}, the \
                 checkpoint's run had {:e} with data parallel {}",
                self.opt.base_lr(),
                new.data_parallel,
                self.cfg.peak_lr(old.data_parallel),
                old.data_parallel
            ));
        }
        let s = &from.manifest.state;
        self.train_loader.seek(pos);
        self.counters.step = from.manifest.step;
        self.counters.first_val = s.first_val_loss;
        self.counters.last_loss = s.last_train_loss.unwrap_or(f64::NAN);
        self.checkpoints.resumed_from(from);
        let relaid = if old == new {
            String::new()
        } else {
            format!(
                " (written by {} ranks, data parallel {}, ZeRO stage {}; continuing on {} ranks, data parallel {}, \
                 ZeRO stage {})",
                old.world_size, old.data_parallel, old.zero_stage, new.world_size, new.data_parallel, new.zero_stage
            )
        };
        self.console.line(&format!("resumed from {} at step {}{relaid}", from.dir.display(), self.counters.step));
        Ok(())
    }

    fn print_header(&self) {
        let b = &self.batch;
        let lr = match self.cfg.optimizer.lr_scaling {
            LrScaling::None => format!("{:e}", self.opt.base_lr()),
            LrScaling::Linear => {
                format!(
                    "{:e} (optimizer.lr {:e} x dp {}, lr_scaling=linear)",
                    self.opt.base_lr(),
                    self.cfg.optimizer.lr,
                    b.dp
                )
            }
        };
        // The optimizer state of one rank; under ZeRO-1 against what it would be unsharded.
        let (state, unsharded) = self.opt.state_bytes();
        let zero_stage = self.checkpoints.place().layout.zero_stage;
        self.console.line(&format!(
            "model={} params={} {} device={} dtype={} {}={} train_batches_per_epoch={} metrics={} checkpoints={}",
            self.model.desc().kind,
            self.model.num_params(),
            self.model.summary(),
            self.model.device(),
            self.model.dtype(),
            match self.model.input() {
                InputSpec::Tokens { .. } => "tokens_per_step",
                InputSpec::Images { .. } => "images_per_step",
            },
            b.global_batch_size * self.model.units_per_sample(&self.batch_buf),
            self.train_loader.batches_per_epoch(),
            self.metrics.path().display(),
            self.checkpoints.dir().display()
        ));
        self.console.line(&format!(
            "parallel {} zero_stage={}{} global_batch={} (micro_batch {} x grad_accum {} x dp {}) lr={lr} \
             optimizer_state_bytes_per_rank={state}{}",
            self.mesh.shape(),
            zero_stage,
            match self.cfg.training.recompute() {
                trainer_nn::Recompute::None => String::new(),
                trainer_nn::Recompute::Selective { layers: usize::MAX } => " recompute=selective".to_string(),
                trainer_nn::Recompute::Selective { layers } => format!(" recompute=selective(first {layers} blocks)"),
                trainer_nn::Recompute::Full { layers: usize::MAX } => " recompute=full".to_string(),
                trainer_nn::Recompute::Full { layers } => format!(" recompute=full(first {layers} blocks)"),
            },
            b.global_batch_size,
            b.micro_batch_size,
            b.grad_accum_steps,
            b.dp,
            if zero_stage == 1 {
                format!(" (unsharded {unsharded}, saved {} per rank)", unsharded - state)
            } else {
                String::new()
            }
        ));
    }

    fn evaluate(&mut self) -> Result<()> {
        let Some(loader) = self.val_loader.as_mut() else { return Ok(()) };
        let r =
            evaluate_in(self.model.as_ref(), &mut self.acts, loader.as_mut(), self.cfg.eval.batches, self.mesh.dp())?;
        let mut record = vec![("step", Value::Int(self.counters.step)), ("val_loss", Value::Fixed(r.loss, 4))];
        match r.accuracy {
            // A classifier: accuracy; the perplexity of a class distribution says little.
            Some(a) => record.extend([("val_acc", Value::Fixed(a.top1, 4)), ("val_acc5", Value::Fixed(a.top5, 4))]),
            None => record.push(("val_ppl", Value::Fixed(r.perplexity, 2))),
        }
        self.metrics.log(&record)?;
        self.counters.first_val.get_or_insert(r.loss);
        self.counters.last_val = Some(r.loss);
        Ok(())
    }

    /// Writes the checkpoint of the current step with the data at `position`.
    fn save(&mut self, position: LoaderPosition) -> Result<PathBuf> {
        let started = Instant::now();
        let dir = self.checkpoints.save(
            (self.cfg, &self.batch),
            &self.counters,
            self.model.as_ref(),
            self.opt.adamw(),
            position,
            &self.hooks,
            self.mesh.world(),
        )?;
        self.console.line(&format!(
            "checkpoint step={} dir={} secs={:.2}",
            self.counters.step,
            dir.display(),
            started.elapsed().as_secs_f64()
        ));
        self.stop.set_restart_point(format!("a restart resumes from checkpoint {}", dir.display()));
        Ok(dir)
    }

    /// The stop signal, agreed by every rank: one that reached only some
    /// ranks (or reached them at different steps) stops them all at the same step.
    fn stop_requested(&self, stop: &StopSignal) -> Result<Option<i32>> {
        let world = self.mesh.world();
        if world.size() == 1 {
            return Ok(stop.requested());
        }
        let all = world.all_gather_host(&[stop.requested().unwrap_or(0)])?;
        Ok(all.into_iter().find(|&s| s != 0))
    }

    /// The checkpoint of the current state: the one already written, or a new one.
    fn checkpoint_now(&mut self, position: LoaderPosition) -> Result<PathBuf> {
        match self.checkpoints.saved_at(self.counters.step) {
            Some(dir) => Ok(dir.to_path_buf()),
            None => self.save(position),
        }
    }

    /// One step's forward and backward over its micro-batches, with the
    /// gradients reduced over the data-parallel ranks.
    fn forward_backward(&mut self) -> Result<Reduced> {
        let accum = self.batch.grad_accum_steps;
        self.model.zero_grad()?;
        let mut loss = 0.0;
        for micro in 0..accum {
            self.train_loader.next_batch(&mut self.batch_buf);
            let scale = 1.0 / accum as f64;
            let (model, acts, batch) = (&mut self.model, &mut self.acts, &self.batch_buf);
            // The last micro-step's buckets start as their gradients become final.
            let micro_loss = match self.opt.overlap(micro, accum) {
                Some(mut ready) => model.forward_backward(acts, batch, scale, &mut ready)?,
                None => model.forward_backward(acts, batch, scale, &mut trainer_models::ignore_ready)?,
            };
            loss += micro_loss / accum as f64;
        }
        self.opt.reduce(self.model.as_ref(), loss)
    }

    /// Steps until `training.max_steps`, a stop signal or too many bad steps.
    fn train_steps(&mut self, stop: &StopSignal, timing: &mut Timing) -> Result<Outcome> {
        let t_cfg = &self.cfg.training;
        // Tokens (or images) of the whole job; each GPU computes 1/dp of it.
        let units_per_step = self.batch.global_batch_size * self.model.units_per_sample(&self.batch_buf);
        let rate_key = match self.model.input() {
            InputSpec::Tokens { .. } => "tok_per_s",
            InputSpec::Images { .. } => "img_per_s",
        };
        // Model FLOPs utilization of one GPU against its bf16 peak, as the peer benchmark computes it.
        let samples_per_gpu = self.batch.global_batch_size / self.batch.dp;
        let flops_per_step = self.model.flops_per_sample(&self.batch_buf) * samples_per_gpu as f64;
        let peak_flops = match &self.device {
            Device::Cuda(d) => d.bf16_peak_flops(),
            Device::Cpu => None,
        };
        let (mut attempts, mut bad) = (0u64, 0u64);
        // Where the data stood after the last good step.
        let mut good_position = self.train_loader.position();
        loop {
            if let Some(signal) = self.stop_requested(stop)? {
                return self.stop_for(signal, good_position);
            }
            if self.counters.step >= t_cfg.max_steps {
                return Ok(Outcome::Finished);
            }
            let started = Instant::now();
            attempts += 1;
            self.hooks.maybe_fail(self.checkpoints.place().rank, attempts)?;
            let Reduced { loss, norm, sync_secs: grad_sync } = self.forward_backward()?;
            let loss = self.hooks.loss(attempts, loss);
            let next = self.counters.step + 1;
            if !(loss.is_finite() && norm.is_finite()) {
                bad += 1;
                self.metrics.log(&[
                    ("step", Value::Int(next)),
                    ("train_loss", Value::Fixed(loss, 4)),
                    ("grad_norm", Value::Fixed(norm, 4)),
                    ("skipped", Value::Int(1)),
                    ("bad_in_a_row", Value::Int(bad)),
                ])?;
                if bad >= t_cfg.max_bad_steps {
                    return Err(self.diverged(bad, good_position));
                }
                continue;
            }
            bad = 0;
            let lr = self.opt.apply(self.model.as_mut(), self.counters.step, norm)?;
            self.counters.step = next;
            self.counters.last_loss = loss;
            good_position = self.train_loader.position();
            let secs = started.elapsed().as_secs_f64();
            timing.add(&self.device, secs, units_per_step);
            let step = self.counters.step;
            if step.is_multiple_of(self.cfg.logging.interval) || step == t_cfg.max_steps {
                let mut record = vec![
                    ("step", Value::Int(step)),
                    ("train_loss", Value::Fixed(loss, 4)),
                    ("lr", Value::Sci(lr)),
                    ("grad_norm", Value::Fixed(norm, 4)),
                    (rate_key, Value::Fixed(units_per_step as f64 / secs, 0)),
                ];
                if let Some(peak) = peak_flops {
                    record.push(("mfu", Value::Fixed(flops_per_step / secs / peak, 3)));
                }
                if let Some(sync) = grad_sync {
                    record.push(("grad_sync_ms", Value::Fixed(sync * 1e3, 2)));
                }
                if let Device::Cuda(d) = &self.device {
                    record.push(("peak_mem_gb", Value::Fixed(d.memory_stats().1 as f64 / 1e9, 2)));
                }
                self.metrics.log(&record)?;
            }
            self.console.progress(step, format!("loss {loss:.4}"));
            if self.stop_requested(stop)?.is_some() {
                continue; // checkpoint and stop before anything else
            }
            let due = |interval: u64| interval > 0 && step.is_multiple_of(interval);
            let last = step == t_cfg.max_steps;
            if due(self.cfg.eval.interval) || last {
                self.evaluate()?;
            }
            if due(self.cfg.checkpoint.interval) || last {
                self.save(self.train_loader.position())?;
            }
        }
    }

    /// Saves the state after the last good step (with its data position) and stops.
    fn stop_for(&mut self, signal: i32, good_position: LoaderPosition) -> Result<Outcome> {
        let name = signal_name(signal);
        if self.counters.step == 0 {
            self.console.line(&format!("stopped by {name} before the first step: nothing to save"));
        } else {
            self.console.line(&format!("stopped by {name} after step {}: writing a checkpoint", self.counters.step));
            self.checkpoint_now(good_position)?;
        }
        Ok(Outcome::Stopped { signal })
    }

    /// Saves the last good state (the data position after its step, so that a
    /// resume sees the skipped batches again) and says what happened.
    fn diverged(&mut self, bad: u64, good_position: LoaderPosition) -> Error {
        let step = self.counters.step;
        let saved = match self.checkpoint_now(good_position) {
            Ok(dir) => format!("the last good state (step {step}) is in checkpoint {}", dir.display()),
            Err(e) => format!("saving the last good state (step {step}) failed: {e}"),
        };
        Error::Diverged(format!(
            "training diverged: {bad} steps in a row had a non-finite loss or gradient norm \
             (training.max_bad_steps = {}); {saved}. Lower optimizer.lr (now {:e}) or check the data",
            self.cfg.training.max_bad_steps, self.cfg.optimizer.lr
        ))
    }

    fn print_kernel_profile(&self) {
        let Device::Cuda(d) = &self.device else { return };
        let profile = d.kernel_profile();
        if profile.is_empty() {
            return;
        }
        let total: f64 = profile.iter().map(|p| p.2).sum();
        self.console.line(&format!(
            "kernel profile (this process's steps after its first, each launch timed alone): total {:.1} ms",
            total * 1e3
        ));
        for (name, calls, secs) in &profile {
            self.console.line(&format!(
                "  {:>6.1}% {:>10.3} ms {:>7} calls  {name}",
                100.0 * secs / total,
                secs * 1e3,
                calls
            ));
        }
    }
}

/// Training throughput of this process, without its first step (which pays
/// one-time costs) unless it is the only one.
#[derive(Debug, Default)]
struct Timing {
    steps: u64,
    /// The first step's (seconds, tokens or images).
    first: (f64, usize),
    secs: f64,
    units: usize,
}

impl Timing {
    fn add(&mut self, device: &Device, secs: f64, units: usize) {
        self.steps += 1;
        if self.steps == 1 {
            // The first step pays one-time costs (lazy loading of library kernels).
            if let Device::Cuda(d) = device {
                d.reset_kernel_profile();
            }
            self.first = (secs, units);
            return;
        }
        self.secs += secs;
        self.units += units;
    }

    fn per_second(&self) -> Option<f64> {
        let (secs, units) = if self.steps > 1 { (self.secs, self.units) } else { self.first };
        (self.steps > 0 && secs > 0.0).then(|| units as f64 / secs)
    }
}

/// Trains per `cfg` in this process alone, resuming per `checkpoint.resume`,
/// until `training.max_steps` or until `stop` fires.
pub fn train(cfg: &Config, stop: &StopSignal) -> Result<TrainSummary> {
    train_in(cfg, stop, &World::single(cfg.comm_options()))
}

/// [`train`] as rank `world.rank()` of the job: every rank calls it. An error
/// on one rank leaves the others waiting in a collective until the timeout;
/// the caller must end the job (`trainer_comm::abort_job`) instead of
/// returning.
pub fn train_in(cfg: &Config, stop: &StopSignal, world: &World) -> Result<TrainSummary> {
    let desc = cfg.model_desc().map_err(|msg| cfg.error(msg))?;
    let dtype = compute_dtype(cfg);
    train_with(cfg, stop, world, &|device: &Device| Ok(trainer_models::build(&desc, dtype, device)?))
}

/// Makes the model to train on this rank's device, every parameter allocated
/// (its values are set by initialization, `model.init_from` or a checkpoint).
pub type BuildModel<'a> = dyn Fn(&Device) -> Result<Box<dyn Model>> + 'a;

/// [`train_in`] with the model that `build` makes instead of the one the
/// config's `[model]` section describes: for models that live outside the
/// models crate (tests, experiments). Everything else comes from `cfg`.
pub fn train_with(cfg: &Config, stop: &StopSignal, world: &World, build: &BuildModel<'_>) -> Result<TrainSummary> {
    let rank = world.rank();
    let mut run = Run::new(cfg, world, build, stop)?;
    run.print_header();
    if run.counters.step == 0 {
        run.evaluate()?;
    }
    // Under a launcher stdout is a pseudo-terminal that mpirun relays line by
    // line: a bar would come out as a stream of escape codes.
    if !world.is_distributed() {
        run.console.start_progress(run.counters.step, cfg.training.max_steps);
    }
    run.metrics.set_console(run.console.clone());
    let mut timing = Timing::default();
    let outcome = run.train_steps(stop, &mut timing);
    run.console.finish();
    let outcome = outcome?;
    run.print_kernel_profile();
    let weights = if outcome == Outcome::Finished && rank == 0 {
        let path = PathBuf::from(&cfg.logging.run_dir).join("model.safetensors");
        run.model.save_weights(&path)?;
        Some(path)
    } else {
        None
    };
    Ok(TrainSummary {
        outcome,
        steps: run.counters.step,
        final_train_loss: run.counters.last_loss,
        first_val_loss: run.counters.first_val,
        final_val_loss: run.counters.last_val,
        throughput: timing.per_second(),
        throughput_unit: run.model.input().unit(),
        peak_memory: match &run.device {
            Device::Cuda(d) => Some(d.memory_stats().1),
            Device::Cpu => None,
        },
        weights,
        checkpoint: run.checkpoints.newest().map(Path::to_path_buf),
        rank,
    })
}
