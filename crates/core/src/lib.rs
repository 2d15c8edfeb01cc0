//! The tensor core: [`Tensor`] with its [`Shape`], [`DType`] and [`Device`], the
//! [`Storage`] enum that dispatches every op to a backend, and the ops themselves.
//!
//! Ops are free functions in [`ops`] that write into output tensors the caller
//! allocated once (the training step allocates nothing). Each op checks shapes,
//! dtypes and devices, then dispatches on the storage: today to the plain CPU
//! reference in `cpu`, later also to CUDA kernels. Model code calls `ops` only, so
//! a new backend changes this crate and nothing above it.
//!
//! [`collective`] is the interface parallel layers use to talk to a group of
//! ranks; the communication crate implements it.

pub mod collective;
mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod io;
pub mod ops;
mod shape;
mod storage;
mod tensor;

pub use cuda::CudaDevice;
pub use device::Device;
pub use dtype::{DType, Element, Float};
pub use error::{Error, Result};
pub use shape::Shape;
pub use storage::{CpuStorage, Storage};
pub use tensor::Tensor;

pub use half::{bf16, f16};
