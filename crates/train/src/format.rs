//! What a checkpoint holds for the trainer, and putting it back.
//!
//! Every tensor is stored under its parameter's name with the slice of the
//! parameter it holds ([`Slice`]), so a checkpoint does not depend on the
//! layout that wrote it:
//!
//! - `model.safetensors` (rank 0): every parameter whole, with the model's
//!   description in its metadata: also a weights file for `trainer eval`.
//! - `optim_rankNNNNN.safetensors`: AdamW's state of the parameter elements
//!   that a rank updates, per parameter: `<name>.exp_avg`, `<name>.exp_avg_sq`
//!   and, for half-precision parameters, the f32 `<name>.master`. The state
//!   of a whole parameter has the parameter's shape; that of a part (a ZeRO-1
//!   shard edge cuts through the parameter) is flat. Under ZeRO-1 every rank
//!   writes the parameters of its shard; otherwise rank 0 writes all of them
//!   (every rank holds the same). The file's metadata and its manifest entry
//!   list its slices.
//! - The manifest (rank 0, after gathering every rank's file entries and data
//!   position): counters, every rank's data position, the seed, the configs.
//!
//! A resume reads only the optimizer files that hold some of the elements
//! this rank updates, whatever layout wrote them, and checks everything (the
//! parameters' presence, shape and dtype; every element it needs covered
//! exactly once) before it changes anything, so a bad checkpoint never leaves
//! a half-loaded model. Checkpoints of format version 1 (one flat optimizer
//! state over the whole parameter layout) still load: see [`optimizer_state_v1`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use trainer_comm::ProcessGroup;
use trainer_core::io::Loaded;
use trainer_core::ops::Span;
use trainer_core::{Device, Tensor, ops};
use trainer_models::{Model, ModelDesc};
use trainer_nn::{AdamW, FlatLayout, Param, trainable};

use crate::checkpoint::{FileEntry, Layout, Opened, SLICES_KEY, Slice, Store, TrainerState};
use crate::hooks::Hooks;
use crate::{Error, Result};

pub(crate) const MODEL_FILE: &str = "model.safetensors";

pub(crate) fn optim_file(rank: usize) -> String {
    format!("optim_rank{rank:05}.safetensors")
}

/// What a file's entry says it holds.
const PARAMETERS: &str = "parameters";
const OPTIMIZER: &str = "optimizer";

/// Which rank this process is, and how the state is split over all of them.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub rank: usize,
    pub layout: Layout,
}

impl Place {
    /// Whether this rank writes an optimizer file: every rank under ZeRO-1
    /// (each updates its own shard), else rank 0 alone (every rank holds the same).
    fn writes_optimizer(&self) -> bool {
        self.layout.zero_stage == 1 || self.rank == 0
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
    if rank == 0 {
        let params = model.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        let slices = params.iter().map(|p| (p.name.clone(), Slice::whole(p.value.dims()))).collect();
        pending.write(MODEL_FILE, (None, PARAMETERS), &named, slices, weights_metadata(&model.desc()))?;
    }
    if place.writes_optimizer() {
        // Unsharded state is one file that every rank reads back.
        let reader = (place.layout.zero_stage == 1).then_some(rank);
        let (tensors, slices) = optimizer_tensors(&trainable(&model.params()), opt)?;
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        pending.write(&optim_file(rank), (reader, OPTIMIZER), &named, slices, BTreeMap::new())?;
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

/// The name of a parameter's optimizer state tensor: `<parameter>.<state>`.
fn state_name(param: &str, state: &str) -> String {
    format!("{param}.{state}")
}

/// Tensors by name, and the parameter slices they hold.
type NamedSlices = (Vec<(String, Tensor)>, BTreeMap<String, Slice>);

/// This rank's optimizer state as tensors named after their parameters (on
/// the host), and the slice of each parameter they hold.
fn optimizer_tensors(params: &[&Param], opt: &AdamW) -> Result<NamedSlices> {
    let range = opt.range();
    let slices: Vec<Slice> = opt
        .pieces()
        .iter()
        .map(|piece| Slice {
            shape: params[piece.param].value.dims().to_vec(),
            start: piece.param_start,
            end: piece.param_start + piece.len,
        })
        .collect();
    let mut tensors = Vec::new();
    for (state, flat) in opt.state() {
        let host = flat.to_device(&Device::Cpu)?;
        let mut parts = slices
            .iter()
            .map(|s| {
                Tensor::zeros(if s.is_whole() { s.shape.clone() } else { vec![s.len()] }, host.dtype(), &Device::Cpu)
            })
            .collect::<trainer_core::Result<Vec<_>>>()?;
        let pairs: Vec<(Span, Span)> = opt
            .pieces()
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let len = piece.len;
                (Span { tensor: i, start: 0, len }, Span { tensor: 0, start: piece.flat_start - range.start, len })
            })
            .collect();
        ops::copy_spans(&mut parts.iter_mut().collect::<Vec<_>>(), &[&host], &pairs)?;
        for (piece, part) in opt.pieces().iter().zip(parts) {
            tensors.push((state_name(&params[piece.param].name, state), part));
        }
    }
    let names = opt.pieces().iter().map(|piece| params[piece.param].name.clone());
    Ok((tensors, names.zip(slices).collect()))
}

/// This rank's optimizer state (the range `opt` covers of its flat layout,
/// on the host) from the optimizer files of a version 2 checkpoint: each file
/// that holds some of it is read (and checked: its slices against the
/// manifest's, every tensor it needs present with the right dtype and
/// length); every element must be covered exactly once. Alignment gaps and
/// padding of the flat layout belong to no parameter and stay zero.
fn optimizer_state(opened: &mut Opened, model: &dyn Model, opt: &AdamW) -> Result<Vec<Tensor>> {
    let all = model.params();
    // The optimizer's pieces index the trainable parameters; the files may
    // name any parameter of the model (a frozen one's state is an error).
    let params = trainable(&all);
    let range = opt.range();
    let likes = opt.state();
    let mut out = likes
        .iter()
        .map(|(_, like)| Tensor::zeros([range.len()], like.dtype(), &Device::Cpu))
        .collect::<trainer_core::Result<Vec<_>>>()?;
    // The pieces of each parameter this rank updates (one, unless the
    // parameter is also cut by this rank's shard edge: never twice today).
    let mut wanted: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, piece) in opt.pieces().iter().enumerate() {
        wanted.entry(params[piece.param].name.as_str()).or_default().push(i);
    }
    let piece_range = |i: usize| {
        let p = &opt.pieces()[i];
        p.param_start..p.param_start + p.len
    };
    // Per piece, the parameter elements found so far.
    let mut found: Vec<Vec<Range<usize>>> = vec![Vec::new(); opt.pieces().len()];
    let entries: Vec<FileEntry> = opened.manifest.files.iter().filter(|f| f.holds == OPTIMIZER).cloned().collect();
    for entry in entries {
        let needed = entry.slices.iter().any(|(name, slice)| {
            wanted
                .get(name.as_str())
                .is_some_and(|ps| ps.iter().any(|&i| overlap(&piece_range(i), &(slice.start..slice.end)).is_some()))
        });
        if !needed {
            continue;
        }
        let (path, mut file) = opened.take_or_load(&entry.name)?;
        let err = |msg: String| Error::Checkpoint { path: path.display().to_string(), msg };
        let listed: Option<BTreeMap<String, Slice>> =
            file.metadata.get(SLICES_KEY).and_then(|m| serde_json::from_str(m).ok());
        if listed.as_ref() != Some(&entry.slices) {
            return Err(err("its slices metadata differs from the manifest's entry for it".into()));
        }
        for (name, slice) in &entry.slices {
            let Some(param) = all.iter().find(|p| p.name == *name) else {
                return Err(err(format!("holds optimizer state of {name}, which is not a parameter of this model")));
            };
            if !param.trainable() {
                // Frozen in this run (fine-tuning from a run that trained it): no state is kept for it.
                for (state, _) in &likes {
                    file.tensors.remove(&state_name(name, state));
                }
                continue;
            }
            if slice.shape != param.value.dims() || slice.end > param.value.numel() || slice.start > slice.end {
                return Err(err(format!(
                    "holds elements {}..{} of {name} of shape {:?}, but this model's {name} has shape {}",
                    slice.start,
                    slice.end,
                    slice.shape,
                    param.value.shape()
                )));
            }
            let pieces: Vec<usize> = wanted.get(name.as_str()).cloned().unwrap_or_default();
            for ((state, like), dst) in likes.iter().zip(&mut out) {
                let tname = state_name(name, state);
                let t = file.tensors.remove(&tname).ok_or_else(|| err(format!("tensor {tname} is missing")))?;
                if t.numel() != slice.len() || t.dtype() != like.dtype() {
                    return Err(err(format!(
                        "tensor {tname} is {} {} but elements {}..{} of {name} need {} {}",
                        t.dtype(),
                        t.shape(),
                        slice.start,
                        slice.end,
                        slice.len(),
                        like.dtype()
                    )));
                }
                let pairs: Vec<(Span, Span)> = pieces
                    .iter()
                    .filter_map(|&i| {
                        let both = overlap(&piece_range(i), &(slice.start..slice.end))?;
                        let at = opt.pieces()[i].flat_start - range.start + (both.start - piece_range(i).start);
                        Some((
                            Span { tensor: 0, start: at, len: both.len() },
                            Span { tensor: 0, start: both.start - slice.start, len: both.len() },
                        ))
                    })
                    .collect();
                if !pairs.is_empty() {
                    ops::copy_spans(&mut [dst], &[&t], &pairs)?;
                }
            }
            for &i in &pieces {
                found[i].extend(overlap(&piece_range(i), &(slice.start..slice.end)));
            }
        }
        no_extra(&file, &path)?;
    }
    let manifest = opened.dir.join("manifest.json");
    for (i, ranges) in found.iter_mut().enumerate() {
        let name = &params[opt.pieces()[i].param].name;
        let want = piece_range(i);
        ranges.sort_by_key(|r| r.start);
        let mut next = want.start;
        for r in ranges.iter() {
            if r.start != next {
                let msg = if r.start < next {
                    format!("holds elements {}..{} of {name}'s optimizer state twice", r.start, next.min(r.end))
                } else {
                    format!("no optimizer file holds elements {next}..{} of {name}", r.start)
                };
                return Err(Error::Checkpoint { path: manifest.display().to_string(), msg });
            }
            next = r.end;
        }
        if next != want.end {
            return Err(Error::Checkpoint {
                path: manifest.display().to_string(),
                msg: format!("no optimizer file holds elements {next}..{} of {name}", want.end),
            });
        }
    }
    Ok(out)
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

/// [`optimizer_state`] from a checkpoint of format version 1, whose
/// optimizer files each hold one flat range of the parameters' flat layout
/// (`trainer_nn::FlatLayout`, padded for the shards of the layout that
/// wrote it) as tensors `exp_avg`, `exp_avg_sq` and `master`. The flat
/// layout is the same for every number of shards but for the zero padding at
/// its end, so each rank assembles the flat range it owns now from the parts
/// of whichever files hold it; every file it reads is checked (its range,
/// every tensor) first.
fn optimizer_state_v1(opened: &mut Opened, model: &dyn Model, opt: &AdamW) -> Result<Vec<Tensor>> {
    let theirs = opened.manifest.layout.clone();
    let flat =
        FlatLayout::new(&trainable(&model.params()), if theirs.zero_stage == 1 { theirs.data_parallel } else { 1 });
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
    let states = if opened.manifest.version == 1 {
        optimizer_state_v1(opened, model, opt)?
    } else {
        optimizer_state(opened, model, opt)?
    };

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
pub(crate) mod tests {
    use trainer_core::{DType, Device};

    use super::*;
    use crate::checkpoint::{DataPosition, Manifest, RunShape, for_rank, open};

    /// A one-layer model of the default kind, `n_embd` wide, as a config's `[model]` describes it.
    pub(crate) fn desc(n_embd: usize) -> ModelDesc {
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
        let opt = AdamW::new(adamw(), &m.params()).unwrap();
        (m, opt)
    }

    fn adamw() -> trainer_nn::AdamWConfig {
        trainer_nn::AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }

    pub(crate) fn run_shape() -> RunShape {
        RunShape { dtype: "f32".into(), micro_batch_size: 2, seq_len: 8, grad_accum_steps: 1, data_train: "x".into() }
    }

    fn place() -> Place {
        Place { rank: 0, layout: Layout { world_size: 1, data_parallel: 1, zero_stage: 0 } }
    }

    /// The state a run in these tests saves: steps, model and data positions as given.
    pub(crate) fn trainer_state(
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

    /// Fills the optimizer state with recognizable values, as after some
    /// updates: the elements of parameters (the update never writes the
    /// alignment gaps and padding between them, which stay zero).
    fn touch(opt: &mut AdamW, x: f32) {
        opt.step = 7;
        let start = opt.range().start;
        let owned: Vec<Range<usize>> =
            opt.pieces().iter().map(|p| p.flat_start - start..p.flat_start - start + p.len).collect();
        for (i, (_, t)) in opt.state_mut().into_iter().enumerate() {
            let n = t.numel();
            let mut values = vec![0f32; n];
            for j in owned.iter().flat_map(|r| r.clone()) {
                values[j] = x * (i + 1) as f32 + j as f32 / n as f32;
            }
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

    /// Optimizer tensors are named after their parameters, whole ones with
    /// the parameter's shape, and the file lists its slices in its metadata.
    #[test]
    fn optimizer_tensors_are_named_after_their_parameters() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 2);
        let (a, opt_a) = model(desc(8), DType::BF16, 1);
        let dir = save_one(&store, 5, a.as_ref(), &opt_a);
        let loaded = trainer_core::io::load(&dir.join(optim_file(0))).unwrap();
        let t = &loaded.tensors["transformer.h.0.attn.c_attn.weight.exp_avg"];
        assert_eq!(t.dims(), [24, 8]);
        for state in ["exp_avg", "exp_avg_sq", "master"] {
            assert!(loaded.tensors.contains_key(&format!("transformer.ln_f.bias.{state}")), "{state}");
        }
        assert_eq!(loaded.tensors.len(), 3 * a.params().len());
        let slices: BTreeMap<String, Slice> = serde_json::from_str(&loaded.metadata[SLICES_KEY]).unwrap();
        assert_eq!(slices["transformer.wpe.weight"], Slice { shape: vec![8, 8], start: 0, end: 64 });
        let manifest: Manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest.files.iter().find(|f| f.name == optim_file(0)).unwrap().slices, slices);
    }

    #[test]
    fn a_checkpoint_of_another_shape_or_missing_state_is_refused_without_touching_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 2);
        let (a, opt_a) = model(desc(8), DType::F32, 1);
        let dir = save_one(&store, 5, a.as_ref(), &opt_a);
        let opened = open(&dir, &for_rank(0)).unwrap();

        // Past the resume rules' check (a manifest that lies), the tensors are checked one by one.
        let (mut c, mut opt_c) = model(desc(16), DType::F32, 3);
        let before = values(c.as_ref());
        let mut reopened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut reopened, c.as_mut(), &mut opt_c).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("tensor transformer.wte.weight has shape"), "{e}");
        assert_eq!(values(c.as_ref()), before, "nothing loaded");
        assert_eq!(opt_c.step, 0);

        // A missing optimizer tensor is found before the parameters are touched.
        let mut pending = store.begin(6, 0).unwrap();
        let params = a.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, (None, PARAMETERS), &named, BTreeMap::new(), BTreeMap::new()).unwrap();
        let (tensors, slices) = optimizer_tensors(&params, &opt_a).unwrap();
        let partial: Vec<(String, &Tensor)> =
            tensors.iter().filter(|(n, _)| !n.ends_with(".exp_avg_sq")).map(|(n, t)| (n.clone(), t)).collect();
        pending.write(&optim_file(0), (Some(0), OPTIMIZER), &partial, slices, BTreeMap::new()).unwrap();
        let dir = pending.commit(place().layout, opened.manifest.state.clone()).unwrap();
        let (mut d, mut opt_d) = model(desc(8), DType::F32, 4);
        let before = values(d.as_ref());
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, d.as_mut(), &mut opt_d).unwrap_err().to_string();
        assert!(e.contains("optim_rank00000.safetensors") && e.contains(".exp_avg_sq is missing"), "{e}");
        assert_eq!(values(d.as_ref()), before, "nothing loaded");
    }

    /// A recognizable optimizer state over `range` of the flat layout: state
    /// tensor k of element e of parameter p is 1e6 (k + 1) + 1e4 p + e, the
    /// same whatever the layout; zero in the alignment gaps and the padding.
    fn expected(flat: &FlatLayout, k: usize, range: Range<usize>) -> Vec<f64> {
        let mut v = vec![0.0; range.len()];
        for piece in flat.pieces(range.clone()) {
            for i in 0..piece.len {
                let e = piece.param_start + i;
                v[piece.flat_start + i - range.start] = 1e6 * (k + 1) as f64 + 1e4 * piece.param as f64 + e as f64;
            }
        }
        v
    }

    /// A checkpoint of `layout` (every rank's optimizer file) for model `m`,
    /// in format `version`: 2 as [`save`] writes it, or 1 as the trainer
    /// wrote it before (each file one flat range of the parameters' flat
    /// layout, `flat_range` and `flat_len` in its metadata).
    fn save_layout(store: &Store, step: u64, m: &dyn Model, layout: &Layout, version: u32) -> PathBuf {
        let shards = if layout.zero_stage == 1 { layout.data_parallel } else { 1 };
        let flat = FlatLayout::new(&m.params(), shards);
        let mut pending = store.begin(step, 0).unwrap();
        let params = m.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, (None, PARAMETERS), &named, BTreeMap::new(), weights_metadata(&m.desc())).unwrap();
        for r in 0..shards {
            let mut opt = AdamW::for_range(adamw(), &m.params(), flat.clone(), flat.shard(r)).unwrap();
            opt.step = 9;
            for (k, (_, t)) in opt.state_mut().into_iter().enumerate() {
                let values: Vec<f32> = expected(&flat, k, flat.shard(r)).into_iter().map(|x| x as f32).collect();
                t.copy_from_slice(&values).unwrap();
            }
            let reader = (layout.zero_stage == 1).then_some(r);
            if version == 1 {
                let named: Vec<(String, &Tensor)> = opt.state().into_iter().map(|(n, t)| (n.to_string(), t)).collect();
                let range = opt.range();
                let meta = BTreeMap::from([
                    ("flat_range".to_string(), format!("{}..{}", range.start, range.end)),
                    ("flat_len".to_string(), flat.len.to_string()),
                ]);
                pending.write(&optim_file(r), (reader, OPTIMIZER), &named, BTreeMap::new(), meta).unwrap();
            } else {
                let (tensors, slices) = optimizer_tensors(&params, &opt).unwrap();
                let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
                pending.write(&optim_file(r), (reader, OPTIMIZER), &named, slices, BTreeMap::new()).unwrap();
            }
        }
        let data = (0..layout.world_size).map(|rank| DataPosition { rank, epoch: 1, index: 8 }).collect();
        let dir = pending.commit(layout.clone(), trainer_state(9, step, m.desc(), data)).unwrap();
        if version == 1 {
            // Version 1's manifest: its model is the bare GPT-2 config.
            let path = dir.join("manifest.json");
            let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            json["version"] = 1.into();
            json["state"]["model"] = json["state"]["model"]["config"].take();
            std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        }
        dir
    }

    pub(crate) fn layout(dp: usize, zero_stage: u32) -> Layout {
        Layout { world_size: dp, data_parallel: dp, zero_stage }
    }

    /// Every rank of every new layout gets exactly its range of the state,
    /// whichever layout wrote it, in either format: a new shard that spans
    /// two old files (3 shards to 2), one inside a single old file (1 or 2 to
    /// 4), a parameter cut by a shard edge of the old layout and not the new
    /// one and the reverse, the padding of a longer layout (4 shards pad
    /// further than 1, 2 or 3) zero.
    #[test]
    fn optimizer_state_moves_between_layouts() {
        for version in [2, 1] {
            for dtype in [DType::F32, DType::BF16] {
                let (m, _) = model(desc(8), dtype, 1);
                let lens: Vec<usize> = (1..=4).map(|s| FlatLayout::new(&m.params(), s).len).collect();
                assert!(lens.iter().any(|&l| l != lens[0]), "the test needs layouts of other padding: {lens:?}");
                for old in [layout(1, 0), layout(2, 0), layout(2, 1), layout(3, 1), layout(4, 1)] {
                    let tmp = tempfile::tempdir().unwrap();
                    let store = Store::new(tmp.path(), 2);
                    let dir = save_layout(&store, 4, m.as_ref(), &old, version);
                    for new in [layout(1, 0), layout(2, 0), layout(2, 1), layout(3, 1), layout(4, 1)] {
                        let shards = if new.zero_stage == 1 { new.data_parallel } else { 1 };
                        let flat = FlatLayout::new(&m.params(), shards);
                        for rank in 0..new.data_parallel {
                            let range = flat.shard(if new.zero_stage == 1 { rank } else { 0 });
                            let (mut b, _) = model(desc(8), dtype, 2);
                            let mut opt = AdamW::for_range(adamw(), &b.params(), flat.clone(), range.clone()).unwrap();
                            let mut opened = open(&dir, &for_rank(rank)).unwrap();
                            assert_eq!(opened.manifest.version, version);
                            restore(&mut opened, b.as_mut(), &mut opt).unwrap();
                            assert_eq!(values(b.as_ref()), values(m.as_ref()));
                            assert_eq!(opt.step, 9);
                            let got = state_values(&opt);
                            assert_eq!(got.len(), if dtype == DType::BF16 { 3 } else { 2 });
                            for (k, (name, v)) in got.iter().enumerate() {
                                let want = expected(&flat, k, range.clone());
                                assert!(
                                    *v == want,
                                    "version {version} {dtype} {old:?} -> {new:?} rank {rank}: {name} differs"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Saving, loading on another layout and saving again gives the same
    /// tensors, byte for byte: a ZeRO-1 checkpoint of 3 ranks read back by
    /// one process and written again holds, per parameter, exactly what the
    /// three files held together.
    #[test]
    fn save_load_save_on_another_layout_gives_the_same_tensors() {
        let (m, _) = model(desc(8), DType::BF16, 1);
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 5);
        let dir = save_layout(&store, 4, m.as_ref(), &layout(3, 1), 2);
        let (mut b, mut opt) = model(desc(8), DType::BF16, 2);
        restore(&mut open(&dir, &for_rank(0)).unwrap(), b.as_mut(), &mut opt).unwrap();
        let again = save_one(&store, 5, b.as_ref(), &opt);
        // Whole parameters from the pieces the three files hold, as bytes.
        let mut pieces: BTreeMap<String, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
        for r in 0..3 {
            let loaded = trainer_core::io::load(&dir.join(optim_file(r))).unwrap();
            let slices: BTreeMap<String, Slice> = serde_json::from_str(&loaded.metadata[SLICES_KEY]).unwrap();
            for (name, t) in &loaded.tensors {
                let param = name.rsplit_once('.').unwrap().0;
                pieces.entry(name.clone()).or_default().push((slices[param].start, t.host_bytes().unwrap().to_vec()));
            }
        }
        let written = trainer_core::io::load(&again.join(optim_file(0))).unwrap();
        assert_eq!(written.tensors.len(), pieces.len());
        for (name, mut parts) in pieces {
            parts.sort_by_key(|p| p.0);
            let joined: Vec<u8> = parts.into_iter().flat_map(|p| p.1).collect();
            assert!(written.tensors[&name].host_bytes().unwrap() == joined.as_slice(), "{name} differs");
        }
        let model_bytes = |d: &Path| std::fs::read(d.join(MODEL_FILE)).unwrap();
        let (a, b) = (
            trainer_core::io::load(&dir.join(MODEL_FILE)).unwrap(),
            trainer_core::io::load(&again.join(MODEL_FILE)).unwrap(),
        );
        for (name, t) in &a.tensors {
            assert!(t.host_bytes().unwrap() == b.tensors[name].host_bytes().unwrap(), "{name} differs");
        }
        assert!(!model_bytes(&again).is_empty());
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

    /// Rewrites a checkpoint's manifest through `edit`.
    fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
        let path = dir.join("manifest.json");
        let mut manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut manifest);
        std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
    }

    #[test]
    fn files_that_do_not_hold_what_the_manifest_says_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 10);
        let (m, _) = model(desc(8), DType::F32, 1);
        let (mut b, mut opt) = model(desc(8), DType::F32, 2);
        let before = values(b.as_ref());
        let mut refused = |dir: &Path, needles: &[&str]| {
            let mut opened = open(dir, &for_rank(0)).unwrap();
            let e = restore(&mut opened, b.as_mut(), &mut opt).unwrap_err().to_string();
            assert!(needles.iter().all(|n| e.contains(n)), "{e}");
            assert_eq!(values(b.as_ref()), before, "nothing loaded");
        };
        // Version 1: the manifest claims 4 shards, the files hold 2.
        let dir = save_layout(&store, 1, m.as_ref(), &layout(2, 1), 1);
        let path = dir.join("manifest.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["layout"] = serde_json::to_value(layout(4, 1)).unwrap();
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        refused(&dir, &["optim_rank00000.safetensors", "flat_range is 0.."]);
        // Version 2: a file's slices differ from its manifest entry's.
        let dir = save_layout(&store, 2, m.as_ref(), &layout(2, 1), 2);
        edit_manifest(&dir, |mf| {
            let f = mf.files.iter_mut().find(|f| f.name == optim_file(1)).unwrap();
            f.slices.values_mut().next().unwrap().end += 1;
        });
        refused(&dir, &["optim_rank00001.safetensors", "slices"]);
        // A file the manifest does not list leaves elements uncovered.
        let dir = save_layout(&store, 3, m.as_ref(), &layout(2, 1), 2);
        edit_manifest(&dir, |mf| mf.files.retain(|f| f.name != optim_file(1)));
        refused(&dir, &["manifest.json", "no optimizer file holds elements"]);
        // A file of another rank that is needed now is checked against the manifest when it is read.
        let dir = save_layout(&store, 4, m.as_ref(), &layout(2, 1), 2);
        let f = dir.join(optim_file(1));
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        refused(&dir, &["optim_rank00001.safetensors", "corrupt"]);
    }
}
