//! Every op the models use, as functions over tensors the caller allocated.
//!
//! Conventions (shared by every backend):
//! - Outputs come first in the argument list and are `&mut Tensor`.
//! - Activation gradients are overwritten, except where a doc comment says
//!   "accumulates" (LayerNorm's input gradient: the residual stream).
//! - Parameter gradients always accumulate (`+=`), so gradient accumulation
//!   across micro-batches needs no extra buffers.
//! - Per-row statistics (LayerNorm mean/rstd, attention lse/delta, losses) have
//!   dtype `DType::stats_dtype()` of the activations: f32 beside bf16.
//! - Each op checks shapes, dtypes and devices and returns an [`Error`] naming
//!   itself; then it dispatches on the storage: the CPU reference (f32, f64) or
//!   the CUDA kernels (f32, bf16).

use crate::cuda::launch;
use crate::{CpuStorage, DType, Device, Element, Error, Result, Storage, Tensor, cpu};

/// Runs `$body` with `$F` bound to the Rust float type of CPU tensor `$t`.
macro_rules! cpu_float {
    ($op:expr, $t:expr, |$F:ident| $body:expr) => {{
        match $t.dtype() {
            DType::F32 => {
                type $F = f32;
                $body
            }
            DType::F64 => {
                type $F = f64;
                $body
            }
            dtype => Err(Error::Unsupported { op: $op, dtype, device: "cpu".into() }),
        }
    }};
}

// After the macro, so the child modules see it.
mod image_tokens;
mod multi_tensor;
pub use image_tokens::{
    MAX_CHANNELS, PatchShape, Pool, image_tokens_backward, image_tokens_forward, packed_pixel_words, patchify,
    pool_tokens, pool_tokens_backward,
};
pub use multi_tensor::{
    AdamWHyper, AdamWSpan, Span, adamw_update, copy_spans, fill_all, sum_squares_all, sum_squares_spans,
};

fn on_cuda(t: &Tensor) -> bool {
    matches!(t.storage(), Storage::Cuda(_))
}

/// All tensors share the first one's device and dtype.
fn same_kind(op: &'static str, first: &Tensor, rest: &[&Tensor]) -> Result<()> {
    for t in rest {
        if !t.storage().same_device(first.storage()) {
            return Err(Error::DeviceMismatch { op, a: first.device().to_string(), b: t.device().to_string() });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DType { op, expected: first.dtype(), got: t.dtype() });
        }
    }
    Ok(())
}

/// Statistics tensors: on `act`'s device, of its stats dtype.
fn stats_kind(op: &'static str, act: &Tensor, stats: &[&Tensor]) -> Result<()> {
    for t in stats {
        if !t.storage().same_device(act.storage()) {
            return Err(Error::DeviceMismatch { op, a: act.device().to_string(), b: t.device().to_string() });
        }
        if t.dtype() != act.dtype().stats_dtype() {
            return Err(Error::DType { op, expected: act.dtype().stats_dtype(), got: t.dtype() });
        }
    }
    Ok(())
}

fn expect_numel(op: &'static str, name: &str, t: &Tensor, numel: usize) -> Result<()> {
    if t.numel() != numel {
        return Err(Error::Shape { op, msg: format!("{name} has shape {} but needs {numel} elements", t.shape()) });
    }
    Ok(())
}

fn expect_dims(op: &'static str, name: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::Shape { op, msg: format!("{name} has shape {} but needs {dims:?}", t.shape()) });
    }
    Ok(())
}

fn expect_ids(op: &'static str, ids: &Tensor, like: &Tensor) -> Result<()> {
    if ids.dtype() != DType::U32 {
        return Err(Error::DType { op, expected: DType::U32, got: ids.dtype() });
    }
    if !ids.storage().same_device(like.storage()) {
        return Err(Error::DeviceMismatch { op, a: like.device().to_string(), b: ids.device().to_string() });
    }
    Ok(())
}

fn check_ids(op: &'static str, ids: &[u32], limit: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= limit) {
        Some(&id) => Err(Error::IndexOutOfRange { op, index: id as u64, limit: limit as u64 }),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- elementwise

/// Sets every element to `value`.
pub fn fill(t: &mut Tensor, value: f64) -> Result<()> {
    let n = t.numel();
    if on_cuda(t) {
        return launch::fill(t.cuda_mut("fill")?, value, n);
    }
    match t.dtype() {
        DType::U32 => {
            t.as_mut_slice::<u32>()?.fill(value as u32);
            Ok(())
        }
        _ => cpu_float!("fill", t, |F| {
            cpu::elementwise::fill::<F>(t.as_mut_slice()?, F::from_f64(value));
            Ok(())
        }),
    }
}

pub fn zero(t: &mut Tensor) -> Result<()> {
    fill(t, 0.0)
}

/// dst = src (same shape, dtype and device).
pub fn copy(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    same_kind("copy", dst, &[src])?;
    expect_numel("copy", "src", src, dst.numel())?;
    match (dst.storage_mut(), src.storage()) {
        (Storage::Cpu(d), Storage::Cpu(s)) => {
            // Same dtype (checked above): copy in place, no allocation.
            match (d, s) {
                (CpuStorage::F32(d), CpuStorage::F32(s)) => d.copy_from_slice(s),
                (CpuStorage::F64(d), CpuStorage::F64(s)) => d.copy_from_slice(s),
                (CpuStorage::BF16(d), CpuStorage::BF16(s)) => d.copy_from_slice(s),
                (CpuStorage::F16(d), CpuStorage::F16(s)) => d.copy_from_slice(s),
                (CpuStorage::U32(d), CpuStorage::U32(s)) => d.copy_from_slice(s),
                _ => unreachable!("same_kind checked the dtypes"),
            }
            Ok(())
        }
        (Storage::Cuda(d), Storage::Cuda(s)) => launch::copy(d, s),
        _ => unreachable!("same_kind checked the devices"),
    }
}

/// Copies `rows` rows of `src` starting at row `src_row` into `dst` starting at
/// row `dst_row`. Both are seen as matrices (leading dims flattened) with the
/// same number of columns. Serves as a slice where ops take whole tensors: a
/// KV-cache append, the last position of a sequence, a window of a table.
pub fn copy_rows(dst: &mut Tensor, dst_row: usize, src: &Tensor, src_row: usize, rows: usize) -> Result<()> {
    const OP: &str = "copy_rows";
    same_kind(OP, dst, &[src])?;
    let (dr, dc) = dst.shape().as_rows_cols();
    let (sr, sc) = src.shape().as_rows_cols();
    if dc != sc || dst_row + rows > dr || src_row + rows > sr {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "rows [{src_row}, {}) of src {} into rows [{dst_row}, {}) of dst {}",
                src_row + rows,
                src.shape(),
                dst_row + rows,
                dst.shape()
            ),
        });
    }
    let (d0, s0, n) = (dst_row * dc, src_row * sc, rows * dc);
    if n == 0 {
        return Ok(());
    }
    match (dst.storage_mut(), src.storage()) {
        (Storage::Cpu(d), Storage::Cpu(s)) => {
            match (d, s) {
                (CpuStorage::F32(d), CpuStorage::F32(s)) => d[d0..d0 + n].copy_from_slice(&s[s0..s0 + n]),
                (CpuStorage::F64(d), CpuStorage::F64(s)) => d[d0..d0 + n].copy_from_slice(&s[s0..s0 + n]),
                (CpuStorage::BF16(d), CpuStorage::BF16(s)) => d[d0..d0 + n].copy_from_slice(&s[s0..s0 + n]),
                (CpuStorage::F16(d), CpuStorage::F16(s)) => d[d0..d0 + n].copy_from_slice(&s[s0..s0 + n]),
                (CpuStorage::U32(d), CpuStorage::U32(s)) => d[d0..d0 + n].copy_from_slice(&s[s0..s0 + n]),
                _ => unreachable!("same_kind checked the dtypes"),
            }
            Ok(())
        }
        (Storage::Cuda(d), Storage::Cuda(s)) => launch::copy_range(d, d0, s, s0, n),
        _ => unreachable!("same_kind checked the devices"),
    }
}

/// out = a + b, elementwise.
pub fn add(out: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    const OP: &str = "add";
    same_kind(OP, out, &[a, b])?;
    expect_numel(OP, "a", a, out.numel())?;
    expect_numel(OP, "b", b, out.numel())?;
    let n = out.numel();
    if on_cuda(out) {
        return launch::add(out.cuda_mut(OP)?, a.cuda(OP)?, b.cuda(OP)?, n);
    }
    cpu_float!(OP, out, |F| {
        cpu::elementwise::add::<F>(out.as_mut_slice()?, a.as_slice()?, b.as_slice()?);
        Ok(())
    })
}

/// acc += x, elementwise.
pub fn add_assign(acc: &mut Tensor, x: &Tensor) -> Result<()> {
    const OP: &str = "add_assign";
    same_kind(OP, acc, &[x])?;
    expect_numel(OP, "x", x, acc.numel())?;
    let n = acc.numel();
    if on_cuda(acc) {
        return launch::add_assign(acc.cuda_mut(OP)?, x.cuda(OP)?, n);
    }
    cpu_float!(OP, acc, |F| {
        cpu::elementwise::add_assign::<F>(acc.as_mut_slice()?, x.as_slice()?);
        Ok(())
    })
}

/// x *= s, elementwise.
pub fn scale(x: &mut Tensor, s: f64) -> Result<()> {
    let n = x.numel();
    if on_cuda(x) {
        return launch::scale(x.cuda_mut("scale")?, s, n);
    }
    cpu_float!("scale", x, |F| {
        cpu::elementwise::scale::<F>(x.as_mut_slice()?, F::from_f64(s));
        Ok(())
    })
}

/// Sum of squares of all elements, accumulated in f64 (for global gradient norms).
/// Deterministic; on a GPU it waits for the device (the value is needed on the host).
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    sum_squares_all(&[x])
}

/// Sum of all elements, accumulated in f64 (for losses). Like [`sum_squares`].
pub fn sum(x: &Tensor) -> Result<f64> {
    if on_cuda(x) {
        return launch::sum_spans(&[x.cuda("sum")?], &[Span::whole(0, x)], false);
    }
    cpu_float!("sum", x, |F| Ok(cpu::elementwise::sum::<F>(x.as_slice()?)))
}

// ---------------------------------------------------------------- matmul, linear

/// out (M, N) = (accumulate ? out : 0) + op(a) @ op(b).
/// Each tensor is seen as a matrix (leading dims flattened, last dim = columns):
/// op(a) is `a` (M, K), or `a` stored (K, M) when `trans_a`; op(b) is `b` (K, N),
/// or `b` stored (N, K) when `trans_b`. fp32 accumulation on every backend.
pub fn matmul(out: &mut Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, accumulate: bool) -> Result<()> {
    const OP: &str = "matmul";
    same_kind(OP, out, &[a, b])?;
    let (ar, ac) = a.shape().as_rows_cols();
    let (br, bc) = b.shape().as_rows_cols();
    let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
    if k != k2 || out.shape().as_rows_cols() != (m, n) {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "a {} (trans {trans_a}) @ b {} (trans {trans_b}) -> out {}",
                a.shape(),
                b.shape(),
                out.shape()
            ),
        });
    }
    if on_cuda(out) {
        return launch::matmul(
            out.cuda_mut(OP)?,
            a.cuda(OP)?,
            b.cuda(OP)?,
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
            None,
        );
    }
    cpu_float!(OP, out, |F| {
        cpu::matmul::matmul::<F>(
            out.as_mut_slice()?,
            a.as_slice()?,
            b.as_slice()?,
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
        );
        Ok(())
    })
}

/// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC).
pub fn linear_forward(out: &mut Tensor, inp: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    const OP: &str = "linear_forward";
    if let Some(bias) = bias {
        same_kind(OP, out, &[bias])?;
        expect_numel(OP, "bias", bias, out.shape().last_dim())?;
        if on_cuda(out) && out.dtype() == DType::BF16 {
            // One cuBLASLt call with the bias in the epilogue.
            same_kind(OP, out, &[inp, weight])?;
            let (m, k) = inp.shape().as_rows_cols();
            let (n, k2) = weight.shape().as_rows_cols();
            if k != k2 || out.shape().as_rows_cols() != (m, n) {
                return Err(Error::Shape {
                    op: OP,
                    msg: format!("inp {} @ weight {}^T -> out {}", inp.shape(), weight.shape(), out.shape()),
                });
            }
            let (o, x, w, b) = (out.cuda_mut(OP)?, inp.cuda(OP)?, weight.cuda(OP)?, bias.cuda(OP)?);
            return launch::matmul(o, x, w, m, n, k, false, true, false, Some(b));
        }
    }
    matmul(out, inp, weight, false, true, false)?;
    let Some(bias) = bias else { return Ok(()) };
    let (rows, oc) = out.shape().as_rows_cols();
    if on_cuda(out) {
        return launch::add_bias(out.cuda_mut(OP)?, bias.cuda(OP)?, rows, oc);
    }
    cpu_float!(OP, out, |F| {
        let b = bias.as_slice::<F>()?;
        for row in out.as_mut_slice::<F>()?.chunks_mut(oc) {
            for (o, &b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
        Ok(())
    })
}

/// The backward of [`linear_forward`]: dinp (N, C) = dout @ weight (overwritten);
/// dweight (OC, C) += dout^T @ inp; dbias (OC) += column sums of dout.
pub fn linear_backward(
    dinp: &mut Tensor,
    dweight: &mut Tensor,
    dbias: Option<&mut Tensor>,
    dout: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
) -> Result<()> {
    matmul(dinp, dout, weight, false, false, false)?;
    linear_param_grads(dweight, dbias, dout, inp)
}

/// Whether [`linear_gelu_forward`] (given a bias) and [`linear_backward_gelu`]
/// run as single cuBLASLt GEMMs with the GELU (or its derivative) in the
/// epilogue: bf16 on CUDA, the tanh form (cuBLASLt's epilogue has no other),
/// and a hidden width that keeps the epilogue's extra matrix's rows 16-byte aligned.
fn gelu_fusable(t: &Tensor, hidden: usize, kind: Gelu) -> bool {
    on_cuda(t) && t.dtype() == DType::BF16 && kind == Gelu::Tanh && hidden.is_multiple_of(8)
}

/// The MLP's first half: pre (N, H) = inp (N, C) @ weight (H, C)^T + bias, and
/// out (N, H) = GELU(pre). Both are kept: the backward needs pre
/// for GELU's derivative and out for the next layer's weight gradient.
pub fn linear_gelu_forward(
    out: &mut Tensor,
    pre: &mut Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    kind: Gelu,
) -> Result<()> {
    const OP: &str = "linear_gelu_forward";
    let (rows, c) = inp.shape().as_rows_cols();
    let (h, c2) = weight.shape().as_rows_cols();
    let bias = match bias {
        Some(bias) if gelu_fusable(out, h, kind) => bias,
        _ => {
            linear_forward(pre, inp, weight, bias)?;
            return gelu_forward(out, pre, kind);
        }
    };
    same_kind(OP, out, &[pre, inp, weight])?;
    if c != c2 || out.shape().as_rows_cols() != (rows, h) || pre.shape().as_rows_cols() != (rows, h) {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "inp {} @ weight {}^T -> pre {}, out {}",
                inp.shape(),
                weight.shape(),
                pre.shape(),
                out.shape()
            ),
        });
    }
    same_kind(OP, out, &[bias])?;
    expect_numel(OP, "bias", bias, h)?;
    let (o, p) = (out.cuda_mut(OP)?, pre.cuda_mut(OP)?);
    launch::linear_gelu_forward(o, p, inp.cuda(OP)?, weight.cuda(OP)?, bias.cuda(OP)?, rows, h, c)
}

/// The backward of `linear_forward(out, GELU(pre), weight, bias)` through the
/// GELU: dpre (N, H) = (dout (N, C) @ weight (C, H)) * GELU'(pre), overwritten;
/// dweight += dout^T @ inp (inp = GELU(pre)); dbias += column sums of dout.
/// `scratch` (N, H) holds dL/d(inp) where the GEMM cannot apply GELU' itself.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_gelu(
    dpre: &mut Tensor,
    dweight: &mut Tensor,
    dbias: Option<&mut Tensor>,
    dout: &Tensor,
    inp: &Tensor,
    pre: &Tensor,
    weight: &Tensor,
    scratch: &mut Tensor,
    kind: Gelu,
) -> Result<()> {
    const OP: &str = "linear_backward_gelu";
    let (rows, c) = dout.shape().as_rows_cols();
    let (c2, h) = weight.shape().as_rows_cols();
    if !gelu_fusable(dpre, h, kind) {
        linear_backward(scratch, dweight, dbias, dout, inp, weight)?;
        return gelu_backward(dpre, pre, scratch, kind);
    }
    same_kind(OP, dpre, &[dout, pre, weight])?;
    if c != c2 || dpre.shape().as_rows_cols() != (rows, h) || pre.shape().as_rows_cols() != (rows, h) {
        return Err(Error::Shape {
            op: OP,
            msg: format!(
                "dout {} @ weight {} -> dpre {} (pre {})",
                dout.shape(),
                weight.shape(),
                dpre.shape(),
                pre.shape()
            ),
        });
    }
    launch::matmul_dgelu(dpre.cuda_mut(OP)?, dout.cuda(OP)?, weight.cuda(OP)?, pre.cuda(OP)?, rows, h, c)?;
    linear_param_grads(dweight, dbias, dout, inp)
}

/// The parameter half of [`linear_backward`], for a layer whose input needs
/// no gradient (a model's first layer): dweight (OC, C) += dout^T @ inp;
/// dbias (OC) += column sums of dout.
pub fn linear_param_grads(dweight: &mut Tensor, dbias: Option<&mut Tensor>, dout: &Tensor, inp: &Tensor) -> Result<()> {
    matmul(dweight, dout, inp, true, false, true)?;
    let Some(dbias) = dbias else { return Ok(()) };
    const OP: &str = "linear_backward";
    same_kind(OP, dbias, &[dout])?;
    let (rows, oc) = dout.shape().as_rows_cols();
    expect_numel(OP, "dbias", dbias, oc)?;
    if on_cuda(dbias) {
        return launch::bias_grad(dbias.cuda_mut(OP)?, dout.cuda(OP)?, rows, oc);
    }
    cpu_float!(OP, dbias, |F| {
        let db = dbias.as_mut_slice::<F>()?;
        // Serial over rows, in order: deterministic and cheap next to the GEMMs.
        for row in dout.as_slice::<F>()?.chunks(oc) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- layernorm

/// out (N, C) = LayerNorm(inp) * weight + bias over the last dim; saves mean and
/// rstd (N) for the backward.
pub fn layernorm_forward(
    out: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    same_kind(OP, out, &[inp, weight, bias])?;
    stats_kind(OP, out, &[mean, rstd])?;
    let (n, c) = inp.shape().as_rows_cols();
    expect_numel(OP, "out", out, n * c)?;
    expect_numel(OP, "mean", mean, n)?;
    expect_numel(OP, "rstd", rstd, n)?;
    expect_numel(OP, "weight", weight, c)?;
    expect_numel(OP, "bias", bias, c)?;
    if on_cuda(out) {
        return launch::layernorm_forward(
            out.cuda_mut(OP)?,
            mean.cuda_mut(OP)?,
            rstd.cuda_mut(OP)?,
            inp.cuda(OP)?,
            None,
            weight.cuda(OP)?,
            bias.cuda(OP)?,
            n,
            c,
            eps,
        );
    }
    cpu_float!(OP, out, |F| {
        cpu::layernorm::forward::<F>(
            out.as_mut_slice()?,
            mean.as_mut_slice()?,
            rstd.as_mut_slice()?,
            inp.as_slice()?,
            weight.as_slice()?,
            bias.as_slice()?,
            c,
            F::from_f64(eps),
        );
        Ok(())
    })
}

/// resid (N, C) = a + b (the residual stream), then out = LayerNorm(resid) as
/// [`layernorm_forward`]. bf16 on CUDA does both in one pass where the
/// register-resident kernel takes the row width.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    resid: &mut Tensor,
    out: &mut Tensor,
    mean: &mut Tensor,
    rstd: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<()> {
    const OP: &str = "residual_layernorm_forward";
    let (n, c) = a.shape().as_rows_cols();
    let fused = on_cuda(out) && out.dtype() == DType::BF16 && launch::layernorm_pairs(c).is_some();
    if !fused {
        add(resid, a, b)?;
        return layernorm_forward(out, mean, rstd, resid, weight, bias, eps);
    }
    same_kind(OP, out, &[resid, a, b, weight, bias])?;
    stats_kind(OP, out, &[mean, rstd])?;
    for (what, t, numel) in [("resid", &*resid, n * c), ("out", &*out, n * c), ("b", b, n * c)] {
        expect_numel(OP, what, t, numel)?;
    }
    for (what, t, numel) in [("mean", &*mean, n), ("rstd", &*rstd, n), ("weight", weight, c), ("bias", bias, c)] {
        expect_numel(OP, what, t, numel)?;
    }
    launch::layernorm_forward(
        out.cuda_mut(OP)?,
        mean.cuda_mut(OP)?,
        rstd.cuda_mut(OP)?,
        a.cuda(OP)?,
        Some((resid.cuda_mut(OP)?, b.cuda(OP)?)),
        weight.cuda(OP)?,
        bias.cuda(OP)?,
        n,
        c,
        eps,
    )
}

/// Backward of [`layernorm_forward`]. dinp accumulates (+=): it is the residual
/// stream's gradient. dweight and dbias accumulate like every parameter gradient.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut Tensor,
    dweight: &mut Tensor,
    dbias: &mut Tensor,
    dout: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    same_kind(OP, dinp, &[dweight, dbias, dout, inp, weight])?;
    stats_kind(OP, dinp, &[mean, rstd])?;
    let (n, c) = inp.shape().as_rows_cols();
    expect_numel(OP, "dinp", dinp, n * c)?;
    expect_numel(OP, "dout", dout, n * c)?;
    expect_numel(OP, "dweight", dweight, c)?;
    expect_numel(OP, "dbias", dbias, c)?;
    expect_numel(OP, "weight", weight, c)?;
    expect_numel(OP, "mean", mean, n)?;
    expect_numel(OP, "rstd", rstd, n)?;
    if on_cuda(dinp) {
        return launch::layernorm_backward(
            dinp.cuda_mut(OP)?,
            dweight.cuda_mut(OP)?,
            dbias.cuda_mut(OP)?,
            dout.cuda(OP)?,
            inp.cuda(OP)?,
            weight.cuda(OP)?,
            mean.cuda(OP)?,
            rstd.cuda(OP)?,
            n,
            c,
        );
    }
    cpu_float!(OP, dinp, |F| {
        cpu::layernorm::backward::<F>(
            dinp.as_mut_slice()?,
            dweight.as_mut_slice()?,
            dbias.as_mut_slice()?,
            dout.as_slice()?,
            inp.as_slice()?,
            weight.as_slice()?,
            mean.as_slice()?,
            rstd.as_slice()?,
            c,
        );
        Ok(())
    })
}

// ---------------------------------------------------------------- gelu

/// Which GELU: GPT-2 uses the tanh approximation, ViT (transformers, timm)
/// the exact form. They differ by up to about 1e-3 near |x| = 2: enough to
/// fail a parity test against the other framework, so a model names its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gelu {
    /// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    #[default]
    Tanh,
    /// x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
    Erf,
}

/// out = GELU(inp).
pub fn gelu_forward(out: &mut Tensor, inp: &Tensor, kind: Gelu) -> Result<()> {
    const OP: &str = "gelu_forward";
    same_kind(OP, out, &[inp])?;
    expect_numel(OP, "inp", inp, out.numel())?;
    let n = out.numel();
    if on_cuda(out) {
        return launch::gelu_forward(out.cuda_mut(OP)?, inp.cuda(OP)?, n, kind);
    }
    cpu_float!(OP, out, |F| {
        cpu::gelu::forward::<F>(out.as_mut_slice()?, inp.as_slice()?, kind);
        Ok(())
    })
}

/// dinp = dout * GELU'(inp) (overwritten).
pub fn gelu_backward(dinp: &mut Tensor, inp: &Tensor, dout: &Tensor, kind: Gelu) -> Result<()> {
    const OP: &str = "gelu_backward";
    same_kind(OP, dinp, &[inp, dout])?;
    expect_numel(OP, "inp", inp, dinp.numel())?;
    expect_numel(OP, "dout", dout, dinp.numel())?;
    let n = dinp.numel();
    if on_cuda(dinp) {
        return launch::gelu_backward(dinp.cuda_mut(OP)?, inp.cuda(OP)?, dout.cuda(OP)?, n, kind);
    }
    cpu_float!(OP, dinp, |F| {
        cpu::gelu::backward::<F>(dinp.as_mut_slice()?, inp.as_slice()?, dout.as_slice()?, kind);
        Ok(())
    })
}

// ---------------------------------------------------------------- attention

fn attention_dims(
    op: &'static str,
    qkv: &Tensor,
    n_head: usize,
    causal: bool,
) -> Result<(usize, cpu::attention::Dims)> {
    let [b, t, c3] = qkv.dims() else {
        return Err(Error::Shape { op, msg: format!("qkv must be (B, T, 3C), got {}", qkv.shape()) });
    };
    let c = c3 / 3;
    if c3 % 3 != 0 || n_head == 0 || c % n_head != 0 {
        return Err(Error::Shape { op, msg: format!("qkv {} does not split into 3 x {n_head} heads", qkv.shape()) });
    }
    Ok((*b, cpu::attention::Dims { t: *t, c, n_head, causal }))
}

/// Multi-head attention. qkv (B, T, 3C) holds q | k | v; out (B, T, C);
/// lse (B, n_head, T) receives each query's log-sum-exp for the backward.
pub fn attention_forward(out: &mut Tensor, lse: &mut Tensor, qkv: &Tensor, n_head: usize, causal: bool) -> Result<()> {
    const OP: &str = "attention_forward";
    same_kind(OP, out, &[qkv])?;
    stats_kind(OP, out, &[lse])?;
    let (b, d) = attention_dims(OP, qkv, n_head, causal)?;
    expect_dims(OP, "out", out, &[b, d.t, d.c])?;
    expect_dims(OP, "lse", lse, &[b, n_head, d.t])?;
    if on_cuda(out) {
        return launch::attention_forward(
            out.cuda_mut(OP)?,
            lse.cuda_mut(OP)?,
            qkv.cuda(OP)?,
            b,
            d.t,
            d.c,
            n_head,
            causal,
        );
    }
    cpu_float!(OP, out, |F| {
        cpu::attention::forward::<F>(out.as_mut_slice()?, lse.as_mut_slice()?, qkv.as_slice()?, d);
        Ok(())
    })
}

/// Backward of [`attention_forward`]: dqkv (B, T, 3C) overwritten, from dout and
/// the forward's qkv, out and lse. delta (B, n_head, T) receives each row's
/// sum(dout * out) (the softmax backward's D), a workspace the caller owns.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut Tensor,
    delta: &mut Tensor,
    dout: &Tensor,
    qkv: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    n_head: usize,
    causal: bool,
) -> Result<()> {
    const OP: &str = "attention_backward";
    same_kind(OP, dqkv, &[dout, qkv, out])?;
    stats_kind(OP, dqkv, &[lse, delta])?;
    let (b, d) = attention_dims(OP, qkv, n_head, causal)?;
    expect_dims(OP, "dqkv", dqkv, qkv.dims())?;
    expect_dims(OP, "dout", dout, &[b, d.t, d.c])?;
    expect_dims(OP, "out", out, &[b, d.t, d.c])?;
    expect_dims(OP, "lse", lse, &[b, n_head, d.t])?;
    expect_dims(OP, "delta", delta, &[b, n_head, d.t])?;
    if on_cuda(dqkv) {
        return launch::attention_backward(
            dqkv.cuda_mut(OP)?,
            dout.cuda(OP)?,
            qkv.cuda(OP)?,
            out.cuda(OP)?,
            lse.cuda(OP)?,
            delta.cuda_mut(OP)?,
            b,
            d.t,
            d.c,
            n_head,
            causal,
        );
    }
    cpu_float!(OP, dqkv, |F| {
        cpu::attention::backward::<F>(
            dqkv.as_mut_slice()?,
            delta.as_mut_slice()?,
            dout.as_slice()?,
            qkv.as_slice()?,
            out.as_slice()?,
            lse.as_slice()?,
            d,
        );
        Ok(())
    })
}

/// Causal attention of new queries against a KV cache, for incremental
/// decoding. `cache` (B, Tmax, 3C) holds q | k | v rows laid out as qkv (append
/// them with [`copy_rows`]), filled for positions [0, past + tq); out (B, tq, C)
/// receives the attention of the queries at positions past .. past + tq, each
/// over the keys up to and including its own position. No lse is kept: this is
/// inference only. With past = 0 and tq = T it equals [`attention_forward`]
/// (causal) over the same qkv.
pub fn attention_cached(out: &mut Tensor, cache: &Tensor, past: usize, n_head: usize) -> Result<()> {
    const OP: &str = "attention_cached";
    same_kind(OP, out, &[cache])?;
    let (b, d) = attention_dims(OP, cache, n_head, true)?;
    let tmax = d.t;
    let [ob, tq, oc] = out.dims() else {
        return Err(Error::Shape { op: OP, msg: format!("out must be (B, tq, C), got {}", out.shape()) });
    };
    let (tq, c) = (*tq, d.c);
    if *ob != b || *oc != c {
        return Err(Error::Shape { op: OP, msg: format!("out {} for cache {}", out.shape(), cache.shape()) });
    }
    if past + tq > tmax {
        return Err(Error::Shape { op: OP, msg: format!("positions up to {} exceed the cache's {tmax}", past + tq) });
    }
    if tq == 0 || b == 0 {
        return Ok(());
    }
    if on_cuda(out) {
        return launch::attention_cached(out.cuda_mut(OP)?, cache.cuda(OP)?, b, tmax, past, tq, c, n_head);
    }
    cpu_float!(OP, out, |F| {
        cpu::attention::cached::<F>(out.as_mut_slice()?, cache.as_slice()?, tmax, past, tq, c, n_head);
        Ok(())
    })
}

// ---------------------------------------------------------------- embedding

/// Which batch positions hold each distinct token, built on the host from the
/// token ids (which arrive from the host anyway) and uploaded with them, so the
/// embedding backward sums every token's gradients in a fixed order: no float
/// atomics, deterministic results. Buffers are sized once for B*T positions.
#[derive(Debug)]
pub struct TokenIndex {
    /// Distinct token ids, ascending (first `distinct` entries used).
    ids: Tensor,
    /// Bucket u covers order[starts[u] .. starts[u + 1]].
    starts: Tensor,
    /// Positions sorted by (token, position).
    order: Tensor,
    distinct: usize,
    host_pairs: Vec<(u32, u32)>,
    host_ids: Vec<u32>,
    host_starts: Vec<u32>,
    host_order: Vec<u32>,
}

impl TokenIndex {
    pub fn new(positions: usize, device: &Device) -> Result<Self> {
        Ok(TokenIndex {
            ids: Tensor::zeros([positions], DType::U32, device)?,
            starts: Tensor::zeros([positions + 1], DType::U32, device)?,
            order: Tensor::zeros([positions], DType::U32, device)?,
            distinct: 0,
            host_pairs: Vec::with_capacity(positions),
            host_ids: vec![0; positions],
            host_starts: vec![0; positions + 1],
            host_order: vec![0; positions],
        })
    }

    /// Rebuilds the index for a new batch of host token ids.
    pub fn update(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() != self.host_order.len() {
            return Err(Error::Shape {
                op: "TokenIndex::update",
                msg: format!("{} tokens for an index of {} positions", tokens.len(), self.host_order.len()),
            });
        }
        self.host_pairs.clear();
        self.host_pairs.extend(tokens.iter().enumerate().map(|(p, &t)| (t, p as u32)));
        self.host_pairs.sort_unstable();
        let mut u = 0;
        for (k, &(tok, pos)) in self.host_pairs.iter().enumerate() {
            if k == 0 || tok != self.host_pairs[k - 1].0 {
                self.host_ids[u] = tok;
                self.host_starts[u] = k as u32;
                u += 1;
            }
            self.host_order[k] = pos;
        }
        self.host_starts[u..].fill(tokens.len() as u32);
        self.distinct = u;
        self.ids.copy_from_slice(&self.host_ids)?;
        self.starts.copy_from_slice(&self.host_starts)?;
        self.order.copy_from_slice(&self.host_order)
    }
}

/// out (B, T, C) = wte[tokens] + wpe[0..T]; tokens (B, T) u32.
pub fn embedding_forward(out: &mut Tensor, tokens: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<()> {
    const OP: &str = "embedding_forward";
    same_kind(OP, out, &[wte, wpe])?;
    expect_ids(OP, tokens, out)?;
    let [b, t] = tokens.dims() else {
        return Err(Error::Shape { op: OP, msg: format!("tokens must be (B, T), got {}", tokens.shape()) });
    };
    let (b, t) = (*b, *t);
    let (vocab, c) = wte.shape().as_rows_cols();
    let (max_t, c2) = wpe.shape().as_rows_cols();
    if c2 != c || t > max_t {
        return Err(Error::Shape { op: OP, msg: format!("wte {} / wpe {} for T = {t}", wte.shape(), wpe.shape()) });
    }
    expect_dims(OP, "out", out, &[b, t, c])?;
    if on_cuda(out) {
        // Ids were checked on the host by whoever uploaded them (the data loader
        // checks every shard against the vocabulary).
        return launch::embedding_forward(
            out.cuda_mut(OP)?,
            tokens.cuda(OP)?,
            wte.cuda(OP)?,
            wpe.cuda(OP)?,
            b * t,
            t,
            c,
        );
    }
    let ids = tokens.as_slice::<u32>()?;
    check_ids(OP, ids, vocab)?;
    cpu_float!(OP, out, |F| {
        cpu::embedding::forward::<F>(out.as_mut_slice()?, ids, wte.as_slice()?, wpe.as_slice()?, t, c);
        Ok(())
    })
}

/// dwte[tokens] += dout; dwpe[0..T] += dout summed over the batch. `index`
/// must have been updated with these tokens.
pub fn embedding_backward(
    dwte: &mut Tensor,
    dwpe: &mut Tensor,
    dout: &Tensor,
    tokens: &Tensor,
    index: &TokenIndex,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    same_kind(OP, dwte, &[dwpe, dout])?;
    expect_ids(OP, tokens, dwte)?;
    let [b, t] = tokens.dims() else {
        return Err(Error::Shape { op: OP, msg: format!("tokens must be (B, T), got {}", tokens.shape()) });
    };
    let (b, t) = (*b, *t);
    let (vocab, c) = dwte.shape().as_rows_cols();
    expect_dims(OP, "dout", dout, &[b, t, c])?;
    expect_numel(OP, "index", &index.order, b * t)?;
    if dwpe.shape().as_rows_cols().0 < t {
        return Err(Error::Shape { op: OP, msg: format!("dwpe {} shorter than T = {t}", dwpe.shape()) });
    }
    if on_cuda(dwte) {
        let (dwte, dwpe) = (dwte.cuda_mut(OP)?, dwpe.cuda_mut(OP)?);
        let (ids, starts, order) = (index.ids.cuda(OP)?, index.starts.cuda(OP)?, index.order.cuda(OP)?);
        return launch::embedding_backward(dwte, dwpe, dout.cuda(OP)?, ids, starts, order, index.distinct, b, t, c);
    }
    let ids = tokens.as_slice::<u32>()?;
    check_ids(OP, ids, vocab)?;
    cpu_float!(OP, dwte, |F| {
        cpu::embedding::backward::<F>(dwte.as_mut_slice()?, dwpe.as_mut_slice()?, dout.as_slice()?, ids, t, c);
        Ok(())
    })
}

// ---------------------------------------------------------------- loss

/// Fused softmax + cross-entropy. logits (N, Vp) with the first `vocab_size`
/// columns real; targets (N) u32; losses (N) receives per-row losses.
/// With `grad_scale = Some(s)`, logits are overwritten in place with
/// s * dloss/dlogits (zero in the padded columns).
pub fn softmax_cross_entropy(
    logits: &mut Tensor,
    losses: &mut Tensor,
    targets: &Tensor,
    vocab_size: usize,
    grad_scale: Option<f64>,
) -> Result<()> {
    const OP: &str = "softmax_cross_entropy";
    stats_kind(OP, logits, &[losses])?;
    expect_ids(OP, targets, logits)?;
    let (n, vp) = logits.shape().as_rows_cols();
    if vocab_size == 0 || vocab_size > vp {
        return Err(Error::Shape { op: OP, msg: format!("vocab_size {vocab_size} vs logits {}", logits.shape()) });
    }
    expect_numel(OP, "losses", losses, n)?;
    expect_numel(OP, "targets", targets, n)?;
    if on_cuda(logits) {
        return launch::cross_entropy(
            logits.cuda_mut(OP)?,
            losses.cuda_mut(OP)?,
            targets.cuda(OP)?,
            n,
            vp,
            vocab_size,
            grad_scale,
        );
    }
    let ids = targets.as_slice::<u32>()?;
    check_ids(OP, ids, vocab_size)?;
    cpu_float!(OP, logits, |F| {
        cpu::cross_entropy::forward_backward::<F>(
            logits.as_mut_slice()?,
            losses.as_mut_slice()?,
            ids,
            vp,
            vocab_size,
            grad_scale.map(F::from_f64),
        );
        Ok(())
    })
}
