//! Checkpoint directories on disk: the manifest, atomic saves, verification,
//! pruning, and choosing the one to resume from. What the trainer puts into a
//! checkpoint is `format.rs`'s business and which one to resume `resume.rs`'s;
//! this file knows files and directories.
//!
//! `<checkpoint.dir>` holds:
//!
//! ```text
//! step_00000100/
//!   manifest.json                 format version, step, parallel layout, each file's
//!                                 size and sha256, the trainer's counters and config
//!   model.safetensors             (written by rank 0) parameters
//!   optim_rank00000.safetensors   optimizer state per parameter: rank 0's, or one per
//!                                 rank under ZeRO-1 (each file lists the slices it holds)
//! .step_00000200.partial/         a save in progress, or one that was killed: never read
//! .step_00000050.deleting/        a checkpoint being pruned or replaced: never read
//! ```
//!
//! A save: rank 0 creates `.step_N.partial`; every rank writes its files there and
//! fsyncs them; rank 0 writes the manifest last, fsyncs it and the directory,
//! renames the directory to `step_N` (atomic) and fsyncs the parent. So a
//! `step_N` directory always had a complete manifest, and a process killed at any
//! moment leaves the previous checkpoints as they were. Reading still checks every
//! file against the manifest's size and hash: disks, copies and people fail.
//!
//! With several ranks the caller puts a barrier between [`Store::begin`] on rank
//! 0 and the other ranks' writes, and gathers every rank's [`FileEntry`]s to rank
//! 0 (see [`PendingSave::add_entries`]) before it commits (the trainer's
//! `format::save` does both).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype as StDtype, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trainer_core::io::{self, Loaded};
use trainer_core::{Device, Tensor};
use trainer_models::ModelDesc;

use crate::{Error, Result};

/// Written into every manifest; a reader refuses other formats and newer versions.
pub const FORMAT: &str = "trainer-checkpoint";
/// Version 2 stores every tensor under its parameter's name with the slice it
/// holds (version 1 kept the optimizer state as one flat range over all
/// parameters, readable only by the same model code; see `format.rs`).
pub const VERSION: u32 = 2;
const MANIFEST: &str = "manifest.json";

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), err: e }
}

/// How the state is split over ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub world_size: usize,
    pub data_parallel: usize,
    /// 0: rank 0's optimizer file holds the whole optimizer state, which every
    /// rank reads back; 1 (ZeRO-1): each data-parallel rank writes and reads its
    /// own file with its 1/dp of the masters and moments. (A resume on another
    /// layout reads whichever files hold the range a rank owns now.)
    pub zero_stage: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// A plain file name inside the checkpoint directory.
    pub name: String,
    /// The rank that wrote it and reads it back; none for a file every rank reads.
    pub rank: Option<usize>,
    /// What it holds: "parameters", "optimizer".
    pub holds: String,
    pub bytes: u64,
    pub sha256: String,
    /// Which slice of which parameter (by name) its tensors hold; the file's
    /// metadata says the same.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub slices: BTreeMap<String, Slice>,
}

/// Which slice of a parameter a checkpoint's tensors hold: elements
/// `start..end` of the parameter in its own row-major element order, and the
/// parameter's global shape. A whole parameter is `0..numel`; a ZeRO shard's
/// piece of one any contiguous range. The same slice means the same elements
/// whichever layout wrote it, so any later layout reads the ones it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl Slice {
    /// All of a parameter of `shape`.
    pub fn whole(shape: &[usize]) -> Slice {
        Slice { shape: shape.to_vec(), start: 0, end: shape.iter().product() }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn is_whole(&self) -> bool {
        self.start == 0 && self.end == self.shape.iter().product::<usize>()
    }
}

/// The metadata key under which a file lists its [`Slice`]s (JSON: parameter name -> slice).
pub const SLICES_KEY: &str = "slices";

/// Where one rank's training data loader was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub rank: usize,
    pub epoch: u64,
    /// Windows consumed in this epoch by all ranks together.
    pub index: usize,
}

/// The settings that decide which batches come next and how tensors are
/// stored; a resume compares them with the new config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunShape {
    pub dtype: String,
    pub micro_batch_size: usize,
    pub seq_len: usize,
    pub grad_accum_steps: usize,
    pub data_train: String,
}

/// Everything besides tensors that the trainer needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// AdamW's update count (its bias correction).
    pub optimizer_step: u64,
    /// The learning rate of the next update is the schedule's at this position.
    pub schedule_step: u64,
    /// Every rank's training data position.
    pub data: Vec<DataPosition>,
    /// The run's only randomness: initialization and each epoch's shuffle are
    /// drawn from generators seeded by it (the shuffle from (seed, epoch)).
    pub seed: u64,
    pub first_val_loss: Option<f64>,
    pub last_train_loss: Option<f64>,
    /// The model's kind and shape.
    pub model: ModelDesc,
    pub run: RunShape,
    /// The job's config, as TOML.
    pub config: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Optimizer updates applied: training continues with step + 1.
    pub step: u64,
    pub layout: Layout,
    pub files: Vec<FileEntry>,
    pub state: TrainerState,
}

/// The checkpoints of one run, in one directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    keep_last: usize,
}

impl Store {
    /// `keep_last`: saving prunes all but this many of the newest checkpoints.
    pub fn new(dir: impl Into<PathBuf>, keep_last: usize) -> Self {
        Store { dir: dir.into(), keep_last: keep_last.max(1) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step_{step:08}"))
    }

    fn hidden(&self, step: u64, what: &str) -> PathBuf {
        self.dir.join(format!(".step_{step:08}.{what}"))
    }

    /// Directories named `step_N`, newest first; their contents are not checked here.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let name = entry.file_name();
            let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step_")).and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found)
    }

    /// Removes what interrupted saves and deletions left behind (rank 0, before
    /// training); returns what it removed.
    pub fn remove_leftovers(&self) -> Result<Vec<PathBuf>> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Ok(Vec::new()) };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step_") && (name.ends_with(".partial") || name.ends_with(".deleting")) {
                fs::remove_dir_all(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Starts the save of the checkpoint of `step`. Rank 0 creates the temporary
    /// directory (replacing one a killed save left); other ranks must wait for it.
    pub fn begin(&self, step: u64, rank: usize) -> Result<PendingSave> {
        let tmp = self.hidden(step, "partial");
        if rank == 0 {
            fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
            if tmp.exists() {
                fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            }
            fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
        }
        Ok(PendingSave { store: self.clone(), step, tmp, files: Vec::new() })
    }

    /// The newest checkpoint whose files check out (those `wanted` fully, the
    /// others by size), loaded; a newer one that does not check out is skipped
    /// with a warning through `warn`.
    pub fn latest(&self, wanted: &dyn Fn(&FileEntry) -> bool, warn: &dyn Fn(&str)) -> Result<Option<Opened>> {
        for (_, dir) in self.list()? {
            match open(&dir, wanted) {
                Ok(opened) => return Ok(Some(opened)),
                Err(e) => warn(&format!("skipping {}: {e}", dir.display())),
            }
        }
        Ok(None)
    }

    /// Deletes all but the newest `keep_last` checkpoints up to `newest`
    /// (directories without a manifest, which no save of ours leaves, are left alone).
    fn prune(&self, newest: u64) -> Result<()> {
        let complete = self.list()?.into_iter().filter(|(s, d)| *s <= newest && d.join(MANIFEST).is_file());
        let old = complete.skip(self.keep_last);
        for (step, dir) in old {
            self.delete(step, &dir)?;
        }
        Ok(())
    }

    /// Renames first, so that a process killed while deleting leaves a hidden
    /// directory and never a `step_N` missing half its files.
    fn delete(&self, step: u64, dir: &Path) -> Result<()> {
        let trash = self.hidden(step, "deleting");
        if trash.exists() {
            fs::remove_dir_all(&trash).map_err(|e| io_err(&trash, e))?;
        }
        fs::rename(dir, &trash).map_err(|e| io_err(dir, e))?;
        fs::remove_dir_all(&trash).map_err(|e| io_err(&trash, e))
    }
}

/// A checkpoint being written into its temporary directory.
#[derive(Debug)]
pub struct PendingSave {
    store: Store,
    step: u64,
    tmp: PathBuf,
    files: Vec<FileEntry>,
}

/// A tensor as safetensors sees it, copied to the host only when written, so
/// that a file of GPU tensors never needs all of them in host memory at once.
struct Streamed<'a> {
    tensor: &'a Tensor,
    dtype: StDtype,
    /// A device error in `data()` (which cannot return one), reported after the write.
    failed: &'a RefCell<Option<trainer_core::Error>>,
}

impl View for Streamed<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if let Ok(bytes) = self.tensor.host_bytes() {
            return Cow::Borrowed(bytes);
        }
        match self.tensor.to_device(&Device::Cpu).and_then(|h| h.host_bytes().map(<[u8]>::to_vec)) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.size_in_bytes()
    }
}

impl PendingSave {
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Writes one safetensors file of `tensors` (on any device) into the
    /// checkpoint, fsyncs it and records its size, hash and the parameter
    /// slices it holds (also written into its metadata).
    pub fn write(
        &mut self,
        name: &str,
        (rank, holds): (Option<usize>, &str),
        tensors: &[(String, &Tensor)],
        slices: BTreeMap<String, Slice>,
        mut metadata: BTreeMap<String, String>,
    ) -> Result<()> {
        let path = self.tmp.join(name);
        if Path::new(name).file_name().is_none_or(|n| n != name) {
            return Err(err(&path, "a checkpoint file name must be a plain file name"));
        }
        let listed = serde_json::to_string(&slices).map_err(|e| err(&path, format!("slices: {e}")))?;
        metadata.insert(SLICES_KEY.into(), listed);
        let failed = RefCell::new(None);
        let views = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), Streamed { tensor: t, dtype: io::st_dtype(t.dtype()), failed: &failed }));
        let meta: HashMap<String, String> = metadata.into_iter().collect();
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| err(&path, e.to_string()))?;
        if let Some(e) = failed.into_inner() {
            return Err(e.into());
        }
        // The writer's temporary file is private (0600); a checkpoint is as readable as other outputs.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(|e| io_err(&path, e))?;
        }
        File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io_err(&path, e))?;
        let (bytes, sha256) = hash_file(&path)?;
        self.files.push(FileEntry { name: name.to_string(), rank, holds: holds.to_string(), bytes, sha256, slices });
        Ok(())
    }

    /// The files this rank wrote (to send to rank 0).
    pub fn entries(&self) -> &[FileEntry] {
        &self.files
    }

    /// Other ranks' files, gathered on rank 0 before it commits.
    pub fn add_entries(&mut self, entries: impl IntoIterator<Item = FileEntry>) {
        self.files.extend(entries);
    }

    /// Rank 0: writes the manifest and moves the checkpoint into place, replacing
    /// a checkpoint of the same step (one that failed to verify); then prunes.
    pub fn commit(self, layout: Layout, state: TrainerState) -> Result<PathBuf> {
        let manifest =
            Manifest { format: FORMAT.into(), version: VERSION, step: self.step, layout, files: self.files, state };
        let path = self.tmp.join(MANIFEST);
        let json = serde_json::to_string_pretty(&manifest).map_err(|e| err(&path, e.to_string()))?;
        write_synced(&path, json.as_bytes())?;
        sync_dir(&self.tmp)?;
        let target = self.store.step_dir(self.step);
        if target.exists() {
            self.store.delete(self.step, &target)?;
        }
        fs::rename(&self.tmp, &target).map_err(|e| io_err(&target, e))?;
        sync_dir(self.store.dir())?;
        self.store.prune(self.step)?;
        Ok(target)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io_err(path, e))
}

/// Makes a directory's entries (a new file, a rename) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_err(dir, e))
}

/// Size and hex SHA-256 of a file, read in chunks.
fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((total, hex))
}

/// A checked checkpoint: its manifest and the files that were asked for.
#[derive(Debug)]
pub struct Opened {
    pub dir: PathBuf,
    pub manifest: Manifest,
    files: BTreeMap<String, Loaded>,
}

impl Opened {
    /// Takes a loaded file's tensors; the file must be in the manifest and among those opened.
    pub fn take(&mut self, name: &str) -> Result<(PathBuf, Loaded)> {
        let path = self.dir.join(name);
        match self.files.remove(name) {
            Some(l) => Ok((path, l)),
            None => Err(err(&self.dir.join(MANIFEST), format!("lists no file {name}"))),
        }
    }

    /// Like [`Opened::take`], but a listed file that [`open`] did not load
    /// (another rank's, needed when resuming on another layout) is read now
    /// and checked against the manifest's size and SHA-256 first.
    pub fn take_or_load(&mut self, name: &str) -> Result<(PathBuf, Loaded)> {
        if self.files.contains_key(name) {
            return self.take(name);
        }
        let Some(entry) = self.manifest.files.iter().find(|f| f.name == name) else {
            return Err(err(&self.dir.join(MANIFEST), format!("lists no file {name}")));
        };
        let path = self.dir.join(name);
        let (bytes, sha) = hash_file(&path)?;
        if bytes != entry.bytes {
            return Err(err(
                &path,
                format!("{bytes} bytes but the manifest says {}: truncated or overwritten", entry.bytes),
            ));
        }
        if sha != entry.sha256 {
            return Err(err(&path, "SHA-256 differs from the manifest's: the file is corrupt"));
        }
        let loaded = io::load(&path)?;
        Ok((path, loaded))
    }
}

/// The files every rank reads and this rank's own.
pub fn for_rank(rank: usize) -> impl Fn(&FileEntry) -> bool {
    move |f| f.rank.is_none_or(|r| r == rank)
}

/// A version 1 manifest in version 2's terms: its model was always GPT-2,
/// described by the bare GPT-2 config. Its `version` stays 1: its optimizer
/// files are read by `format.rs`'s version 1 path.
fn upgrade_v1_manifest(json: &mut serde_json::Value) {
    let model = json["state"]["model"].take();
    json["state"]["model"] = serde_json::json!({ "kind": "gpt", "config": model });
}

/// Reads and checks a checkpoint directory: the manifest's format and version,
/// every listed file's presence and size, and for the `wanted` files their
/// SHA-256 and safetensors structure (those are loaded into host memory).
/// Nothing outside the returned value is touched.
pub fn open(dir: &Path, wanted: &dyn Fn(&FileEntry) -> bool) -> Result<Opened> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err(dir, "no manifest.json: not a (complete) checkpoint directory"),
        _ => io_err(&path, e),
    })?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(&path, format!("unreadable: {e}")))?;
    let format = json["format"].as_str().unwrap_or("none");
    if format != FORMAT {
        return Err(err(&path, format!("format \"{format}\" is not \"{FORMAT}\"")));
    }
    match json["version"].as_u64() {
        Some(v) if v == u64::from(VERSION) => {}
        Some(1) => upgrade_v1_manifest(&mut json),
        v => {
            let v = v.map_or("none".to_string(), |v| v.to_string());
            return Err(err(&path, format!("format version {v} (this trainer reads versions 1 and {VERSION})")));
        }
    }
    let manifest: Manifest = serde_json::from_value(json).map_err(|e| err(&path, format!("unreadable: {e}")))?;
    for f in &manifest.files {
        if Path::new(&f.name).file_name().is_none_or(|n| n != f.name.as_str()) {
            return Err(err(&path, format!("file name {:?} is not a plain file name", f.name)));
        }
        let file = dir.join(&f.name);
        let len = fs::metadata(&file).map_err(|e| io_err(&file, e))?.len();
        if len != f.bytes {
            return Err(err(&file, format!("{len} bytes but the manifest says {}: truncated or overwritten", f.bytes)));
        }
    }
    let mut files = BTreeMap::new();
    for f in manifest.files.iter().filter(|f| wanted(f)) {
        let file = dir.join(&f.name);
        let (_, sha) = hash_file(&file)?;
        if sha != f.sha256 {
            return Err(err(&file, "SHA-256 differs from the manifest's: the file is corrupt"));
        }
        files.insert(f.name.clone(), io::load(&file)?);
    }
    Ok(Opened { dir: dir.to_path_buf(), manifest, files })
}

/// `path` is a checkpoint directory (it has a manifest) or a directory of them
/// (the newest complete one is taken).
pub fn resolve(path: &Path, wanted: &dyn Fn(&FileEntry) -> bool, warn: &dyn Fn(&str)) -> Result<Opened> {
    if path.join(MANIFEST).exists() {
        return open(path, wanted);
    }
    if !path.is_dir() {
        return Err(err(path, "no such directory"));
    }
    Store::new(path, 1)
        .latest(wanted, warn)?
        .ok_or_else(|| err(path, "holds no complete checkpoint (no step_N directory with a manifest.json)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainerState {
        TrainerState {
            optimizer_step: 3,
            schedule_step: 3,
            data: vec![DataPosition { rank: 0, epoch: 1, index: 4 }],
            seed: 7,
            first_val_loss: Some(10.5),
            last_train_loss: None,
            model: ModelDesc { kind: "some_model".into(), config: serde_json::json!({"width": 2}) },
            run: RunShape {
                dtype: "fp32".into(),
                micro_batch_size: 1,
                seq_len: 4,
                grad_accum_steps: 1,
                data_train: "x".into(),
            },
            config: "[model]\n".into(),
        }
    }

    fn layout() -> Layout {
        Layout { world_size: 1, data_parallel: 1, zero_stage: 0 }
    }

    fn save(store: &Store, step: u64, value: f32) -> PathBuf {
        let a = Tensor::from_vec(vec![value; 6], [2, 3], &Device::Cpu).unwrap();
        let mut p = store.begin(step, 0).unwrap();
        p.write("a.safetensors", (None, "parameters"), &[("a".into(), &a)], BTreeMap::new(), BTreeMap::new()).unwrap();
        p.commit(layout(), state()).unwrap()
    }

    fn all(_: &FileEntry) -> bool {
        true
    }

    #[test]
    fn save_open_round_trip_and_pruning() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("ck"), 2);
        for step in [10, 20, 30] {
            save(&store, step, step as f32);
        }
        let steps: Vec<u64> = store.list().unwrap().iter().map(|s| s.0).collect();
        assert_eq!(steps, vec![30, 20], "keeps the newest two");
        let mut o = store.latest(&all, &|w| panic!("{w}")).unwrap().unwrap();
        assert_eq!(o.manifest.step, 30);
        assert_eq!(o.manifest.state.data[0], DataPosition { rank: 0, epoch: 1, index: 4 });
        let (path, mut l) = o.take("a.safetensors").unwrap();
        assert_eq!(l.take(&path, "a").unwrap().to_vec::<f32>().unwrap(), vec![30.0; 6]);
        // Saving a step again replaces it.
        save(&store, 30, -1.0);
        let mut o = open(&store.step_dir(30), &all).unwrap();
        let (path, mut l) = o.take("a.safetensors").unwrap();
        assert_eq!(l.take(&path, "a").unwrap().to_vec::<f32>().unwrap(), vec![-1.0; 6]);
    }

    #[test]
    fn partial_and_corrupt_checkpoints_are_skipped_with_a_warning() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 5);
        save(&store, 1, 1.0);
        save(&store, 2, 2.0);
        save(&store, 3, 3.0);
        // A save that never committed: not listed, removed as a leftover.
        let p = store.begin(4, 0).unwrap();
        drop(p);
        assert_eq!(store.list().unwrap().len(), 3, "the partial save is not listed");
        // A step directory without a manifest (say, half copied by hand), step 3
        // truncated, step 2 with a flipped byte.
        fs::create_dir(store.step_dir(9)).unwrap();
        let f3 = store.step_dir(3).join("a.safetensors");
        let len = fs::metadata(&f3).unwrap().len();
        File::options().write(true).open(&f3).unwrap().set_len(len - 4).unwrap();
        let f2 = store.step_dir(2).join("a.safetensors");
        let mut bytes = fs::read(&f2).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&f2, bytes).unwrap();
        let warnings = RefCell::new(Vec::new());
        let o = store.latest(&all, &|w| warnings.borrow_mut().push(w.to_string())).unwrap().unwrap();
        assert_eq!(o.manifest.step, 1);
        let w = warnings.into_inner();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("step_00000009") && w[0].contains("no manifest.json"), "{}", w[0]);
        assert!(w[1].contains("step_00000003") && w[1].contains("truncated"), "{}", w[1]);
        assert!(w[2].contains("step_00000002") && w[2].contains("corrupt"), "{}", w[2]);
        let removed = store.remove_leftovers().unwrap();
        assert_eq!(removed, vec![tmp.path().join(".step_00000004.partial")]);
    }

    #[test]
    fn bad_manifests_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path(), 5);
        let dir = save(&store, 1, 1.0);
        let m = dir.join(MANIFEST);
        let text = fs::read_to_string(&m).unwrap();
        fs::write(&m, text.replace("\"version\": 2", "\"version\": 99")).unwrap();
        let e = open(&dir, &all).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("version 99"), "{e}");
        fs::write(&m, "{").unwrap();
        let e = open(&dir, &all).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("unreadable"), "{e}");
        fs::write(&m, text.replace("a.safetensors", "../a.safetensors")).unwrap();
        let e = open(&dir, &all).unwrap_err().to_string();
        assert!(e.contains("plain file name"), "{e}");
        fs::remove_file(&m).unwrap();
        let e = resolve(tmp.path(), &all, &|_| {}).unwrap_err().to_string();
        assert!(e.contains("no complete checkpoint"), "{e}");
    }
}
