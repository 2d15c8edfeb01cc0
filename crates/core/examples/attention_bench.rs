//! Attention forward and forward+backward throughput on a GPU, bf16, on the
//! shapes and with the FLOP count of ../shared/bench/torch_attention_bench.py
//! (FlashAttention papers: forward 4*B*H*T*T*d, halved when causal; backward
//! 2.5x forward). Median of 50 timed runs after 5 warm-ups.
//!
//!   cargo run --release -p trainer-core --example attention_bench [-- --causal 0]

use std::time::Instant;

use anyhow::{Result, bail};
use trainer_core::{DType, Device, Tensor, ops};

const SHAPES: [(usize, usize, usize, usize); 4] =
    [(16, 12, 1024, 64), (8, 16, 2048, 128), (4, 32, 4096, 128), (64, 12, 197, 64)];

fn median_secs(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(50);
    for _ in 0..50 {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let causal =
        !matches!(args.iter().position(|a| a == "--causal").and_then(|i| args.get(i + 1)), Some(v) if v == "0");
    let dev = Device::cuda(0)?;
    for (b, h, t, d) in SHAPES {
        let c = h * d;
        let fill = |dims: &[usize], seed: u32| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            // A cheap deterministic pattern in [-1, 1): the timing does not depend on values.
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 23) as f32 - 1.0
                })
                .collect();
            Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(&dev)?)
        };
        let qkv = fill(&[b, t, 3 * c], 1)?;
        let dout = fill(&[b, t, c], 2)?;
        let mut out = Tensor::zeros([b, t, c], DType::BF16, &dev)?;
        let mut lse = Tensor::zeros([b, h, t], DType::F32, &dev)?;
        let mut delta = Tensor::zeros([b, h, t], DType::F32, &dev)?;
        let mut dqkv = Tensor::zeros([b, t, 3 * c], DType::BF16, &dev)?;
        let fwd = median_secs(&dev, || Ok(ops::attention_forward(&mut out, &mut lse, &qkv, h, causal)?))?;
        let fwdbwd = median_secs(&dev, || {
            ops::attention_forward(&mut out, &mut lse, &qkv, h, causal)?;
            Ok(ops::attention_backward(&mut dqkv, &mut delta, &dout, &qkv, &out, &lse, h, causal)?)
        })?;
        let f = 4.0 * (b * h * t * t * d) as f64 * if causal { 0.5 } else { 1.0 };
        if fwd.is_nan() || fwd <= 0.0 {
            bail!("timing failed");
        }
        println!(
            "RESULT ours B={b} H={h} T={t} d={d} causal={causal} fwd_ms={:.3} fwd_tflops={:.0} fwdbwd_ms={:.3} fwdbwd_tflops={:.0}",
            fwd * 1e3,
            f / fwd / 1e12,
            fwdbwd * 1e3,
            3.5 * f / fwdbwd / 1e12
        );
    }
    Ok(())
}
