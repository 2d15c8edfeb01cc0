//! What a job leaves behind, each where SageMaker collects it: the final
//! model in `model/` (uploaded as model.tar.gz), metrics and plots in
//! `output/data/` (output.tar.gz), checkpoints in `checkpoints/` or the
//! LocalPath of checkpointconfig.json (synced with the checkpoint S3 URI
//! while the job runs), and on failure a short reason in `output/failure`
//! (it becomes the job's FailureReason).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::paths::Paths;
use crate::{Error, Result, io_err};

/// SageMaker shows at most this many bytes of the failure reason.
pub const FAILURE_LIMIT: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outputs {
    pub model_dir: PathBuf,
    /// The run directory: metrics.jsonl and plots.
    pub output_data_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
    pub failure_file: PathBuf,
}

#[derive(Debug, Deserialize)]
struct CheckpointConfig {
    #[serde(rename = "LocalPath", default)]
    local_path: Option<String>,
}

impl Outputs {
    /// The output locations of the job under `paths`; checkpointconfig.json's
    /// LocalPath, when given, is taken as is (SageMaker writes an absolute path).
    pub fn locate(paths: &Paths) -> Result<Self> {
        let file = paths.checkpoint_config_file();
        let checkpoint_dir = match fs::read_to_string(&file) {
            Ok(text) => {
                let c: CheckpointConfig = serde_json::from_str(&text).map_err(|e| Error::Settings {
                    file: file.display().to_string(),
                    msg: format!("expected {{\"LocalPath\": ..., \"S3Path\": ...}}: {e}"),
                })?;
                c.local_path
                    .filter(|p| !p.trim().is_empty())
                    .map_or_else(|| paths.default_checkpoint_dir(), PathBuf::from)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => paths.default_checkpoint_dir(),
            Err(e) => return Err(io_err(&file)(e)),
        };
        Ok(Outputs {
            model_dir: paths.model_dir(),
            output_data_dir: paths.output_data_dir(),
            checkpoint_dir,
            failure_file: paths.failure_file(),
        })
    }

    /// Creates the output directories (SageMaker creates them too; a local
    /// test tree may not have them).
    pub fn create_dirs(&self) -> Result<()> {
        for d in [&self.model_dir, &self.output_data_dir, &self.checkpoint_dir] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(())
    }

    /// Removes a failure file left by an earlier run in the same tree, so the
    /// first error of this run is the one reported. Only the process that
    /// starts the job calls this, before any rank can fail.
    pub fn clear_stale_failure(&self) -> Result<()> {
        match fs::remove_file(&self.failure_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&self.failure_file)(e)),
            _ => Ok(()),
        }
    }

    /// Writes `files` (name, contents) into the model directory, each under
    /// a temporary name then renamed: files beside the exported model.
    /// Called once, by rank 0, after the model itself is exported there.
    pub fn add_to_model(&self, files: &[(&str, &[u8])]) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(&self.model_dir).map_err(io_err(&self.model_dir))?;
        let mut written = Vec::new();
        for (name, bytes) in files {
            let dest = self.model_dir.join(name);
            let tmp = self.model_dir.join(format!(".{name}.partial"));
            fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            written.push(dest);
        }
        Ok(written)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes the reason (at most [`FAILURE_LIMIT`] bytes of UTF-8) to the failure
/// file unless one is there already: the first failure of a job is usually
/// the cause, later ones its consequences. Returns whether it wrote.
pub fn write_failure(path: &Path, reason: &str) -> std::io::Result<bool> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut f = match fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    f.write_all(truncate_utf8(reason.trim(), FAILURE_LIMIT).as_bytes())?;
    f.sync_all()?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("abc", 5), "abc");
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        let long = "ü".repeat(1000); // 2000 bytes
        let t = truncate_utf8(&long, FAILURE_LIMIT);
        assert_eq!(t.len(), 1024);
        assert!(t.chars().all(|c| c == 'ü'));
        let odd = format!("a{long}");
        assert_eq!(truncate_utf8(&odd, FAILURE_LIMIT).len(), 1023);
    }

    #[test]
    fn failure_file_first_writer_wins_and_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("output/failure");
        assert!(write_failure(&f, &format!("first {}", "€".repeat(600))).unwrap());
        assert!(!write_failure(&f, "second").unwrap());
        let text = fs::read_to_string(&f).unwrap();
        assert!(text.starts_with("first ") && text.len() <= FAILURE_LIMIT, "{}", text.len());
    }

    #[test]
    fn checkpoint_dir_from_checkpointconfig() {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path());
        assert_eq!(Outputs::locate(&p).unwrap().checkpoint_dir, d.path().join("checkpoints"));
        fs::create_dir_all(p.input_config_dir()).unwrap();
        let local = d.path().join("ckpt-local");
        let text = format!(r#"{{"LocalPath": "{}", "S3Path": "s3://b/x"}}"#, local.display());
        fs::write(p.checkpoint_config_file(), text).unwrap();
        let o = Outputs::locate(&p).unwrap();
        assert_eq!(o.checkpoint_dir, local);
        o.create_dirs().unwrap();
        assert!(local.is_dir() && o.model_dir.is_dir() && o.output_data_dir.is_dir());
        fs::write(p.checkpoint_config_file(), r#"{"S3Path": "s3://b/x"}"#).unwrap();
        assert_eq!(Outputs::locate(&p).unwrap().checkpoint_dir, d.path().join("checkpoints"));
        fs::write(p.checkpoint_config_file(), "nope").unwrap();
        assert!(Outputs::locate(&p).unwrap_err().to_string().contains("checkpointconfig.json"));
    }

    #[test]
    fn files_are_added_to_the_model_dir() {
        let d = tempfile::tempdir().unwrap();
        let o = Outputs::locate(&Paths::new(d.path())).unwrap();
        let written = o.add_to_model(&[("trainer.toml", b"[model]\n"), ("x.txt", b"x")]).unwrap();
        assert_eq!(written, vec![o.model_dir.join("trainer.toml"), o.model_dir.join("x.txt")]);
        assert_eq!(fs::read(o.model_dir.join("trainer.toml")).unwrap(), b"[model]\n");
        let names: Vec<_> = fs::read_dir(&o.model_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn stale_failure_is_cleared() {
        let d = tempfile::tempdir().unwrap();
        let o = Outputs::locate(&Paths::new(d.path())).unwrap();
        o.clear_stale_failure().unwrap();
        write_failure(&o.failure_file, "old").unwrap();
        o.clear_stale_failure().unwrap();
        assert!(!o.failure_file.exists());
    }
}
