//! The Vision Transformer's token sequence: patch embeddings joined by a
//! class token and given learned positions on the way in, pooled into one
//! vector per image on the way out. (Patchifying the pixels is a host-side
//! reshape done while uploading a batch; the patch projection is a `Linear`.)

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
