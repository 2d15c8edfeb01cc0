//! Model definitions. A model composes `trainer-nn` layers, owns its parameter
//! naming and initialization, and knows nothing of devices beyond passing one
//! through, nor of parallelism.

pub mod gpt;
pub mod hf_dir;
mod model;
mod section;
pub mod vit;
mod weights;

pub use model::{Acts, BatchEval, GradsReady, Hits, InputSpec, Model, ModelDesc, ReadyResult, ignore_ready};
pub use section::{ModelSection, build, from_weights};
pub use weights::load_named;

/// Errors of model construction and weight loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] trainer_core::Error),

    #[error("model config: {0}")]
    Config(String),

    #[error("weights file {path}: {msg}")]
    Weights { path: String, msg: String },

    /// A file or directory that is not what it should be (Hugging Face
    /// config.json, a model directory, ...).
    #[error("{path}: {msg}")]
    File { path: String, msg: String },

    #[error("generate: {0}")]
    Generation(String),

    /// What a [`GradsReady`] callback failed with (it stopped the backward pass).
    #[error(transparent)]
    Ready(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;
