//! The KV-cache attention (CPU reference) against the full causal attention:
//! with the cache filled from the same qkv, every query must see exactly what
//! it sees in the full forward, whatever the split between the cached prefix
//! and the new queries. f64, so the only difference allowed is summation
//! order (none here: the loops are the same), hence 1e-12.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::{DType, Device, Tensor, ops};

fn randn(r: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn cached_attention_matches_the_full_causal_forward() {
    let mut r = ChaCha8Rng::seed_from_u64(11);
    for (b, t, nh, hs) in [(1, 9, 2, 4), (2, 13, 3, 8), (1, 1, 1, 16)] {
        let c = nh * hs;
        let tmax = t + 3; // a cache longer than what is filled
        let qkv = randn(&mut r, &[b, t, 3 * c]);
        let (mut full, mut lse) = (
            Tensor::zeros([b, t, c], DType::F64, &Device::Cpu).unwrap(),
            Tensor::zeros([b, nh, t], DType::F64, &Device::Cpu).unwrap(),
        );
        ops::attention_forward(&mut full, &mut lse, &qkv, nh, true).unwrap();
        let full = full.to_vec::<f64>().unwrap();
        // Feed the sequence in chunks [0, s0), [s0, s1), ... of every split.
        for split in [vec![t], vec![1; t], vec![t / 2, t - t / 2], vec![1, t - 1]] {
            let mut cache = Tensor::zeros([b, tmax, 3 * c], DType::F64, &Device::Cpu).unwrap();
            let mut past = 0;
            for &tq in split.iter().filter(|&&n| n > 0) {
                for bi in 0..b {
                    ops::copy_rows(&mut cache, bi * tmax + past, &qkv, bi * t + past, tq).unwrap();
                }
                let mut out = Tensor::zeros([b, tq, c], DType::F64, &Device::Cpu).unwrap();
                ops::attention_cached(&mut out, &cache, past, nh).unwrap();
                let out = out.to_vec::<f64>().unwrap();
                for bi in 0..b {
                    let want = &full[(bi * t + past) * c..(bi * t + past + tq) * c];
                    let got = &out[bi * tq * c..(bi + 1) * tq * c];
                    let e = max_abs_diff(got, want);
                    assert!(e <= 1e-12, "B={b} T={t} H={nh} hs={hs} split {split:?} past {past}: diff {e:e}");
                }
                past += tq;
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let cache = Tensor::zeros([1, 4, 12], DType::F32, &dev).unwrap();
    let mut out = Tensor::zeros([1, 2, 4], DType::F32, &dev).unwrap();
    // Positions 3 and 4 of a 4-row cache.
    let e = ops::attention_cached(&mut out, &cache, 3, 2).unwrap_err().to_string();
    assert!(e.contains("attention_cached") && e.contains("exceed"), "{e}");
    let mut wrong = Tensor::zeros([1, 2, 5], DType::F32, &dev).unwrap();
    assert!(ops::attention_cached(&mut wrong, &cache, 0, 2).is_err());
    let src = Tensor::zeros([3, 12], DType::F32, &dev).unwrap();
    let mut dst = Tensor::zeros([4, 12], DType::F32, &dev).unwrap();
    let e = ops::copy_rows(&mut dst, 2, &src, 0, 3).unwrap_err().to_string();
    assert!(e.contains("copy_rows"), "{e}");
    ops::copy_rows(&mut dst, 1, &src, 0, 3).unwrap();
}
