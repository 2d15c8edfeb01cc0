//! The `[model]` section of a training config and the models it builds: the
//! one place that maps a config onto a model type, so that the trainer only
//! ever holds a `Box<dyn Model>`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use trainer_core::{DType, Device};

use crate::gpt::{self, Gpt, GptConfig, PRESETS};
use crate::{Error, Model, ModelDesc, Result};

/// A preset, optionally with fields overridden, or every size field given.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    pub vocab_size: Option<usize>,
    pub block_size: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors) to
    /// start from: the shape comes from its config.json, the weights replace
    /// the random initialization.
    pub init_from: Option<String>,
}

impl ModelSection {
    /// The model this section describes; the message names the key at fault.
    pub fn resolve(&self) -> std::result::Result<ModelDesc, String> {
        let g = self.gpt()?;
        Ok(gpt_desc(&g))
    }

    /// The longest sequence the model takes (training.seq_len is checked against it).
    pub fn max_seq_len(&self) -> std::result::Result<usize, String> {
        Ok(self.gpt()?.block_size)
    }

    fn gpt(&self) -> std::result::Result<GptConfig, String> {
        if let Some(dir) = &self.init_from {
            return self.init_from_shape(dir);
        }
        let mut g = match &self.preset {
            Some(name) => GptConfig::preset(name).ok_or_else(|| {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                format!("model.preset = \"{name}\" is not a preset; allowed: {}", names.join(", "))
            })?,
            None => {
                let need =
                    |k: &str, v: Option<usize>| v.ok_or(format!("model.{k} is required when model.preset is not set"));
                GptConfig {
                    vocab_size: 50257,
                    block_size: 1024,
                    n_layer: need("n_layer", self.n_layer)?,
                    n_head: need("n_head", self.n_head)?,
                    n_embd: need("n_embd", self.n_embd)?,
                }
            }
        };
        g.vocab_size = self.vocab_size.unwrap_or(g.vocab_size);
        g.block_size = self.block_size.unwrap_or(g.block_size);
        g.n_layer = self.n_layer.unwrap_or(g.n_layer);
        g.n_head = self.n_head.unwrap_or(g.n_head);
        g.n_embd = self.n_embd.unwrap_or(g.n_embd);
        g.validate().map_err(|e| e.to_string().trim_start_matches("model config: ").to_string())?;
        Ok(g)
    }

    /// The shape of a `model.init_from` directory; size keys given beside it must agree.
    fn init_from_shape(&self, dir: &str) -> std::result::Result<GptConfig, String> {
        if dir.trim().is_empty() {
            return Err("model.init_from is empty: give a Hugging Face model directory".into());
        }
        let g = gpt::hf::read_config(Path::new(dir)).map_err(|e| format!("model.init_from = \"{dir}\": {e}"))?;
        if let Some(p) = &self.preset {
            return Err(format!(
                "model.preset = \"{p}\" conflicts with model.init_from = \"{dir}\", whose config.json gives the \
                 shape: remove model.preset"
            ));
        }
        for (key, hf_key, given, have) in [
            ("vocab_size", "vocab_size", self.vocab_size, g.vocab_size),
            ("block_size", "n_positions", self.block_size, g.block_size),
            ("n_layer", "n_layer", self.n_layer, g.n_layer),
            ("n_head", "n_head", self.n_head, g.n_head),
            ("n_embd", "n_embd", self.n_embd, g.n_embd),
        ] {
            match given {
                Some(v) if v != have => {
                    return Err(format!(
                        "model.{key} = {v} conflicts with {hf_key} = {have} in {dir}/config.json (model.init_from): \
                         remove model.{key}"
                    ));
                }
                _ => {}
            }
        }
        g.validate().map_err(|e| format!("model.init_from = \"{dir}\": {e}"))?;
        Ok(g)
    }
}

pub(crate) fn gpt_desc(g: &GptConfig) -> ModelDesc {
    // GptConfig is plain numbers: serializing cannot fail.
    ModelDesc { kind: "gpt".into(), config: serde_json::to_value(g).unwrap_or_default() }
}

/// A model of `desc`'s kind and shape, every parameter zero (initialize or
/// load it next).
pub fn build(desc: &ModelDesc, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    match desc.kind.as_str() {
        "gpt" => {
            let g: GptConfig = serde_json::from_value(desc.config.clone())
                .map_err(|e| Error::Config(format!("gpt config {}: {e}", desc.config)))?;
            Ok(Box::new(Gpt::new(g, dtype, device)?))
        }
        other => Err(Error::Config(format!("model kind \"{other}\" is not known; known: gpt"))),
    }
}

/// The model saved in a weights file (by [`Model::save_weights`]), a
/// directory holding one as `model.safetensors`, or a Hugging Face directory,
/// loaded.
pub fn from_weights(path: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    Ok(Box::new(Gpt::from_path(path, dtype, device)?))
}
