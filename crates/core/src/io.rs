//! Named tensors to and from safetensors files. Writes go to a temporary name in
//! the same directory and are renamed into place, so a reader never sees half a file.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::{CpuStorage, DType, Device, Error, Result, Tensor};

/// The safetensors dtype of ours (for writers that stream tensors themselves).
pub fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::U32 => StDtype::U32,
    }
}

fn io_err(path: &Path, err: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), err }
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::SafeTensors { path: path.display().to_string(), msg: msg.to_string() }
}

/// Writes `tensors` (host tensors) with optional string metadata, atomically:
/// temporary file, fsync, rename.
pub fn save(path: &Path, tensors: &[(&str, &Tensor)], metadata: Option<BTreeMap<String, String>>) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let view = TensorView::new(st_dtype(t.dtype()), t.dims().to_vec(), t.host_bytes()?)
            .map_err(|e| st_err(path, format!("tensor {name}: {e}")))?;
        views.push((name.to_string(), view));
    }
    let meta = metadata.map(|m| m.into_iter().collect());
    let bytes = safetensors::serialize(views, meta).map_err(|e| st_err(path, e))?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    Ok(())
}

/// All tensors of a safetensors file, by name, on the CPU, plus its metadata.
#[derive(Debug)]
pub struct Loaded {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl Loaded {
    /// Removes and returns tensor `name`, or an error naming the file and tensor.
    pub fn take(&mut self, path: &Path, name: &str) -> Result<Tensor> {
        self.tensors.remove(name).ok_or_else(|| st_err(path, format!("missing tensor {name}")))
    }
}

fn from_le_bytes<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    // safetensors data are little-endian and this crate targets little-endian hosts.
    bytemuck::pod_collect_to_vec(bytes)
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| st_err(path, e))?;
    let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| st_err(path, e))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let storage = match view.dtype() {
            StDtype::F32 => CpuStorage::F32(from_le_bytes(data)),
            StDtype::F64 => CpuStorage::F64(from_le_bytes(data)),
            StDtype::BF16 => CpuStorage::BF16(from_le_bytes(data)),
            StDtype::F16 => CpuStorage::F16(from_le_bytes(data)),
            StDtype::U32 => CpuStorage::U32(from_le_bytes(data)),
            StDtype::I32 => CpuStorage::U32(from_le_bytes::<i32>(data).into_iter().map(|x| x as u32).collect()),
            StDtype::I64 => CpuStorage::U32(from_le_bytes::<i64>(data).into_iter().map(|x| x as u32).collect()),
            other => return Err(st_err(path, format!("tensor {name}: unsupported dtype {other:?}"))),
        };
        let t = match storage {
            CpuStorage::F32(v) => Tensor::from_vec(v, view.shape(), &Device::Cpu),
            CpuStorage::F64(v) => Tensor::from_vec(v, view.shape(), &Device::Cpu),
            CpuStorage::BF16(v) => Tensor::from_vec(v, view.shape(), &Device::Cpu),
            CpuStorage::F16(v) => Tensor::from_vec(v, view.shape(), &Device::Cpu),
            CpuStorage::U32(v) => Tensor::from_vec(v, view.shape(), &Device::Cpu),
        }?;
        tensors.insert(name, t);
    }
    Ok(Loaded { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::from_vec(vec![1.0f32, -2.0, 3.5], [3], &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![7u32, 8], [1, 2], &Device::Cpu).unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        save(&path, &[("a", &a), ("b", &b)], Some(meta)).unwrap();
        let mut l = load(&path).unwrap();
        assert_eq!(l.metadata["k"], "v");
        assert_eq!(l.take(&path, "a").unwrap().to_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.5]);
        assert_eq!(l.take(&path, "b").unwrap().dims(), &[1, 2]);
        let err = l.take(&path, "zzz").unwrap_err().to_string();
        assert!(err.contains("zzz") && err.contains("t.safetensors"), "{err}");
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }
}
