//! `trainer export` and `trainer import`: our weights to and from a Hugging
//! Face GPT-2 directory (transformers' GPT2LMHeadModel format).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use trainer_core::{DType, Device};
use trainer_models::gpt::{Gpt, GptConfig, hf, read_weights};
use trainer_nn::Module;
use trainer_train::checkpoint;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads.
    Hf,
}

/// Where a command reads a model from: `--weights` or `--checkpoint`.
#[derive(Args, Debug)]
pub struct ModelSource {
    /// A weights file written by trainer, a directory holding model.safetensors
    /// (e.g. a run directory), or a Hugging Face GPT-2 directory.
    #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    pub weights: Option<PathBuf>,
    /// A checkpoint directory, or a directory of them (the newest complete one).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
}

impl ModelSource {
    /// The path to read with `read_weights` / `Gpt::from_path`.
    pub fn resolve(&self) -> Result<PathBuf> {
        match (&self.weights, &self.checkpoint) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(c)) => {
                let only_model = |f: &checkpoint::FileEntry| f.name == hf::WEIGHTS_FILE;
                let dir = checkpoint::resolve(c, &only_model, &|w| eprintln!("warning: {w}"))?.dir;
                Ok(dir.join(hf::WEIGHTS_FILE))
            }
            (None, None) => bail!("give --weights PATH or --checkpoint DIR"),
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    source: ModelSource,
    #[arg(long, value_enum, default_value = "hf")]
    format: ExportFormat,
    /// Output directory (created if needed; its config.json and model.safetensors are replaced).
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A Hugging Face GPT-2 directory (config.json + model.safetensors, or a sharded index).
    #[arg(long = "from")]
    from: PathBuf,
    /// The weights file to write (trainer's format: loads with --weights, eval, generate).
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run_export(args: &ExportArgs) -> Result<()> {
    let (config, tensors, source) = read_weights(&args.source.resolve()?)?;
    match args.format {
        ExportFormat::Hf => hf::export(&config, &tensors, &source, &args.output)
            .with_context(|| format!("export to {}", args.output.display()))?,
    }
    println!("exported format=hf {} output={}", shape_fields(&config), args.output.display());
    Ok(())
}

pub fn run_import(args: &ImportArgs) -> Result<()> {
    let imported = hf::import(&args.from)?;
    let config = imported.config.clone();
    let mut model = Gpt::new(config.clone(), DType::F32, &Device::Cpu)?;
    model.load_named(imported.tensors, &args.from.join(hf::WEIGHTS_FILE))?;
    model.save_weights(&args.output).with_context(|| format!("import into {}", args.output.display()))?;
    println!("imported params={} {} weights={}", model.num_params(), shape_fields(&config), args.output.display());
    Ok(())
}

/// The model's shape as the `key=value` fields of the export and import lines.
fn shape_fields(c: &GptConfig) -> String {
    format!(
        "vocab_size={} n_layer={} n_head={} n_embd={} block_size={}",
        c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.block_size
    )
}
