//! What every Hugging Face model directory shares, whichever the model:
//! `config.json`, the weights as one `model.safetensors` or as shards listed in
//! `model.safetensors.index.json`, and files written atomically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer_core::{DType, Device, Tensor};

use crate::{Error, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub(crate) fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File { path: path.display().to_string(), msg: msg.into() }
}

/// Is this directory a Hugging Face model directory (it has a config.json)?
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

/// A JSON file, or an error naming it.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file_err(path, format!("invalid JSON: {e}")))
}

/// A config.json's positive integer `key`, or `default` when it is absent;
/// the message names the key and the value.
pub(crate) fn positive_size(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    default: usize,
) -> std::result::Result<usize, String> {
    match obj.get(key) {
        None => Ok(default),
        Some(x) => x
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| format!("{key} = {x}: expected a positive integer")),
    }
}

/// The `model_type` of a directory's config.json, if it has one.
pub fn model_type(dir: &Path) -> Option<String> {
    read_json(&dir.join(CONFIG_FILE)).ok()?.get("model_type")?.as_str().map(str::to_string)
}

/// The safetensors files of a model directory: model.safetensors, or the
/// shards listed in model.safetensors.index.json.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            "; pytorch_model.bin is not read: save the model with save_pretrained(dir, safe_serialization=True)"
        } else {
            ""
        };
        return Err(file_err(dir, format!("no {WEIGHTS_FILE} (nor {INDEX_FILE}){hint}")));
    }
    let v = read_json(&index)?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| file_err(&index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| file_err(&index, format!("weight_map.{name}: expected a file name")))?;
        let p = dir.join(file);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Temporary file, fsync, rename: a reader never sees half a config.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| file_err(path, e.to_string()))
}

/// A tensor's values as f32 on the host.
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec::<f32>()?)
}
