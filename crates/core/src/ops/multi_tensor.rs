//! Ops over many tensors, or ranges of them, at once: on a GPU each is one
//! launch however many tensors it covers (the optimizer step, the gradient
//! norm and gradient zeroing touch every parameter tensor each step).
//!
//! A [`Span`] names `len` elements from element `start` of tensor number
//! `tensor` in the op's tensor list. Spans let a flat buffer (all gradients of
//! a data-parallel bucket, one rank's ZeRO shard of optimizer state) and the
//! model's separate tensors be addressed alike.

use super::{on_cuda, same_kind};
use crate::cuda::launch;
use crate::{DType, Error, Result, Tensor, cpu};

pub use crate::cpu::adamw::AdamWHyper;

/// `len` elements from element `start` of tensor number `tensor` of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub tensor: usize,
    pub start: usize,
    pub len: usize,
}

impl Span {
    /// All of tensor number `index` of `list`.
    pub fn whole(index: usize, t: &Tensor) -> Span {
        Span { tensor: index, start: 0, len: t.numel() }
    }

    fn end(&self) -> usize {
        self.start + self.len
    }
}

/// One parameter range for [`adamw_update`]: the parameter elements, their
/// gradients (which may live in another buffer, e.g. an all-reduced flat one),
/// and where their state starts in the flat moment (and master) arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdamWSpan {
    pub param: Span,
    pub grad: Span,
    pub state_start: usize,
    /// Decoupled weight decay applies (matrices, not biases or gains).
    pub decays: bool,
}

/// Every span lies inside its tensor.
fn check_spans(op: &'static str, what: &str, numels: &[usize], spans: &[Span]) -> Result<()> {
    for s in spans {
        let Some(&n) = numels.get(s.tensor) else {
            return Err(Error::IndexOutOfRange { op, index: s.tensor as u64, limit: numels.len() as u64 });
        };
        if s.end() > n {
            return Err(Error::Shape {
                op,
                msg: format!("{what} span [{}, {}) of tensor {} exceeds its {n} elements", s.start, s.end(), s.tensor),
            });
        }
    }
    Ok(())
}

fn numels<T: std::ops::Deref<Target = Tensor>>(ts: &[T]) -> Vec<usize> {
    ts.iter().map(|t| t.numel()).collect()
}

/// Sets every element of every tensor to `value` (gradient zeroing).
pub fn fill_all(xs: &mut [&mut Tensor], value: f64) -> Result<()> {
    const OP: &str = "fill_all";
    let Some((first, rest)) = xs.split_first() else { return Ok(()) };
    same_kind(OP, first, &rest.iter().map(|t| &**t).collect::<Vec<_>>())?;
    if on_cuda(first) {
        let mut storages = xs.iter_mut().map(|t| t.cuda_mut(OP)).collect::<Result<Vec<_>>>()?;
        return launch::fill_spans(&mut storages, value);
    }
    xs.iter_mut().try_for_each(|t| super::fill(t, value))
}

/// dst spans = src spans, pairwise (equal lengths; same dtype and device).
pub fn copy_spans(dst: &mut [&mut Tensor], src: &[&Tensor], pairs: &[(Span, Span)]) -> Result<()> {
    const OP: &str = "copy_spans";
    let Some(first) = dst.first() else { return Ok(()) };
    same_kind(OP, first, src)?;
    same_kind(OP, first, &dst.iter().map(|t| &**t).collect::<Vec<_>>())?;
    let (d_spans, s_spans): (Vec<Span>, Vec<Span>) = pairs.iter().copied().unzip();
    check_spans(OP, "destination", &numels(dst), &d_spans)?;
    check_spans(OP, "source", &numels(src), &s_spans)?;
    if let Some((d, s)) = pairs.iter().find(|(d, s)| d.len != s.len) {
        return Err(Error::Shape {
            op: OP,
            msg: format!("destination span of {} elements, source of {}", d.len, s.len),
        });
    }
    if on_cuda(first) {
        let srcs = src.iter().map(|t| t.cuda(OP)).collect::<Result<Vec<_>>>()?;
        let mut dsts = dst.iter_mut().map(|t| t.cuda_mut(OP)).collect::<Result<Vec<_>>>()?;
        return launch::copy_spans(&mut dsts, &srcs, pairs);
    }
    for (d, s) in pairs {
        cpu_float!(OP, src[s.tensor], |F| {
            let from = &src[s.tensor].as_slice::<F>()?[s.start..s.end()];
            dst[d.tensor].as_mut_slice::<F>()?[d.start..d.end()].copy_from_slice(from);
            Ok(())
        })?;
    }
    Ok(())
}

/// Sum of squares over spans of several tensors, accumulated in f64 (a global
/// gradient norm). Deterministic: fixed partial sums added in order. On a GPU
/// one launch and one host synchronization (the value is needed on the host).
pub fn sum_squares_spans(xs: &[&Tensor], spans: &[Span]) -> Result<f64> {
    const OP: &str = "sum_squares";
    let Some((first, rest)) = xs.split_first() else { return Ok(0.0) };
    same_kind(OP, first, rest)?;
    check_spans(OP, "input", &numels(xs), spans)?;
    if on_cuda(first) {
        let storages = xs.iter().map(|t| t.cuda(OP)).collect::<Result<Vec<_>>>()?;
        return launch::sum_spans(&storages, spans, true);
    }
    let mut total = 0.0;
    for s in spans {
        let x = xs[s.tensor];
        total += cpu_float!(OP, x, |F| Ok(cpu::elementwise::sum_squares::<F>(&x.as_slice()?[s.start..s.end()])))?;
    }
    Ok(total)
}

/// Sum of squares of every element of several tensors (see [`sum_squares_spans`]).
pub fn sum_squares_all(xs: &[&Tensor]) -> Result<f64> {
    let spans: Vec<Span> = xs.iter().enumerate().map(|(i, t)| Span::whole(i, t)).collect();
    sum_squares_spans(xs, &spans)
}

/// One AdamW step over parameter spans: each gradient is scaled by
/// `h.grad_scale`, the moments updated, then the parameter decayed (where the
/// span decays, by `h.weight_decay`) and updated, in PyTorch's order.
///
/// The state is flat: `m` and `v` (and `master`) hold one element per updated
/// parameter element, the span's from `state_start`. Mixed precision: bf16
/// parameters come with an f32 `master`; the update runs on it and the bf16
/// parameter is rewritten from it. f32 and f64 parameters have no master.
pub fn adamw_update(
    params: &mut [&mut Tensor],
    grads: &[&Tensor],
    master: Option<&mut Tensor>,
    m: &mut Tensor,
    v: &mut Tensor,
    spans: &[AdamWSpan],
    h: AdamWHyper,
) -> Result<()> {
    const OP: &str = "adamw_update";
    let Some(first) = params.first() else { return Ok(()) };
    same_kind(OP, first, grads)?;
    same_kind(OP, first, &params.iter().map(|t| &**t).collect::<Vec<_>>())?;
    let state = master.as_deref().unwrap_or(m);
    same_kind(OP, state, &[m, v])?;
    match (&master, first.dtype() == state.dtype()) {
        (None, true) | (Some(_), false) => {}
        (None, false) => return Err(Error::DType { op: OP, expected: state.dtype(), got: first.dtype() }),
        (Some(_), true) => {
            return Err(Error::Unsupported {
                op: "adamw_update (master weights)",
                dtype: first.dtype(),
                device: first.device().to_string(),
            });
        }
    }
    let p_spans: Vec<Span> = spans.iter().map(|s| s.param).collect();
    let g_spans: Vec<Span> = spans.iter().map(|s| s.grad).collect();
    check_spans(OP, "parameter", &numels(params), &p_spans)?;
    check_spans(OP, "gradient", &numels(grads), &g_spans)?;
    let state_len = m.numel().min(v.numel()).min(master.as_ref().map_or(usize::MAX, |t| t.numel()));
    for s in spans {
        if s.grad.len != s.param.len || s.state_start + s.param.len > state_len {
            return Err(Error::Shape {
                op: OP,
                msg: format!(
                    "span of {} parameter elements with {} gradient elements and state [{}, {}) of {state_len}",
                    s.param.len,
                    s.grad.len,
                    s.state_start,
                    s.state_start + s.param.len
                ),
            });
        }
    }
    if on_cuda(first) {
        let gs = grads.iter().map(|t| t.cuda(OP)).collect::<Result<Vec<_>>>()?;
        let mut ps = params.iter_mut().map(|t| t.cuda_mut(OP)).collect::<Result<Vec<_>>>()?;
        let master = master.map(|t| t.cuda_mut(OP)).transpose()?;
        return launch::adamw_spans(&mut ps, &gs, master, m.cuda_mut(OP)?, v.cuda_mut(OP)?, spans, h);
    }
    if master.is_some() {
        // Half precision trains on GPUs only (the config refuses bf16 on a CPU).
        return Err(Error::Unsupported {
            op: "adamw_update (master weights)",
            dtype: first.dtype(),
            device: "cpu".into(),
        });
    }
    for s in spans {
        let hs = AdamWHyper { weight_decay: if s.decays { h.weight_decay } else { 0.0 }, ..h };
        let state = s.state_start..s.state_start + s.param.len;
        cpu_float!(OP, m, |F| {
            cpu::adamw::update::<F>(
                &mut params[s.param.tensor].as_mut_slice()?[s.param.start..s.param.end()],
                &grads[s.grad.tensor].as_slice()?[s.grad.start..s.grad.end()],
                &mut m.as_mut_slice()?[state.clone()],
                &mut v.as_mut_slice()?[state],
                hs,
            );
            Ok(())
        })?;
    }
    Ok(())
}
