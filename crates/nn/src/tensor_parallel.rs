//! Tensor-parallel linear layers (Megatron-LM's scheme) over a group of `tp`
//! ranks, given as a [`Collective`] so that this crate needs no communication
//! library. Layers hold only their slice of the weights; the full layer is
//! what they compute together.
//!
//! The two conjugate operations, named as in the Megatron paper:
//! - "f" ([`f_backward`]): identity in the forward pass, all-reduce of the
//!   input gradient in the backward pass. It stands before a column-parallel
//!   layer, whose input every rank holds whole but whose input gradient each
//!   rank computes only the part of from its output slice.
//! - "g" ([`g_forward`]): all-reduce in the forward pass, identity in the
//!   backward pass. It follows a row-parallel layer, whose output each rank
//!   computes only a partial sum of.
//!
//! So an MLP (column-parallel fc, then row-parallel proj) or an attention
//! block (column-parallel qkv per head group, then row-parallel proj)
//! communicates once in each direction.
//!
//! Weight slices are cut from the full tensor ([`ColumnParallelLinear::load_full`],
//! [`RowParallelLinear::load_full`]), so a tensor-parallel run can start from
//! exactly the weights of an unsplit one.

use trainer_core::collective::{Collective, ReduceOp};
use trainer_core::{DType, Device, Error, Result, Tensor, ops};

use crate::{Linear, Module, Param};

/// "f" backward: the input gradient, a partial sum on each rank, summed over
/// the group (every rank then holds the whole gradient).
pub fn f_backward(dinp: &mut Tensor, group: &dyn Collective) -> Result<()> {
    group.all_reduce(dinp, ReduceOp::Sum)
}

/// "g" forward: the output, a partial sum on each rank, summed over the
/// group (every rank then holds the whole output).
pub fn g_forward(out: &mut Tensor, group: &dyn Collective) -> Result<()> {
    group.all_reduce(out, ReduceOp::Sum)
}

/// `total` split into `parts` equal slices, or an error naming `what`.
fn slice_len(what: &str, total: usize, parts: usize) -> Result<usize> {
    if parts == 0 || !total.is_multiple_of(parts) {
        return Err(Error::Shape {
            op: "tensor parallel",
            msg: format!("{what} = {total} does not split over {parts} tensor-parallel ranks"),
        });
    }
    Ok(total / parts)
}

/// Rows `rank * rows .. (rank + 1) * rows` of a row-major (R, C) host tensor
/// (all of a 1-D one's elements in that range).
fn rows_of(full: &Tensor, rank: usize, rows: usize) -> Result<Tensor> {
    let cols = if full.rank() >= 2 { full.numel() / full.dims()[0] } else { 1 };
    let v = full.to_device(&Device::Cpu)?.to_vec_f64()?;
    let part = v[rank * rows * cols..(rank + 1) * rows * cols].to_vec();
    let dims: Vec<usize> = if full.rank() >= 2 { vec![rows, cols] } else { vec![rows] };
    Tensor::from_vec(part, dims, &Device::Cpu)
}

/// Columns `rank * cols .. (rank + 1) * cols` of a row-major (R, C) host tensor.
fn cols_of(full: &Tensor, rank: usize, cols: usize) -> Result<Tensor> {
    let (r, c) = (full.dims()[0], full.numel() / full.dims()[0]);
    let v = full.to_device(&Device::Cpu)?.to_vec_f64()?;
    let part: Vec<f64> = (0..r).flat_map(|i| v[i * c + rank * cols..i * c + (rank + 1) * cols].to_vec()).collect();
    Tensor::from_vec(part, [r, cols], &Device::Cpu)
}

/// Copies `src` (any float dtype, on the host) into a parameter's value.
fn set(param: &mut Param, src: &Tensor) -> Result<()> {
    if src.dims() != param.value.dims() {
        return Err(Error::Shape {
            op: "tensor parallel",
            msg: format!("slice of {} has shape {}, the parameter {}", param.name, src.shape(), param.value.shape()),
        });
    }
    let staged = src.to_dtype(param.value.dtype())?.to_device(&param.value.device())?;
    ops::copy(&mut param.value, &staged)
}

/// y = x W^T + b with W's output rows (and b) split over the group.
///
/// Replicated: the input x (N, in). Sharded: W (out/tp, in), b (out/tp), the
/// output (N, out/tp), which is this rank's slice of the full output, bitwise
/// (the same dot products as the unsplit layer). Partial sums: the input
/// gradient before [`f_backward`].
#[derive(Debug)]
pub struct ColumnParallelLinear {
    pub linear: Linear,
    rank: usize,
}

impl ColumnParallelLinear {
    /// The slice of rank `rank` of `tp` of an (out, in) layer named `name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        (rank, tp): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rows = slice_len(&format!("{name}: output features"), out, tp)?;
        Ok(ColumnParallelLinear { linear: Linear::new(name, inp, rows, bias, dtype, device)?, rank })
    }

    /// Takes this rank's slice of the full layer's weight (out, in) and bias (out).
    pub fn load_full(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let rows = self.linear.weight.value.dims()[0];
        set(&mut self.linear.weight, &rows_of(weight, self.rank, rows)?)?;
        match (&mut self.linear.bias, bias) {
            (Some(b), Some(full)) => set(b, &rows_of(full, self.rank, rows)?),
            _ => Ok(()),
        }
    }

    /// out (N, out/tp) = x (N, in) @ W_r^T + b_r.
    pub fn forward(&self, out: &mut Tensor, inp: &Tensor) -> Result<()> {
        self.linear.forward(out, inp)
    }

    /// dinp (N, in) overwritten with the whole input gradient (after "f"'s
    /// all-reduce); dW_r and db_r accumulate.
    pub fn backward(&mut self, dinp: &mut Tensor, dout: &Tensor, inp: &Tensor, group: &dyn Collective) -> Result<()> {
        self.linear.backward(dinp, dout, inp)?;
        f_backward(dinp, group)
    }
}

impl Module for ColumnParallelLinear {
    fn params(&self) -> Vec<&Param> {
        self.linear.params()
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        self.linear.params_mut()
    }
}

/// y = x W^T + b with W's input columns split over the group.
///
/// Sharded: W (out, in/tp), the input (N, in/tp) (a column-parallel layer's
/// output). Partial sums: x_r W_r^T before [`g_forward`]. Replicated: the bias
/// (out), added once (by rank 0, before the sum), the output (N, out) after
/// the sum, and the output gradient; so every rank computes the same bias
/// gradient.
#[derive(Debug)]
pub struct RowParallelLinear {
    /// Weight (out, in/tp), bias (out).
    pub linear: Linear,
    rank: usize,
}

impl RowParallelLinear {
    /// The slice of rank `rank` of `tp` of an (out, in) layer named `name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
        (rank, tp): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cols = slice_len(&format!("{name}: input features"), inp, tp)?;
        Ok(RowParallelLinear { linear: Linear::new(name, cols, out, bias, dtype, device)?, rank })
    }

    /// Takes this rank's slice of the full layer's weight (out, in), and the whole bias (out).
    pub fn load_full(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        let cols = self.linear.weight.value.dims()[1];
        set(&mut self.linear.weight, &cols_of(weight, self.rank, cols)?)?;
        match (&mut self.linear.bias, bias) {
            (Some(b), Some(full)) => set(b, full),
            _ => Ok(()),
        }
    }

    /// out (N, out) = sum over ranks of x_r (N, in/tp) @ W_r^T, + b.
    pub fn forward(&self, out: &mut Tensor, inp: &Tensor, group: &dyn Collective) -> Result<()> {
        let bias = self.linear.bias.as_ref().filter(|_| self.rank == 0).map(|b| &b.value);
        ops::linear_forward(out, inp, &self.linear.weight.value, bias)?;
        g_forward(out, group)
    }

    /// dinp (N, in/tp) overwritten; dW_r and db accumulate. The output
    /// gradient is the whole one on every rank ("g" backward is the identity).
    pub fn backward(&mut self, dinp: &mut Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        self.linear.backward(dinp, dout, inp)
    }
}

impl Module for RowParallelLinear {
    fn params(&self) -> Vec<&Param> {
        self.linear.params()
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        self.linear.params_mut()
    }
}

#[cfg(test)]
mod tests {
    use trainer_core::collective::SingleProcess;

    use super::*;

    #[test]
    fn slices_that_do_not_divide_are_errors_naming_the_layer() {
        let e = ColumnParallelLinear::new("h.0.mlp.c_fc", 8, 30, true, (0, 4), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("h.0.mlp.c_fc: output features = 30") && e.contains("4 tensor-parallel ranks"), "{e}");
        let e = RowParallelLinear::new("h.0.mlp.c_proj", 30, 8, true, (0, 4), DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input features = 30"), "{e}");
    }

    #[test]
    fn slices_are_cut_from_the_full_tensor() {
        let full = Tensor::from_vec((0..12).map(|i| i as f32).collect::<Vec<_>>(), [3, 4], &Device::Cpu).unwrap();
        assert_eq!(rows_of(&full, 1, 1).unwrap().to_vec_f64().unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
        assert_eq!(cols_of(&full, 1, 2).unwrap().to_vec_f64().unwrap(), vec![2.0, 3.0, 6.0, 7.0, 10.0, 11.0]);
        // With one rank the layers are the plain layer (the multi-rank checks run under mpirun).
        let mut c = ColumnParallelLinear::new("c", 4, 3, true, (0, 1), DType::F32, &Device::Cpu).unwrap();
        c.load_full(&full, None).unwrap();
        assert_eq!(c.linear.weight.value.to_vec::<f32>().unwrap(), full.to_vec::<f32>().unwrap());
        let x = Tensor::from_vec(vec![1f32; 8], [2, 4], &Device::Cpu).unwrap();
        let mut y = Tensor::zeros([2, 3], DType::F32, &Device::Cpu).unwrap();
        c.forward(&mut y, &x).unwrap();
        let mut dx = Tensor::zeros([2, 4], DType::F32, &Device::Cpu).unwrap();
        c.backward(&mut dx, &y, &x, &SingleProcess::new("tp")).unwrap();
    }
}
