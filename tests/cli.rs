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

/// `trainer generate --json` on `weights` (greedy): the generated token ids.
fn greedy_tokens(ws: &Workspace, weights: &str, extra: &[&str]) -> Vec<u64> {
    let mut args = vec!["generate", "--weights", weights, "--prompt", "And God said", "--temperature", "0"];
    args.extend_from_slice(&["--max-new-tokens", "12", "--json"]);
    args.extend_from_slice(extra);
    let o = ws.run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    j["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[test]
fn export_import_and_generate() {
    let ws = Workspace::new();
    let o = ws.run(&["--config", "job.toml", "--set", "training.max_steps=10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ws.run(&["export", "--weights", "run/model.safetensors", "--format", "hf", "--output", "hf"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ws.path().join("hf/config.json").is_file() && ws.path().join("hf/model.safetensors").is_file());
    let o = ws.run(&["import", "--from", "hf", "--output", "back.safetensors"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The same model through every route: the same greedy tokens and eval loss.
    let tokens = greedy_tokens(&ws, "run/model.safetensors", &[]);
    assert_eq!(tokens.len(), 12);
    assert_eq!(greedy_tokens(&ws, "back.safetensors", &[]), tokens);
    assert_eq!(greedy_tokens(&ws, "hf", &[]), tokens);
    assert_eq!(greedy_tokens(&ws, "run", &[]), tokens, "a directory holding model.safetensors");
    let eval = |w: &str| metric(&stdout(&ws.run(&["eval", "--config", "job.toml", "--weights", w])), "val_loss");
    assert_eq!(eval("back.safetensors").unwrap(), eval("run/model.safetensors").unwrap());

    // Streaming text: the prompt, then the continuation; a summary on stderr.
    let o =
        ws.run(&["generate", "--weights", "hf", "--prompt", "And God said", "--max-new-tokens", "8", "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("And God said"), "{}", stdout(&o));
    assert!(stderr(&o).contains("generated tokens=") && stderr(&o).contains("stop="), "{}", stderr(&o));
    let again =
        ws.run(&["generate", "--weights", "hf", "--prompt", "And God said", "--max-new-tokens", "8", "--seed", "3"]);
    assert_eq!(stdout(&o), stdout(&again), "same seed, same text");

    // --logits-out: ids and logits of the whole sequence.
    greedy_tokens(&ws, "hf", &["--logits-out", "logits.safetensors"]);
    let bytes = fs::read(ws.path().join("logits.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let t = header["ids"]["shape"][0].as_u64().unwrap();
    assert_eq!(header["logits"]["shape"], serde_json::json!([t, 50257]));
    assert_eq!(t, 3 + 12, "prompt (3 tokens) + generated");
}

#[test]
fn generate_export_import_bad_input() {
    let ws = Workspace::new();
    let golden = repo_root().join("tests/data/hf_gpt2_tiny");
    let golden = golden.to_str().unwrap();
    assert_one_line_error(
        &ws.run(&["generate", "--weights", "nope.safetensors", "--prompt", "x"]),
        &["nope.safetensors"],
    );
    assert_one_line_error(
        &ws.run(&["generate", "--weights", golden, "--prompt", "Hello"]),
        &["prompt token id", "vocab_size 301", "--prompt-ids"],
    );
    assert_one_line_error(
        &ws.run(&["generate", "--weights", golden, "--prompt-ids", "1,2", "--top-p", "0"]),
        &["top_p = 0"],
    );
    assert_one_line_error(
        &ws.run(&["generate", "--weights", golden, "--prompt-ids", "1", "--temperature=-1"]),
        &["temperature = -1"],
    );
    assert_one_line_error(
        &ws.run(&["generate", "--weights", golden, "--prompt-ids", "1", "--dtype", "bf16"]),
        &["--dtype bf16", "GPU"],
    );
    let long: Vec<String> = (0..41).map(|i| (i % 300).to_string()).collect();
    assert_one_line_error(
        &ws.run(&["generate", "--weights", golden, "--prompt-ids", &long.join(",")]),
        &["41 tokens", "block_size (40)"],
    );
    // A directory that is not GPT-2.
    fs::create_dir_all(ws.path().join("llama")).unwrap();
    fs::write(ws.path().join("llama/config.json"), r#"{"model_type": "llama"}"#).unwrap();
    assert_one_line_error(
        &ws.run(&["import", "--from", "llama", "--output", "x.safetensors"]),
        &["llama/config.json", "model_type"],
    );
    assert_one_line_error(
        &ws.run(&["export", "--weights", "llama", "--output", "out"]),
        &["llama/config.json", "model_type"],
    );
    assert_one_line_error(
        &ws.run(&["import", "--from", "shards", "--output", "x.safetensors"]),
        &["shards/config.json"],
    );
    assert!(!ws.path().join("x.safetensors").exists());
}
