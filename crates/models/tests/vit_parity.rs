//! Parity with transformers' ViTForImageClassification. The golden files are
//! made by scripts/parity/make_vit_golden.py: a small random model saved with
//! save_pretrained (tests/data/hf_vit_tiny/, with per-channel normalization in
//! its preprocessor_config.json), and the float64 logits, loss and every
//! gradient of one batch of uint8 images (tests/data/hf_vit_tiny.golden.safetensors).
//!
//! Our import runs in f64 and in f32 against that f64 ground truth:
//! - f64: the inputs are the same float32-normalized pixels, so every
//!   difference is reduction order in f64 (~1e-16 per op): 1e-10.
//! - f32: the bar, 1e-4 relative (per tensor: max |ours - ref| / max
//!   |ref|). f32 rounding (~6e-8 per op) through two blocks of width 32 gives
//!   ~1e-6; a real mistake shows at 1e-2 or more.
//!
//! The gradients are compared in transformers' layout: ours are exported by
//! the same mapping `trainer export` uses (q | k | v split, the patch
//! projection reshaped to the convolution's kernel).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;

use trainer_core::{DType, Device, Tensor, io};
use trainer_data::Batch;
use trainer_models::vit::{Vit, VitActs, hf};
use trainer_models::{Acts, Model, ignore_ready};
use trainer_nn::Module;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

fn golden() -> io::Loaded {
    io::load(&data_dir().join("hf_vit_tiny.golden.safetensors")).unwrap()
}

fn batch(g: &io::Loaded, cfg: &trainer_models::vit::VitConfig) -> Batch {
    let images = g.tensors["input.images"].to_vec::<u32>().unwrap();
    let labels = g.tensors["input.labels"].to_vec::<u32>().unwrap();
    Batch::Images {
        b: labels.len(),
        height: cfg.image_size,
        width: cfg.image_size,
        channels: cfg.channels,
        pixels: images.iter().map(|&p| p as u8).collect(),
        labels,
    }
}

fn rel_err(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let diff = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    diff / theirs.iter().map(|v| v.abs()).fold(1e-30, f64::max)
}

fn check(dtype: DType, tol: f64) {
    let g = golden();
    let dir = data_dir().join("hf_vit_tiny");
    let mut model = Vit::from_hf(&dir, dtype, &Device::Cpu).unwrap();
    assert_eq!(model.config.pixel_mean, vec![0.4, 0.5, 0.6], "normalization from preprocessor_config.json");
    assert_eq!((model.config.num_classes, model.config.ln_eps), (5, 1e-12));
    let b = batch(&g, &model.config);

    let mut acts: Acts = Model::new_acts(&model, &b).unwrap();
    let e = model.evaluate(&mut acts, &b).unwrap();
    let logits = acts.get_mut::<VitActs>("vit").unwrap().logits.to_vec_f64().unwrap();
    let err = rel_err(&logits, &g.tensors["out.logits"].to_vec_f64().unwrap());
    eprintln!("{dtype}: logits rel err {err:.2e}");
    assert!(err < tol, "{dtype}: logits relative error {err:e}");
    let want_loss = g.tensors["out.loss"].to_vec_f64().unwrap()[0];
    assert!((e.loss - want_loss).abs() < tol * want_loss, "{dtype}: loss {} vs {want_loss}", e.loss);

    let loss = model.forward_backward(&mut acts, &b, 1.0, &mut ignore_ready).unwrap();
    assert!((loss - want_loss).abs() < tol * want_loss);
    // Our gradients, in transformers' names and shapes.
    let grads: BTreeMap<String, Tensor> =
        model.params().iter().map(|p| (p.name.clone(), p.grad().unwrap().to_dtype(DType::F32).unwrap())).collect();
    let out = tempfile::tempdir().unwrap();
    hf::export(&model.config, &grads, None, &dir, out.path()).unwrap();
    let ours = io::load(&out.path().join("model.safetensors")).unwrap().tensors;
    let mut worst = 0.0f64;
    for (name, t) in &ours {
        let want = g.tensors.get(&format!("grad.{name}")).unwrap_or_else(|| panic!("golden lacks grad.{name}"));
        assert_eq!(t.dims(), want.dims(), "{name}");
        if name.ends_with("attention.key.bias") {
            // Exactly zero in exact arithmetic (a key bias adds the same
            // q.b to every score of a row, which the softmax cancels): both
            // sides hold rounding noise, so the check is that it is noise.
            let (ours, theirs) = (t.to_vec_f64().unwrap(), want.to_vec_f64().unwrap());
            let noise = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            assert!(ours.iter().chain(&theirs).all(|v| v.abs() < noise), "{dtype}: {name} should be ~0");
            continue;
        }
        let err = rel_err(&t.to_vec_f64().unwrap(), &want.to_vec_f64().unwrap());
        // The export writes f32: in f64 the bar is f32 rounding of the gradient itself (6e-8).
        let bar = if dtype == DType::F64 { 1e-7 } else { tol };
        assert!(err < bar, "{dtype}: gradient of {name}: relative error {err:e}");
        worst = worst.max(err);
    }
    // Embeddings (4), two layers of 16, the final LayerNorm (2), the classifier (2).
    assert_eq!(ours.len(), 4 + 2 * 16 + 2 + 2, "every transformers tensor has a gradient");
    eprintln!("{dtype}: worst gradient rel err {worst:.2e}");
}

#[test]
fn imported_vit_matches_transformers_in_f64() {
    check(DType::F64, 1e-10);
}

#[test]
fn imported_vit_matches_transformers_in_f32() {
    check(DType::F32, 1e-4);
}

/// Fine-tuning at another resolution: the 12x12 model (3x3 patches) at
/// 20x20 (5x5), its position grid interpolated, against transformers'
/// `interpolate_pos_encoding=True` on the same images (f64).
#[test]
fn at_another_resolution_the_positions_are_interpolated_as_transformers_does() {
    let g = golden();
    let dir = data_dir().join("hf_vit_tiny");
    let mut c = Vit::from_hf(&dir, DType::F64, &Device::Cpu).unwrap().config;
    c.image_size = 20;
    let mut model = Vit::new(c.clone(), DType::F64, &Device::Cpu).unwrap();
    model.load_hf(&dir).unwrap();
    let images = g.tensors["input.images20"].to_vec::<u32>().unwrap();
    let b = images.len() / (20 * 20 * 3);
    let batch = Batch::Images {
        b,
        height: 20,
        width: 20,
        channels: 3,
        pixels: images.iter().map(|&p| p as u8).collect(),
        labels: vec![0; b],
    };
    let mut acts: Acts = Model::new_acts(&model, &batch).unwrap();
    model.evaluate(&mut acts, &batch).unwrap();
    let logits = acts.get_mut::<VitActs>("vit").unwrap().logits.to_vec_f64().unwrap();
    let err = rel_err(&logits, &g.tensors["out.logits20"].to_vec_f64().unwrap());
    eprintln!("20x20: logits rel err {err:.2e}");
    assert!(err < 1e-10, "logits relative error {err:e}");
}

#[test]
fn export_round_trips_and_a_new_head_starts_at_zero() {
    let dir = data_dir().join("hf_vit_tiny");
    let model = Vit::from_hf(&dir, DType::F32, &Device::Cpu).unwrap();
    let tensors: BTreeMap<String, Tensor> =
        model.params().iter().map(|p| (p.name.clone(), p.value.try_clone().unwrap())).collect();
    let out = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    hf::export(&model.config, &tensors, Some(&names), &dir, out.path()).unwrap();
    // Byte-identical tensors to what transformers saved.
    let theirs = io::load(&dir.join("model.safetensors")).unwrap().tensors;
    let ours = io::load(&out.path().join("model.safetensors")).unwrap().tensors;
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (name, t) in &ours {
        assert_eq!(t.to_vec::<f32>().unwrap(), theirs[name].to_vec::<f32>().unwrap(), "{name}");
    }
    let back = hf::read_config(out.path()).unwrap();
    assert_eq!(back, model.config);

    // Fine-tuning for 3 classes: the body loads, the head starts at zero.
    let mut c = model.config.clone();
    c.num_classes = 3;
    let mut small = Vit::new(c, DType::F32, &Device::Cpu).unwrap();
    small.init(1).unwrap();
    small.load_hf(&dir).unwrap();
    assert!(small.head.weight.value.to_vec_f64().unwrap().iter().all(|&v| v == 0.0));
    assert_eq!(small.pos_embed.value.to_vec::<f32>().unwrap(), model.pos_embed.value.to_vec::<f32>().unwrap());
    // Another architecture is refused, naming the file.
    let mut c = model.config.clone();
    c.n_layer = 3;
    c.image_size = 16;
    let mut deeper = Vit::new(c, DType::F32, &Device::Cpu).unwrap();
    let e = deeper.load_hf(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("n_layer: 2"), "{e}");
}
