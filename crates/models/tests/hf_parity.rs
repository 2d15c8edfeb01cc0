//! Hugging Face interop. The golden files are made by
//! scripts/parity/make_hf_golden.py: a random GPT2LMHeadModel saved with
//! transformers' save_pretrained (tests/data/hf_gpt2_tiny/), and its float64
//! logits and greedy continuation (tests/data/hf_gpt2_tiny.golden.safetensors).
//!
//! Tolerances (max |ours - ref| / max |ref| over the logits):
//! - f64: the weights are the same float32 values on both sides and both
//!   compute in float64, so only summation order and libm differ (~1e-16 per
//!   op): 1e-10.
//! - f32: the bar, 1e-4. f32 rounds at ~6e-8 relative per op; through
//!   2 layers of sums of width <= 128 the expected error is ~1e-6, so this
//!   holds with margin and still catches any layout mistake (a missed
//!   transpose or bias shows at 1e-1).
//! - greedy tokens: exactly equal; the script checks that every greedy step's
//!   top two logits are >= 1e-3 apart, far above f32 rounding.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use trainer_core::{DType, Device, Tensor, io};
use trainer_models::gpt::{Gpt, GptConfig, Sampling, generate, hf, read_weights};
use trainer_nn::Module;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

fn hf_dir() -> PathBuf {
    data_dir().join("hf_gpt2_tiny")
}

fn golden() -> io::Loaded {
    io::load(&data_dir().join("hf_gpt2_tiny.golden.safetensors")).unwrap()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30)
}

fn logits_of(model: &Gpt, ids: &[u32], b: usize, t: usize) -> Vec<f64> {
    let mut acts = model.new_acts(b, t).unwrap();
    model.forward(&mut acts, ids, None).unwrap();
    let (v, vp) = (model.config.vocab_size, model.config.padded_vocab_size());
    acts.logits.to_vec_f64().unwrap().chunks(vp).flat_map(|r| r[..v].to_vec()).collect()
}

fn check_golden(device: &Device, dtype: DType, tol: f64) {
    let g = golden();
    let model = Gpt::from_path(&hf_dir(), dtype, device).unwrap();
    assert_eq!(model.config, GptConfig { vocab_size: 301, block_size: 40, n_layer: 2, n_head: 4, n_embd: 32 });
    let ids = &g.tensors["input.ids"];
    let (b, t) = (ids.dims()[0], ids.dims()[1]);
    let ours = logits_of(&model, &ids.to_vec::<u32>().unwrap(), b, t);
    let want = g.tensors["out.logits"].to_vec_f64().unwrap();
    let e = rel_err(&ours, &want);
    eprintln!("{device} {dtype}: logits vs transformers: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{device} {dtype}: logits rel err {e:e} > {tol:e}");

    let prompt = g.tensors["greedy.prompt"].to_vec::<u32>().unwrap();
    let want = g.tensors["greedy.tokens"].to_vec::<u32>().unwrap();
    let got = generate(&model, &prompt, want.len(), &Sampling::greedy(), None, |_| {}).unwrap();
    assert_eq!(got.tokens, want, "{device} {dtype}: greedy continuation");
}

#[test]
fn imported_model_matches_transformers_cpu() {
    check_golden(&Device::Cpu, DType::F64, 1e-10);
    check_golden(&Device::Cpu, DType::F32, 1e-4);
}

#[test]
fn imported_model_matches_transformers_cuda() {
    match Device::cuda(0) {
        Ok(dev) => check_golden(&dev, DType::F32, 1e-4),
        Err(e) => eprintln!("skipped: {e}"),
    }
}

fn hf_tensors(file: &Path) -> BTreeMap<String, Tensor> {
    io::load(file).unwrap().tensors
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims() && a.dtype() == b.dtype() && a.host_bytes().unwrap() == b.host_bytes().unwrap()
}

/// transformers' file -> ours -> export: the same tensors, bit for bit, under
/// the same names (the format of a GPT2LMHeadModel save).
#[test]
fn import_then_export_reproduces_the_transformers_file() {
    let out = tempfile::tempdir().unwrap();
    let (config, tensors, source) = read_weights(&hf_dir()).unwrap();
    hf::export(&config, &tensors, &source, out.path()).unwrap();
    let orig = hf_tensors(&hf_dir().join("model.safetensors"));
    let ours = hf_tensors(&out.path().join("model.safetensors"));
    assert_eq!(orig.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>());
    for (name, t) in &orig {
        assert!(same_bits(t, &ours[name]), "{name} differs");
    }
    let meta = io::load(&out.path().join("model.safetensors")).unwrap().metadata;
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"), "transformers needs format=pt");
    assert_eq!(hf::read_config(out.path()).unwrap(), config);
}

/// Our model -> weights file -> export -> import: every parameter back bit for
/// bit, padded embedding rows zero, through the CLI's path (read_weights).
#[test]
fn export_then_import_round_trips_our_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = GptConfig { vocab_size: 130, block_size: 24, n_layer: 3, n_head: 2, n_embd: 16 };
    let mut model = Gpt::new(config.clone(), DType::F32, &Device::Cpu).unwrap();
    model.init(9).unwrap();
    let weights = dir.path().join("model.safetensors");
    model.save_weights(&weights).unwrap();
    let exported = dir.path().join("hf");
    let (c, t, src) = read_weights(&weights).unwrap();
    hf::export(&c, &t, &src, &exported).unwrap();

    // The transformers layout: names, Conv1D shapes, the real vocabulary, no head.
    let files = hf_tensors(&exported.join("model.safetensors"));
    assert_eq!(files.len(), model.params().len());
    assert_eq!(files["transformer.wte.weight"].dims(), &[130, 16]);
    assert_eq!(files["transformer.h.2.attn.c_attn.weight"].dims(), &[16, 48]);
    assert_eq!(files["transformer.h.0.mlp.c_proj.weight"].dims(), &[64, 16]);
    assert!(!files.contains_key("lm_head.weight"));
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["model_type"], "gpt2");
    assert_eq!(json["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(json["activation_function"], "gelu_new");
    assert_eq!(json["layer_norm_epsilon"], 1e-5);
    assert_eq!(json["tie_word_embeddings"], true);

    let back = Gpt::from_path(&exported, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config, config);
    for (a, b) in model.params().iter().zip(back.params()) {
        assert_eq!(a.name, b.name);
        assert!(same_bits(&a.value, &b.value), "{} differs after the round trip", a.name);
    }
    let wte = back.wte.value.to_vec::<f32>().unwrap();
    assert!(wte[130 * 16..].iter().all(|&x| x == 0.0), "padded rows must be zero");

    // A bf16 weights file (from a bf16 run) exports as fp32 of the same values.
    let (c, mut t, _) = read_weights(&weights).unwrap();
    for v in t.values_mut() {
        *v = v.to_dtype(DType::BF16).unwrap();
    }
    let bf16_dir = dir.path().join("hf16");
    hf::export(&c, &t, &weights, &bf16_dir).unwrap();
    let wpe = &hf_tensors(&bf16_dir.join("model.safetensors"))["transformer.wpe.weight"];
    assert_eq!(wpe.dtype(), DType::F32);
    assert!(same_bits(wpe, &t["transformer.wpe.weight"].to_dtype(DType::F32).unwrap()));
}

// ------------------------------------------------------------------ variants and bad input

/// A copy of the golden directory whose model.safetensors holds `tensors`
/// and whose config.json is `config` (the golden one if None).
fn variant(tensors: &BTreeMap<String, Tensor>, config: Option<&serde_json::Value>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = match config {
        Some(c) => serde_json::to_string(c).unwrap(),
        None => fs::read_to_string(hf_dir().join("config.json")).unwrap(),
    };
    fs::write(dir.path().join("config.json"), text).unwrap();
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    io::save(&dir.path().join("model.safetensors"), &named, Some(meta)).unwrap();
    dir
}

fn golden_config() -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(hf_dir().join("config.json")).unwrap()).unwrap()
}

fn import_err(dir: &Path) -> String {
    let e = hf::import(dir).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

fn assert_has(e: &str, needles: &[&str]) {
    for n in needles {
        assert!(e.contains(n), "{e:?} lacks {n:?}");
    }
}

#[test]
fn accepted_variants_import_to_the_same_weights() {
    let orig = hf_tensors(&hf_dir().join("model.safetensors"));
    let reference = hf::import(&hf_dir()).unwrap().tensors;
    let same = |dir: &Path| {
        let got = hf::import(dir).unwrap().tensors;
        assert_eq!(got.len(), reference.len());
        for (name, t) in &reference {
            assert!(same_bits(t, &got[name]), "{name}");
        }
    };
    // Saved from a bare GPT2Model: no "transformer." prefix.
    let bare: BTreeMap<String, Tensor> = orig
        .iter()
        .map(|(n, t)| (n.strip_prefix("transformer.").unwrap().to_string(), t.try_clone().unwrap()))
        .collect();
    same(variant(&bare, None).path());
    // With the tied head saved, and the mask buffers older versions saved.
    let mut with_head: BTreeMap<String, Tensor> =
        orig.iter().map(|(n, t)| (n.clone(), t.try_clone().unwrap())).collect();
    with_head.insert("lm_head.weight".into(), orig["transformer.wte.weight"].try_clone().unwrap());
    let mask = Tensor::from_vec(vec![1.0f32; 40 * 40], [1, 1, 40, 40], &Device::Cpu).unwrap();
    with_head.insert("transformer.h.0.attn.bias".into(), mask.try_clone().unwrap());
    with_head
        .insert("transformer.h.1.attn.masked_bias".into(), Tensor::from_vec(vec![-1e4f32], [1], &Device::Cpu).unwrap());
    same(variant(&with_head, None).path());
    // bf16 weights import as their f32 values.
    let half: BTreeMap<String, Tensor> =
        orig.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap())).collect();
    let got = hf::import(variant(&half, None).path()).unwrap();
    assert_eq!(got.tensors["transformer.wpe.weight"].dtype(), DType::F32);
    // Sharded: model.safetensors.index.json and two files.
    let dir = tempfile::tempdir().unwrap();
    fs::copy(hf_dir().join("config.json"), dir.path().join("config.json")).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut map = serde_json::Map::new();
    for (i, (n, t)) in orig.iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        if i % 2 == 0 {
            a.push((n.as_str(), t))
        } else {
            b.push((n.as_str(), t))
        }
        map.insert(n.clone(), file.into());
    }
    io::save(&dir.path().join("model-00001-of-00002.safetensors"), &a, None).unwrap();
    io::save(&dir.path().join("model-00002-of-00002.safetensors"), &b, None).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    same(dir.path());
}

#[test]
fn bad_directories_name_the_file_and_tensor() {
    let orig = hf_tensors(&hf_dir().join("model.safetensors"));
    let copy =
        || -> BTreeMap<String, Tensor> { orig.iter().map(|(n, t)| (n.clone(), t.try_clone().unwrap())).collect() };

    // Not GPT-2, an activation we do not compute.
    let mut c = golden_config();
    c["model_type"] = "llama".into();
    assert_has(&import_err(variant(&orig, Some(&c)).path()), &["config.json", "model_type = \"llama\"", "gpt2"]);
    let mut c = golden_config();
    c["activation_function"] = "relu".into();
    assert_has(&import_err(variant(&orig, Some(&c)).path()), &["config.json", "activation_function = \"relu\""]);
    // A config whose shape does not match the tensors.
    let mut c = golden_config();
    c["n_embd"] = 64.into();
    assert_has(
        &import_err(variant(&orig, Some(&c)).path()),
        &["model.safetensors", "tensor transformer.wte.weight has shape (301, 32)", "config.json needs (301, 64)"],
    );

    // A missing tensor, one of the wrong shape (our Linear layout), an extra one.
    let mut t = copy();
    t.remove("transformer.h.1.mlp.c_fc.bias");
    assert_has(&import_err(variant(&t, None).path()), &["missing tensor transformer.h.1.mlp.c_fc.bias"]);
    let mut t = copy();
    let w = Tensor::zeros([96, 32], DType::F32, &Device::Cpu).unwrap();
    t.insert("transformer.h.0.attn.c_attn.weight".into(), w);
    assert_has(
        &import_err(variant(&t, None).path()),
        &["model.safetensors", "transformer.h.0.attn.c_attn.weight has shape (96, 32)", "needs (32, 96)"],
    );
    let mut t = copy();
    t.insert("score.weight".into(), Tensor::zeros([2, 32], DType::F32, &Device::Cpu).unwrap());
    assert_has(&import_err(variant(&t, None).path()), &["unexpected tensor score.weight"]);

    // An untied head, and an untied config without a head.
    let mut t = copy();
    let mut head = orig["transformer.wte.weight"].to_vec::<f32>().unwrap();
    head[5] += 0.5;
    t.insert("lm_head.weight".into(), Tensor::from_vec(head, [301, 32], &Device::Cpu).unwrap());
    assert_has(&import_err(variant(&t, None).path()), &["lm_head.weight differs from wte.weight", "untied"]);
    let mut c = golden_config();
    c["tie_word_embeddings"] = false.into();
    assert_has(&import_err(variant(&orig, Some(&c)).path()), &["tie_word_embeddings = false", "lm_head.weight"]);

    // Missing files, invalid JSON, a truncated weights file.
    let dir = variant(&orig, None);
    fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
    assert_has(&import_err(dir.path()), &["no model.safetensors", "pytorch_model.bin", "safe_serialization"]);
    let dir = variant(&orig, None);
    fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_has(&import_err(dir.path()), &["config.json"]);
    let e = Gpt::from_path(dir.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    // Without config.json the directory reads as ours, whose file lacks our metadata.
    assert_has(&e, &["model.safetensors", "gpt_config"]);
    let dir = variant(&orig, None);
    fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert_has(&import_err(dir.path()), &["config.json", "invalid JSON"]);
    let dir = variant(&orig, None);
    let bytes = fs::read(dir.path().join("model.safetensors")).unwrap();
    fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_has(&import_err(dir.path()), &["model.safetensors"]);
    let e = Gpt::from_path(Path::new("/nonexistent/dir"), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert_has(&e, &["/nonexistent/dir", "no such file"]);
    let empty = tempfile::tempdir().unwrap();
    let e = Gpt::from_path(empty.path(), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert_has(&e, &["neither config.json", "nor model.safetensors"]);
}

/// Gpt::load_hf (what `init_from` uses) checks the shape against the model's.
#[test]
fn load_hf_into_a_model_of_another_shape_is_an_error() {
    let other = GptConfig { vocab_size: 301, block_size: 40, n_layer: 3, n_head: 4, n_embd: 32 };
    let mut m = Gpt::new(other, DType::F32, &Device::Cpu).unwrap();
    let e = m.load_hf(&hf_dir()).unwrap_err().to_string();
    assert_has(&e, &["config.json", "n_layer: 2", "n_layer: 3"]);
    let mut m = Gpt::new(hf::read_config(&hf_dir()).unwrap(), DType::F32, &Device::Cpu).unwrap();
    m.load_hf(&hf_dir()).unwrap();
}
