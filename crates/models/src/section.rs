//! The `[model]` section of a training config and the models it builds: the
//! one place that maps a config onto a model type, so that the trainer only
//! ever holds a `Box<dyn Model>`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use trainer_core::{DType, Device};

use crate::gpt::{self, Gpt, GptConfig, PRESETS};
use crate::vit::{self, Vit, VitConfig};
use crate::{Error, Model, ModelDesc, Result};

/// A preset, optionally with fields overridden, or every size field given.
/// The kind of model comes from the preset's name (`gpt2-*`, `vit-*`) or
/// from `kind` ("gpt", the default, or "vit").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: Option<String>,
    pub kind: Option<String>,
    // GPT-2 only.
    pub vocab_size: Option<usize>,
    pub block_size: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    // ViT only (see VitConfig).
    pub image_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub channels: Option<usize>,
    pub num_classes: Option<usize>,
    pub pool: Option<String>,
    pub ln_eps: Option<f64>,
    pub pixel_mean: Option<Vec<f64>>,
    pub pixel_std: Option<Vec<f64>>,
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors) to
    /// start from: the shape comes from its config.json, the weights replace
    /// the random initialization.
    pub init_from: Option<String>,
}

impl ModelSection {
    /// The model this section describes; the message names the key at fault.
    pub fn resolve(&self) -> std::result::Result<ModelDesc, String> {
        match self.kind()? {
            Kind::Gpt => Ok(gpt_desc(&self.gpt()?)),
            Kind::Vit => Ok(vit::vit_desc(&self.vit()?)),
        }
    }

    /// The longest sequence a token model takes (training.seq_len is checked
    /// against it); None for an image model, which reads no token windows.
    pub fn max_seq_len(&self) -> std::result::Result<Option<usize>, String> {
        match self.kind()? {
            Kind::Gpt => Ok(Some(self.gpt()?.block_size)),
            Kind::Vit => Ok(None),
        }
    }

    /// The kind, from `kind` or the preset's name; keys of the other kind are refused.
    fn kind(&self) -> std::result::Result<Kind, String> {
        let from_preset = self.preset.as_deref().map(|p| if p.starts_with("vit-") { Kind::Vit } else { Kind::Gpt });
        let kind = match self.kind.as_deref() {
            None => from_preset.unwrap_or(Kind::Gpt),
            Some("gpt") => Kind::Gpt,
            Some("vit") => Kind::Vit,
            Some(other) => return Err(format!("model.kind = \"{other}\" is not known; allowed: gpt, vit")),
        };
        if let (Some(k), Some(p)) = (self.kind.as_deref(), from_preset.filter(|&p| p != kind)) {
            let p_name = self.preset.as_deref().unwrap_or_default();
            return Err(format!(
                "model.kind = \"{k}\" conflicts with model.preset = \"{p_name}\", a {} preset",
                p.name()
            ));
        }
        let gpt_keys = [("vocab_size", self.vocab_size.is_some()), ("block_size", self.block_size.is_some())];
        let vit_keys = [
            ("image_size", self.image_size.is_some()),
            ("patch_size", self.patch_size.is_some()),
            ("channels", self.channels.is_some()),
            ("num_classes", self.num_classes.is_some()),
            ("pool", self.pool.is_some()),
            ("ln_eps", self.ln_eps.is_some()),
            ("pixel_mean", self.pixel_mean.is_some()),
            ("pixel_std", self.pixel_std.is_some()),
        ];
        let foreign: &[(&str, bool)] = if kind == Kind::Gpt { &vit_keys } else { &gpt_keys };
        if let Some((key, _)) = foreign.iter().find(|(_, set)| *set) {
            return Err(format!("model.{key} does not apply to a {} model", kind.name()));
        }
        if kind == Kind::Vit && self.init_from.is_some() {
            return Err(
                "model.init_from: importing Hugging Face ViT weights is not supported yet (gpt models only)".into()
            );
        }
        Ok(kind)
    }

    fn vit(&self) -> std::result::Result<VitConfig, String> {
        if let Some(dir) = &self.init_from {
            return self.vit_init_from(dir);
        }
        let mut v = match &self.preset {
            Some(name) => VitConfig::preset(name).ok_or_else(|| {
                let names: Vec<&str> = vit::PRESETS.iter().map(|p| p.0).collect();
                format!("model.preset = \"{name}\" is not a preset; allowed: {}", names.join(", "))
            })?,
            None => {
                let need =
                    |k: &str, v: Option<usize>| v.ok_or(format!("model.{k} is required when model.preset is not set"));
                let channels = self.channels.unwrap_or(3);
                let imagenet = channels == 3;
                VitConfig {
                    image_size: need("image_size", self.image_size)?,
                    patch_size: need("patch_size", self.patch_size)?,
                    channels,
                    num_classes: need("num_classes", self.num_classes)?,
                    n_layer: need("n_layer", self.n_layer)?,
                    n_head: need("n_head", self.n_head)?,
                    n_embd: need("n_embd", self.n_embd)?,
                    pool: "class".into(),
                    ln_eps: 1e-6,
                    pixel_mean: if imagenet { vit::IMAGENET_MEAN.to_vec() } else { vec![0.5; channels] },
                    pixel_std: if imagenet { vit::IMAGENET_STD.to_vec() } else { vec![0.5; channels] },
                }
            }
        };
        v.image_size = self.image_size.unwrap_or(v.image_size);
        v.patch_size = self.patch_size.unwrap_or(v.patch_size);
        v.channels = self.channels.unwrap_or(v.channels);
        v.num_classes = self.num_classes.unwrap_or(v.num_classes);
        v.n_layer = self.n_layer.unwrap_or(v.n_layer);
        v.n_head = self.n_head.unwrap_or(v.n_head);
        v.n_embd = self.n_embd.unwrap_or(v.n_embd);
        v.pool = self.pool.clone().unwrap_or(v.pool);
        v.ln_eps = self.ln_eps.unwrap_or(v.ln_eps);
        v.pixel_mean = self.pixel_mean.clone().unwrap_or(v.pixel_mean);
        v.pixel_std = self.pixel_std.clone().unwrap_or(v.pixel_std);
        v.validate().map_err(|e| e.to_string().trim_start_matches("model config: ").to_string())?;
        Ok(v)
    }

    /// A Hugging Face ViT's shape; size keys given beside it must agree, but
    /// `num_classes` may differ (a new head), `image_size` too (the position
    /// grid is interpolated) and the normalization may be given.
    fn vit_init_from(&self, dir: &str) -> std::result::Result<VitConfig, String> {
        if dir.trim().is_empty() {
            return Err("model.init_from is empty: give a Hugging Face model directory".into());
        }
        let mut v = vit::hf::read_config(Path::new(dir)).map_err(|e| format!("model.init_from = \"{dir}\": {e}"))?;
        if let Some(p) = &self.preset {
            return Err(format!(
                "model.preset = \"{p}\" conflicts with model.init_from = \"{dir}\", whose config.json gives the \
                 shape: remove model.preset"
            ));
        }
        for (key, hf_key, given, have) in [
            ("patch_size", "patch_size", self.patch_size, v.patch_size),
            ("channels", "num_channels", self.channels, v.channels),
            ("n_layer", "num_hidden_layers", self.n_layer, v.n_layer),
            ("n_head", "num_attention_heads", self.n_head, v.n_head),
            ("n_embd", "hidden_size", self.n_embd, v.n_embd),
        ] {
            if let Some(g) = given.filter(|&g| g != have) {
                return Err(format!(
                    "model.{key} = {g} conflicts with {hf_key} = {have} in {dir}/config.json (model.init_from): \
                     remove model.{key}"
                ));
            }
        }
        if let Some(p) = self.pool.as_deref().filter(|&p| p != "class") {
            return Err(format!(
                "model.pool = \"{p}\": a Hugging Face ViT is trained to read the class token (model.init_from)"
            ));
        }
        v.num_classes = self.num_classes.unwrap_or(v.num_classes);
        v.image_size = self.image_size.unwrap_or(v.image_size);
        v.ln_eps = self.ln_eps.unwrap_or(v.ln_eps);
        v.pixel_mean = self.pixel_mean.clone().unwrap_or(v.pixel_mean);
        v.pixel_std = self.pixel_std.clone().unwrap_or(v.pixel_std);
        v.validate().map_err(|e| format!("model.init_from = \"{dir}\": {e}"))?;
        Ok(v)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gpt,
    Vit,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gpt => "gpt",
            Kind::Vit => "vit",
        }
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
        "vit" => {
            let v: VitConfig = serde_json::from_value(desc.config.clone())
                .map_err(|e| Error::Config(format!("vit config {}: {e}", desc.config)))?;
            Ok(Box::new(Vit::new(v, dtype, device)?))
        }
        other => Err(Error::Config(format!("model kind \"{other}\" is not known; known: gpt, vit"))),
    }
}

/// The model saved in a weights file (by [`Model::save_weights`]), a
/// directory holding one as `model.safetensors`, or a Hugging Face directory,
/// loaded.
pub fn from_weights(path: &Path, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    // A weights file of ours says which model it holds in its metadata.
    if path.is_file() {
        let loaded = trainer_core::io::load(path)?;
        if let Some(raw) = loaded.metadata.get(vit::CONFIG_KEY) {
            let err = |msg: String| Error::Weights { path: path.display().to_string(), msg };
            let config: VitConfig = serde_json::from_str(raw).map_err(|e| err(format!("{}: {e}", vit::CONFIG_KEY)))?;
            let mut model = Vit::new(config, dtype, device)?;
            model.load_named(loaded.tensors, path)?;
            return Ok(Box::new(model));
        }
        if loaded.metadata.contains_key(gpt::CONFIG_KEY) {
            let config = Gpt::config_from_metadata(&loaded.metadata, path)?;
            let mut model = Gpt::new(config, dtype, device)?;
            model.load_named(loaded.tensors, path)?;
            return Ok(Box::new(model));
        }
    }
    if path.is_dir() {
        if crate::hf_dir::model_type(path).as_deref() == Some("vit") {
            return Ok(Box::new(Vit::from_hf(path, dtype, device)?));
        }
        let inner = path.join(crate::hf_dir::WEIGHTS_FILE);
        if !crate::hf_dir::is_hf_dir(path) && inner.is_file() {
            return from_weights(&inner, dtype, device);
        }
    }
    // A GPT-2 Hugging Face directory or model.safetensors named directly (or an error naming the path).
    Ok(Box::new(Gpt::from_path(path, dtype, device)?))
}
