//! What a model consumes, behind one loader interface: the trainer asks a
//! [`Loader`] for the next micro-batch of this rank and hands it to the
//! model without knowing what is inside. Every loader gives the same
//! guarantees: disjoint per-rank slices of each global batch, an order fixed
//! by the seed, and a [`LoaderPosition`] that resumes it exactly on any number
//! of data-parallel ranks.

use crate::LoaderPosition;

/// One micro-batch of one rank, in host memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// A language model's window: `inputs` (B*T token ids, row-major (B, T))
    /// and `targets`, the same tokens shifted by one.
    Tokens { b: usize, t: usize, inputs: Vec<u32>, targets: Vec<u32> },
    /// Labelled images: `pixels` (B, H, W, C) uint8 as stored, after the
    /// loader's crop and flip (normalization is the model's, on its device),
    /// and `labels` (B) class ids.
    Images { b: usize, height: usize, width: usize, channels: usize, pixels: Vec<u8>, labels: Vec<u32> },
}

impl Batch {
    /// A zeroed token batch of (b, t).
    pub fn tokens(b: usize, t: usize) -> Batch {
        Batch::Tokens { b, t, inputs: vec![0; b * t], targets: vec![0; b * t] }
    }

    /// Samples in the batch (sequences or images).
    pub fn samples(&self) -> usize {
        match self {
            Batch::Tokens { b, .. } | Batch::Images { b, .. } => *b,
        }
    }

    /// What the batch holds, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Batch::Tokens { .. } => "token windows",
            Batch::Images { .. } => "images",
        }
    }
}

/// A source of micro-batches for one data-parallel rank.
pub trait Loader: std::fmt::Debug {
    /// A batch of the shape this loader fills, to be reused for every call.
    fn new_batch(&self) -> Batch;
    /// Fills `batch` with this rank's next micro-batch (starting the next
    /// epoch when this one is used up).
    fn next_batch(&mut self, batch: &mut Batch);
    /// Where the loader stands: enough to resume it exactly.
    fn position(&self) -> LoaderPosition;
    /// Jumps to a position (from a checkpoint, or back to the start).
    fn seek(&mut self, pos: LoaderPosition);
    /// Micro-batches of one rank in the data (all ranks together read all but
    /// the last `micro_batches() % ranks` of each epoch).
    fn micro_batches(&self) -> usize;
    /// Micro-batches each rank gets per epoch.
    fn batches_per_epoch(&self) -> usize;
}
