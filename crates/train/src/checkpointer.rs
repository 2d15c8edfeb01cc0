//! The run's checkpoints: where they go, writing one of the current state
//! (every rank together), knowing which one holds the current step, and
//! finding the one to resume from. The format is `format.rs`'s, the resume
//! rules `resume.rs`'s, the directories `checkpoint.rs`'s.

use std::path::{Path, PathBuf};

use trainer_comm::ProcessGroup;
use trainer_data::LoaderPosition;
use trainer_models::Model;
use trainer_nn::AdamW;

use crate::Result;
use crate::checkpoint::{DataPosition, Opened, Store, TrainerState};
use crate::config::{BatchShape, Config};
use crate::format::{self, Place};
use crate::hooks::Hooks;
use crate::progress::Console;
use crate::resume::{self, run_shape};

/// What a checkpoint records of the run's progress besides the optimizer's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters {
    /// Optimizer updates applied.
    pub step: u64,
    pub first_val: Option<f64>,
    pub last_val: Option<f64>,
    pub last_loss: f64,
}

#[derive(Debug)]
pub(crate) struct Checkpointer {
    store: Store,
    place: Place,
    /// The job's config as TOML, for every manifest.
    config_toml: String,
    /// The newest checkpoint of this run: (step, directory).
    saved: Option<(u64, PathBuf)>,
}

impl Checkpointer {
    pub(crate) fn new(cfg: &Config, place: Place) -> Result<Self> {
        let config_toml = toml::to_string(cfg).map_err(|e| cfg.error(format!("cannot write it as TOML: {e}")))?;
        let store = Store::new(cfg.checkpoint_dir(), cfg.checkpoint.keep_last);
        Ok(Checkpointer { store, place, config_toml, saved: None })
    }

    pub(crate) fn dir(&self) -> &Path {
        self.store.dir()
    }

    pub(crate) fn place(&self) -> &Place {
        &self.place
    }

    /// The checkpoint to continue from, per `checkpoint.resume`, opened and
    /// checked against this run (see [`resume::find_resume`]).
    pub(crate) fn find_resume(
        &self,
        cfg: &Config,
        model: &dyn Model,
        batch: &BatchShape,
        console: &Console,
        world: &ProcessGroup,
    ) -> Result<Option<Opened>> {
        resume::find_resume(cfg, &self.store, &model.desc(), (&self.place, batch), console, world)
    }

    /// After resuming from `from`: it holds the current step when it is one
    /// of this run's (another run's checkpoint does not count: a stop before
    /// the next step must still leave one in checkpoint.dir).
    pub(crate) fn resumed_from(&mut self, from: &Opened) {
        let ours = |p: &Path| std::fs::canonicalize(p).ok();
        if from.dir.parent().and_then(ours).is_some_and(|d| Some(d) == ours(self.store.dir())) {
            self.saved = Some((from.manifest.step, from.dir.clone()));
        }
    }

    /// The checkpoint of `step` when one was written (or resumed from).
    pub(crate) fn saved_at(&self, step: u64) -> Option<&Path> {
        self.saved.as_ref().filter(|(s, _)| *s == step).map(|(_, d)| d.as_path())
    }

    /// The newest checkpoint of this run.
    pub(crate) fn newest(&self) -> Option<&Path> {
        self.saved.as_ref().map(|(_, d)| d.as_path())
    }

    /// Writes the checkpoint of `counters.step` with every rank of `world`,
    /// this rank's data at `position`; returns its directory.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn save(
        &mut self,
        (cfg, batch): (&Config, &BatchShape),
        counters: &Counters,
        model: &dyn Model,
        opt: &AdamW,
        position: LoaderPosition,
        hooks: &Hooks,
        world: &ProcessGroup,
    ) -> Result<PathBuf> {
        let state = TrainerState {
            optimizer_step: opt.step,
            schedule_step: counters.step,
            data: gather_positions(world, position)?,
            seed: cfg.training.seed,
            first_val_loss: counters.first_val,
            last_train_loss: Some(counters.last_loss).filter(|l| l.is_finite()),
            model: model.desc(),
            run: run_shape(cfg, batch),
            config: self.config_toml.clone(),
        };
        let step = counters.step;
        let dir = format::save(&self.store, step, model, opt, &self.place, state, hooks, world)?;
        let dir = dir.unwrap_or_else(|| self.store.step_dir(step));
        self.saved = Some((step, dir.clone()));
        Ok(dir)
    }
}

/// Every rank's data position (`mine` is this rank's).
fn gather_positions(world: &ProcessGroup, mine: LoaderPosition) -> Result<Vec<DataPosition>> {
    let all = world.all_gather_host(&[mine.epoch, mine.index as u64])?;
    Ok(all
        .chunks_exact(2)
        .enumerate()
        .map(|(rank, p)| DataPosition { rank, epoch: p[0], index: p[1] as usize })
        .collect())
}
