//! The training job: configuration, the loop, evaluation, metrics, checkpoints.
//! The trainer composes a model, data loaders and an optimizer; it knows which
//! device to use but nothing of how ops run there.

pub mod checkpoint;
mod checkpointer;
pub mod config;
mod dp;
mod eval;
mod format;
mod hooks;
mod metrics;
mod optimizer;
mod progress;
mod resume;
mod signals;
mod trainer;

pub use config::Config;
pub use eval::{EvalReport, evaluate, evaluate_checkpoint, evaluate_in, evaluate_weights};
pub use metrics::{Metrics, Value};
pub use progress::Console;
pub use signals::{StopSignal, signal_name};
pub use trainer::{BuildModel, Outcome, TrainSummary, train, train_in, train_with};

/// Errors of a training job, each a complete sentence naming the file or key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {file}: {msg}")]
    Config { file: String, msg: String },

    #[error(transparent)]
    Core(#[from] trainer_core::Error),

    #[error(transparent)]
    Model(#[from] trainer_models::Error),

    #[error(transparent)]
    Comm(#[from] trainer_comm::Error),

    #[error("{context}: {err}")]
    Data { context: String, err: trainer_data::Error },

    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },

    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },

    #[error("{0}")]
    Diverged(String),

    /// A failure injected by a test hook (hooks.rs).
    #[error("{0}")]
    Injected(String),
}

pub type Result<T> = std::result::Result<T, Error>;
