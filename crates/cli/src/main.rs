//! `trainer`: train (the default), prepare, eval, report, generate, export, import.

mod classify;
mod generate;
mod interop;
mod sagemaker;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use trainer_comm::{World, abort_job};
use trainer_data::{PrepareOptions, Tokenizer, prepare};
use trainer_train::{
    Config, Outcome, StopSignal, TrainSummary, evaluate_checkpoint, evaluate_weights, signal_name, train_in,
};

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
    /// Tokenize .txt and .jsonl files into train and validation shards, or turn an image folder or IDX data set into image shards.
    Prepare(PrepareArgs),
    /// Validation loss and perplexity (a classifier: top-1 and top-5 accuracy) of saved weights or a checkpoint.
    Eval(EvalArgs),
    /// Plot a run's loss, throughput, learning rate and gradient norm into a PNG or SVG image.
    Report(ReportArgs),
    /// What SageMaker runs to host a model: refused, this image trains.
    #[command(hide = true)]
    Serve {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Continue a prompt: sampling with temperature, top-k and top-p, or greedy.
    Generate(generate::GenerateArgs),
    /// Write weights in another format (--format hf: a transformers GPT-2 or ViT directory).
    Export(interop::ExportArgs),
    /// Read a Hugging Face GPT-2 or ViT directory into a trainer weights file.
    Import(interop::ImportArgs),
    /// The top classes of images under an image classifier (a ViT), with their probabilities.
    Classify(classify::ClassifyArgs),
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
    #[arg(long, conflicts_with = "checkpoint")]
    weights: Option<PathBuf>,
    /// A checkpoint directory to evaluate, or a directory of them (the newest complete one).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The run directory (logging.run_dir) holding metrics.jsonl.
    run_dir: PathBuf,
    /// The image to write, .png or .svg [default: RUN_DIR/report.png].
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// .txt files (one document each), .jsonl files (a "text" field per line), or directories of them.
    #[arg(long, short, required_unless_present_any = ["idx_train", "images"], conflicts_with_all = ["idx_train", "images"], num_args = 1..)]
    input: Vec<PathBuf>,
    /// Images instead of text: an image folder, one subfolder of JPEG/PNG
    /// files per class (torchvision's ImageFolder), the training split; the
    /// class names are the subfolders' names.
    #[arg(long, conflicts_with = "idx_train")]
    images: Option<PathBuf>,
    /// The validation split of --images (the same class subfolders).
    #[arg(long, requires = "images")]
    val_images: Option<PathBuf>,
    /// With --images: each image's shorter side is resized to this, then its
    /// centre square kept (store at 256 to train random crops at 224, say).
    #[arg(long, default_value_t = 256, requires = "images")]
    size: usize,
    /// Images instead of text: an IDX images file and its IDX labels file
    /// (gzipped or not; MNIST, Fashion-MNIST), the training split.
    #[arg(long, num_args = 2, value_names = ["IMAGES", "LABELS"], requires = "class_names")]
    idx_train: Option<Vec<PathBuf>>,
    /// The validation split of --idx-train's data set.
    #[arg(long, num_args = 2, value_names = ["IMAGES", "LABELS"], requires = "idx_train")]
    idx_val: Option<Vec<PathBuf>>,
    /// With --idx-train: the class names, one per line (IDX files hold none);
    /// copied beside the shards as classes.txt.
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Directory for train_NNNNNN.bin and val_NNNNNN.bin (text), or
    /// train_000000.img, val_000000.img and classes.txt (images).
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
        bail!(
            "no config given: pass --config FILE (for example configs/tiny.toml); inside a SageMaker \
             training job (/opt/ml/input/config) the job's settings are used"
        );
    };
    load_config_file(path, &job.overrides)
}

fn load_config_file(path: &Path, overrides: &[String]) -> Result<Config> {
    let cfg = Config::load(path, overrides)?;
    if cfg.training.cpu_threads > 0 {
        // Only fails if a pool exists already, in which case that one is used.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(cfg.training.cpu_threads).build_global();
    }
    Ok(cfg)
}

/// `trainer train`: the job's settings inside SageMaker when no config is
/// given, else the config file. A run stopped by a signal exits with 128 + its
/// number, as if the signal had ended it, after its checkpoint is written.
fn run_train(job: &JobArgs, sm: Option<&trainer_sagemaker::Paths>) -> Result<ExitCode> {
    match (sm, &job.config) {
        (Some(paths), None) => sagemaker::run(paths, &job.overrides).map(|()| ExitCode::SUCCESS),
        _ => {
            let s = train_and_report(&load_config(job)?)?;
            Ok(match s.outcome {
                Outcome::Stopped { signal } => ExitCode::from(u8::try_from(128 + signal).unwrap_or(1)),
                Outcome::Finished => ExitCode::SUCCESS,
            })
        }
    }
}

/// Trains and prints the summary line (or, stopped by a signal, where the
/// checkpoint to resume from is). Under `mpirun` this process is one rank of
/// the job: an error ends every rank (with this rank's message) rather than
/// returning, since the others would wait for this one in a collective.
fn train_and_report(cfg: &Config) -> Result<TrainSummary> {
    let stop = StopSignal::install()?;
    let world = World::init(cfg.comm_options())?;
    let s = match train_in(cfg, &stop, &world) {
        Ok(s) => s,
        Err(e) if world.is_distributed() => abort_job(&format!("{e:#}")),
        Err(e) => return Err(e.into()),
    };
    if s.rank != 0 {
        return Ok(s);
    }
    let checkpoint = s.checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string());
    if let Outcome::Stopped { signal } = s.outcome {
        println!(
            "stopped by {} at step {}: checkpoint={} (run the same command to resume); exit status {}",
            signal_name(signal),
            s.steps,
            checkpoint,
            128 + signal
        );
        return Ok(s);
    }
    let val = |v: Option<f64>| v.map_or("none".to_string(), |v| format!("{v:.4}"));
    if s.throughput.is_none() {
        println!(
            "nothing left to do: the run is at step {} = training.max_steps (raise it to train further, or use \
             another logging.run_dir to start afresh)",
            s.steps
        );
    }
    println!(
        "done steps={} train_loss={} first_val_loss={} val_loss={}{}{} weights={} checkpoint={}",
        s.steps,
        // The documented form of a value that is not a number.
        if s.final_train_loss.is_finite() { format!("{:.4}", s.final_train_loss) } else { "nan".into() },
        val(s.first_val_loss),
        val(s.final_val_loss),
        s.throughput.map_or(String::new(), |t| format!(" avg_{}_per_s={t:.0}", s.throughput_unit)),
        s.peak_memory.map_or(String::new(), |b| format!(" peak_mem_gb={:.2}", b as f64 / 1e9)),
        s.weights.as_ref().map_or("none".to_string(), |p| p.display().to_string()),
        checkpoint
    );
    Ok(s)
}

fn run_eval(args: &EvalArgs) -> Result<()> {
    let cfg = load_config(&args.job)?;
    let (r, source) = match &args.checkpoint {
        Some(dir) => {
            let (r, used) = evaluate_checkpoint(&cfg, dir)?;
            (r, format!("checkpoint={}", used.display()))
        }
        None => {
            let weights =
                args.weights.clone().unwrap_or_else(|| PathBuf::from(&cfg.logging.run_dir).join("model.safetensors"));
            (evaluate_weights(&cfg, &weights)?, format!("weights={}", weights.display()))
        }
    };
    match r.accuracy {
        Some(a) => println!(
            "val_loss={:.4} val_acc={:.4} val_acc5={:.4} batches={} images={} {source}",
            r.loss, a.top1, a.top5, r.batches, r.samples
        ),
        None => {
            let tokens = r.samples * cfg.training.seq_len;
            println!(
                "val_loss={:.4} val_ppl={:.2} batches={} tokens={tokens} {source}",
                r.loss, r.perplexity, r.batches
            );
        }
    }
    Ok(())
}

fn run_prepare(args: &PrepareArgs) -> Result<()> {
    if let Some(train) = &args.images {
        let started = std::time::Instant::now();
        let r = trainer_data::prepare_image_folders(
            train,
            args.val_images.as_deref(),
            &args.output,
            args.size,
            args.overwrite,
        )
        .with_context(|| format!("prepare into {}", args.output.display()))?;
        println!(
            "prepared train_images={} val_images={} classes={} size={} secs={:.1} output={}",
            r.train_images,
            r.val_images,
            r.classes,
            args.size,
            started.elapsed().as_secs_f64(),
            args.output.display()
        );
        return Ok(());
    }
    if let (Some(train), Some(names)) = (&args.idx_train, &args.class_names) {
        let pair = |p: &[PathBuf]| (p[0].clone(), p[1].clone());
        let (train, val) = (pair(train), args.idx_val.as_deref().map(pair));
        let r = trainer_data::prepare_idx_dataset(
            (&train.0, &train.1),
            val.as_ref().map(|(i, l)| (i.as_path(), l.as_path())),
            names,
            &args.output,
            args.overwrite,
        )
        .with_context(|| format!("prepare into {}", args.output.display()))?;
        println!(
            "prepared train_images={} val_images={} classes={} output={}",
            r.train_images,
            r.val_images,
            r.classes,
            args.output.display()
        );
        return Ok(());
    }
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

fn run_report(args: &ReportArgs) -> Result<()> {
    let r = trainer_report::report(&args.run_dir, args.output.as_deref())?;
    let m = &r.metrics;
    let file = args.run_dir.join(trainer_report::METRICS_FILE);
    // Few lines by name, the rest counted: a garbled file should not flood the terminal.
    const SHOWN: usize = 5;
    for bad in m.malformed.iter().take(SHOWN) {
        eprintln!("warning: {}:{}: {}; line skipped", file.display(), bad.line, bad.reason);
    }
    if m.malformed.len() > SHOWN {
        eprintln!("warning: {}: {} more malformed lines skipped", file.display(), m.malformed.len() - SHOWN);
    }
    // Non-finite values as the metrics lines print them: never as numbers.
    let num = |v: Option<f64>, digits: usize| match v {
        None => "none".to_string(),
        Some(v) if v.is_nan() => "nan".to_string(),
        Some(v) if v.is_infinite() => if v > 0.0 { "inf" } else { "-inf" }.to_string(),
        Some(v) => format!("{v:.digits$}"),
    };
    // An image model's run: its accuracy and images/s.
    let rest = if m.img_per_s.is_empty() && m.val_acc.is_empty() {
        format!("mean_tok_per_s={}", num(m.mean_tok_per_s(), 0))
    } else {
        format!(
            "val_acc={} mean_img_per_s={}",
            num(trainer_report::last_value(&m.val_acc), 4),
            num(m.mean_img_per_s(), 0)
        )
    };
    println!(
        "report={} steps={} train_loss={} val_loss={} {rest}{}{}",
        r.output.display(),
        m.last_step().unwrap_or(0),
        num(trainer_report::last_value(&m.train_loss), 4),
        num(trainer_report::last_value(&m.val_loss), 4),
        if m.restarts > 0 { format!(" restarts={}", m.restarts) } else { String::new() },
        if m.skipped_steps > 0 { format!(" skipped_steps={}", m.skipped_steps) } else { String::new() },
    );
    Ok(())
}

fn main() -> ExitCode {
    // Inside a SageMaker training job every failure, a panic or a bad command
    // line included, also leaves its reason in /opt/ml/output/failure.
    let sm = trainer_sagemaker::Paths::detect();
    if let Some(paths) = &sm {
        sagemaker::install_failure_hook(paths);
        // A rank that fails ends the job without returning here (abort_job).
        let paths = paths.clone();
        trainer_comm::on_abort(move |reason| sagemaker::record_failure(&paths, &anyhow!("{reason}")));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(paths) = sm.as_ref().filter(|_| e.use_stderr()) {
                let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
                sagemaker::record_failure(paths, &anyhow!("{first}"));
            }
            e.exit()
        }
    };
    let result = match &cli.command {
        None => run_train(&cli.train, sm.as_ref()),
        Some(Command::Train(job)) => run_train(job, sm.as_ref()),
        Some(Command::Prepare(p)) => run_prepare(p).map(|()| ExitCode::SUCCESS),
        Some(Command::Eval(e)) => run_eval(e).map(|()| ExitCode::SUCCESS),
        Some(Command::Report(r)) => run_report(r).map(|()| ExitCode::SUCCESS),
        Some(Command::Serve { .. }) => Err(anyhow!(
            "`serve` is not supported: this image trains models (SageMaker training jobs run it with `train`); \
             host the trained model (model.tar.gz) with a serving container"
        )),
        Some(Command::Generate(g)) => generate::run_generate(g).map(|()| ExitCode::SUCCESS),
        Some(Command::Export(x)) => interop::run_export(x).map(|()| ExitCode::SUCCESS),
        Some(Command::Import(i)) => interop::run_import(i).map(|()| ExitCode::SUCCESS),
        Some(Command::Classify(c)) => classify::run_classify(c).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the whole cause chain, joined by ": ".
            eprintln!("error: {e:#}");
            if let Some(paths) = &sm {
                sagemaker::record_failure(paths, &e);
            }
            ExitCode::FAILURE
        }
    }
}
