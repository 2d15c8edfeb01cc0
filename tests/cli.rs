//! End-to-end tests of the `trainer` binary: a real (small) run from text to
//! weights, determinism, one test per kind of bad input, each of which must
//! give one clear `error:` line naming the file or key, a non-zero exit, and
//! never a panic; and the long-job behaviour: exact resume, stop signals,
//! killed saves, corrupt checkpoints, the numerical guard.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use common::{prepare_kjv_shards, repo_root, stderr, stdout};

fn trainer(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(cwd).output().expect("run trainer")
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

/// A temp dir with shards made from the start of the KJV corpus and a config
/// for the "test" model on them.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        prepare_kjv_shards(dir.path(), 120_000, 4096);
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

/// An IDX file of unsigned bytes (big-endian dimensions, as MNIST's).
fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

#[test]
fn prepare_turns_an_idx_data_set_into_image_shards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_idx(&d.join("train-images"), &[4, 3, 3], &[5; 36]);
    write_idx(&d.join("train-labels"), &[4], &[0, 1, 2, 1]);
    write_idx(&d.join("val-images"), &[2, 3, 3], &[6; 18]);
    write_idx(&d.join("val-labels"), &[2], &[2, 0]);
    fs::write(d.join("names.txt"), "a\nb\nc\n").unwrap();
    let args = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["prepare", "--idx-train", "train-images", "train-labels", "--output", "img"];
        a.extend_from_slice(extra);
        a
    };
    let o = trainer(&args(&["--idx-val", "val-images", "val-labels", "--class-names", "names.txt"]), d);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("prepared train_images=4 val_images=2 classes=3 output=img"), "{}", stdout(&o));
    assert_eq!(fs::read_to_string(d.join("img/classes.txt")).unwrap(), "a\nb\nc\n");
    assert!(d.join("img/train_000000.img").is_file() && d.join("img/val_000000.img").is_file());
    // Bad input: no class names, too few of them, labels that do not match the images.
    assert!(!trainer(&args(&[]), d).status.success());
    fs::write(d.join("two.txt"), "a\nb\n").unwrap();
    assert_one_line_error(
        &trainer(&args(&["--class-names", "two.txt", "--overwrite"]), d),
        &["train-labels", "label 2 of image 2", "2 classes"],
    );
    write_idx(&d.join("short-labels"), &[3], &[0, 1, 2]);
    let o = trainer(
        &["prepare", "--idx-train", "train-images", "short-labels", "--class-names", "names.txt", "--output", "x"],
        d,
    );
    assert_one_line_error(&o, &["short-labels", "one label per image"]);
}

/// A data set a ViT learns in a few steps: 8x8 grayscale images whose class
/// (0-3) is a pattern of bright pixels (rows, columns, a checkerboard,
/// diagonals), with noise; as IDX files prepared to shards. (Patterns, not
/// brightness levels: LayerNorm makes a transformer slow to tell apart
/// inputs that differ only in scale.)
fn quadrant_images(d: &Path) {
    let make = |n: usize, seed: u32| -> (Vec<u8>, Vec<u8>) {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for i in 0..n {
            let class = (i as u32 * 7 + seed) % 4;
            for y in 0..8u32 {
                for x in 0..8u32 {
                    let noise = ((i as u32 * 31 + y * 7 + x * 13 + seed) % 40) as u8;
                    let bright = [y % 2 == 0, x % 2 == 0, (x + y) % 2 == 0, (x + 8 - y) % 4 == 0][class as usize];
                    pixels.push(if bright { 200 + noise / 2 } else { noise });
                }
            }
            labels.push(class as u8);
        }
        (pixels, labels)
    };
    let (tp, tl) = make(256, 1);
    let (vp, vl) = (make(64, 2).0, make(64, 2).1);
    write_idx(&d.join("train-images"), &[256, 8, 8], &tp);
    write_idx(&d.join("train-labels"), &[256], &tl);
    write_idx(&d.join("val-images"), &[64, 8, 8], &vp);
    write_idx(&d.join("val-labels"), &[64], &vl);
    fs::write(d.join("names.txt"), "rows\ncolumns\nchecks\ndiagonals\n").unwrap();
    let o = trainer(
        &[
            "prepare",
            "--idx-train",
            "train-images",
            "train-labels",
            "--idx-val",
            "val-images",
            "val-labels",
            "--class-names",
            "names.txt",
            "--output",
            "img",
        ],
        d,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(
        d.join("vit.toml"),
        r#"
[model]
kind = "vit"
image_size = 8
patch_size = 4
channels = 1
num_classes = 4
n_layer = 1
n_head = 2
n_embd = 16
pixel_mean = [0.3]
pixel_std = [0.4]

[data]
train = "img/train_*.img"
val = "img/val_*.img"
random_crop_min_area = 1.0
random_flip = false

[training]
micro_batch_size = 16
max_steps = 60
seed = 3

[optimizer]
lr = 1e-2

[lr_schedule]
warmup_steps = 5

[logging]
interval = 10
run_dir = "run"

[eval]
interval = 30
batches = 4
"#,
    )
    .unwrap();
}

#[test]
fn a_vit_trains_on_image_shards_and_reports_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    quadrant_images(d);
    let o = trainer(&["--config", "vit.toml"], d);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    assert!(out.contains("model=vit") && out.contains("images_per_step=16"), "{out}");
    assert!(out.contains("image=8x8x1 patch=4"), "{out}");
    let steps: Vec<&str> = out.lines().filter(|l| l.contains("train_loss=")).collect();
    assert!(steps.iter().all(|l| l.contains("img_per_s=") && !l.contains("tok_per_s")), "{out}");
    let vals: Vec<&str> = out.lines().filter(|l| l.starts_with("step=") && l.contains("val_loss=")).collect();
    assert_eq!(vals.len(), 3, "steps 0, 30 and 60: {out}");
    let first = metric(vals[0], "val_acc").unwrap();
    let last = metric(vals[2], "val_acc").unwrap();
    // Chance is 1/4; the patterns are learned long before step 60.
    assert!(first < 0.5 && last == 1.0, "val_acc {first} -> {last}: {out}");
    assert_eq!(metric(vals[2], "val_acc5"), Some(1.0), "4 classes: always in the top 5");
    assert!(!vals[0].contains("val_ppl"), "no perplexity for a classifier: {out}");
    assert!(out.contains("avg_img_per_s="), "{out}");

    // The report plots accuracy and images/s.
    let o = trainer(&["report", "run"], d);
    let line = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(line.contains("val_acc=1.0000") && line.contains("mean_img_per_s="), "{line}");
    assert!(d.join("run/report.png").is_file());

    // `trainer eval` of the saved weights: the same accuracy, over the images.
    let o = trainer(&["eval", "--config", "vit.toml"], d);
    let line = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metric(&line, "val_acc"), Some(1.0), "{line}");
    assert!(line.contains("images=64"), "{line}");

    // Bad input, one line each.
    let run = |sets: &[&str]| {
        let mut a = vec!["--config", "vit.toml"];
        for s in sets {
            a.extend(["--set", s]);
        }
        trainer(&a, d)
    };
    assert_one_line_error(
        &run(&["model.channels=3", "model.pixel_mean=[0.5,0.5,0.5]", "model.pixel_std=[0.5,0.5,0.5]"]),
        &["data.train", "1 channel(s)", "the model takes 3 channel(s)"],
    );
    assert_one_line_error(&run(&["model.num_classes=10"]), &["data.train", "in 4 classes", "10 classes"]);
    assert_one_line_error(&run(&["model.vocab_size=100"]), &["model.vocab_size does not apply to a vit model"]);
    assert_one_line_error(&run(&["training.seq_len=64"]), &["training.seq_len = 64", "image model"]);
    assert_one_line_error(&run(&["model.patch_size=3"]), &["model.patch_size = 3", "model.image_size = 8"]);
    assert_one_line_error(&run(&["data.val_crop=1.5"]), &["data.val_crop = 1.5"]);
    assert_one_line_error(&run(&["model.pool=\"max\""]), &["model.pool = \"max\"", "class, mean"]);
    // Token shards given to a ViT; image keys given to a GPT.
    let ws = Workspace::new();
    let o = trainer(&["--config", "job.toml", "--set", "data.random_flip=false"], ws.path());
    assert_one_line_error(&o, &["data.random_flip applies to image data"]);
    fs::create_dir_all(d.join("shards")).unwrap();
    fs::copy(ws.path().join("shards/train_000000.bin"), d.join("shards/train_000000.bin")).unwrap();
    assert_one_line_error(&run(&["data.train=\"shards/*.bin\""]), &["data.train", "shards/train_000000.bin"]);
}

/// torchvision's ImageFolder layout from JPEG and PNG files of assorted
/// sizes, prepared, trained on, and classified file by file.
#[test]
fn an_image_folder_is_prepared_trained_on_and_classified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Classes by pattern, as quadrant_images: rows, columns, checks.
    let draw = |class: usize, w: u32, h: u32, seed: u32| {
        image::RgbImage::from_fn(w, h, |x, y| {
            let (cx, cy) = (x * 8 / w, y * 8 / h);
            let on = [cy % 2 == 0, cx % 2 == 0, (cx + cy) % 2 == 0][class];
            let v = if on { 230 } else { ((x * 7 + y * 13 + seed) % 30) as u8 };
            image::Rgb([v, v, v])
        })
    };
    let classes = ["rows", "columns", "checks"];
    for (split, n) in [("train", 24u32), ("val", 6)] {
        for (c, name) in classes.iter().enumerate() {
            fs::create_dir_all(d.join(split).join(name)).unwrap();
            for i in 0..n {
                // Sizes that are multiples of 8 keep the patterns sharp after resizing.
                let img = draw(c, 8 * (2 + i % 3), 8 * (2 + i % 2), i);
                let ext = if i % 2 == 0 { "png" } else { "PNG" };
                img.save(d.join(split).join(name).join(format!("{i:03}.{ext}"))).unwrap();
            }
        }
    }
    let o = trainer(&["prepare", "--images", "train", "--val-images", "val", "--size", "8", "--output", "img"], d);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("prepared train_images=72 val_images=18 classes=3 size=8"), "{}", stdout(&o));
    assert_eq!(
        fs::read_to_string(d.join("img/classes.txt")).unwrap(),
        "checks\ncolumns\nrows\n",
        "sorted folder names"
    );
    fs::write(
        d.join("vit.toml"),
        r#"
[model]
kind = "vit"
image_size = 8
patch_size = 4
num_classes = 3
n_layer = 1
n_head = 2
n_embd = 16

[data]
train = "img/train_*.img"
val = "img/val_*.img"
random_crop_min_area = 1.0
random_flip = false

[training]
micro_batch_size = 8
max_steps = 60
seed = 3

[optimizer]
lr = 1e-2

[logging]
run_dir = "run"

[eval]
interval = 0
batches = 2
"#,
    )
    .unwrap();
    let o = trainer(&["--config", "vit.toml"], d);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    let last = out.lines().rfind(|l| l.starts_with("step=60 val_loss")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(metric(last, "val_acc"), Some(1.0), "{out}");

    // Classify one file of each class: the right class first, probabilities summing to at most 1.
    let files = ["val/rows/001.PNG", "val/columns/002.png", "val/checks/003.PNG"];
    let mut args =
        vec!["classify", "--weights", "run/model.safetensors", "--class-names", "img/classes.txt", "--top", "2"];
    for f in files {
        args.extend(["--image", f]);
    }
    let o = trainer(&args, d);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (line, (file, class)) in lines.iter().zip(files.iter().zip(["rows", "columns", "checks"])) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], *file, "{out}");
        assert_eq!(fields.len(), 3, "top 2: {out}");
        assert!(fields[1].starts_with(&format!("{class}=")), "{file}: {line}");
        let p: f64 = fields[1].split('=').nth(1).unwrap().parse().unwrap();
        assert!(p > 0.5 && p <= 1.0, "{line}");
    }

    // Bad input, one line each.
    fs::write(d.join("train/rows/notes.txt"), "x").unwrap();
    let o = trainer(&["prepare", "--images", "train", "--output", "img2"], d);
    assert_one_line_error(&o, &["notes.txt", "not an image file"]);
    fs::remove_file(d.join("train/rows/notes.txt")).unwrap();
    fs::write(d.join("train/rows/bad.jpg"), "not a jpeg").unwrap();
    let o = trainer(&["prepare", "--images", "train", "--output", "img2", "--size", "8"], d);
    assert_one_line_error(&o, &["bad.jpg", "cannot decode"]);
    let o = trainer(&["classify", "--weights", "run/model.safetensors", "--image", "train/rows/bad.jpg"], d);
    assert_one_line_error(&o, &["bad.jpg", "cannot decode"]);
    let o = trainer(
        &["classify", "--weights", "run/model.safetensors", "--image", "val/rows/001.PNG", "--class-names", "vit.toml"],
        d,
    );
    assert!(!o.status.success());
}

/// Activation recomputation changes no number: GPT and ViT runs with every
/// block recomputing, fully or selectively, or only the first, record the same losses and
/// gradient norms as without (full precision, from metrics.jsonl) and end
/// with the same weights, bit for bit.
#[test]
fn recompute_gives_the_same_training_bit_for_bit() {
    let records = |path: &Path| -> Vec<(u64, f64, f64)> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r.get("grad_norm").is_some())
            .map(|r| (r["step"].as_u64().unwrap(), r["train_loss"].as_f64().unwrap(), r["grad_norm"].as_f64().unwrap()))
            .collect()
    };
    let ws = Workspace::new();
    let vit = tempfile::tempdir().unwrap();
    quadrant_images(vit.path());
    for (dir, config) in [(ws.path(), "job.toml"), (vit.path(), "vit.toml")] {
        let mut runs = Vec::new();
        for (run, sets) in [
            ("none", vec![]),
            ("full", vec!["training.recompute=\"full\""]),
            ("first", vec!["training.recompute=\"full\"", "training.recompute_layers=1"]),
            ("selective", vec!["training.recompute=\"selective\""]),
            ("mixed", vec!["training.recompute=\"selective\"", "training.recompute_layers=1"]),
        ] {
            let mut args = vec!["--config", config, "--set", "training.max_steps=10", "--set", "logging.interval=1"];
            let rd = format!("logging.run_dir=\"{run}\"");
            args.extend(["--set", &rd]);
            for s in &sets {
                args.extend(["--set", s]);
            }
            let o = trainer(&args, dir);
            assert!(o.status.success(), "{config} {run}: {}", stderr(&o));
            let weights = fs::read(dir.join(run).join("model.safetensors")).unwrap();
            runs.push((run, records(&dir.join(run).join("metrics.jsonl")), weights));
        }
        assert_eq!(runs[0].1.len(), 10, "{config}: {:?}", runs[0].1);
        for (run, recs, weights) in &runs[1..] {
            assert_eq!(recs, &runs[0].1, "{config}: recompute {run} changed the losses or norms");
            assert!(weights == &runs[0].2, "{config}: recompute {run} changed the weights");
        }
    }
    let o = trainer(&["--config", "job.toml", "--set", "training.recompute_layers=2"], ws.path());
    assert_one_line_error(&o, &["training.recompute_layers = 2", "training.recompute = \"selective\" or \"full\""]);
    let o = trainer(&["--config", "job.toml", "--set", "training.recompute=\"some\""], ws.path());
    assert_one_line_error(&o, &["training.recompute", "none", "selective", "full"]);
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
    // The final checkpoint holds the same parameters; --checkpoint takes a directory of them.
    let o = ws.run(&[
        "generate",
        "--checkpoint",
        "run/checkpoints",
        "--prompt",
        "And God said",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let via_ckpt: Vec<u64> = j["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(via_ckpt, tokens);
    let o = ws.run(&["export", "--checkpoint", "run/checkpoints", "--output", "hf_ckpt"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read(ws.path().join("hf_ckpt/model.safetensors")).unwrap(),
        fs::read(ws.path().join("hf/model.safetensors")).unwrap()
    );
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
    assert_one_line_error(&ws.run(&["export", "--checkpoint", "nowhere", "--output", "o"]), &["nowhere"]);
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

// ---------------------------------------------------------------------------
// Long jobs: checkpoints, exact resume, stop signals, atomic saves, the
// numerical guard. Runs that must be interrupted read the binary's output as it
// comes and act on a line it prints, never on a time.

/// The train_loss of every step record in a metrics file, by step, at full precision.
fn recorded_losses(path: &Path) -> Vec<(u64, f64)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("train_loss").is_some_and(|v| v.is_f64()))
        .map(|r| (r["step"].as_u64().unwrap(), r["train_loss"].as_f64().unwrap()))
        .collect()
}

/// A running trainer whose stdout and stderr lines arrive on one channel.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Running {
    fn start(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(args)
            .envs(env.iter().copied())
            .current_dir(ws.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Running { child, lines }
    }

    /// Lines up to and including the first one for which `done` holds. The
    /// limit only keeps a broken binary from hanging the test suite.
    fn wait_for(&self, done: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(600)) {
                Ok(line) => {
                    let stop = done(&line);
                    seen.push(line);
                    if stop {
                        return seen;
                    }
                }
                Err(e) => panic!("no awaited line ({e}); saw: {seen:#?}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits until no signal is pending for the process any more (Linux: the
    /// ShdPnd mask in /proc), so that the next one is not merged with it.
    fn wait_delivered(&self) {
        let status = format!("/proc/{}/status", self.child.id());
        loop {
            let text = fs::read_to_string(&status).unwrap_or_default();
            let pending = text.lines().find_map(|l| l.strip_prefix("ShdPnd:")).map(str::trim);
            if pending.is_none_or(|mask| mask.chars().all(|c| c == '0')) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit; returns the status code and the remaining lines.
    /// Sends the second signal until the process ends. signal-hook merges a
    /// signal that arrives before its thread has read the previous one of the
    /// same kind (the kernel has delivered both, so `wait_delivered` cannot
    /// tell), which a loaded machine makes likely: a repeat is then needed.
    fn signal_until_exit(mut self, name: &str) -> (Option<i32>, Vec<String>) {
        for _ in 0..300 {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            // The process may end between the check and the kill: then kill fails, harmlessly.
            let _ = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.child.try_wait().unwrap().is_none() {
            self.child.kill().unwrap();
            panic!("the process did not end on repeated {name} signals");
        }
        self.finish()
    }

    fn finish(mut self) -> (Option<i32>, Vec<String>) {
        let status = self.child.wait().unwrap();
        (status.code(), self.lines.iter().collect())
    }
}

fn step_dirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    let ws = Workspace::new();
    let a = ws.run(&["--config", "job.toml", "--set", "checkpoint.interval=10", "--set", "checkpoint.keep_last=5"]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(step_dirs(&ws.path().join("run/checkpoints")), ["step_00000010", "step_00000020", "step_00000030"]);
    let manifest: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(ws.path().join("run/checkpoints/step_00000010/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["step"], 10);
    assert_eq!(manifest["state"]["data"][0]["index"], 10, "10 windows consumed");
    assert_eq!(manifest["layout"]["world_size"], 1);

    // Another run directory, continuing from step 10 of the first run.
    let b = ws.run(&[
        "--config",
        "job.toml",
        "--set",
        "logging.run_dir=b",
        "--set",
        "checkpoint.resume=run/checkpoints/step_00000010",
    ]);
    assert!(b.status.success(), "{}", stderr(&b));
    assert!(stdout(&b).contains("resumed from run/checkpoints/step_00000010 at step 10"), "{}", stdout(&b));
    let full = recorded_losses(&ws.path().join("run/metrics.jsonl"));
    let resumed = recorded_losses(&ws.path().join("b/metrics.jsonl"));
    assert_eq!(resumed.len(), 20);
    assert_eq!(resumed[..], full[10..], "steps 11-30 bit for bit");

    // `eval --checkpoint` on a checkpoint, and on the directory of them (the newest).
    let final_val =
        stdout(&a).lines().filter(|l| l.starts_with("step=30 val_loss")).find_map(|l| metric(l, "val_loss"));
    for dir in ["run/checkpoints/step_00000030", "run/checkpoints"] {
        let e = ws.run(&["eval", "--config", "job.toml", "--checkpoint", dir]);
        assert!(e.status.success(), "{}", stderr(&e));
        assert_eq!(metric(&stdout(&e), "val_loss"), final_val, "{}", stdout(&e));
        assert!(stdout(&e).contains("checkpoint=run/checkpoints/step_00000030"), "{}", stdout(&e));
    }

    // With nothing left to do, the default (resume = "auto") picks up the finished run.
    let again = ws.run(&["--config", "job.toml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("resumed from run/checkpoints/step_00000030 at step 30"), "{}", stdout(&again));
    assert!(!stdout(&again).contains("train_loss=") || stdout(&again).lines().all(|l| !l.starts_with("step=")));
    // It says so, and reports no throughput (it measured none), never a NaN.
    let out = stdout(&again);
    assert!(out.contains("nothing left to do: the run is at step 30 = training.max_steps"), "{out}");
    let done = out.lines().find(|l| l.starts_with("done steps=30")).expect("a done line");
    assert!(!done.contains("avg_tok_per_s") && !done.contains("NaN"), "{done}");
}

/// A run of one step reports that step's throughput (the warm-up step is
/// left out of the mean only when there are others).
#[test]
fn a_one_step_run_reports_its_throughput() {
    let ws = Workspace::new();
    let o = ws.run(&["--config", "job.toml", "--set", "training.max_steps=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let done = out.lines().find(|l| l.starts_with("done steps=1")).expect("a done line");
    let tps = metric(done, "avg_tok_per_s").unwrap_or_else(|| panic!("{done}"));
    assert!(tps.is_finite() && tps > 0.0, "{done}");
    assert!(!out.contains("nothing left to do"), "{out}");
}

#[test]
fn sigterm_writes_a_checkpoint_and_the_run_resumes() {
    let ws = Workspace::new();
    // A constant rate: the schedule does not depend on max_steps, so the
    // stopped-and-resumed run can be compared with one uninterrupted run.
    let base = ["--config", "job.toml", "--set", "lr_schedule.kind=constant"];
    let long: Vec<&str> = base.iter().copied().chain(["--set", "training.max_steps=1000000"]).collect();
    let run = Running::start(&ws, &long, &[]);
    run.wait_for(|l| l.starts_with("step=3 train_loss"));
    run.signal("TERM");
    let (code, lines) = run.finish();
    assert_eq!(code, Some(143), "128 + SIGTERM: {lines:#?}");
    let stopped = lines.iter().find(|l| l.starts_with("stopped by SIGTERM at step")).expect("a stop line");
    let k: u64 = stopped["stopped by SIGTERM at step ".len()..].split(':').next().unwrap().parse().unwrap();
    assert!(k >= 3, "{stopped}");
    assert!(ws.path().join(format!("run/checkpoints/step_{k:08}/manifest.json")).exists(), "{lines:#?}");
    assert!(!ws.path().join("run/model.safetensors").exists(), "no final weights for a stopped run");

    // Resume (the default) and finish at k + 3; the same as one run of k + 3 steps.
    let end = format!("training.max_steps={}", k + 3);
    let resumed: Vec<&str> = base.iter().copied().chain(["--set", &end]).collect();
    let r = ws.run(&resumed);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stdout(&r).contains(&format!("at step {k}")), "{}", stdout(&r));
    let reference: Vec<&str> = base.iter().copied().chain(["--set", &end, "--set", "logging.run_dir=ref"]).collect();
    assert!(ws.run(&reference).status.success());
    let got = recorded_losses(&ws.path().join("run/metrics.jsonl"));
    let want = recorded_losses(&ws.path().join("ref/metrics.jsonl"));
    assert_eq!(got, want, "stopped at {k}, resumed: the same losses bit for bit");
}

#[test]
fn a_second_signal_exits_at_once() {
    let ws = Workspace::new();
    let args = ["--config", "job.toml", "--set", "checkpoint.interval=2"];
    let run = Running::start(&ws, &args, &[("TRAINER_TEST_STALL_SAVE", "4")]);
    run.wait_for(|l| l.contains("checkpoint save of step 4 stalled"));
    // The first signal asks for a stop after the save, which never ends; the second ends the process.
    run.signal("INT");
    run.wait_delivered();
    let (code, lines) = run.signal_until_exit("INT");
    assert_eq!(code, Some(130), "128 + SIGINT");
    // One line tells a log reader what happened and where a restart continues.
    let said: Vec<&String> = lines.iter().filter(|l| l.starts_with("stopped at once by a second SIGINT")).collect();
    assert_eq!(said.len(), 1, "{lines:#?}");
    assert!(
        said[0].contains("without a checkpoint")
            && said[0].contains("resumes from checkpoint run/checkpoints/step_00000002"),
        "{}",
        said[0]
    );
}

/// Before the first checkpoint a second signal says a restart starts afresh.
#[test]
fn a_second_signal_before_any_checkpoint_says_a_restart_starts_afresh() {
    let ws = Workspace::new();
    let args = ["--config", "job.toml", "--set", "checkpoint.interval=2"];
    let run = Running::start(&ws, &args, &[("TRAINER_TEST_STALL_SAVE", "2")]);
    run.wait_for(|l| l.contains("checkpoint save of step 2 stalled"));
    run.signal("TERM");
    run.wait_delivered();
    let (code, lines) = run.signal_until_exit("TERM");
    assert_eq!(code, Some(143), "128 + SIGTERM");
    let said = lines.iter().find(|l| l.starts_with("stopped at once by a second SIGTERM")).expect("the line");
    assert!(said.contains("a restart starts from the beginning (no checkpoint in run/checkpoints yet)"), "{said}");
}

#[test]
fn sigkill_during_a_save_leaves_the_previous_checkpoint() {
    let ws = Workspace::new();
    let args = ["--config", "job.toml", "--set", "checkpoint.interval=5"];
    let mut run = Running::start(&ws, &args, &[("TRAINER_TEST_STALL_SAVE", "10")]);
    run.wait_for(|l| l.contains("checkpoint save of step 10 stalled"));
    run.child.kill().unwrap(); // SIGKILL
    let _ = run.finish();
    let ck = ws.path().join("run/checkpoints");
    assert_eq!(step_dirs(&ck), [".step_00000010.partial", "step_00000005"]);
    assert!(fs::read_dir(ck.join(".step_00000010.partial")).unwrap().count() >= 2, "data files were written");

    // The partial save is not picked up: the run continues from step 5 and cleans up.
    let r = ws.run(&["--config", "job.toml", "--set", "training.max_steps=12", "--set", "checkpoint.interval=5"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(stdout(&r).contains("resumed from run/checkpoints/step_00000005 at step 5"), "{}", stdout(&r));
    assert!(stderr(&r).contains("warning: removed") && stderr(&r).contains(".step_00000010.partial"), "{}", stderr(&r));
    assert_eq!(step_dirs(&ck), ["step_00000005", "step_00000010", "step_00000012"]);
}

#[test]
fn corrupt_checkpoints_are_skipped_or_refused() {
    let ws = Workspace::new();
    let args = ["--config", "job.toml", "--set", "checkpoint.interval=10", "--set", "training.max_steps=20"];
    assert!(ws.run(&args).status.success());
    let ck = ws.path().join("run/checkpoints");
    // The newest checkpoint loses its tail.
    let f = ck.join("step_00000020/optim_rank00000.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::File::options().write(true).open(&f).unwrap().set_len(len - 10).unwrap();

    // Resume = "auto" warns and takes step 10.
    let r = ws.run(&args);
    assert!(r.status.success(), "{}", stderr(&r));
    let err = stderr(&r);
    assert!(err.starts_with("warning: skipping run/checkpoints/step_00000020"), "{err}");
    assert!(err.contains("optim_rank00000.safetensors") && err.contains("truncated"), "{err}");
    assert!(stdout(&r).contains("resumed from run/checkpoints/step_00000010 at step 10"), "{}", stdout(&r));

    // Named explicitly, a corrupt checkpoint is an error naming the file.
    let model = ck.join("step_00000010/model.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&model, bytes).unwrap();
    let set = "checkpoint.resume=run/checkpoints/step_00000010";
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "logging.run_dir=other", "--set", set]),
        &["step_00000010/model.safetensors", "corrupt"],
    );
    assert_one_line_error(
        &ws.run(&["eval", "--config", "job.toml", "--checkpoint", "run/checkpoints/step_00000010"]),
        &["step_00000010/model.safetensors", "corrupt"],
    );
}

#[test]
fn resume_mismatches_are_one_line_errors() {
    let ws = Workspace::new();
    assert!(ws.run(&["--config", "job.toml", "--set", "training.max_steps=3"]).status.success());
    // Another model shape.
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "model.n_embd=64"]),
        &["run/checkpoints/step_00000003/manifest.json", "model.n_embd = 32 there, 64 here"],
    );
    // A fresh run into a directory that holds checkpoints.
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "checkpoint.resume=none"]),
        &["checkpoint.resume = \"none\"", "run/checkpoints"],
    );
    // A path that is no checkpoint.
    assert_one_line_error(
        &ws.run(&["--config", "job.toml", "--set", "checkpoint.resume=shards", "--set", "logging.run_dir=x"]),
        &["shards", "manifest.json"],
    );
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let ws = Workspace::new();
    // Two bad attempts: skipped, and the run still makes all its updates.
    let args = ["--config", "job.toml", "--set", "training.max_steps=10", "--set", "training.max_bad_steps=3"];
    let o = trainer_env(&ws, &args, &[("TRAINER_TEST_NAN_ATTEMPTS", "4-5")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let skipped: Vec<String> = stdout(&o).lines().filter(|l| l.contains("skipped=1")).map(String::from).collect();
    assert_eq!(skipped.len(), 2, "{}", stdout(&o));
    assert!(skipped[0].starts_with("step=4 train_loss=nan") && skipped[1].contains("bad_in_a_row=2"), "{skipped:?}");
    let steps: Vec<u64> = recorded_losses(&ws.path().join("run/metrics.jsonl")).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>(), "each update once, none lost");

    // A rate so large that the model breaks after one step: three bad steps stop
    // the run with a checkpoint of step 1, the last good one.
    let o = ws.run(&[
        "--config",
        "job.toml",
        "--set",
        "logging.run_dir=diverged",
        "--set",
        "optimizer.lr=1e30",
        "--set",
        "training.max_bad_steps=3",
    ]);
    assert_one_line_error(
        &o,
        &["diverged", "3 steps in a row", "step 1", "diverged/checkpoints/step_00000001", "optimizer.lr"],
    );
    assert_eq!(stdout(&o).lines().filter(|l| l.contains("skipped=1")).count(), 3);
    assert_eq!(step_dirs(&ws.path().join("diverged/checkpoints")), ["step_00000001"]);
}

fn trainer_env(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(ws.path())
        .output()
        .unwrap()
}
