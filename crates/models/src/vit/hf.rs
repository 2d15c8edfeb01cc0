//! Hugging Face interop: the directory that `transformers.ViTForImageClassification`
//! writes with `save_pretrained` (`config.json` + `model.safetensors`, and a
//! `preprocessor_config.json` beside them from the image processor), to and
//! from our ViT.
//!
//! What differs between the two layouts:
//! - The patch projection is a Conv2d there, weight (C, channels, P, P); ours
//!   is the same numbers as a Linear (C, channels*P*P): a reshape, no copy order change.
//! - Query, key and value are three Linears there; ours is one fused (3C, C)
//!   projection, q | k | v stacked by rows.
//! - The class token (1, 1, C) and position table (1, T, C) lose their
//!   leading ones here.
//! - transformers' ViT pools the class token; its LayerNorm epsilon is
//!   `layer_norm_eps` (1e-12 by default); its GELU (`hidden_act = "gelu"`) is
//!   the exact erf form, as ours.
//! - Pixel normalization lives in the image processor's `image_mean` and
//!   `image_std` (0.5 each by default); ours is in the model's config.
//!   Import reads them when the file is there; export writes it.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use trainer_core::{Device, Shape, Tensor, io};

use super::VitConfig;
use crate::hf_dir::{
    CONFIG_FILE, WEIGHTS_FILE, file_err, host_f32, positive_size, read_json, weight_files, write_atomic,
};
use crate::{Error, Result};

pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// transformers' ViTConfig defaults, which apply to keys a config.json leaves out.
const HF_LN_EPS: f64 = 1e-12;
const HF_PIXEL_MEAN: f64 = 0.5;
const HF_PIXEL_STD: f64 = 0.5;

/// The model from a transformers ViT `config.json` (and the image
/// processor's normalization), after checking that everything else in it
/// describes the model we compute.
pub fn read_config(dir: &Path) -> Result<VitConfig> {
    let path = dir.join(CONFIG_FILE);
    let mut c = config_from_json(&read_json(&path)?).map_err(|msg| file_err(&path, msg))?;
    let pre = dir.join(PREPROCESSOR_FILE);
    if pre.is_file() {
        let v = read_json(&pre)?;
        for (key, out) in [("image_mean", &mut c.pixel_mean), ("image_std", &mut c.pixel_std)] {
            let Some(x) = v.get(key) else { continue };
            let vals: Option<Vec<f64>> = x.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect());
            match vals {
                Some(vals) if vals.len() == c.channels => *out = vals,
                _ => {
                    return Err(file_err(
                        &pre,
                        format!("{key} = {x}: expected {} numbers, one per channel (num_channels)", c.channels),
                    ));
                }
            }
        }
    }
    c.validate().map_err(|e| file_err(&path, e.to_string()))?;
    Ok(c)
}

fn config_from_json(v: &Value) -> std::result::Result<VitConfig, String> {
    let obj = v.as_object().ok_or("expected a JSON object")?;
    match obj.get("model_type").and_then(Value::as_str) {
        Some("vit") => {}
        Some(other) => return Err(format!("model_type = \"{other}\": expected \"vit\" (ViTForImageClassification)")),
        None => return Err("no model_type: not a transformers config (expected model_type \"vit\")".into()),
    }
    let size = |key: &str, default: usize| positive_size(obj, key, default);
    let hidden = size("hidden_size", 768)?;
    let classes = match obj.get("id2label").and_then(Value::as_object) {
        Some(m) => m.len(),
        None => size("num_labels", 2)?,
    };
    let channels = size("num_channels", 3)?;
    let c = VitConfig {
        image_size: size("image_size", 224)?,
        patch_size: size("patch_size", 16)?,
        channels,
        num_classes: classes,
        n_layer: size("num_hidden_layers", 12)?,
        n_head: size("num_attention_heads", 12)?,
        n_embd: hidden,
        pool: "class".into(),
        ln_eps: match obj.get("layer_norm_eps") {
            None => HF_LN_EPS,
            Some(x) => x
                .as_f64()
                .filter(|e| *e > 0.0)
                .ok_or_else(|| format!("layer_norm_eps = {x}: expected a positive number"))?,
        },
        pixel_mean: vec![HF_PIXEL_MEAN; channels],
        pixel_std: vec![HF_PIXEL_STD; channels],
    };
    if size("intermediate_size", 4 * hidden)? != 4 * hidden {
        return Err(format!(
            "intermediate_size = {}: only 4 * hidden_size = {} is supported",
            obj["intermediate_size"],
            4 * hidden
        ));
    }
    match obj.get("hidden_act").map(|x| x.as_str()) {
        None | Some(Some("gelu")) => {}
        Some(other) => {
            return Err(format!(
                "hidden_act = {}: only \"gelu\" (the exact erf form) is supported",
                other.map_or("a non-string".into(), |s| format!("\"{s}\""))
            ));
        }
    }
    if obj.get("qkv_bias").is_some_and(|x| x.as_bool() != Some(true)) {
        return Err("qkv_bias = false: only query/key/value projections with biases are supported".into());
    }
    Ok(c)
}

/// ViTConfig for our model, as `save_pretrained` would write it (dropout 0:
/// we train without it). Class names, when given, become id2label.
pub fn config_json(c: &VitConfig, class_names: Option<&[String]>) -> std::result::Result<Value, String> {
    if c.pool != "class" {
        return Err(format!(
            "pool = \"{}\": transformers' ViTForImageClassification reads the class token; only pool = \"class\" exports",
            c.pool
        ));
    }
    let name = |i: usize| class_names.and_then(|n| n.get(i).cloned()).unwrap_or(format!("LABEL_{i}"));
    let id2label: serde_json::Map<String, Value> =
        (0..c.num_classes).map(|i| (i.to_string(), json!(name(i)))).collect();
    let label2id: serde_json::Map<String, Value> = (0..c.num_classes).map(|i| (name(i), json!(i))).collect();
    Ok(json!({
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": 4 * c.n_embd,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": c.ln_eps,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.channels,
        "qkv_bias": true,
        "encoder_stride": c.patch_size,
        "id2label": id2label,
        "label2id": label2id,
        "torch_dtype": "float32",
    }))
}

/// The image processor's config: resize to the model's size, rescale to
/// 0-1, normalize with the model's statistics (what our loader and patchify do).
fn preprocessor_json(c: &VitConfig) -> Value {
    json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": c.image_size, "width": c.image_size},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": c.pixel_mean,
        "image_std": c.pixel_std,
    })
}

/// One of our parameters and where its numbers are in transformers' layout:
/// the tensors (concatenated by rows when several: q | k | v) and their shapes.
struct Mapping {
    ours: String,
    ours_dims: Vec<usize>,
    theirs: Vec<(String, Vec<usize>)>,
}

/// Every parameter of our ViT (in its order) against ViTForImageClassification's.
fn layout(c: &VitConfig) -> Vec<Mapping> {
    let (e, p, ch, t, k) = (c.n_embd, c.patch_size, c.channels, c.seq_len(), c.num_classes);
    let one = |ours: String, ours_dims: &[usize], theirs: String, their_dims: &[usize]| Mapping {
        ours,
        ours_dims: ours_dims.to_vec(),
        theirs: vec![(theirs, their_dims.to_vec())],
    };
    let emb = "vit.embeddings";
    let mut out = vec![
        one(
            "patch_embed.weight".into(),
            &[e, ch * p * p],
            format!("{emb}.patch_embeddings.projection.weight"),
            &[e, ch, p, p],
        ),
        one("patch_embed.bias".into(), &[e], format!("{emb}.patch_embeddings.projection.bias"), &[e]),
        one("cls_token".into(), &[e], format!("{emb}.cls_token"), &[1, 1, e]),
        one("pos_embed".into(), &[t, e], format!("{emb}.position_embeddings"), &[1, t, e]),
    ];
    for i in 0..c.n_layer {
        let (ours, hf) = (format!("blocks.{i}"), format!("vit.encoder.layer.{i}"));
        let qkv = |what: &str, dims: &[usize]| -> Vec<(String, Vec<usize>)> {
            ["query", "key", "value"]
                .iter()
                .map(|n| (format!("{hf}.attention.attention.{n}.{what}"), dims.to_vec()))
                .collect()
        };
        out.extend([
            one(format!("{ours}.ln_1.weight"), &[e], format!("{hf}.layernorm_before.weight"), &[e]),
            one(format!("{ours}.ln_1.bias"), &[e], format!("{hf}.layernorm_before.bias"), &[e]),
            Mapping {
                ours: format!("{ours}.attn.c_attn.weight"),
                ours_dims: vec![3 * e, e],
                theirs: qkv("weight", &[e, e]),
            },
            Mapping { ours: format!("{ours}.attn.c_attn.bias"), ours_dims: vec![3 * e], theirs: qkv("bias", &[e]) },
            one(format!("{ours}.attn.c_proj.weight"), &[e, e], format!("{hf}.attention.output.dense.weight"), &[e, e]),
            one(format!("{ours}.attn.c_proj.bias"), &[e], format!("{hf}.attention.output.dense.bias"), &[e]),
            one(format!("{ours}.ln_2.weight"), &[e], format!("{hf}.layernorm_after.weight"), &[e]),
            one(format!("{ours}.ln_2.bias"), &[e], format!("{hf}.layernorm_after.bias"), &[e]),
            one(format!("{ours}.mlp.c_fc.weight"), &[4 * e, e], format!("{hf}.intermediate.dense.weight"), &[4 * e, e]),
            one(format!("{ours}.mlp.c_fc.bias"), &[4 * e], format!("{hf}.intermediate.dense.bias"), &[4 * e]),
            one(format!("{ours}.mlp.c_proj.weight"), &[e, 4 * e], format!("{hf}.output.dense.weight"), &[e, 4 * e]),
            one(format!("{ours}.mlp.c_proj.bias"), &[e], format!("{hf}.output.dense.bias"), &[e]),
        ]);
    }
    out.extend([
        one("ln_f.weight".into(), &[e], "vit.layernorm.weight".into(), &[e]),
        one("ln_f.bias".into(), &[e], "vit.layernorm.bias".into(), &[e]),
        one("head.weight".into(), &[k, e], "classifier.weight".into(), &[k, e]),
        one("head.bias".into(), &[k], "classifier.bias".into(), &[k]),
    ]);
    out
}

/// A ViT read from a Hugging Face directory, in our names and layouts (fp32 on the host).
#[derive(Debug)]
pub struct HfImport {
    pub config: VitConfig,
    pub tensors: BTreeMap<String, Tensor>,
}

/// Reads a transformers ViTForImageClassification directory into our layout.
/// Every error names the file and, where it applies, the tensor or key.
pub fn import(dir: &Path) -> Result<HfImport> {
    let config = read_config(dir)?;
    let mut found: BTreeMap<String, (Tensor, std::path::PathBuf)> = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, tensor) in io::load(&file)?.tensors {
            if found.contains_key(&name) {
                return Err(file_err(&file, format!("tensor {name} appears twice")));
            }
            found.insert(name, (tensor, file.clone()));
        }
    }
    let config_path = dir.join(CONFIG_FILE);
    let mut tensors = BTreeMap::new();
    for m in layout(&config) {
        let mut data = Vec::new();
        for (name, dims) in &m.theirs {
            let (t, file) = found.remove(name).ok_or_else(|| {
                file_err(dir, format!("missing tensor {name}, which {} describes", config_path.display()))
            })?;
            if t.dims() != dims.as_slice() {
                let msg = format!(
                    "tensor {name} has shape {} but {} needs {}",
                    t.shape(),
                    config_path.display(),
                    Shape::from(dims.as_slice())
                );
                return Err(file_err(&file, msg));
            }
            if !t.dtype().is_float() {
                return Err(file_err(&file, format!("tensor {name} has dtype {}, expected a float", t.dtype())));
            }
            data.extend(host_f32(&t)?);
        }
        tensors.insert(m.ours.clone(), Tensor::from_vec(data, m.ours_dims.as_slice(), &Device::Cpu)?);
    }
    // ViTModel's pooler (a dense + tanh on the class token) is not used by
    // ViTForImageClassification, which is built without it.
    found.retain(|name, _| !name.starts_with("vit.pooler."));
    if let Some((name, (_, file))) = found.iter().next() {
        return Err(file_err(file, format!("unexpected tensor {name}: not a weight of ViTForImageClassification")));
    }
    Ok(HfImport { config, tensors })
}

/// Writes `dir/config.json`, `dir/preprocessor_config.json` and
/// `dir/model.safetensors` (fp32) from our parameters by name, each file
/// atomically. `source` names where the tensors came from, for errors.
pub fn export(
    config: &VitConfig,
    tensors: &BTreeMap<String, Tensor>,
    class_names: Option<&[String]>,
    source: &Path,
    dir: &Path,
) -> Result<()> {
    config.validate()?;
    let config_value = config_json(config, class_names).map_err(|msg| file_err(source, msg))?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for m in layout(config) {
        let t = tensors.get(&m.ours).ok_or_else(|| file_err(source, format!("missing tensor {}", m.ours)))?;
        if t.dims() != m.ours_dims.as_slice() {
            return Err(file_err(
                source,
                format!(
                    "tensor {} has shape {} but the model config needs {}",
                    m.ours,
                    t.shape(),
                    Shape::from(m.ours_dims.as_slice())
                ),
            ));
        }
        let data = host_f32(t)?;
        let mut rest = data.as_slice();
        for (name, dims) in &m.theirs {
            let n: usize = dims.iter().product();
            let (part, tail) = rest.split_at(n);
            named.push((name.clone(), Tensor::from_vec(part.to_vec(), dims.as_slice(), &Device::Cpu)?));
            rest = tail;
        }
    }
    std::fs::create_dir_all(dir).map_err(|err| file_err(dir, format!("cannot create the output directory: {err}")))?;
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // transformers refuses a safetensors file without format metadata.
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    io::save(&dir.join(WEIGHTS_FILE), &refs, Some(meta))?;
    for (file, value) in [(CONFIG_FILE, config_value), (PREPROCESSOR_FILE, preprocessor_json(config))] {
        let text = serde_json::to_string_pretty(&value).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&dir.join(file), format!("{text}\n").as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vit::Vit;
    use trainer_core::DType;
    use trainer_nn::Module;

    fn small() -> VitConfig {
        let mut c = VitConfig::preset("vit-fashion").unwrap();
        c.n_layer = 2;
        c.ln_eps = 1e-12;
        c
    }

    #[test]
    fn the_layout_covers_every_parameter_in_order() {
        let c = small();
        let ours: Vec<String> =
            Vit::new(c.clone(), DType::F32, &Device::Cpu).unwrap().params().iter().map(|p| p.name.clone()).collect();
        let mapped: Vec<String> = layout(&c).into_iter().map(|m| m.ours).collect();
        assert_eq!(ours, mapped);
    }

    #[test]
    fn config_round_trips_and_bad_configs_name_the_key() {
        let mut c = small();
        c.pixel_mean = vec![HF_PIXEL_MEAN];
        c.pixel_std = vec![HF_PIXEL_STD];
        let names: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
        let v = config_json(&c, Some(&names)).unwrap();
        assert_eq!(config_from_json(&v).unwrap(), c);
        assert_eq!(v["id2label"]["3"], json!("class3"));
        let bad: &[(&str, Value, &str)] = &[
            ("model_type", json!("deit"), "model_type = \"deit\""),
            ("hidden_act", json!("gelu_new"), "hidden_act = \"gelu_new\""),
            ("intermediate_size", json!(100), "intermediate_size = 100"),
            ("qkv_bias", json!(false), "qkv_bias = false"),
            ("num_hidden_layers", json!(0), "num_hidden_layers = 0"),
            ("layer_norm_eps", json!("small"), "layer_norm_eps"),
        ];
        for (key, value, needle) in bad {
            let mut v = config_json(&c, None).unwrap();
            v[*key] = value.clone();
            let e = config_from_json(&v).unwrap_err();
            assert!(e.contains(needle), "{key}: {e:?} lacks {needle:?}");
        }
        c.pool = "mean".into();
        assert!(config_json(&c, None).unwrap_err().contains("only pool = \"class\" exports"));
    }
}
