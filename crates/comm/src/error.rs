/// Errors of the communication layer. Each names the setting, variable,
/// operation or group involved, so one line in a log is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A launcher variable that is present but unusable.
    #[error("environment variable {var}={value:?}: {msg}")]
    Env { var: &'static str, value: String, msg: String },

    /// The launcher and MPI disagree (e.g. the binary is linked against a
    /// different MPI than the `mpirun` that started it).
    #[error("launch: {0}")]
    Launch(String),

    /// A `[parallel]` setting that does not fit the world size.
    #[error("{0}")]
    Config(String),

    /// More ranks on a host than GPUs it shows.
    #[error(
        "host {host}: {local_size} ranks were started on it but it has {visible} visible GPU(s){env}; \
         each rank uses the GPU numbered by its local rank, so start at most as many ranks per host as it has GPUs"
    )]
    TooFewGpus { host: String, local_size: usize, visible: usize, env: String },

    /// Bad arguments to a collective (caught before anything is communicated).
    #[error("{op} on process group '{group}': {msg}")]
    Invalid { op: &'static str, group: String, msg: String },

    #[error("NCCL {context}: {msg}")]
    Nccl { context: String, msg: String },

    #[error("CUDA {context}: {msg}")]
    Cuda { context: String, msg: String },

    #[error(transparent)]
    Core(#[from] trainer_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// For the [`trainer_core::collective::Collective`] methods: a tensor error
/// stays one, any other keeps this error whole (its message names the
/// operation and the group).
impl From<Error> for trainer_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(e) => e,
            e => trainer_core::Error::Collective(Box::new(e)),
        }
    }
}

pub(crate) fn cuda_err(context: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Cuda { context: context.into(), msg: e.to_string() }
}

pub(crate) fn nccl_err(context: impl Into<String>, e: impl std::fmt::Debug) -> Error {
    Error::Nccl { context: context.into(), msg: format!("{e:?}") }
}
