//! Incremental decoding with the KV cache against the full forward pass.
//!
//! The decoder runs the same ops as the full forward over fewer rows, and the
//! cached attention loops over keys exactly as the full one does, so:
//! - f64: differences are GEMM blocking over a different number of rows only,
//!   ~1e-16 per op: 1e-12 relative (max |diff| / max |ref| over the logits).
//! - f32: the same at ~6e-8 per op through 2 layers: 1e-5 relative.
//! - CUDA (run on the GPU machine; skipped here): f32 1e-5; bf16 5e-2, since
//!   the decode and the full forward round activations to bf16 at different
//!   points (attention kernels with different tilings) and 8-bit mantissas
//!   differ by up to 2^-8 relative per rounding.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_core::{DType, Device};
use trainer_models::gpt::{Decoder, Gpt, GptConfig, Sampling, StopReason, generate};

fn config() -> GptConfig {
    // Odd vocabulary (padded to 128), a block longer than the sequences.
    GptConfig { vocab_size: 97, block_size: 40, n_layer: 2, n_head: 4, n_embd: 32 }
}

fn model(dtype: DType, device: &Device) -> Gpt {
    let mut m = Gpt::new(config(), dtype, device).unwrap();
    m.init(42).unwrap();
    m
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(0..config().vocab_size as u32)).collect()
}

/// Logits (T rows of the real vocabulary) of one full forward over `tokens`.
fn full_logits(model: &Gpt, tokens: &[u32]) -> Vec<Vec<f64>> {
    let mut acts = model.new_acts(1, tokens.len()).unwrap();
    model.forward(&mut acts, tokens, None).unwrap();
    let vp = model.config.padded_vocab_size();
    let all = acts.logits.to_vec_f64().unwrap();
    all.chunks(vp).map(|row| row[..model.config.vocab_size].to_vec()).collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    diff / b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30)
}

/// Feeds `seq` in the chunks given (a prefill, single steps, a chunk on top of
/// a cached prefix) and compares each feed's logits with the full forward's row.
fn check_decoder(model: &Gpt, tol: f64) {
    let seq = tokens(23, 1);
    let full = full_logits(model, &seq);
    let chunks = [7, 1, 1, 5, 1, 1, 1, 6];
    assert_eq!(chunks.iter().sum::<usize>(), seq.len());
    let mut dec = Decoder::new(model, seq.len()).unwrap();
    let mut worst: f64 = 0.0;
    for &n in &chunks {
        let start = dec.len();
        let logits = dec.feed(&seq[start..start + n]).unwrap();
        let e = rel_err(&logits, &full[start + n - 1]);
        assert!(e <= tol, "{} {}: position {}: rel err {e:e} > {tol:e}", model.device(), model.dtype(), start + n - 1);
        worst = worst.max(e);
    }
    eprintln!(
        "{} {}: KV-cache logits vs full forward: max rel err {worst:.2e} (tol {tol:.0e})",
        model.device(),
        model.dtype()
    );
    // A reset decoder gives the same answer again (the cache is overwritten).
    dec.reset();
    let again = dec.feed(&seq[..9]).unwrap();
    assert!(rel_err(&again, &full[8]) <= tol);
}

#[test]
fn kv_cache_logits_match_the_full_forward_cpu() {
    check_decoder(&model(DType::F64, &Device::Cpu), 1e-12);
    check_decoder(&model(DType::F32, &Device::Cpu), 1e-5);
}

#[test]
fn kv_cache_logits_match_the_full_forward_cuda() {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    check_decoder(&model(DType::F32, &dev), 1e-5);
    check_decoder(&model(DType::BF16, &dev), 5e-2);
}

/// Greedy generation through the cache equals re-running the full forward on
/// the growing sequence and taking the argmax each time.
#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    let m = model(DType::F64, &Device::Cpu);
    let prompt = tokens(5, 2);
    let g = generate(&m, &prompt, 12, &Sampling::greedy(), None, |_| {}).unwrap();
    assert_eq!(g.stop, StopReason::MaxTokens);
    let mut seq = prompt.clone();
    for _ in 0..12 {
        let last = full_logits(&m, &seq).pop().unwrap();
        let best = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        seq.push(best as u32);
    }
    assert_eq!(g.tokens, seq[prompt.len()..]);
}

#[test]
fn stops_at_eot_max_tokens_and_block_size() {
    let m = model(DType::F32, &Device::Cpu);
    let prompt = tokens(4, 3);
    let greedy = Sampling::greedy();
    let free = generate(&m, &prompt, 6, &greedy, None, |_| {}).unwrap();
    // Declaring the third greedy token the end-of-text token stops right there.
    let eot = free.tokens[2];
    let first = free.tokens.iter().position(|&t| t == eot).unwrap();
    let g = generate(&m, &prompt, 6, &greedy, Some(eot), |_| {}).unwrap();
    assert_eq!((g.tokens.as_slice(), g.stop), (&free.tokens[..=first], StopReason::EndOfText));
    // The sequence may not outgrow block_size (40).
    let mut streamed = Vec::new();
    let g = generate(&m, &prompt, 100, &greedy, None, |t| streamed.push(t)).unwrap();
    assert_eq!((g.tokens.len(), g.stop), (40 - 4, StopReason::BlockSize));
    assert_eq!(streamed, g.tokens);
    let g = generate(&m, &tokens(40, 4), 5, &greedy, None, |_| {}).unwrap();
    assert_eq!((g.tokens.len(), g.stop), (0, StopReason::BlockSize));
    let g = generate(&m, &prompt, 0, &greedy, None, |_| {}).unwrap();
    assert_eq!((g.tokens.len(), g.stop), (0, StopReason::MaxTokens));
    // Sampling with a seed is reproducible.
    let s = Sampling { temperature: 1.0, top_k: 10, top_p: 0.9, seed: 5 };
    let a = generate(&m, &prompt, 10, &s, None, |_| {}).unwrap().tokens;
    assert_eq!(a, generate(&m, &prompt, 10, &s, None, |_| {}).unwrap().tokens);
}

#[test]
fn bad_prompts_are_clear_errors() {
    let m = model(DType::F32, &Device::Cpu);
    let g = Sampling::greedy();
    let cases: [(Vec<u32>, &str); 3] = [
        (vec![], "empty"),
        (tokens(41, 5), "41 tokens, more than the model's block_size (40)"),
        (vec![3, 97], "token id 97 is outside the model's vocabulary (vocab_size 97)"),
    ];
    for (prompt, needle) in cases {
        let e = generate(&m, &prompt, 3, &g, None, |_| {}).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
    let e = generate(&m, &[1], 3, &Sampling { top_p: 2.0, ..g }, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("top_p = 2"), "{e}");
    let mut dec = Decoder::new(&m, 4).unwrap();
    dec.feed(&[1, 2, 3]).unwrap();
    let e = dec.feed(&[4, 5]).unwrap_err().to_string();
    assert!(e.contains("capacity"), "{e}");
}
