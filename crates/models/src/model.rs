//! The seam between the trainer and a model: everything the training loop,
//! data parallelism, checkpoints and evaluation need of a model, and nothing
//! of which model it is. GPT-2 implements it; a Vision Transformer is the
//! next. Models know nothing of parallelism: the trainer's wrappers read and
//! write their parameters and hear, through [`GradsReady`], when a
//! parameter's gradient is final.

use std::any::Any;
use std::path::Path;

use trainer_core::{DType, Device};
use trainer_data::Batch;
use trainer_nn::{Module, Param, ParamId, Recompute};

use crate::Result;

/// Told, during a backward pass, that the gradients of the parameters `ids`
/// are final for this micro-batch; `params` are all of the model's
/// parameters (in [`Module::params`] order), to read those gradients from.
/// An error stops the backward pass and is returned from it.
pub type GradsReady<'a> = dyn FnMut(&[&Param], &[ParamId]) -> ReadyResult + 'a;

/// What a [`GradsReady`] callback returns: its own error, boxed.
pub type ReadyResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A [`GradsReady`] that does nothing.
pub fn ignore_ready(_: &[&Param], _: &[ParamId]) -> ReadyResult {
    Ok(())
}

/// Activations of one micro-batch shape, allocated once by
/// [`Model::new_acts`] and reused; only the model that made them reads them.
#[derive(Debug)]
pub struct Acts(Box<dyn Any + Send>);

impl Acts {
    pub fn new<T: Any + Send>(acts: T) -> Acts {
        Acts(Box::new(acts))
    }

    /// The model's own activations, or an error when they belong to another model.
    pub fn get_mut<T: Any>(&mut self, model: &str) -> Result<&mut T> {
        self.0
            .downcast_mut::<T>()
            .ok_or_else(|| crate::Error::Config(format!("{model}: activations of another model were passed")))
    }
}

/// The model's kind and shape as data: the manifest and weights files carry
/// it, a resume compares it field by field, and [`crate::build`] rebuilds
/// the model from it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelDesc {
    /// "gpt"
    pub kind: String,
    /// The model's own config (for GPT-2: vocab_size, block_size, n_layer, n_head, n_embd).
    pub config: serde_json::Value,
}

/// What a model reads from the data, for the loaders to check before training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSpec {
    /// Token windows: every id below `vocab_size`, at most `max_len` positions.
    Tokens { vocab_size: usize, max_len: usize },
    /// Square images of `size` x `size` pixels with `channels` channels, labels below `classes`.
    Images { size: usize, channels: usize, classes: usize },
}

impl InputSpec {
    /// What one sample is, for throughput: "tok" (a token of a window) or "img".
    pub fn unit(&self) -> &'static str {
        match self {
            InputSpec::Tokens { .. } => "tok",
            InputSpec::Images { .. } => "img",
        }
    }
}

/// One evaluated batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchEval {
    /// The batch's mean loss.
    pub loss: f64,
    /// A classifier's hits: how many samples have their label as the top
    /// logit, and among the top five.
    pub hits: Option<Hits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hits {
    pub top1: usize,
    pub top5: usize,
}

/// A model the trainer can drive (see the module comment). Parameters have
/// stable names (checkpoints and other frameworks' weights are matched by
/// them) and ids (the gradient callbacks name them).
pub trait Model: Module + std::fmt::Debug + Send {
    fn desc(&self) -> ModelDesc;

    /// The shape in `key=value` words for the start-up line, e.g.
    /// `n_layer=12 n_head=12 n_embd=768 vocab=50257`.
    fn summary(&self) -> String;

    fn input(&self) -> InputSpec;

    fn dtype(&self) -> DType;

    fn device(&self) -> &Device;

    /// The model's own initialization, deterministic in `seed`.
    fn init(&mut self, seed: u64) -> Result<()>;

    /// Starts from another framework's weights (`model.init_from`).
    fn load_pretrained(&mut self, dir: &Path) -> Result<()>;

    /// Which blocks recompute their forward during the backward, for the
    /// activations [`Model::new_acts`] makes from now on. A model without
    /// blocks to recompute refuses anything but none.
    fn set_recompute(&mut self, recompute: Recompute) -> Result<()> {
        match recompute {
            Recompute::None => Ok(()),
            _ => Err(crate::Error::Config(format!("a {} model does not recompute activations", self.desc().kind))),
        }
    }

    /// Activation buffers for micro-batches shaped like `batch`.
    fn new_acts(&self, batch: &Batch) -> Result<Acts>;

    /// Forward and backward of one micro-batch: parameter gradients
    /// accumulate (`+=`) the gradient of `loss_scale` x the batch's mean loss,
    /// and `ready` hears of each group of parameters as its gradients become
    /// final. Returns the batch's mean loss (unscaled).
    fn forward_backward(
        &mut self,
        acts: &mut Acts,
        batch: &Batch,
        loss_scale: f64,
        ready: &mut GradsReady<'_>,
    ) -> Result<f64>;

    /// The batch's mean loss (and a classifier's hits), without gradients.
    fn evaluate(&self, acts: &mut Acts, batch: &Batch) -> Result<BatchEval>;

    /// Model FLOPs of one training sample (forward and backward) of `batch`'s
    /// shape, as the peer benchmarks count them for MFU.
    fn flops_per_sample(&self, batch: &Batch) -> f64;

    /// Throughput units in one sample of `batch`'s shape: tokens of a window,
    /// or 1 (an image).
    fn units_per_sample(&self, batch: &Batch) -> usize;

    /// Every parameter (host copies) and the model's description (metadata)
    /// to a safetensors file, atomically.
    fn save_weights(&self, path: &Path) -> Result<()>;
}
