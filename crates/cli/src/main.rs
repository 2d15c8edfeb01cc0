//! `trainer`: train (the default), prepare, eval, generate, export, import.

mod generate;
mod interop;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use trainer_data::{PrepareOptions, Tokenizer, prepare};
use trainer_train::{Config, evaluate_weights, train};

#[derive(Parser, Debug)]
#[command(name = "trainer", version, about = "Train GPT-style models from one CPU core to many GPUs")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `trainer` trains.
    #[command(flatten)]
    train: JobArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model from a config file.
    Train(JobArgs),
    /// Tokenize .txt and .jsonl files into train and validation shards.
    Prepare(PrepareArgs),
    /// Validation loss and perplexity of saved weights.
    Eval(EvalArgs),
    /// Continue a prompt: sampling with temperature, top-k and top-p, or greedy.
    Generate(generate::GenerateArgs),
    /// Write weights in another format (--format hf: a transformers GPT-2 directory).
    Export(interop::ExportArgs),
    /// Read a Hugging Face GPT-2 directory into a trainer weights file.
    Import(interop::ImportArgs),
}

#[derive(Args, Debug)]
struct JobArgs {
    /// The job's TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set training.max_steps=50 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Weights to evaluate [default: <logging.run_dir>/model.safetensors].
    #[arg(long)]
    weights: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// .txt files (one document each), .jsonl files (a "text" field per line), or directories of them.
    #[arg(long, short, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Directory for train_NNNNNN.bin and val_NNNNNN.bin.
    #[arg(long, short)]
    output: PathBuf,
    /// "gpt2" (built in, offline) or the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// The first this many tokens go to validation shards.
    #[arg(long, default_value_t = 1_000_000)]
    val_tokens: usize,
    /// Tokens per shard (llm.c uses 100M).
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
    /// Replace shards already in the output directory.
    #[arg(long)]
    overwrite: bool,
}

fn load_config(job: &JobArgs) -> Result<Config> {
    let Some(path) = &job.config else {
        bail!("no config given: pass --config FILE (for example configs/tiny.toml)");
    };
    let cfg = Config::load(path, &job.overrides)?;
    if cfg.training.cpu_threads > 0 {
        // Only fails if a pool exists already, in which case that one is used.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(cfg.training.cpu_threads).build_global();
    }
    Ok(cfg)
}

fn run_train(job: &JobArgs) -> Result<()> {
    let cfg = load_config(job)?;
    let s = train(&cfg)?;
    let val = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.4}"));
    println!(
        "done steps={} train_loss={:.4} first_val_loss={} val_loss={} avg_tok_per_s={:.0}{} weights={}",
        s.steps,
        s.final_train_loss,
        val(s.first_val_loss),
        val(s.final_val_loss),
        s.tokens_per_second,
        s.peak_memory.map_or(String::new(), |b| format!(" peak_mem_gb={:.2}", b as f64 / 1e9)),
        s.weights.display()
    );
    Ok(())
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let cfg = load_config(&args.job)?;
    let weights = args.weights.clone().unwrap_or_else(|| PathBuf::from(&cfg.logging.run_dir).join("model.safetensors"));
    let r = evaluate_weights(&cfg, &weights)?;
    println!(
        "val_loss={:.4} val_ppl={:.2} batches={} tokens={} weights={}",
        r.loss,
        r.perplexity,
        r.batches,
        r.tokens,
        weights.display()
    );
    Ok(())
}

fn run_prepare(args: &PrepareArgs) -> Result<()> {
    let tokenizer = Tokenizer::load(&args.tokenizer)?;
    let opts = PrepareOptions {
        inputs: args.input.clone(),
        output_dir: args.output.clone(),
        tokenizer: &tokenizer,
        val_tokens: args.val_tokens,
        shard_tokens: args.shard_tokens,
        overwrite: args.overwrite,
    };
    let r = prepare(&opts).with_context(|| format!("prepare into {}", args.output.display()))?;
    println!(
        "prepared documents={} train_tokens={} val_tokens={} shards={} tokenizer={} output={}",
        r.documents,
        r.train_tokens,
        r.val_tokens,
        r.files.len(),
        tokenizer.name(),
        args.output.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        None => run_train(&cli.train),
        Some(Command::Train(job)) => run_train(job),
        Some(Command::Prepare(p)) => run_prepare(p),
        Some(Command::Eval(e)) => run_eval(e),
        Some(Command::Generate(g)) => generate::run_generate(g),
        Some(Command::Export(x)) => interop::run_export(x),
        Some(Command::Import(i)) => interop::run_import(i),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, joined by ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
