//! `model.init_from`: fine-tuning starts from a Hugging Face GPT-2 directory
//! (tests/data/hf_gpt2_tiny, made by scripts/parity/make_hf_golden.py).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use trainer_core::{DType, Device};
use trainer_data::{BatchLoader, Loader, Shard, write_shard};
use trainer_train::{Config, StopSignal, evaluate, train};

fn hf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/hf_gpt2_tiny")
}

fn config(dir: &Path, model: &str) -> Result<Config, String> {
    config_in(dir, model, "run")
}

fn config_in(dir: &Path, model: &str, run: &str) -> Result<Config, String> {
    let src = format!(
        r#"
[model]
{model}
[data]
train = "{d}/train_*.bin"
val = "{d}/val_*.bin"
[training]
micro_batch_size = 2
seq_len = 16
max_steps = 2
[eval]
batches = 3
[logging]
run_dir = "{d}/{run}"
"#,
        d = dir.display()
    );
    Config::from_toml(&src, "t.toml", &[]).map_err(|e| e.to_string())
}

fn init_from(extra: &str) -> String {
    format!("init_from = \"{}\"\n{extra}", hf_dir().display())
}

/// Shards of ids below the golden model's vocabulary (301).
fn shards(dir: &Path) {
    let tokens = |seed: u32, n: u32| (0..n).map(|i| (i * 7 + seed * 13 + i * i) % 301).collect::<Vec<u32>>();
    write_shard(&dir.join("train_000000.bin"), &tokens(1, 4000)).unwrap();
    write_shard(&dir.join("val_000000.bin"), &tokens(2, 1000)).unwrap();
}

#[test]
fn training_starts_from_the_imported_weights() {
    let dir = tempfile::tempdir().unwrap();
    shards(dir.path());
    let cfg = config(dir.path(), &init_from("")).unwrap();
    assert_eq!(cfg.model_desc().unwrap().config["vocab_size"], 301);

    // The step-0 validation loss is the imported model's own.
    let model = trainer_models::from_weights(&hf_dir(), DType::F32, &Device::Cpu).unwrap();
    let shard = Shard::open(&dir.path().join("val_000000.bin")).unwrap();
    let mut loader = BatchLoader::new(vec![shard], 2, 16, cfg.training.seed, false, 0, 1).unwrap();
    let mut acts = model.new_acts(&loader.new_batch()).unwrap();
    let want = evaluate(model.as_ref(), &mut acts, &mut loader, 3).unwrap().loss;
    let summary = train(&cfg, &StopSignal::new()).unwrap();
    let got = summary.first_val_loss.unwrap();
    assert!((got - want).abs() <= 1e-12, "first val loss {got} vs the imported model's {want}");

    // A random initialization of the same shape starts elsewhere.
    let shape = "n_layer = 2\nn_head = 4\nn_embd = 32\nvocab_size = 301\nblock_size = 40";
    let random = train(&config_in(dir.path(), shape, "random").unwrap(), &StopSignal::new()).unwrap();
    assert!((random.first_val_loss.unwrap() - want).abs() > 1e-3);
}

#[test]
fn init_from_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // Keys that repeat the directory's shape are fine.
    config(dir.path(), &init_from("n_layer = 2\nblock_size = 40")).unwrap();
    let cases: [(String, &[&str]); 5] = [
        (init_from("n_layer = 3"), &["model.n_layer = 3 conflicts with n_layer = 2", "config.json"]),
        (init_from("block_size = 64"), &["model.block_size = 64 conflicts with n_positions = 40"]),
        (init_from("preset = \"test\""), &["model.preset", "model.init_from"]),
        ("init_from = \"/nonexistent/hf\"".into(), &["model.init_from = \"/nonexistent/hf\"", "config.json"]),
        ("init_from = \"\"".into(), &["model.init_from is empty"]),
    ];
    for (model, needles) in cases {
        let e = config(dir.path(), &model).unwrap_err();
        assert!(!e.contains('\n'), "one line: {e}");
        for n in needles {
            assert!(e.contains(n), "{model:?}: {e:?} lacks {n:?}");
        }
    }
}
