//! The Vision Transformer's token sequence: pixels cut into normalized
//! patches (the patch projection is then a `Linear`), patch embeddings
//! joined by a class token and given learned positions on the way in, pooled
//! into one vector per image on the way out.

use super::{DType, Error, Result, Tensor, cpu, expect_dims, launch, on_cuda, same_kind};

/// How the classifier reads the final token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// The class token (ViT, DeiT, transformers' ViTForImageClassification).
    #[default]
    Class,
    /// The mean of the patch tokens, the class token left out (timm's `global_pool='avg'`).
    Mean,
}

/// The shape of a batch of square images for [`patchify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchShape {
    /// Images in the batch.
    pub b: usize,
    /// Side of the square image, in pixels.
    pub size: usize,
    /// Side of a square patch; divides `size`.
    pub patch: usize,
    /// Channels (1 to 4).
    pub channels: usize,
}

/// Most channels [`patchify`] normalizes (gray, RGB, RGBA).
pub const MAX_CHANNELS: usize = 4;

/// The u32 words that hold `bytes` uint8 pixels, four to a word (the last one padded).
pub fn packed_pixel_words(bytes: usize) -> usize {
    bytes.div_ceil(4)
}

/// out (B, N, C*P*P) from uint8 pixels (B, S, S, C) row-major, packed four
/// to a u32 in `packed` (see [`packed_pixel_words`]; uploading bytes, not
/// floats, moves a quarter of the data): patches in row-major order, each
/// flattened (channel, row, column) as a stride-P convolution's kernel, each
/// value `pixel * scale[c] - shift[c]` computed in f32 ((x / 255 - mean) / std
/// with scale = 1 / (255 std) and shift = mean / std).
pub fn patchify(out: &mut Tensor, packed: &Tensor, shape: PatchShape, norm: &[(f32, f32)]) -> Result<()> {
    const OP: &str = "patchify";
    let PatchShape { b, size, patch, channels } = shape;
    if patch == 0 || size % patch != 0 || channels == 0 || channels > MAX_CHANNELS || norm.len() != channels {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "{size}x{size} images in {patch}x{patch} patches with {channels} channels and {} normalizations",
                norm.len()
            ),
        });
    }
    let (grid, d) = (size / patch, channels * patch * patch);
    expect_dims(OP, "out", out, &[b, grid * grid, d])?;
    let bytes = b * size * size * channels;
    if packed.dtype() != DType::U32 || packed.numel() != packed_pixel_words(bytes) {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "packed pixels must be {} u32 words, got {} {}",
                packed_pixel_words(bytes),
                packed.numel(),
                packed.dtype()
            ),
        });
    }
    if !packed.storage().same_device(out.storage()) {
        return Err(Error::DeviceMismatch { op: OP, a: out.device().to_string(), b: packed.device().to_string() });
    }
    if on_cuda(out) {
        let mut n = launch::PixelNorm { scale: [0.0; 4], shift: [0.0; 4] };
        for (c, &(scale, shift)) in norm.iter().enumerate() {
            (n.scale[c], n.shift[c]) = (scale, shift);
        }
        return launch::patchify(out.cuda_mut(OP)?, packed.cuda(OP)?, b, size, patch, channels, n);
    }
    let pixels: &[u8] = bytemuck::cast_slice(packed.as_slice::<u32>()?);
    cpu_float!(OP, out, |F| {
        cpu::image_tokens::patchify::<F>(out.as_mut_slice()?, &pixels[..bytes], size, patch, channels, norm);
        Ok(())
    })
}

fn dims3(op: &'static str, name: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    match t.dims() {
        [b, n, c] => Ok((*b, *n, *c)),
        _ => Err(Error::Shape { op, msg: format!("{name} must be (B, T, C), got {}", t.shape()) }),
    }
}

/// out (B, 1+N, C): row 0 = cls + pos[0], row 1+n = patches[n] + pos[1+n];
/// patches (B, N, C), cls (C), pos (1+N, C).
pub fn image_tokens_forward(out: &mut Tensor, patches: &Tensor, cls: &Tensor, pos: &Tensor) -> Result<()> {
    const OP: &str = "image_tokens_forward";
    same_kind(OP, out, &[patches, cls, pos])?;
    let (b, n, c) = dims3(OP, "patches", patches)?;
    expect_dims(OP, "out", out, &[b, n + 1, c])?;
    expect_dims(OP, "cls", cls, &[c])?;
    expect_dims(OP, "pos", pos, &[n + 1, c])?;
    if on_cuda(out) {
        return launch::image_tokens_forward(
            out.cuda_mut(OP)?,
            patches.cuda(OP)?,
            cls.cuda(OP)?,
            pos.cuda(OP)?,
            b,
            n,
            c,
        );
    }
    cpu_float!(OP, out, |F| {
        cpu::image_tokens::forward::<F>(
            out.as_mut_slice()?,
            patches.as_slice()?,
            cls.as_slice()?,
            pos.as_slice()?,
            n,
            c,
        );
        Ok(())
    })
}

/// Backward of [`image_tokens_forward`]: dpatches (B, N, C) overwritten;
/// dcls (C) and dpos (1+N, C) accumulate, summed over the batch in batch order.
pub fn image_tokens_backward(dpatches: &mut Tensor, dcls: &mut Tensor, dpos: &mut Tensor, dout: &Tensor) -> Result<()> {
    const OP: &str = "image_tokens_backward";
    same_kind(OP, dpatches, &[dcls, dpos, dout])?;
    let (b, n, c) = dims3(OP, "dpatches", dpatches)?;
    expect_dims(OP, "dout", dout, &[b, n + 1, c])?;
    expect_dims(OP, "dcls", dcls, &[c])?;
    expect_dims(OP, "dpos", dpos, &[n + 1, c])?;
    if on_cuda(dpatches) {
        let (dp, dc, dq) = (dpatches.cuda_mut(OP)?, dcls.cuda_mut(OP)?, dpos.cuda_mut(OP)?);
        return launch::image_tokens_backward(dp, dc, dq, dout.cuda(OP)?, b, n, c);
    }
    cpu_float!(OP, dpatches, |F| {
        cpu::image_tokens::backward::<F>(
            dpatches.as_mut_slice()?,
            dcls.as_mut_slice()?,
            dpos.as_mut_slice()?,
            dout.as_slice()?,
            n,
            c,
        );
        Ok(())
    })
}

fn pool_dims(op: &'static str, pooled: &Tensor, tokens: &Tensor, pool: Pool) -> Result<(usize, usize, usize)> {
    let (b, t, c) = dims3(op, "tokens", tokens)?;
    expect_dims(op, "pooled", pooled, &[b, c])?;
    if pool == Pool::Mean && t < 2 {
        return Err(Error::Shape {
            op,
            msg: format!("mean pooling needs a patch token besides the class token, T = {t}"),
        });
    }
    Ok((b, t, c))
}

/// out (B, C) from x (B, T, C): see [`Pool`].
pub fn pool_tokens(out: &mut Tensor, x: &Tensor, pool: Pool) -> Result<()> {
    const OP: &str = "pool_tokens";
    same_kind(OP, out, &[x])?;
    let (b, t, c) = pool_dims(OP, out, x, pool)?;
    if on_cuda(out) {
        return launch::pool_tokens_forward(out.cuda_mut(OP)?, x.cuda(OP)?, b, t, c, pool == Pool::Mean);
    }
    cpu_float!(OP, out, |F| {
        cpu::image_tokens::pool_forward::<F>(out.as_mut_slice()?, x.as_slice()?, t, c, pool);
        Ok(())
    })
}

/// Backward of [`pool_tokens`]: dx (B, T, C) overwritten (zero where the pool did not read).
pub fn pool_tokens_backward(dx: &mut Tensor, dout: &Tensor, pool: Pool) -> Result<()> {
    const OP: &str = "pool_tokens_backward";
    same_kind(OP, dx, &[dout])?;
    let (b, t, c) = pool_dims(OP, dout, dx, pool)?;
    if on_cuda(dx) {
        return launch::pool_tokens_backward(dx.cuda_mut(OP)?, dout.cuda(OP)?, b, t, c, pool == Pool::Mean);
    }
    cpu_float!(OP, dx, |F| {
        cpu::image_tokens::pool_backward::<F>(dx.as_mut_slice()?, dout.as_slice()?, t, c, pool);
        Ok(())
    })
}
