use trainer_core::{DType, Device, Result, Tensor, ops};

/// A trainable tensor and its gradient (same shape, dtype and device).
#[derive(Debug)]
pub struct Param {
    /// Stable name, used in checkpoints and for matching other frameworks' weights.
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    /// A zero-initialized parameter; models fill it with their init scheme.
    pub fn zeros(name: impl Into<String>, dims: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Param {
            name: name.into(),
            value: Tensor::zeros(dims, dtype, device)?,
            grad: Tensor::zeros(dims, dtype, device)?,
        })
    }

    /// Decoupled weight decay applies to matrices (linear and embedding weights),
    /// never to biases or LayerNorm gains: the GPT-2/nanoGPT convention.
    pub fn decays(&self) -> bool {
        self.value.rank() >= 2
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        ops::zero(&mut self.grad)
    }
}

/// Anything that owns parameters. The order is fixed, so optimizer state and
/// checkpoints can be matched to parameters by position or by name.
pub trait Module {
    fn params(&self) -> Vec<&Param>;
    fn params_mut(&mut self) -> Vec<&mut Param>;

    /// One launch on a GPU, however many parameters.
    fn zero_grad(&mut self) -> Result<()> {
        let mut grads: Vec<&mut Tensor> = self.params_mut().into_iter().map(|p| &mut p.grad).collect();
        ops::fill_all(&mut grads, 0.0)
    }

    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.value.numel()).sum()
    }
}
