//! Every op the models use, as functions over tensors the caller allocated.
//!
//! Conventions (shared by every backend):
//! - Outputs come first in the argument list and are `&mut Tensor`.
//! - Activation gradients are overwritten, except where a doc comment says
//!   "accumulates" (LayerNorm's input gradient: the residual stream).
//! - Parameter gradients always accumulate (`+=`), so gradient accumulation
//!   across micro-batches needs no extra buffers.
//! - Each op checks shapes, dtypes and devices and returns an [`Error`] naming
//!   itself; then it dispatches on the storage.

use crate::cpu;
pub use crate::cpu::adamw::AdamWHyper;
use crate::{CpuStorage, DType, Device, Element, Error, Result, Tensor};

/// Runs `$body` with `$F` bound to the Rust float type of `$t`'s dtype, on the
/// backend of `$t`'s device; any other combination is `Error::Unsupported`.
macro_rules! float_dispatch {
    ($op:expr, $t:expr, |$F:ident| $body:expr) => {{
        let (dtype, device) = ($t.dtype(), $t.device());
        match (device, dtype) {
            (Device::Cpu, DType::F32) => {
                type $F = f32;
                $body
            }
            (Device::Cpu, DType::F64) => {
                type $F = f64;
                $body
            }
            _ => Err(Error::Unsupported { op: $op, dtype, device }),
        }
    }};
}

/// All tensors share the first one's dtype and device.
fn same_kind(op: &'static str, first: &Tensor, rest: &[&Tensor]) -> Result<()> {
    for t in rest {
        if t.device() != first.device() {
            return Err(Error::DeviceMismatch { op, a: first.device(), b: t.device() });
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DType { op, expected: first.dtype(), got: t.dtype() });
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

fn expect_u32(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::U32 {
        return Err(Error::DType { op, expected: DType::U32, got: t.dtype() });
    }
    if t.device() != Device::Cpu {
        return Err(Error::Unsupported { op, dtype: t.dtype(), device: t.device() });
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
    match (t.device(), t.dtype()) {
        (Device::Cpu, DType::U32) => {
            t.as_mut_slice::<u32>()?.fill(value as u32);
            Ok(())
        }
        _ => float_dispatch!("fill", t, |F| {
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
        (crate::Storage::Cpu(d), crate::Storage::Cpu(s)) => {
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
    }
}

/// out = a + b, elementwise.
pub fn add(out: &mut Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    same_kind("add", out, &[a, b])?;
    expect_numel("add", "a", a, out.numel())?;
    expect_numel("add", "b", b, out.numel())?;
    float_dispatch!("add", out, |F| {
        cpu::elementwise::add::<F>(out.as_mut_slice()?, a.as_slice()?, b.as_slice()?);
        Ok(())
    })
}

/// acc += x, elementwise.
pub fn add_assign(acc: &mut Tensor, x: &Tensor) -> Result<()> {
    same_kind("add_assign", acc, &[x])?;
    expect_numel("add_assign", "x", x, acc.numel())?;
    float_dispatch!("add_assign", acc, |F| {
        cpu::elementwise::add_assign::<F>(acc.as_mut_slice()?, x.as_slice()?);
        Ok(())
    })
}

/// x *= s, elementwise.
pub fn scale(x: &mut Tensor, s: f64) -> Result<()> {
    float_dispatch!("scale", x, |F| {
        cpu::elementwise::scale::<F>(x.as_mut_slice()?, F::from_f64(s));
        Ok(())
    })
}

/// Sum of squares of all elements, accumulated in f64 (for global gradient norms).
pub fn sum_squares(x: &Tensor) -> Result<f64> {
    float_dispatch!("sum_squares", x, |F| Ok(cpu::elementwise::sum_squares::<F>(x.as_slice()?)))
}

/// Sum of all elements, accumulated in f64 (for losses).
pub fn sum(x: &Tensor) -> Result<f64> {
    float_dispatch!("sum", x, |F| Ok(cpu::elementwise::sum::<F>(x.as_slice()?)))
}

// ---------------------------------------------------------------- matmul, linear

/// out (M, N) = (accumulate ? out : 0) + op(a) @ op(b).
/// Each tensor is seen as a matrix (leading dims flattened, last dim = columns):
/// op(a) is `a` (M, K), or `a` stored (K, M) when `trans_a`; op(b) is `b` (K, N),
/// or `b` stored (N, K) when `trans_b`.
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
    float_dispatch!(OP, out, |F| {
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
    matmul(out, inp, weight, false, true, false)?;
    if let Some(bias) = bias {
        const OP: &str = "linear_forward";
        same_kind(OP, out, &[bias])?;
        let (_, oc) = out.shape().as_rows_cols();
        expect_numel(OP, "bias", bias, oc)?;
        float_dispatch!(OP, out, |F| {
            let b = bias.as_slice::<F>()?;
            for row in out.as_mut_slice::<F>()?.chunks_mut(oc) {
                for (o, &b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
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
    matmul(dweight, dout, inp, true, false, true)?;
    if let Some(dbias) = dbias {
        const OP: &str = "linear_backward";
        same_kind(OP, dbias, &[dout])?;
        let (_, oc) = dout.shape().as_rows_cols();
        expect_numel(OP, "dbias", dbias, oc)?;
        float_dispatch!(OP, dbias, |F| {
            let db = dbias.as_mut_slice::<F>()?;
            // Serial over rows, in order: deterministic and cheap next to the GEMMs.
            for row in dout.as_slice::<F>()?.chunks(oc) {
                for (d, &g) in db.iter_mut().zip(row) {
                    *d += g;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
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
    same_kind(OP, out, &[mean, rstd, inp, weight, bias])?;
    let (n, c) = inp.shape().as_rows_cols();
    expect_numel(OP, "out", out, n * c)?;
    expect_numel(OP, "mean", mean, n)?;
    expect_numel(OP, "rstd", rstd, n)?;
    expect_numel(OP, "weight", weight, c)?;
    expect_numel(OP, "bias", bias, c)?;
    float_dispatch!(OP, out, |F| {
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
    same_kind(OP, dinp, &[dweight, dbias, dout, inp, weight, mean, rstd])?;
    let (n, c) = inp.shape().as_rows_cols();
    expect_numel(OP, "dinp", dinp, n * c)?;
    expect_numel(OP, "dout", dout, n * c)?;
    expect_numel(OP, "dweight", dweight, c)?;
    expect_numel(OP, "dbias", dbias, c)?;
    expect_numel(OP, "weight", weight, c)?;
    expect_numel(OP, "mean", mean, n)?;
    expect_numel(OP, "rstd", rstd, n)?;
    float_dispatch!(OP, dinp, |F| {
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

/// out = GELU(inp), tanh approximation.
pub fn gelu_forward(out: &mut Tensor, inp: &Tensor) -> Result<()> {
    same_kind("gelu_forward", out, &[inp])?;
    expect_numel("gelu_forward", "inp", inp, out.numel())?;
    float_dispatch!("gelu_forward", out, |F| {
        cpu::gelu::forward::<F>(out.as_mut_slice()?, inp.as_slice()?);
        Ok(())
    })
}

/// dinp = dout * GELU'(inp) (overwritten).
pub fn gelu_backward(dinp: &mut Tensor, inp: &Tensor, dout: &Tensor) -> Result<()> {
    same_kind("gelu_backward", dinp, &[inp, dout])?;
    expect_numel("gelu_backward", "inp", inp, dinp.numel())?;
    expect_numel("gelu_backward", "dout", dout, dinp.numel())?;
    float_dispatch!("gelu_backward", dinp, |F| {
        cpu::gelu::backward::<F>(dinp.as_mut_slice()?, inp.as_slice()?, dout.as_slice()?);
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
    same_kind(OP, out, &[lse, qkv])?;
    let (b, d) = attention_dims(OP, qkv, n_head, causal)?;
    expect_dims(OP, "out", out, &[b, d.t, d.c])?;
    expect_dims(OP, "lse", lse, &[b, n_head, d.t])?;
    float_dispatch!(OP, out, |F| {
        cpu::attention::forward::<F>(out.as_mut_slice()?, lse.as_mut_slice()?, qkv.as_slice()?, d);
        Ok(())
    })
}

/// Backward of [`attention_forward`]: dqkv (B, T, 3C) overwritten, from dout and
/// the forward's qkv, out and lse.
pub fn attention_backward(
    dqkv: &mut Tensor,
    dout: &Tensor,
    qkv: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    n_head: usize,
    causal: bool,
) -> Result<()> {
    const OP: &str = "attention_backward";
    same_kind(OP, dqkv, &[dout, qkv, out, lse])?;
    let (b, d) = attention_dims(OP, qkv, n_head, causal)?;
    expect_dims(OP, "dqkv", dqkv, qkv.dims())?;
    expect_dims(OP, "dout", dout, &[b, d.t, d.c])?;
    expect_dims(OP, "out", out, &[b, d.t, d.c])?;
    expect_dims(OP, "lse", lse, &[b, n_head, d.t])?;
    float_dispatch!(OP, dqkv, |F| {
        cpu::attention::backward::<F>(
            dqkv.as_mut_slice()?,
            dout.as_slice()?,
            qkv.as_slice()?,
            out.as_slice()?,
            lse.as_slice()?,
            d,
        );
        Ok(())
    })
}

// ---------------------------------------------------------------- embedding

/// out (B, T, C) = wte[tokens] + wpe[0..T]; tokens (B, T) u32.
pub fn embedding_forward(out: &mut Tensor, tokens: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<()> {
    const OP: &str = "embedding_forward";
    same_kind(OP, out, &[wte, wpe])?;
    expect_u32(OP, tokens)?;
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
    let ids = tokens.as_slice::<u32>()?;
    check_ids(OP, ids, vocab)?;
    float_dispatch!(OP, out, |F| {
        cpu::embedding::forward::<F>(out.as_mut_slice()?, ids, wte.as_slice()?, wpe.as_slice()?, t, c);
        Ok(())
    })
}

/// dwte[tokens] += dout; dwpe[0..T] += dout summed over the batch.
pub fn embedding_backward(dwte: &mut Tensor, dwpe: &mut Tensor, dout: &Tensor, tokens: &Tensor) -> Result<()> {
    const OP: &str = "embedding_backward";
    same_kind(OP, dwte, &[dwpe, dout])?;
    expect_u32(OP, tokens)?;
    let [b, t] = tokens.dims() else {
        return Err(Error::Shape { op: OP, msg: format!("tokens must be (B, T), got {}", tokens.shape()) });
    };
    let (vocab, c) = dwte.shape().as_rows_cols();
    expect_dims(OP, "dout", dout, &[*b, *t, c])?;
    if dwpe.shape().as_rows_cols().0 < *t {
        return Err(Error::Shape { op: OP, msg: format!("dwpe {} shorter than T = {t}", dwpe.shape()) });
    }
    let ids = tokens.as_slice::<u32>()?;
    check_ids(OP, ids, vocab)?;
    let t = *t;
    float_dispatch!(OP, dwte, |F| {
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
    same_kind(OP, logits, &[losses])?;
    expect_u32(OP, targets)?;
    let (n, vp) = logits.shape().as_rows_cols();
    if vocab_size == 0 || vocab_size > vp {
        return Err(Error::Shape { op: OP, msg: format!("vocab_size {vocab_size} vs logits {}", logits.shape()) });
    }
    expect_numel(OP, "losses", losses, n)?;
    expect_numel(OP, "targets", targets, n)?;
    let ids = targets.as_slice::<u32>()?;
    check_ids(OP, ids, vocab_size)?;
    float_dispatch!(OP, logits, |F| {
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

// ---------------------------------------------------------------- optimizer

/// One AdamW step on one parameter tensor: grad is scaled by `h.grad_scale`,
/// moments m and v updated, then param decayed and updated (PyTorch's order).
pub fn adamw_update(param: &mut Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor, h: AdamWHyper) -> Result<()> {
    const OP: &str = "adamw_update";
    same_kind(OP, param, &[grad, m, v])?;
    for (name, t) in [("grad", grad), ("m", &*m), ("v", &*v)] {
        expect_numel(OP, name, t, param.numel())?;
    }
    float_dispatch!(OP, param, |F| {
        cpu::adamw::update::<F>(param.as_mut_slice()?, grad.as_slice()?, m.as_mut_slice()?, v.as_mut_slice()?, h);
        Ok(())
    })
}
