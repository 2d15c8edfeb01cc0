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
//! Everything is written for rank `rank` of `world` data-parallel ranks (today
//! always 0 of 1): only rank 0 prints, records metrics and writes the model.

use std::path::PathBuf;
use std::time::Instant;

use trainer_core::{DType, Device};
use trainer_data::{BatchLoader, LoaderPosition, Shard, find_files};
use trainer_models::gpt::{Gpt, GptActs, GptConfig};
use trainer_nn::{AdamW, AdamWConfig, Decay, LrSchedule, Module, clip_coefficient, global_grad_norm};

use crate::checkpoint::{self, DataPosition, Layout, Opened, RunShape, Store, TrainerState};
use crate::config::{Config, DecayKind, DeviceKind, Precision, Resume};
use crate::eval::evaluate;
use crate::hooks::Hooks;
use crate::metrics::{Metrics, Value};
use crate::progress::Console;
use crate::signals::{StopSignal, signal_name};
use crate::state::{self, Place};
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
    /// Mean training throughput of this process, excluding its first step
    /// (warm-up), evaluation and checkpoints.
    pub tokens_per_second: f64,
    /// Peak bytes held by tensors on the GPU (None on the CPU).
    pub peak_memory: Option<usize>,
    /// The final weights (not written when stopped by a signal).
    pub weights: Option<PathBuf>,
    /// The newest checkpoint of the run's state.
    pub checkpoint: Option<PathBuf>,
}

/// The configured device, or an error naming the key when it cannot be used.
pub(crate) fn open_device(cfg: &Config) -> Result<Device> {
    match cfg.training.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::cuda(0).map_err(|e| cfg.error(format!("training.device = \"cuda\": {e}"))),
    }
}

pub(crate) fn compute_dtype(cfg: &Config) -> DType {
    match cfg.training.dtype {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// Opens every shard matching `pattern` (config key `key`), checks their ids
/// against the vocabulary, and builds the loader of rank `part.0` of `part.1`.
pub(crate) fn open_loader(
    key: &str,
    pattern: &str,
    vocab_size: usize,
    (b, t): (usize, usize),
    seed: u64,
    shuffle: bool,
    part: (usize, usize),
) -> Result<BatchLoader> {
    let ctx = |err| Error::Data { context: format!("{key} = \"{pattern}\""), err };
    let files = find_files(pattern).map_err(ctx)?;
    let shards = files
        .iter()
        .map(|f| {
            let s = Shard::open(f)?;
            s.check_vocab(vocab_size)?;
            Ok(s)
        })
        .collect::<trainer_data::Result<Vec<_>>>()
        .map_err(ctx)?;
    BatchLoader::new(shards, b, t, seed, shuffle, part.0, part.1).map_err(ctx)
}

fn schedule(cfg: &Config) -> LrSchedule {
    let o = &cfg.optimizer;
    LrSchedule {
        base_lr: o.lr,
        min_lr: o.lr * cfg.lr_schedule.min_lr_ratio,
        warmup_steps: cfg.lr_schedule.warmup_steps,
        total_steps: cfg.training.max_steps,
        decay: match cfg.lr_schedule.kind {
            DecayKind::Cosine => Decay::Cosine,
            DecayKind::Linear => Decay::Linear,
            DecayKind::Constant => Decay::Constant,
        },
    }
}

fn run_shape(cfg: &Config) -> RunShape {
    let t = &cfg.training;
    RunShape {
        dtype: compute_dtype(cfg).to_string(),
        micro_batch_size: t.micro_batch_size,
        seq_len: t.seq_len,
        grad_accum_steps: t.grad_accum_steps,
        data_train: cfg.data.train.clone(),
    }
}

/// The checkpoint to continue from, per `checkpoint.resume`, opened (this
/// rank's files checked and loaded) and checked against this run.
fn find_resume(
    cfg: &Config,
    store: &Store,
    gpt: &GptConfig,
    place: &Place,
    console: &Console,
) -> Result<Option<Opened>> {
    let wanted = checkpoint::for_rank(place.rank);
    if place.rank == 0 {
        for p in store.remove_leftovers()? {
            console.warn(&format!("removed {}, left by an interrupted save", p.display()));
        }
    }
    let existing = store.list()?;
    let opened = match cfg.resume() {
        Resume::Never => {
            if let Some((_, newest)) = existing.first() {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"none\" but checkpoint.dir {} already holds checkpoints (newest {}): a \
                     later resume would mix two runs; use another checkpoint.dir or remove them",
                    store.dir().display(),
                    newest.display()
                )));
            }
            None
        }
        Resume::Auto => {
            let found = store.latest(&wanted, &|w| console.warn(w))?;
            if found.is_none() && !existing.is_empty() {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"auto\": none of the {} checkpoints in {} checks out (see the warnings \
                     above); to start afresh use another checkpoint.dir with checkpoint.resume = \"none\"",
                    existing.len(),
                    store.dir().display()
                )));
            }
            found
        }
        Resume::From(path) => {
            let o = checkpoint::resolve(&path, &wanted, &|w| console.warn(w))
                .map_err(|e| cfg.error(format!("checkpoint.resume = \"{}\": {e}", path.display())))?;
            if let Some((step, newer)) = existing.first().filter(|(s, _)| *s > o.manifest.step) {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"{}\" is step {} but checkpoint.dir already holds the newer {} (step \
                     {step}): a later resume would mix two runs; use another checkpoint.dir or remove it",
                    path.display(),
                    o.manifest.step,
                    newer.display()
                )));
            }
            Some(o)
        }
    };
    if let Some(o) = &opened {
        let manifest_path = o.dir.join("manifest.json");
        for w in state::check_fit(&o.manifest, &manifest_path, gpt, &run_shape(cfg), &place.layout)? {
            console.warn(&w);
        }
    }
    Ok(opened)
}

/// A training run in progress: the model, its optimizer, the data and the
/// counters that a checkpoint saves.
struct Run<'a> {
    cfg: &'a Config,
    gpt: GptConfig,
    device: Device,
    model: Gpt,
    acts: GptActs,
    opt: AdamW,
    schedule: LrSchedule,
    train_loader: BatchLoader,
    val_loader: Option<BatchLoader>,
    metrics: Metrics,
    console: Console,
    store: Store,
    place: Place,
    hooks: Hooks,
    config_toml: String,
    /// Optimizer updates applied.
    step: u64,
    first_val: Option<f64>,
    last_val: Option<f64>,
    last_loss: f64,
    /// The newest checkpoint of this run: (step, directory).
    saved: Option<(u64, PathBuf)>,
}

impl<'a> Run<'a> {
    /// Builds everything, from a checkpoint when `checkpoint.resume` finds one.
    fn new(cfg: &'a Config, rank: usize, world: usize) -> Result<Self> {
        let place = Place { rank, layout: Layout { world_size: world, data_parallel: world, zero_stage: 0 } };
        let hooks = Hooks::from_env()?;
        let gpt = cfg.gpt().map_err(|msg| cfg.error(msg))?;
        let device = open_device(cfg)?;
        let t_cfg = &cfg.training;
        let bt = (t_cfg.micro_batch_size, t_cfg.seq_len);

        // Data first: a missing or corrupt shard should fail before any model work.
        let train_loader =
            open_loader("data.train", &cfg.data.train, gpt.vocab_size, bt, t_cfg.seed, true, (rank, world))?;
        // Every rank evaluates the same batches.
        let val_loader = match cfg.data.val.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(open_loader("data.val", p, gpt.vocab_size, bt, t_cfg.seed, false, (0, 1))?),
            None => None,
        };
        let console = if rank == 0 { Console::plain() } else { Console::silent() };
        let metrics =
            if rank == 0 { Metrics::open(&PathBuf::from(&cfg.logging.run_dir))? } else { Metrics::disabled() };
        let store = Store::new(cfg.checkpoint_dir(), cfg.checkpoint.keep_last);
        let config_toml = toml::to_string(cfg).map_err(|e| cfg.error(format!("cannot write it as TOML: {e}")))?;

        let mut resume_from = find_resume(cfg, &store, &gpt, &place, &console)?;
        let mut model = Gpt::new(gpt.clone(), compute_dtype(cfg), &device)?;
        if resume_from.is_none() {
            // A checkpoint, when there is one, supersedes model.init_from.
            match &cfg.model.init_from {
                Some(dir) => {
                    model.load_hf(std::path::Path::new(dir))?;
                    console.line(&format!("init_from={dir}"));
                }
                None => model.init(t_cfg.seed)?,
            }
        }
        let acts = model.new_acts(bt.0, bt.1)?;
        let o = &cfg.optimizer;
        let opt = AdamW::new(
            AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay },
            &model.params(),
        )?;
        let mut run = Run {
            cfg,
            gpt,
            device,
            model,
            acts,
            opt,
            schedule: schedule(cfg),
            train_loader,
            val_loader,
            metrics,
            console,
            store,
            place,
            hooks,
            config_toml,
            step: 0,
            first_val: None,
            last_val: None,
            last_loss: f64::NAN,
            saved: None,
        };
        if let Some(from) = resume_from.as_mut() {
            run.restore(from)?;
        }
        Ok(run)
    }

    fn restore(&mut self, from: &mut Opened) -> Result<()> {
        let rank = self.place.rank;
        let pos = *from.manifest.state.data.iter().find(|d| d.rank == rank).ok_or_else(|| Error::Checkpoint {
            path: from.dir.join("manifest.json").display().to_string(),
            msg: format!("has no data position for rank {rank}"),
        })?;
        state::restore(from, &mut self.model, &mut self.opt, rank)?;
        let s = &from.manifest.state;
        self.train_loader.seek(LoaderPosition { epoch: pos.epoch, index: pos.index });
        self.step = from.manifest.step;
        self.first_val = s.first_val_loss;
        self.last_loss = s.last_train_loss.unwrap_or(f64::NAN);
        // A checkpoint elsewhere (another run's) does not count as saved here:
        // a stop before the next step must still leave one in checkpoint.dir.
        let ours = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        if from.dir.parent().and_then(ours).is_some_and(|d| Some(d) == ours(self.store.dir())) {
            self.saved = Some((self.step, from.dir.clone()));
        }
        self.console.line(&format!("resumed from {} at step {}", from.dir.display(), self.step));
        Ok(())
    }

    fn print_header(&self) {
        let t = &self.cfg.training;
        self.console.line(&format!(
            "model=gpt params={} n_layer={} n_head={} n_embd={} vocab={} device={} dtype={} tokens_per_step={} \
             train_batches_per_epoch={} metrics={} checkpoints={}",
            self.model.num_params(),
            self.gpt.n_layer,
            self.gpt.n_head,
            self.gpt.n_embd,
            self.gpt.vocab_size,
            self.model.device(),
            self.model.dtype(),
            t.micro_batch_size * t.seq_len * t.grad_accum_steps,
            self.train_loader.batches_per_epoch(),
            self.metrics.path().display(),
            self.store.dir().display()
        ));
    }

    fn evaluate(&mut self) -> Result<()> {
        let Some(loader) = self.val_loader.as_mut() else { return Ok(()) };
        let r = evaluate(&self.model, &mut self.acts, loader, self.cfg.eval.batches)?;
        self.metrics.log(&[
            ("step", Value::Int(self.step)),
            ("val_loss", Value::Fixed(r.loss, 4)),
            ("val_ppl", Value::Fixed(r.perplexity, 2)),
        ])?;
        self.first_val.get_or_insert(r.loss);
        self.last_val = Some(r.loss);
        Ok(())
    }

    /// Writes the checkpoint of the current step with the data at `position`.
    fn save(&mut self, position: LoaderPosition) -> Result<PathBuf> {
        let started = Instant::now();
        let c = self.cfg;
        let state = TrainerState {
            optimizer_step: self.opt.step,
            schedule_step: self.step,
            // Several ranks: every rank's position, gathered to rank 0.
            data: vec![DataPosition { rank: self.place.rank, epoch: position.epoch, index: position.index }],
            seed: c.training.seed,
            first_val_loss: self.first_val,
            last_train_loss: Some(self.last_loss).filter(|l| l.is_finite()),
            model: self.gpt.clone(),
            run: run_shape(c),
            config: self.config_toml.clone(),
        };
        let dir = state::save(&self.store, self.step, &self.model, &self.opt, &self.place, state, &self.hooks)?;
        let dir = dir.unwrap_or_else(|| self.store.step_dir(self.step));
        self.console.line(&format!(
            "checkpoint step={} dir={} secs={:.2}",
            self.step,
            dir.display(),
            started.elapsed().as_secs_f64()
        ));
        self.saved = Some((self.step, dir.clone()));
        Ok(dir)
    }

    /// The checkpoint of the current state: the one already written, or a new one.
    fn checkpoint_now(&mut self, position: LoaderPosition) -> Result<PathBuf> {
        match &self.saved {
            Some((step, dir)) if *step == self.step => Ok(dir.clone()),
            _ => self.save(position),
        }
    }

    /// One step's forward and backward over its micro-batches: (mean loss, gradient norm).
    fn forward_backward(&mut self, x: &mut [u32], y: &mut [u32]) -> Result<(f64, f64)> {
        let accum = self.cfg.training.grad_accum_steps;
        self.model.zero_grad()?;
        let mut loss = 0.0;
        for _ in 0..accum {
            self.train_loader.next_batch(x, y);
            self.model.forward_backward(&mut self.acts, x, y, 1.0 / accum as f64)?;
            loss += self.acts.mean_loss()? / accum as f64;
        }
        Ok((loss, global_grad_norm(&self.model.params())?))
    }

    /// Steps until `training.max_steps`, a stop signal or too many bad steps.
    fn train_steps(&mut self, stop: &StopSignal, timing: &mut Timing) -> Result<Outcome> {
        let t_cfg = &self.cfg.training;
        let tokens_per_step = t_cfg.micro_batch_size * t_cfg.seq_len * t_cfg.grad_accum_steps;
        // Model FLOPs utilization against the GPU's bf16 peak, as the peer benchmark computes it.
        let flops_per_step = self.gpt.flops_per_token(t_cfg.seq_len) * tokens_per_step as f64;
        let peak_flops = match &self.device {
            Device::Cuda(d) => d.bf16_peak_flops(),
            Device::Cpu => None,
        };
        let span = t_cfg.micro_batch_size * t_cfg.seq_len;
        let (mut x, mut y) = (vec![0u32; span], vec![0u32; span]);
        let (mut attempts, mut bad) = (0u64, 0u64);
        // Where the data stood after the last good step.
        let mut good_position = self.train_loader.position();
        loop {
            if let Some(signal) = stop.requested() {
                return self.stop_for(signal, good_position);
            }
            if self.step >= t_cfg.max_steps {
                return Ok(Outcome::Finished);
            }
            let started = Instant::now();
            attempts += 1;
            let (loss, norm) = self.forward_backward(&mut x, &mut y)?;
            let loss = self.hooks.loss(attempts, loss);
            let next = self.step + 1;
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
            let lr = self.schedule.lr(self.step);
            self.opt.update(self.model.params_mut(), lr, clip_coefficient(norm, t_cfg.grad_clip))?;
            self.step = next;
            self.last_loss = loss;
            good_position = self.train_loader.position();
            let secs = started.elapsed().as_secs_f64();
            timing.add(&self.device, secs, tokens_per_step);
            if self.step.is_multiple_of(self.cfg.logging.interval) || self.step == t_cfg.max_steps {
                let mut record = vec![
                    ("step", Value::Int(self.step)),
                    ("train_loss", Value::Fixed(loss, 4)),
                    ("lr", Value::Sci(lr)),
                    ("grad_norm", Value::Fixed(norm, 4)),
                    ("tok_per_s", Value::Fixed(tokens_per_step as f64 / secs, 0)),
                ];
                if let Some(peak) = peak_flops {
                    record.push(("mfu", Value::Fixed(flops_per_step / secs / peak, 3)));
                }
                if let Device::Cuda(d) = &self.device {
                    record.push(("peak_mem_gb", Value::Fixed(d.memory_stats().1 as f64 / 1e9, 2)));
                }
                self.metrics.log(&record)?;
            }
            self.console.progress(self.step, format!("loss {loss:.4}"));
            if stop.requested().is_some() {
                continue; // checkpoint and stop before anything else
            }
            let step = self.step;
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
        if self.step == 0 {
            self.console.line(&format!("stopped by {name} before the first step: nothing to save"));
        } else {
            self.console.line(&format!("stopped by {name} after step {}: writing a checkpoint", self.step));
            self.checkpoint_now(good_position)?;
        }
        Ok(Outcome::Stopped { signal })
    }

    /// Saves the last good state (the data position after its step, so that a
    /// resume sees the skipped batches again) and says what happened.
    fn diverged(&mut self, bad: u64, good_position: LoaderPosition) -> Error {
        let saved = match self.checkpoint_now(good_position) {
            Ok(dir) => format!("the last good state (step {}) is in checkpoint {}", self.step, dir.display()),
            Err(e) => format!("saving the last good state (step {}) failed: {e}", self.step),
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

/// Training throughput of this process, without its first step.
#[derive(Debug, Default)]
struct Timing {
    steps: u64,
    secs: f64,
    tokens: usize,
}

impl Timing {
    fn add(&mut self, device: &Device, secs: f64, tokens: usize) {
        self.steps += 1;
        if self.steps == 1 {
            // The first step pays one-time costs (lazy loading of library kernels).
            if let Device::Cuda(d) = device {
                d.reset_kernel_profile();
            }
            return;
        }
        self.secs += secs;
        self.tokens += tokens;
    }

    fn tokens_per_second(&self) -> f64 {
        if self.secs > 0.0 { self.tokens as f64 / self.secs } else { f64::NAN }
    }
}

/// Trains per `cfg`, resuming per `checkpoint.resume`, until `training.max_steps`
/// or until `stop` fires.
pub fn train(cfg: &Config, stop: &StopSignal) -> Result<TrainSummary> {
    // Data parallelism will pass these in.
    let (rank, world) = (0, 1);
    let mut run = Run::new(cfg, rank, world)?;
    run.print_header();
    if run.step == 0 {
        run.evaluate()?;
    }
    run.console.start_progress(run.step, cfg.training.max_steps);
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
        steps: run.step,
        final_train_loss: run.last_loss,
        first_val_loss: run.first_val,
        final_val_loss: run.last_val,
        tokens_per_second: timing.tokens_per_second(),
        peak_memory: match &run.device {
            Device::Cuda(d) => Some(d.memory_stats().1),
            Device::Cpu => None,
        },
        weights,
        checkpoint: run.saved.map(|s| s.1),
    })
}
