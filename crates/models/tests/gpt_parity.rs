//! Whole-model parity with PyTorch. The golden file is made by
//! scripts/parity/make_gpt_golden.py: the same GPT built in PyTorch float64 from
//! our own initialization, with logits, loss, every gradient and the losses of
//! 10 AdamW steps (with clipping).
//!
//! We run the model in f64 and in f32 against that f64 ground truth:
//! - f64: every difference is reduction order in f64 (~1e-16 per op), so 1e-12.
//! - f32: the bar, 1e-4 relative on logits and gradients and 1e-5 on
//!   losses. f32 carries ~6e-8 relative rounding per op; through ~10 layers of
//!   sums of width <= 128 the expected error is ~1e-6, so these bars hold with
//!   margin and still catch any real mistake (those show up at 1e-2 or more).
//!
//! "Relative" is per tensor: max |ours - ref| / max |ref|, which stays meaningful
//! for tensors with entries near zero.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use anyhow::Result;
use trainer_core::{DType, Device, Tensor, io};
use trainer_models::gpt::{Gpt, GptConfig};
use trainer_nn::{AdamW, AdamWConfig, Module, clip_coefficient, global_grad_norm};

struct Golden {
    path: PathBuf,
    loaded: io::Loaded,
    config: GptConfig,
    b: usize,
    t: usize,
    opt: serde_json::Value,
}

fn golden() -> Result<Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gpt_parity.safetensors");
    let loaded = io::load(&path)?;
    let config: GptConfig = serde_json::from_str(&loaded.metadata["config"])?;
    let batch: serde_json::Value = serde_json::from_str(&loaded.metadata["batch"])?;
    let opt = serde_json::from_str(&loaded.metadata["optimizer"])?;
    let (b, t) = (batch["B"].as_u64().unwrap() as usize, batch["T"].as_u64().unwrap() as usize);
    Ok(Golden { path, loaded, config, b, t, opt })
}

impl Golden {
    fn tensor(&self, name: &str) -> &Tensor {
        self.loaded.tensors.get(name).unwrap_or_else(|| panic!("golden file lacks {name}"))
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        self.tensor(name).to_vec::<u32>().unwrap()
    }
    fn model(&self, dtype: DType, device: &Device) -> Gpt {
        let mut m = Gpt::new(self.config.clone(), dtype, device).unwrap();
        for p in m.params_mut() {
            let src = self.tensor(&format!("param.{}", p.name)).to_dtype(dtype).unwrap().to_device(device).unwrap();
            trainer_core::ops::copy(&mut p.value, &src).unwrap();
        }
        m
    }
}

/// max |a - b| / max |b| over the tensor.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if scale == 0.0 { diff } else { diff / scale }
}

fn assert_close(what: &str, ours: &[f64], reference: &[f64], tol: f64) {
    let e = rel_err(ours, reference);
    eprintln!("{what}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:e} exceeds {tol:e}");
}

fn check_forward_backward(device: &Device, dtype: DType, tol_logits: f64, tol_tensor: f64, tol_loss: f64) {
    let g = golden().unwrap();
    let mut model = g.model(dtype, device);
    let (tokens, targets) = (g.ids("input.tokens"), g.ids("input.targets"));
    let mut acts = model.new_acts(g.b, g.t).unwrap();

    let loss = model.forward(&mut acts, &tokens, Some(&targets)).unwrap().unwrap();
    let ref_loss = g.tensor("out.loss").to_vec_f64().unwrap()[0];
    assert_close(&format!("{dtype} loss"), &[loss], &[ref_loss], tol_loss);

    // Our logits are padded to a multiple of 128; the reference has the real vocabulary.
    let (v, vp) = (g.config.vocab_size, g.config.padded_vocab_size());
    let logits: Vec<f64> = acts.logits.to_vec_f64().unwrap().chunks(vp).flat_map(|r| r[..v].to_vec()).collect();
    assert_close(&format!("{dtype} logits"), &logits, &g.tensor("out.logits").to_vec_f64().unwrap(), tol_logits);

    model.zero_grad().unwrap();
    model.forward_backward(&mut acts, &tokens, &targets, 1.0).unwrap();
    for p in model.params() {
        let reference = g.tensor(&format!("grad.{}", p.name)).to_vec_f64().unwrap();
        assert_close(
            &format!("{dtype} grad {}", p.name),
            &p.grad().unwrap().to_vec_f64().unwrap(),
            &reference,
            tol_tensor,
        );
    }
    let wte_grad = model.wte.grad().unwrap().to_vec_f64().unwrap();
    assert!(wte_grad[v * g.config.n_embd..].iter().all(|&x| x == 0.0), "padded embedding rows get no gradient");
}

fn check_training_steps(device: &Device, dtype: DType, tol_loss: f64) {
    let g = golden().unwrap();
    let mut model = g.model(dtype, device);
    let (tokens, targets) = (g.ids("input.tokens"), g.ids("input.targets"));
    let mut acts = model.new_acts(g.b, g.t).unwrap();
    let o = &g.opt;
    let f = |k: &str| o[k].as_f64().unwrap();
    let cfg = AdamWConfig { beta1: f("beta1"), beta2: f("beta2"), eps: f("eps"), weight_decay: f("weight_decay") };
    let mut opt = AdamW::new(cfg, &model.params()).unwrap();
    let reference = g.tensor("steps.losses").to_vec_f64().unwrap();
    let mut losses = Vec::new();
    for _ in 0..reference.len() {
        model.zero_grad().unwrap();
        model.forward_backward(&mut acts, &tokens, &targets, 1.0).unwrap();
        losses.push(acts.mean_loss().unwrap());
        let norm = global_grad_norm(&model.params()).unwrap();
        opt.update(model.params_mut(), f("lr"), clip_coefficient(norm, f("grad_clip"))).unwrap();
    }
    for (i, (a, b)) in losses.iter().zip(&reference).enumerate() {
        assert_close(&format!("{dtype} step {i} loss"), &[*a], &[*b], tol_loss);
    }
    assert!(losses.last() < losses.first(), "the loss falls over the 10 steps");
}

#[test]
fn f64_matches_pytorch_tightly() {
    check_forward_backward(&Device::Cpu, DType::F64, 1e-12, 1e-12, 1e-13);
}

#[test]
fn f32_matches_pytorch() {
    check_forward_backward(&Device::Cpu, DType::F32, 1e-4, 1e-4, 1e-5);
}

#[test]
fn f64_adamw_steps_match_pytorch() {
    check_training_steps(&Device::Cpu, DType::F64, 1e-12);
}

#[test]
fn f32_adamw_steps_match_pytorch() {
    check_training_steps(&Device::Cpu, DType::F32, 1e-5);
}

#[test]
fn weights_round_trip_and_mismatches_are_named() {
    let g = golden().unwrap();
    let model = g.model(DType::F32, &Device::Cpu);
    let dir = std::env::temp_dir().join(format!("gpt_parity_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("w.safetensors");
    model.save_weights(&path).unwrap();
    assert_eq!(Gpt::config_from_weights(&path).unwrap(), g.config);
    let mut back = Gpt::new(g.config.clone(), DType::F32, &Device::Cpu).unwrap();
    back.load_weights(&path).unwrap();
    for (a, b) in model.params().iter().zip(back.params()) {
        assert_eq!(a.value.to_vec::<f32>().unwrap(), b.value.to_vec::<f32>().unwrap(), "{}", a.name);
    }
    // A model of another shape refuses the file and names the tensor.
    let mut other = g.config.clone();
    other.n_embd = 48;
    let mut wrong = Gpt::new(other, DType::F32, &Device::Cpu).unwrap();
    let err = wrong.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("transformer.wte.weight") && err.contains("w.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = &g.path;
}

/// The first GPU, or None after saying why the GPU tests skip.
fn cuda_device() -> Option<Device> {
    Device::cuda(0).map_err(|e| eprintln!("skipped: {e}")).ok()
}

/// The same checks on the GPU in f32, with the same bars as the CPU's f32 run
/// (only summation order differs). Skips with a message where there is no GPU.
#[test]
fn cuda_f32_matches_pytorch() {
    let Some(device) = cuda_device() else { return };
    check_forward_backward(&device, DType::F32, 1e-4, 1e-4, 1e-5);
    check_training_steps(&device, DType::F32, 1e-5);
}

/// bf16 on the GPU (bf16 weights, activations and gradients; f32 master weights,
/// moments, statistics and loss) against the float64 reference. bf16 keeps 8
/// bits of mantissa (relative rounding up to 2^-9 = 2e-3 per value), and values
/// pass through a dozen roundings per layer, so: logits and the loss within 2e-2
/// relative, gradients within 1e-1 of each tensor's largest entry (gradients are
/// products of several rounded factors), and each of the 10 step losses within
/// 1e-2 relative (about 0.045 at these losses: llm.c accepts 0.05 after 10 bf16
/// steps).
#[test]
fn cuda_bf16_matches_pytorch() {
    let Some(device) = cuda_device() else { return };
    check_forward_backward(&device, DType::BF16, 2e-2, 1e-1, 2e-2);
    check_training_steps(&device, DType::BF16, 1e-2);
}
