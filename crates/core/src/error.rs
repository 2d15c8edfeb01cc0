use crate::DType;

/// Errors of the tensor core. Every variant names the op or tensor involved so
/// that a message read in a log is enough to find the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// A layer asked for the gradient of a parameter that is not trained.
    #[error("parameter {name} is frozen (it has no gradient), but {op} computes its gradient")]
    Frozen { op: &'static str, name: String },

    #[error("{op}: expected dtype {expected}, got {got}")]
    DType { op: &'static str, expected: DType, got: DType },

    #[error("{op}: tensors on different devices ({a} and {b})")]
    DeviceMismatch { op: &'static str, a: String, b: String },

    #[error("{op} is not implemented for dtype {dtype} on {device}")]
    Unsupported { op: &'static str, dtype: DType, device: String },

    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    #[error("CUDA {context}: {msg}")]
    Cuda { context: String, msg: String },

    #[error("kernel compilation ({kernel}): {msg}")]
    KernelCompile { kernel: String, msg: String },

    #[error("{op}: index {index} out of range (must be < {limit})")]
    IndexOutOfRange { op: &'static str, index: u64, limit: u64 },

    #[error("cannot reshape {from} into {to}: element counts differ")]
    Reshape { from: String, to: String },

    #[error("safetensors file {path}: {msg}")]
    SafeTensors { path: String, msg: String },

    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },

    /// A [`crate::collective::Collective`] operation failed; the
    /// implementation's own error (`trainer_comm::Error`), which names the
    /// operation and the group.
    #[error(transparent)]
    Collective(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T> = std::result::Result<T, Error>;
