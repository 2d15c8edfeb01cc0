use crate::cuda::CudaStorage;
use crate::{DType, Device, Element};

/// The bytes behind a tensor, per backend. Ops match on this enum to choose an
/// implementation.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

/// Host memory, one variant per dtype.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    U32(Vec<u32>),
}

impl CpuStorage {
    pub fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::F64 => CpuStorage::F64(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO; n]),
            DType::F16 => CpuStorage::F16(vec![half::f16::ZERO; n]),
            DType::U32 => CpuStorage::U32(vec![0; n]),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes (for safetensors and shards).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::U32(v) => bytemuck::cast_slice(v),
        }
    }

    /// Converts every element to `T` (rounding to nearest for narrower floats).
    pub fn cast<T: Element>(&self) -> Vec<T> {
        fn conv<S: Element, T: Element>(v: &[S]) -> Vec<T> {
            v.iter().map(|&x| T::from_f64(x.to_f64())).collect()
        }
        match self {
            CpuStorage::F32(v) => conv(v),
            CpuStorage::F64(v) => conv(v),
            CpuStorage::BF16(v) => conv(v),
            CpuStorage::F16(v) => conv(v),
            CpuStorage::U32(v) => conv(v),
        }
    }

    pub fn from_cast(dtype: DType, src: &CpuStorage) -> Self {
        match dtype {
            DType::F32 => f32::into_storage(src.cast()),
            DType::F64 => f64::into_storage(src.cast()),
            DType::BF16 => half::bf16::into_storage(src.cast()),
            DType::F16 => half::f16::into_storage(src.cast()),
            DType::U32 => u32::into_storage(src.cast()),
        }
    }
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device.clone()),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Both on the CPU, or both on the same GPU (without cloning device handles).
    pub fn same_device(&self, other: &Storage) -> bool {
        match (self, other) {
            (Storage::Cpu(_), Storage::Cpu(_)) => true,
            (Storage::Cuda(a), Storage::Cuda(b)) => a.device == b.device,
            _ => false,
        }
    }
}
