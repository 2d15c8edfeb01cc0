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
/// Holds first and second moments for each parameter, matched by position in
/// the model's fixed parameter order.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    moments: Vec<(Tensor, Tensor)>,
    /// Number of updates done so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[&Param]) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                let z = || Tensor::zeros(p.value.dims(), p.value.dtype(), &p.value.device());
                Ok((z()?, z()?))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { config, moments, step: 0 })
    }

    /// One update of every parameter; gradients are multiplied by `grad_scale`
    /// first (the clipping coefficient).
    pub fn update(&mut self, params: Vec<&mut Param>, lr: f64, grad_scale: f64) -> Result<()> {
        assert_eq!(params.len(), self.moments.len(), "AdamW built for a different parameter list");
        self.step += 1;
        for (p, (m, v)) in params.into_iter().zip(&mut self.moments) {
            let h = ops::AdamWHyper {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay: if p.decays() { self.config.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale,
            };
            ops::adamw_update(&mut p.value, &p.grad, m, v, h)?;
        }
        Ok(())
    }
}

/// The L2 norm of all gradients together.
pub fn global_grad_norm(params: &[&Param]) -> Result<f64> {
    let mut sq = 0.0;
    for p in params {
        sq += ops::sum_squares(&p.grad)?;
    }
    Ok(sq.sqrt())
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
