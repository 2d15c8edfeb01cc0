//! Token shards in the format of llm.c and modded-nanogpt, so their preprocessed
//! datasets (FineWeb, TinyStories, ...) train unchanged:
//!
//! - a header of 256 little-endian i32: [0] magic 20240520, [1] version,
//!   [2] token count, the rest zero (1024 bytes);
//! - then the tokens: version 1 as u16, version 2 (ours, for vocabularies over
//!   65,535) as u32, little-endian.
//!
//! Shards are memory-mapped; opening one checks the header against the file size.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::{Error, Result, io_err};

pub const MAGIC: i32 = 20240520;
pub const HEADER_BYTES: usize = 1024;
const VERSION_U16: i32 = 1;
const VERSION_U32: i32 = 2;

#[cfg(target_endian = "big")]
compile_error!("token shards are little-endian and are memory-mapped as is");

/// Writes a shard atomically (temporary name, fsync, rename); version 1 when
/// every id fits in u16, else version 2.
pub fn write_shard(path: &Path, tokens: &[u32]) -> Result<()> {
    let wide = tokens.iter().any(|&t| t > u16::MAX as u32);
    let mut header = [0i32; HEADER_BYTES / 4];
    header[0] = MAGIC;
    header[1] = if wide { VERSION_U32 } else { VERSION_U16 };
    header[2] = i32::try_from(tokens.len()).map_err(|_| Error::Shard {
        path: path.display().to_string(),
        msg: "more than 2^31 tokens in one shard".into(),
    })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * if wide { 4 } else { 2 });
    bytes.extend_from_slice(bytemuck::cast_slice(&header));
    if wide {
        bytes.extend_from_slice(bytemuck::cast_slice(tokens));
    } else {
        let narrow: Vec<u16> = tokens.iter().map(|&t| t as u16).collect();
        bytes.extend_from_slice(bytemuck::cast_slice(&narrow));
    }
    let tmp = path.with_extension("bin.tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// A memory-mapped, validated shard.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    mmap: Mmap,
    wide: bool,
    len: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Shard { path: path.display().to_string(), msg };
        let file = fs::File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the map is read-only and private to this process. Another
        // process truncating the file while we train would be undefined
        // behaviour; datasets are written once (atomically, by write_shard) and
        // then only read, the same contract llm.c's loader relies on.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        if mmap.len() < HEADER_BYTES {
            return Err(err(format!("{} bytes, shorter than the {HEADER_BYTES}-byte header", mmap.len())));
        }
        let header: &[i32] = bytemuck::cast_slice(&mmap[..HEADER_BYTES]);
        if header[0] != MAGIC {
            return Err(err(format!("bad magic number {} (expected {MAGIC}): not a token shard", header[0])));
        }
        let wide = match header[1] {
            VERSION_U16 => false,
            VERSION_U32 => true,
            v => return Err(err(format!("unsupported version {v} (1 = u16 tokens, 2 = u32 tokens)"))),
        };
        let len = usize::try_from(header[2]).map_err(|_| err(format!("negative token count {}", header[2])))?;
        if len == 0 {
            return Err(err("holds no tokens".into()));
        }
        let expected = HEADER_BYTES + len * if wide { 4 } else { 2 };
        if mmap.len() != expected {
            return Err(err(format!(
                "header says {len} tokens ({expected} bytes) but the file has {} bytes: truncated or corrupt",
                mmap.len()
            )));
        }
        Ok(Shard { path: path.to_path_buf(), mmap, wide, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies tokens [start, start + out.len()) into `out`.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        let body = &self.mmap[HEADER_BYTES..];
        if self.wide {
            let toks: &[u32] = bytemuck::cast_slice(body);
            out.copy_from_slice(&toks[start..start + out.len()]);
        } else {
            let toks: &[u16] = bytemuck::cast_slice(body);
            let n = out.len();
            for (o, &t) in out.iter_mut().zip(&toks[start..start + n]) {
                *o = t as u32;
            }
        }
    }

    /// Every id must be below `vocab_size`; names the first offender.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        let body = &self.mmap[HEADER_BYTES..];
        let bad = if self.wide {
            bytemuck::cast_slice::<u8, u32>(body).par_iter().position_first(|&t| t as usize >= vocab_size)
        } else {
            bytemuck::cast_slice::<u8, u16>(body).par_iter().position_first(|&t| t as usize >= vocab_size)
        };
        match bad {
            None => Ok(()),
            Some(i) => {
                let mut id = [0u32];
                self.read(i, &mut id);
                Err(Error::Shard {
                    path: self.path.display().to_string(),
                    msg: format!("token {} at position {i} is not below the vocabulary size {vocab_size}", id[0]),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_narrow_and_wide() {
        let dir = tempfile::tempdir().unwrap();
        for (name, toks) in [("a.bin", vec![0u32, 1, 50256, 65535, 7]), ("b.bin", vec![3u32, 70000, 1 << 31])] {
            let p = dir.path().join(name);
            write_shard(&p, &toks).unwrap();
            let s = Shard::open(&p).unwrap();
            assert_eq!(s.len(), toks.len());
            let mut out = vec![0; toks.len()];
            s.read(0, &mut out);
            assert_eq!(out, toks);
            let mut mid = vec![0; 2];
            s.read(1, &mut mid);
            assert_eq!(mid, toks[1..3]);
            let header: Vec<i32> = bytemuck::pod_collect_to_vec(&fs::read(&p).unwrap()[..12]);
            assert_eq!(header, vec![MAGIC, if name == "a.bin" { 1 } else { 2 }, toks.len() as i32]);
        }
    }

    #[test]
    fn vocab_check_names_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.bin");
        write_shard(&p, &[1, 2, 99, 3]).unwrap();
        let s = Shard::open(&p).unwrap();
        s.check_vocab(100).unwrap();
        let e = s.check_vocab(50).unwrap_err().to_string();
        assert!(e.contains("token 99 at position 2") && e.contains("s.bin"), "{e}");
    }
}
