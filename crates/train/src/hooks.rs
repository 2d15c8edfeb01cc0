//! Test-only fault injection, switched on by environment variables that no user
//! needs; the tests of the binary use them to reach states that are otherwise a
//! matter of timing or luck:
//!
//! - `TRAINER_TEST_STALL_SAVE=N`: the save of the checkpoint of step N stops after
//!   its data files are written, before the manifest and the rename, prints
//!   `test hook: checkpoint save of step N stalled` on stderr and waits forever
//!   (a test kills the process there).
//! - `TRAINER_TEST_NAN_ATTEMPTS=A-B` (or `A`): step attempts A to B of this
//!   process, counted from 1, see a NaN loss, as if the model had diverged.
//! - `TRAINER_TEST_FAIL=R:A`: the process of rank R fails with an error at its
//!   step attempt A (after A - 1 steps' collectives), while the other ranks wait
//!   in the next collective: how a rank that fails alone ends the whole job.

use std::ops::RangeInclusive;

use crate::{Error, Result};

#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    stall_save: Option<u64>,
    nan_attempts: Option<RangeInclusive<u64>>,
    /// (rank, attempt)
    fail: Option<(usize, u64)>,
}

fn bad(key: &str, value: &str, allowed: &str) -> Error {
    Error::Config { file: format!("environment variable {key}"), msg: format!("{value:?}: expected {allowed}") }
}

impl Hooks {
    pub(crate) fn from_env() -> Result<Hooks> {
        let mut hooks = Hooks::default();
        let key = "TRAINER_TEST_STALL_SAVE";
        if let Ok(v) = std::env::var(key) {
            hooks.stall_save = Some(v.trim().parse().map_err(|_| bad(key, &v, "a step number"))?);
        }
        let key = "TRAINER_TEST_NAN_ATTEMPTS";
        if let Ok(v) = std::env::var(key) {
            let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad(key, &v, "A-B or A (attempt numbers)"));
            let (a, b) = match v.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(&v)?, num(&v)?),
            };
            hooks.nan_attempts = Some(a..=b);
        }
        let key = "TRAINER_TEST_FAIL";
        if let Ok(v) = std::env::var(key) {
            let parsed = v.split_once(':').and_then(|(r, a)| Some((r.trim().parse().ok()?, a.trim().parse().ok()?)));
            hooks.fail = Some(parsed.ok_or_else(|| bad(key, &v, "R:A (a rank and an attempt number)"))?);
        }
        Ok(hooks)
    }

    /// An error where a failure is injected for this rank and attempt.
    pub(crate) fn maybe_fail(&self, rank: usize, attempt: u64) -> Result<()> {
        match self.fail {
            Some((r, a)) if (r, a) == (rank, attempt) => {
                Err(Error::Injected(format!("test hook: rank {rank} failed at step attempt {attempt}")))
            }
            _ => Ok(()),
        }
    }

    /// The loss this attempt reports: `loss`, or NaN where a fault is injected.
    pub(crate) fn loss(&self, attempt: u64, loss: f64) -> f64 {
        if self.nan_attempts.as_ref().is_some_and(|r| r.contains(&attempt)) { f64::NAN } else { loss }
    }

    pub(crate) fn maybe_stall_save(&self, step: u64) {
        if self.stall_save == Some(step) {
            eprintln!("test hook: checkpoint save of step {step} stalled");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}
