//! Reading `metrics.jsonl`: one JSON object per line with an integer "step"
//! and any of the keys below (a step record has train_loss, lr, grad_norm,
//! tok_per_s or img_per_s, on a GPU mfu and peak_mem_gb; an evaluation record
//! has val_loss and val_ppl, or for a classifier val_acc and val_acc5). Other keys are ignored, so records that later gain fields
//! still read. `null` stands for a non-finite value. A record with a non-zero
//! "skipped" is an update the numerical guard refused: the same step is tried
//! again, so it is counted, not plotted.
//!
//! A line that is not such a record is skipped and reported, not fatal: a run
//! killed in the middle of a write leaves a partial line, and a resumed run
//! appends after it; the rest of the file is still the run's history, and a
//! read-only report should show it. A file with no record at all is an error.
//!
//! The file is appended to by every run that uses the directory, so steps can
//! go back: a run resumed from an older checkpoint, or started again. The later
//! records win: when a step is not past the last one of its series, every
//! series drops its points from that step on.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::{Error, Result};

/// (step, value) in file order; the value is NaN where the file has `null`.
pub type Series = Vec<(u64, f64)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number in the file.
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMetrics {
    pub train_loss: Series,
    pub val_loss: Series,
    pub tok_per_s: Series,
    /// Images/s (image models, in place of tok_per_s).
    pub img_per_s: Series,
    /// A classifier's top-1 and top-5 validation accuracy (fractions).
    pub val_acc: Series,
    pub val_acc5: Series,
    pub lr: Series,
    pub grad_norm: Series,
    /// Model FLOPs utilization (a fraction), GPU runs only.
    pub mfu: Series,
    /// Peak device memory in GB, GPU runs only.
    pub peak_mem_gb: Series,
    /// Records read (lines with a step).
    pub records: usize,
    /// How many times the steps went back (resumed or restarted runs).
    pub restarts: usize,
    /// Updates refused by the numerical guard (records with "skipped").
    pub skipped_steps: usize,
    /// Lines that were not records, in file order; left out.
    pub malformed: Vec<Malformed>,
}

/// The keys plotted; any other key in a record is ignored.
const KEYS: [&str; 10] = [
    "train_loss",
    "val_loss",
    "tok_per_s",
    "img_per_s",
    "val_acc",
    "val_acc5",
    "lr",
    "grad_norm",
    "mfu",
    "peak_mem_gb",
];

impl RunMetrics {
    pub fn read(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).map_err(|err| {
            let path = path.display().to_string();
            if err.kind() == std::io::ErrorKind::NotFound { Error::NoMetrics(path) } else { Error::Io { path, err } }
        })?;
        Self::from_reader(BufReader::new(file), path)
    }

    /// Parses the text of a metrics file; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        Self::from_reader(text.as_bytes(), path)
    }

    /// Reads line by line: a long run's file need not fit in memory twice, and
    /// a line of bytes that are not UTF-8 (a torn write) is one bad line, not a
    /// bad file.
    pub fn from_reader(reader: impl BufRead, path: &Path) -> Result<Self> {
        let mut m = RunMetrics::default();
        for (i, bytes) in reader.split(b'\n').enumerate() {
            let bytes = bytes.map_err(|err| Error::Io { path: path.display().to_string(), err })?;
            let parsed = std::str::from_utf8(&bytes).map_err(|e| format!("not UTF-8 text ({e})"));
            // Blank lines carry nothing (a trailing newline, an editor's touch).
            if parsed.as_ref().is_ok_and(|line| line.trim().is_empty()) {
                continue;
            }
            match parsed.and_then(parse_line) {
                Ok(Record { skipped: true, .. }) => {
                    m.records += 1;
                    m.skipped_steps += 1;
                }
                Ok(Record { step, values, .. }) => m.push(step, &values),
                Err(reason) => m.malformed.push(Malformed { line: i + 1, reason }),
            }
        }
        if m.records == 0 {
            return Err(match m.malformed.first() {
                Some(s) => {
                    Error::NoRecords { path: path.display().to_string(), line: s.line, reason: s.reason.clone() }
                }
                None => Error::Empty(path.display().to_string()),
            });
        }
        Ok(m)
    }

    fn series_mut(&mut self, key: &str) -> Option<&mut Series> {
        match key {
            "train_loss" => Some(&mut self.train_loss),
            "val_loss" => Some(&mut self.val_loss),
            "tok_per_s" => Some(&mut self.tok_per_s),
            "img_per_s" => Some(&mut self.img_per_s),
            "val_acc" => Some(&mut self.val_acc),
            "val_acc5" => Some(&mut self.val_acc5),
            "lr" => Some(&mut self.lr),
            "grad_norm" => Some(&mut self.grad_norm),
            "mfu" => Some(&mut self.mfu),
            "peak_mem_gb" => Some(&mut self.peak_mem_gb),
            _ => None,
        }
    }

    fn all_series(&self) -> [&Series; 10] {
        [
            &self.train_loss,
            &self.val_loss,
            &self.tok_per_s,
            &self.img_per_s,
            &self.val_acc,
            &self.val_acc5,
            &self.lr,
            &self.grad_norm,
            &self.mfu,
            &self.peak_mem_gb,
        ]
    }

    fn all_series_mut(&mut self) -> [&mut Series; 10] {
        [
            &mut self.train_loss,
            &mut self.val_loss,
            &mut self.tok_per_s,
            &mut self.img_per_s,
            &mut self.val_acc,
            &mut self.val_acc5,
            &mut self.lr,
            &mut self.grad_norm,
            &mut self.mfu,
            &mut self.peak_mem_gb,
        ]
    }

    fn push(&mut self, step: u64, values: &[(&'static str, f64)]) {
        self.records += 1;
        let went_back = values
            .iter()
            .any(|(key, _)| self.series_mut(key).and_then(|s| s.last()).is_some_and(|&(last, _)| step <= last));
        if went_back {
            self.restarts += 1;
            for s in self.all_series_mut() {
                s.retain(|&(st, _)| st < step);
            }
        }
        for &(key, v) in values {
            if let Some(s) = self.series_mut(key) {
                s.push((step, v));
            }
        }
    }

    /// The largest step of any record kept.
    pub fn last_step(&self) -> Option<u64> {
        self.all_series().iter().filter_map(|s| s.last().map(|&(step, _)| step)).max()
    }

    /// Mean of the logged tokens/s over finite values, leaving out step 1 when
    /// later steps exist: it pays one-time costs (kernel compilation, lazy
    /// loading), as the trainer's own average leaves it out.
    pub fn mean_tok_per_s(&self) -> Option<f64> {
        mean_after_first(&self.tok_per_s)
    }

    /// [`RunMetrics::mean_tok_per_s`] of images/s.
    pub fn mean_img_per_s(&self) -> Option<f64> {
        mean_after_first(&self.img_per_s)
    }
}

fn mean_after_first(series: &Series) -> Option<f64> {
    let later = series.iter().any(|&(step, v)| step > 1 && v.is_finite());
    let vals: Vec<f64> =
        series.iter().filter(|&&(step, v)| v.is_finite() && (step > 1 || !later)).map(|&(_, v)| v).collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// The last value of a series (NaN if the file had `null` there).
pub fn last_value(s: &Series) -> Option<f64> {
    s.last().map(|&(_, v)| v)
}

struct Record {
    step: u64,
    values: Vec<(&'static str, f64)>,
    skipped: bool,
}

fn parse_line(line: &str) -> std::result::Result<Record, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        // serde_json appends " at line 1 column N"; within one line only the column matters.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or_default().to_string();
        format!("not valid JSON at column {}: {msg}", e.column())
    })?;
    let obj = value.as_object().ok_or_else(|| format!("not a JSON object: {}", shorten(line)))?;
    let step = match obj.get("step") {
        None => return Err("no \"step\" key".into()),
        Some(s) => s.as_u64().ok_or_else(|| format!("\"step\" is {s}, expected an integer >= 0"))?,
    };
    let mut values = Vec::new();
    for key in KEYS {
        match obj.get(key) {
            None => {}
            Some(serde_json::Value::Null) => values.push((key, f64::NAN)),
            Some(serde_json::Value::Number(n)) => values.push((key, n.as_f64().unwrap_or(f64::NAN))),
            Some(other) => {
                return Err(format!("\"{key}\" is {}, expected a number or null", shorten(&other.to_string())));
            }
        }
    }
    let skipped = match obj.get("skipped") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(other) => return Err(format!("\"skipped\" is {}, expected a number", shorten(&other.to_string()))),
    };
    Ok(Record { step, values, skipped })
}

fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<RunMetrics> {
        RunMetrics::parse(text, Path::new("run/metrics.jsonl"))
    }

    #[test]
    fn reads_step_and_eval_records() {
        let m = parse(concat!(
            "{\"step\":0,\"val_loss\":10.9,\"val_ppl\":54000.0}\n",
            "{\"step\":1,\"train_loss\":10.8,\"lr\":1e-3,\"grad_norm\":2.5,\"tok_per_s\":100}\n",
            "{\"step\":2,\"train_loss\":9.5,\"lr\":2e-3,\"grad_norm\":1.5,\"tok_per_s\":300,\"mfu\":0.4}\n",
            "{\"step\":3,\"train_loss\":null,\"lr\":3e-3,\"grad_norm\":null,\"tok_per_s\":500}\n",
            "{\"step\":3,\"val_loss\":8.0,\"val_ppl\":2981.0}\n",
        ))
        .unwrap();
        assert_eq!(m.records, 5);
        assert_eq!(m.restarts, 0);
        assert!(m.malformed.is_empty());
        assert_eq!(m.val_loss, vec![(0, 10.9), (3, 8.0)]);
        assert_eq!(m.train_loss.len(), 3);
        assert!(last_value(&m.train_loss).unwrap().is_nan());
        assert_eq!(m.lr[2], (3, 3e-3));
        assert_eq!(m.last_step(), Some(3));
        // Step 1 is left out of the mean.
        assert_eq!(m.mean_tok_per_s(), Some(400.0));
    }

    #[test]
    fn mean_uses_step_one_when_it_is_all_there_is() {
        let m = parse("{\"step\":1,\"tok_per_s\":100}\n").unwrap();
        assert_eq!(m.mean_tok_per_s(), Some(100.0));
        let m = parse("{\"step\":0,\"val_loss\":3.0}\n").unwrap();
        assert_eq!(m.mean_tok_per_s(), None);
    }

    #[test]
    fn malformed_lines_are_skipped_with_their_line_number() {
        let m = parse(concat!(
            "{\"step\":1,\"train_loss\":5.0}\n",
            "{\"step\":2,\"train_lo\n",
            "\n",
            "[1,2]\n",
            "{\"train_loss\":4.0}\n",
            "{\"step\":-3,\"train_loss\":4.0}\n",
            "{\"step\":3,\"train_loss\":\"4.0\"}\n",
            "{\"step\":4,\"train_loss\":3.5}\n",
        ))
        .unwrap();
        assert_eq!(m.train_loss, vec![(1, 5.0), (4, 3.5)]);
        let lines: Vec<usize> = m.malformed.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![2, 4, 5, 6, 7]);
        assert!(m.malformed[0].reason.starts_with("not valid JSON at column"), "{:?}", m.malformed[0]);
        assert!(!m.malformed[0].reason.contains("line 1"), "{:?}", m.malformed[0]);
        assert!(m.malformed[1].reason.contains("not a JSON object"));
        assert!(m.malformed[2].reason.contains("no \"step\""));
        assert!(m.malformed[3].reason.contains("\"step\" is -3"));
        assert!(m.malformed[4].reason.contains("\"train_loss\" is \"4.0\""));
    }

    #[test]
    fn bytes_that_are_not_utf8_spoil_only_their_line() {
        let bytes = b"{\"step\":1,\"train_loss\":5.0}\r\n{\"step\":2,\xff\xfe}\n{\"step\":3,\"train_loss\":4.0}";
        let m = RunMetrics::from_reader(&bytes[..], Path::new("m.jsonl")).unwrap();
        assert_eq!(m.train_loss, vec![(1, 5.0), (3, 4.0)]);
        assert_eq!(m.malformed.len(), 1);
        assert_eq!(m.malformed[0].line, 2);
        assert!(m.malformed[0].reason.starts_with("not UTF-8"), "{:?}", m.malformed);
    }

    #[test]
    fn a_file_without_records_is_an_error() {
        let e = parse("").unwrap_err().to_string();
        assert_eq!(e, "run/metrics.jsonl is empty: no step has been logged yet");
        let e = parse("\n  \n").unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = parse("hello\n{\"step\":\"x\"}\n").unwrap_err().to_string();
        assert!(e.starts_with("run/metrics.jsonl:1: not valid JSON at column 1"), "{e}");
        assert!(e.ends_with("no line of the file is a metrics record"), "{e}");
    }

    #[test]
    fn steps_refused_by_the_guard_are_counted_not_plotted() {
        let m = parse(concat!(
            "{\"step\":1,\"train_loss\":5.0,\"lr\":1e-3,\"grad_norm\":1.0,\"tok_per_s\":9,\"mfu\":0.4,\"peak_mem_gb\":3.5}\n",
            "{\"step\":2,\"train_loss\":null,\"grad_norm\":null,\"skipped\":1,\"bad_in_a_row\":1}\n",
            "{\"step\":2,\"train_loss\":4.0,\"lr\":1e-3,\"grad_norm\":1.0,\"tok_per_s\":9,\"skipped\":0}\n",
            "{\"step\":3,\"train_loss\":3.0,\"skipped\":true}\n",
        ))
        .unwrap();
        assert_eq!(m.skipped_steps, 1);
        assert_eq!(m.restarts, 0, "a retried step is not a restart");
        assert_eq!(m.records, 3);
        assert_eq!(m.train_loss, vec![(1, 5.0), (2, 4.0)]);
        assert_eq!(m.mfu, vec![(1, 0.4)]);
        assert_eq!(m.peak_mem_gb, vec![(1, 3.5)]);
        assert_eq!(m.malformed.len(), 1);
        assert!(m.malformed[0].reason.contains("\"skipped\" is true"), "{:?}", m.malformed);
    }

    #[test]
    fn later_records_replace_earlier_ones_after_a_resume() {
        // Ran to step 4, resumed from a checkpoint at step 2, then ran to 5.
        let m = parse(concat!(
            "{\"step\":0,\"val_loss\":10.0}\n",
            "{\"step\":1,\"train_loss\":9.0}\n",
            "{\"step\":2,\"train_loss\":8.0}\n",
            "{\"step\":2,\"val_loss\":8.5}\n",
            "{\"step\":3,\"train_loss\":7.0}\n",
            "{\"step\":4,\"train_loss\":6.0}\n",
            "{\"step\":3,\"train_loss\":7.5}\n",
            "{\"step\":4,\"train_loss\":6.5}\n",
            "{\"step\":5,\"train_loss\":5.5}\n",
        ))
        .unwrap();
        assert_eq!(m.restarts, 1);
        assert_eq!(m.train_loss, vec![(1, 9.0), (2, 8.0), (3, 7.5), (4, 6.5), (5, 5.5)]);
        assert_eq!(m.val_loss, vec![(0, 10.0), (2, 8.5)]);

        // A new run from scratch in the same directory replaces everything.
        let m = parse(concat!(
            "{\"step\":0,\"val_loss\":10.0}\n",
            "{\"step\":1,\"train_loss\":9.0}\n",
            "{\"step\":0,\"val_loss\":11.0}\n",
        ))
        .unwrap();
        assert_eq!(m.restarts, 1);
        assert!(m.train_loss.is_empty());
        assert_eq!(m.val_loss, vec![(0, 11.0)]);
    }
}
