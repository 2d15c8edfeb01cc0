//! The Amazon SageMaker bring-your-own training-container contract.
//!
//! SageMaker hands a job to the container through files under /opt/ml
//! (`SAGEMAKER_BASE_DIR` replaces that root, as SageMaker's own training
//! toolkit allows, so everything here runs against a fake tree in tests):
//!
//! - `input/config/hyperparameters.json`: a flat map of strings, decoded into
//!   `section.key=value` config overrides ([`hyperparams`]);
//! - `input/config/resourceconfig.json`: this host and the job's hosts
//!   ([`resource`]);
//! - `input/config/inputdataconfig.json` and `input/data/<channel>/`: the
//!   training and validation shards ([`channels`]);
//! - `model/`, `output/data/`, `output/failure`, `checkpoints/`: what the
//!   job leaves behind ([`outputs`]).
//!
//! [`job`] combines them into a config file plus overrides for
//! `trainer_train::Config::load`; [`launch`] plans the processes (one per GPU
//! on every host) and builds the `mpirun` command; [`cluster`] runs the
//! multi-host protocol (sshd, waiting for peers, the end-of-job signal to the
//! workers). This crate knows nothing of models or training: the `trainer`
//! binary glues it to the training loop.

pub mod channels;
pub mod cluster;
pub mod hyperparams;
pub mod job;
pub mod launch;
pub mod outputs;
pub mod paths;
pub mod resource;

pub use job::{Job, JobOptions};
pub use launch::{LaunchPlan, Mode, Role};
pub use outputs::{Outputs, write_failure};
pub use paths::Paths;
pub use resource::ResourceConfig;

/// Errors of the SageMaker layer; each names the file, key, channel or host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },

    /// A SageMaker settings file that cannot be used.
    #[error("{file}: {msg}")]
    Settings { file: String, msg: String },

    #[error("hyperparameter {key} = {value:?}: {msg}")]
    Hyperparameter { key: String, value: String, msg: String },

    #[error("channel {channel} ({dir}): {msg}")]
    Channel { channel: String, dir: String, msg: String },

    /// Waiting for peers, ssh, mpirun.
    #[error("{0}")]
    Cluster(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.display().to_string(), err }
}
