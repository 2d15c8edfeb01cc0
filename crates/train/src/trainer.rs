//! The training loop: micro-batches with gradient accumulation, global-norm
//! clipping, AdamW on a schedule, periodic evaluation, one metrics line per
//! logged step, and the final weights written to the run directory.

use std::path::PathBuf;
use std::time::Instant;

use trainer_core::{DType, Device};
use trainer_data::{BatchLoader, Shard, find_files};
use trainer_models::gpt::Gpt;
use trainer_nn::{AdamW, AdamWConfig, Decay, LrSchedule, Module, clip_coefficient, global_grad_norm};

use crate::config::{Config, DecayKind, DeviceKind, Precision};
use crate::eval::evaluate;
use crate::metrics::{Metrics, Value};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub first_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    /// Mean training throughput, excluding the first step (warm-up) and evaluation.
    pub tokens_per_second: f64,
    /// Peak bytes held by tensors on the GPU (None on the CPU).
    pub peak_memory: Option<usize>,
    pub weights: PathBuf,
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
/// against the vocabulary, and builds a loader over them.
pub(crate) fn open_loader(
    key: &str,
    pattern: &str,
    vocab_size: usize,
    b: usize,
    t: usize,
    seed: u64,
    shuffle: bool,
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
    BatchLoader::new(shards, b, t, seed, shuffle, 0, 1).map_err(ctx)
}

pub fn train(cfg: &Config) -> Result<TrainSummary> {
    let gpt = cfg.gpt().map_err(|msg| cfg.error(msg))?;
    let device = open_device(cfg)?;
    let t_cfg = &cfg.training;
    let (b, t, accum) = (t_cfg.micro_batch_size, t_cfg.seq_len, t_cfg.grad_accum_steps);

    // Data first: a missing or corrupt shard should fail before any model work.
    let mut train_loader = open_loader("data.train", &cfg.data.train, gpt.vocab_size, b, t, t_cfg.seed, true)?;
    let mut val_loader = match cfg.data.val.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => Some(open_loader("data.val", p, gpt.vocab_size, b, t, t_cfg.seed, false)?),
        None => None,
    };

    let mut model = Gpt::new(gpt.clone(), compute_dtype(cfg), &device)?;
    match &cfg.model.init_from {
        Some(dir) => {
            model.load_hf(std::path::Path::new(dir))?;
            println!("init_from={dir}");
        }
        None => model.init(t_cfg.seed)?,
    }
    let mut acts = model.new_acts(b, t)?;
    let o = &cfg.optimizer;
    let mut opt = AdamW::new(
        AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay },
        &model.params(),
    )?;
    let schedule = LrSchedule {
        base_lr: o.lr,
        min_lr: o.lr * cfg.lr_schedule.min_lr_ratio,
        warmup_steps: cfg.lr_schedule.warmup_steps,
        total_steps: t_cfg.max_steps,
        decay: match cfg.lr_schedule.kind {
            DecayKind::Cosine => Decay::Cosine,
            DecayKind::Linear => Decay::Linear,
            DecayKind::Constant => Decay::Constant,
        },
    };
    let run_dir = PathBuf::from(&cfg.logging.run_dir);
    let mut metrics = Metrics::open(&run_dir)?;
    let tokens_per_step = b * t * accum;
    // Model FLOPs utilization against the GPU's bf16 peak, as the peer benchmark computes it.
    let flops_per_step = gpt.flops_per_token(t) * tokens_per_step as f64;
    let peak_flops = match &device {
        Device::Cuda(d) => d.bf16_peak_flops(),
        Device::Cpu => None,
    };
    println!(
        "model=gpt params={} n_layer={} n_head={} n_embd={} vocab={} device={} dtype={} tokens_per_step={} \
         train_batches_per_epoch={} metrics={}",
        model.num_params(),
        gpt.n_layer,
        gpt.n_head,
        gpt.n_embd,
        gpt.vocab_size,
        model.device(),
        model.dtype(),
        tokens_per_step,
        train_loader.batches_per_epoch(),
        metrics.path().display()
    );

    let span = b * t;
    let (mut x, mut y) = (vec![0u32; span], vec![0u32; span]);
    let (mut first_val, mut last_val) = (None, None);
    let mut run_eval = |step: u64, model: &Gpt, acts: &mut _, metrics: &mut Metrics| -> Result<()> {
        if let Some(loader) = val_loader.as_mut() {
            let r = evaluate(model, acts, loader, cfg.eval.batches)?;
            metrics.log(&[
                ("step", Value::Int(step)),
                ("val_loss", Value::Fixed(r.loss, 4)),
                ("val_ppl", Value::Fixed(r.perplexity, 2)),
            ])?;
            first_val.get_or_insert(r.loss);
            last_val = Some(r.loss);
        }
        Ok(())
    };
    run_eval(0, &model, &mut acts, &mut metrics)?;

    let (mut timed_secs, mut timed_tokens, mut last_loss) = (0.0, 0usize, f64::NAN);
    for step in 1..=t_cfg.max_steps {
        let started = Instant::now();
        model.zero_grad()?;
        let mut loss = 0.0;
        for _ in 0..accum {
            train_loader.next_batch(&mut x, &mut y);
            model.forward_backward(&mut acts, &x, &y, 1.0 / accum as f64)?;
            loss += acts.mean_loss()? / accum as f64;
        }
        let norm = global_grad_norm(&model.params())?;
        let lr = schedule.lr(step - 1);
        if !(loss.is_finite() && norm.is_finite()) {
            metrics.log(&[
                ("step", Value::Int(step)),
                ("train_loss", Value::Fixed(loss, 4)),
                ("grad_norm", Value::Fixed(norm, 4)),
            ])?;
            return Err(Error::Diverged(format!(
                "step {step}: non-finite loss ({loss}) or gradient norm ({norm}); the update was not applied. \
                 Lower optimizer.lr (now {}) or check the data",
                o.lr
            )));
        }
        opt.update(model.params_mut(), lr, clip_coefficient(norm, t_cfg.grad_clip))?;
        let secs = started.elapsed().as_secs_f64();
        if step == 1 {
            // The first step pays one-time costs (lazy loading of library kernels).
            if let Device::Cuda(d) = &device {
                d.reset_kernel_profile();
            }
        }
        if step > 1 {
            timed_secs += secs;
            timed_tokens += tokens_per_step;
        }
        last_loss = loss;
        if step % cfg.logging.interval == 0 || step == t_cfg.max_steps {
            let mut record = vec![
                ("step", Value::Int(step)),
                ("train_loss", Value::Fixed(loss, 4)),
                ("lr", Value::Sci(lr)),
                ("grad_norm", Value::Fixed(norm, 4)),
                ("tok_per_s", Value::Fixed(tokens_per_step as f64 / secs, 0)),
            ];
            if let Some(peak) = peak_flops {
                record.push(("mfu", Value::Fixed(flops_per_step / secs / peak, 3)));
            }
            metrics.log(&record)?;
        }
        let eval_now = cfg.eval.interval > 0 && step % cfg.eval.interval == 0;
        if eval_now || step == t_cfg.max_steps {
            run_eval(step, &model, &mut acts, &mut metrics)?;
        }
    }
    if let Device::Cuda(d) = &device {
        let profile = d.kernel_profile();
        if !profile.is_empty() {
            let total: f64 = profile.iter().map(|p| p.2).sum();
            println!(
                "kernel profile (steps 2-{}, each launch timed alone): total {:.1} ms",
                t_cfg.max_steps,
                total * 1e3
            );
            for (name, calls, secs) in &profile {
                println!("  {:>6.1}% {:>10.3} ms {:>7} calls  {name}", 100.0 * secs / total, secs * 1e3, calls);
            }
        }
    }
    let weights = run_dir.join("model.safetensors");
    model.save_weights(&weights)?;
    Ok(TrainSummary {
        steps: t_cfg.max_steps,
        final_train_loss: last_loss,
        first_val_loss: first_val,
        final_val_loss: last_val,
        tokens_per_second: if timed_secs > 0.0 { timed_tokens as f64 / timed_secs } else { f64::NAN },
        peak_memory: match &device {
            Device::Cuda(d) => Some(d.memory_stats().1),
            Device::Cpu => None,
        },
        weights,
    })
}
