//! Every op's backward against central finite differences, in f64, on small
//! random shapes (awkward sizes on purpose: odd T, C not a power of two).
//!
//! Each check builds a scalar L = sum(Y * R) with a fixed random R, so dL/dY = R
//! is the upstream gradient, and compares the analytic dL/dX with
//! (L(X + h e_i) - L(X - h e_i)) / 2h for every element i.
//! Tolerance: with h = 1e-5 in f64 the truncation error is O(h^2 f''') ~ 1e-10 and
//! rounding ~ 1e-16 / h ~ 1e-11, so 1e-7 (relative to max(1, |grad|)) leaves a wide
//! margin while still catching any wrong term (those are O(1)).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::ops::{self, AdamWHyper, AdamWSpan, Span};
use trainer_core::{Device, Tensor};

const H: f64 = 1e-5;
const TOL: f64 = 1e-7;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims, trainer_core::DType::F64, &Device::Cpu).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.as_slice::<f64>().unwrap().iter().zip(b.as_slice::<f64>().unwrap()).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` with finite differences of `loss` around `x`.
fn check(name: &str, x: &Tensor, analytic: &Tensor, loss: impl Fn(&Tensor) -> f64) {
    assert_eq!(x.dims(), analytic.dims(), "{name}: gradient shape");
    let a = analytic.as_slice::<f64>().unwrap();
    let mut worst = 0.0f64;
    for (i, &ai) in a.iter().enumerate() {
        let mut xp = x.try_clone().unwrap();
        xp.as_mut_slice::<f64>().unwrap()[i] += H;
        let mut xm = x.try_clone().unwrap();
        xm.as_mut_slice::<f64>().unwrap()[i] -= H;
        let numeric = (loss(&xp) - loss(&xm)) / (2.0 * H);
        let err = (ai - numeric).abs() / numeric.abs().max(1.0);
        worst = worst.max(err);
        assert!(err < TOL, "{name}[{i}]: analytic {ai} vs numeric {numeric} (rel err {err:e})");
    }
    eprintln!("{name}: max rel err {worst:e} over {} elements", x.numel());
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut r = rng(1);
    let (n, c, oc) = (7, 5, 6);
    let (x, w, b, dy) =
        (randn(&mut r, &[n, c]), randn(&mut r, &[oc, c]), randn(&mut r, &[oc]), randn(&mut r, &[n, oc]));
    let fwd = |x: &Tensor, w: &Tensor, b: &Tensor| {
        let mut y = zeros(&[n, oc]);
        ops::linear_forward(&mut y, x, w, Some(b)).unwrap();
        dot(&y, &dy)
    };
    let (mut dx, mut dw, mut db) = (zeros(&[n, c]), randn(&mut r, &[oc, c]), randn(&mut r, &[oc]));
    // Parameter gradients accumulate: start from nonzero values and subtract them.
    let (dw0, db0) = (dw.try_clone().unwrap(), db.try_clone().unwrap());
    ops::linear_backward(&mut dx, &mut dw, Some(&mut db), &dy, &x, &w).unwrap();
    let sub = |a: &Tensor, b: &Tensor| {
        let v = a.to_vec_f64().unwrap().iter().zip(b.to_vec_f64().unwrap()).map(|(x, y)| x - y).collect::<Vec<_>>();
        Tensor::from_vec(v, a.dims(), &Device::Cpu).unwrap()
    };
    check("linear dinp", &x, &dx, |x| fwd(x, &w, &b));
    check("linear dweight", &w, &sub(&dw, &dw0), |w| fwd(&x, w, &b));
    check("linear dbias", &b, &sub(&db, &db0), |b| fwd(&x, &w, b));
}

#[test]
fn matmul_transposes_match_naive_product() {
    let mut r = rng(2);
    let (m, n, k) = (5, 3, 4);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = randn(&mut r, &if ta { [k, m] } else { [m, k] });
        let b = randn(&mut r, &if tb { [n, k] } else { [k, n] });
        let mut out = randn(&mut r, &[m, n]);
        let before = out.to_vec_f64().unwrap();
        ops::matmul(&mut out, &a, &b, ta, tb, true).unwrap();
        let (av, bv) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        for i in 0..m {
            for j in 0..n {
                let mut s = before[i * n + j];
                for p in 0..k {
                    let x = if ta { av[p * m + i] } else { av[i * k + p] };
                    let y = if tb { bv[j * k + p] } else { bv[p * n + j] };
                    s += x * y;
                }
                let got = out.to_vec_f64().unwrap()[i * n + j];
                assert!((got - s).abs() < 1e-12, "ta={ta} tb={tb} ({i},{j}): {got} vs {s}");
            }
        }
    }
    let mut bad = zeros(&[5, 2]);
    let err = ops::matmul(&mut bad, &randn(&mut r, &[5, 4]), &randn(&mut r, &[3, 2]), false, false, false);
    assert!(err.unwrap_err().to_string().contains("matmul"));
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut r = rng(3);
    let (n, c) = (6, 7);
    let (x, w, b, dy) = (randn(&mut r, &[n, c]), randn(&mut r, &[c]), randn(&mut r, &[c]), randn(&mut r, &[n, c]));
    let fwd = |x: &Tensor, w: &Tensor, b: &Tensor| {
        let (mut y, mut mean, mut rstd) = (zeros(&[n, c]), zeros(&[n]), zeros(&[n]));
        ops::layernorm_forward(&mut y, &mut mean, &mut rstd, x, w, b, 1e-5).unwrap();
        (dot(&y, &dy), mean, rstd)
    };
    let (_, mean, rstd) = fwd(&x, &w, &b);
    let (mut dx, mut dw, mut db) = (zeros(&[n, c]), zeros(&[c]), zeros(&[c]));
    ops::layernorm_backward(&mut dx, &mut dw, &mut db, &dy, &x, &w, &mean, &rstd).unwrap();
    check("layernorm dinp", &x, &dx, |x| fwd(x, &w, &b).0);
    check("layernorm dweight", &w, &dw, |w| fwd(&x, w, &b).0);
    check("layernorm dbias", &b, &db, |b| fwd(&x, &w, b).0);

    // dinp accumulates into the residual gradient already there.
    let mut dx2 = Tensor::from_vec(vec![1.0f64; n * c], [n, c], &Device::Cpu).unwrap();
    let (mut dw2, mut db2) = (zeros(&[c]), zeros(&[c]));
    ops::layernorm_backward(&mut dx2, &mut dw2, &mut db2, &dy, &x, &w, &mean, &rstd).unwrap();
    for (a, b) in dx2.to_vec_f64().unwrap().iter().zip(dx.to_vec_f64().unwrap()) {
        assert!((a - 1.0 - b).abs() < 1e-12);
    }
}

#[test]
fn gelu_backward_matches_finite_differences() {
    for kind in [ops::Gelu::Tanh, ops::Gelu::Erf] {
        let mut r = rng(4);
        // Spread over [-4, 4]: both tails and the bend.
        let mut x = randn(&mut r, &[3, 11]);
        ops::scale(&mut x, 4.0).unwrap();
        let dy = randn(&mut r, &[3, 11]);
        let fwd = |x: &Tensor| {
            let mut y = zeros(&[3, 11]);
            ops::gelu_forward(&mut y, x, kind).unwrap();
            dot(&y, &dy)
        };
        let mut dx = zeros(&[3, 11]);
        ops::gelu_backward(&mut dx, &x, &dy, kind).unwrap();
        check(&format!("gelu {kind:?} dinp"), &x, &dx, fwd);
    }
}

/// The two GELU forms against independent values: erf's from the definition
/// x Phi(x) at points where Phi is known to 16 digits; tanh's and erf's
/// difference, which must be small (< 1e-3) but not zero: a model that asked
/// for one and got the other would fail its parity test.
#[test]
fn gelu_forms_take_their_known_values() {
    let xs = [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0];
    // Phi(x) from tables (Abramowitz & Stegun 26.2), 16 digits.
    let phi = [0.0013498980316301, 0.1586552539314571, 0.5, 0.6914624612740131, 0.8413447460685429, 0.9772498680518208];
    let x = Tensor::from_vec(xs.to_vec(), [xs.len()], &Device::Cpu).unwrap();
    let (mut erf, mut tanh) = (zeros(&[xs.len()]), zeros(&[xs.len()]));
    ops::gelu_forward(&mut erf, &x, ops::Gelu::Erf).unwrap();
    ops::gelu_forward(&mut tanh, &x, ops::Gelu::Tanh).unwrap();
    let (erf, tanh) = (erf.to_vec_f64().unwrap(), tanh.to_vec_f64().unwrap());
    for i in 0..xs.len() {
        assert!((erf[i] - xs[i] * phi[i]).abs() < 1e-15, "erf gelu({}) = {} vs {}", xs[i], erf[i], xs[i] * phi[i]);
        assert!((erf[i] - tanh[i]).abs() < 1e-3, "gelu({}): forms {} and {} too far apart", xs[i], erf[i], tanh[i]);
    }
    assert!((erf[0] - tanh[0]).abs() > 1e-4, "at x = -3 the forms differ by about 4e-4");
}

fn attention_case(causal: bool, seed: u64) {
    let mut r = rng(seed);
    let (b, t, nh, hs) = (2, 5, 3, 4);
    let c = nh * hs;
    let (qkv, dy) = (randn(&mut r, &[b, t, 3 * c]), randn(&mut r, &[b, t, c]));
    let fwd = |qkv: &Tensor| {
        let (mut y, mut lse) = (zeros(&[b, t, c]), zeros(&[b, nh, t]));
        ops::attention_forward(&mut y, &mut lse, qkv, nh, causal).unwrap();
        (y, lse)
    };
    let (y, lse) = fwd(&qkv);
    let mut dqkv = randn(&mut r, &[b, t, 3 * c]); // overwritten, so garbage is fine
    let mut delta = zeros(&[b, nh, t]);
    ops::attention_backward(&mut dqkv, &mut delta, &dy, &qkv, &y, &lse, nh, causal).unwrap();
    check(if causal { "attention(causal) dqkv" } else { "attention dqkv" }, &qkv, &dqkv, |q| dot(&fwd(q).0, &dy));
}

#[test]
fn attention_backward_matches_finite_differences() {
    attention_case(true, 5);
    attention_case(false, 6);
}

#[test]
fn causal_attention_ignores_the_future() {
    let mut r = rng(7);
    let (b, t, nh, c) = (1, 6, 2, 8);
    let qkv = randn(&mut r, &[b, t, 3 * c]);
    let mut qkv2 = qkv.try_clone().unwrap();
    // Change every k and v of the last position: earlier outputs must not move.
    for j in c..3 * c {
        qkv2.as_mut_slice::<f64>().unwrap()[(t - 1) * 3 * c + j] += 1.0;
    }
    let run = |q: &Tensor| {
        let (mut y, mut lse) = (zeros(&[b, t, c]), zeros(&[b, nh, t]));
        ops::attention_forward(&mut y, &mut lse, q, nh, true).unwrap();
        y.to_vec_f64().unwrap()
    };
    let (y1, y2) = (run(&qkv), run(&qkv2));
    assert_eq!(y1[..(t - 1) * c], y2[..(t - 1) * c]);
    assert_ne!(y1[(t - 1) * c..], y2[(t - 1) * c..]);
}

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut r = rng(8);
    let (b, t, c, v, max_t) = (2, 3, 4, 5, 4);
    // Token 1 repeats: its gradient must be the sum of both uses.
    let tokens = Tensor::from_vec(vec![1u32, 4, 1, 0, 2, 3], [b, t], &Device::Cpu).unwrap();
    let (wte, wpe, dy) = (randn(&mut r, &[v, c]), randn(&mut r, &[max_t, c]), randn(&mut r, &[b, t, c]));
    let fwd = |wte: &Tensor, wpe: &Tensor| {
        let mut y = zeros(&[b, t, c]);
        ops::embedding_forward(&mut y, &tokens, wte, wpe).unwrap();
        dot(&y, &dy)
    };
    let (mut dwte, mut dwpe) = (zeros(&[v, c]), zeros(&[max_t, c]));
    let mut index = ops::TokenIndex::new(b * t, &Device::Cpu).unwrap();
    index.update(tokens.as_slice::<u32>().unwrap()).unwrap();
    ops::embedding_backward(&mut dwte, &mut dwpe, &dy, &tokens, &index).unwrap();
    check("embedding dwte", &wte, &dwte, |w| fwd(w, &wpe));
    check("embedding dwpe", &wpe, &dwpe, |w| fwd(&wte, w));

    let bad = Tensor::from_vec(vec![0u32, 5], [1, 2], &Device::Cpu).unwrap();
    let mut y = zeros(&[1, 2, c]);
    let err = ops::embedding_forward(&mut y, &bad, &wte, &wpe).unwrap_err().to_string();
    assert!(err.contains("index 5") && err.contains("< 5"), "{err}");
}

#[test]
fn image_tokens_backward_matches_finite_differences() {
    let mut r = rng(21);
    let (b, n, c) = (3, 4, 5);
    let (patches, cls, pos, dy) =
        (randn(&mut r, &[b, n, c]), randn(&mut r, &[c]), randn(&mut r, &[n + 1, c]), randn(&mut r, &[b, n + 1, c]));
    let fwd = |p: &Tensor, cl: &Tensor, po: &Tensor| {
        let mut y = zeros(&[b, n + 1, c]);
        ops::image_tokens_forward(&mut y, p, cl, po).unwrap();
        dot(&y, &dy)
    };
    // dcls and dpos accumulate: start them from ones and subtract.
    let (mut dp, mut dcls, mut dpos) = (randn(&mut r, &[b, n, c]), randn(&mut r, &[c]), randn(&mut r, &[n + 1, c]));
    let (cls0, pos0) = (dcls.to_vec_f64().unwrap(), dpos.to_vec_f64().unwrap());
    ops::image_tokens_backward(&mut dp, &mut dcls, &mut dpos, &dy).unwrap();
    let minus = |t: &Tensor, base: &[f64]| {
        let v: Vec<f64> = t.to_vec_f64().unwrap().iter().zip(base).map(|(a, b)| a - b).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    };
    check("image_tokens dpatches", &patches, &dp, |p| fwd(p, &cls, &pos));
    check("image_tokens dcls", &cls, &minus(&dcls, &cls0), |cl| fwd(&patches, cl, &pos));
    check("image_tokens dpos", &pos, &minus(&dpos, &pos0), |po| fwd(&patches, &cls, po));
}

#[test]
fn pool_tokens_backward_matches_finite_differences() {
    for pool in [ops::Pool::Class, ops::Pool::Mean] {
        let mut r = rng(22);
        let (b, t, c) = (2, 5, 3);
        let (x, dy) = (randn(&mut r, &[b, t, c]), randn(&mut r, &[b, c]));
        let fwd = |x: &Tensor| {
            let mut y = zeros(&[b, c]);
            ops::pool_tokens(&mut y, x, pool).unwrap();
            dot(&y, &dy)
        };
        // Overwritten, not accumulated: start from garbage.
        let mut dx = randn(&mut r, &[b, t, c]);
        ops::pool_tokens_backward(&mut dx, &dy, pool).unwrap();
        check(&format!("pool {pool:?} dx"), &x, &dx, fwd);
    }
    let mut y = zeros(&[2, 3]);
    let err = ops::pool_tokens(&mut y, &zeros(&[2, 1, 3]), ops::Pool::Mean).unwrap_err().to_string();
    assert!(err.contains("mean pooling needs a patch token"), "{err}");
}

#[test]
fn cross_entropy_gradient_matches_finite_differences_and_skips_padding() {
    let mut r = rng(9);
    let (n, v, vp) = (4, 5, 8);
    let logits = randn(&mut r, &[n, vp]);
    let targets = Tensor::from_vec(vec![0u32, 4, 2, 4], [n], &Device::Cpu).unwrap();
    let scale = 0.25; // e.g. 1 / (B*T)
    let loss = |l: &Tensor| {
        let (mut l, mut losses) = (l.try_clone().unwrap(), zeros(&[n]));
        ops::softmax_cross_entropy(&mut l, &mut losses, &targets, v, None).unwrap();
        scale * ops::sum(&losses).unwrap()
    };
    let mut grad = logits.try_clone().unwrap();
    let mut losses = zeros(&[n]);
    ops::softmax_cross_entropy(&mut grad, &mut losses, &targets, v, Some(scale)).unwrap();
    check("cross_entropy dlogits", &logits, &grad, loss);
    for row in grad.to_vec_f64().unwrap().chunks(vp) {
        assert!(row[v..].iter().all(|&g| g == 0.0), "padded columns get no gradient");
    }
    // The loss ignores padded logits entirely.
    let mut shifted = logits.try_clone().unwrap();
    shifted.as_mut_slice::<f64>().unwrap()[vp - 1] += 100.0;
    assert_eq!(loss(&logits), loss(&shifted));
}

#[test]
fn adamw_matches_scalar_reference() {
    let mut r = rng(10);
    let n = 9;
    let (mut p, g) = (randn(&mut r, &[n]), randn(&mut r, &[n]));
    let (mut m, mut v) = (zeros(&[n]), zeros(&[n]));
    let h =
        |step| AdamWHyper { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
    let (mut rp, mut rm, mut rv) = (p.to_vec_f64().unwrap(), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3u64 {
        let span = Span::whole(0, &p);
        let spans = [AdamWSpan { param: span, grad: span, state_start: 0, decays: true }];
        ops::adamw_update(&mut [&mut p], &[&g], None, &mut m, &mut v, &spans, h(step)).unwrap();
        let hh = h(step);
        let (b1, b2, lr, wd) = (hh.beta1, hh.beta2, hh.lr, hh.weight_decay);
        for (i, &gi) in g.to_vec_f64().unwrap().iter().enumerate() {
            let gi = gi * 0.5;
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            let mhat = rm[i] / (1.0 - b1.powi(step as i32));
            let vhat = rv[i] / (1.0 - b2.powi(step as i32));
            rp[i] = rp[i] * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + 1e-8);
        }
    }
    for (a, b) in p.to_vec_f64().unwrap().iter().zip(&rp) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

/// Spans over several tensors, gradients read from one flat buffer, flat
/// state: the same as one whole-tensor update per parameter, and weight decay
/// only where a span says so.
#[test]
fn adamw_spans_match_per_tensor_updates() {
    let mut r = rng(12);
    let (mut a, mut b) = (randn(&mut r, &[7]), randn(&mut r, &[2, 5]));
    let (ga, gb) = (randn(&mut r, &[7]), randn(&mut r, &[2, 5]));
    let mut flat_grad = zeros(&[20]);
    ops::copy_spans(
        &mut [&mut flat_grad],
        &[&ga, &gb],
        &[
            (Span { tensor: 0, start: 3, len: 7 }, Span::whole(0, &ga)),
            (Span { tensor: 0, start: 10, len: 10 }, Span::whole(1, &gb)),
        ],
    )
    .unwrap();
    let (mut ra, mut rb) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut m, mut v) = (zeros(&[17]), zeros(&[17]));
    let (mut ma, mut va, mut mb, mut vb) = (zeros(&[7]), zeros(&[7]), zeros(&[10]), zeros(&[10]));
    for step in 1..=3u64 {
        let h = AdamWHyper { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
        let spans = [
            AdamWSpan {
                param: Span::whole(0, &a),
                grad: Span { tensor: 0, start: 3, len: 7 },
                state_start: 0,
                decays: false,
            },
            AdamWSpan {
                param: Span::whole(1, &b),
                grad: Span { tensor: 0, start: 10, len: 10 },
                state_start: 7,
                decays: true,
            },
        ];
        ops::adamw_update(&mut [&mut a, &mut b], &[&flat_grad], None, &mut m, &mut v, &spans, h).unwrap();
        let whole = |t: &Tensor, decays| {
            [AdamWSpan { param: Span::whole(0, t), grad: Span::whole(0, t), state_start: 0, decays }]
        };
        let sa = whole(&ra, false);
        ops::adamw_update(&mut [&mut ra], &[&ga], None, &mut ma, &mut va, &sa, h).unwrap();
        let sb = whole(&rb, true);
        ops::adamw_update(&mut [&mut rb], &[&gb], None, &mut mb, &mut vb, &sb, h).unwrap();
    }
    assert_eq!(a.to_vec_f64().unwrap(), ra.to_vec_f64().unwrap());
    assert_eq!(b.to_vec_f64().unwrap(), rb.to_vec_f64().unwrap());
    let state = m.to_vec_f64().unwrap();
    assert_eq!(state[..7], ma.to_vec_f64().unwrap()[..]);
    assert_eq!(state[7..], mb.to_vec_f64().unwrap()[..]);
    // A bad span is an error naming the op, not a panic.
    let bad = [AdamWSpan {
        param: Span { tensor: 0, start: 5, len: 7 },
        grad: Span::whole(0, &ga),
        state_start: 0,
        decays: true,
    }];
    let h = AdamWHyper { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 1, grad_scale: 1.0 };
    let err = ops::adamw_update(&mut [&mut a], &[&ga], None, &mut m, &mut v, &bad, h).unwrap_err().to_string();
    assert!(err.contains("adamw_update") && err.contains("exceeds"), "{err}");
}

#[test]
fn f32_ops_agree_with_f64() {
    // The training dtype runs the same generic code; spot-check one fused op.
    let mut r = rng(11);
    let x = randn(&mut r, &[4, 9]);
    let (w, b) = (randn(&mut r, &[9]), randn(&mut r, &[9]));
    let run = |dt| {
        let (x, w, b) = (x.to_dtype(dt).unwrap(), w.to_dtype(dt).unwrap(), b.to_dtype(dt).unwrap());
        let mut y = Tensor::zeros([4, 9], dt, &Device::Cpu).unwrap();
        let (mut m, mut s) =
            (Tensor::zeros([4], dt, &Device::Cpu).unwrap(), Tensor::zeros([4], dt, &Device::Cpu).unwrap());
        ops::layernorm_forward(&mut y, &mut m, &mut s, &x, &w, &b, 1e-5).unwrap();
        y.to_vec_f64().unwrap()
    };
    let (a, b) = (run(trainer_core::DType::F32), run(trainer_core::DType::F64));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // Half types are storage-only on the CPU: a clear error, not garbage.
    let h = x.to_dtype(trainer_core::DType::BF16).unwrap();
    let mut y = Tensor::zeros([4, 9], trainer_core::DType::BF16, &Device::Cpu).unwrap();
    let err = ops::gelu_forward(&mut y, &h, ops::Gelu::Tanh).unwrap_err().to_string();
    assert!(err.contains("bf16") && err.contains("cpu"), "{err}");
}
