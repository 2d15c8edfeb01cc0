//! The library's side of stopping, on a synthetic shard: a stop requested
//! before any step still leaves a checkpoint in the run's own checkpoint
//! directory when the state came from elsewhere, and writes nothing for a
//! fresh run that made no progress.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;

use trainer_train::{Config, Outcome, StopSignal, train};

fn config(dir: &Path, run: &str, extra: &[String]) -> Config {
    let tokens: Vec<u32> = (0..20_000u32).map(|i| (i * 7919) % 500).collect();
    let shard = dir.join("train_000000.bin");
    if !shard.exists() {
        trainer_data::write_shard(&shard, &tokens).unwrap();
    }
    let src = format!(
        "[model]\npreset = \"test\"\nvocab_size = 500\nblock_size = 16\n[data]\ntrain = \"{}/train_*.bin\"\n\
         [training]\nmicro_batch_size = 2\nseq_len = 16\nmax_steps = 6\n[logging]\nrun_dir = \"{}/{run}\"\n\
         [checkpoint]\ninterval = 3\n",
        dir.display(),
        dir.display()
    );
    Config::from_toml(&src, "t.toml", extra).unwrap()
}

#[test]
fn a_stop_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let a = train(&config(tmp.path(), "a", &[]), &StopSignal::new()).unwrap();
    assert_eq!(a.outcome, Outcome::Finished);
    assert!(tmp.path().join("a/checkpoints/step_00000003").is_dir());

    let stop = StopSignal::new();
    stop.request(15);
    // Fresh, nothing done: nothing to save.
    let fresh = train(&config(tmp.path(), "fresh", &[]), &stop).unwrap();
    assert_eq!((fresh.outcome, fresh.steps, fresh.checkpoint), (Outcome::Stopped { signal: 15 }, 0, None));
    assert!(!tmp.path().join("fresh/checkpoints").exists());

    // Resumed from another run's checkpoint: saved again into this run's directory.
    let from = format!("checkpoint.resume=\"{}/a/checkpoints/step_00000003\"", tmp.path().display());
    let b = train(&config(tmp.path(), "b", &[from]), &stop).unwrap();
    assert_eq!((b.outcome, b.steps), (Outcome::Stopped { signal: 15 }, 3));
    assert_eq!(b.checkpoint, Some(tmp.path().join("b/checkpoints/step_00000003")));
    assert!(tmp.path().join("b/checkpoints/step_00000003/manifest.json").is_file());

    // Resumed from its own newest checkpoint: that one already holds the state.
    let again = train(&config(tmp.path(), "b", &[]), &stop).unwrap();
    assert_eq!(again.checkpoint, Some(tmp.path().join("b/checkpoints/step_00000003")));
}
