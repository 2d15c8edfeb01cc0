//! Image folders (torchvision's ImageFolder layout: one subfolder of JPEG or
//! PNG files per class, the class names from the folder names, in sorted
//! order) decoded and resized once into image shards, so training reads no
//! JPEG at all; and single images decoded the same way for `trainer classify`.

use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rayon::prelude::*;

use crate::images::{CLASS_NAMES_FILE, ImageShape, write_image_shard};
use crate::{Error, Result, io_err};

/// File extensions read as images (any case).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Bytes of pixels per shard at most (a shard is decoded in memory before it is written).
const SHARD_BYTES: usize = 1 << 30;

fn input_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Input { path: path.display().to_string(), line: None, msg: msg.into() }
}

/// Decodes an image and makes it `size` x `size` with `channels` (1: gray, 3:
/// RGB): the shorter side resized to `size` (a triangle filter: bilinear with
/// antialiasing when shrinking), then the centre square cut out, as the usual
/// ImageNet preprocessing does before its crop. Pixels (H, W, C) row-major.
pub fn decode_image(path: &Path, size: usize, channels: usize) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| io_err(path, e))?
        .with_guessed_format()
        .map_err(|e| io_err(path, e))?
        .decode()
        .map_err(|e| input_err(path, format!("cannot decode the image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(input_err(path, "the image is empty"));
    }
    // Shorter side to `size`, the longer in proportion (rounded, at least `size`).
    let (nw, nh) =
        if w <= h { (size, (h * size).div_ceil(w).max(size)) } else { ((w * size).div_ceil(h).max(size), size) };
    let resized = img.resize_exact(nw as u32, nh as u32, FilterType::Triangle);
    let (left, top) = ((nw - size) / 2, (nh - size) / 2);
    let square = resized.crop_imm(left as u32, top as u32, size as u32, size as u32);
    match channels {
        1 => Ok(square.to_luma8().into_raw()),
        3 => Ok(square.to_rgb8().into_raw()),
        other => Err(Error::Invalid(format!("{other} channels: images are read as 1 (gray) or 3 (RGB)"))),
    }
}

/// Every image of a folder with its label.
pub type LabelledFiles = Vec<(PathBuf, u32)>;

/// The classes of an image folder (its subfolders, sorted) and every image
/// with its label, sorted by class then file name. An empty class folder, a
/// file that is not an image, or a folder without classes is an error naming it.
pub fn list_image_folder(dir: &Path) -> Result<(Vec<String>, LabelledFiles)> {
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut entries = Vec::new();
        for e in fs::read_dir(d).map_err(|e| io_err(d, e))? {
            let p = e.map_err(|e| io_err(d, e))?.path();
            // Hidden files (.DS_Store, editors' swap files) are not data.
            if !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                entries.push(p);
            }
        }
        entries.sort();
        Ok(entries)
    };
    let mut classes = Vec::new();
    let mut images = Vec::new();
    for class_dir in read_dir(dir)? {
        if !class_dir.is_dir() {
            return Err(input_err(
                &class_dir,
                "not a folder: an image folder holds one subfolder of images per class, and nothing else",
            ));
        }
        let name = class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let label = classes.len() as u32;
        let before = images.len();
        for file in read_dir(&class_dir)? {
            let ext = file.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if !file.is_file() || !ext.as_deref().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e)) {
                return Err(input_err(
                    &file,
                    format!("not an image file (expected a file named *.{})", IMAGE_EXTENSIONS.join(", *.")),
                ));
            }
            images.push((file, label));
        }
        if images.len() == before {
            return Err(input_err(&class_dir, format!("class folder \"{name}\" holds no images")));
        }
        classes.push(name);
    }
    if classes.is_empty() {
        return Err(input_err(dir, "holds no class folders (expected one subfolder of images per class)"));
    }
    Ok((classes, images))
}

/// What [`prepare_image_folders`] wrote.
#[derive(Debug)]
pub struct FolderReport {
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub files: Vec<PathBuf>,
}

/// Decodes the image folder `train` (and `val`, whose class folders must be
/// the same) into shards of `size` x `size` RGB images under `output`:
/// `train_NNNNNN.img`, `val_NNNNNN.img` and `classes.txt`. Images are decoded
/// in parallel; a file that does not decode stops the preparation with its
/// name (a data set that silently loses images is worse than one error).
pub fn prepare_image_folders(
    train: &Path,
    val: Option<&Path>,
    output: &Path,
    size: usize,
    overwrite: bool,
) -> Result<FolderReport> {
    if size == 0 {
        return Err(Error::Invalid("--size 0: images need at least one pixel".into()));
    }
    let (classes, train_images) = list_image_folder(train)?;
    let val_images = match val {
        Some(v) => {
            let (val_classes, images) = list_image_folder(v)?;
            if val_classes != classes {
                return Err(input_err(
                    v,
                    format!(
                        "its class folders ({}) differ from {}'s ({}): both splits need the same classes",
                        val_classes.len(),
                        train.display(),
                        classes.len()
                    ),
                ));
            }
            images
        }
        None => Vec::new(),
    };
    crate::prepare::clear_or_refuse(output, overwrite)?;
    let shape = ImageShape { height: size, width: size, channels: 3 };
    let per_shard = (SHARD_BYTES / shape.pixels()).max(1);
    let mut files = Vec::new();
    for (split, images) in [("train", &train_images), ("val", &val_images)] {
        for (k, chunk) in images.chunks(per_shard).enumerate() {
            let decoded: Vec<Vec<u8>> =
                chunk.par_iter().map(|(path, _)| decode_image(path, size, 3)).collect::<Result<_>>()?;
            let labels: Vec<u32> = chunk.iter().map(|(_, l)| *l).collect();
            let out = output.join(format!("{split}_{k:06}.img"));
            write_image_shard(&out, shape, classes.len(), &decoded.concat(), &labels)?;
            files.push(out);
        }
    }
    let names_out = output.join(CLASS_NAMES_FILE);
    fs::write(&names_out, classes.join("\n") + "\n").map_err(|e| io_err(&names_out, e))?;
    files.push(names_out);
    Ok(FolderReport { train_images: train_images.len(), val_images: val_images.len(), classes: classes.len(), files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::ImageShard;

    fn save(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
    }

    #[test]
    fn a_folder_becomes_shards_with_its_classes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        for (class, colour) in [("cat", [200, 10, 10]), ("dog", [10, 200, 10])] {
            fs::create_dir_all(root.join(class)).unwrap();
            // A wide PNG and a tall JPEG: both end up size x size.
            save(&root.join(class).join("a.png"), 40, 20, colour);
            save(&root.join(class).join("b.JPG"), 16, 30, colour);
        }
        let out = dir.path().join("out");
        let r = prepare_image_folders(&root, Some(&root), &out, 8, false).unwrap();
        assert_eq!((r.train_images, r.val_images, r.classes), (4, 4, 2));
        assert_eq!(fs::read_to_string(out.join(CLASS_NAMES_FILE)).unwrap(), "cat\ndog\n");
        let shard = ImageShard::open(&out.join("train_000000.img")).unwrap();
        assert_eq!(shard.shape(), ImageShape { height: 8, width: 8, channels: 3 });
        assert_eq!((0..4).map(|i| shard.label(i)).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
        // Solid colours stay those colours (JPEG within its rounding).
        for (i, want) in [(0, [200u8, 10, 10]), (3, [10, 200, 10])] {
            for px in shard.image(i).chunks(3) {
                assert!(px.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 3), "image {i}: {px:?} vs {want:?}");
            }
        }
        // A second run refuses to replace them without --overwrite.
        assert!(prepare_image_folders(&root, None, &out, 8, false).unwrap_err().to_string().contains("--overwrite"));
    }

    #[test]
    fn bad_folders_name_the_culprit() {
        let dir = tempfile::tempdir().unwrap();
        let root = &dir.path().join("images");
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(root.join("b")).unwrap();
        save(&root.join("a/x.png"), 4, 4, [1, 2, 3]);
        let e = list_image_folder(root).unwrap_err().to_string();
        assert!(e.contains("class folder \"b\" holds no images"), "{e}");
        fs::write(root.join("b/notes.txt"), "hi").unwrap();
        let e = list_image_folder(root).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("not an image file"), "{e}");
        fs::remove_file(root.join("b/notes.txt")).unwrap();
        fs::write(root.join("b/broken.jpg"), b"not a jpeg").unwrap();
        let e = prepare_image_folders(root, None, &dir.path().join("out"), 4, false).unwrap_err().to_string();
        assert!(e.contains("broken.jpg") && e.contains("cannot decode"), "{e}");
        fs::write(root.join("stray.png"), b"").unwrap();
        let e = list_image_folder(root).unwrap_err().to_string();
        assert!(e.contains("stray.png") && e.contains("not a folder"), "{e}");
    }
}
