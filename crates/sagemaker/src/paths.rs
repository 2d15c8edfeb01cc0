//! Where SageMaker puts the job's settings and data, and where it collects
//! what the job leaves behind. Every path derives from one root (/opt/ml, or
//! `SAGEMAKER_BASE_DIR`), so tests run the whole contract in a temp dir.

use std::path::{Path, PathBuf};

/// The variable SageMaker's training toolkit reads to relocate /opt/ml.
pub const BASE_DIR_ENV: &str = "SAGEMAKER_BASE_DIR";
pub const DEFAULT_BASE_DIR: &str = "/opt/ml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    base: PathBuf,
}

impl Paths {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Paths { base: base.into() }
    }

    /// The root named by `SAGEMAKER_BASE_DIR`, else /opt/ml.
    pub fn from_env() -> Self {
        match std::env::var_os(BASE_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(v) => Paths::new(v),
            None => Paths::new(DEFAULT_BASE_DIR),
        }
    }

    /// The job's paths when running inside a SageMaker training job, which is
    /// recognised by its settings directory, `input/config`.
    pub fn detect() -> Option<Self> {
        let p = Self::from_env();
        p.input_config_dir().is_dir().then_some(p)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn input_config_dir(&self) -> PathBuf {
        self.base.join("input/config")
    }

    pub fn hyperparameters_file(&self) -> PathBuf {
        self.input_config_dir().join("hyperparameters.json")
    }

    pub fn resource_config_file(&self) -> PathBuf {
        self.input_config_dir().join("resourceconfig.json")
    }

    pub fn input_data_config_file(&self) -> PathBuf {
        self.input_config_dir().join("inputdataconfig.json")
    }

    /// Present only when the job was given a checkpoint S3 URI.
    pub fn checkpoint_config_file(&self) -> PathBuf {
        self.input_config_dir().join("checkpointconfig.json")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.base.join("input/data")
    }

    pub fn channel_dir(&self, channel: &str) -> PathBuf {
        self.data_dir().join(channel)
    }

    /// Uploaded as model.tar.gz.
    pub fn model_dir(&self) -> PathBuf {
        self.base.join("model")
    }

    pub fn output_dir(&self) -> PathBuf {
        self.base.join("output")
    }

    /// Uploaded as output.tar.gz: metrics, plots.
    pub fn output_data_dir(&self) -> PathBuf {
        self.output_dir().join("data")
    }

    /// Its text becomes the job's FailureReason.
    pub fn failure_file(&self) -> PathBuf {
        self.output_dir().join("failure")
    }

    /// Synced with the checkpoint S3 URI when checkpointconfig.json does not
    /// name another local path.
    pub fn default_checkpoint_dir(&self) -> PathBuf {
        self.base.join("checkpoints")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_the_root() {
        let p = Paths::new("/x/ml");
        assert_eq!(p.hyperparameters_file(), Path::new("/x/ml/input/config/hyperparameters.json"));
        assert_eq!(p.channel_dir("train"), Path::new("/x/ml/input/data/train"));
        assert_eq!(p.model_dir(), Path::new("/x/ml/model"));
        assert_eq!(p.output_data_dir(), Path::new("/x/ml/output/data"));
        assert_eq!(p.failure_file(), Path::new("/x/ml/output/failure"));
        assert_eq!(p.default_checkpoint_dir(), Path::new("/x/ml/checkpoints"));
    }
}
