use trainer_core::{DType, Device, Result, Tensor, ops};

/// A parameter's identity within its model: its position in the whole
/// model's [`Module::params`] order, assigned once by [`number_params`]. A
/// part of a model (a pipeline stage) keeps the ids of the whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamId(pub usize);

/// A parameter and, while it is trained, its gradient (same shape, dtype
/// and device). A frozen parameter ([`Param::freeze`]) has no gradient
/// buffer, and so no optimizer state and no all-reduce: the optimizer and
/// data parallelism see only [`trainable`] parameters.
#[derive(Debug)]
pub struct Param {
    /// Stable name, used in checkpoints and for matching other frameworks' weights.
    pub name: String,
    pub id: ParamId,
    pub value: Tensor,
    /// None when frozen.
    pub grad: Option<Tensor>,
    /// Whether AdamW's decoupled weight decay applies (see [`Param::decays`]).
    pub decay: bool,
}

impl Param {
    /// A zero-initialized parameter; models fill it with their init scheme.
    pub fn zeros(name: impl Into<String>, dims: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        Ok(Param {
            name: name.into(),
            id: ParamId(0),
            value: Tensor::zeros(dims, dtype, device)?,
            grad: Some(Tensor::zeros(dims, dtype, device)?),
            decay: dims.len() >= 2,
        })
    }

    pub fn trainable(&self) -> bool {
        self.grad.is_some()
    }

    /// Stops training this parameter: its gradient buffer is freed. Layers
    /// whose backward cannot skip a parameter's gradient report
    /// [`trainer_core::Error::Frozen`] when it is frozen.
    pub fn freeze(&mut self) {
        self.grad = None;
    }

    /// The gradient, which `op` (a layer's backward) accumulates into.
    pub fn grad_mut(&mut self, op: &'static str) -> Result<&mut Tensor> {
        let name = &self.name;
        self.grad.as_mut().ok_or_else(|| trainer_core::Error::Frozen { op, name: name.clone() })
    }

    /// The value and the gradient together (a backward reads one and accumulates into the other).
    pub fn value_and_grad(&mut self, op: &'static str) -> Result<(&Tensor, &mut Tensor)> {
        let Param { name, value, grad, .. } = self;
        let grad = grad.as_mut().ok_or_else(|| trainer_core::Error::Frozen { op, name: name.clone() })?;
        Ok((value, grad))
    }

    /// The value to update and its gradient (an optimizer step).
    pub fn value_mut_and_grad(&mut self, op: &'static str) -> Result<(&mut Tensor, &Tensor)> {
        let Param { name, value, grad, .. } = self;
        let grad = grad.as_ref().ok_or_else(|| trainer_core::Error::Frozen { op, name: name.clone() })?;
        Ok((value, grad))
    }

    /// The gradient of a trainable parameter (the caller selected trainable ones).
    pub fn grad(&self) -> Result<&Tensor> {
        self.grad
            .as_ref()
            .ok_or_else(|| trainer_core::Error::Frozen { op: "reading gradients", name: self.name.clone() })
    }

    /// Decoupled weight decay applies by default to matrices (linear and
    /// embedding weights), never to biases or LayerNorm gains: the
    /// GPT-2/nanoGPT convention. A model may exempt a matrix (ViT's position
    /// table, as timm and DeiT do) by clearing [`Param::decay`].
    pub fn decays(&self) -> bool {
        self.decay
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad.as_mut().map_or(Ok(()), ops::zero)
    }
}

/// The trainable ones of `params`, in order: what the optimizer updates and
/// data parallelism reduces (indices into this list are their positions).
pub fn trainable<'a>(params: &[&'a Param]) -> Vec<&'a Param> {
    params.iter().copied().filter(|p| p.trainable()).collect()
}

/// [`trainable`] of mutable parameters.
pub fn trainable_mut(params: Vec<&mut Param>) -> Vec<&mut Param> {
    params.into_iter().filter(|p| p.trainable()).collect()
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

    /// One launch on a GPU, however many parameters (frozen ones have no gradient).
    fn zero_grad(&mut self) -> Result<()> {
        let mut grads: Vec<&mut Tensor> = self.params_mut().into_iter().filter_map(|p| p.grad.as_mut()).collect();
        ops::fill_all(&mut grads, 0.0)
    }

    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.value.numel()).sum()
    }
}
