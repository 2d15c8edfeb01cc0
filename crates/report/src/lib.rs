//! `trainer report`: reads a run directory's `metrics.jsonl` (written by
//! `trainer_train::metrics`) and draws loss, throughput, learning rate and
//! gradient norm against the step into a PNG or SVG image.
//!
//! A crate of its own so that the training library never compiles the plotting
//! stack, and so that reading the file depends only on its format, not on the
//! training loop.

mod metrics;
mod plot;

use std::path::{Path, PathBuf};

pub use metrics::{Malformed, RunMetrics, Series, last_value};
pub use plot::{ImageFormat, render};

/// The file a training run appends its records to, inside its run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The image written when no output is given, inside the run directory.
pub const DEFAULT_OUTPUT: &str = "report.png";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run directory {0} does not exist")]
    NoRunDir(String),
    #[error("{0} is not a directory: give the run directory (logging.run_dir) that holds {METRICS_FILE}")]
    NotADir(String),
    #[error("{0} not found: a training run writes it into its run directory (logging.run_dir)")]
    NoMetrics(String),
    #[error("{0} is empty: no step has been logged yet")]
    Empty(String),
    #[error("{path}:{line}: {reason}; no line of the file is a metrics record")]
    NoRecords { path: String, line: usize, reason: String },
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("output {path}: {what}; the file name must end in .png or .svg")]
    Extension { path: String, what: String },
    #[error("drawing {path}: {msg}")]
    Draw { path: String, msg: String },
    #[error("the embedded font could not be loaded")]
    Font,
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `report` read and where it drew it.
#[derive(Debug)]
pub struct Report {
    pub output: PathBuf,
    pub format: ImageFormat,
    pub metrics: RunMetrics,
}

/// Draws `run_dir/metrics.jsonl` into `output` (default `run_dir/report.png`),
/// the image type chosen by the file's extension.
pub fn report(run_dir: &Path, output: Option<&Path>) -> Result<Report> {
    let output = output.map_or_else(|| run_dir.join(DEFAULT_OUTPUT), Path::to_path_buf);
    // Checked first: a typo in the output name should not wait for a large file to be read.
    let format = ImageFormat::from_path(&output)?;
    if !run_dir.exists() {
        return Err(Error::NoRunDir(run_dir.display().to_string()));
    }
    if !run_dir.is_dir() {
        return Err(Error::NotADir(run_dir.display().to_string()));
    }
    let metrics = RunMetrics::read(&run_dir.join(METRICS_FILE))?;
    render(&metrics, &output, format)?;
    Ok(Report { output, format, metrics })
}
