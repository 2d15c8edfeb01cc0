//! Every CUDA op against the CPU reference on fresh random inputs of several
//! shapes, awkward ones included (T not a multiple of the tile, odd vocabulary,
//! head sizes 8 to 128). Outputs are poisoned with NaN first, so an element a
//! kernel forgets to write fails the comparison.
//!
//! Tolerances, as max |gpu - cpu| / max |cpu| per tensor:
//! - f32: 1e-5. Both sides compute in f32; only summation order differs
//!   (~1e-7 relative per op, ~1e-6 after reductions over a few thousand terms).
//! - bf16 inputs and outputs (fp32 inside): 1e-2. bf16 keeps 8 mantissa bits, so
//!   each rounding is up to 2^-9 = 2e-3 relative; a few of them stack.
//!
//! These tests need a GPU: without one they print why and pass (CI has none;
//! they run on the GPU machine).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::ops::{self, AdamWHyper, AdamWSpan, Span, TokenIndex};
use trainer_core::{DType, Device, Tensor};

fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn randn(r: &mut ChaCha8Rng, dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn up(t: &Tensor, dev: &Device, dtype: DType) -> Tensor {
    t.to_dtype(dtype).unwrap().to_device(dev).unwrap()
}

/// A GPU tensor of `dims` filled with NaN (u32: all ones).
fn poisoned(dims: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let mut t = Tensor::zeros(dims, dtype, dev).unwrap();
    ops::fill(&mut t, if dtype == DType::U32 { u32::MAX as f64 } else { f64::NAN }).unwrap();
    t
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
}

fn cpu_copy(t: &Tensor) -> Tensor {
    t.try_clone().unwrap()
}

fn check(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    let (a, b) = (gpu.to_vec_f64().unwrap(), cpu.to_vec_f64().unwrap());
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite output (unwritten or overflow)");
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
    let e = diff / scale;
    eprintln!("{what}: rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:e} exceeds {tol:e}");
}

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

#[test]
fn elementwise_and_reductions() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(1);
    for n in [1usize, 1000, 65_537, 300_001] {
        let (a, b) = (randn(&mut r, &[n], 1.0), randn(&mut r, &[n], 1.0));
        for dt in [DType::F32, DType::BF16] {
            let tol = if dt == DType::F32 { F32_TOL } else { BF16_TOL };
            let (ga, gb) = (up(&a, &dev, dt), up(&b, &dev, dt));
            let (ca, cb) = (up(&a, &Device::Cpu, DType::F32), up(&b, &Device::Cpu, DType::F32));
            let (ca, cb) = (
                ca.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
                cb.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(),
            );
            let mut out = poisoned(&[n], dt, &dev);
            ops::add(&mut out, &ga, &gb).unwrap();
            let mut want = zeros(&[n]);
            ops::add(&mut want, &ca, &cb).unwrap();
            check(&format!("add {dt} n={n}"), &out, &want, tol);
            ops::add_assign(&mut out, &ga).unwrap();
            ops::add_assign(&mut want, &ca).unwrap();
            ops::scale(&mut out, 0.5).unwrap();
            ops::scale(&mut want, 0.5).unwrap();
            check(&format!("add_assign+scale {dt} n={n}"), &out, &want, tol);
            let (s, s_ref) = (ops::sum(&ga).unwrap(), ops::sum(&ca).unwrap());
            let (q, q_ref) = (ops::sum_squares(&ga).unwrap(), ops::sum_squares(&ca).unwrap());
            let mag = ops::sum_squares(&ca).unwrap().sqrt().max(1.0);
            assert!((s - s_ref).abs() / mag < 1e-5, "sum {dt} n={n}: {s} vs {s_ref}");
            assert!((q - q_ref).abs() / q_ref.max(1e-30) < 1e-5, "sum_squares {dt} n={n}: {q} vs {q_ref}");
            let mut c = Tensor::zeros([n], dt, &dev).unwrap();
            ops::copy(&mut c, &ga).unwrap();
            check(&format!("copy {dt} n={n}"), &c, &ca, 0.0);
        }
    }
}

#[test]
fn matmul_all_transposes() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for (m, n, k) in [(1, 1, 1), (67, 33, 129), (256, 384, 96), (1000, 50, 7)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for acc in [false, true] {
                let a = randn(&mut r, &if ta { [k, m] } else { [m, k] }, 1.0);
                let b = randn(&mut r, &if tb { [n, k] } else { [k, n] }, 1.0);
                let init = randn(&mut r, &[m, n], 1.0);
                for dt in [DType::F32, DType::BF16] {
                    let (tol, cast) = if dt == DType::F32 { (F32_TOL, false) } else { (BF16_TOL, true) };
                    let round = |t: &Tensor| {
                        if cast { t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap() } else { cpu_copy(t) }
                    };
                    let mut want = round(&init);
                    ops::matmul(&mut want, &round(&a), &round(&b), ta, tb, acc).unwrap();
                    let mut out = if acc { up(&init, &dev, dt) } else { poisoned(&[m, n], dt, &dev) };
                    ops::matmul(&mut out, &up(&a, &dev, dt), &up(&b, &dev, dt), ta, tb, acc).unwrap();
                    check(&format!("matmul {dt} {m}x{n}x{k} ta={ta} tb={tb} acc={acc}"), &out, &want, tol);
                }
            }
        }
    }
}

#[test]
fn linear_layernorm_gelu() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(3);
    // 2000 rows: 8 chunks of the column reductions (bias and LayerNorm parameter gradients).
    // bf16 LayerNorm backward: C a multiple of 8 takes the 16-byte kernel
    // (768: 3 packs a lane, 1600: 7 with a partial last one, 2048: the largest,
    // 8), C = 100 the bfloat162 one; every even C the column-pair parameter
    // kernel (100: a partial second strip).
    for (rows, c, oc) in
        [(1, 32, 96), (67, 96, 50), (512, 768, 3072), (2000, 64, 200), (33, 100, 40), (300, 1600, 64), (40, 2048, 16)]
    {
        let (x, w, b, dy) = (
            randn(&mut r, &[rows, c], 1.0),
            randn(&mut r, &[oc, c], 0.1),
            randn(&mut r, &[oc], 0.1),
            randn(&mut r, &[rows, oc], 1.0),
        );
        // Linear forward and backward (dW and db accumulate onto existing values).
        let mut y = zeros(&[rows, oc]);
        ops::linear_forward(&mut y, &x, &w, Some(&b)).unwrap();
        let mut gy = poisoned(&[rows, oc], DType::F32, &dev);
        ops::linear_forward(
            &mut gy,
            &up(&x, &dev, DType::F32),
            &up(&w, &dev, DType::F32),
            Some(&up(&b, &dev, DType::F32)),
        )
        .unwrap();
        check(&format!("linear_forward {rows}x{c}->{oc}"), &gy, &y, F32_TOL);
        // bf16 takes cuBLASLt with the bias in the epilogue; the reference runs on the rounded inputs.
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let mut yb = zeros(&[rows, oc]);
        ops::linear_forward(&mut yb, &round(&x), &round(&w), Some(&round(&b))).unwrap();
        let mut gyb = poisoned(&[rows, oc], DType::BF16, &dev);
        ops::linear_forward(
            &mut gyb,
            &up(&x, &dev, DType::BF16),
            &up(&w, &dev, DType::BF16),
            Some(&up(&b, &dev, DType::BF16)),
        )
        .unwrap();
        check(&format!("linear_forward bf16 (cuBLASLt + bias) {rows}x{c}->{oc}"), &gyb, &yb, BF16_TOL);
        let (dw0, db0) = (randn(&mut r, &[oc, c], 1.0), randn(&mut r, &[oc], 1.0));
        let (mut dx, mut dw, mut db) = (zeros(&[rows, c]), cpu_copy(&dw0), cpu_copy(&db0));
        ops::linear_backward(&mut dx, &mut dw, Some(&mut db), &dy, &x, &w).unwrap();
        let (mut gdx, mut gdw, mut gdb) =
            (poisoned(&[rows, c], DType::F32, &dev), up(&dw0, &dev, DType::F32), up(&db0, &dev, DType::F32));
        ops::linear_backward(
            &mut gdx,
            &mut gdw,
            Some(&mut gdb),
            &up(&dy, &dev, DType::F32),
            &up(&x, &dev, DType::F32),
            &up(&w, &dev, DType::F32),
        )
        .unwrap();
        check("linear dinp", &gdx, &dx, F32_TOL);
        check("linear dweight", &gdw, &dw, F32_TOL);
        check("linear dbias", &gdb, &db, F32_TOL);
        // bf16 (cuBLASLt GEMMs, the bias gradient's column reduction), onto
        // existing values; the reference is f32 on the rounded inputs.
        let (mut dx, mut dw, mut db) = (zeros(&[rows, c]), round(&dw0), round(&db0));
        ops::linear_backward(&mut dx, &mut dw, Some(&mut db), &round(&dy), &round(&x), &round(&w)).unwrap();
        let (mut gdx, mut gdw, mut gdb) =
            (poisoned(&[rows, c], DType::BF16, &dev), up(&dw0, &dev, DType::BF16), up(&db0, &dev, DType::BF16));
        ops::linear_backward(
            &mut gdx,
            &mut gdw,
            Some(&mut gdb),
            &up(&dy, &dev, DType::BF16),
            &up(&x, &dev, DType::BF16),
            &up(&w, &dev, DType::BF16),
        )
        .unwrap();
        check(&format!("linear dinp bf16 {rows}x{c}->{oc}"), &gdx, &dx, BF16_TOL);
        check(&format!("linear dweight bf16 {rows}x{c}->{oc}"), &gdw, &dw, BF16_TOL);
        check(&format!("linear dbias bf16 {rows}x{c}->{oc}"), &gdb, &db, BF16_TOL);

        // LayerNorm forward and backward (dinp accumulates).
        let (g, beta, dln) = (randn(&mut r, &[c], 1.0), randn(&mut r, &[c], 1.0), randn(&mut r, &[rows, c], 1.0));
        let (mut o, mut mean, mut rstd) = (zeros(&[rows, c]), zeros(&[rows]), zeros(&[rows]));
        ops::layernorm_forward(&mut o, &mut mean, &mut rstd, &x, &g, &beta, 1e-5).unwrap();
        let (mut go, mut gmean, mut grstd) = (
            poisoned(&[rows, c], DType::F32, &dev),
            poisoned(&[rows], DType::F32, &dev),
            poisoned(&[rows], DType::F32, &dev),
        );
        let (gx, gg, gbeta) = (up(&x, &dev, DType::F32), up(&g, &dev, DType::F32), up(&beta, &dev, DType::F32));
        ops::layernorm_forward(&mut go, &mut gmean, &mut grstd, &gx, &gg, &gbeta, 1e-5).unwrap();
        check(&format!("layernorm_forward {rows}x{c}"), &go, &o, F32_TOL);
        check("layernorm mean", &gmean, &mean, F32_TOL);
        check("layernorm rstd", &grstd, &rstd, F32_TOL);
        let resid = randn(&mut r, &[rows, c], 1.0);
        let (mut dx, mut dg, mut dbeta) = (cpu_copy(&resid), zeros(&[c]), zeros(&[c]));
        ops::layernorm_backward(&mut dx, &mut dg, &mut dbeta, &dln, &x, &g, &mean, &rstd).unwrap();
        let (mut gdx, mut gdg, mut gdbeta) =
            (up(&resid, &dev, DType::F32), up(&zeros(&[c]), &dev, DType::F32), up(&zeros(&[c]), &dev, DType::F32));
        ops::layernorm_backward(&mut gdx, &mut gdg, &mut gdbeta, &up(&dln, &dev, DType::F32), &gx, &gg, &gmean, &grstd)
            .unwrap();
        check("layernorm dinp", &gdx, &dx, F32_TOL);
        check("layernorm dweight", &gdg, &dg, F32_TOL);
        check("layernorm dbias", &gdbeta, &dbeta, F32_TOL);

        // bf16 (the register-resident backward kernel), against f32 on the rounded inputs.
        let (rx, rg, rb, rdln, rres) = (round(&x), round(&g), round(&beta), round(&dln), round(&resid));
        let (mut o, mut mean, mut rstd) = (zeros(&[rows, c]), zeros(&[rows]), zeros(&[rows]));
        ops::layernorm_forward(&mut o, &mut mean, &mut rstd, &rx, &rg, &rb, 1e-5).unwrap();
        let (mut dx, mut dg, mut dbeta) = (cpu_copy(&rres), zeros(&[c]), zeros(&[c]));
        ops::layernorm_backward(&mut dx, &mut dg, &mut dbeta, &rdln, &rx, &rg, &mean, &rstd).unwrap();
        let (bx, bg, bb) = (up(&x, &dev, DType::BF16), up(&g, &dev, DType::BF16), up(&beta, &dev, DType::BF16));
        let (mut go, mut gmean, mut grstd) = (
            poisoned(&[rows, c], DType::BF16, &dev),
            poisoned(&[rows], DType::F32, &dev),
            poisoned(&[rows], DType::F32, &dev),
        );
        ops::layernorm_forward(&mut go, &mut gmean, &mut grstd, &bx, &bg, &bb, 1e-5).unwrap();
        check(&format!("layernorm_forward bf16 {rows}x{c}"), &go, &o, BF16_TOL);
        // The residual add fused into the forward: resid = x + y, then LayerNorm(resid).
        let y = round(&randn(&mut r, &[rows, c], 1.0));
        let (mut sum, mut o2, mut mean2, mut rstd2) =
            (zeros(&[rows, c]), zeros(&[rows, c]), zeros(&[rows]), zeros(&[rows]));
        ops::residual_layernorm_forward(&mut sum, &mut o2, &mut mean2, &mut rstd2, &rx, &y, &rg, &rb, 1e-5).unwrap();
        let (mut gsum, mut go2) = (poisoned(&[rows, c], DType::BF16, &dev), poisoned(&[rows, c], DType::BF16, &dev));
        let (mut gmean2, mut grstd2) = (poisoned(&[rows], DType::F32, &dev), poisoned(&[rows], DType::F32, &dev));
        let by = up(&y, &dev, DType::BF16);
        ops::residual_layernorm_forward(&mut gsum, &mut go2, &mut gmean2, &mut grstd2, &bx, &by, &bg, &bb, 1e-5)
            .unwrap();
        check(&format!("residual_layernorm_forward bf16 {rows}x{c} resid"), &gsum, &sum, BF16_TOL);
        check(&format!("residual_layernorm_forward bf16 {rows}x{c} out"), &go2, &o2, BF16_TOL);
        check(&format!("residual_layernorm_forward bf16 {rows}x{c} rstd"), &grstd2, &rstd2, BF16_TOL);
        let (mut gdx, mut gdg, mut gdbeta) =
            (up(&resid, &dev, DType::BF16), up(&zeros(&[c]), &dev, DType::BF16), up(&zeros(&[c]), &dev, DType::BF16));
        ops::layernorm_backward(
            &mut gdx,
            &mut gdg,
            &mut gdbeta,
            &up(&dln, &dev, DType::BF16),
            &bx,
            &bg,
            &gmean,
            &grstd,
        )
        .unwrap();
        check(&format!("layernorm dinp bf16 {rows}x{c}"), &gdx, &dx, BF16_TOL);
        check(&format!("layernorm dweight bf16 {rows}x{c}"), &gdg, &dg, BF16_TOL);
        check(&format!("layernorm dbias bf16 {rows}x{c}"), &gdbeta, &dbeta, BF16_TOL);

        // GELU forward and backward, both forms.
        for kind in [ops::Gelu::Tanh, ops::Gelu::Erf] {
            let (mut gl, mut dgl) = (zeros(&[rows, c]), zeros(&[rows, c]));
            ops::gelu_forward(&mut gl, &x, kind).unwrap();
            ops::gelu_backward(&mut dgl, &x, &dln, kind).unwrap();
            let (mut ggl, mut gdgl) = (poisoned(&[rows, c], DType::F32, &dev), poisoned(&[rows, c], DType::F32, &dev));
            ops::gelu_forward(&mut ggl, &gx, kind).unwrap();
            ops::gelu_backward(&mut gdgl, &gx, &up(&dln, &dev, DType::F32), kind).unwrap();
            check(&format!("gelu_forward {kind:?}"), &ggl, &gl, F32_TOL);
            check(&format!("gelu_backward {kind:?}"), &gdgl, &dgl, F32_TOL);
        }
    }
}

/// The MLP's fused GEMM + GELU ops: bf16 on CUDA runs one cuBLASLt GEMM with
/// the GELU (forward) or its derivative (backward) in the epilogue where the
/// hidden width is a multiple of 8 (50: the unfused path); the reference is f32
/// on the CPU on the rounded inputs.
#[test]
fn linear_gelu_fused() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let bf = |t: &Tensor| up(t, &dev, DType::BF16);
    for (rows, c, h, kind) in [
        (67, 96, 64, ops::Gelu::Tanh),
        (512, 768, 3072, ops::Gelu::Tanh),
        (5, 32, 50, ops::Gelu::Tanh),
        // The erf form is never fused (cuBLASLt's epilogue is tanh): GEMM, then our kernel.
        (197, 64, 256, ops::Gelu::Erf),
    ] {
        let (x, w, b) = (
            round(&randn(&mut r, &[rows, c], 1.0)),
            round(&randn(&mut r, &[h, c], 0.2)),
            round(&randn(&mut r, &[h], 0.5)),
        );
        let (mut out, mut pre) = (zeros(&[rows, h]), zeros(&[rows, h]));
        ops::linear_gelu_forward(&mut out, &mut pre, &x, &w, Some(&b), kind).unwrap();
        let (mut gout, mut gpre) = (poisoned(&[rows, h], DType::BF16, &dev), poisoned(&[rows, h], DType::BF16, &dev));
        ops::linear_gelu_forward(&mut gout, &mut gpre, &bf(&x), &bf(&w), Some(&bf(&b)), kind).unwrap();
        check(&format!("linear_gelu_forward bf16 {rows}x{c}->{h} pre"), &gpre, &pre, BF16_TOL);
        check(&format!("linear_gelu_forward bf16 {rows}x{c}->{h} out"), &gout, &out, BF16_TOL);

        // The next Linear (h -> c) backward through the GELU; dW and db accumulate.
        let (pre, out) = (round(&pre), round(&out));
        let (wp, dy) = (round(&randn(&mut r, &[c, h], 0.2)), round(&randn(&mut r, &[rows, c], 1.0)));
        let (dw0, db0) = (round(&randn(&mut r, &[c, h], 1.0)), round(&randn(&mut r, &[c], 1.0)));
        let (mut dpre, mut dw, mut db, mut scratch) =
            (zeros(&[rows, h]), cpu_copy(&dw0), cpu_copy(&db0), zeros(&[rows, h]));
        ops::linear_backward_gelu(&mut dpre, &mut dw, Some(&mut db), &dy, &out, &pre, &wp, &mut scratch, kind).unwrap();
        let (mut gdpre, mut gdw, mut gdb) = (poisoned(&[rows, h], DType::BF16, &dev), bf(&dw0), bf(&db0));
        let mut gscratch = poisoned(&[rows, h], DType::BF16, &dev);
        ops::linear_backward_gelu(
            &mut gdpre,
            &mut gdw,
            Some(&mut gdb),
            &bf(&dy),
            &bf(&out),
            &bf(&pre),
            &bf(&wp),
            &mut gscratch,
            kind,
        )
        .unwrap();
        check(&format!("linear_backward_gelu bf16 {rows}x{c}<-{h} dpre"), &gdpre, &dpre, BF16_TOL);
        check(&format!("linear_backward_gelu bf16 {rows}x{c}<-{h} dweight"), &gdw, &dw, BF16_TOL);
        check(&format!("linear_backward_gelu bf16 {rows}x{c}<-{h} dbias"), &gdb, &db, BF16_TOL);
    }
}

/// cuBLASLt's GELU epilogue is the tanh form GPT-2 uses (ours on every other
/// path), not the erf form: for x in [-3, -2.5] they differ by up to 4.7e-4
/// (3% of the largest value), which bf16 resolves. The epilogue's output must be
/// at most half as far from the tanh form as from the erf form (a fast tanh
/// in the epilogue, like our own bf16 kernel's, adds noise, not a bias).
#[test]
fn gelu_epilogue_is_the_tanh_form() {
    let Some(dev) = gpu() else { return };
    let (rows, c) = (4, 8);
    let xs: Vec<f32> = (0..rows * c).map(|i| -2.5 - i as f32 / 64.0).collect();
    let x = Tensor::from_vec(xs.clone(), [rows, c], &Device::Cpu).unwrap();
    let eye: Vec<f32> = (0..c * c).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect();
    let eye = Tensor::from_vec(eye, [c, c], &Device::Cpu).unwrap();
    let bf = |t: &Tensor| up(t, &dev, DType::BF16);
    let (mut out, mut pre) = (poisoned(&[rows, c], DType::BF16, &dev), poisoned(&[rows, c], DType::BF16, &dev));
    ops::linear_gelu_forward(&mut out, &mut pre, &bf(&x), &bf(&eye), Some(&bf(&zeros(&[c]))), ops::Gelu::Tanh).unwrap();
    let got = out.to_vec_f64().unwrap();
    // The inputs are exact in bf16 (multiples of 1/64 within [-4, -2]).
    let tanh_form =
        |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    // erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), for x / sqrt(2) < 0.
    let erf_form = |x: f64| {
        let z = -x / std::f64::consts::SQRT_2;
        let t = 1.0 / (1.0 + 0.3275911 * z);
        let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
        0.5 * x * (poly * (-z * z).exp())
    };
    let dist = |f: &dyn Fn(f64) -> f64| xs.iter().zip(&got).map(|(&x, &g)| (f(x as f64) - g).abs()).fold(0.0, f64::max);
    let (to_tanh, to_erf) = (dist(&tanh_form), dist(&erf_form));
    eprintln!("GELU epilogue near x = -3: max distance to the tanh form {to_tanh:.2e}, to the erf form {to_erf:.2e}");
    assert!(to_tanh <= 0.5 * to_erf, "cuBLASLt's GELU epilogue is not the tanh form: {to_tanh:e} vs {to_erf:e}");
}

#[test]
fn attention_forward_backward() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(4);
    // (B, T, n_head, head size): tiles of 32 keys and 8 rows; T = 67 and 1 are ragged.
    // T = 300 with hs = 64: tiles of the tensor-core kernels with and without a mask;
    // on Hopper hs = 64 runs the wgmma kernels (64-row blocks; 128-key tiles
    // forward, 64 backward): T = 1 is a block of padding rows (8 heads: the
    // error is relative to the largest |lse|, and a single score can sit near
    // 0), T = 520 runs several tiles through both stages with a ragged last
    // one, T = 256 whole blocks and tiles only.
    for (b, t, nh, hs) in [
        (2, 67, 4, 8),
        (1, 1, 2, 32),
        (2, 130, 3, 64),
        (1, 100, 2, 128),
        (2, 64, 2, 96),
        (1, 300, 2, 64),
        (1, 1, 8, 64),
        (1, 520, 2, 64),
        (2, 256, 2, 64),
    ] {
        let c = nh * hs;
        for causal in [true, false] {
            let (qkv, dy) = (randn(&mut r, &[b, t, 3 * c], 1.0), randn(&mut r, &[b, t, c], 1.0));
            let (mut y, mut lse) = (zeros(&[b, t, c]), zeros(&[b, nh, t]));
            ops::attention_forward(&mut y, &mut lse, &qkv, nh, causal).unwrap();
            let (mut dqkv, mut delta) = (zeros(&[b, t, 3 * c]), zeros(&[b, nh, t]));
            ops::attention_backward(&mut dqkv, &mut delta, &dy, &qkv, &y, &lse, nh, causal).unwrap();
            for dt in [DType::F32, DType::BF16] {
                let tol = if dt == DType::F32 { F32_TOL } else { BF16_TOL };
                let what = format!("attention {dt} B={b} T={t} H={nh} hs={hs} causal={causal}");
                let gq = up(&qkv, &dev, dt);
                let (mut gy, mut glse) = (poisoned(&[b, t, c], dt, &dev), poisoned(&[b, nh, t], DType::F32, &dev));
                ops::attention_forward(&mut gy, &mut glse, &gq, nh, causal).unwrap();
                check(&format!("{what} out"), &gy, &y, tol);
                check(&format!("{what} lse"), &glse, &lse, tol);
                let (mut gd, mut gdelta) =
                    (poisoned(&[b, t, 3 * c], dt, &dev), poisoned(&[b, nh, t], DType::F32, &dev));
                ops::attention_backward(&mut gd, &mut gdelta, &up(&dy, &dev, dt), &gq, &gy, &glse, nh, causal).unwrap();
                check(&format!("{what} dqkv"), &gd, &dqkv, tol);
                check(&format!("{what} delta"), &gdelta, &delta, tol);
            }
        }
    }
}

#[test]
fn attention_cached_and_copy_rows() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(9);
    // (B, Tmax, past, tq, n_head, head size): one query per step (tq = 1) as in
    // generation, a prefill (past = 0), chunks past a 32-key boundary, every R.
    for (b, tmax, past, tq, nh, hs) in [
        (1, 80, 0, 37, 2, 8),
        (2, 80, 36, 1, 4, 32),
        (1, 100, 64, 5, 3, 64),
        (2, 40, 3, 1, 2, 96),
        (1, 130, 97, 1, 2, 128),
    ] {
        let c = nh * hs;
        let cache = randn(&mut r, &[b, tmax, 3 * c], 1.0);
        let mut out = zeros(&[b, tq, c]);
        ops::attention_cached(&mut out, &cache, past, nh).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let tol = if dt == DType::F32 { F32_TOL } else { BF16_TOL };
            let mut gout = poisoned(&[b, tq, c], dt, &dev);
            ops::attention_cached(&mut gout, &up(&cache, &dev, dt), past, nh).unwrap();
            check(&format!("attention_cached {dt} B={b} past={past} tq={tq} H={nh} hs={hs}"), &gout, &out, tol);
        }
    }
    // copy_rows: a window of rows into the middle of a poisoned tensor.
    let src = randn(&mut r, &[7, 24], 1.0);
    let mut dst = zeros(&[10, 24]);
    let mut gdst = up(&dst, &dev, DType::F32);
    ops::copy_rows(&mut dst, 4, &src, 2, 5).unwrap();
    ops::copy_rows(&mut gdst, 4, &up(&src, &dev, DType::F32), 2, 5).unwrap();
    check("copy_rows", &gdst, &dst, 0.0);
}

#[test]
fn embedding_forward_backward_deterministic() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let (b, t, c, v, max_t) = (4, 37, 96, 101, 64);
    // Few distinct ids so tokens repeat many times.
    let ids: Vec<u32> = (0..b * t).map(|_| r.random_range(0..12u32) * 8).collect();
    let tokens = Tensor::from_vec(ids.clone(), [b, t], &Device::Cpu).unwrap();
    let (wte, wpe, dy) = (randn(&mut r, &[v, c], 1.0), randn(&mut r, &[max_t, c], 1.0), randn(&mut r, &[b, t, c], 1.0));
    let mut y = zeros(&[b, t, c]);
    ops::embedding_forward(&mut y, &tokens, &wte, &wpe).unwrap();
    let mut index = TokenIndex::new(b * t, &Device::Cpu).unwrap();
    index.update(&ids).unwrap();
    let (mut dwte, mut dwpe) = (zeros(&[v, c]), zeros(&[max_t, c]));
    ops::embedding_backward(&mut dwte, &mut dwpe, &dy, &tokens, &index).unwrap();

    let gtok = tokens.to_device(&dev).unwrap();
    let mut gy = poisoned(&[b, t, c], DType::F32, &dev);
    ops::embedding_forward(&mut gy, &gtok, &up(&wte, &dev, DType::F32), &up(&wpe, &dev, DType::F32)).unwrap();
    check("embedding_forward", &gy, &y, F32_TOL);
    let mut gindex = TokenIndex::new(b * t, &dev).unwrap();
    gindex.update(&ids).unwrap();
    let run = || {
        let (mut gdwte, mut gdwpe) = (up(&zeros(&[v, c]), &dev, DType::F32), up(&zeros(&[max_t, c]), &dev, DType::F32));
        ops::embedding_backward(&mut gdwte, &mut gdwpe, &up(&dy, &dev, DType::F32), &gtok, &gindex).unwrap();
        (gdwte, gdwpe)
    };
    let (g1, p1) = run();
    check("embedding dwte", &g1, &dwte, F32_TOL);
    check("embedding dwpe", &p1, &dwpe, F32_TOL);
    let (g2, _) = run();
    assert_eq!(g1.to_vec::<f32>().unwrap(), g2.to_vec::<f32>().unwrap(), "bit-identical run to run");
}

/// The ViT's token sequence ops against the CPU on the shapes ViTs have
/// (T = 197: B/16 at 224; 50: 28x28 in 4x4 patches; 65: 32x32 in 4x4), f32 and
/// bf16 (the reference: f32 on the CPU from the rounded inputs); the batch sums
/// bit-identical run to run.
#[test]
fn image_tokens_and_pooling() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    for ((b, t, c), dtype) in [((3, 197, 96), DType::F32), ((5, 50, 64), DType::BF16), ((2, 65, 72), DType::F32)] {
        let (tol, n) = (if dtype == DType::BF16 { BF16_TOL } else { F32_TOL }, t - 1);
        let g = |x: &Tensor| up(x, &dev, dtype);
        let (patches, cls, pos, dy) = (
            round(&randn(&mut r, &[b, n, c], 1.0)),
            round(&randn(&mut r, &[c], 1.0)),
            round(&randn(&mut r, &[t, c], 1.0)),
            round(&randn(&mut r, &[b, t, c], 1.0)),
        );
        let mut y = zeros(&[b, t, c]);
        ops::image_tokens_forward(&mut y, &patches, &cls, &pos).unwrap();
        let mut gy = poisoned(&[b, t, c], dtype, &dev);
        ops::image_tokens_forward(&mut gy, &g(&patches), &g(&cls), &g(&pos)).unwrap();
        check(&format!("image_tokens_forward {dtype} T={t}"), &gy, &y, tol);

        let (dcls0, dpos0) = (round(&randn(&mut r, &[c], 1.0)), round(&randn(&mut r, &[t, c], 1.0)));
        let (mut dp, mut dcls, mut dpos) = (zeros(&[b, n, c]), cpu_copy(&dcls0), cpu_copy(&dpos0));
        ops::image_tokens_backward(&mut dp, &mut dcls, &mut dpos, &dy).unwrap();
        let run = || {
            let (mut gdp, mut gdcls, mut gdpos) = (poisoned(&[b, n, c], dtype, &dev), g(&dcls0), g(&dpos0));
            ops::image_tokens_backward(&mut gdp, &mut gdcls, &mut gdpos, &g(&dy)).unwrap();
            (gdp, gdcls, gdpos)
        };
        let (gdp, gdcls, gdpos) = run();
        check(&format!("image_tokens dpatches {dtype} T={t}"), &gdp, &dp, tol);
        check(&format!("image_tokens dcls {dtype} T={t}"), &gdcls, &dcls, tol);
        check(&format!("image_tokens dpos {dtype} T={t}"), &gdpos, &dpos, tol);
        let (_, _, again) = run();
        assert_eq!(gdpos.to_vec_f64().unwrap(), again.to_vec_f64().unwrap(), "dpos bit-identical run to run");

        for pool in [ops::Pool::Class, ops::Pool::Mean] {
            let dout = round(&randn(&mut r, &[b, c], 1.0));
            let (mut p, mut dx) = (zeros(&[b, c]), zeros(&[b, t, c]));
            ops::pool_tokens(&mut p, &y, pool).unwrap();
            ops::pool_tokens_backward(&mut dx, &dout, pool).unwrap();
            let (mut gp, mut gdx) = (poisoned(&[b, c], dtype, &dev), poisoned(&[b, t, c], dtype, &dev));
            ops::pool_tokens(&mut gp, &g(&round(&y)), pool).unwrap();
            ops::pool_tokens_backward(&mut gdx, &g(&dout), pool).unwrap();
            // The CPU pooled the unrounded y: bf16 compares within its own rounding.
            check(&format!("pool_tokens {pool:?} {dtype} T={t}"), &gp, &p, tol);
            check(&format!("pool_tokens_backward {pool:?} {dtype} T={t}"), &gdx, &dx, tol);
        }
    }
}

/// Pixels to patches on the GPU against the CPU: f32 bit-identical (the same
/// f32 multiply and subtract, no fused multiply-add), bf16 its rounding of
/// those values; byte counts that do not fill the last u32 word included.
#[test]
fn patchify_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(10);
    for (b, size, patch, channels) in [(3, 28, 7, 1), (2, 12, 4, 3), (1, 5, 5, 3), (2, 224, 16, 3)] {
        let bytes = b * size * size * channels;
        let pixels: Vec<u8> = (0..bytes).map(|_| r.random_range(0..=255u8)).collect();
        let mut words = vec![0u32; ops::packed_pixel_words(bytes)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes].copy_from_slice(&pixels);
        let packed = Tensor::from_vec(words, [ops::packed_pixel_words(bytes)], &Device::Cpu).unwrap();
        let norm: Vec<(f32, f32)> =
            (0..channels).map(|c| (1.0 / (255.0 * (0.2 + 0.05 * c as f32)), 0.4 + 0.3 * c as f32)).collect();
        let shape = ops::PatchShape { b, size, patch, channels };
        let n = (size / patch).pow(2);
        let d = channels * patch * patch;
        let mut want = zeros(&[b, n, d]);
        ops::patchify(&mut want, &packed, shape, &norm).unwrap();
        let gpacked = packed.to_device(&dev).unwrap();
        let mut got = poisoned(&[b, n, d], DType::F32, &dev);
        ops::patchify(&mut got, &gpacked, shape, &norm).unwrap();
        assert_eq!(got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap(), "patchify f32 {shape:?}");
        let mut got = poisoned(&[b, n, d], DType::BF16, &dev);
        ops::patchify(&mut got, &gpacked, shape, &norm).unwrap();
        check(&format!("patchify bf16 {shape:?}"), &got, &want, BF16_TOL);
    }
}

#[test]
fn cross_entropy_padded_vocab() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(6);
    // vp = 13: rows that are no whole number of 16-byte packs (the scalar kernel).
    // bf16 rows of whole packs up to 57344 columns are held in registers
    // (50304 and 57344: 7 packs a thread, 1024: one pack on each of 128
    // threads); 57352 is too long for that and takes the two-pass kernel.
    for (n, v, vp) in [
        (1, 5, 128),
        (5, 9, 13),
        (67, 997, 1024),
        (256, 50257, 50304),
        (4, 50304, 50304),
        (3, 57000, 57344),
        (3, 57349, 57352),
    ] {
        let logits = randn(&mut r, &[n, vp], 4.0);
        let targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
        let tg = Tensor::from_vec(targets, [n], &Device::Cpu).unwrap();
        for grad in [None, Some(1.0 / n as f64)] {
            let (mut l, mut losses) = (cpu_copy(&logits), zeros(&[n]));
            ops::softmax_cross_entropy(&mut l, &mut losses, &tg, v, grad).unwrap();
            for dt in [DType::F32, DType::BF16] {
                let tol = if dt == DType::F32 { F32_TOL } else { BF16_TOL };
                let (mut gl, mut glosses) = (up(&logits, &dev, dt), poisoned(&[n], DType::F32, &dev));
                ops::softmax_cross_entropy(&mut gl, &mut glosses, &tg.to_device(&dev).unwrap(), v, grad).unwrap();
                let what = format!("cross_entropy {dt} n={n} v={v} grad={}", grad.is_some());
                check(&format!("{what} losses"), &glosses, &losses, tol);
                if grad.is_some() {
                    check(&format!("{what} dlogits"), &gl, &l, tol);
                }
            }
        }
    }
}

fn adamw_whole(p: &mut Tensor, master: Option<&mut Tensor>, g: &Tensor, m: &mut Tensor, v: &mut Tensor, h: AdamWHyper) {
    let span = Span::whole(0, p);
    let spans = [AdamWSpan { param: span, grad: span, state_start: 0, decays: true }];
    ops::adamw_update(&mut [p], &[g], master, m, v, &spans, h).unwrap();
}

/// The multi-tensor ops over awkward sizes (one element, odd lengths, a span
/// longer than a block's stride), gradients gathered into a flat buffer
/// first, the way data parallelism feeds the optimizer.
#[test]
fn multi_tensor_ops_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(8);
    let sizes = [1usize, 77, 4099, 300_001];
    let params: Vec<Tensor> = sizes.iter().map(|&n| randn(&mut r, &[n], 1.0)).collect();
    let grads: Vec<Tensor> = sizes.iter().map(|&n| randn(&mut r, &[n], 1.0)).collect();
    // Flat layout: reversed order, each at an offset 3 past the previous end.
    let mut offsets = vec![0; sizes.len()];
    let mut at = 0;
    for i in (0..sizes.len()).rev() {
        offsets[i] = at;
        at += sizes[i] + 3;
    }
    let flat_len = at;
    let pairs: Vec<(Span, Span)> = (0..sizes.len())
        .map(|i| (Span { tensor: 0, start: offsets[i], len: sizes[i] }, Span::whole(i, &grads[i])))
        .collect();
    let spans: Vec<AdamWSpan> = (0..sizes.len())
        .map(|i| AdamWSpan {
            param: Span::whole(i, &params[i]),
            grad: pairs[i].0,
            state_start: offsets[i],
            decays: i % 2 == 0,
        })
        .collect();
    for dt in [DType::F32, DType::BF16] {
        let tol = if dt == DType::F32 { F32_TOL } else { BF16_TOL };
        // CPU reference in f32 from the bf16-rounded inputs.
        let round = |t: &Tensor| t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
        let mut cp: Vec<Tensor> = params.iter().map(round).collect();
        let cg: Vec<Tensor> = grads.iter().map(round).collect();
        let mut gp: Vec<Tensor> = params.iter().map(|t| up(t, &dev, dt)).collect();
        let gg: Vec<Tensor> = grads.iter().map(|t| up(t, &dev, dt)).collect();
        let (mut cflat, mut gflat) = (zeros(&[flat_len]), poisoned(&[flat_len], dt, &dev));
        ops::fill_all(&mut [&mut gflat], 0.0).unwrap();
        ops::copy_spans(&mut [&mut cflat], &cg.iter().collect::<Vec<_>>(), &pairs).unwrap();
        ops::copy_spans(&mut [&mut gflat], &gg.iter().collect::<Vec<_>>(), &pairs).unwrap();
        check(&format!("copy_spans {dt}"), &gflat, &cflat, tol);
        let flat_spans: Vec<Span> = pairs.iter().map(|p| p.0).collect();
        let (c, g) = (
            ops::sum_squares_spans(&[&cflat], &flat_spans).unwrap(),
            ops::sum_squares_spans(&[&gflat], &flat_spans).unwrap(),
        );
        assert!((c - g).abs() <= tol * c, "sum_squares_spans {dt}: {g} vs {c}");
        let state = |d: &Device| up(&zeros(&[flat_len]), d, DType::F32);
        let (mut cm, mut cv) = (zeros(&[flat_len]), zeros(&[flat_len]));
        let (mut gm, mut gv) = (state(&dev), state(&dev));
        let mut gmaster = (dt == DType::BF16).then(|| {
            let mut master = state(&dev);
            let widened: Vec<Tensor> = gp.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
            let wspans: Vec<(Span, Span)> =
                pairs.iter().enumerate().map(|(i, p)| (p.0, Span::whole(i, &widened[i]))).collect();
            ops::copy_spans(&mut [&mut master], &widened.iter().collect::<Vec<_>>(), &wspans).unwrap();
            master
        });
        for step in 1..=3 {
            let h =
                AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.7 };
            let mut cps: Vec<&mut Tensor> = cp.iter_mut().collect();
            ops::adamw_update(&mut cps, &[&cflat], None, &mut cm, &mut cv, &spans, h).unwrap();
            let mut gps: Vec<&mut Tensor> = gp.iter_mut().collect();
            ops::adamw_update(&mut gps, &[&gflat], gmaster.as_mut(), &mut gm, &mut gv, &spans, h).unwrap();
        }
        for i in 0..sizes.len() {
            check(&format!("adamw_spans {dt} param {i}"), &gp[i], &cp[i], tol);
        }
        check(&format!("adamw_spans {dt} m"), &gm, &cm, F32_TOL);
        let mut gz: Vec<&mut Tensor> = gp.iter_mut().collect();
        ops::fill_all(&mut gz, 0.0).unwrap();
        assert!(gp.iter().all(|t| t.to_vec_f64().unwrap().iter().all(|&x| x == 0.0)), "fill_all {dt}");
    }
}

#[test]
fn adamw_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let n = 100_003;
    let (p, g) = (randn(&mut r, &[n], 1.0), randn(&mut r, &[n], 1.0));
    let (mut cp, mut cm, mut cv) = (cpu_copy(&p), zeros(&[n]), zeros(&[n]));
    let (mut gp, mut gm, mut gv) =
        (up(&p, &dev, DType::F32), up(&zeros(&[n]), &dev, DType::F32), up(&zeros(&[n]), &dev, DType::F32));
    let gg = up(&g, &dev, DType::F32);
    for step in 1..=5 {
        let h = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.7 };
        adamw_whole(&mut cp, None, &g, &mut cm, &mut cv, h);
        adamw_whole(&mut gp, None, &gg, &mut gm, &mut gv, h);
    }
    check("adamw param", &gp, &cp, F32_TOL);
    check("adamw m", &gm, &cm, F32_TOL);
    check("adamw v", &gv, &cv, F32_TOL);

    // Mixed precision: bf16 param and grad, f32 master and moments. The
    // reference runs in f32 on the bf16-rounded gradient from the same master.
    let gb = g.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let (mut cp, mut cm, mut cv) = (cpu_copy(&p), zeros(&[n]), zeros(&[n]));
    let mut gmaster = up(&p, &dev, DType::F32);
    let (mut gp, mut gm, mut gv) =
        (up(&p, &dev, DType::BF16), up(&zeros(&[n]), &dev, DType::F32), up(&zeros(&[n]), &dev, DType::F32));
    let ggb = up(&g, &dev, DType::BF16);
    for step in 1..=5 {
        let h = AdamWHyper { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.7 };
        adamw_whole(&mut cp, None, &gb, &mut cm, &mut cv, h);
        adamw_whole(&mut gp, Some(&mut gmaster), &ggb, &mut gm, &mut gv, h);
    }
    check("adamw bf16 master", &gmaster, &cp, F32_TOL);
    check("adamw bf16 param", &gp, &cp, BF16_TOL);
    check("adamw bf16 m", &gm, &cm, F32_TOL);
}
