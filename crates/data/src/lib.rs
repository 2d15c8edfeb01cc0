//! Training data: token shards in llm.c's format, the batch loader that gives
//! each data-parallel rank its own disjoint windows, tokenizers, and `prepare`,
//! which turns text into shards.

mod batch;
mod loader;
mod prepare;
mod shard;
mod tokenizer;

use std::path::{Path, PathBuf};

pub use batch::{Batch, Loader};
pub use loader::{BatchLoader, LoaderPosition};
pub use prepare::{PrepareOptions, PrepareReport, prepare};
pub use shard::{HEADER_BYTES, MAGIC, Shard, write_shard};
pub use tokenizer::Tokenizer;

/// Errors of the data layer; each names the file (and line or token) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },

    #[error("shard {path}: {msg}")]
    Shard { path: String, msg: String },

    #[error("{path}{}: {msg}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Input { path: String, line: Option<usize>, msg: String },

    #[error("tokenizer {name}: {msg}")]
    Tokenizer { name: String, msg: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &Path, err: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), err }
}

/// The files matching a glob pattern, sorted; an error if there are none.
pub fn find_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let paths = glob::glob(pattern).map_err(|e| Error::Invalid(format!("bad file pattern '{pattern}': {e}")))?;
    let mut files = Vec::new();
    for p in paths {
        let p = p.map_err(|e| Error::Invalid(format!("pattern '{pattern}': {e}")))?;
        if p.is_file() {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!("no files match '{pattern}'")));
    }
    files.sort();
    Ok(files)
}
