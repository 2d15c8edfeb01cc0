use trainer_core::{DType, Device, Result, Tensor, ops};

/// A parameter's identity within its model: its position in the whole
/// model's [`Module::params`] order, assigned once by [`number_params`]. A
/// part of a model (a pipeline stage) keeps the ids of the whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamId(pub usize);

/// A trainable tensor and its gradient (same shape, dtype and device).
#[derive(Debug)]
pub struct Param {
    /// Stable name, used in checkpoints and for matching other frameworks' weights.
    pub name: String,
    pub id: ParamId,
    pub value: Tensor,
    pub grad: Tensor,
}

impl Param {
    /// A zero-initialized parameter; models fill it with their init scheme.
    pub fn zeros(name: impl Into<String>, dims: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Param {
            name: name.into(),
            id: ParamId(0),
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

/// Gives `params` (a whole model's, in its order) the ids 0, 1, 2, ...
pub fn number_params(params: Vec<&mut Param>) {
    for (i, p) in params.into_iter().enumerate() {
        p.id = ParamId(i);
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
