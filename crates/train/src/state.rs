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
//! dtype, layout, every tensor's presence, shape and dtype) before it changes
//! anything, so a bad checkpoint never leaves a half-loaded model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use trainer_core::io::Loaded;
use trainer_core::{Tensor, ops};
use trainer_models::gpt::{Gpt, GptConfig};
use trainer_nn::{AdamW, Module};

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
    model: &Gpt,
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
        let config = serde_json::to_string(&model.config).map_err(|e| Error::Checkpoint {
            path: store.dir().display().to_string(),
            msg: format!("model config: {e}"),
        })?;
        pending.write(MODEL_FILE, None, "parameters", &named, BTreeMap::from([("gpt_config".into(), config)]))?;
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

/// Errors for a checkpoint this run cannot load (another model shape, dtype or
/// parallel layout); warnings for settings that make the continuation differ
/// from an uninterrupted run.
pub(crate) fn check_fit(
    manifest: &Manifest,
    manifest_path: &Path,
    gpt: &GptConfig,
    run: &RunShape,
    layout: &Layout,
) -> Result<Vec<String>> {
    let err = |msg: String| Error::Checkpoint { path: manifest_path.display().to_string(), msg };
    let theirs = &manifest.state.model;
    let diffs: Vec<String> = [
        ("vocab_size", theirs.vocab_size, gpt.vocab_size),
        ("block_size", theirs.block_size, gpt.block_size),
        ("n_layer", theirs.n_layer, gpt.n_layer),
        ("n_head", theirs.n_head, gpt.n_head),
        ("n_embd", theirs.n_embd, gpt.n_embd),
    ]
    .iter()
    .filter(|(_, a, b)| a != b)
    .map(|(k, a, b)| format!("model.{k} = {a} there, {b} here"))
    .collect();
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
    if manifest.layout != *layout {
        let (a, b) = (&manifest.layout, layout);
        return Err(err(format!(
            "was written by {} ranks (data parallel {}, ZeRO stage {}), this run has {} (data parallel {}, ZeRO \
             stage {}): resuming on another layout is not supported yet",
            a.world_size, a.data_parallel, a.zero_stage, b.world_size, b.data_parallel, b.zero_stage
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
    differs("training.grad_accum_steps", theirs.grad_accum_steps.to_string(), run.grad_accum_steps.to_string());
    differs("data.train", format!("{:?}", theirs.data_train), format!("{:?}", run.data_train));
    Ok(warnings)
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

/// Loads parameters and this rank's optimizer state (the file of rank
/// `optim_rank`, see [`Place::optim_rank`]) from a checkpoint opened with its
/// files; every tensor is checked before any is copied.
pub(crate) fn restore(opened: &mut Opened, model: &mut Gpt, opt: &mut AdamW, optim_rank: usize) -> Result<()> {
    let (model_path, mut model_file) = opened.take(MODEL_FILE)?;
    let (optim_path, mut optim_file) = opened.take(&optim_file(optim_rank))?;
    let values = model
        .params()
        .iter()
        .map(|p| stage(&mut model_file, &model_path, &p.name, &p.value))
        .collect::<Result<Vec<_>>>()?;
    let expected = range_metadata(opt);
    for (key, want) in &expected {
        let got = optim_file.metadata.get(key).map_or("none", String::as_str);
        if got != want {
            return Err(Error::Checkpoint {
                path: optim_path.display().to_string(),
                msg: format!("{key} is {got}, this run's optimizer state covers {want}"),
            });
        }
    }
    let states = opt
        .state()
        .into_iter()
        .map(|(name, like)| stage(&mut optim_file, &optim_path, name, like))
        .collect::<Result<Vec<_>>>()?;
    no_extra(&model_file, &model_path)?;
    no_extra(&optim_file, &optim_path)?;

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

    fn gpt(n_embd: usize) -> GptConfig {
        GptConfig { vocab_size: 100, block_size: 8, n_layer: 1, n_head: 2, n_embd }
    }

    fn model(cfg: GptConfig, dtype: DType, seed: u64) -> (Gpt, AdamW) {
        // Initialization runs in f32 on the CPU; a bf16 model gets the values cast.
        let mut f = Gpt::new(cfg.clone(), DType::F32, &Device::Cpu).unwrap();
        f.init(seed).unwrap();
        let mut m = Gpt::new(cfg, dtype, &Device::Cpu).unwrap();
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

    fn save_one(store: &Store, step: u64, m: &Gpt, opt: &AdamW) -> PathBuf {
        let state = TrainerState {
            optimizer_step: opt.step,
            schedule_step: step,
            data: vec![DataPosition { rank: 0, epoch: 0, index: 3 }],
            seed: 1,
            first_val_loss: None,
            last_train_loss: None,
            model: m.config.clone(),
            run: run_shape(),
            config: String::new(),
        };
        save(store, step, m, opt, &place(), state, &Hooks::default(), &ProcessGroup::single("world")).unwrap().unwrap()
    }

    fn values(m: &Gpt) -> Vec<Vec<f64>> {
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
            let (a, mut opt_a) = model(gpt(8), dtype, 1);
            touch(&mut opt_a, 0.5);
            let dir = save_one(&store, 5, &a, &opt_a);
            let (mut b, mut opt_b) = model(gpt(8), dtype, 2);
            assert_ne!(values(&a), values(&b));
            let mut opened = open(&dir, &for_rank(0)).unwrap();
            restore(&mut opened, &mut b, &mut opt_b, 0).unwrap();
            assert_eq!(values(&a), values(&b), "{dtype}");
            assert_eq!(opt_b.step, 7);
            assert_eq!(state_values(&opt_a), state_values(&opt_b), "{dtype}");
            assert_eq!(opt_b.state().iter().any(|(n, _)| *n == "master"), dtype == DType::BF16);
        }
    }

    #[test]
    fn another_shape_is_refused_without_touching_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 2);
        let (a, opt_a) = model(gpt(8), DType::F32, 1);
        let dir = save_one(&store, 5, &a, &opt_a);
        let manifest = dir.join("manifest.json");
        let opened = open(&dir, &for_rank(0)).unwrap();

        // The config-level check names the keys.
        let layout = place().layout;
        let e = check_fit(&opened.manifest, &manifest, &gpt(16), &run_shape(), &layout).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("model.n_embd = 8 there, 16 here"), "{e}");
        let mut bf16 = run_shape();
        bf16.dtype = "bf16".into();
        let e = check_fit(&opened.manifest, &manifest, &gpt(8), &bf16, &layout).unwrap_err().to_string();
        assert!(e.contains("training.dtype"), "{e}");
        let mut longer = run_shape();
        longer.seq_len = 4;
        let w = check_fit(&opened.manifest, &manifest, &gpt(8), &longer, &layout).unwrap();
        assert!(w.len() == 1 && w[0].contains("training.seq_len was 8"), "{w:?}");
        let two = Layout { world_size: 2, data_parallel: 2, zero_stage: 1 };
        let e = check_fit(&opened.manifest, &manifest, &gpt(8), &run_shape(), &two).unwrap_err().to_string();
        assert!(e.contains("1 ranks") && e.contains("ZeRO stage 1"), "{e}");

        // Past that check (a manifest that lies), the tensors are checked one by one.
        let (mut c, mut opt_c) = model(gpt(16), DType::F32, 3);
        let before = values(&c);
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, &mut c, &mut opt_c, 0).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("tensor transformer.wte.weight has shape"), "{e}");
        assert_eq!(values(&c), before, "nothing loaded");
        assert_eq!(opt_c.step, 0);

        // A missing optimizer tensor is found before the parameters are touched.
        let mut pending = store.begin(6, 0).unwrap();
        let params = a.params();
        let named: Vec<(String, &Tensor)> = params.iter().map(|p| (p.name.clone(), &p.value)).collect();
        pending.write(MODEL_FILE, None, "parameters", &named, BTreeMap::new()).unwrap();
        let partial: Vec<(String, &Tensor)> = opt_a.state()[..1].iter().map(|(n, t)| (n.to_string(), *t)).collect();
        pending.write(&optim_file(0), Some(0), "optimizer", &partial, range_metadata(&opt_a)).unwrap();
        let dir = pending.commit(place().layout, opened.manifest.state.clone()).unwrap();
        let (mut d, mut opt_d) = model(gpt(8), DType::F32, 4);
        let before = values(&d);
        let mut opened = open(&dir, &for_rank(0)).unwrap();
        let e = restore(&mut opened, &mut d, &mut opt_d, 0).unwrap_err().to_string();
        assert!(e.contains("optim_rank00000.safetensors") && e.contains("tensor exp_avg_sq is missing"), "{e}");
        assert_eq!(values(&d), before, "nothing loaded");
    }
}
