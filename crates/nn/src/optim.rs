use trainer_core::{Result, Tensor, ops};

use crate::Param;

/// AdamW hyper-parameters other than the learning rate (which the schedule gives).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW with bias correction; weight decay only where [`Param::decays`].
/// Holds the state of each parameter, matched by position in the model's fixed
/// parameter order: first and second moments, always f32 (or f64), and for a
/// half-precision parameter its f32 master copy, which the update runs on.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    moments: Vec<(Tensor, Tensor)>,
    masters: Vec<Option<Tensor>>,
    /// Number of updates done so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[&Param]) -> Result<Self> {
        let mut moments = Vec::with_capacity(params.len());
        let mut masters = Vec::with_capacity(params.len());
        for p in params {
            let state_dtype = p.value.dtype().stats_dtype();
            let z = || Tensor::zeros(p.value.dims(), state_dtype, &p.value.device());
            moments.push((z()?, z()?));
            masters.push(if state_dtype == p.value.dtype() { None } else { Some(p.value.to_dtype(state_dtype)?) });
        }
        Ok(AdamW { config, moments, masters, step: 0 })
    }

    /// One update of every parameter; gradients are multiplied by `grad_scale`
    /// first (the clipping coefficient).
    pub fn update(&mut self, params: Vec<&mut Param>, lr: f64, grad_scale: f64) -> Result<()> {
        assert_eq!(params.len(), self.moments.len(), "AdamW built for a different parameter list");
        self.step += 1;
        for ((p, (m, v)), master) in params.into_iter().zip(&mut self.moments).zip(&mut self.masters) {
            let h = ops::AdamWHyper {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: if p.decays() { self.config.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            ops::adamw_update(&mut p.value, master.as_mut(), &p.grad, m, v, h)?;
        }
        Ok(())
    }
}

/// The state as checkpoints see it, per parameter in the model's order.
impl AdamW {
    /// First and second moments (exp_avg, exp_avg_sq) of each parameter.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    pub fn moments_mut(&mut self) -> &mut [(Tensor, Tensor)] {
        &mut self.moments
    }

    /// The f32 master copy of each half-precision parameter; None for a
    /// parameter that is its own master (f32).
    pub fn masters(&self) -> &[Option<Tensor>] {
        &self.masters
    }

    pub fn masters_mut(&mut self) -> &mut [Option<Tensor>] {
        &mut self.masters
    }
}

/// The L2 norm of all gradients together (one host synchronization on a GPU).
pub fn global_grad_norm(params: &[&Param]) -> Result<f64> {
    let grads: Vec<&Tensor> = params.iter().map(|p| &p.grad).collect();
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
