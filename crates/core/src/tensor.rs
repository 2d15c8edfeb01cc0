use crate::cuda::CudaStorage;
use crate::{CpuStorage, DType, Device, Element, Error, Result, Shape, Storage};

/// An n-dimensional, contiguous, row-major array on one device.
///
/// A tensor owns its storage. Ops write into tensors the caller allocated up
/// front, so a training step reuses the same buffers every time. Copies are
/// explicit ([`Tensor::try_clone`], [`Tensor::to_device`]): on a GPU they can fail.
#[derive(Debug)]
pub struct Tensor {
    storage: Storage,
    shape: Shape,
}

fn storage_for(device: &Device, cpu: CpuStorage) -> Result<Storage> {
    match device {
        Device::Cpu => Ok(Storage::Cpu(cpu)),
        Device::Cuda(d) => Ok(Storage::Cuda(CudaStorage::from_host(d, &cpu)?)),
    }
}

impl Tensor {
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Self> {
        let shape = shape.into();
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, shape.numel())),
            Device::Cuda(d) => Storage::Cuda(CudaStorage::zeros(d, dtype, shape.numel())?),
        };
        Ok(Tensor { storage, shape })
    }

    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>, device: &Device) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::Shape {
                op: "from_vec",
                msg: format!("{} elements do not fill shape {shape}", data.len()),
            });
        }
        let storage = storage_for(device, T::into_storage(data))?;
        Ok(Tensor { storage, shape })
    }

    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>, device: &Device) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn rank(&self) -> usize {
        self.shape.rank()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype().size_in_bytes()
    }

    /// Changes the dimensions without touching the data.
    pub fn reshape(&mut self, shape: impl Into<Shape>) -> Result<()> {
        let shape = shape.into();
        if shape.numel() != self.shape.numel() {
            return Err(Error::Reshape { from: self.shape.to_string(), to: shape.to_string() });
        }
        self.shape = shape;
        Ok(())
    }

    /// A copy on the same device.
    pub fn try_clone(&self) -> Result<Tensor> {
        let storage = match &self.storage {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone()?),
        };
        Ok(Tensor { storage, shape: self.shape.clone() })
    }

    /// A copy on `device` (host <-> GPU transfers go through host memory).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let host = self.host_storage()?;
        Ok(Tensor { storage: storage_for(device, host)?, shape: self.shape.clone() })
    }

    /// The data as host memory (a download for GPU tensors, which waits for the device).
    fn host_storage(&self) -> Result<CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.clone()),
            Storage::Cuda(s) => s.to_host(),
        }
    }

    /// Host-side slice of a CPU tensor of element type `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let dtype = self.dtype();
        match &self.storage {
            Storage::Cpu(s) => T::slice(s).ok_or(Error::DType { op: "as_slice", expected: T::DTYPE, got: dtype }),
            Storage::Cuda(_) => Err(Error::Unsupported { op: "as_slice", dtype, device: self.device().to_string() }),
        }
    }

    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        let device = self.device().to_string();
        match &mut self.storage {
            Storage::Cpu(s) => {
                T::slice_mut(s).ok_or(Error::DType { op: "as_mut_slice", expected: T::DTYPE, got: dtype })
            }
            Storage::Cuda(_) => Err(Error::Unsupported { op: "as_mut_slice", dtype, device }),
        }
    }

    /// Overwrites the tensor with host data of the same dtype and element count
    /// (a host-to-device copy when the tensor lives on a GPU).
    pub fn copy_from_slice<T: Element>(&mut self, src: &[T]) -> Result<()> {
        if src.len() != self.numel() {
            return Err(Error::Shape {
                op: "copy_from_slice",
                msg: format!("{} elements for shape {}", src.len(), self.shape),
            });
        }
        match &mut self.storage {
            Storage::Cpu(_) => self.as_mut_slice::<T>()?.copy_from_slice(src),
            Storage::Cuda(s) => s.copy_from_host(&T::into_storage(src.to_vec()))?,
        }
        Ok(())
    }

    /// Copies the data to the host as `T`; the dtype must match.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        let host = self.host_storage()?;
        T::slice(&host).map(<[T]>::to_vec).ok_or(Error::DType { op: "to_vec", expected: T::DTYPE, got: self.dtype() })
    }

    /// Copies the data to the host as f64, whatever the dtype (for tests and logs).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        Ok(self.host_storage()?.cast::<f64>())
    }

    /// A new tensor on the same device with every element converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let host = CpuStorage::from_cast(dtype, &self.host_storage()?);
        Ok(Tensor { storage: storage_for(&self.device(), host)?, shape: self.shape.clone() })
    }

    /// The raw little-endian bytes of a host tensor.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.as_bytes()),
            Storage::Cuda(_) => {
                Err(Error::Unsupported { op: "host_bytes", dtype: self.dtype(), device: self.device().to_string() })
            }
        }
    }

    /// The GPU storage of a CUDA tensor (None on the CPU), for handing device
    /// buffers to other libraries (NCCL).
    pub fn cuda_storage(&self) -> Option<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    pub fn cuda_storage_mut(&mut self) -> Option<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    pub(crate) fn cuda(&self, op: &'static str) -> Result<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => Err(Error::DeviceMismatch { op, a: "cuda".into(), b: "cpu".into() }),
        }
    }

    pub(crate) fn cuda_mut(&mut self, op: &'static str) -> Result<&mut CudaStorage> {
        match &mut self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => Err(Error::DeviceMismatch { op, a: "cuda".into(), b: "cpu".into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construct_reshape_cast() {
        let mut t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        t.reshape([3, 2]).unwrap();
        assert!(t.reshape([4, 2]).is_err());
        let h = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(h.to_vec_f64().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(t.as_slice::<f64>().is_err());
        assert!(Tensor::from_vec(vec![1.0f32], [2], &Device::Cpu).is_err());
    }
}
