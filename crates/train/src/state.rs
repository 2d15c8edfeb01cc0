//! What a checkpoint holds for the trainer, and putting it back.
//!
//! - `model.safetensors` (rank 0): every parameter as the model holds it, with
//!   the model config in its metadata: also a weights file for `trainer eval`.
//! - `optim_rankNNNNN.safetensors`: the AdamW state, flat over a range of the
//!   parameters' flat layout (`trainer_nn::FlatLayout`): moments `exp_avg` and
//!   `exp_avg_sq`, and for half-precision parameters the f32 `master`; the
//!   range is in the metadata. Under ZeRO-1 every rank writes its own shard;
//!   otherwise rank 0 alone writes the whole state (every rank holds the same)
//!   and every rank reads it back.
//! - The manifest (rank 0, after gathering every rank's file entries and data
//!   position): counters, every rank's data position, the seed, the configs.
//!
//! A resume checks the checkpoint against the live model and config (shape,
//! dtype, every tensor's presence, shape and dtype) before it changes
//! anything, so a bad checkpoint never leaves a half-loaded model.
//!
//! Another parallel layout (data parallel 1, 2, 4, ..., ZeRO stage 0 or 1) can
//! resume a checkpoint: the parameters' flat layout is the same for every
//! number of shards except for the zero padding at its end (to a multiple of
//! the shard count), so each rank assembles the flat range it owns now from
//! the parts of whichever optimizer files hold it, and leaves padding zero.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use trainer_core::io::Loaded;
use trainer_core::ops::Span;
use trainer_core::{Device, Tensor, ops};
use trainer_data::LoaderPosition;
use trainer_models::{Model, ModelDesc};
use trainer_nn::{AdamW, FlatLayout};

use trainer_comm::ProcessGroup;

use crate::checkpoint::{FileEntry, Layout, Manifest, Opened, RunShape, Store, TrainerState};
use crate::hooks::Hooks;
use crate::{Error, Result};

pub(crate) const MODEL_FILE: &str = "model.safetensors";

pub(crate) fn optim_file(rank: usize) -> String {
    format!("optim_rank{rank:05}.safetensors")
}

/// How an optimizer file names the flat range it covers.
fn range_metadata(opt: &AdamW) -> BTreeMap<String, String> {
    let r = opt.range();
    BTreeMap::from([
        ("flat_range".into(), format!("{}..{}", r.start, r.end)),
        ("flat_len".into(), opt.layout().len.to_string()),
    ])
}

/// Which rank this process is, and how the state is split over all of them.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub rank: usize,
    pub layout: Layout,
}

impl Place {
    /// The rank whose optimizer file this rank writes and reads: its own under
    /// ZeRO-1, else rank 0's (the state is the same on every rank).
    pub fn optim_rank(&self) -> usize {
        if self.layout.zero_stage == 1 { self.rank } else { 0 }
    }
}

/// Writes the checkpoint of `step` (optimizer updates applied) together with
/// every rank of `group` (the world); returns its directory on rank 0.
/// `state.data` must already hold every rank's data position.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save(
    store: &Store,
    step: u64,
    model: &dyn Model,
    opt: &AdamW,
    place: &Place,
    state: TrainerState,
    hooks: &Hooks,
    group: &ProcessGroup,
) -> Result<Option<PathBuf>> {
    let rank = place.rank;
    let mut pending = store.begin(step, rank)?;
    // The other ranks write into the directory rank 0 has just made.
    group.barrier()?;
    let params = model.params();
    if rank == 0 {
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, None, "parameters", &named, weights_metadata(&model.desc()))?;
    }
    if place.optim_rank() == rank {
        let named: Vec<(String, &Tensor)> = opt.state().into_iter().map(|(n, t)| (n.to_string(), t)).collect();
        // Unsharded state is one file that every rank reads back.
        let reader = (place.layout.zero_stage == 1).then_some(rank);
        pending.write(&optim_file(rank), reader, "optimizer", &named, range_metadata(opt))?;
    }
    hooks.maybe_stall_save(step);
    let others = gather_entries(group, pending.entries(), store)?;
    if rank == 0 {
        pending.add_entries(others);
        let dir = pending.commit(place.layout.clone(), state)?;
        group.barrier()?;
        Ok(Some(dir))
    } else {
        // Returns once the checkpoint is in place (or rank 0 has failed and aborted the job).
        group.barrier()?;
        Ok(None)
    }
}

/// Every other rank's file entries, on rank 0 (empty elsewhere).
fn gather_entries(group: &ProcessGroup, mine: &[FileEntry], store: &Store) -> Result<Vec<FileEntry>> {
    if group.size() == 1 {
        return Ok(Vec::new());
    }
    let bad = |msg: String| Error::Checkpoint { path: store.dir().display().to_string(), msg };
    let json = serde_json::to_vec(mine).map_err(|e| bad(format!("file entries: {e}")))?;
    let lens = group.all_gather_host(&[json.len() as u64])?;
    let width = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut padded = json;
    padded.resize(width, 0);
    let all = group.all_gather_host(&padded)?;
    if group.rank() != 0 {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    for (r, &len) in lens.iter().enumerate().skip(1) {
        let bytes = &all[r * width..r * width + len as usize];
        let theirs: Vec<FileEntry> =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("file entries of rank {r}: {e}")))?;
        entries.extend(theirs);
    }
    Ok(entries)
}

/// The metadata of a weights file: the model's description, under the key
/// each kind's weights files have always used (`gpt_config` for GPT-2), so
/// that `trainer eval` and `generate` read a checkpoint's model file too.
fn weights_metadata(desc: &ModelDesc) -> BTreeMap<String, String> {
    BTreeMap::from([(format!("{}_config", desc.kind), desc.config.to_string())])
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

/// Checks a tensor from a checkpoint against the live one it will overwrite.
fn stage(loaded: &mut Loaded, path: &Path, name: &str, like: &Tensor) -> Result<Tensor> {
    let err = |msg: String| Error::Checkpoint { path: path.display().to_string(), msg };
    let t = loaded.tensors.remove(name).ok_or_else(|| err(format!("tensor {name} is missing")))?;
    if t.dims() != like.dims() {
        return Err(err(format!("tensor {name} has shape {} but this model needs {}", t.shape(), like.shape())));
    }
    if t.dtype() != like.dtype() {
        return Err(err(format!("tensor {name} is {} but this run holds it as {}", t.dtype(), like.dtype())));
    }
    Ok(t)
}

fn no_extra(loaded: &Loaded, path: &Path) -> Result<()> {
    match loaded.tensors.keys().next() {
        Some(extra) => Err(Error::Checkpoint {
            path: path.display().to_string(),
            msg: format!("tensor {extra} is not part of this model's state"),
        }),
        None => Ok(()),
    }
}

fn put(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    let device = dst.device();
    if device.is_cuda() {
        ops::copy(dst, &src.to_device(&device)?)?;
    } else {
        ops::copy(dst, src)?;
    }
    Ok(())
}

/// The optimizer files of a checkpoint written under `layout`, each with the
/// flat range it holds of `flat` (the parameters' layout padded for that
/// layout's shards). Under ZeRO-1 data-parallel rank r wrote shard r into the
/// file of its world rank, which is r as long as every rank is a
/// data-parallel rank (`check_fit` refuses other layouts); otherwise rank 0's
/// file holds everything.
fn optim_files(layout: &Layout, flat: &FlatLayout) -> Vec<(String, Range<usize>)> {
    if layout.zero_stage == 1 {
        (0..layout.data_parallel).map(|r| (optim_file(r), flat.shard(r))).collect()
    } else {
        vec![(optim_file(0), 0..flat.len)]
    }
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> Option<Range<usize>> {
    let (start, end) = (a.start.max(b.start), a.end.min(b.end));
    (start < end).then_some(start..end)
}

/// A flat state tensor over `want` (on the CPU, `like`'s dtype) from `parts`:
/// tensors over flat ranges of an older layout. Elements that no part holds
/// stay zero: they lie past the end of the older layout, in padding that
/// belongs to no parameter.
pub(crate) fn assemble(want: &Range<usize>, like: &Tensor, parts: &[(&Tensor, Range<usize>)]) -> Result<Tensor> {
    let mut out = Tensor::zeros([want.len()], like.dtype(), &Device::Cpu)?;
    let sources: Vec<&Tensor> = parts.iter().map(|p| p.0).collect();
    let pairs: Vec<(Span, Span)> = parts
        .iter()
        .enumerate()
        .filter_map(|(i, (_, held))| {
            let both = overlap(held, want)?;
            let len = both.len();
            Some((
                Span { tensor: 0, start: both.start - want.start, len },
                Span { tensor: i, start: both.start - held.start, len },
            ))
        })
        .collect();
    if !pairs.is_empty() {
        ops::copy_spans(&mut [&mut out], &sources, &pairs)?;
    }
    Ok(out)
}

/// Checks a flat optimizer tensor of a file that holds `len` elements.
fn stage_flat(loaded: &mut Loaded, path: &Path, name: &str, like: &Tensor, len: usize) -> Result<Tensor> {
    let err = |msg: String| Error::Checkpoint { path: path.display().to_string(), msg };
    let t = loaded.tensors.remove(name).ok_or_else(|| err(format!("tensor {name} is missing")))?;
    if t.dims() != [len] {
        return Err(err(format!("tensor {name} has shape {} but the file's flat range holds [{len}]", t.shape())));
    }
    if t.dtype() != like.dtype() {
        return Err(err(format!("tensor {name} is {} but this run holds it as {}", t.dtype(), like.dtype())));
    }
    Ok(t)
}

/// This rank's optimizer state (the range `opt` covers of its layout),
/// assembled from the checkpoint's optimizer files, whichever layout wrote
/// them; every file it reads is checked (its range, every tensor) first.
fn optimizer_state(opened: &mut Opened, model: &dyn Model, opt: &AdamW) -> Result<Vec<Tensor>> {
    let theirs = opened.manifest.layout.clone();
    let flat = FlatLayout::new(&model.params(), if theirs.zero_stage == 1 { theirs.data_parallel } else { 1 });
    let want = opt.range();
    let likes = opt.state();
    // Per state tensor: the parts of the files that hold some of `want`.
    let mut parts: Vec<Vec<(Tensor, Range<usize>)>> = likes.iter().map(|_| Vec::new()).collect();
    for (name, held) in optim_files(&theirs, &flat) {
        if overlap(&held, &want).is_none() {
            continue;
        }
        let (path, mut file) = opened.take_or_load(&name)?;
        let expected = BTreeMap::from([
            ("flat_range".to_string(), format!("{}..{}", held.start, held.end)),
            ("flat_len".to_string(), flat.len.to_string()),
        ]);
        for (key, value) in &expected {
            let got = file.metadata.get(key).map_or("none", String::as_str);
            if got != value {
                return Err(Error::Checkpoint {
                    path: path.display().to_string(),
                    msg: format!(
                        "{key} is {got}, but a checkpoint of {} ranks (data parallel {}, ZeRO stage {}) holds {value} \
                         in this file",
                        theirs.world_size, theirs.data_parallel, theirs.zero_stage
                    ),
                });
            }
        }
        for ((state, like), parts) in likes.iter().zip(&mut parts) {
            parts.push((stage_flat(&mut file, &path, state, like, held.len())?, held.clone()));
        }
        no_extra(&file, &path)?;
    }
    likes
        .iter()
        .zip(&parts)
        .map(|((_, like), parts)| {
            let parts: Vec<(&Tensor, Range<usize>)> = parts.iter().map(|(t, r)| (t, r.clone())).collect();
            assemble(&want, like, &parts)
        })
        .collect()
}

/// Loads parameters and this rank's optimizer state from a checkpoint opened
/// with its files (those of other ranks that it needs are read here); every
/// tensor is checked before any is copied.
pub(crate) fn restore(opened: &mut Opened, model: &mut dyn Model, opt: &mut AdamW) -> Result<()> {
    let (model_path, mut model_file) = opened.take_or_load(MODEL_FILE)?;
    let values = model
        .params()
        .iter()
        .map(|p| stage(&mut model_file, &model_path, &p.name, &p.value))
        .collect::<Result<Vec<_>>>()?;
    no_extra(&model_file, &model_path)?;
    let states = optimizer_state(opened, model, opt)?;

    for (p, t) in model.params_mut().into_iter().zip(&values) {
        put(&mut p.value, t)?;
    }
    for ((_, dst), src) in opt.state_mut().into_iter().zip(&states) {
        put(dst, src)?;
    }
    opt.step = opened.manifest.state.optimizer_step;
    Ok(())
}

#[cfg(test)]
mod tests {
    use trainer_core::{DType, Device};

    use super::*;
    use crate::checkpoint::{DataPosition, for_rank, open};

    /// A one-layer model of the default kind, `n_embd` wide, as a config's `[model]` describes it.
    fn desc(n_embd: usize) -> ModelDesc {
        let section = format!("vocab_size = 100\nblock_size = 8\nn_layer = 1\nn_head = 2\nn_embd = {n_embd}");
        toml::from_str::<trainer_models::ModelSection>(&section).unwrap().resolve().unwrap()
    }

    fn model(desc: ModelDesc, dtype: DType, seed: u64) -> (Box<dyn Model>, AdamW) {
        // Initialization runs in f32 on the CPU; a bf16 model gets the values cast.
        let mut f = trainer_models::build(&desc, DType::F32, &Device::Cpu).unwrap();
        f.init(seed).unwrap();
        let mut m = trainer_models::build(&desc, dtype, &Device::Cpu).unwrap();
        for (p, q) in m.params_mut().into_iter().zip(f.params()) {
            p.value = q.value.to_dtype(dtype).unwrap();
        }
        let cfg = trainer_nn::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let opt = AdamW::new(cfg, &m.params()).unwrap();
        (m, opt)
    }

    fn run_shape() -> RunShape {
        RunShape { dtype: "f32".into(), micro_batch_size: 2, seq_len: 8, grad_accum_steps: 1, data_train: "x".into() }
    }

    fn place() -> Place {
        Place { rank: 0, layout: Layout { world_size: 1, data_parallel: 1, zero_stage: 0 } }
    }

    /// The state a run in these tests saves: steps, model and data positions as given.
    fn trainer_state(
        optimizer_step: u64,
        schedule_step: u64,
        model: ModelDesc,
        data: Vec<DataPosition>,
    ) -> TrainerState {
        TrainerState {
            optimizer_step,
            schedule_step,
            data,
            seed: 1,
            first_val_loss: None,
            last_train_loss: None,
            model,
            run: run_shape(),
            config: String::new(),
        }
    }

    fn save_one(store: &Store, step: u64, m: &dyn Model, opt: &AdamW) -> PathBuf {
        let state = trainer_state(opt.step, step, m.desc(), vec![DataPosition { rank: 0, epoch: 0, index: 3 }]);
        save(store, step, m, opt, &place(), state, &Hooks::default(), &ProcessGroup::single("world")).unwrap().unwrap()
    }

    fn values(m: &dyn Model) -> Vec<Vec<f64>> {
        m.params().iter().map(|p| p.value.to_vec_f64().unwrap()).collect()
    }

    /// Fills the optimizer state with recognizable values, as after some updates.
    fn touch(opt: &mut AdamW, x: f32) {
        opt.step = 7;
        for (i, (_, t)) in opt.state_mut().into_iter().enumerate() {
            let n = t.numel();
            let values: Vec<f32> = (0..n).map(|j| x * (i + 1) as f32 + j as f32 / n as f32).collect();
            t.copy_from_slice(&values).unwrap();
        }
    }

    fn state_values(opt: &AdamW) -> Vec<(&'static str, Vec<f64>)> {
        opt.state().into_iter().map(|(n, t)| (n, t.to_vec_f64().unwrap())).collect()
    }

    #[test]
    fn round_trip_restores_parameters_moments_and_masters() {
        for dtype in [DType::F32, DType::BF16] {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::new(tmp.path(), 2);
            let (a, mut opt_a) = model(desc(8), dtype, 1);
            touch(&mut opt_a, 0.5);
            let dir = save_one(&store, 5, a.as_ref(), &opt_a);
            let (mut b, mut opt_b) = model(desc(8), dtype, 2);
            assert_ne!(values(a.as_ref()), values(b.as_ref()));
            let mut opened = open(&dir, &for_rank(0)).unwrap();
            restore(&mut opened, b.as_mut(), &mut opt_b).unwrap();
            assert_eq!(values(a.as_ref()), values(b.as_ref()), "{dtype}");
            assert_eq!(opt_b.step, 7);
            assert_eq!(state_values(&opt_a), state_values(&opt_b), "{dtype}");
            assert_eq!(opt_b.state().iter().any(|(n, _)| *n == "master"), dtype == DType::BF16);
        }
    }

    #[test]
    fn another_shape_is_refused_without_touching_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 2);
        let (a, opt_a) = model(desc(8), DType::F32, 1);
        let dir = save_one(&store, 5, a.as_ref(), &opt_a);
        let manifest = dir.join("manifest.json");
        let opened = open(&dir, &for_rank(0)).unwrap();

        // The config-level check names the keys.
        let layout = place().layout;
        let e = check_fit(&opened.manifest, &manifest, &desc(16), &run_shape(), &layout).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("model.n_embd = 8 there, 16 here"), "{e}");
        let mut bf16 = run_shape();
        bf16.dtype = "bf16".into();
        let e = check_fit(&opened.manifest, &manifest, &desc(8), &bf16, &layout).unwrap_err().to_string();
        assert!(e.contains("training.dtype"), "{e}");
        let mut longer = run_shape();
        longer.seq_len = 4;
        let w = check_fit(&opened.manifest, &manifest, &desc(8), &longer, &layout).unwrap();
        assert!(w.len() == 1 && w[0].contains("training.seq_len was 8"), "{w:?}");
        // Another data-parallel layout is fine; what it changes of the global batch is a warning.
        let two = Layout { world_size: 2, data_parallel: 2, zero_stage: 1 };
        let w = check_fit(&opened.manifest, &manifest, &desc(8), &run_shape(), &two).unwrap();
        assert!(
            w.len() == 1
                && w[0].contains("the global batch was 2 (micro_batch_size x grad_accum_steps x dp = 2 x 1 x 1)"),
            "{w:?}"
        );
        let mut halved = run_shape();
        halved.micro_batch_size = 1;
        let w = check_fit(&opened.manifest, &manifest, &desc(8), &halved, &two).unwrap();
        assert!(w.len() == 1 && w[0].contains("training.micro_batch_size was 2"), "{w:?}");
        // A layout with ranks that are not data-parallel ranks is not understood.
        let mut tp = opened.manifest.clone();
        tp.layout = Layout { world_size: 4, data_parallel: 2, zero_stage: 1 };
        let e = check_fit(&tp, &manifest, &desc(8), &run_shape(), &two).unwrap_err().to_string();
        assert!(e.contains("written by 4 ranks (data parallel 2, ZeRO stage 1)") && e.contains("same layout"), "{e}");

        // Past that check (a manifest that lies), the tensors are checked one by one.
        let (mut c, mut opt_c) = model(desc(16), DType::F32, 3);
        let before = values(c.as_ref());
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, c.as_mut(), &mut opt_c).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("tensor transformer.wte.weight has shape"), "{e}");
        assert_eq!(values(c.as_ref()), before, "nothing loaded");
        assert_eq!(opt_c.step, 0);

        // A missing optimizer tensor is found before the parameters are touched.
        let mut pending = store.begin(6, 0).unwrap();
        let params = a.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, None, "parameters", &named, BTreeMap::new()).unwrap();
        let partial: Vec<(String, &Tensor)> = opt_a.state()[..1].iter().map(|(n, t)| (n.to_string(), *t)).collect();
        pending.write(&optim_file(0), Some(0), "optimizer", &partial, range_metadata(&opt_a)).unwrap();
        let dir = pending.commit(place().layout, opened.manifest.state.clone()).unwrap();
        let (mut d, mut opt_d) = model(desc(8), DType::F32, 4);
        let before = values(d.as_ref());
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, d.as_mut(), &mut opt_d).unwrap_err().to_string();
        assert!(e.contains("optim_rank00000.safetensors") && e.contains("tensor exp_avg_sq is missing"), "{e}");
        assert_eq!(values(d.as_ref()), before, "nothing loaded");
    }

    /// A recognizable optimizer state over the flat layout: element i of
    /// state tensor k is 100000 (k + 1) + i where it belongs to a parameter,
    /// zero in the alignment gaps and the padding.
    fn expected(flat: &FlatLayout, k: usize, range: Range<usize>) -> Vec<f64> {
        let mut v = vec![0.0; range.len()];
        for piece in flat.pieces(range.clone()) {
            for i in piece.flat_start..piece.flat_start + piece.len {
                v[i - range.start] = 100_000.0 * (k + 1) as f64 + i as f64;
            }
        }
        v
    }

    /// A checkpoint of `layout` (every rank's optimizer file) for model `m`.
    fn save_layout(store: &Store, step: u64, m: &dyn Model, layout: &Layout) -> PathBuf {
        let shards = if layout.zero_stage == 1 { layout.data_parallel } else { 1 };
        let flat = FlatLayout::new(&m.params(), shards);
        let mut pending = store.begin(step, 0).unwrap();
        let params = m.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, None, "parameters", &named, BTreeMap::new()).unwrap();
        let adamw = trainer_nn::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        for r in 0..shards {
            let mut opt = AdamW::for_range(adamw, &m.params(), flat.clone(), flat.shard(r)).unwrap();
            opt.step = 9;
            for (k, (_, t)) in opt.state_mut().into_iter().enumerate() {
                let values: Vec<f32> = expected(&flat, k, flat.shard(r)).into_iter().map(|x| x as f32).collect();
                t.copy_from_slice(&values).unwrap();
            }
            let named: Vec<(String, &Tensor)> = opt.state().into_iter().map(|(n, t)| (n.to_string(), t)).collect();
            let reader = (layout.zero_stage == 1).then_some(r);
            pending.write(&optim_file(r), reader, "optimizer", &named, range_metadata(&opt)).unwrap();
        }
        let data = (0..layout.world_size).map(|rank| DataPosition { rank, epoch: 1, index: 8 }).collect();
        pending.commit(layout.clone(), trainer_state(9, step, m.desc(), data)).unwrap()
    }

    fn layout(dp: usize, zero_stage: u32) -> Layout {
        Layout { world_size: dp, data_parallel: dp, zero_stage }
    }

    /// Every rank of every new layout gets exactly its range of the state,
    /// whichever layout wrote it: a new shard that spans two old files (3
    /// shards to 2), one inside a single old file (1 or 2 to 4), the padding
    /// of a longer layout (4 shards pad further than 1, 2 or 3) zero.
    #[test]
    fn optimizer_state_moves_between_layouts() {
        for dtype in [DType::F32, DType::BF16] {
            let (m, _) = model(desc(8), dtype, 1);
            let lens: Vec<usize> = (1..=4).map(|s| FlatLayout::new(&m.params(), s).len).collect();
            assert!(lens.iter().any(|&l| l != lens[0]), "the test needs layouts of other padding: {lens:?}");
            for old in [layout(1, 0), layout(2, 0), layout(2, 1), layout(3, 1), layout(4, 1)] {
                let tmp = tempfile::tempdir().unwrap();
                let store = Store::new(tmp.path(), 2);
                let dir = save_layout(&store, 4, m.as_ref(), &old);
                for new in [layout(1, 0), layout(2, 0), layout(2, 1), layout(3, 1), layout(4, 1)] {
                    let shards = if new.zero_stage == 1 { new.data_parallel } else { 1 };
                    let flat = FlatLayout::new(&m.params(), shards);
                    for rank in 0..new.data_parallel {
                        let range = flat.shard(if new.zero_stage == 1 { rank } else { 0 });
                        let (mut b, _) = model(desc(8), dtype, 2);
                        let adamw = trainer_nn::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
                        let mut opt = AdamW::for_range(adamw, &b.params(), flat.clone(), range.clone()).unwrap();
                        let mut opened = open(&dir, &for_rank(rank)).unwrap();
                        restore(&mut opened, b.as_mut(), &mut opt).unwrap();
                        assert_eq!(values(b.as_ref()), values(m.as_ref()));
                        assert_eq!(opt.step, 9);
                        let got = state_values(&opt);
                        assert_eq!(got.len(), if dtype == DType::BF16 { 3 } else { 2 });
                        for (k, (name, v)) in got.iter().enumerate() {
                            let want = expected(&flat, k, range.clone());
                            assert!(*v == want, "{dtype} {old:?} -> {new:?} rank {rank}: {name} differs");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn assembly_takes_each_part_from_its_file_and_leaves_padding_zero() {
        let like = Tensor::zeros([1], DType::F32, &Device::Cpu).unwrap();
        let t = |range: Range<usize>| {
            let v: Vec<f32> = range.clone().map(|i| i as f32).collect();
            Tensor::from_vec(v, [range.len()], &Device::Cpu).unwrap()
        };
        // Old files 0..8 and 8..12 (the old layout ends at 12); the new shard 5..16 spans both and padding.
        let (a, b) = (t(0..8), t(8..12));
        let got = assemble(&(5..16), &like, &[(&a, 0..8), (&b, 8..12)]).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 0.0, 0.0, 0.0, 0.0]);
        // A shard inside one file, and one entirely past the old layout's end.
        let got = assemble(&(9..11), &like, &[(&a, 0..8), (&b, 8..12)]).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, vec![9.0, 10.0]);
        let got = assemble(&(12..16), &like, &[]).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got, vec![0.0; 4]);
    }

    #[test]
    fn a_file_that_holds_another_range_than_its_layout_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 2);
        let (m, _) = model(desc(8), DType::F32, 1);
        let dir = save_layout(&store, 4, m.as_ref(), &layout(2, 1));
        // The manifest claims 4 shards, the files hold 2.
        let path = dir.join("manifest.json");
        let mut manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        manifest.layout = layout(4, 1);
        std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
        let (mut b, mut opt) = model(desc(8), DType::F32, 2);
        let before = values(b.as_ref());
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, b.as_mut(), &mut opt).unwrap_err().to_string();
        assert!(e.contains("optim_rank00000.safetensors") && e.contains("flat_range is 0.."), "{e}");
        assert_eq!(values(b.as_ref()), before, "nothing loaded");
        // A file of another rank that is needed now is checked against the manifest when it is read.
        let dir = save_layout(&store, 5, m.as_ref(), &layout(2, 1));
        let f = dir.join(optim_file(1));
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, b.as_mut(), &mut opt).unwrap_err().to_string();
        assert!(e.contains("optim_rank00001.safetensors") && e.contains("corrupt"), "{e}");
        assert_eq!(values(b.as_ref()), before, "nothing loaded");
    }

    fn manifest_with(layout: Layout, positions: &[(u64, usize)]) -> Manifest {
        let data = positions.iter().enumerate().map(|(rank, &(epoch, index))| DataPosition { rank, epoch, index });
        let state = trainer_state(3, 3, desc(8), data.collect());
        Manifest { format: "trainer-checkpoint".into(), version: 1, step: 3, layout, files: Vec::new(), state }
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
