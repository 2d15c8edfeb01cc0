//! `trainer generate`: continue a prompt with a trained (or imported) model.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use trainer_core::{DType, Device, Tensor, io};
use trainer_data::Tokenizer;
use trainer_models::gpt::{Gpt, Sampling, generate};

use crate::interop::ModelSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Fp32,
    /// bf16 weights and activations (GPU only).
    Bf16,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Text to continue ("" starts from the end-of-text token, as GPT-2's unconditional samples do).
    #[arg(long, required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Token ids to continue instead of text, comma-separated (e.g. 464,3290,286).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate; generation also stops at end-of-text and at the model's block_size.
    #[arg(long, default_value_t = 100)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens; 0 disables.
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Sample only among the most likely tokens whose probabilities reach p; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling; the same seed gives the same text.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DtypeArg,
    /// "gpt2" (built in) or the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// Print one JSON object (prompt_ids, tokens, text, stop) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Also write the logits of one full forward over prompt + generated tokens
    /// (ids (T) and logits (T, vocab_size), f32) to this safetensors file, for
    /// comparisons with other implementations.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

/// Prints the continuation as it grows. Byte-level BPE tokens can end inside
/// a UTF-8 character, so text ending in a replacement character waits for the
/// next token.
struct Stream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: String,
}

impl Stream<'_> {
    fn push(&mut self, id: u32, last: bool) -> Result<()> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if (!last && text.ends_with('\u{fffd}')) || !text.starts_with(&self.printed) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        out.write_all(&text.as_bytes()[self.printed.len()..])?;
        out.flush()?;
        self.printed = text;
        Ok(())
    }
}

pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::cuda(0).context("--device cuda")?,
    };
    let dtype = match (args.dtype, args.device) {
        (DtypeArg::Fp32, _) => DType::F32,
        (DtypeArg::Bf16, DeviceArg::Cuda) => DType::BF16,
        (DtypeArg::Bf16, DeviceArg::Cpu) => {
            bail!("--dtype bf16: bf16 compute runs on GPUs; add --device cuda or use fp32")
        }
    };
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    let tokenizer = Tokenizer::load(&args.tokenizer)?;
    let model = Gpt::from_path(&args.source.resolve()?, dtype, &device)?;
    let vocab = model.config.vocab_size;
    // The end-of-text token stops generation, if the model's vocabulary has it.
    let eot = Some(tokenizer.eot()).filter(|&id| (id as usize) < vocab);
    let (prompt, prompt_text) = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => (ids.clone(), tokenizer.decode(ids)?),
        (None, Some(text)) if text.is_empty() => match eot {
            Some(id) => (vec![id], String::new()),
            None => bail!(
                "--prompt is empty and the model's vocabulary ({vocab}) lacks the end-of-text token to start from"
            ),
        },
        (None, Some(text)) => (tokenizer.encode(text)?, text.clone()),
        (None, None) => bail!("give --prompt TEXT or --prompt-ids IDS"),
    };
    if prompt.is_empty() {
        bail!("--prompt-ids is empty: give at least one token id");
    }
    // Checked here too (generate does) so that nothing is printed before an error.
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        bail!(
            "prompt token id {bad} is outside the model's vocabulary (vocab_size {vocab}); the tokenizer ({}) \
             does not fit this model: give --prompt-ids",
            tokenizer.name()
        );
    }
    let block = model.config.block_size;
    if prompt.len() > block {
        bail!("the prompt has {} tokens, more than the model's block_size ({block})", prompt.len());
    }

    let started = Instant::now();
    let mut stream = Stream { tokenizer: &tokenizer, ids: Vec::new(), printed: String::new() };
    if !args.json {
        print!("{prompt_text}");
        std::io::stdout().flush()?;
    }
    let mut stream_err = None;
    let g = generate(&model, &prompt, args.max_new_tokens, &sampling, eot, |id| {
        if !args.json && stream_err.is_none() {
            stream_err = stream.push(id, false).err();
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(e) = stream_err {
        return Err(e);
    }
    // Generated text without a final end-of-text token (it is a stop marker).
    let shown: &[u32] = match g.tokens.split_last() {
        Some((&last, rest)) if Some(last) == eot => rest,
        _ => &g.tokens,
    };
    let text = tokenizer.decode(shown)?;
    if args.json {
        let j = serde_json::json!({
            "prompt_ids": prompt,
            "tokens": g.tokens,
            "prompt": prompt_text,
            "text": text,
            "stop": g.stop.as_str(),
        });
        println!("{j}");
    } else {
        // Whatever streaming held back (an unfinished character at the end).
        if let Some(rest) = text.strip_prefix(stream.printed.as_str()) {
            print!("{rest}");
        }
        println!();
    }
    if let Some(path) = &args.logits_out {
        let mut seq = prompt.clone();
        seq.extend(&g.tokens);
        seq.truncate(model.config.block_size);
        write_logits(&model, &seq, path).with_context(|| format!("--logits-out {}", path.display()))?;
    }
    eprintln!(
        "generated tokens={} stop={} prompt_tokens={} tok_per_s={:.1} device={} dtype={}",
        g.tokens.len(),
        g.stop.as_str(),
        prompt.len(),
        g.tokens.len() as f64 / secs.max(1e-9),
        model.device(),
        model.dtype()
    );
    Ok(())
}

/// ids (T) and logits (T, vocab_size) of one full forward over `seq`.
fn write_logits(model: &Gpt, seq: &[u32], path: &std::path::Path) -> Result<()> {
    let (v, vp) = (model.config.vocab_size, model.config.padded_vocab_size());
    let mut acts = model.new_acts(1, seq.len())?;
    model.forward(&mut acts, seq, None)?;
    let all = acts.logits.to_vec_f64()?;
    let logits: Vec<f32> = all.chunks(vp).flat_map(|row| row[..v].iter().map(|&x| x as f32)).collect();
    let logits = Tensor::from_vec(logits, [seq.len(), v], &Device::Cpu)?;
    let ids = Tensor::from_vec(seq.to_vec(), [seq.len()], &Device::Cpu)?;
    io::save(path, &[("ids", &ids), ("logits", &logits)], Some(BTreeMap::new()))?;
    Ok(())
}
