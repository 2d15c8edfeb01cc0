//! The Vision Transformer as a whole, in f64 on the CPU:
//! - every parameter's gradient against central finite differences of the
//!   loss (h = 1e-5: truncation ~1e-10, rounding ~1e-11; 1e-6 relative to
//!   max(1, |grad|) leaves a wide margin and catches any wrong term, which
//!   shows at 1e-2 or more), for both poolings;
//! - the patch projection against a naive stride-P convolution over the
//!   normalized image (the layout transformers' and timm's Conv2d weights use);
//! - the first loss of a fresh model is ln(classes) exactly (zero head);
//! - evaluation counts top-1 and top-5 hits as a sort would.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::{DType, Device, Tensor, ops};
use trainer_data::Batch;
use trainer_models::vit::{Vit, VitConfig};
use trainer_models::{Model, ignore_ready};
use trainer_nn::Module;

fn config(pool: &str) -> VitConfig {
    VitConfig {
        image_size: 6,
        patch_size: 3,
        channels: 2,
        num_classes: 7,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        pool: pool.into(),
        ln_eps: 1e-6,
        pixel_mean: vec![0.4, 0.6],
        pixel_std: vec![0.3, 0.2],
    }
}

fn batch(cfg: &VitConfig, b: usize, seed: u64) -> Batch {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let n = cfg.image_size * cfg.image_size * cfg.channels;
    Batch::Images {
        b,
        height: cfg.image_size,
        width: cfg.image_size,
        channels: cfg.channels,
        pixels: (0..b * n).map(|_| r.random_range(0..=255u8)).collect(),
        labels: (0..b).map(|_| r.random_range(0..cfg.num_classes as u32)).collect(),
    }
}

/// A model with every parameter random (the head too: a zero head would
/// leave the blocks' gradients zero and the check blind).
fn random_model(cfg: &VitConfig, seed: u64) -> Vit {
    let mut m = Vit::new(cfg.clone(), DType::F64, &Device::Cpu).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    for p in m.params_mut() {
        let v: Vec<f64> = (0..p.value.numel()).map(|_| r.random::<f64>() - 0.5).collect();
        p.value = Tensor::from_vec(v, p.value.dims(), &Device::Cpu).unwrap();
    }
    m
}

fn loss(m: &Vit, batch: &Batch) -> f64 {
    let mut acts = Model::new_acts(m, batch).unwrap();
    m.evaluate(&mut acts, batch).unwrap().loss
}

#[test]
fn every_gradient_matches_finite_differences() {
    for pool in ["class", "mean"] {
        let cfg = config(pool);
        let b = batch(&cfg, 3, 1);
        let mut m = random_model(&cfg, 2);
        let mut acts = Model::new_acts(&m, &b).unwrap();
        let l0 = m.forward_backward(&mut acts, &b, 1.0, &mut ignore_ready).unwrap();
        assert!((l0 - loss(&m, &b)).abs() < 1e-12, "training and evaluation losses agree");
        let grads: Vec<(String, Vec<f64>)> =
            m.params().iter().map(|p| (p.name.clone(), p.grad().unwrap().to_vec_f64().unwrap())).collect();
        const H: f64 = 1e-5;
        let mut checked = 0;
        for (i, (name, grad)) in grads.iter().enumerate() {
            // Every element of small tensors, a spread of the larger ones.
            let step = grad.len().div_ceil(12);
            for k in (0..grad.len()).step_by(step) {
                let nudge = |m: &mut Vit, d: f64| {
                    let p = &mut m.params_mut()[i];
                    let mut v = p.value.to_vec_f64().unwrap();
                    v[k] += d;
                    p.value = Tensor::from_vec(v, p.value.dims(), &Device::Cpu).unwrap();
                };
                nudge(&mut m, H);
                let up = loss(&m, &b);
                nudge(&mut m, -2.0 * H);
                let down = loss(&m, &b);
                nudge(&mut m, H);
                let numeric = (up - down) / (2.0 * H);
                let err = (grad[k] - numeric).abs() / numeric.abs().max(1.0);
                assert!(err < 1e-6, "pool={pool} {name}[{k}]: analytic {} vs numeric {numeric}", grad[k]);
                checked += 1;
            }
        }
        eprintln!("pool={pool}: {checked} gradient elements checked");
    }
}

#[test]
fn the_patch_projection_is_a_stride_p_convolution() {
    let cfg = config("class");
    let b = batch(&cfg, 2, 3);
    let m = random_model(&cfg, 4);
    let Batch::Images { pixels, .. } = &b else { unreachable!() };
    let (s, p, ch, c) = (cfg.image_size, cfg.patch_size, cfg.channels, cfg.n_embd);
    let (grid, d) = (s / p, cfg.patch_dim());
    let mut words = vec![0u32; ops::packed_pixel_words(pixels.len())];
    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..pixels.len()].copy_from_slice(pixels);
    let packed = Tensor::from_vec(words, [ops::packed_pixel_words(pixels.len())], &Device::Cpu).unwrap();
    let mut x = Tensor::zeros([2, grid * grid, d], DType::F64, &Device::Cpu).unwrap();
    let norm: Vec<(f32, f32)> = cfg
        .pixel_mean
        .iter()
        .zip(&cfg.pixel_std)
        .map(|(m, sd)| ((1.0 / (255.0 * sd)) as f32, (m / sd) as f32))
        .collect();
    ops::patchify(&mut x, &packed, ops::PatchShape { b: 2, size: s, patch: p, channels: ch }, &norm).unwrap();
    x.reshape([2 * grid * grid, d]).unwrap();
    let mut out = Tensor::zeros([2 * grid * grid, c], DType::F64, &Device::Cpu).unwrap();
    m.patch_embed.forward(&mut out, &x).unwrap();
    let out = out.to_vec_f64().unwrap();
    // Conv2d weight (C, channels, P, P) is patch_embed.weight (C, channels*P*P) reshaped.
    let w = m.patch_embed.weight.value.to_vec_f64().unwrap();
    let bias = m.patch_embed.bias.as_ref().unwrap().value.to_vec_f64().unwrap();
    for img in 0..2 {
        for (gy, gx) in (0..grid).flat_map(|y| (0..grid).map(move |x| (y, x))) {
            for o in 0..c {
                let mut acc = bias[o];
                for k in 0..ch {
                    for y in 0..p {
                        for xx in 0..p {
                            let px = pixels[((img * s + gy * p + y) * s + gx * p + xx) * ch + k];
                            let v = (f64::from(px) / 255.0 - cfg.pixel_mean[k]) / cfg.pixel_std[k];
                            acc += w[o * d + (k * p + y) * p + xx] * v;
                        }
                    }
                }
                let got = out[((img * grid + gy) * grid + gx) * c + o];
                // The patches are staged in f32: ~1e-7 relative per pixel value.
                assert!((got - acc).abs() < 1e-5 * acc.abs().max(1.0), "image {img} patch ({gy},{gx}) out {o}");
            }
        }
    }
}

#[test]
fn a_fresh_model_starts_at_ln_classes_and_counts_hits() {
    let cfg = config("class");
    let b = batch(&cfg, 4, 5);
    let mut m = Vit::new(cfg.clone(), DType::F64, &Device::Cpu).unwrap();
    m.init(7).unwrap();
    let mut acts = Model::new_acts(&m, &b).unwrap();
    let e = m.evaluate(&mut acts, &b).unwrap();
    assert!((e.loss - (cfg.num_classes as f64).ln()).abs() < 1e-12, "zero head: uniform, loss {}", e.loss);
    // All logits tie: the label counts as top-1 only when it is class 0 (argmax's first).
    let Batch::Images { labels, .. } = &b else { unreachable!() };
    let hits = e.hits.unwrap();
    assert_eq!(hits.top1, labels.iter().filter(|&&l| l == 0).count());
    assert_eq!(hits.top5, labels.iter().filter(|&&l| l < 5).count());

    // A head that scores class j as j: the top five are 2..7.
    let mut m = random_model(&cfg, 8);
    let head_w = Tensor::zeros([cfg.num_classes, cfg.n_embd], DType::F64, &Device::Cpu).unwrap();
    m.head.weight.value = head_w;
    let scores: Vec<f64> = (0..cfg.num_classes).map(|j| j as f64).collect();
    m.head.bias.as_mut().unwrap().value = Tensor::from_vec(scores, [cfg.num_classes], &Device::Cpu).unwrap();
    let mut acts = Model::new_acts(&m, &b).unwrap();
    let hits = m.evaluate(&mut acts, &b).unwrap().hits.unwrap();
    assert_eq!(hits.top1, labels.iter().filter(|&&l| l == 6).count());
    assert_eq!(hits.top5, labels.iter().filter(|&&l| l >= 2).count());
}

#[test]
fn bad_batches_are_refused_with_the_reason() {
    let cfg = config("class");
    let m = Vit::new(cfg.clone(), DType::F64, &Device::Cpu).unwrap();
    let tokens = Batch::tokens(2, 4);
    let e = Model::new_acts(&m, &tokens).unwrap_err().to_string();
    assert!(e.contains("reads images") && e.contains("token windows"), "{e}");
    let good = batch(&cfg, 2, 9);
    let mut acts = Model::new_acts(&m, &good).unwrap();
    let Batch::Images { b, height, width, channels, pixels, mut labels } = good else { unreachable!() };
    labels[1] = 7;
    let bad = Batch::Images { b, height, width, channels, pixels, labels };
    let e = m.evaluate(&mut acts, &bad).unwrap_err().to_string();
    assert!(e.contains("label 7") && e.contains("model.num_classes = 7"), "{e}");
}
