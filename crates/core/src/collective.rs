//! What a parallel layer needs from a group of ranks, defined here, below the
//! model crates, so that tensor-parallel layers in `trainer-nn` can take a
//! group as an argument without depending on the communication crate.
//! `trainer_comm::ProcessGroup` implements [`Collective`] over MPI (CPU
//! tensors) and NCCL (GPU tensors); [`SingleProcess`] is the group of one.
//!
//! Operations work in place on a tensor's flat data. Gather and scatter split
//! a range into `size` equal shards, shard `i` belonging to group rank `i`
//! (NCCL's layout).

use std::fmt;
use std::ops::Range;

use crate::{Error, Result, Tensor};

/// How values are combined across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size (floats only).
    Avg,
    Max,
    Min,
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        })
    }
}

/// The collectives of a set of ranks, as tensor-parallel layers use them.
/// Every member calls each operation, in the same order, with tensors of the
/// same dtype and length; an implementation names itself ([`Collective::name`])
/// and the operation in its errors, and gives up after its timeout.
pub trait Collective: fmt::Debug {
    /// The group's name for messages ("tp", "world").
    fn name(&self) -> &str;

    /// This process's index in the group, `0..size`.
    fn rank(&self) -> usize;

    fn size(&self) -> usize;

    /// Reduces the whole tensor across the group, in place.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()>;

    /// Splits `range` into `size` equal shards; each rank's input is its own
    /// shard ([`Collective::shard`]), and afterwards every rank holds all of
    /// them. The length must divide by the group size.
    fn all_gather_range(&self, t: &mut Tensor, range: Range<usize>) -> Result<()>;

    /// Splits `range` into `size` equal shards and leaves in this rank's
    /// shard the reduction of that shard over the group; the other shards are
    /// left unspecified. The length must divide by the group size.
    fn reduce_scatter_range(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<()>;

    /// [`Collective::all_gather_range`] over the whole tensor.
    fn all_gather(&self, t: &mut Tensor) -> Result<()> {
        let n = t.numel();
        self.all_gather_range(t, 0..n)
    }

    /// [`Collective::reduce_scatter_range`] over the whole tensor.
    fn reduce_scatter(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let n = t.numel();
        self.reduce_scatter_range(t, 0..n, op)
    }

    /// This rank's shard of `range` (its length divided by the group size).
    fn shard(&self, range: Range<usize>) -> Range<usize> {
        let chunk = range.len() / self.size().max(1);
        let start = range.start + self.rank() * chunk;
        start..start + chunk
    }
}

/// The group of one process: every operation checks its arguments and
/// leaves the data as it is (a reduction or gather over one rank is the
/// identity).
///
/// For single-process runs and unit tests of shapes. A test on one rank
/// proves nothing about a missing or misplaced all-reduce: parallel layers
/// are tested with 2+ real ranks under `mpirun` (DESIGN.md, "Testing").
#[derive(Debug, Clone)]
pub struct SingleProcess {
    name: String,
}

impl SingleProcess {
    pub fn new(name: &str) -> Self {
        SingleProcess { name: name.to_string() }
    }

    fn check(&self, op: &'static str, t: &Tensor, range: &Range<usize>, rop: Option<ReduceOp>) -> Result<()> {
        if range.start > range.end || range.end > t.numel() {
            return Err(Error::Shape {
                op,
                msg: format!(
                    "element range {}..{} is outside the tensor's {} elements (group '{}')",
                    range.start,
                    range.end,
                    t.numel(),
                    self.name
                ),
            });
        }
        if rop == Some(ReduceOp::Avg) && !t.dtype().is_float() {
            return Err(Error::Unsupported { op, dtype: t.dtype(), device: t.device().to_string() });
        }
        Ok(())
    }
}

impl Collective for SingleProcess {
    fn name(&self) -> &str {
        &self.name
    }

    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.check("all_reduce", t, &(0..t.numel()), Some(op))
    }

    fn all_gather_range(&self, t: &mut Tensor, range: Range<usize>) -> Result<()> {
        self.check("all_gather", t, &range, None)
    }

    fn reduce_scatter_range(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<()> {
        self.check("reduce_scatter", t, &range, Some(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn single_process_is_a_checked_identity() {
        let g = SingleProcess::new("tp");
        let group: &dyn Collective = &g;
        assert_eq!((group.name(), group.rank(), group.size()), ("tp", 0, 1));
        assert_eq!(group.shard(2..8), 2..8);
        let mut t = Tensor::from_vec(vec![1.0f32, -2.0, 3.0], [3], &Device::Cpu).unwrap();
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            group.all_reduce(&mut t, op).unwrap();
            group.reduce_scatter(&mut t, op).unwrap();
        }
        group.all_gather(&mut t).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, -2.0, 3.0]);

        let e = group.all_gather_range(&mut t, 1..4).unwrap_err().to_string();
        assert!(e.contains("all_gather") && e.contains("1..4") && e.contains("group 'tp'"), "{e}");
        let mut u = Tensor::from_vec(vec![1u32], [1], &Device::Cpu).unwrap();
        group.all_reduce(&mut u, ReduceOp::Max).unwrap();
        let e = group.all_reduce(&mut u, ReduceOp::Avg).unwrap_err().to_string();
        assert!(e.contains("all_reduce") && e.contains("u32"), "{e}");
        assert_eq!(ReduceOp::Max.to_string(), "max");
    }
}
