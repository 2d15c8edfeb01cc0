//! Who launched this process, read from the environment before MPI is
//! touched: a plain run (no launcher variables, or a world of one) stays a
//! single process and never initializes MPI.

use crate::{Error, Result};

/// What the launcher told this process about the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// The launcher family the variables came from (for messages).
    pub launcher: &'static str,
    pub rank: usize,
    /// None where the launcher does not say (PMIx alone): MPI tells.
    pub world_size: Option<usize>,
    pub local_rank: Option<usize>,
    pub local_size: Option<usize>,
}

impl LaunchEnv {
    /// More than one process, or a launcher that does not say how many.
    pub fn is_distributed(&self) -> bool {
        self.world_size.is_none_or(|n| n > 1)
    }
}

/// Reads the launcher variables of the process environment.
pub fn detect() -> Result<Option<LaunchEnv>> {
    detect_from(|k| std::env::var(k).ok())
}

/// One launcher's variable names: (launcher, rank, size, local rank, local size).
type Scheme = (&'static str, &'static str, Option<&'static str>, Option<&'static str>, Option<&'static str>);

/// In order of preference: Open MPI's own names, then MPICH/Intel MPI (Hydra),
/// then Slurm's srun (only inside a job step: an sbatch script also has
/// SLURM_PROCID but is one process), then bare PMIx.
const SCHEMES: [Scheme; 4] = [
    (
        "Open MPI",
        "OMPI_COMM_WORLD_RANK",
        Some("OMPI_COMM_WORLD_SIZE"),
        Some("OMPI_COMM_WORLD_LOCAL_RANK"),
        Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    ),
    ("PMI (MPICH/Intel MPI)", "PMI_RANK", Some("PMI_SIZE"), Some("MPI_LOCALRANKID"), Some("MPI_LOCALNRANKS")),
    ("Slurm srun", "SLURM_PROCID", Some("SLURM_STEP_NUM_TASKS"), Some("SLURM_LOCALID"), None),
    ("PMIx", "PMIX_RANK", None, None, None),
];

/// [`detect`] over any variable lookup (tests pass a map).
pub fn detect_from(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
    for (launcher, rank_var, size_var, local_rank_var, local_size_var) in SCHEMES {
        let Some(rank_s) = get(rank_var) else { continue };
        // Slurm sets SLURM_PROCID in batch scripts too; only a step started by
        // srun (which sets the step's task count) is a launch.
        if launcher == "Slurm srun" && size_var.and_then(&get).is_none() {
            continue;
        }
        let num = |var: &'static str, v: String| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| Error::Env {
                var,
                value: v.clone(),
                msg: "expected a non-negative integer".into(),
            })
        };
        let opt = |var: Option<&'static str>| -> Result<Option<usize>> {
            match var.and_then(|v| get(v).map(|s| (v, s))) {
                Some((v, s)) => num(v, s).map(Some),
                None => Ok(None),
            }
        };
        let rank = num(rank_var, rank_s)?;
        let world_size = opt(size_var)?;
        let local_rank = opt(local_rank_var)?;
        let local_size = opt(local_size_var)?;
        if let Some(n) = world_size
            && (n == 0 || rank >= n)
        {
            return Err(Error::Env {
                var: rank_var,
                value: rank.to_string(),
                msg: format!("rank must be below the world size {n} ({})", size_var.unwrap_or("?")),
            });
        }
        if let (Some(lr), Some(ls)) = (local_rank, local_size)
            && lr >= ls
        {
            return Err(Error::Env {
                var: local_rank_var.unwrap_or("?"),
                value: lr.to_string(),
                msg: format!("local rank must be below the local size {ls}"),
            });
        }
        return Ok(Some(LaunchEnv { launcher, rank, world_size, local_rank, local_size }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn plain_run_is_not_a_launch() {
        assert_eq!(detect_from(env(&[])).unwrap(), None);
        // An sbatch script: Slurm job variables, but no srun step.
        assert_eq!(detect_from(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")])).unwrap(), None);
    }

    #[test]
    fn open_mpi_variables() {
        let e = detect_from(env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_RANK", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(e.launcher, "Open MPI");
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_size), (3, Some(4), Some(1), Some(2)));
        assert!(e.is_distributed());
    }

    #[test]
    fn world_of_one_is_not_distributed() {
        let e = detect_from(env(&[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")])).unwrap().unwrap();
        assert!(!e.is_distributed());
    }

    #[test]
    fn other_launchers() {
        let e = detect_from(env(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")])).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (1, Some(2), None));
        let e = detect_from(env(&[("SLURM_PROCID", "5"), ("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_LOCALID", "1")]))
            .unwrap()
            .unwrap();
        assert_eq!((e.launcher, e.rank, e.world_size, e.local_rank), ("Slurm srun", 5, Some(8), Some(1)));
        let e = detect_from(env(&[("PMIX_RANK", "2")])).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size), (2, None));
        assert!(e.is_distributed());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = detect_from(env(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("OMPI_COMM_WORLD_RANK=\"x\""), "{err}");
        let err = detect_from(env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2")])).unwrap_err();
        assert!(err.to_string().contains("below the world size 2"), "{err}");
        let err = detect_from(env(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("OMPI_COMM_WORLD_LOCAL_RANK"), "{err}");
    }
}
