//! Loading named tensors into a model's parameters, shared by every model.

use std::collections::BTreeMap;
use std::path::Path;

use trainer_core::{DType, Device, Tensor, io, ops};
use trainer_nn::Param;

use crate::{Error, Result};

/// Loads every parameter of `params` from `tensors` (our names and shapes,
/// any float dtype, on any device), converted to `dtype` on `device`. Names,
/// shapes and the parameter set must match exactly, and nothing is changed
/// unless all of them do. `source` names where the tensors came from, for errors.
pub fn load_named(
    params: Vec<&mut Param>,
    mut tensors: BTreeMap<String, Tensor>,
    source: &Path,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let err = |msg: String| Error::Weights { path: source.display().to_string(), msg };
    let mut staged = Vec::new();
    for p in &params {
        let t = tensors.remove(&p.name).ok_or_else(|| err(format!("missing tensor {}", p.name)))?;
        if t.dims() != p.value.dims() {
            return Err(err(format!(
                "tensor {} has shape {} but this model needs {}",
                p.name,
                t.shape(),
                p.value.shape()
            )));
        }
        if !t.dtype().is_float() {
            return Err(err(format!("tensor {} has dtype {}, expected a float", p.name, t.dtype())));
        }
        staged.push(t.to_device(&Device::Cpu)?.to_dtype(dtype)?.to_device(device)?);
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(err(format!("tensor {extra} is not a parameter of this model")));
    }
    for (p, t) in params.into_iter().zip(staged) {
        ops::copy(&mut p.value, &t)?;
    }
    Ok(())
}

/// Writes every parameter (host copies) to a safetensors file, atomically,
/// with the model's config as JSON under the metadata key `config_key` (which
/// says what model the file holds).
pub(crate) fn save(params: &[&Param], path: &Path, config_key: &str, config: &impl serde::Serialize) -> Result<()> {
    let host: Vec<Tensor> =
        params.iter().map(|p| p.value.to_device(&Device::Cpu)).collect::<trainer_core::Result<_>>()?;
    let named: Vec<(&str, &Tensor)> = params.iter().zip(&host).map(|(p, t)| (p.name.as_str(), t)).collect();
    let config = serde_json::to_string(config).map_err(|e| Error::Config(e.to_string()))?;
    io::save(path, &named, Some(BTreeMap::from([(config_key.to_string(), config)])))?;
    Ok(())
}
