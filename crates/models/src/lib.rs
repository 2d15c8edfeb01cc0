//! Model definitions. A model composes `trainer-nn` layers, owns its parameter
//! naming and initialization, and knows nothing of devices beyond passing one
//! through, nor of parallelism.

pub mod gpt;

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
}

pub type Result<T> = std::result::Result<T, Error>;
