//! End-to-end tests of the `trainer` binary: a real (small) run from text to
//! weights, determinism, and one test per kind of bad input, each of which must
//! give one clear `error:` line naming the file or key, a non-zero exit, and
//! never a panic.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trainer(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(cwd).output().expect("run trainer")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit 1, exactly one stderr line, starting with
/// "error:", containing every needle.
fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} lacks {n:?}", lines[0]);
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temp dir with shards made from the start of the KJV corpus and a config
/// for the "test" model on them.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = fs::read_to_string(repo_root().join("data/kjv/kjv.txt")).unwrap();
        let cut = text.char_indices().nth(120_000).map_or(text.len(), |(i, _)| i);
        fs::write(dir.path().join("corpus.txt"), &text[..cut]).unwrap();
        let o =
            trainer(&["prepare", "--input", "corpus.txt", "--output", "shards", "--val-tokens", "4096"], dir.path());
        assert!(o.status.success(), "prepare failed: {}", stderr(&o));
        fs::write(
            dir.path().join("job.toml"),
            r#"
[model]
preset = "test"
block_size = 64

[data]
train = "shards/train_*.bin"
val = "shards/val_*.bin"

[training]
micro_batch_size = 4
seq_len = 32
max_steps = 30
seed = 7

[optimizer]
lr = 1e-2

[lr_schedule]
warmup_steps = 5

[logging]
interval = 1
run_dir = "run"

[eval]
interval = 0
batches = 4
"#,
        )
        .unwrap();
        Workspace { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        trainer(args, self.path())
    }
}

fn metric(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{key}="))).and_then(|v| v.parse().ok())
}

#[test]
fn trains_evaluates_and_is_deterministic() {
    let ws = Workspace::new();
    let o = ws.run(&["--config", "job.toml"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let losses: Vec<f64> = out.lines().filter_map(|l| metric(l, "train_loss")).collect();
    assert_eq!(losses.len(), 31, "30 step lines + the summary: {out}");
    let vals: Vec<f64> = out.lines().filter(|l| l.starts_with("step=")).filter_map(|l| metric(l, "val_loss")).collect();
    assert_eq!(vals.len(), 2, "evaluated at start and end: {out}");
    assert!(vals[1] < vals[0] - 2.0, "validation loss falls clearly: {vals:?}");
    for l in out.lines().filter(|l| l.starts_with("step=") && l.contains("train_loss")) {
        for key in ["lr", "grad_norm", "tok_per_s"] {
            assert!(metric(l, key).is_some(), "{key} in {l}");
        }
    }
    let jsonl = fs::read_to_string(ws.path().join("run/metrics.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 32, "30 train records + 2 evaluations");

    // `eval` on the saved weights reproduces the final validation loss.
    let e = ws.run(&["eval", "--config", "job.toml"]);
    assert!(e.status.success(), "{}", stderr(&e));
    let eval_loss = metric(&stdout(&e), "val_loss").unwrap();
    assert!((eval_loss - vals[1]).abs() < 1e-4, "eval {eval_loss} vs training's {}", vals[1]);

    // Same seed, same data: the same losses to the last bit (fixed-order reductions).
    let again = ws.run(&["train", "--config", "job.toml", "--set", "logging.run_dir=\"run2\""]);
    let losses2: Vec<f64> = stdout(&again).lines().filter_map(|l| metric(l, "train_loss")).collect();
    assert_eq!(losses, losses2);
}

#[test]
fn set_overrides_and_gradient_accumulation() {
    let ws = Workspace::new();
    let o = ws.run(&[
        "--config",
        "job.toml",
        "--set",
        "training.max_steps=3",
        "--set",
        "training.grad_accum_steps=2",
        "--set",
        "logging.run_dir=acc",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().filter(|l| l.starts_with("step=") && l.contains("train_loss")).count(), 3, "{out}");
    assert!(out.contains("tokens_per_step=256"), "4 x 32 x 2: {out}");
    assert!(ws.path().join("acc/model.safetensors").exists());
}

#[test]
fn missing_config_file() {
    let ws = Workspace::new();
    assert_one_line_error(&ws.run(&["--config", "nope.toml"]), &["nope.toml"]);
    assert_one_line_error(&ws.run(&[]), &["--config"]);
}

#[test]
fn malformed_config_file() {
    let ws = Workspace::new();
    fs::write(ws.path().join("bad.toml"), "[model\npreset = 1\n").unwrap();
    assert_one_line_error(&ws.run(&["--config", "bad.toml"]), &["bad.toml", "line 1"]);
}

#[test]
fn unknown_key() {
    let ws = Workspace::new();
    let text =
        fs::read_to_string(ws.path().join("job.toml")).unwrap().replace("seed = 7", "seed = 7\nlearning_rate = 1");
    fs::write(ws.path().join("typo.toml"), text).unwrap();
    assert_one_line_error(&ws.run(&["--config", "typo.toml"]), &["typo.toml", "training.learning_rate", "max_steps"]);
    assert_one_line_error(&ws.run(&["--config", "job.toml", "--set", "optimizer.lrr=1"]), &["optimizer.lrr"]);
}

#[test]
fn out_of_range_value() {
    let ws = Workspace::new();
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "optimizer.beta2=1.5"]),
        &["job.toml", "optimizer.beta2 = 1.5", "[0, 1)"],
    );
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "training.seq_len=65"]),
        &["training.seq_len = 65", "block_size (64)"],
    );
}

#[test]
fn missing_data_directory() {
    let ws = Workspace::new();
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "data.train=\"nowhere/train_*.bin\""]),
        &["data.train", "nowhere/train_*.bin", "no files match"],
    );
}

fn corrupt_case(ws: &Workspace, name: &str, mutate: impl FnOnce(&mut Vec<u8>), needles: &[&str]) {
    let mut bytes = fs::read(ws.path().join("shards/train_000000.bin")).unwrap();
    mutate(&mut bytes);
    fs::create_dir_all(ws.path().join("bad")).unwrap();
    fs::write(ws.path().join("bad").join(name), bytes).unwrap();
    let set = format!("data.train=\"bad/{name}\"");
    let mut all = vec![name];
    all.extend_from_slice(needles);
    assert_one_line_error(&ws.run(&["--config", "job.toml", "--set", &set]), &all);
}

#[test]
fn empty_shard() {
    let ws = Workspace::new();
    corrupt_case(
        &ws,
        "empty.bin",
        |b| {
            b.truncate(1024);
            b[8..12].copy_from_slice(&0i32.to_le_bytes());
        },
        &["no tokens"],
    );
}

#[test]
fn corrupt_shards() {
    let ws = Workspace::new();
    corrupt_case(&ws, "magic.bin", |b| b[0] ^= 0xff, &["magic"]);
    corrupt_case(&ws, "truncated.bin", |b| b.truncate(b.len() - 100), &["truncated"]);
    corrupt_case(&ws, "short.bin", |b| b.truncate(100), &["header"]);
    corrupt_case(&ws, "version.bin", |b| b[4] = 9, &["version 9"]);
    // A token id beyond GPT-2's 50257: position 5 gets 60000.
    corrupt_case(
        &ws,
        "vocab.bin",
        |b| b[1024 + 10..1024 + 12].copy_from_slice(&60000u16.to_le_bytes()),
        &["token 60000 at position 5", "50257"],
    );
}

#[test]
fn gpu_requested_without_gpu() {
    let ws = Workspace::new();
    assert_one_line_error(&ws.run(&["--config", "job.toml", "--set", "training.device=\"cuda\""]), &["cuda"]);
    assert_one_line_error(&ws.run(&["--config", "job.toml", "--set", "training.dtype=\"bf16\""]), &["training.dtype"]);
}

#[test]
fn prepare_bad_input() {
    let ws = Workspace::new();
    fs::write(ws.path().join("docs.jsonl"), "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n").unwrap();
    assert_one_line_error(
        &ws.run(&["prepare", "--input", "docs.jsonl", "--output", "o", "--val-tokens", "1"]),
        &["docs.jsonl:2", "\"text\""],
    );
    assert_one_line_error(&ws.run(&["prepare", "--input", "missing.txt", "--output", "o"]), &["missing.txt"]);
    assert_one_line_error(
        &ws.run(&["prepare", "--input", "corpus.txt", "--output", "o2", "--tokenizer", "nope.json"]),
        &["nope.json"],
    );
}

#[test]
fn eval_with_wrong_weights() {
    let ws = Workspace::new();
    fs::write(ws.path().join("junk.safetensors"), b"not a safetensors file").unwrap();
    assert_one_line_error(
        &ws.run(&["eval", "--config", "job.toml", "--weights", "junk.safetensors"]),
        &["junk.safetensors"],
    );
}

/// Width, height and RGB pixels of a PNG, or a failed test if it does not decode.
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature of {}", path.display());
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn count_color(rgb: &[u8], color: [u8; 3]) -> usize {
    rgb.chunks_exact(3).filter(|p| *p == color).count()
}

#[test]
fn report_after_training() {
    let ws = Workspace::new();
    let o = ws.run(&["--config", "job.toml", "--set", "training.max_steps=5"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = ws.run(&["report", "run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "no warnings for a file the trainer wrote");
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("report=run/report.png steps=5 train_loss="), "{out}");
    for key in ["train_loss", "val_loss", "mean_tok_per_s"] {
        assert!(metric(&out, key).is_some(), "{key} in {out}");
    }
    // Four panels (loss, tokens/s, learning rate, gradient norm) in a 2 x 2 grid.
    let (w, h, rgb) = decode_png(&ws.path().join("run/report.png"));
    assert_eq!((w, h), (1280, 800));
    // The train loss (blue) and validation loss (orange) curves are drawn.
    assert!(count_color(&rgb, [31, 119, 180]) > 100, "train loss curve");
    assert!(count_color(&rgb, [255, 127, 14]) > 20, "validation loss points");
    // Text is rendered (embedded font): the title strip above the first panel's plot has dark pixels.
    let title_strip = &rgb[..(w * 30 * 3) as usize];
    assert!(title_strip.chunks_exact(3).filter(|p| p.iter().all(|&c| c < 80)).count() > 30, "panel title drawn");

    let o = ws.run(&["report", "run", "--output", "plots.svg"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("report=plots.svg steps=5 "), "{}", stdout(&o));
    let svg = fs::read_to_string(ws.path().join("plots.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
    for label in ["Loss", "train", "validation", "step", "tokens/s", "learning rate", "gradient norm"] {
        assert!(svg.contains(&format!(">\n{label}\n</text>")), "SVG lacks the text {label:?}");
    }
}

#[test]
fn report_skips_malformed_lines_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("r")).unwrap();
    // Line 3 is what a run killed in the middle of a write leaves behind.
    fs::write(
        dir.path().join("r/metrics.jsonl"),
        concat!(
            "{\"step\":0,\"val_loss\":10.9,\"val_ppl\":54000.0}\n",
            "{\"step\":1,\"train_loss\":10.8,\"lr\":1e-3,\"grad_norm\":2.5,\"tok_per_s\":100}\n",
            "{\"step\":2,\"train_lo\n",
            "{\"step\":2,\"train_loss\":9.5,\"lr\":2e-3,\"grad_norm\":1.5,\"tok_per_s\":300}\n",
            "{\"step\":3,\"train_loss\":null,\"lr\":3e-3,\"grad_norm\":null,\"tok_per_s\":500}\n",
        ),
    )
    .unwrap();
    let o = trainer(&["report", "r", "-o", "r/x.PNG"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("warning: r/metrics.jsonl:3: not valid JSON"), "{err}");
    assert!(err.trim_end().ends_with("line skipped"), "{err}");
    // The last train loss was non-finite; the mean leaves out step 1.
    assert_eq!(stdout(&o).trim_end(), "report=r/x.PNG steps=3 train_loss=nan val_loss=10.9000 mean_tok_per_s=400");
    let (w, h, _) = decode_png(&dir.path().join("r/x.PNG"));
    assert_eq!((w, h), (1280, 800));
}

#[test]
fn report_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| trainer(args, dir.path());
    assert_one_line_error(&run(&["report", "nowhere"]), &["run directory nowhere does not exist"]);
    fs::write(dir.path().join("file"), "").unwrap();
    assert_one_line_error(&run(&["report", "file"]), &["file is not a directory"]);
    fs::create_dir(dir.path().join("r")).unwrap();
    assert_one_line_error(&run(&["report", "r"]), &["r/metrics.jsonl not found", "logging.run_dir"]);
    fs::write(dir.path().join("r/metrics.jsonl"), "").unwrap();
    assert_one_line_error(&run(&["report", "r"]), &["r/metrics.jsonl is empty"]);
    fs::write(dir.path().join("r/metrics.jsonl"), "\n{\"step\":\"one\",\"train_loss\":3}\nnot json\n").unwrap();
    assert_one_line_error(
        &run(&["report", "r"]),
        &["r/metrics.jsonl:2: \"step\" is \"one\"", "no line of the file is a metrics record"],
    );
    fs::write(dir.path().join("r/metrics.jsonl"), "{\"step\":1,\"train_loss\":3}\n").unwrap();
    assert_one_line_error(&run(&["report", "r", "-o", "r/plot.jpg"]), &["r/plot.jpg", "'.jpg'", ".png or .svg"]);
    assert_one_line_error(&run(&["report", "r", "-o", "r/plot"]), &["r/plot", "no extension"]);
    assert_one_line_error(&run(&["report", "r", "-o", "missing/plot.svg"]), &["missing/plot.svg"]);
    assert!(!dir.path().join("r/report.png").exists(), "nothing written on error");
}

#[test]
fn report_of_a_resumed_gpu_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("{\"step\":0,\"val_loss\":10.9,\"val_ppl\":54000.0}\n");
    let rec = |step: u64, loss: f64| {
        format!(
            "{{\"step\":{step},\"train_loss\":{loss},\"lr\":6e-4,\"grad_norm\":0.8,\"tok_per_s\":1000,\"mfu\":0.45,\"peak_mem_gb\":12.5}}\n"
        )
    };
    for step in 1..=4 {
        text += &rec(step, 10.0 - step as f64);
    }
    // Killed after step 4, resumed from the checkpoint at step 2; the guard refused one update.
    text += &rec(3, 7.5);
    text += "{\"step\":4,\"train_loss\":null,\"grad_norm\":null,\"skipped\":1,\"bad_in_a_row\":1}\n";
    text += &rec(4, 6.5);
    text += "{\"step\":4,\"val_loss\":6.75,\"val_ppl\":854.06}\n";
    fs::write(dir.path().join("metrics.jsonl"), text).unwrap();

    let o = trainer(&["report", ".", "--output", "r.svg"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        "report=r.svg steps=4 train_loss=6.5000 val_loss=6.7500 mean_tok_per_s=1000 restarts=1 skipped_steps=1"
    );
    let svg = fs::read_to_string(dir.path().join("r.svg")).unwrap();
    for label in ["Model FLOPs utilization", "45.0%", "Peak memory", "GB"] {
        assert!(svg.contains(&format!(">\n{label}\n</text>")), "SVG lacks the text {label:?}");
    }
    let o = trainer(&["report", "."], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // Six panels: loss, tokens/s, learning rate, gradient norm, MFU, memory.
    let (w, h, _) = decode_png(&dir.path().join("report.png"));
    assert_eq!((w, h), (1280, 1200));
}
