//! One metrics record per logged step: a `key=value` line on stdout (what
//! SageMaker's metric regexes and people read) and the same record as a JSON
//! line in the run directory. Non-finite values are never printed as numbers:
//! `nan`/`inf` on stdout, `null` in JSON.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::progress::Console;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(u64),
    /// A float shown with this many decimals.
    Fixed(f64, usize),
    /// A float shown in scientific notation (learning rates).
    Sci(f64),
}

impl Value {
    fn text(&self) -> String {
        match *self {
            Value::Int(v) => v.to_string(),
            Value::Fixed(v, _) | Value::Sci(v) if !v.is_finite() => {
                if v.is_nan() {
                    "nan".into()
                } else if v > 0.0 {
                    "inf".into()
                } else {
                    "-inf".into()
                }
            }
            Value::Fixed(v, digits) => format!("{v:.digits$}"),
            Value::Sci(v) => format!("{v:.3e}"),
        }
    }

    fn json(&self) -> serde_json::Value {
        match *self {
            Value::Int(v) => v.into(),
            Value::Fixed(v, _) | Value::Sci(v) => {
                serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into)
            }
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    path: PathBuf,
    /// None on ranks other than 0, which record nothing.
    file: Option<BufWriter<File>>,
    console: Console,
}

impl Metrics {
    /// Appends to `run_dir/metrics.jsonl`, creating the directory.
    pub fn open(run_dir: &Path) -> Result<Self> {
        fs::create_dir_all(run_dir).map_err(|e| Error::Io { path: run_dir.display().to_string(), err: e })?;
        let path = run_dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::Io { path: path.display().to_string(), err: e })?;
        Ok(Metrics { path, file: Some(BufWriter::new(file)), console: Console::plain() })
    }

    /// Records nothing and prints nothing (ranks other than 0).
    pub fn disabled() -> Self {
        Metrics { path: PathBuf::new(), file: None, console: Console::silent() }
    }

    /// Prints through `console` (e.g. above a progress bar) from now on.
    pub fn set_console(&mut self, console: Console) {
        self.console = console;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prints the record and appends it, both flushed at once.
    pub fn log(&mut self, record: &[(&str, Value)]) -> Result<()> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let line: Vec<String> = record.iter().map(|(k, v)| format!("{k}={}", v.text())).collect();
        self.console.line(&line.join(" "));
        let obj: serde_json::Map<String, serde_json::Value> =
            record.iter().map(|(k, v)| (k.to_string(), v.json())).collect();
        let io = |e| Error::Io { path: self.path.display().to_string(), err: e };
        serde_json::to_writer(&mut *file, &obj).map_err(|e| io(e.into()))?;
        file.write_all(b"\n").map_err(io)?;
        file.flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_not_numbers() {
        assert_eq!(Value::Fixed(f64::NAN, 4).text(), "nan");
        assert_eq!(Value::Sci(f64::INFINITY).text(), "inf");
        assert_eq!(Value::Fixed(1.23456, 2).text(), "1.23");
        assert_eq!(Value::Sci(6e-4).text(), "6.000e-4");
        assert_eq!(Value::Fixed(f64::NAN, 4).json(), serde_json::Value::Null);
    }

    #[test]
    fn records_append_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        for step in 1..=2 {
            let mut m = Metrics::open(dir.path()).unwrap();
            m.log(&[("step", Value::Int(step)), ("train_loss", Value::Fixed(f64::NAN, 4))]).unwrap();
        }
        let text = fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text, "{\"step\":1,\"train_loss\":null}\n{\"step\":2,\"train_loss\":null}\n");
    }
}
