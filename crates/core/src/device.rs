use std::fmt;

use crate::cuda::CudaDevice;

/// Where a tensor's storage lives. A CUDA device carries its context, stream
/// and handles, so nothing about devices is global: whoever builds tensors is
/// handed the device explicitly.
#[derive(Debug, Clone, PartialEq)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

impl Device {
    /// The n-th visible GPU, or an error saying why it cannot be used.
    pub fn cuda(ordinal: usize) -> crate::Result<Self> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Waits for all work queued on the device (a no-op on the CPU).
    pub fn synchronize(&self) -> crate::Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}
