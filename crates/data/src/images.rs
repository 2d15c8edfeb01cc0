//! Image shards: labelled images prepared once into a memory-mapped file of
//! our own, so that training decodes no JPEG or PNG at all.
//!
//! Layout, little-endian:
//! - a header of 16 u32 (64 bytes): [0] magic "TIMG" (0x474D4954), [1]
//!   version 1, [2] and [3] the image count (low, high word), [4] height, [5]
//!   width, [6] channels, [7] classes, [8] bytes per label (2 or 4), the rest
//!   zero;
//! - then the pixels, uint8, each image (H, W, C) row-major, one after another;
//! - then the labels, u16 or u32, each below the class count.
//!
//! Opening a shard checks the header against the file size and every label
//! against the class count, so a truncated or corrupt shard fails before
//! training, naming the file.
//!
//! IDX files (MNIST, Fashion-MNIST; gzipped or not) are read by [`read_idx`]
//! and turned into shards by [`prepare_idx`].

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Error, Result, io_err};

const IMAGE_MAGIC: u32 = u32::from_le_bytes(*b"TIMG");
const IMAGE_VERSION: u32 = 1;
const IMAGE_HEADER_BYTES: usize = 64;

/// The shape every image of a shard has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl ImageShape {
    pub fn pixels(&self) -> usize {
        self.height * self.width * self.channels
    }
}

fn shard_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Shard { path: path.display().to_string(), msg: msg.into() }
}

/// Writes an image shard atomically (a temporary file in the same directory,
/// fsync'd, renamed into place). `pixels` holds `labels.len()` images of `shape`.
pub fn write_image_shard(path: &Path, shape: ImageShape, classes: usize, pixels: &[u8], labels: &[u32]) -> Result<()> {
    if pixels.len() != labels.len() * shape.pixels() {
        return Err(shard_err(
            path,
            format!(
                "{} pixel bytes for {} images of {shape:?}: expected {}",
                pixels.len(),
                labels.len(),
                labels.len() * shape.pixels()
            ),
        ));
    }
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
        return Err(shard_err(path, format!("label {l} of image {i} is not below the class count {classes}")));
    }
    let wide = classes > usize::from(u16::MAX) + 1;
    let count = labels.len() as u64;
    let mut header = [0u32; IMAGE_HEADER_BYTES / 4];
    header[..9].copy_from_slice(&[
        IMAGE_MAGIC,
        IMAGE_VERSION,
        count as u32,
        (count >> 32) as u32,
        shape.height as u32,
        shape.width as u32,
        shape.channels as u32,
        classes as u32,
        if wide { 4 } else { 2 },
    ]);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err(dir, e))?;
    let f = tmp.as_file_mut();
    f.write_all(bytemuck::cast_slice(&header)).map_err(|e| io_err(path, e))?;
    f.write_all(pixels).map_err(|e| io_err(path, e))?;
    if wide {
        f.write_all(bytemuck::cast_slice(labels)).map_err(|e| io_err(path, e))?;
    } else {
        let narrow: Vec<u16> = labels.iter().map(|&l| l as u16).collect();
        f.write_all(bytemuck::cast_slice(&narrow)).map_err(|e| io_err(path, e))?;
    }
    // The temporary file is private (0600); a shard is as readable as any output.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o644)).map_err(|e| io_err(path, e))?;
    }
    f.sync_all().map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e.error))?;
    Ok(())
}

/// A memory-mapped, validated image shard.
#[derive(Debug)]
pub struct ImageShard {
    path: PathBuf,
    mmap: Mmap,
    count: usize,
    shape: ImageShape,
    classes: usize,
    wide_labels: bool,
}

impl ImageShard {
    pub fn open(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the file is opened read-only and never written while mapped
        // (shards are written to a temporary name and renamed into place).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        if mmap.len() < IMAGE_HEADER_BYTES {
            return Err(shard_err(path, format!("{} bytes: shorter than the 64-byte header", mmap.len())));
        }
        let word = |i: usize| u32::from_le_bytes([mmap[4 * i], mmap[4 * i + 1], mmap[4 * i + 2], mmap[4 * i + 3]]);
        if word(0) != IMAGE_MAGIC {
            return Err(shard_err(path, "not an image shard (bad magic); prepare images with `trainer prepare`"));
        }
        if word(1) != IMAGE_VERSION {
            return Err(shard_err(path, format!("image shard version {} (this trainer reads version 1)", word(1))));
        }
        let count = (u64::from(word(2)) | (u64::from(word(3)) << 32)) as usize;
        let shape = ImageShape { height: word(4) as usize, width: word(5) as usize, channels: word(6) as usize };
        let (classes, label_bytes) = (word(7) as usize, word(8) as usize);
        if shape.pixels() == 0 || classes == 0 || !(label_bytes == 2 || label_bytes == 4) {
            return Err(shard_err(
                path,
                format!("bad header: {shape:?}, {classes} classes, {label_bytes}-byte labels"),
            ));
        }
        let want = IMAGE_HEADER_BYTES as u64 + count as u64 * (shape.pixels() + label_bytes) as u64;
        if mmap.len() as u64 != want {
            return Err(shard_err(
                path,
                format!(
                    "{} bytes but its header ({count} images of {shape:?}) needs {want}: truncated or corrupt",
                    mmap.len()
                ),
            ));
        }
        let shard = ImageShard { path: path.to_path_buf(), mmap, count, shape, classes, wide_labels: label_bytes == 4 };
        if let Some(i) = (0..count).find(|&i| shard.label(i) as usize >= classes) {
            return Err(shard_err(
                path,
                format!("label {} of image {i} is not below the class count {classes}", shard.label(i)),
            ));
        }
        Ok(shard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Image `i`'s pixels, (H, W, C) uint8.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.shape.pixels();
        &self.mmap[IMAGE_HEADER_BYTES + i * n..IMAGE_HEADER_BYTES + (i + 1) * n]
    }

    pub fn label(&self, i: usize) -> u32 {
        let at = IMAGE_HEADER_BYTES + self.count * self.shape.pixels();
        let m = &self.mmap;
        if self.wide_labels {
            let j = at + 4 * i;
            u32::from_le_bytes([m[j], m[j + 1], m[j + 2], m[j + 3]])
        } else {
            let j = at + 2 * i;
            u32::from(u16::from_le_bytes([m[j], m[j + 1]]))
        }
    }
}

/// An IDX file's dimensions and its uint8 data (gzipped files are
/// recognized by their content, not their name).
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = fs::read(path).map_err(|e| io_err(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| shard_err(path, format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    let bad = |msg: String| Error::Input { path: path.display().to_string(), line: None, msg };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (its first two bytes must be zero)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("IDX data type 0x{:02x}: only unsigned bytes (0x08) are read", bytes[2])));
    }
    let ndim = usize::from(bytes[3]);
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad(format!("truncated: {} bytes, the header of {ndim} dimensions needs {header}", bytes.len())));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| u32::from_be_bytes([bytes[4 + 4 * d], bytes[5 + 4 * d], bytes[6 + 4 * d], bytes[7 + 4 * d]]) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() != header + n {
        return Err(bad(format!("{} bytes of data, its dimensions {dims:?} need {n}", bytes.len() - header)));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Writes the image shard `output` from an IDX images file (N, H, W) or
/// (N, H, W, C) and an IDX labels file (N); returns the shard's image count.
/// The class count is `classes` (IDX does not hold it).
pub fn prepare_idx(images: &Path, labels: &Path, output: &Path, classes: usize) -> Result<usize> {
    let (idims, pixels) = read_idx(images)?;
    let (ldims, label_bytes) = read_idx(labels)?;
    let bad = |path: &Path, msg: String| Error::Input { path: path.display().to_string(), line: None, msg };
    let shape = match idims[..] {
        [_, h, w] => ImageShape { height: h, width: w, channels: 1 },
        [_, h, w, c] => ImageShape { height: h, width: w, channels: c },
        _ => return Err(bad(images, format!("dimensions {idims:?}: images must be (N, H, W) or (N, H, W, C)"))),
    };
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(bad(
            labels,
            format!("dimensions {ldims:?}: expected ({}), one label per image of {}", idims[0], images.display()),
        ));
    }
    let ids: Vec<u32> = label_bytes.iter().map(|&l| u32::from(l)).collect();
    if let Some((i, l)) = ids.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
        return Err(bad(labels, format!("label {l} of image {i} is not below the {classes} classes")));
    }
    write_image_shard(output, shape, classes, &pixels, &ids)?;
    Ok(ids.len())
}

/// The file beside a data set's image shards that names its classes, one per line.
pub const CLASS_NAMES_FILE: &str = "classes.txt";

/// The class names of a data set: one non-empty name per line of `path`.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    // Trailing blank lines are no classes.
    let names: Vec<String> = text.trim_end().lines().map(|l| l.trim().to_string()).collect();
    if let Some(i) = names.iter().position(String::is_empty) {
        return Err(Error::Input {
            path: path.display().to_string(),
            line: Some(i + 1),
            msg: "an empty class name".into(),
        });
    }
    if names.is_empty() {
        return Err(Error::Input { path: path.display().to_string(), line: None, msg: "no class names".into() });
    }
    Ok(names)
}

/// What [`prepare_idx_dataset`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxReport {
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub files: Vec<PathBuf>,
}

/// An IDX data set (MNIST, Fashion-MNIST) as image shards in `output_dir`:
/// `train_000000.img` from the `train` (images, labels) pair, `val_000000.img`
/// from `val`, and the class names (IDX holds none) copied into
/// [`CLASS_NAMES_FILE`]. Shards a previous prepare left there are replaced
/// only with `overwrite`.
pub fn prepare_idx_dataset(
    train: (&Path, &Path),
    val: Option<(&Path, &Path)>,
    class_names: &Path,
    output_dir: &Path,
    overwrite: bool,
) -> Result<IdxReport> {
    let names = read_class_names(class_names)?;
    crate::prepare::clear_or_refuse(output_dir, overwrite)?;
    let mut files = Vec::new();
    let mut counts = [0usize; 2];
    for (k, (split, pair)) in [("train", Some(train)), ("val", val)].into_iter().enumerate() {
        let Some((images, labels)) = pair else { continue };
        let out = output_dir.join(format!("{split}_000000.img"));
        counts[k] = prepare_idx(images, labels, &out, names.len())?;
        files.push(out);
    }
    let names_out = output_dir.join(CLASS_NAMES_FILE);
    fs::write(&names_out, names.join("\n") + "\n").map_err(|e| io_err(&names_out, e))?;
    files.push(names_out);
    Ok(IdxReport { train_images: counts[0], val_images: counts[1], classes: names.len(), files })
}

/// How a loader turns a stored image into a training or validation input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Training: a random resized crop (area `min_area`-100% of the image,
    /// aspect ratio 3/4-4/3, as torchvision's RandomResizedCrop, whose
    /// default `min_area` is 0.08; at 1 or more, the whole image), resized to
    /// the output size, then flipped left-right with probability 1/2 when `flip`.
    Random { min_area: f64, flip: bool },
    /// Validation: the centre `crop` fraction of each side (1 = the whole
    /// image), resized to the output size.
    CentreCrop { crop: f64 },
}

/// Micro-batches of images for one data-parallel rank, with the guarantees
/// of [`crate::BatchLoader`]: the images are shuffled once per epoch by a
/// generator seeded from (seed, epoch); micro-batch k is images k*B..(k+1)*B
/// of that order, and rank r of `world` takes micro-batches r, r + world, ...;
/// a [`crate::LoaderPosition`] counts the micro-batches all ranks together
/// have consumed, so it resumes the same on any number of ranks. Each image's
/// augmentation draws from a generator seeded by (seed, epoch, its place in
/// the order): the same on any number of ranks, and after a resume.
#[derive(Debug)]
pub struct ImageLoader {
    shards: Vec<ImageShard>,
    /// (shard, image) of every image.
    images: Vec<(usize, usize)>,
    order: Vec<usize>,
    b: usize,
    out: ImageShape,
    transform: Transform,
    shuffle: bool,
    seed: u64,
    rank: usize,
    world: usize,
    pos: crate::LoaderPosition,
}

impl ImageLoader {
    /// Every shard must hold images of one shape and class count; outputs are
    /// `out_size` x `out_size` with the shards' channels.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shards: Vec<ImageShard>,
        b: usize,
        out_size: usize,
        transform: Transform,
        (seed, shuffle): (u64, bool),
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        let first = shards.first().ok_or_else(|| Error::Invalid("no image shards".into()))?;
        let (shape, classes) = (first.shape(), first.classes());
        if let Some(other) = shards.iter().find(|s| s.shape() != shape || s.classes() != classes) {
            return Err(shard_err(
                other.path(),
                format!(
                    "holds {:?} images of {} classes, but {} holds {shape:?} of {classes}: shards of one data set must agree",
                    other.shape(),
                    other.classes(),
                    first.path().display()
                ),
            ));
        }
        if b == 0 || out_size == 0 || world == 0 || rank >= world {
            return Err(Error::Invalid(format!("bad loader shape b={b} size={out_size} rank={rank} world={world}")));
        }
        match transform {
            Transform::Random { min_area, .. } if !(min_area > 0.0 && min_area.is_finite()) => {
                return Err(Error::Invalid(format!("random crop area {min_area}: must be above 0 (1 = no crop)")));
            }
            Transform::CentreCrop { crop } if !(crop > 0.0 && crop <= 1.0) => {
                return Err(Error::Invalid(format!("centre crop {crop}: must be above 0 and at most 1")));
            }
            _ => {}
        }
        let images: Vec<(usize, usize)> =
            shards.iter().enumerate().flat_map(|(s, shard)| (0..shard.len()).map(move |i| (s, i))).collect();
        if images.len() / b < world {
            return Err(Error::Invalid(format!(
                "{} images make {} micro-batches of {b}, fewer than the {world} needed per step: use more data or a \
                 smaller batch",
                images.len(),
                images.len() / b
            )));
        }
        let out = ImageShape { height: out_size, width: out_size, channels: shape.channels };
        let mut loader = ImageLoader {
            shards,
            order: Vec::new(),
            images,
            b,
            out,
            transform,
            shuffle,
            seed,
            rank,
            world,
            pos: crate::LoaderPosition { epoch: 0, index: 0 },
        };
        let start = loader.pos;
        crate::Loader::seek(&mut loader, start);
        Ok(loader)
    }

    pub fn classes(&self) -> usize {
        self.shards[0].classes()
    }

    /// Image `slot` of the epoch's order, transformed into `dst` (the output shape).
    fn fill(&self, slot: usize, dst: &mut [u8]) -> u32 {
        use rand::{RngExt, SeedableRng};
        let (s, i) = self.images[self.order[slot]];
        let shard = &self.shards[s];
        let src = shard.image(i);
        let ImageShape { height: h, width: w, .. } = shard.shape();
        let (hf, wf) = (h as f64, w as f64);
        // Mixing in the epoch and the slot: every image of every epoch its own draws.
        let stream =
            self.pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (slot as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ stream);
        let (top, left, ch, cw, flip) = match self.transform {
            Transform::CentreCrop { crop } => {
                let (ch, cw) = (hf * crop, wf * crop);
                ((hf - ch) / 2.0, (wf - cw) / 2.0, ch, cw, false)
            }
            Transform::Random { min_area, flip } if min_area >= 1.0 => (0.0, 0.0, hf, wf, flip && rng.random_bool(0.5)),
            Transform::Random { min_area, flip } => {
                let area = hf * wf;
                let mut pick = None;
                for _ in 0..10 {
                    let target = area * rng.random_range(min_area..=1.0);
                    let ratio = rng.random_range((3f64 / 4.0).ln()..=(4f64 / 3.0).ln()).exp();
                    let (cw, ch) = ((target * ratio).sqrt(), (target / ratio).sqrt());
                    if cw <= wf && ch <= hf {
                        pick = Some((rng.random_range(0.0..=hf - ch), rng.random_range(0.0..=wf - cw), ch, cw));
                        break;
                    }
                }
                // As torchvision: after ten misses, the whole image.
                let (top, left, ch, cw) = pick.unwrap_or((0.0, 0.0, hf, wf));
                (top, left, ch, cw, flip && rng.random_bool(0.5))
            }
        };
        resize_bilinear(src, shard.shape(), (top, left, ch, cw), flip, dst, self.out);
        shard.label(i)
    }
}

/// The crop (top, left, height, width) of `src` resized to `out` bilinearly
/// (pixel centres aligned, as PIL and torchvision do without antialiasing),
/// mirrored left-right when `flip`.
fn resize_bilinear(
    src: &[u8],
    shape: ImageShape,
    (top, left, ch, cw): (f64, f64, f64, f64),
    flip: bool,
    dst: &mut [u8],
    out: ImageShape,
) {
    let (h, w, c) = (shape.height, shape.width, shape.channels);
    let (sy, sx) = (ch / out.height as f64, cw / out.width as f64);
    for oy in 0..out.height {
        let y = (top + (oy as f64 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f64);
        let (y0, fy) = (y.floor() as usize, y - y.floor());
        let y1 = (y0 + 1).min(h - 1);
        for ox in 0..out.width {
            let x = (left + (ox as f64 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f64);
            let (x0, fx) = (x.floor() as usize, x - x.floor());
            let x1 = (x0 + 1).min(w - 1);
            let tx = if flip { out.width - 1 - ox } else { ox };
            for k in 0..c {
                let p = |yy: usize, xx: usize| f64::from(src[(yy * w + xx) * c + k]);
                let v = (1.0 - fy) * ((1.0 - fx) * p(y0, x0) + fx * p(y0, x1))
                    + fy * ((1.0 - fx) * p(y1, x0) + fx * p(y1, x1));
                dst[(oy * out.width + tx) * c + k] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

impl crate::Loader for ImageLoader {
    fn new_batch(&self) -> crate::Batch {
        let ImageShape { height, width, channels } = self.out;
        crate::Batch::Images {
            b: self.b,
            height,
            width,
            channels,
            pixels: vec![0; self.b * self.out.pixels()],
            labels: vec![0; self.b],
        }
    }

    fn next_batch(&mut self, batch: &mut crate::Batch) {
        let per_epoch = self.images.len() / self.b;
        if self.pos.index + self.world > per_epoch {
            self.seek(crate::LoaderPosition { epoch: self.pos.epoch + 1, index: 0 });
        }
        let first = (self.pos.index + self.rank) * self.b;
        let n = self.out.pixels();
        match batch {
            crate::Batch::Images { pixels, labels, .. } => {
                use rayon::prelude::*;
                // In parallel: each image's draws depend only on its slot, so
                // the batch is the same whatever the thread count.
                let this = &*self;
                pixels.par_chunks_exact_mut(n).zip(labels.par_iter_mut()).enumerate().for_each(|(k, (img, label))| {
                    *label = this.fill(first + k, img);
                });
            }
            crate::Batch::Tokens { .. } => unreachable!("an image loader fills the batches it makes"),
        }
        self.pos.index += self.world;
    }

    fn position(&self) -> crate::LoaderPosition {
        self.pos
    }

    fn seek(&mut self, pos: crate::LoaderPosition) {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        self.pos = pos;
        self.order = (0..self.images.len()).collect();
        if self.shuffle {
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            self.order.shuffle(&mut rng);
        }
    }

    fn micro_batches(&self) -> usize {
        self.images.len() / self.b
    }

    fn batches_per_epoch(&self) -> usize {
        self.images.len() / self.b / self.world
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Write;

    use super::*;
    use crate::{Batch, Loader, LoaderPosition};

    const SHAPE: ImageShape = ImageShape { height: 6, width: 5, channels: 1 };

    /// `n` images whose every pixel is the image's number (mod 256), label number % classes.
    fn shard(dir: &Path, name: &str, first: usize, n: usize, classes: usize) -> ImageShard {
        let pixels: Vec<u8> = (first..first + n).flat_map(|i| vec![(i % 256) as u8; SHAPE.pixels()]).collect();
        let labels: Vec<u32> = (first..first + n).map(|i| (i % classes) as u32).collect();
        let path = dir.join(name);
        write_image_shard(&path, SHAPE, classes, &pixels, &labels).unwrap();
        ImageShard::open(&path).unwrap()
    }

    #[test]
    fn shards_round_trip_and_bad_ones_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = shard(dir.path(), "a.img", 0, 7, 3);
        assert_eq!((s.len(), s.shape(), s.classes()), (7, SHAPE, 3));
        assert!(s.image(4).iter().all(|&p| p == 4));
        assert_eq!((0..7).map(|i| s.label(i)).collect::<Vec<_>>(), vec![0, 1, 2, 0, 1, 2, 0]);
        // More classes than u16 holds: u32 labels.
        let wide = dir.path().join("wide.img");
        write_image_shard(&wide, SHAPE, 70_000, &vec![0; 2 * SHAPE.pixels()], &[69_999, 5]).unwrap();
        let w = ImageShard::open(&wide).unwrap();
        assert_eq!((w.label(0), w.label(1)), (69_999, 5));

        let path = dir.path().join("a.img");
        let bytes = fs::read(&path).unwrap();
        let bad = dir.path().join("bad.img");
        fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
        let e = ImageShard::open(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.img") && e.contains("truncated"), "{e}");
        let mut wrong = bytes.clone();
        wrong[0] ^= 1;
        fs::write(&bad, &wrong).unwrap();
        assert!(ImageShard::open(&bad).unwrap_err().to_string().contains("bad magic"));
        let mut label = bytes;
        let at = label.len() - 2;
        label[at] = 9; // the last label, 9 of 3 classes
        fs::write(&bad, &label).unwrap();
        let e = ImageShard::open(&bad).unwrap_err().to_string();
        assert!(e.contains("label 9 of image 6") && e.contains("class count 3"), "{e}");
        let e = write_image_shard(&bad, SHAPE, 3, &vec![0; SHAPE.pixels()], &[3]).unwrap_err().to_string();
        assert!(e.contains("label 3 of image 0"), "{e}");
    }

    fn idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) {
        let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            bytes = enc.finish().unwrap();
        }
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn idx_files_become_shards() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pixels: Vec<u8> = (0..3 * 4 * 2).map(|i| i as u8).collect();
        idx(&d.join("images.gz"), &[3, 4, 2], &pixels, true);
        idx(&d.join("labels"), &[3], &[2, 0, 1], false);
        assert_eq!(read_idx(&d.join("images.gz")).unwrap(), (vec![3, 4, 2], pixels.clone()));
        let n = prepare_idx(&d.join("images.gz"), &d.join("labels"), &d.join("s.img"), 3).unwrap();
        assert_eq!(n, 3);
        let s = ImageShard::open(&d.join("s.img")).unwrap();
        assert_eq!(s.shape(), ImageShape { height: 4, width: 2, channels: 1 });
        assert_eq!(s.image(1), &pixels[8..16]);
        assert_eq!(s.label(0), 2);
        // Mismatched counts, a label past the classes, something that is not IDX.
        idx(&d.join("two"), &[2], &[0, 1], false);
        let e = prepare_idx(&d.join("images.gz"), &d.join("two"), &d.join("x.img"), 3).unwrap_err().to_string();
        assert!(e.contains("two") && e.contains("one label per image"), "{e}");
        let e = prepare_idx(&d.join("images.gz"), &d.join("labels"), &d.join("x.img"), 2).unwrap_err().to_string();
        assert!(e.contains("labels") && e.contains("label 2 of image 0"), "{e}");
        fs::write(d.join("text"), "hello").unwrap();
        let e = read_idx(&d.join("text")).unwrap_err().to_string();
        assert!(e.contains("text") && e.contains("not an IDX file"), "{e}");
    }

    #[test]
    fn an_idx_data_set_becomes_train_and_val_shards_with_its_class_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        idx(&d.join("tr-images.gz"), &[3, 2, 2], &[7; 12], true);
        idx(&d.join("tr-labels.gz"), &[3], &[0, 2, 1], true);
        idx(&d.join("va-images"), &[1, 2, 2], &[9; 4], false);
        idx(&d.join("va-labels"), &[1], &[1], false);
        fs::write(d.join("names.txt"), "cat\ndog\nbird\n").unwrap();
        let out = d.join("out");
        let train = (d.join("tr-images.gz"), d.join("tr-labels.gz"));
        let val = (d.join("va-images"), d.join("va-labels"));
        let run = |overwrite| {
            prepare_idx_dataset((&train.0, &train.1), Some((&val.0, &val.1)), &d.join("names.txt"), &out, overwrite)
        };
        let r = run(false).unwrap();
        assert_eq!((r.train_images, r.val_images, r.classes), (3, 1, 3));
        assert_eq!(read_class_names(&out.join(CLASS_NAMES_FILE)).unwrap(), ["cat", "dog", "bird"]);
        assert_eq!(ImageShard::open(&out.join("val_000000.img")).unwrap().label(0), 1);
        let e = run(false).unwrap_err().to_string();
        assert!(e.contains("--overwrite"), "{e}");
        run(true).unwrap();
        // Two names for labels up to 2: the label is out of range, naming the file.
        fs::write(d.join("names.txt"), "cat\ndog\n").unwrap();
        let e = run(true).unwrap_err().to_string();
        assert!(e.contains("tr-labels.gz") && e.contains("label 2 of image 1"), "{e}");
        fs::write(d.join("names.txt"), "cat\n\ndog\n").unwrap();
        let e = run(true).unwrap_err().to_string();
        assert!(e.contains("names.txt:2") && e.contains("empty class name"), "{e}");
    }

    fn loader(dir: &Path, rank: usize, world: usize, transform: Transform) -> ImageLoader {
        let shards = vec![shard(dir, "a.img", 0, 10, 4), shard(dir, "b.img", 10, 13, 4)];
        ImageLoader::new(shards, 2, 4, transform, (7, true), rank, world).unwrap()
    }

    fn labels_of(b: &Batch) -> Vec<u32> {
        match b {
            Batch::Images { labels, .. } => labels.clone(),
            Batch::Tokens { .. } => unreachable!(),
        }
    }

    fn pixels_of(b: &Batch) -> Vec<u8> {
        match b {
            Batch::Images { pixels, .. } => pixels.clone(),
            Batch::Tokens { .. } => unreachable!(),
        }
    }

    #[test]
    fn ranks_get_disjoint_images_augmentation_is_seeded_and_resume_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let crop = Transform::Random { min_area: 0.08, flip: true };
        // 23 images, micro-batches of 2: 11 per epoch; 3 ranks take 3 each (9 of 11).
        let mut ranks: Vec<ImageLoader> = (0..3).map(|r| loader(dir.path(), r, 3, crop)).collect();
        assert_eq!(ranks[0].batches_per_epoch(), 3);
        let mut seen = HashSet::new();
        let mut batch = ranks[0].new_batch();
        let mut together = Vec::new();
        for _ in 0..3 {
            for l in &mut ranks {
                l.next_batch(&mut batch);
                together.push(pixels_of(&batch));
                // Every pixel of an image is its number: the crop keeps it, so it names the image.
                for img in pixels_of(&batch).chunks(16) {
                    assert!(img.iter().all(|&p| p == img[0]), "one image per slot");
                    assert!(seen.insert(img[0]), "image {} served twice", img[0]);
                }
            }
        }
        assert_eq!(seen.len(), 18);
        // One rank reads the same images in the same order, with the same
        // augmentation, as the three together.
        let mut one = loader(dir.path(), 0, 1, crop);
        let mut b2 = one.new_batch();
        for (k, theirs) in together.iter().enumerate() {
            one.next_batch(&mut b2);
            assert_eq!(&pixels_of(&b2), theirs, "micro-batch {k}");
        }
        // A loader moved to a saved position continues identically, into the next epoch.
        let pos = one.position();
        let mut resumed = loader(dir.path(), 0, 1, crop);
        resumed.seek(pos);
        for _ in 0..12 {
            one.next_batch(&mut batch);
            resumed.next_batch(&mut b2);
            assert_eq!((labels_of(&batch), pixels_of(&batch)), (labels_of(&b2), pixels_of(&b2)));
        }
        assert_eq!(one.position().epoch, 1);
    }

    #[test]
    fn the_random_crop_varies_and_the_centre_crop_of_the_whole_image_is_a_resize() {
        let dir = tempfile::tempdir().unwrap();
        // A gradient image: pixel (y, x) = 40 y + x.
        let shape = ImageShape { height: 4, width: 4, channels: 1 };
        let img: Vec<u8> = (0..16).map(|i| (40 * (i / 4) + i % 4) as u8).collect();
        let path = dir.path().join("g.img");
        write_image_shard(&path, shape, 1, &[img.clone(), img.clone(), img.clone(), img.clone()].concat(), &[0; 4])
            .unwrap();
        let open = || vec![ImageShard::open(&path).unwrap()];
        let mut whole = ImageLoader::new(open(), 1, 4, Transform::CentreCrop { crop: 1.0 }, (1, false), 0, 1).unwrap();
        let mut b = whole.new_batch();
        whole.next_batch(&mut b);
        assert_eq!(pixels_of(&b), img, "the same size, the whole image: unchanged");
        let random_crop = Transform::Random { min_area: 0.08, flip: true };
        let mut random = ImageLoader::new(open(), 1, 4, random_crop, (1, false), 0, 1).unwrap();
        let crops: HashSet<Vec<u8>> = (0..4)
            .map(|_| {
                random.next_batch(&mut b);
                pixels_of(&b)
            })
            .collect();
        assert!(crops.len() > 1, "four draws, one crop: {crops:?}");
        random.seek(LoaderPosition { epoch: 0, index: 0 });
        random.next_batch(&mut b);
        assert!(crops.contains(&pixels_of(&b)), "the same slot, the same crop");
    }
}
