//! Helpers shared by the end-to-end tests of the `trainer` binary (each test
//! file is its own crate and uses a subset of them).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Tokenizes the first `chars` characters of the KJV corpus into `dir/shards`
/// (train and val shards, `val_tokens` of them for validation) with `trainer
/// prepare`, outside any SageMaker job.
pub fn prepare_kjv_shards(dir: &Path, chars: usize, val_tokens: usize) {
    let text = fs::read_to_string(repo_root().join("data/kjv/kjv.txt")).unwrap();
    let cut = text.char_indices().nth(chars).map_or(text.len(), |(i, _)| i);
    fs::write(dir.join("corpus.txt"), &text[..cut]).unwrap();
    let val = val_tokens.to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["prepare", "--input", "corpus.txt", "--output", "shards", "--val-tokens", &val])
        .current_dir(dir)
        .env_remove("SAGEMAKER_BASE_DIR")
        .output()
        .unwrap();
    assert!(o.status.success(), "prepare failed: {}", stderr(&o));
}

/// Whether mpirun can be used; panics when it is required but missing.
pub fn mpi_available() -> bool {
    let ok = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("TRAINER_REQUIRE_MPI").is_ok_and(|v| v == "1") {
            panic!("mpirun was not found but TRAINER_REQUIRE_MPI=1: apt-get install openmpi-bin libopenmpi-dev");
        }
        eprintln!("skipping: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
    }
    ok
}
