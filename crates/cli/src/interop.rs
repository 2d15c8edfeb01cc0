//! `trainer export` and `trainer import`: our weights to and from a Hugging
//! Face directory: GPT-2 (transformers' GPT2LMHeadModel format) or ViT
//! (ViTForImageClassification).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use trainer_core::io;
use trainer_core::{DType, Device};
use trainer_models::gpt::{Gpt, GptConfig, hf, read_weights};
use trainer_models::hf_dir;
use trainer_models::vit::{self, Vit, VitConfig};
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
    /// A ViT's class names, one per line (the classes.txt `trainer prepare`
    /// writes beside image shards), for the export's id2label.
    #[arg(long)]
    class_names: Option<PathBuf>,
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
    let path = args.source.resolve()?;
    let names = match &args.class_names {
        Some(f) => Some(trainer_data::read_class_names(f)?),
        None => None,
    };
    let ExportFormat::Hf = args.format;
    let fields = export_hf(&path, names.as_deref(), &args.output)
        .with_context(|| format!("export to {}", args.output.display()))?;
    println!("exported format=hf {fields} output={}", args.output.display());
    Ok(())
}

/// Writes the model of our weights file `weights` as a Hugging Face directory
/// (GPT2LMHeadModel or ViTForImageClassification) in `output`; a ViT's
/// `class_names` become its id2label. Returns the model's shape as the
/// `key=value` fields of the command's line.
pub fn export_hf(
    weights: &std::path::Path,
    class_names: Option<&[String]>,
    output: &std::path::Path,
) -> Result<String> {
    if let Some(config) = vit_weights_config(weights)? {
        if let Some(n) = class_names.filter(|n| n.len() != config.num_classes) {
            bail!("{} class names for a model of {} classes", n.len(), config.num_classes);
        }
        let file = if weights.is_dir() { weights.join(hf::WEIGHTS_FILE) } else { weights.to_path_buf() };
        let tensors = io::load(&file)?.tensors;
        vit::hf::export(&config, &tensors, class_names, &file, output)?;
        return Ok(vit_fields(&config));
    }
    if class_names.is_some() {
        bail!("class names apply to ViT weights; {} holds a GPT", weights.display());
    }
    let (config, tensors, source) = read_weights(weights)?;
    hf::export(&config, &tensors, &source, output)?;
    Ok(shape_fields(&config))
}

/// The ViT config of a weights file of ours, None for anything else.
fn vit_weights_config(path: &std::path::Path) -> Result<Option<VitConfig>> {
    let file = if path.is_dir() { path.join(hf::WEIGHTS_FILE) } else { path.to_path_buf() };
    if !file.is_file() || hf_dir::is_hf_dir(path) {
        return Ok(None);
    }
    let loaded = io::load(&file)?;
    match loaded.metadata.get(vit::CONFIG_KEY) {
        Some(raw) => {
            Ok(Some(serde_json::from_str(raw).with_context(|| format!("{}: {}", file.display(), vit::CONFIG_KEY))?))
        }
        None => Ok(None),
    }
}

pub fn run_import(args: &ImportArgs) -> Result<()> {
    if hf_dir::model_type(&args.from).as_deref() == Some("vit") {
        let model = Vit::from_hf(&args.from, DType::F32, &Device::Cpu)?;
        model.save_weights(&args.output).with_context(|| format!("import into {}", args.output.display()))?;
        println!(
            "imported params={} {} weights={}",
            model.num_params(),
            vit_fields(&model.config),
            args.output.display()
        );
        return Ok(());
    }
    let imported = hf::import(&args.from)?;
    let config = imported.config.clone();
    let mut model = Gpt::new(config.clone(), DType::F32, &Device::Cpu)?;
    model.load_named(imported.tensors, &args.from.join(hf::WEIGHTS_FILE))?;
    model.save_weights(&args.output).with_context(|| format!("import into {}", args.output.display()))?;
    println!("imported params={} {} weights={}", model.num_params(), shape_fields(&config), args.output.display());
    Ok(())
}

/// A ViT's shape as the `key=value` fields of the export and import lines.
fn vit_fields(c: &VitConfig) -> String {
    format!(
        "model=vit image_size={} patch_size={} channels={} num_classes={} n_layer={} n_head={} n_embd={}",
        c.image_size, c.patch_size, c.channels, c.num_classes, c.n_layer, c.n_head, c.n_embd
    )
}

/// The model's shape as the `key=value` fields of the export and import lines.
fn shape_fields(c: &GptConfig) -> String {
    format!(
        "vocab_size={} n_layer={} n_head={} n_embd={} block_size={}",
        c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.block_size
    )
}
