//! Training data: token shards in llm.c's format, the batch loader that gives
//! each data-parallel rank its own disjoint windows, tokenizers, and `prepare`,
//! which turns text into shards.

mod batch;
mod image_folder;
mod images;
mod loader;
mod prefetch;
mod prepare;
mod shard;
mod tokenizer;

use std::path::{Path, PathBuf};

pub use batch::{Batch, Loader};
pub use image_folder::{
    FolderReport, IMAGE_EXTENSIONS, LabelledFiles, decode_image, list_image_folder, prepare_image_folders,
};
pub use images::{
    CLASS_NAMES_FILE, IdxReport, ImageLoader, ImageShape, ImageShard, Transform, prepare_idx, prepare_idx_dataset,
    read_class_names, read_idx, write_image_shard,
};
pub use loader::{BatchLoader, LoaderPosition};
pub use prefetch::{Prefetcher, SendLoader};
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

/// The files matching a glob pattern, sorted; an error if there are none,
/// and an error naming a match that is not a readable file (a directory, a
/// dangling symbolic link, a file without read permission): training on the
/// rest without a word would silently drop data.
pub fn find_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let paths = glob::glob(pattern).map_err(|e| Error::Invalid(format!("bad file pattern '{pattern}': {e}")))?;
    let mut files = Vec::new();
    for p in paths {
        let p = p.map_err(|e| Error::Invalid(format!("pattern '{pattern}': {e}")))?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {}
            Ok(m) if m.is_dir() => {
                return Err(Error::Invalid(format!(
                    "'{pattern}' matches the directory {}: the pattern must match only data files",
                    p.display()
                )));
            }
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "'{pattern}' matches {}, which is not a regular file",
                    p.display()
                )));
            }
            Err(e) => {
                let what = if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    "a symbolic link whose target cannot be opened"
                } else {
                    "a file that cannot be opened"
                };
                return Err(Error::Invalid(format!("'{pattern}' matches {}, {what}: {e}", p.display())));
            }
        }
        files.push(p);
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!("no files match '{pattern}'")));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A match that cannot be read is an error naming it, never silently left out.
    #[test]
    fn a_match_that_is_not_a_readable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_shard(&d.join("a.bin"), &[1, 2, 3]).unwrap();
        let pattern = format!("{}/*.bin", d.display());
        assert_eq!(find_files(&pattern).unwrap(), vec![d.join("a.bin")]);
        std::os::unix::fs::symlink("/nonexistent/x.bin", d.join("zz.bin")).unwrap();
        let e = find_files(&pattern).unwrap_err().to_string();
        assert!(e.contains("zz.bin") && e.contains("symbolic link") && !e.contains("no files match"), "{e}");
        // Alone it is named too (not "no files match").
        let e = find_files(&format!("{}/zz.bin", d.display())).unwrap_err().to_string();
        assert!(e.contains("zz.bin") && e.contains("symbolic link"), "{e}");
        std::fs::remove_file(d.join("zz.bin")).unwrap();
        std::fs::create_dir(d.join("sub.bin")).unwrap();
        let e = find_files(&pattern).unwrap_err().to_string();
        assert!(e.contains("sub.bin") && e.contains("directory"), "{e}");
    }
}
