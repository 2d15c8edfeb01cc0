//! The ViT's token sequence around the blocks (see `ops::image_tokens_forward`
//! and `ops::pool_tokens`). Batch sums run serially in batch order, as the
//! CUDA kernels do: deterministic whatever the thread count.

use rayon::prelude::*;

use crate::Float;
use crate::ops::Pool;

/// Pixels (B, S, S, C) uint8 to patches (B, N, C*P*P): see `ops::patchify`.
/// The value is computed in f32 (a multiply, then a subtract), as the CUDA
/// kernel does, then stored as F.
pub(crate) fn patchify<F: Float>(out: &mut [F], pixels: &[u8], s: usize, p: usize, ch: usize, norm: &[(f32, f32)]) {
    let (grid, d) = (s / p, ch * p * p);
    out.par_chunks_mut(grid * grid * d).zip(pixels.par_chunks(s * s * ch)).for_each(|(out, img)| {
        for (patch, o) in out.chunks_mut(d).enumerate() {
            let (gy, gx) = (patch / grid, patch % grid);
            for (c, &(scale, shift)) in norm.iter().enumerate() {
                for y in 0..p {
                    let row = ((gy * p + y) * s + gx * p) * ch;
                    for x in 0..p {
                        let v = f32::from(img[row + x * ch + c]) * scale - shift;
                        o[(c * p + y) * p + x] = F::from_f32(v);
                    }
                }
            }
        }
    });
}

/// out (B, 1+N, C): row 0 = cls + pos[0], row 1+n = patches[n] + pos[1+n].
pub(crate) fn forward<F: Float>(out: &mut [F], patches: &[F], cls: &[F], pos: &[F], n: usize, c: usize) {
    out.par_chunks_mut((n + 1) * c).zip(patches.par_chunks(n * c)).for_each(|(o, p)| {
        for (t, row) in o.chunks_mut(c).enumerate() {
            let src = if t == 0 { cls } else { &p[(t - 1) * c..][..c] };
            for ((o, &x), &e) in row.iter_mut().zip(src).zip(&pos[t * c..][..c]) {
                *o = x + e;
            }
        }
    });
}

/// dpatches (B, N, C) overwritten with rows 1.. of dout; dpos += dout summed
/// over the batch; dcls += its row 0.
pub(crate) fn backward<F: Float>(dpatches: &mut [F], dcls: &mut [F], dpos: &mut [F], dout: &[F], n: usize, c: usize) {
    let tc = (n + 1) * c;
    // Summed over the batch first, then added: the CUDA kernel's order.
    let mut sum = vec![F::zero(); tc];
    for (g, dp) in dout.chunks(tc).zip(dpatches.chunks_mut(n * c)) {
        dp.copy_from_slice(&g[c..]);
        for (s, &x) in sum.iter_mut().zip(g) {
            *s += x;
        }
    }
    for (d, &s) in dpos.iter_mut().zip(&sum) {
        *d += s;
    }
    for (d, &s) in dcls.iter_mut().zip(&sum[..c]) {
        *d += s;
    }
}

/// out (B, C) from x (B, T, C): the class token, or the mean of the others.
pub(crate) fn pool_forward<F: Float>(out: &mut [F], x: &[F], t: usize, c: usize, pool: Pool) {
    out.par_chunks_mut(c).zip(x.par_chunks(t * c)).for_each(|(o, x)| match pool {
        Pool::Class => o.copy_from_slice(&x[..c]),
        Pool::Mean => {
            o.fill(F::zero());
            for row in x.chunks(c).skip(1) {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o += v;
                }
            }
            let count = F::from_usize(t - 1);
            for o in o.iter_mut() {
                *o = *o / count;
            }
        }
    });
}

/// dx (B, T, C) overwritten: dout where the pool read, zero elsewhere.
pub(crate) fn pool_backward<F: Float>(dx: &mut [F], dout: &[F], t: usize, c: usize, pool: Pool) {
    dx.par_chunks_mut(t * c).zip(dout.par_chunks(c)).for_each(|(dx, g)| {
        for (k, row) in dx.chunks_mut(c).enumerate() {
            match (pool, k) {
                (Pool::Class, 0) => row.copy_from_slice(g),
                (Pool::Mean, k) if k > 0 => {
                    let count = F::from_usize(t - 1);
                    for (d, &v) in row.iter_mut().zip(g) {
                        *d = v / count;
                    }
                }
                _ => row.fill(F::zero()),
            }
        }
    });
}
