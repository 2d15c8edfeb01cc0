//! Hugging Face interop: the directory that `transformers.GPT2LMHeadModel`
//! writes with `save_pretrained` and reads with `from_pretrained`
//! (`config.json` + `model.safetensors`), to and from our GPT.
//!
//! What differs between the two layouts:
//! - GPT-2's attention and MLP projections are `Conv1D` modules whose weights
//!   are stored (in, out); ours are nn.Linear's (out, in): transposed both ways.
//! - Our token embedding is padded to a multiple of 128 rows (zero rows that are
//!   never looked up); transformers' has exactly `vocab_size` rows.
//! - The LM head is tied to the token embedding on both sides, and transformers
//!   drops the duplicate `lm_head.weight` when it saves, so we do the same.
//! - Names: ours are GPT2LMHeadModel's state-dict names (`transformer.h.0...`);
//!   files saved from a bare GPT2Model (the original hub checkpoints) lack the
//!   `transformer.` prefix. Import accepts both.
//! - The attention-mask buffers older transformers versions saved
//!   (`attn.bias`, `attn.masked_bias`) carry no weights and are skipped.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use trainer_core::{Device, Shape, Tensor, io};

use super::GptConfig;
pub use crate::hf_dir::{CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, is_hf_dir};
use crate::hf_dir::{file_err, host_f32, positive_size, read_json, weight_files, write_atomic};
use crate::{Error, Result};

/// GPT-2's GELU is the tanh approximation; transformers names it three ways,
/// all the same function (ours, see crates/core/src/cpu/gelu.rs).
const TANH_GELUS: &[&str] = &["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

/// Our LayerNorm epsilon (crates/nn/src/layernorm.rs), GPT-2's.
const LAYER_NORM_EPS: f64 = 1e-5;

/// GPT-2's end-of-text id: written as bos/eos when the vocabulary has it.
const GPT2_EOT: usize = 50256;

// ------------------------------------------------------------------ config.json

/// The model shape from a transformers GPT-2 `config.json`, after checking that
/// everything else in it describes the model we compute: GPT-2 with the tanh
/// GELU, LayerNorm eps 1e-5, scaled dot-product attention, a tied head. Keys
/// that are absent take GPT2Config's defaults, as transformers would.
pub fn read_config(dir: &Path) -> Result<GptConfig> {
    Ok(read_config_and_tie(dir)?.0)
}

/// The config and its tie_word_embeddings flag.
fn read_config_and_tie(dir: &Path) -> Result<(GptConfig, bool)> {
    let path = dir.join(CONFIG_FILE);
    config_from_json(&read_json(&path)?).map_err(|msg| file_err(&path, msg))
}

fn config_from_json(v: &Value) -> std::result::Result<(GptConfig, bool), String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    match obj.get("model_type").and_then(Value::as_str) {
        Some("gpt2") => {}
        Some(other) => {
            return Err(format!("model_type = \"{other}\": only GPT-2 (model_type \"gpt2\") is supported"));
        }
        None => return Err("no model_type: not a transformers config (expected model_type \"gpt2\")".into()),
    }
    let size = |key: &str, default: usize| positive_size(obj, key, default);
    let c = GptConfig {
        vocab_size: size("vocab_size", 50257)?,
        block_size: size("n_positions", 1024)?,
        n_layer: size("n_layer", 12)?,
        n_head: size("n_head", 12)?,
        n_embd: size("n_embd", 768)?,
    };
    if !c.n_embd.is_multiple_of(c.n_head) {
        return Err(format!("n_embd = {} is not divisible by n_head = {}", c.n_embd, c.n_head));
    }
    let flag = |key: &str, default: bool| -> std::result::Result<bool, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| format!("{key} = {x}: expected true or false")),
        }
    };
    let act = match obj.get("activation_function") {
        None => "gelu_new",
        Some(x) => x.as_str().ok_or_else(|| format!("activation_function = {x}: expected a string"))?,
    };
    if !TANH_GELUS.contains(&act) {
        return Err(format!(
            "activation_function = \"{act}\": not supported; our MLP computes GPT-2's tanh GELU ({})",
            TANH_GELUS.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(x) = obj.get("n_inner").filter(|x| !x.is_null() && x.as_u64() != Some(4 * c.n_embd as u64)) {
        return Err(format!("n_inner = {x}: only the GPT-2 MLP width 4 * n_embd = {} is supported", 4 * c.n_embd));
    }
    if let Some(x) = obj.get("layer_norm_epsilon") {
        let eps = x.as_f64().ok_or_else(|| format!("layer_norm_epsilon = {x}: expected a number"))?;
        if (eps - LAYER_NORM_EPS).abs() > 1e-12 {
            return Err(format!("layer_norm_epsilon = {x}: only {LAYER_NORM_EPS:e} (GPT-2's) is supported"));
        }
    }
    if !flag("scale_attn_weights", true)? {
        return Err("scale_attn_weights = false: only attention scaled by 1/sqrt(head size) is supported".into());
    }
    if flag("scale_attn_by_inverse_layer_idx", false)? {
        return Err("scale_attn_by_inverse_layer_idx = true: not supported".into());
    }
    if flag("add_cross_attention", false)? {
        return Err("add_cross_attention = true: cross-attention is not supported".into());
    }
    if c.vocab_size > u32::MAX as usize {
        return Err(format!("vocab_size = {}: exceeds the u32 token range", c.vocab_size));
    }
    // tie_word_embeddings = false is accepted only when lm_head.weight equals
    // wte (checked against the tensors in `import`).
    Ok((c, flag("tie_word_embeddings", true)?))
}

/// GPT2Config for our model, as `save_pretrained` would write it. Dropout is
/// 0: we train without it, so this describes the model as trained.
pub fn config_json(c: &GptConfig) -> Value {
    let eot = (c.vocab_size > GPT2_EOT).then_some(GPT2_EOT);
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "add_cross_attention": false,
        "tie_word_embeddings": true,
        "use_cache": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    })
}

// ------------------------------------------------------------------ tensor layout

/// One weight in transformers' layout: its name without the `transformer.`
/// prefix, its shape there, and whether it is a Conv1D weight (transposed
/// relative to ours). Ours is "transformer." + name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub conv1d: bool,
}

/// Every weight of GPT2LMHeadModel (the tied head aside), in our parameter order.
pub fn layout(c: &GptConfig) -> Vec<HfTensor> {
    let (e, v) = (c.n_embd, c.vocab_size);
    let t = |name: String, dims: &[usize], conv1d: bool| HfTensor { name, dims: dims.to_vec(), conv1d };
    let mut out = vec![t("wte.weight".into(), &[v, e], false), t("wpe.weight".into(), &[c.block_size, e], false)];
    for i in 0..c.n_layer {
        let h = format!("h.{i}");
        out.extend([
            t(format!("{h}.ln_1.weight"), &[e], false),
            t(format!("{h}.ln_1.bias"), &[e], false),
            t(format!("{h}.attn.c_attn.weight"), &[e, 3 * e], true),
            t(format!("{h}.attn.c_attn.bias"), &[3 * e], false),
            t(format!("{h}.attn.c_proj.weight"), &[e, e], true),
            t(format!("{h}.attn.c_proj.bias"), &[e], false),
            t(format!("{h}.ln_2.weight"), &[e], false),
            t(format!("{h}.ln_2.bias"), &[e], false),
            t(format!("{h}.mlp.c_fc.weight"), &[e, 4 * e], true),
            t(format!("{h}.mlp.c_fc.bias"), &[4 * e], false),
            t(format!("{h}.mlp.c_proj.weight"), &[4 * e, e], true),
            t(format!("{h}.mlp.c_proj.bias"), &[e], false),
        ]);
    }
    out.extend([t("ln_f.weight".into(), &[e], false), t("ln_f.bias".into(), &[e], false)]);
    out
}

const PREFIX: &str = "transformer.";

/// (rows, cols) row-major -> (cols, rows).
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            out[k * rows + r] = v;
        }
    }
    out
}

// ------------------------------------------------------------------ export

/// Writes `dir/config.json` and `dir/model.safetensors` (fp32) from our
/// parameters, by name (`Gpt`'s names and shapes, padded vocabulary), each
/// file atomically. `source` names where the tensors came from, for errors.
pub fn export(config: &GptConfig, tensors: &BTreeMap<String, Tensor>, source: &Path, dir: &Path) -> Result<()> {
    config.validate()?;
    let (e, vp) = (config.n_embd, config.padded_vocab_size());
    let mut named = Vec::new();
    for spec in layout(config) {
        let ours = format!("{PREFIX}{}", spec.name);
        let t = tensors.get(&ours).ok_or_else(|| file_err(source, format!("missing tensor {ours}")))?;
        let our_dims: Vec<usize> = match (spec.name.as_str(), spec.conv1d) {
            ("wte.weight", _) => vec![vp, e],
            (_, true) => vec![spec.dims[1], spec.dims[0]],
            _ => spec.dims.clone(),
        };
        if t.dims() != our_dims.as_slice() {
            return Err(file_err(
                source,
                format!(
                    "tensor {ours} has shape {} but the model config needs {}",
                    t.shape(),
                    Shape::from(our_dims.as_slice())
                ),
            ));
        }
        let mut data = host_f32(t)?;
        if spec.name == "wte.weight" {
            data.truncate(config.vocab_size * e);
        }
        if spec.conv1d {
            data = transpose(&data, our_dims[0], our_dims[1]);
        }
        named.push((ours, Tensor::from_vec(data, spec.dims.as_slice(), &Device::Cpu)?));
    }
    fs::create_dir_all(dir).map_err(|err| file_err(dir, format!("cannot create the output directory: {err}")))?;
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // transformers refuses a safetensors file without format metadata.
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    io::save(&dir.join(WEIGHTS_FILE), &refs, Some(meta))?;
    let text = serde_json::to_string_pretty(&config_json(config)).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), format!("{text}\n").as_bytes())
}

// ------------------------------------------------------------------ import

/// A model read from a Hugging Face directory, in our names and layouts (fp32
/// on the host, vocabulary padded): ready for [`super::Gpt::load_named`].
#[derive(Debug)]
pub struct HfImport {
    pub config: GptConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

#[derive(Debug)]
struct Found {
    tensor: Tensor,
    file: PathBuf,
    /// As in the file (with or without the prefix).
    name: String,
}

/// Reads a transformers GPT-2 directory into our layout. Every error names the
/// file and, where it applies, the tensor or config key.
pub fn import(dir: &Path) -> Result<HfImport> {
    let (config, tied) = read_config_and_tie(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    // Tensors by name without the prefix, with the file and name each came with.
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for file in weight_files(dir)? {
        let loaded = io::load(&file)?;
        for (name, tensor) in loaded.tensors {
            let base = name.strip_prefix(PREFIX).unwrap_or(&name).to_string();
            if let Some(other) = found.get(&base) {
                return Err(file_err(
                    &file,
                    format!("tensor {name} appears twice (also as {} in {})", other.name, other.file.display()),
                ));
            }
            found.insert(base, Found { tensor, file: file.clone(), name });
        }
    }
    let (e, vp) = (config.n_embd, config.padded_vocab_size());
    let mut tensors = BTreeMap::new();
    let mut wte_host = Vec::new();
    for spec in layout(&config) {
        let Found { tensor: t, file, name } = found.remove(&spec.name).ok_or_else(|| {
            file_err(
                dir,
                format!("missing tensor {PREFIX}{} (or {}), which {} requires", spec.name, spec.name, CONFIG_FILE),
            )
        })?;
        if t.dims() != spec.dims.as_slice() {
            let want = Shape::from(spec.dims.as_slice());
            let msg = format!("tensor {name} has shape {} but {} needs {want}", t.shape(), config_path.display());
            return Err(file_err(&file, msg));
        }
        if !t.dtype().is_float() {
            return Err(file_err(&file, format!("tensor {name} has dtype {}, expected a float", t.dtype())));
        }
        let mut data = host_f32(&t)?;
        let dims = match (spec.name.as_str(), spec.conv1d) {
            ("wte.weight", _) => {
                wte_host = data.clone();
                data.resize(vp * e, 0.0);
                vec![vp, e]
            }
            (_, true) => {
                data = transpose(&data, spec.dims[0], spec.dims[1]);
                vec![spec.dims[1], spec.dims[0]]
            }
            _ => spec.dims.clone(),
        };
        tensors.insert(format!("{PREFIX}{}", spec.name), Tensor::from_vec(data, dims, &Device::Cpu)?);
    }
    // The head: ours is tied, so a saved lm_head must be the embedding itself.
    match found.remove("lm_head.weight") {
        Some(Found { tensor: head, file, .. }) => {
            let head_data = if head.dims() == [config.vocab_size, e] { Some(host_f32(&head)?) } else { None };
            match head_data {
                Some(h) if h == wte_host => {}
                Some(h) => {
                    let diff = h.iter().zip(&wte_host).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    return Err(file_err(
                        &file,
                        format!(
                            "tensor lm_head.weight differs from wte.weight (max |diff| = {diff:e}): an untied LM head \
                             is not supported (ours is tied to the token embedding)"
                        ),
                    ));
                }
                None => {
                    return Err(file_err(
                        &file,
                        format!(
                            "tensor lm_head.weight has shape {} but wte.weight is ({}, {e})",
                            head.shape(),
                            config.vocab_size
                        ),
                    ));
                }
            }
        }
        None if !tied => {
            return Err(file_err(
                &config_path,
                "tie_word_embeddings = false but there is no lm_head.weight: an untied LM head is not supported",
            ));
        }
        None => {}
    }
    // Attention-mask buffers (causal masks, not weights) from older versions.
    found.retain(|name, _| !(name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")));
    if let Some(f) = found.values().next() {
        return Err(file_err(&f.file, format!("unexpected tensor {}: not a weight of GPT2LMHeadModel", f.name)));
    }
    Ok(HfImport { config, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::Gpt;
    use trainer_core::DType;
    use trainer_nn::Module;

    #[test]
    fn layout_names_are_ours_with_the_prefix() {
        let c = GptConfig { vocab_size: 100, block_size: 16, n_layer: 2, n_head: 2, n_embd: 8 };
        let ours: Vec<String> =
            Gpt::new(c.clone(), DType::F32, &Device::Cpu).unwrap().params().iter().map(|p| p.name.clone()).collect();
        let hf: Vec<String> = layout(&c).iter().map(|t| format!("{PREFIX}{}", t.name)).collect();
        assert_eq!(ours, hf);
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        // [[1, 2, 3], [4, 5, 6]] -> [[1, 4], [2, 5], [3, 6]]
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn config_round_trips_and_bad_configs_name_the_key() {
        let c = GptConfig { vocab_size: 997, block_size: 64, n_layer: 3, n_head: 4, n_embd: 32 };
        assert_eq!(config_from_json(&config_json(&c)).unwrap(), (c.clone(), true));
        let bad: &[(&str, Value, &str)] = &[
            ("model_type", json!("llama"), "model_type = \"llama\""),
            ("activation_function", json!("gelu"), "activation_function = \"gelu\""),
            ("activation_function", json!("relu"), "gelu_new"),
            ("layer_norm_epsilon", json!(1e-6), "layer_norm_epsilon"),
            ("n_inner", json!(100), "n_inner = 100"),
            ("n_head", json!(5), "n_embd = 32 is not divisible by n_head = 5"),
            ("n_layer", json!(0), "n_layer = 0"),
            ("vocab_size", json!("big"), "vocab_size = \"big\""),
            ("scale_attn_by_inverse_layer_idx", json!(true), "scale_attn_by_inverse_layer_idx"),
            ("add_cross_attention", json!(true), "cross-attention"),
        ];
        for (key, value, needle) in bad {
            let mut v = config_json(&c);
            v[*key] = value.clone();
            let e = config_from_json(&v).unwrap_err();
            assert!(e.contains(needle), "{key}: {e:?} lacks {needle:?}");
        }
        let mut v = config_json(&c);
        v.as_object_mut().unwrap().remove("model_type");
        assert!(config_from_json(&v).unwrap_err().contains("model_type"));
    }

    #[test]
    fn eos_only_when_the_vocabulary_has_it() {
        let small = GptConfig { vocab_size: 997, block_size: 64, n_layer: 1, n_head: 1, n_embd: 8 };
        assert!(config_json(&small)["eos_token_id"].is_null());
        let gpt2 = GptConfig::preset("gpt2-124m").unwrap();
        assert_eq!(config_json(&gpt2)["eos_token_id"], json!(50256));
    }
}
