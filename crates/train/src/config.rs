//! The job configuration: TOML with the sections of DESIGN.md, unknown keys
//! refused, `--set section.key=value` overrides, and a validation step whose
//! errors name the key, the value and what is allowed.

use std::path::Path;

use serde::{Deserialize, Serialize};
use trainer_models::{ModelDesc, ModelSection};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the config came from, for error messages.
    #[serde(skip)]
    pub file: String,
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub lr_schedule: LrScheduleConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Glob pattern of training shards, e.g. "data/kjv/shards/train_*.bin".
    pub train: String,
    /// Glob pattern of validation shards; no evaluation without it.
    pub val: Option<String>,
    /// Image data only: training crops cover this fraction of the image's
    /// area up to all of it (torchvision's RandomResizedCrop; default 0.08;
    /// 1 = no crop).
    pub random_crop_min_area: Option<f64>,
    /// Image data only: flip training images left-right at random (default true).
    pub random_flip: Option<bool>,
    /// Image data only: validation reads the centre crop of this fraction of
    /// each side (default 1, the whole image; ImageNet's usual is 0.875).
    pub val_crop: Option<f64>,
}

impl DataConfig {
    /// The keys that apply to image data only and are set.
    pub fn image_keys_set(&self) -> Option<&'static str> {
        [
            ("data.random_crop_min_area", self.random_crop_min_area.is_some()),
            ("data.random_flip", self.random_flip.is_some()),
            ("data.val_crop", self.val_crop.is_some()),
        ]
        .into_iter()
        .find_map(|(k, set)| set.then_some(k))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Bf16,
}

/// `training.recompute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecomputeMode {
    /// Every block keeps its activations for the backward.
    #[default]
    None,
    /// Blocks drop their LayerNorm and GELU outputs and recompute them in the backward.
    Selective,
    /// Blocks keep only their output and run their forward again in the backward.
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub device: DeviceKind,
    pub dtype: Precision,
    pub micro_batch_size: usize,
    pub seq_len: usize,
    /// Micro-steps per optimizer step on each data-parallel rank; unset: 1, or
    /// derived from `global_batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum_steps: Option<usize>,
    /// Sequences per optimizer step over all data-parallel ranks (micro_batch_size
    /// x grad_accum_steps x parallel.dp); an alternative to grad_accum_steps that
    /// keeps the global batch whatever the number of ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    pub max_steps: u64,
    pub seed: u64,
    /// Global gradient-norm clipping threshold; 0 disables clipping.
    pub grad_clip: f64,
    /// CPU worker threads; 0 uses every core.
    pub cpu_threads: usize,
    /// A step with a non-finite loss or gradient norm is skipped (no update);
    /// this many in a row stop the run with a checkpoint of the last good state.
    pub max_bad_steps: u64,
    /// Activation recomputation: "none"; "selective" (each block drops its
    /// LayerNorm and GELU outputs, 6 of the 16 activation tensors of its
    /// size, and recomputes them in the backward: cheap elementwise passes);
    /// or "full" (each block keeps only its output and runs its forward
    /// again during the backward: the activation memory of one block instead
    /// of all, for one more forward pass). On the CPU the gradients are the
    /// same bit for bit.
    pub recompute: RecomputeMode,
    /// With recompute = "selective" or "full": only the first this many
    /// blocks recompute (unset: all), trading memory for speed block by block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute_layers: Option<usize>,
}

impl TrainingConfig {
    /// The recomputation the model is asked for.
    pub fn recompute(&self) -> trainer_nn::Recompute {
        let layers = self.recompute_layers.unwrap_or(usize::MAX);
        match self.recompute {
            RecomputeMode::None => trainer_nn::Recompute::None,
            RecomputeMode::Selective => trainer_nn::Recompute::Selective { layers },
            RecomputeMode::Full => trainer_nn::Recompute::Full { layers },
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            device: DeviceKind::Cpu,
            dtype: Precision::Fp32,
            micro_batch_size: 8,
            seq_len: 1024,
            grad_accum_steps: None,
            global_batch_size: None,
            max_steps: 1000,
            seed: 1337,
            grad_clip: 1.0,
            cpu_threads: 0,
            max_bad_steps: 5,
            recompute: RecomputeMode::None,
            recompute_layers: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// How `lr` changes with the number of data-parallel ranks: "none" (the
    /// default: `lr` is used as written) or "linear" (`lr` x parallel.dp, the
    /// rule of Goyal et al. for a global batch that grows with the ranks).
    pub lr_scaling: LrScaling,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, lr_scaling: LrScaling::None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    None,
    Linear,
}

/// The `[parallel]` section: how the processes `mpirun` starts share the work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Data-parallel ranks; unset: the number of processes / (tp x pp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks (only 1 so far).
    pub tp: usize,
    /// Pipeline stages (only 1 so far).
    pub pp: usize,
    /// 0: every rank holds the whole optimizer state; 1 (ZeRO-1): each
    /// data-parallel rank holds 1/dp of the master weights and moments.
    pub zero_stage: u32,
    /// Gradients are all-reduced in buckets of this many MiB.
    pub bucket_mb: f64,
    /// Start each bucket's all-reduce during the last micro-step's backward
    /// pass, as soon as its gradients are final (ZeRO stage 0), so that
    /// communication overlaps computation; false: all after the backward pass.
    pub overlap: bool,
    /// Thread blocks (NCCL channels) the overlapped all-reduces may use, on a
    /// communicator of their own; the buckets left for after the backward pass
    /// use NCCL's full choice. With NCCL's own choice the overlapped
    /// all-reduces slowed the backward kernels they ran beside by more than
    /// they hid (4 H200s, benches/RESULTS.md). 0: no cap.
    pub overlap_ctas: u32,
    /// A collective that has not completed within this many seconds aborts the
    /// job, naming the operation.
    pub timeout_secs: u64,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            dp: None,
            tp: 1,
            pp: 1,
            zero_stage: 0,
            bucket_mb: 25.0,
            overlap: true,
            overlap_ctas: 2,
            timeout_secs: 600,
        }
    }
}

/// The batch of one optimizer step, resolved against the number of
/// data-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    pub dp: usize,
    /// micro_batch_size x grad_accum_steps x dp sequences.
    pub global_batch_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayKind {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrScheduleConfig {
    pub kind: DecayKind,
    pub warmup_steps: u64,
    /// The rate decays to min_lr_ratio * optimizer.lr.
    pub min_lr_ratio: f64,
}

impl Default for LrScheduleConfig {
    fn default() -> Self {
        LrScheduleConfig { kind: DecayKind::Cosine, warmup_steps: 0, min_lr_ratio: 0.1 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Print and record a metrics line every this many steps (and the last step).
    pub interval: u64,
    /// Where metrics.jsonl and the final weights go.
    pub run_dir: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { interval: 1, run_dir: "runs/default".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many steps; 0 only at the end.
    pub interval: u64,
    /// Validation batches per evaluation (fixed: the same batches every time).
    pub batches: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { interval: 250, batches: 20 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Where checkpoints go; unset means `<logging.run_dir>/checkpoints`.
    pub dir: Option<String>,
    /// Write one every this many steps; 0 only at the end and on a stop signal.
    pub interval: u64,
    /// How many of the newest checkpoints to keep.
    pub keep_last: usize,
    /// "auto" (continue from the newest complete checkpoint in `dir`, if any),
    /// "none" (start afresh), or the path of one checkpoint directory.
    pub resume: String,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { dir: None, interval: 1000, keep_last: 3, resume: "auto".into() }
    }
}

/// What `checkpoint.resume` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    Auto,
    Never,
    From(std::path::PathBuf),
}

/// The config as a table, with `section.key=value` overrides applied. Values are
/// read as TOML (numbers, booleans, quoted strings); anything else as a string.
fn apply_override(table: &mut toml::Table, spec: &str, file: &str) -> Result<()> {
    let err = |msg: String| Error::Config { file: file.to_string(), msg };
    let Some((key, raw)) = spec.split_once('=') else {
        return Err(err(format!("--set {spec}: expected section.key=value")));
    };
    let Some((section, field)) = key.trim().split_once('.') else {
        return Err(err(format!("--set {spec}: the key must be section.key, e.g. training.max_steps")));
    };
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sec) = entry else {
        return Err(err(format!("--set {spec}: {section} is not a section")));
    };
    sec.insert(field.to_string(), value);
    Ok(())
}

/// The key (`section.key`) or section (`[section]`) written on the line of
/// byte offset `offset` in `src`, for errors the TOML parser reports only by
/// position (a duplicate key or section, a number out of range).
fn key_at(src: &str, offset: usize) -> Option<String> {
    let (line, _) = line_col(src, offset);
    let mut section = String::new();
    for (i, text) in src.lines().enumerate() {
        let text = text.trim();
        let header = text.strip_prefix('[').and_then(|t| t.split(']').next()).map(|t| t.trim_matches('[').trim());
        if i + 1 == line {
            if let Some(h) = header {
                return Some(format!("[{h}]"));
            }
            let key = text.split('=').next()?.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('#') {
                return None;
            }
            return Some(if section.is_empty() { key.to_string() } else { format!("{section}.{key}") });
        }
        if let Some(h) = header {
            section = h.to_string();
        }
    }
    None
}

/// "line L, column C" of a byte offset in `src`.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Config {
    /// Reads, overrides, deserializes and validates a config file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let file = path.display().to_string();
        let src =
            std::fs::read_to_string(path).map_err(|e| Error::Config { file: file.clone(), msg: e.to_string() })?;
        Self::from_toml(&src, &file, overrides)
    }

    /// `file` names the source in error messages.
    pub fn from_toml(src: &str, file: &str, overrides: &[String]) -> Result<Config> {
        let err = |msg: String| Error::Config { file: file.to_string(), msg };
        let mut table: toml::Table = toml::from_str(src).map_err(|e| {
            let msg = e.message().trim().replace('\n', " ");
            match e.span().map(|s| s.start) {
                Some(offset) => {
                    let (l, c) = line_col(src, offset);
                    let key = key_at(src, offset).map_or(String::new(), |k| format!("{k}: "));
                    err(format!("{key}invalid TOML at line {l}, column {c}: {msg}"))
                }
                None => err(format!("invalid TOML: {msg}")),
            }
        })?;
        for o in overrides {
            apply_override(&mut table, o, file)?;
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            let mut inner = e.into_inner().to_string().replace('\n', " ").trim_end().to_string();
            // toml repeats the key as a trailing " in `a.b`"; the path already says it.
            if let Some(i) = inner.rfind(" in `").filter(|_| inner.ends_with('`')) {
                inner.truncate(i);
            }
            if path == "." { err(inner) } else { err(format!("{path}: {inner}")) }
        })?;
        config.validate().map_err(err)?;
        config.file = file.to_string();
        Ok(config)
    }

    /// The directory of this run's checkpoints.
    pub fn checkpoint_dir(&self) -> std::path::PathBuf {
        match &self.checkpoint.dir {
            Some(d) => d.into(),
            None => Path::new(&self.logging.run_dir).join("checkpoints"),
        }
    }

    pub fn resume(&self) -> Resume {
        match self.checkpoint.resume.as_str() {
            "auto" => Resume::Auto,
            "none" => Resume::Never,
            path => Resume::From(path.into()),
        }
    }

    /// An error about this config (the message names the key).
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::Config { file: self.file.clone(), msg: msg.into() }
    }

    /// The model the `[model]` section describes.
    pub fn model_desc(&self) -> std::result::Result<ModelDesc, String> {
        self.model.resolve()
    }

    fn validate_parallel(&self) -> std::result::Result<(), String> {
        let p = &self.parallel;
        if p.dp == Some(0) {
            return Err("parallel.dp = 0: must be at least 1 (or left out: the number of processes)".into());
        }
        for (key, v, what) in [("tp", p.tp, "tensor"), ("pp", p.pp, "pipeline")] {
            if v != 1 {
                return Err(format!("parallel.{key} = {v}: {what} parallelism is not supported yet; use 1"));
            }
        }
        if p.zero_stage > 1 {
            return Err(format!(
                "parallel.zero_stage = {}: allowed are 0 (no sharding) and 1 (optimizer state sharded)",
                p.zero_stage
            ));
        }
        if !(p.bucket_mb.is_finite() && p.bucket_mb > 0.0) {
            return Err(format!(
                "parallel.bucket_mb = {}: must be a number > 0 (MiB per all-reduce bucket)",
                p.bucket_mb
            ));
        }
        if p.timeout_secs == 0 {
            return Err("parallel.timeout_secs = 0: must be at least 1".into());
        }
        // NCCL has at most 64 channels (MAXCHANNELS).
        if p.overlap_ctas > 64 {
            return Err(format!(
                "parallel.overlap_ctas = {}: allowed are 0 (NCCL chooses) to 64 thread blocks",
                p.overlap_ctas
            ));
        }
        Ok(())
    }

    /// The settings of the communication layer.
    pub fn comm_options(&self) -> trainer_comm::CommOptions {
        let p = &self.parallel;
        // Only overlapped buckets use the background communicator: without
        // overlap (or under ZeRO-1, which never overlaps) it is not created.
        let background_ctas = if p.overlap && p.zero_stage == 0 { p.overlap_ctas } else { 0 };
        trainer_comm::CommOptions { timeout: std::time::Duration::from_secs(p.timeout_secs), background_ctas }
    }

    /// The mesh sizes as written (dp unset: inferred from the world).
    pub fn mesh_spec(&self) -> trainer_comm::MeshSpec {
        trainer_comm::MeshSpec { dp: self.parallel.dp, tp: self.parallel.tp, pp: self.parallel.pp }
    }

    /// The step's batch with `dp` data-parallel ranks: grad_accum_steps as
    /// given, or derived from global_batch_size (which must divide evenly).
    pub fn batch(&self, dp: usize) -> std::result::Result<BatchShape, String> {
        let t = &self.training;
        let micro = t.micro_batch_size;
        let accum = match (t.global_batch_size, t.grad_accum_steps) {
            (Some(g), _) => {
                let per_step = micro * dp;
                if g % per_step != 0 {
                    return Err(format!(
                        "training.global_batch_size = {g} is not a multiple of training.micro_batch_size x \
                         parallel.dp = {micro} x {dp} = {per_step}: change training.global_batch_size, \
                         training.micro_batch_size or the number of processes"
                    ));
                }
                g / per_step
            }
            (None, a) => a.unwrap_or(1),
        };
        Ok(BatchShape { micro_batch_size: micro, grad_accum_steps: accum, dp, global_batch_size: micro * accum * dp })
    }

    /// The peak learning rate with `dp` data-parallel ranks (see `optimizer.lr_scaling`).
    pub fn peak_lr(&self, dp: usize) -> f64 {
        match self.optimizer.lr_scaling {
            LrScaling::None => self.optimizer.lr,
            LrScaling::Linear => self.optimizer.lr * dp as f64,
        }
    }

    /// Range checks that the types cannot express. Each message names the key,
    /// the value given and what is allowed.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.model_desc()?;
        let max_seq_len = self.model.max_seq_len()?;
        let t = &self.training;
        let at_least_1 = |k: &str, v: u64| if v >= 1 { Ok(()) } else { Err(format!("{k} = {v}: must be at least 1")) };
        at_least_1("training.micro_batch_size", t.micro_batch_size as u64)?;
        at_least_1("training.seq_len", t.seq_len as u64)?;
        if let Some(a) = t.grad_accum_steps {
            at_least_1("training.grad_accum_steps", a as u64)?;
        }
        if let Some(g) = t.global_batch_size {
            at_least_1("training.global_batch_size", g as u64)?;
            if t.grad_accum_steps.is_some() {
                return Err(format!(
                    "training.global_batch_size = {g} and training.grad_accum_steps = {} are both set: give one \
                     (global_batch_size = micro_batch_size x grad_accum_steps x parallel.dp)",
                    t.grad_accum_steps.unwrap_or(1)
                ));
            }
            if !g.is_multiple_of(t.micro_batch_size) {
                return Err(format!(
                    "training.global_batch_size = {g} is not a multiple of training.micro_batch_size = {}",
                    t.micro_batch_size
                ));
            }
        }
        self.validate_parallel()?;
        at_least_1("training.max_steps", t.max_steps)?;
        at_least_1("logging.interval", self.logging.interval)?;
        at_least_1("eval.batches", self.eval.batches as u64)?;
        at_least_1("training.max_bad_steps", t.max_bad_steps)?;
        if let Some(n) = t.recompute_layers {
            if t.recompute == RecomputeMode::None {
                return Err(format!(
                    "training.recompute_layers = {n} needs training.recompute = \"selective\" or \"full\" (it limits \
                     which blocks recompute)"
                ));
            }
            at_least_1("training.recompute_layers", n as u64)?;
        }
        at_least_1("checkpoint.keep_last", self.checkpoint.keep_last as u64)?;
        if self.checkpoint.dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(
                "checkpoint.dir is empty: give a directory, or leave it out for <logging.run_dir>/checkpoints".into()
            );
        }
        if self.checkpoint.resume.trim().is_empty() {
            return Err(
                "checkpoint.resume is empty: use \"auto\", \"none\" or the path of a checkpoint directory".into()
            );
        }
        if let Some(a) = self.data.random_crop_min_area.filter(|a| !(*a > 0.0 && *a <= 1.0)) {
            return Err(format!("data.random_crop_min_area = {a}: must be above 0 and at most 1 (1 = no crop)"));
        }
        if let Some(c) = self.data.val_crop.filter(|c| !(*c > 0.0 && *c <= 1.0)) {
            return Err(format!("data.val_crop = {c}: must be above 0 and at most 1 (1 = the whole image)"));
        }
        match (max_seq_len, self.data.image_keys_set()) {
            (Some(_), Some(key)) => {
                return Err(format!("{key} applies to image data; this model reads token windows"));
            }
            (None, _) if t.seq_len != TrainingConfig::default().seq_len => {
                return Err(format!(
                    "training.seq_len = {}: an image model takes no sequence length (its tokens come from \
                     model.image_size and model.patch_size); remove it",
                    t.seq_len
                ));
            }
            _ => {}
        }
        if let Some(max_seq_len) = max_seq_len.filter(|&m| t.seq_len > m) {
            return Err(format!(
                "training.seq_len = {}: must not exceed the model's block_size ({max_seq_len})",
                t.seq_len
            ));
        }
        if t.dtype == Precision::Bf16 && t.device == DeviceKind::Cpu {
            return Err(
                "training.dtype = \"bf16\": bf16 compute runs on GPUs; set training.device = \"cuda\" or use \"fp32\""
                    .into(),
            );
        }
        let finite_nonneg = |k: &str, v: f64| {
            if v.is_finite() && v >= 0.0 { Ok(()) } else { Err(format!("{k} = {v}: must be a finite number >= 0")) }
        };
        finite_nonneg("training.grad_clip", t.grad_clip)?;
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(format!("optimizer.lr = {}: must be a finite number > 0", o.lr));
        }
        for (k, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{k} = {v}: must be in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(format!("optimizer.eps = {}: must be a finite number > 0", o.eps));
        }
        finite_nonneg("optimizer.weight_decay", o.weight_decay)?;
        let r = self.lr_schedule.min_lr_ratio;
        if !(0.0..=1.0).contains(&r) {
            return Err(format!("lr_schedule.min_lr_ratio = {r}: must be in [0, 1]"));
        }
        if self.data.train.trim().is_empty() {
            return Err("data.train is empty: give a glob pattern of training shards".into());
        }
        if self.logging.run_dir.trim().is_empty() {
            return Err("logging.run_dir is empty: give a directory for metrics and weights".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
preset = "test"
[data]
train = "x/train_*.bin"
"#;

    fn load(extra: &str, overrides: &[&str]) -> std::result::Result<Config, String> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::from_toml(&format!("{BASE}{extra}"), "t.toml", &o).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = load(
            "[training]\nseq_len = 16\n",
            &["training.max_steps=50", "optimizer.lr=3e-4", "logging.run_dir=runs/x"],
        )
        .unwrap();
        assert_eq!(c.training.max_steps, 50);
        assert_eq!(c.optimizer.lr, 3e-4);
        assert_eq!(c.logging.run_dir, "runs/x");
        assert_eq!(c.training.seq_len, 16);
        assert_eq!(c.model_desc().unwrap().config["n_embd"], 32);
        assert_eq!(c.checkpoint_dir(), Path::new("runs/x/checkpoints"));
        assert_eq!(c.resume(), Resume::Auto);
        let c = load("[checkpoint]\ndir = \"ck\"\nresume = \"ck/step_00000010\"\n", &[]).unwrap();
        assert_eq!(c.checkpoint_dir(), Path::new("ck"));
        assert_eq!(c.resume(), Resume::From("ck/step_00000010".into()));
        assert_eq!(load("", &["checkpoint.resume=none"]).unwrap().resume(), Resume::Never);
    }

    #[test]
    fn errors_name_the_key_and_what_is_allowed() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("[training]\nlr = 1\n", &[], &["t.toml", "training", "lr"]),
            ("", &["training.micro_batch_size=0"], &["training.micro_batch_size = 0", "at least 1"]),
            ("", &["optimizer.lr=-1"], &["optimizer.lr = -1", "> 0"]),
            ("", &["training.device=\"gpu\""], &["training.device", "cpu", "cuda"]),
            ("", &["training.seq_len=\"long\""], &["training.seq_len", "string"]),
            ("", &["model.preset=\"huge\""], &["model.preset", "gpt2-124m"]),
            ("", &["training.dtype=\"bf16\""], &["training.dtype", "cuda"]),
            ("", &["training.seq_len=4096"], &["training.seq_len = 4096", "block_size"]),
            ("", &["model.n_head=5"], &["model.n_embd", "model.n_head"]),
            ("", &["nosection"], &["section.key"]),
            ("[bogus]\nx = 1\n", &[], &["bogus"]),
            ("", &["checkpoint.keep_last=0"], &["checkpoint.keep_last = 0", "at least 1"]),
            ("", &["checkpoint.resume=\"\""], &["checkpoint.resume", "auto", "none"]),
            ("", &["checkpoint.dir=\" \""], &["checkpoint.dir is empty"]),
            ("", &["checkpoint.every=5"], &["checkpoint.every", "interval"]),
            ("", &["training.max_bad_steps=0"], &["training.max_bad_steps = 0", "at least 1"]),
            ("[training\n", &[], &["line", "column"]),
            // Errors the TOML parser reports by position alone name the key too.
            ("[training]\nmax_steps = 5\nmax_steps = 6\n", &[], &["t.toml", "training.max_steps", "line"]),
            ("[training]\nmax_steps = 18446744073709551616\n", &[], &["t.toml", "training.max_steps:", "line"]),
            ("[training]\nseed = 1\n[training]\nseed = 2\n", &[], &["t.toml", "[training]", "line"]),
            ("[eval]\n\"batches\" = 1\n\"batches\" = 2\n", &[], &["eval.batches", "line"]),
        ];
        for (extra, overrides, needles) in cases {
            let e = load(extra, overrides).unwrap_err();
            assert!(!e.contains('\n'), "one line: {e}");
            for n in *needles {
                assert!(e.contains(n), "{extra:?} {overrides:?}: {e:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn global_batch_and_parallel_settings() {
        let c = load("", &[]).unwrap();
        assert_eq!((c.parallel.zero_stage, c.parallel.bucket_mb, c.parallel.overlap), (0, 25.0, true));
        assert_eq!(c.mesh_spec(), trainer_comm::MeshSpec { dp: None, tp: 1, pp: 1 });
        assert_eq!(c.comm_options().timeout, std::time::Duration::from_secs(600));
        // Overlapped buckets get a communicator of 2 thread blocks; without
        // overlap, or under ZeRO-1 (never overlapped), there is none.
        assert_eq!(c.comm_options().background_ctas, 2);
        for (sets, ctas) in [
            (&["parallel.overlap_ctas=0"][..], 0),
            (&["parallel.overlap_ctas=8"], 8),
            (&["parallel.overlap=false"], 0),
            (&["parallel.zero_stage=1"], 0),
        ] {
            assert_eq!(load("", sets).unwrap().comm_options().background_ctas, ctas, "{sets:?}");
        }
        let b = c.batch(4).unwrap();
        assert_eq!((b.grad_accum_steps, b.global_batch_size), (1, 32));

        let c = load("", &["training.global_batch_size=64", "training.micro_batch_size=4"]).unwrap();
        assert_eq!(c.batch(1).unwrap().grad_accum_steps, 16);
        assert_eq!(c.batch(4).unwrap().grad_accum_steps, 4);
        assert_eq!(c.batch(16).unwrap().grad_accum_steps, 1);
        let e = c.batch(32).unwrap_err();
        assert!(e.contains("training.global_batch_size = 64 is not a multiple of training.micro_batch_size x parallel.dp = 4 x 32 = 128"), "{e}");
        // The written config keeps what was given (a resume re-derives it).
        let again = Config::from_toml(&toml::to_string(&c).unwrap(), "again.toml", &[]).unwrap();
        assert_eq!((again.training.global_batch_size, again.training.grad_accum_steps), (Some(64), None));

        let c = load("", &["training.grad_accum_steps=3"]).unwrap();
        assert_eq!(c.batch(2).unwrap().global_batch_size, 8 * 3 * 2);

        assert_eq!(c.peak_lr(4), 6e-4);
        let c = load("", &["optimizer.lr_scaling=\"linear\"", "optimizer.lr=1e-3"]).unwrap();
        assert_eq!(c.peak_lr(4), 4e-3);
    }

    #[test]
    fn parallel_errors_name_the_key() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["parallel.tp=2"], &["parallel.tp = 2", "not supported yet"]),
            (&["parallel.pp=4"], &["parallel.pp = 4", "pipeline", "not supported yet"]),
            (&["parallel.dp=0"], &["parallel.dp = 0", "at least 1"]),
            (&["parallel.zero_stage=3"], &["parallel.zero_stage = 3", "0", "1"]),
            (&["parallel.bucket_mb=0"], &["parallel.bucket_mb = 0", "> 0"]),
            (&["parallel.timeout_secs=0"], &["parallel.timeout_secs = 0"]),
            (&["parallel.overlap_ctas=65"], &["parallel.overlap_ctas = 65", "0", "64"]),
            (&["parallel.overlap_ctas=-1"], &["parallel.overlap_ctas"]),
            (&["parallel.world=2"], &["parallel", "world"]),
            (&["optimizer.lr_scaling=\"sqrt\""], &["optimizer.lr_scaling", "none", "linear"]),
            (
                &["training.global_batch_size=64", "training.grad_accum_steps=2"],
                &["training.global_batch_size = 64", "training.grad_accum_steps = 2", "both"],
            ),
            (&["training.global_batch_size=20"], &["training.global_batch_size = 20", "training.micro_batch_size = 8"]),
            (&["training.global_batch_size=0"], &["training.global_batch_size = 0", "at least 1"]),
        ];
        for (overrides, needles) in cases {
            let e = load("", overrides).unwrap_err();
            for n in *needles {
                assert!(e.contains(n), "{overrides:?}: {e:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn explicit_model_needs_every_size() {
        let src = "[model]\nn_layer = 2\nn_head = 2\n[data]\ntrain = \"x\"\n";
        let e = Config::from_toml(src, "m.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("model.n_embd is required"), "{e}");
    }
}

#[cfg(test)]
mod shipped {
    /// Every config in configs/ loads and validates.
    #[test]
    fn shipped_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                super::Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "found {n} configs in {}", dir.display());
    }
}
