//! The resume rules: which checkpoint a run continues from, whether it fits
//! this run (the model and dtype must match; another layout, batch or data
//! is a warning where it changes what an uninterrupted run would have done),
//! and where the data continues. What a checkpoint holds and how it is read
//! back is `format.rs`'s job; files and directories are `checkpoint.rs`'s.

use std::path::{Path, PathBuf};

use trainer_comm::ProcessGroup;
use trainer_data::LoaderPosition;
use trainer_models::ModelDesc;

use crate::checkpoint::{self, Layout, Manifest, Opened, RunShape, Store};
use crate::config::{BatchShape, Config, Resume};
use crate::format::Place;
use crate::progress::Console;
use crate::trainer::compute_dtype;
use crate::{Error, Result};

/// The settings of this run that a checkpoint records and a resume compares.
pub(crate) fn run_shape(cfg: &Config, batch: &BatchShape) -> RunShape {
    let t = &cfg.training;
    RunShape {
        dtype: compute_dtype(cfg).to_string(),
        micro_batch_size: t.micro_batch_size,
        seq_len: t.seq_len,
        grad_accum_steps: batch.grad_accum_steps,
        data_train: cfg.data.train.clone(),
    }
}

/// The checkpoint to continue from, per `checkpoint.resume`, opened (this
/// rank's files checked and loaded) and checked against this run. Rank 0
/// decides (the others would race it removing leftovers, and could see
/// another newest checkpoint) and tells the others which directory it chose.
pub(crate) fn find_resume(
    cfg: &Config,
    store: &Store,
    model: &ModelDesc,
    (place, batch): (&Place, &BatchShape),
    console: &Console,
    world: &ProcessGroup,
) -> Result<Option<Opened>> {
    let wanted = checkpoint::for_rank(place.rank);
    let mut opened = if place.rank == 0 { decide_resume(cfg, store, &wanted, console)? } else { None };
    if world.size() > 1 {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let mut path = opened.as_ref().map(|o| o.dir.as_os_str().as_bytes().to_vec());
        // 0: start afresh; else the length of the path + 1.
        let mut len = [path.as_ref().map_or(0, |p| p.len() as u64 + 1)];
        world.broadcast_host(&mut len, 0)?;
        if len[0] > 0 {
            let mut bytes = path.take().unwrap_or_else(|| vec![0; len[0] as usize - 1]);
            world.broadcast_host(&mut bytes, 0)?;
            if place.rank != 0 {
                let dir = PathBuf::from(std::ffi::OsString::from_vec(bytes));
                let o = checkpoint::open(&dir, &wanted).map_err(|e| {
                    cfg.error(format!(
                        "checkpoint.resume: rank 0 chose {} but this rank cannot use it: {e}",
                        dir.display()
                    ))
                })?;
                opened = Some(o);
            }
        }
    }
    if let Some(o) = &opened {
        let manifest_path = o.dir.join("manifest.json");
        for w in check_fit(&o.manifest, &manifest_path, model, &run_shape(cfg, batch), &place.layout)? {
            console.warn(&w);
        }
    }
    Ok(opened)
}

/// Rank 0's choice of checkpoint (see [`find_resume`]).
fn decide_resume(
    cfg: &Config,
    store: &Store,
    wanted: &dyn Fn(&checkpoint::FileEntry) -> bool,
    console: &Console,
) -> Result<Option<Opened>> {
    for p in store.remove_leftovers()? {
        console.warn(&format!("removed {}, left by an interrupted save", p.display()));
    }
    let existing = store.list()?;
    let opened = match cfg.resume() {
        Resume::Never => {
            if let Some((_, newest)) = existing.first() {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"none\" but checkpoint.dir {} already holds checkpoints (newest {}): a \
                     later resume would mix two runs; use another checkpoint.dir or remove them",
                    store.dir().display(),
                    newest.display()
                )));
            }
            None
        }
        Resume::Auto => {
            let found = store.latest(wanted, &|w| console.warn(w))?;
            if found.is_none() && !existing.is_empty() {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"auto\": none of the {} checkpoints in {} checks out (see the warnings \
                     above); to start afresh use another checkpoint.dir with checkpoint.resume = \"none\"",
                    existing.len(),
                    store.dir().display()
                )));
            }
            found
        }
        Resume::From(path) => {
            let o = checkpoint::resolve(&path, wanted, &|w| console.warn(w))
                .map_err(|e| cfg.error(format!("checkpoint.resume = \"{}\": {e}", path.display())))?;
            if let Some((step, newer)) = existing.first().filter(|(s, _)| *s > o.manifest.step) {
                return Err(cfg.error(format!(
                    "checkpoint.resume = \"{}\" is step {} but checkpoint.dir already holds the newer {} (step \
                     {step}): a later resume would mix two runs; use another checkpoint.dir or remove it",
                    path.display(),
                    o.manifest.step,
                    newer.display()
                )));
            }
            Some(o)
        }
    };
    Ok(opened)
}

/// `model.key = a there, b here` for every field in which the checkpoint's
/// model (`theirs`) and this run's differ, its kind first.
fn model_differences(theirs: &ModelDesc, ours: &ModelDesc) -> Vec<String> {
    if theirs.kind != ours.kind {
        return vec![format!("a {} model there, a {} model here", theirs.kind, ours.kind)];
    }
    let empty = serde_json::Map::new();
    let (a, b) = (theirs.config.as_object().unwrap_or(&empty), ours.config.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let shown = |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("model.{k} = {} there, {} here", shown(a.get(k)), shown(b.get(k))))
        .collect()
}

/// Errors for a checkpoint this run cannot load (another model shape or
/// dtype, or a layout other than data parallel); warnings for settings that
/// make the continuation differ from an uninterrupted run.
pub(crate) fn check_fit(
    manifest: &Manifest,
    manifest_path: &Path,
    model: &ModelDesc,
    run: &RunShape,
    layout: &Layout,
) -> Result<Vec<String>> {
    let err = |msg: String| Error::Checkpoint { path: manifest_path.display().to_string(), msg };
    let diffs = model_differences(&manifest.state.model, model);
    if !diffs.is_empty() {
        return Err(err(format!(
            "holds another model shape ({}): resuming needs the config's model to match",
            diffs.join(", ")
        )));
    }
    let theirs = &manifest.state.run;
    if theirs.dtype != run.dtype {
        return Err(err(format!(
            "was written with training.dtype = \"{}\", this run has \"{}\": resuming needs the same",
            theirs.dtype, run.dtype
        )));
    }
    let old = &manifest.layout;
    // Only data-parallel layouts are understood: their optimizer files are
    // named by world rank = data-parallel rank (see `optim_files`).
    if old != layout && (old.world_size != old.data_parallel || old.zero_stage > 1) {
        return Err(err(format!(
            "was written by {} ranks (data parallel {}, ZeRO stage {}): resuming on another layout works only \
             from data-parallel layouts (ranks = data parallel, ZeRO stage 0 or 1); resume it with the same layout",
            old.world_size, old.data_parallel, old.zero_stage
        )));
    }
    let mut warnings = Vec::new();
    let mut differs = |key: &str, a: String, b: String| {
        if a != b {
            warnings.push(format!(
                "{key} was {a} in checkpoint {}, is {b} now: the run will not repeat an uninterrupted one exactly",
                manifest_path.parent().unwrap_or(manifest_path).display()
            ));
        }
    };
    differs("training.micro_batch_size", theirs.micro_batch_size.to_string(), run.micro_batch_size.to_string());
    differs("training.seq_len", theirs.seq_len.to_string(), run.seq_len.to_string());
    // Another number of ranks with the accumulation steps that keep the
    // global batch reads the same sequences per step: that is no difference.
    let global = |micro: usize, accum: usize, dp: usize| {
        format!("{} (micro_batch_size x grad_accum_steps x dp = {micro} x {accum} x {dp})", micro * accum * dp)
    };
    let (a, b) = (
        global(theirs.micro_batch_size, theirs.grad_accum_steps, old.data_parallel),
        global(run.micro_batch_size, run.grad_accum_steps, layout.data_parallel),
    );
    if theirs.micro_batch_size * theirs.grad_accum_steps * old.data_parallel
        != run.micro_batch_size * run.grad_accum_steps * layout.data_parallel
    {
        differs("the global batch", a, b);
    }
    differs("data.train", format!("{:?}", theirs.data_train), format!("{:?}", run.data_train));
    Ok(warnings)
}

/// Where this rank's training data continues after a resume (rank `rank` of
/// `dp` data-parallel ranks), and a warning when that cannot repeat the
/// checkpoint's run. `windows` is the number of micro-batches (windows of
/// micro_batch_size x seq_len + 1 tokens) in the training data, `remaining`
/// how many of them (all ranks together) this run will still read.
///
/// A position counts the windows of its epoch's shuffled order that all ranks
/// together have consumed, so it means the same with any number of ranks: the
/// new ranks take the next windows of the same order. What the number of
/// ranks changes is where an epoch ends: when fewer windows than ranks remain,
/// so `windows % dp` windows are left out per epoch (and from the resumed
/// position, `(windows - index) % dp` of the current one).
pub(crate) fn data_position(
    manifest: &Manifest,
    manifest_path: &Path,
    (rank, dp): (usize, usize),
    windows: usize,
    remaining: usize,
) -> Result<(LoaderPosition, Option<String>)> {
    let err = |msg: String| Error::Checkpoint { path: manifest_path.display().to_string(), msg };
    let positions = &manifest.state.data;
    let old_dp = manifest.layout.data_parallel;
    if old_dp == dp {
        let pos = positions
            .iter()
            .find(|d| d.rank == rank)
            .ok_or_else(|| err(format!("has no data position for rank {rank}")))?;
        return Ok((LoaderPosition { epoch: pos.epoch, index: pos.index }, None));
    }
    // The ranks step together, so their positions agree unless the manifest was edited.
    let Some(first) = positions.first() else { return Err(err("has no data positions".into())) };
    if let Some(other) = positions.iter().find(|d| (d.epoch, d.index) != (first.epoch, first.index)) {
        return Err(err(format!(
            "the ranks' data positions differ (rank {} at epoch {} window {}, rank {} at epoch {} window {}): \
             cannot tell where the data continues on another number of data-parallel ranks",
            first.rank, first.epoch, first.index, other.rank, other.epoch, other.index
        )));
    }
    let pos = LoaderPosition { epoch: first.epoch, index: first.index };
    let left = windows.saturating_sub(pos.index);
    let reaches_epoch_end = pos.index + remaining > windows;
    let ends_differ = left % old_dp != left % dp || windows % old_dp != windows % dp;
    let warning = (reaches_epoch_end && ends_differ).then(|| {
        format!(
            "data.train holds {windows} micro-batches per epoch; with data parallel {old_dp} each epoch reads {} of \
             them, with {dp} it reads {}: the data continues where checkpoint {} left it (epoch {}, micro-batch {}), \
             but from the end of this epoch on the batches differ from those the checkpoint's run would have read",
            windows - windows % old_dp,
            windows - windows % dp,
            manifest_path.parent().unwrap_or(manifest_path).display(),
            pos.epoch,
            pos.index
        )
    });
    Ok((pos, warning))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::DataPosition;
    use crate::format::tests::{desc, layout, run_shape, trainer_state};

    fn manifest_with(layout: Layout, positions: &[(u64, usize)]) -> Manifest {
        let data = positions.iter().enumerate().map(|(rank, &(epoch, index))| DataPosition { rank, epoch, index });
        let state = trainer_state(3, 3, desc(8), data.collect());
        Manifest { format: "trainer-checkpoint".into(), version: 1, step: 3, layout, files: Vec::new(), state }
    }

    #[test]
    fn another_model_or_dtype_is_refused_and_other_settings_are_warnings() {
        let opened = manifest_with(layout(1, 0), &[(0, 3)]);
        let manifest = Path::new("ck/manifest.json");
        // The config-level check names the keys.
        let here = layout(1, 0);
        let e = check_fit(&opened, manifest, &desc(16), &run_shape(), &here).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("model.n_embd = 8 there, 16 here"), "{e}");
        let mut other = desc(8);
        other.kind = "vit".into();
        let e = check_fit(&opened, manifest, &other, &run_shape(), &here).unwrap_err().to_string();
        assert!(e.contains("a gpt model there, a vit model here"), "{e}");
        let mut bf16 = run_shape();
        bf16.dtype = "bf16".into();
        let e = check_fit(&opened, manifest, &desc(8), &bf16, &here).unwrap_err().to_string();
        assert!(e.contains("training.dtype"), "{e}");
        let mut longer = run_shape();
        longer.seq_len = 4;
        let w = check_fit(&opened, manifest, &desc(8), &longer, &here).unwrap();
        assert!(w.len() == 1 && w[0].contains("training.seq_len was 8"), "{w:?}");
        // Another data-parallel layout is fine; what it changes of the global batch is a warning.
        let two = Layout { world_size: 2, data_parallel: 2, zero_stage: 1 };
        let w = check_fit(&opened, manifest, &desc(8), &run_shape(), &two).unwrap();
        assert!(
            w.len() == 1
                && w[0].contains("the global batch was 2 (micro_batch_size x grad_accum_steps x dp = 2 x 1 x 1)"),
            "{w:?}"
        );
        let mut halved = run_shape();
        halved.micro_batch_size = 1;
        let w = check_fit(&opened, manifest, &desc(8), &halved, &two).unwrap();
        assert!(w.len() == 1 && w[0].contains("training.micro_batch_size was 2"), "{w:?}");
        // A layout with ranks that are not data-parallel ranks is not understood.
        let tp = manifest_with(Layout { world_size: 4, data_parallel: 2, zero_stage: 1 }, &[(0, 3)]);
        let e = check_fit(&tp, manifest, &desc(8), &run_shape(), &two).unwrap_err().to_string();
        assert!(e.contains("written by 4 ranks (data parallel 2, ZeRO stage 1)") && e.contains("same layout"), "{e}");
    }

    #[test]
    fn data_continues_from_the_global_position_on_any_number_of_ranks() {
        let path = Path::new("ck/manifest.json");
        let at = |epoch, index| LoaderPosition { epoch, index };
        let two = manifest_with(layout(2, 1), &[(1, 4), (1, 4)]);
        // The same ranks: each its own position.
        assert_eq!(data_position(&two, path, (1, 2), 11, 100).unwrap(), (at(1, 4), None));
        let e = data_position(&manifest_with(layout(3, 1), &[(1, 4)]), path, (2, 3), 11, 0).unwrap_err().to_string();
        assert!(e.contains("ck/manifest.json") && e.contains("no data position for rank 2"), "{e}");
        // Other ranks: the same global position, silently while this epoch does not end.
        assert_eq!(data_position(&two, path, (3, 4), 11, 7).unwrap(), (at(1, 4), None));
        assert_eq!(data_position(&two, path, (0, 1), 11, 7).unwrap(), (at(1, 4), None));
        // ... and where the epoch ends elsewhere, once it ends: 2 ranks read 10 of 11 windows, 4 ranks 8.
        let (pos, w) = data_position(&two, path, (3, 4), 11, 8).unwrap();
        assert_eq!(pos, at(1, 4));
        let w = w.unwrap();
        assert!(
            w.contains("holds 11 micro-batches")
                && w.contains("reads 10 of them, with 4 it reads 8")
                && w.contains("(epoch 1, micro-batch 4)"),
            "{w}"
        );
        // 12 windows end the epoch at the same place for 1, 2 and 4 ranks.
        assert_eq!(data_position(&two, path, (0, 4), 12, 100).unwrap(), (at(1, 4), None));
        assert_eq!(data_position(&two, path, (0, 1), 12, 100).unwrap(), (at(1, 4), None));
        // 13 windows: 2 and 4 ranks both leave one out per epoch, but from window 6 (a global
        // batch that 4 does not divide) 2 ranks read 6 more and 4 ranks only 4.
        let six = manifest_with(layout(2, 1), &[(0, 6), (0, 6)]);
        assert!(data_position(&six, path, (0, 4), 13, 100).unwrap().1.is_some());
        // One rank reads all 11, two read 10.
        assert!(data_position(&two, path, (0, 1), 11, 8).unwrap().1.is_some());
        // Positions that disagree (an edited manifest) leave nothing well defined.
        let odd = manifest_with(layout(2, 1), &[(1, 4), (1, 6)]);
        let e = data_position(&odd, path, (0, 1), 11, 8).unwrap_err().to_string();
        assert!(e.contains("positions differ") && e.contains("rank 1 at epoch 1 window 6"), "{e}");
    }
}
