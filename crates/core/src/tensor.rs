use crate::{CpuStorage, DType, Device, Element, Error, Result, Shape, Storage};

/// An n-dimensional, contiguous, row-major array on one device.
///
/// A tensor owns its storage. Ops write into tensors the caller allocated up
/// front, so a training step reuses the same buffers every time.
#[derive(Debug, Clone)]
pub struct Tensor {
    storage: Storage,
    shape: Shape,
}

fn storage_for(device: Device, cpu: CpuStorage) -> Result<Storage> {
    match device {
        Device::Cpu => Ok(Storage::Cpu(cpu)),
        Device::Cuda(_) => {
            Err(Error::DeviceUnavailable { device, reason: "this build has no CUDA backend yet".into() })
        }
    }
}

impl Tensor {
    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Self> {
        let shape = shape.into();
        let storage = storage_for(device, CpuStorage::zeros(dtype, shape.numel()))?;
        Ok(Tensor { storage, shape })
    }

    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>, device: Device) -> Result<Self> {
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

    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>, device: Device) -> Result<Self> {
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

    /// Host-side slice of a CPU tensor of element type `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let dtype = self.dtype();
        match &self.storage {
            Storage::Cpu(s) => T::slice(s).ok_or(Error::DType { op: "as_slice", expected: T::DTYPE, got: dtype }),
        }
    }

    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cpu(s) => {
                T::slice_mut(s).ok_or(Error::DType { op: "as_mut_slice", expected: T::DTYPE, got: dtype })
            }
        }
    }

    /// Overwrites the tensor with host data of the same dtype and element count
    /// (a host-to-device copy once the tensor lives on a GPU).
    pub fn copy_from_slice<T: Element>(&mut self, src: &[T]) -> Result<()> {
        if src.len() != self.numel() {
            return Err(Error::Shape {
                op: "copy_from_slice",
                msg: format!("{} elements for shape {}", src.len(), self.shape),
            });
        }
        self.as_mut_slice::<T>()?.copy_from_slice(src);
        Ok(())
    }

    /// Copies the data to the host as `T`; the dtype must match.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// Copies the data to the host as f64, whatever the dtype (for tests and logs).
    pub fn to_vec_f64(&self) -> Vec<f64> {
        match &self.storage {
            Storage::Cpu(s) => s.cast::<f64>(),
        }
    }

    /// A new tensor with every element converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        match &self.storage {
            Storage::Cpu(s) => {
                Ok(Tensor { storage: Storage::Cpu(CpuStorage::from_cast(dtype, s)), shape: self.shape.clone() })
            }
        }
    }

    /// The raw little-endian bytes of a host tensor.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.as_bytes()),
        }
    }

    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construct_reshape_cast() {
        let mut t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        t.reshape([3, 2]).unwrap();
        assert!(t.reshape([4, 2]).is_err());
        let h = t.to_dtype(DType::BF16).unwrap();
        assert_eq!(h.to_vec_f64(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(t.as_slice::<f64>().is_err());
        assert!(Tensor::from_vec(vec![1.0f32], [2], Device::Cpu).is_err());
        let err = Tensor::zeros([2], DType::F32, Device::Cuda(0)).unwrap_err();
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }
}
