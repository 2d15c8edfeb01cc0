use std::ops::Range;

use trainer_core::ops::{self, AdamWSpan, Span};
use trainer_core::{Device, Error, Result, Tensor};

use crate::Param;
use crate::flat::{FlatLayout, FlatPiece};

/// AdamW hyper-parameters other than the learning rate (which the schedule gives).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Where the tensors an [`AdamW::step`] reads or writes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// One tensor per parameter, in the module's parameter order.
    PerParam,
    /// One buffer over the whole [`FlatLayout`] (an all-reduced gradient
    /// bucket set, or the parameters a ZeRO all-gather assembles).
    Flat,
}

impl Placement {
    fn span(self, piece: &FlatPiece) -> Span {
        match self {
            Placement::PerParam => piece.in_param(),
            Placement::Flat => piece.in_flat(0),
        }
    }
}

/// AdamW with bias correction; weight decay only where [`Param::decays`].
///
/// The state is flat ([`FlatLayout`]): first and second moments, always f32
/// (f64 for f64 parameters), and for half-precision parameters an f32 master
/// copy, which the update runs on. An optimizer owns the state of one range of
/// the layout: all of it, or one ZeRO shard. One step is one launch on a GPU.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    layout: FlatLayout,
    range: Range<usize>,
    pieces: Vec<FlatPiece>,
    m: Tensor,
    v: Tensor,
    master: Option<Tensor>,
    /// Number of updates done so far.
    pub step: u64,
}

impl AdamW {
    /// State for every parameter.
    pub fn new(config: AdamWConfig, params: &[&Param]) -> Result<Self> {
        let layout = FlatLayout::new(params, 1);
        let range = layout.shard(0);
        Self::for_range(config, params, layout, range)
    }

    /// State for the parameters (or parts of them) in `range` of `layout`.
    pub fn for_range(config: AdamWConfig, params: &[&Param], layout: FlatLayout, range: Range<usize>) -> Result<Self> {
        let Some(first) = params.first() else {
            return Err(Error::Shape { op: "AdamW", msg: "no parameters to optimize".into() });
        };
        let (dtype, device) = (first.value.dtype(), first.value.device());
        let state_dtype = dtype.stats_dtype();
        let pieces = layout.pieces(range.clone());
        let z = || Tensor::zeros([range.len()], state_dtype, &device);
        let master = if state_dtype == dtype {
            None
        } else {
            // The master starts as the parameters' own values, widened. Done
            // once, on the host.
            let mut host = vec![0f64; range.len()];
            for piece in &pieces {
                let values = params[piece.param].value.to_vec_f64()?;
                let at = piece.flat_start - range.start;
                host[at..at + piece.len].copy_from_slice(&values[piece.param_start..piece.param_start + piece.len]);
            }
            Some(Tensor::from_vec(host, [range.len()], &Device::Cpu)?.to_dtype(state_dtype)?.to_device(&device)?)
        };
        Ok(AdamW { config, m: z()?, v: z()?, master, layout, range, pieces, step: 0 })
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The range of the flat layout whose state this optimizer holds.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The parts of parameters whose state this optimizer holds, in flat order.
    pub fn pieces(&self) -> &[FlatPiece] {
        &self.pieces
    }

    /// The state tensors by name (PyTorch's: first and second moments, and the
    /// f32 master copy of half-precision parameters), for checkpoints: each is
    /// flat over [`AdamW::range`] of [`AdamW::layout`].
    pub fn state(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("exp_avg", &self.m), ("exp_avg_sq", &self.v)];
        out.extend(self.master.as_ref().map(|t| ("master", t)));
        out
    }

    pub fn state_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut out = vec![("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)];
        out.extend(self.master.as_mut().map(|t| ("master", t)));
        out
    }

    /// One update of every parameter from its own gradient; gradients are
    /// multiplied by `grad_scale` first (the clipping coefficient).
    /// `params` are the trainable parameters this optimizer was made for.
    pub fn update(&mut self, params: Vec<&mut Param>, lr: f64, grad_scale: f64) -> Result<()> {
        let mut values = Vec::with_capacity(params.len());
        let mut grads = Vec::with_capacity(params.len());
        for p in params {
            let (value, grad) = p.value_mut_and_grad("AdamW")?;
            values.push(value);
            grads.push(grad);
        }
        self.step(&mut values, Placement::PerParam, &grads, Placement::PerParam, lr, grad_scale)
    }

    /// One update of the parameter elements in this optimizer's range: reads
    /// `grads`, writes `params`, each laid out as its [`Placement`] says.
    pub fn step(
        &mut self,
        params: &mut [&mut Tensor],
        param_place: Placement,
        grads: &[&Tensor],
        grad_place: Placement,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let spans: Vec<AdamWSpan> = self
            .pieces
            .iter()
            .map(|p| AdamWSpan {
                param: param_place.span(p),
                grad: grad_place.span(p),
                state_start: p.flat_start - self.range.start,
                decays: p.decays,
            })
            .collect();
        let h = ops::AdamWHyper {
            lr,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
            step: self.step,
            grad_scale,
        };
        ops::adamw_update(params, grads, self.master.as_mut(), &mut self.m, &mut self.v, &spans, h)
    }
}

/// The L2 norm of all gradients together (one host synchronization on a
/// GPU); frozen parameters have none.
pub fn global_grad_norm(params: &[&Param]) -> Result<f64> {
    let grads: Vec<&Tensor> = params.iter().filter_map(|p| p.grad.as_ref()).collect();
    Ok(ops::sum_squares_all(&grads)?.sqrt())
}

/// The factor that scales gradients to a global norm of at most `max_norm`
/// (1 when already within it), as torch.nn.utils.clip_grad_norm_ computes it.
/// `max_norm <= 0` disables clipping. A non-finite norm gives a non-finite
/// factor: the caller must notice the norm, not this function hide it.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}
