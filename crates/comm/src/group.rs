//! [`ProcessGroup`]: the collectives a set of ranks runs together.
//!
//! One concrete type rather than a trait: the backends are a closed set that
//! this crate owns (a group of one, MPI, MPI plus NCCL), and the backend is
//! chosen per call by where the tensor lives, not per group: a data-parallel
//! group reduces GPU gradients through NCCL and host-side scalars (token
//! counts, losses) through MPI. A trait object would add dynamic dispatch and
//! a generic parameter through the trainer without buying anything; a group of
//! one keeps the same code path and does nothing.
//!
//! Operations work in place on a [`Tensor`], whole or on an element range of
//! its flat data, so that flat gradient buckets and ZeRO shards need no
//! copies. Reduce-scatter and all-gather split the range into `size` equal
//! shards (NCCL's layout): shard `i` belongs to group rank `i`; pad flat
//! buffers with [`shard_len`]. Point-to-point transfers that must not wait
//! for each other (a pipeline stage sending forward while receiving from
//! behind) go together in one [`ProcessGroup::exchange`].
//!
//! The model crates see a group through [`trainer_core::collective::Collective`],
//! which [`ProcessGroup`] implements.

use std::cell::Cell;
use std::fmt;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys::ncclRedOp_t;
use half::{bf16, f16};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use trainer_core::collective::{Collective, ReduceOp};
use trainer_core::{CudaDevice, DType, Device, Tensor};

use crate::error::cuda_err;
use crate::mpi_backend::{self, Deadline, MpiComm, Transfer};
use crate::nccl::{NcclComm, nccl_dtype};
use crate::world::{World, guarded};
use crate::{Error, Result};

/// The smallest length of at least `len` elements that splits into `size`
/// equal shards (for padding flat buffers before reduce-scatter/all-gather).
pub fn shard_len(len: usize, size: usize) -> usize {
    let size = size.max(1);
    len.div_ceil(size) * size
}

/// An operation started on a GPU group's communication stream.
///
/// [`Work::wait`] makes the compute stream wait for it (the host does not
/// block). Until then, keep the tensor alive and leave its range alone on the
/// compute stream. Dropping a `Work` waits like [`Work::wait`], so a forgotten
/// one never lets compute race the communication. On the CPU (and in a group
/// of one) the operation has already completed when `Work` is returned.
#[must_use = "the compute stream must wait for the communication before using its result"]
pub struct Work {
    pending: Option<(Arc<CudaEvent>, CudaDevice)>,
}

impl fmt::Debug for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Work").field("pending", &self.pending.is_some()).finish()
    }
}

impl Work {
    fn completed() -> Work {
        Work { pending: None }
    }

    /// The compute stream waits for this operation (and everything queued
    /// before it on the communication stream).
    pub fn wait(mut self) -> Result<()> {
        match self.pending.take() {
            Some((event, device)) => device.stream().wait(&event).map_err(|e| cuda_err("waiting for communication", e)),
            None => Ok(()),
        }
    }

    /// Blocks the host until the operation has completed.
    pub fn synchronize(mut self) -> Result<()> {
        match self.pending.take() {
            Some((event, _)) => event.synchronize().map_err(|e| cuda_err("synchronizing with communication", e)),
            None => Ok(()),
        }
    }

    /// Whether the operation has completed (never blocks).
    pub fn is_complete(&self) -> Result<bool> {
        match &self.pending {
            Some((event, _)) => event.try_is_complete().map_err(|e| cuda_err("querying communication", e)),
            None => Ok(true),
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Some((event, device)) = self.pending.take() {
            let _ = device.stream().wait(&event);
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Host values that [`ProcessGroup::all_reduce_host`] and friends move.
pub trait HostScalar: Equivalence + Copy + Default + sealed::Sealed {
    /// `self / n` for floats (the average); None for integers.
    #[doc(hidden)]
    fn divide(self, n: usize) -> Option<Self>;
}

macro_rules! host_scalar {
    (float: $($t:ty),*; int: $($i:ty),*) => {
        $(impl sealed::Sealed for $t {}
        impl HostScalar for $t {
            fn divide(self, n: usize) -> Option<Self> {
                Some(self / n as $t)
            }
        })*
        $(impl sealed::Sealed for $i {}
        impl HostScalar for $i {
            fn divide(self, _n: usize) -> Option<Self> {
                None
            }
        })*
    };
}

host_scalar!(float: f32, f64; int: u8, u32, u64, i32, i64);

/// One transfer of a batched [`ProcessGroup::exchange`]: elements `range` of
/// `tensor` sent to, or received from, group rank `peer`.
#[derive(Debug)]
pub enum P2p<'a> {
    Send { tensor: &'a Tensor, range: Range<usize>, peer: usize },
    Recv { tensor: &'a mut Tensor, range: Range<usize>, peer: usize },
}

impl<'a> P2p<'a> {
    /// Sends the whole tensor to group rank `peer`.
    pub fn send(tensor: &'a Tensor, peer: usize) -> Self {
        let range = 0..tensor.numel();
        P2p::Send { tensor, range, peer }
    }

    /// Receives the whole tensor from group rank `peer`.
    pub fn recv(tensor: &'a mut Tensor, peer: usize) -> Self {
        let range = 0..tensor.numel();
        P2p::Recv { tensor, range, peer }
    }

    /// The tensor, range, peer and the peer's role (for messages).
    fn parts(&self) -> (&Tensor, &Range<usize>, usize, &'static str) {
        match self {
            P2p::Send { tensor, range, peer } => (tensor, range, *peer, "destination"),
            P2p::Recv { tensor, range, peer } => (tensor, range, *peer, "source"),
        }
    }
}

impl fmt::Display for P2p<'_> {
    /// "send of 4 f32 elements to rank 1", "recv of ... from rank 3".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (t, range, peer, _) = self.parts();
        let (what, dir) = if matches!(self, P2p::Send { .. }) { ("send", "to") } else { ("recv", "from") };
        write!(f, "{what} of {} {} elements {dir} rank {peer}", range.len(), t.dtype())
    }
}

/// The same set of ranks, in the same order, on every member.
struct Inner {
    rank: usize,
    size: usize,
    members: Vec<usize>,
    timeout: Duration,
    /// Dropped before `mpi`: its teardown may still use the host.
    nccl: Option<NcclComm>,
    mpi: Option<MpiComm>,
}

/// The collectives of one set of ranks (the world, or one axis of the mesh).
/// Cloning shares the communicators. Used from the thread that made it (MPI
/// communicators are not shared across threads here).
#[derive(Clone)]
pub struct ProcessGroup {
    name: String,
    inner: Rc<Inner>,
}

impl fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("name", &self.name)
            .field("rank", &self.inner.rank)
            .field("size", &self.inner.size)
            .field("members", &self.inner.members)
            .field("nccl", &self.inner.nccl.is_some())
            .finish()
    }
}

/// Where one call runs.
enum Backend<'a> {
    /// A group of one: nothing to communicate.
    Local,
    Mpi(&'a MpiComm),
    Nccl(&'a NcclComm),
}

/// Runs `$body` with `$s` bound to the range of `$t` as MPI-movable words
/// (half types as their raw 16 bits).
macro_rules! with_words {
    ($t:expr, $range:expr, $get:ident, $cast:ident, |$s:ident| $body:expr) => {
        match $t.dtype() {
            DType::F32 => {
                let $s = &mut $t.$get::<f32>()?[$range];
                $body
            }
            DType::F64 => {
                let $s = &mut $t.$get::<f64>()?[$range];
                $body
            }
            DType::U32 => {
                let $s = &mut $t.$get::<u32>()?[$range];
                $body
            }
            DType::BF16 => {
                let $s: &mut [u16] = bytemuck::$cast(&mut $t.$get::<bf16>()?[$range]);
                $body
            }
            DType::F16 => {
                let $s: &mut [u16] = bytemuck::$cast(&mut $t.$get::<f16>()?[$range]);
                $body
            }
        }
    };
}

/// Runs `$body` with the range of `$t` and the conversions to and from the
/// type MPI reduces it in (f32 for half types), the average's division
/// folded into the conversion back.
macro_rules! with_lanes {
    ($t:expr, $range:expr, $div:expr, |$s:ident, $to:ident, $from:ident| $body:expr) => {{
        let div: f64 = $div;
        match $t.dtype() {
            DType::F32 => {
                let d = div as f32;
                let $s = &mut $t.as_mut_slice::<f32>()?[$range];
                let ($to, $from) = (|x: f32| x, |w: f32| w / d);
                $body
            }
            DType::F64 => {
                let $s = &mut $t.as_mut_slice::<f64>()?[$range];
                let ($to, $from) = (|x: f64| x, |w: f64| w / div);
                $body
            }
            DType::BF16 => {
                let d = div as f32;
                let $s = &mut $t.as_mut_slice::<bf16>()?[$range];
                let ($to, $from) = (|x: bf16| x.to_f32(), |w: f32| bf16::from_f32(w / d));
                $body
            }
            DType::F16 => {
                let d = div as f32;
                let $s = &mut $t.as_mut_slice::<f16>()?[$range];
                let ($to, $from) = (|x: f16| x.to_f32(), |w: f32| f16::from_f32(w / d));
                $body
            }
            DType::U32 => {
                let $s = &mut $t.as_mut_slice::<u32>()?[$range];
                let ($to, $from) = (|x: u32| x, |w: u32| w);
                $body
            }
        }
    }};
}

/// The device address of element `start` of a CUDA tensor, for writing.
fn address_mut(t: &mut Tensor, start: usize) -> u64 {
    let bytes = t.dtype().size_in_bytes();
    t.cuda_storage_mut().map_or(0, |s| s.device_address_mut() + (start * bytes) as u64)
}

fn address(t: &Tensor, start: usize) -> u64 {
    let bytes = t.dtype().size_in_bytes();
    t.cuda_storage().map_or(0, |s| s.device_address() + (start * bytes) as u64)
}

fn void(addr: u64) -> *mut std::ffi::c_void {
    addr as usize as *mut std::ffi::c_void
}

fn nccl_op(op: ReduceOp) -> ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncclRedOp_t::ncclMax,
        ReduceOp::Min => ncclRedOp_t::ncclMin,
    }
}

/// MPI's operation for `op`; an average is a sum divided on the way back
/// from the wire type (`with_lanes!`, `all_reduce_host`).
fn mpi_op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
        ReduceOp::Min => SystemOperation::min(),
    }
}

/// The most elements one MPI call can name (its counts are C ints).
const MPI_MAX_COUNT: usize = i32::MAX as usize;

/// Elements `range` of a host tensor as raw bytes (what MPI moves when it
/// does not compute on the data).
fn host_bytes_mut(t: &mut Tensor, range: Range<usize>) -> Result<&mut [u8]> {
    Ok(with_words!(t, range, as_mut_slice, cast_slice_mut, |s| bytemuck::cast_slice_mut(s)))
}

/// The first few items, "; "-separated, then how many there are in all.
fn list(items: &[&str]) -> String {
    match items.len() {
        0..=4 => items.join("; "),
        n => format!("{}; ... ({n} in all)", items[..4].join("; ")),
    }
}

impl ProcessGroup {
    /// A group of one process: every operation checks its arguments and does
    /// nothing else.
    pub fn single(name: &str) -> ProcessGroup {
        ProcessGroup::local(name, 0, Duration::from_secs(600))
    }

    fn local(name: &str, world_rank: usize, timeout: Duration) -> ProcessGroup {
        ProcessGroup {
            name: name.to_string(),
            inner: Rc::new(Inner { rank: 0, size: 1, members: vec![world_rank], timeout, nccl: None, mpi: None }),
        }
    }

    /// This rank's group among `groups`: disjoint lists of world ranks, each
    /// in group-rank order; None where this rank is in none of them.
    /// Collective over the whole world: every rank calls it with the same
    /// lists (one MPI_Comm_split, then an NCCL communicator among the members
    /// of each group of several ranks when `device` is a GPU). The lists are
    /// checked first, alike on every rank, so a bad one fails everywhere
    /// before anything is communicated.
    pub(crate) fn from_lists(
        world: &World,
        name: &str,
        groups: &[Vec<usize>],
        device: &Device,
    ) -> Result<Option<ProcessGroup>> {
        check_lists(name, groups, world.size())?;
        let (me, timeout) = (world.rank(), world.options().timeout);
        let mine = groups.iter().enumerate().find_map(|(color, members)| {
            members.iter().position(|&r| r == me).map(|rank| (color, members.as_slice(), rank))
        });
        let local = || ProcessGroup::local(name, me, timeout);
        let Some(runtime) = world.mpi_runtime() else {
            return Ok(mine.map(|_| local()));
        };
        // Groups of one need no communicator; every rank sees that all are.
        if groups.iter().all(|m| m.len() <= 1) {
            return Ok(mine.map(|_| local()));
        }
        let whole = matches!(groups, [only] if only.iter().copied().eq(0..world.size()));
        let world_comm = SimpleCommunicator::world();
        let comm =
            guarded(&format!("creating the MPI communicator of process group '{name}'"), timeout, || match mine {
                _ if whole => Some(world_comm.duplicate()),
                Some((color, members, rank)) if members.len() > 1 => {
                    world_comm.split_by_color_with_key(Color::with_value(color as i32), rank as i32)
                }
                // Outside every group that communicates: takes part in the split
                // (it is collective) and gets no communicator.
                _ => world_comm.split_by_color(Color::undefined()),
            });
        let Some((_, members, rank)) = mine else { return Ok(None) };
        if members.len() == 1 {
            return Ok(Some(local()));
        }
        let comm = comm.ok_or_else(|| Error::Launch(format!("group '{name}': MPI_Comm_split gave no communicator")))?;
        if comm.size() as usize != members.len() || comm.rank() as usize != rank {
            return Err(Error::Launch(format!(
                "group '{name}': MPI made a group of {} with this rank at {}, expected {} at {rank}",
                comm.size(),
                comm.rank(),
                members.len()
            )));
        }
        let mpi = MpiComm::new(comm, runtime.clone());
        let label = format!("process group '{name}' ({})", ranks_text(members));
        let nccl = match device {
            Device::Cuda(d) => Some(NcclComm::new(d, &mpi, (rank, members.len()), &label, world.options())?),
            Device::Cpu => None,
        };
        Ok(Some(ProcessGroup {
            name: name.to_string(),
            inner: Rc::new(Inner {
                rank,
                size: members.len(),
                members: members.to_vec(),
                timeout,
                nccl,
                mpi: Some(mpi),
            }),
        }))
    }

    /// The same communicators under another name (a mesh axis that spans the
    /// whole world shares the world's).
    pub(crate) fn renamed(&self, name: &str) -> ProcessGroup {
        ProcessGroup { name: name.to_string(), inner: self.inner.clone() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This process's index in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// The world ranks of the members, in group order.
    pub fn members(&self) -> &[usize] {
        &self.inner.members
    }

    /// Whether GPU tensors can be communicated (the group was made with a
    /// CUDA device and has more than one member).
    pub fn has_nccl(&self) -> bool {
        self.inner.nccl.is_some()
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// This rank's shard of `range` (see [`ProcessGroup::reduce_scatter_range`]).
    pub fn shard(&self, range: Range<usize>) -> Range<usize> {
        let chunk = range.len() / self.inner.size;
        let start = range.start + self.inner.rank * chunk;
        start..start + chunk
    }

    fn label(&self) -> String {
        format!("process group '{}' ({})", self.name, ranks_text(&self.inner.members))
    }

    fn invalid(&self, op: &'static str, msg: String) -> Error {
        Error::Invalid { op, group: self.name.clone(), msg }
    }

    /// Checks the range and picks the backend for `t`.
    fn backend(&self, op: &'static str, t: &Tensor, range: &Range<usize>) -> Result<Backend<'_>> {
        if range.start > range.end || range.end > t.numel() {
            return Err(self.invalid(
                op,
                format!("element range {}..{} is outside the tensor's {} elements", range.start, range.end, t.numel()),
            ));
        }
        match t.cuda_storage() {
            None => {
                if range.len() > MPI_MAX_COUNT {
                    return Err(self.invalid(
                        op,
                        format!(
                            "{} elements is more than one MPI call can move ({MPI_MAX_COUNT}); split it",
                            range.len()
                        ),
                    ));
                }
                Ok(self.inner.mpi.as_ref().map_or(Backend::Local, Backend::Mpi))
            }
            Some(s) => match &self.inner.nccl {
                Some(n) if s.device() == n.device() => Ok(Backend::Nccl(n)),
                Some(n) => Err(self.invalid(
                    op,
                    format!(
                        "the tensor is on cuda:{} but the group's GPU is cuda:{}",
                        s.device().ordinal(),
                        n.device().ordinal()
                    ),
                )),
                None if self.inner.size == 1 => Ok(Backend::Local),
                None => Err(self.invalid(
                    op,
                    "a CUDA tensor on a group made for the CPU; make the group with the CUDA device to use NCCL".into(),
                )),
            },
        }
    }

    fn check_reduce(&self, op: &'static str, t: &Tensor, rop: ReduceOp) -> Result<()> {
        if rop == ReduceOp::Avg && !t.dtype().is_float() {
            return Err(self.invalid(op, format!("an average of {} values; use Sum for integers", t.dtype())));
        }
        Ok(())
    }

    fn check_shards(&self, op: &'static str, range: &Range<usize>) -> Result<()> {
        if !range.len().is_multiple_of(self.inner.size) {
            return Err(self.invalid(
                op,
                format!(
                    "{} elements do not split into {} equal shards; pad the buffer to {} (shard_len)",
                    range.len(),
                    self.inner.size,
                    shard_len(range.len(), self.inner.size)
                ),
            ));
        }
        Ok(())
    }

    fn check_peer(&self, op: &'static str, peer: usize, role: &str) -> Result<()> {
        if peer >= self.inner.size {
            return Err(self.invalid(op, format!("{role} {peer} is not a rank of this group of {}", self.inner.size)));
        }
        if role != "root" && peer == self.inner.rank {
            return Err(self.invalid(op, format!("{role} {peer} is this rank itself")));
        }
        Ok(())
    }

    fn what(&self, op: &str, n: usize, dtype: DType) -> String {
        format!("{op} of {n} {dtype} elements")
    }

    // ---- all-reduce ----

    /// Reduces the whole tensor across the group, in place.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let n = t.numel();
        self.all_reduce_range(t, 0..n, op)
    }

    /// Reduces elements `range` of the tensor's flat data, in place; the rest
    /// is untouched. On a GPU: stream-ordered (the compute stream waits), the
    /// host does not block.
    pub fn all_reduce_range(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<()> {
        self.start_all_reduce(t, range, op)?.wait()
    }

    /// Starts [`ProcessGroup::all_reduce_range`] on the communication stream
    /// after the compute stream's work so far; see [`Work`].
    pub fn start_all_reduce(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<Work> {
        self.start_all_reduce_on(t, range, op, false)
    }

    /// [`ProcessGroup::start_all_reduce`] for communication that runs while
    /// the GPU computes: on NCCL it goes through the group's background
    /// communicator, which uses at most [`crate::CommOptions::background_ctas`]
    /// thread blocks, so that it takes few multiprocessors from the compute
    /// kernels it overlaps (without one, when that option is 0 or NCCL is
    /// older than 2.18, it is a plain all-reduce; on MPI always). In order
    /// with every other operation of the group (one communication stream).
    pub fn start_background_all_reduce(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<Work> {
        self.start_all_reduce_on(t, range, op, true)
    }

    fn start_all_reduce_on(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp, background: bool) -> Result<Work> {
        const OP: &str = "all_reduce";
        let backend = self.backend(OP, t, &range)?;
        self.check_reduce(OP, t, op)?;
        if range.is_empty() {
            return Ok(Work::completed());
        }
        let what = self.what(&format!("{OP} ({op})"), range.len(), t.dtype());
        match backend {
            Backend::Local => Ok(Work::completed()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                let div = if op == ReduceOp::Avg { self.inner.size as f64 } else { 1.0 };
                with_lanes!(t, range, div, |s, to, from| mpi_backend::all_reduce(c, s, mpi_op(op), to, from, &dl));
                Ok(Work::completed())
            }
            Backend::Nccl(n) => {
                let (dtype, count, ptr) = (self.nccl_type(OP, t)?, range.len(), address_mut(t, range.start));
                let rop = nccl_op(op);
                let lane = if background { " (background)" } else { "" };
                // SAFETY: ptr..ptr + count elements lies inside the tensor
                // (range checked); in place is allowed by NCCL.
                let done = n.launch(format!("NCCL {what}{lane}"), background, |comm, stream| unsafe {
                    nccl::all_reduce(void(ptr), void(ptr), count, dtype, rop, comm, stream)
                })?;
                Ok(Work { pending: Some((done, n.device().clone())) })
            }
        }
    }

    fn nccl_type(&self, op: &'static str, t: &Tensor) -> Result<cudarc::nccl::sys::ncclDataType_t> {
        nccl_dtype(t.dtype()).ok_or_else(|| self.invalid(op, format!("NCCL cannot move {} data", t.dtype())))
    }

    // ---- reduce-scatter ----

    /// [`ProcessGroup::reduce_scatter_range`] over the whole tensor.
    pub fn reduce_scatter(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let n = t.numel();
        self.reduce_scatter_range(t, 0..n, op)
    }

    /// Splits `range` into `size` equal shards and leaves in this rank's shard
    /// ([`ProcessGroup::shard`]) the reduction of that shard over the group;
    /// the other shards are left unspecified. The length must divide by the
    /// group size.
    pub fn reduce_scatter_range(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<()> {
        self.start_reduce_scatter(t, range, op)?.wait()
    }

    pub fn start_reduce_scatter(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> Result<Work> {
        const OP: &str = "reduce_scatter";
        let backend = self.backend(OP, t, &range)?;
        self.check_reduce(OP, t, op)?;
        self.check_shards(OP, &range)?;
        if range.is_empty() {
            return Ok(Work::completed());
        }
        let what = self.what(&format!("{OP} ({op})"), range.len(), t.dtype());
        let mine = self.shard(0..range.len());
        match backend {
            Backend::Local => Ok(Work::completed()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                let div = if op == ReduceOp::Avg { self.inner.size as f64 } else { 1.0 };
                with_lanes!(t, range, div, |s, to, from| {
                    mpi_backend::reduce_scatter(c, s, mine, mpi_op(op), to, from, &dl)
                });
                Ok(Work::completed())
            }
            Backend::Nccl(n) => {
                let dtype = self.nccl_type(OP, t)?;
                let bytes = t.dtype().size_in_bytes() as u64;
                let send = address_mut(t, range.start);
                let recv = send + mine.start as u64 * bytes;
                let (count, rop) = (mine.len(), nccl_op(op));
                // SAFETY: the send range is the checked range; the receive
                // range is this rank's shard inside it, which is NCCL's
                // in-place layout for reduce-scatter.
                let done = n.launch(format!("NCCL {what}"), false, |comm, stream| unsafe {
                    nccl::reduce_scatter(void(send), void(recv), count, dtype, rop, comm, stream)
                })?;
                Ok(Work { pending: Some((done, n.device().clone())) })
            }
        }
    }

    // ---- all-gather ----

    /// [`ProcessGroup::all_gather_range`] over the whole tensor.
    pub fn all_gather(&self, t: &mut Tensor) -> Result<()> {
        let n = t.numel();
        self.all_gather_range(t, 0..n)
    }

    /// Splits `range` into `size` equal shards; each rank's input is its own
    /// shard, and afterwards every rank holds all shards.
    pub fn all_gather_range(&self, t: &mut Tensor, range: Range<usize>) -> Result<()> {
        self.start_all_gather(t, range)?.wait()
    }

    pub fn start_all_gather(&self, t: &mut Tensor, range: Range<usize>) -> Result<Work> {
        const OP: &str = "all_gather";
        let backend = self.backend(OP, t, &range)?;
        self.check_shards(OP, &range)?;
        if range.is_empty() {
            return Ok(Work::completed());
        }
        let what = self.what(OP, range.len(), t.dtype());
        let mine = self.shard(0..range.len());
        match backend {
            Backend::Local => Ok(Work::completed()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                with_words!(t, range, as_mut_slice, cast_slice_mut, |s| mpi_backend::all_gather(c, s, mine, &dl));
                Ok(Work::completed())
            }
            Backend::Nccl(n) => {
                let dtype = self.nccl_type(OP, t)?;
                let bytes = t.dtype().size_in_bytes() as u64;
                let recv = address_mut(t, range.start);
                let send = recv + mine.start as u64 * bytes;
                let count = mine.len();
                // SAFETY: the receive range is the checked range; the send
                // range is this rank's shard inside it (NCCL's in-place
                // all-gather layout).
                let done = n.launch(format!("NCCL {what}"), false, |comm, stream| unsafe {
                    nccl::all_gather(void(send), void(recv), count, dtype, comm, stream)
                })?;
                Ok(Work { pending: Some((done, n.device().clone())) })
            }
        }
    }

    // ---- broadcast ----

    /// Copies the tensor of group rank `root` to every rank.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let n = t.numel();
        self.broadcast_range(t, 0..n, root)
    }

    pub fn broadcast_range(&self, t: &mut Tensor, range: Range<usize>, root: usize) -> Result<()> {
        self.start_broadcast(t, range, root)?.wait()
    }

    pub fn start_broadcast(&self, t: &mut Tensor, range: Range<usize>, root: usize) -> Result<Work> {
        const OP: &str = "broadcast";
        let backend = self.backend(OP, t, &range)?;
        self.check_peer(OP, root, "root")?;
        if range.is_empty() {
            return Ok(Work::completed());
        }
        let what = self.what(&format!("{OP} from rank {root}"), range.len(), t.dtype());
        match backend {
            Backend::Local => Ok(Work::completed()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                with_words!(t, range, as_mut_slice, cast_slice_mut, |s| mpi_backend::broadcast(c, s, root, &dl));
                Ok(Work::completed())
            }
            Backend::Nccl(n) => {
                let (dtype, count, ptr) = (self.nccl_type(OP, t)?, range.len(), address_mut(t, range.start));
                // SAFETY: ptr..ptr + count elements lies inside the tensor.
                let done = n.launch(format!("NCCL {what}"), false, |comm, stream| unsafe {
                    nccl::broadcast(void(ptr), void(ptr), count, dtype, root as i32, comm, stream)
                })?;
                Ok(Work { pending: Some((done, n.device().clone())) })
            }
        }
    }

    // ---- point to point ----

    /// Sends the tensor to group rank `dst`, which must post a matching
    /// [`ProcessGroup::recv`]. Between two ranks, messages arrive in order.
    pub fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.send_range(t, 0..t.numel(), dst)
    }

    pub fn send_range(&self, t: &Tensor, range: Range<usize>, dst: usize) -> Result<()> {
        const OP: &str = "send";
        let backend = self.backend(OP, t, &range)?;
        self.check_peer(OP, dst, "destination")?;
        let what = self.what(&format!("{OP} to rank {dst}"), range.len(), t.dtype());
        match backend {
            Backend::Local => Ok(()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                match t.dtype() {
                    DType::F32 => mpi_backend::send(c, &t.as_slice::<f32>()?[range], dst, &dl),
                    DType::F64 => mpi_backend::send(c, &t.as_slice::<f64>()?[range], dst, &dl),
                    DType::U32 => mpi_backend::send(c, &t.as_slice::<u32>()?[range], dst, &dl),
                    DType::BF16 => {
                        mpi_backend::send::<u16>(c, bytemuck::cast_slice(&t.as_slice::<bf16>()?[range]), dst, &dl)
                    }
                    DType::F16 => {
                        mpi_backend::send::<u16>(c, bytemuck::cast_slice(&t.as_slice::<f16>()?[range]), dst, &dl)
                    }
                }
                Ok(())
            }
            Backend::Nccl(n) => {
                let (dtype, count, ptr) = (self.nccl_type(OP, t)?, range.len(), address(t, range.start));
                // SAFETY: ptr..ptr + count elements lies inside the tensor.
                let done = n.launch(format!("NCCL {what}"), false, |comm, stream| unsafe {
                    nccl::send(void(ptr), count, dtype, dst as i32, comm, stream)
                })?;
                Work { pending: Some((done, n.device().clone())) }.wait()
            }
        }
    }

    /// Receives into the tensor from group rank `src`; the sender must send
    /// exactly as many elements.
    pub fn recv(&self, t: &mut Tensor, src: usize) -> Result<()> {
        let n = t.numel();
        self.recv_range(t, 0..n, src)
    }

    pub fn recv_range(&self, t: &mut Tensor, range: Range<usize>, src: usize) -> Result<()> {
        const OP: &str = "recv";
        let backend = self.backend(OP, t, &range)?;
        self.check_peer(OP, src, "source")?;
        let what = self.what(&format!("{OP} from rank {src}"), range.len(), t.dtype());
        match backend {
            Backend::Local => Ok(()),
            Backend::Mpi(c) => {
                let what = || format!("MPI {what} on {}", self.label());
                let dl = Deadline::new(self.inner.timeout, &what);
                let expected = range.len();
                let got = with_words!(t, range, as_mut_slice, cast_slice_mut, |s| mpi_backend::recv(c, s, src, &dl));
                if got != expected {
                    return Err(self.invalid(OP, format!("expected {expected} elements from rank {src}, got {got}")));
                }
                Ok(())
            }
            Backend::Nccl(n) => {
                let (dtype, count, ptr) = (self.nccl_type(OP, t)?, range.len(), address_mut(t, range.start));
                // SAFETY: ptr..ptr + count elements lies inside the tensor.
                let done = n.launch(format!("NCCL {what}"), false, |comm, stream| unsafe {
                    nccl::recv(void(ptr), count, dtype, src as i32, comm, stream)
                })?;
                Work { pending: Some((done, n.device().clone())) }.wait()
            }
        }
    }

    // ---- batched point to point ----

    /// [`ProcessGroup::start_exchange`], after which the compute stream
    /// waits for it (the host does not block on a GPU).
    pub fn exchange(&self, ops: &mut [P2p<'_>]) -> Result<()> {
        self.start_exchange(ops)?.wait()
    }

    /// Starts every transfer of `ops` together, so that no order of sends and
    /// receives among ranks that all post theirs can deadlock (a pipeline
    /// stage sending forward while receiving from behind, both ways at
    /// once). Each transfer needs its peer to list the opposite one with the
    /// same length and dtype; transfers between the same two ranks match in
    /// list order. Empty transfers are skipped (on both sides, as they have
    /// the same length).
    ///
    /// NCCL: one group call (ncclGroupStart, ncclSend/ncclRecv, ncclGroupEnd)
    /// on the communication stream, after the compute stream's work so far;
    /// see [`Work`]. MPI: non-blocking sends and receives, polled until all
    /// complete (done when this returns). Every transfer is checked before
    /// any is posted; all tensors must be on the host, or all on the group's
    /// GPU.
    pub fn start_exchange(&self, ops: &mut [P2p<'_>]) -> Result<Work> {
        const OP: &str = "exchange";
        let mut backend = None;
        for op in ops.iter() {
            let (t, range, peer, role) = op.parts();
            let b = self.backend(OP, t, range)?;
            self.check_peer(OP, peer, role)?;
            if let Some(first) = &backend
                && std::mem::discriminant(first) != std::mem::discriminant(&b)
            {
                return Err(self.invalid(OP, "mixes host and GPU tensors; exchange each kind separately".into()));
            }
            backend = Some(b);
        }
        let mut live: Vec<&mut P2p<'_>> = ops.iter_mut().filter(|op| !op.parts().1.is_empty()).collect();
        let texts: Vec<String> = live.iter().map(|op| op.to_string()).collect();
        match backend {
            _ if live.is_empty() => Ok(Work::completed()),
            None | Some(Backend::Local) => Ok(Work::completed()),
            Some(Backend::Mpi(c)) => {
                let mut transfers = Vec::with_capacity(live.len());
                for op in live.iter_mut() {
                    let bytes = op.parts().0.dtype().size_in_bytes();
                    if op.parts().1.len().saturating_mul(bytes) > MPI_MAX_COUNT {
                        return Err(self.invalid(OP, format!("{op}: more bytes than one MPI call can move; split it")));
                    }
                    transfers.push(match op {
                        P2p::Send { tensor, range, peer } => {
                            Transfer::Send(&tensor.host_bytes()?[range.start * bytes..range.end * bytes], *peer)
                        }
                        P2p::Recv { tensor, range, peer } => {
                            Transfer::Recv(host_bytes_mut(tensor, range.clone())?, *peer)
                        }
                    });
                }
                let pending: Vec<Cell<bool>> = texts.iter().map(|_| Cell::new(true)).collect();
                let what = || {
                    let left: Vec<&str> =
                        texts.iter().zip(&pending).filter(|(_, p)| p.get()).map(|(t, _)| t.as_str()).collect();
                    let (left_n, all) = (left.len(), texts.len());
                    format!("MPI {OP} ({left_n} of {all} transfers left: {}) on {}", list(&left), self.label())
                };
                let moved = mpi_backend::exchange(c, transfers, &pending, &Deadline::new(self.inner.timeout, &what));
                for (op, got) in live.iter().zip(moved) {
                    if let P2p::Recv { tensor, range, .. } = op {
                        let (dtype, bytes) = (tensor.dtype(), tensor.dtype().size_in_bytes());
                        if got != range.len() * bytes {
                            return Err(self.invalid(OP, format!("{op}: {} {dtype} elements arrived", got / bytes)));
                        }
                    }
                }
                Ok(Work::completed())
            }
            Some(Backend::Nccl(n)) => {
                // (send?, device address, elements, dtype, peer) of each transfer.
                let mut calls = Vec::with_capacity(live.len());
                for op in live.iter_mut() {
                    let dtype = self.nccl_type(OP, op.parts().0)?;
                    calls.push(match op {
                        P2p::Send { tensor, range, peer } => {
                            (true, address(tensor, range.start), range.len(), dtype, *peer)
                        }
                        P2p::Recv { tensor, range, peer } => {
                            (false, address_mut(tensor, range.start), range.len(), dtype, *peer)
                        }
                    });
                }
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                // SAFETY: each address and count lies inside its tensor's
                // checked range; the caller keeps the tensors alive and
                // leaves them alone until the work is waited for (`Work`).
                // ncclGroupEnd runs even when a call inside the group failed,
                // so the group is always closed.
                let done = n.launch(format!("NCCL {OP} ({})", list(&refs)), false, |comm, stream| unsafe {
                    nccl::group_start()?;
                    let mut queued = Ok(nccl::NcclStatus::Success);
                    for &(send, ptr, count, dtype, peer) in &calls {
                        queued = match send {
                            true => nccl::send(void(ptr), count, dtype, peer as i32, comm, stream),
                            false => nccl::recv(void(ptr), count, dtype, peer as i32, comm, stream),
                        };
                        if queued.is_err() {
                            break;
                        }
                    }
                    let ended = nccl::group_end();
                    queued.and(ended)
                })?;
                Ok(Work { pending: Some((done, n.device().clone())) })
            }
        }
    }

    // ---- host-side ----

    /// Waits until every member has called it (a host barrier: it does not
    /// wait for queued GPU work).
    pub fn barrier(&self) -> Result<()> {
        if let Some(c) = &self.inner.mpi {
            let what = || format!("MPI barrier on {}", self.label());
            mpi_backend::barrier(c, &Deadline::new(self.inner.timeout, &what));
        }
        Ok(())
    }

    /// Reduces host values across the group (losses, token counts, norms).
    pub fn all_reduce_host<T: HostScalar>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce_host";
        let n = self.inner.size;
        if op == ReduceOp::Avg && T::default().divide(1).is_none() {
            return Err(self.invalid(OP, "an average of integers; use Sum".into()));
        }
        let Some(c) = &self.inner.mpi else { return Ok(()) };
        if buf.len() > MPI_MAX_COUNT {
            return Err(self.invalid(OP, format!("{} values is more than one MPI call can move", buf.len())));
        }
        let len = buf.len();
        let what = || format!("MPI {OP} ({op}) of {len} values on {}", self.label());
        let dl = Deadline::new(self.inner.timeout, &what);
        let from = |w: T| if op == ReduceOp::Avg { w.divide(n).unwrap_or(w) } else { w };
        mpi_backend::all_reduce(c, buf, mpi_op(op), |x| x, from, &dl);
        Ok(())
    }

    /// Copies `buf` of group rank `root` to every rank.
    pub fn broadcast_host<T: HostScalar>(&self, buf: &mut [T], root: usize) -> Result<()> {
        const OP: &str = "broadcast_host";
        self.check_peer(OP, root, "root")?;
        let Some(c) = &self.inner.mpi else { return Ok(()) };
        if buf.len() > MPI_MAX_COUNT {
            return Err(self.invalid(OP, format!("{} values is more than one MPI call can move", buf.len())));
        }
        let len = buf.len();
        let what = || format!("MPI {OP} of {len} values from rank {root} on {}", self.label());
        mpi_backend::broadcast(c, buf, root, &Deadline::new(self.inner.timeout, &what));
        Ok(())
    }

    /// Every rank's `mine` (all of the same length), in group rank order.
    pub fn all_gather_host<T: HostScalar>(&self, mine: &[T]) -> Result<Vec<T>> {
        const OP: &str = "all_gather_host";
        let size = self.inner.size;
        let mut all = vec![T::default(); mine.len() * size];
        let at = self.inner.rank * mine.len();
        all[at..at + mine.len()].copy_from_slice(mine);
        let Some(c) = &self.inner.mpi else { return Ok(all) };
        if all.len() > MPI_MAX_COUNT {
            return Err(self.invalid(OP, format!("{} values is more than one MPI call can move", all.len())));
        }
        let what = || format!("MPI {OP} of {} values per rank on {}", mine.len(), self.label());
        mpi_backend::all_gather(c, &mut all, at..at + mine.len(), &Deadline::new(self.inner.timeout, &what));
        Ok(all)
    }

    // ---- stream ordering (GPU groups; no-ops otherwise) ----

    /// The communication stream waits for the compute stream's work so far.
    /// Every operation does this itself; this is for work queued on the
    /// communication stream by other means.
    pub fn comm_waits_for_compute(&self) -> Result<()> {
        self.inner.nccl.as_ref().map_or(Ok(()), NcclComm::comm_waits_for_compute)
    }

    /// The compute stream waits for all communication queued so far (one
    /// event instead of waiting on each [`Work`]).
    pub fn compute_waits_for_comm(&self) -> Result<()> {
        self.inner.nccl.as_ref().map_or(Ok(()), NcclComm::compute_waits_for_comm)
    }

    /// Blocks the host until all communication queued so far is done.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.nccl.as_ref().map_or(Ok(()), NcclComm::synchronize)
    }

    /// The communication stream of a GPU group.
    pub fn comm_stream(&self) -> Option<&Arc<CudaStream>> {
        self.inner.nccl.as_ref().map(NcclComm::stream)
    }
}

/// The interface the model crates use; the inherent methods of the same names
/// do the work (they take precedence inside this impl).
impl Collective for ProcessGroup {
    fn name(&self) -> &str {
        ProcessGroup::name(self)
    }

    fn rank(&self) -> usize {
        ProcessGroup::rank(self)
    }

    fn size(&self) -> usize {
        ProcessGroup::size(self)
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> trainer_core::Result<()> {
        Ok(ProcessGroup::all_reduce(self, t, op)?)
    }

    fn all_gather_range(&self, t: &mut Tensor, range: Range<usize>) -> trainer_core::Result<()> {
        Ok(ProcessGroup::all_gather_range(self, t, range)?)
    }

    fn reduce_scatter_range(&self, t: &mut Tensor, range: Range<usize>, op: ReduceOp) -> trainer_core::Result<()> {
        Ok(ProcessGroup::reduce_scatter_range(self, t, range, op)?)
    }

    fn shard(&self, range: Range<usize>) -> Range<usize> {
        ProcessGroup::shard(self, range)
    }
}

/// Checks the rank lists of [`ProcessGroup::from_lists`]: each non-empty,
/// every rank one of the world's and in at most one list.
fn check_lists(name: &str, groups: &[Vec<usize>], world_size: usize) -> Result<()> {
    let mut owner: Vec<Option<usize>> = vec![None; world_size];
    for (i, members) in groups.iter().enumerate() {
        if members.is_empty() {
            return Err(Error::Config(format!("process group '{name}': an empty list of ranks")));
        }
        for &r in members {
            let Some(slot) = owner.get_mut(r) else {
                return Err(Error::Config(format!(
                    "process group '{name}': rank {r} in {members:?} is not a rank of this job of {world_size} \
                     process(es) (0 to {})",
                    world_size.saturating_sub(1)
                )));
            };
            match slot.replace(i) {
                None => {}
                Some(j) if j == i => {
                    return Err(Error::Config(format!(
                        "process group '{name}': rank {r} appears twice in {members:?}"
                    )));
                }
                Some(j) => {
                    return Err(Error::Config(format!(
                        "process group '{name}': rank {r} is in both {:?} and {members:?}; the groups made by one \
                         call must not overlap",
                        groups[j]
                    )));
                }
            }
        }
    }
    Ok(())
}

/// "ranks 0,1,2" (shortened for large groups).
fn ranks_text(members: &[usize]) -> String {
    let shown: Vec<String> = members.iter().take(8).map(|r| r.to_string()).collect();
    let more = if members.len() > 8 { format!(",... ({} ranks)", members.len()) } else { String::new() };
    format!("ranks {}{more}", shown.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_group_is_a_checked_no_op() {
        let g = ProcessGroup::single("world");
        assert_eq!((g.rank(), g.size(), g.members()), (0, 1, &[0usize][..]));
        let mut t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], [3], &Device::Cpu).unwrap();
        g.all_reduce(&mut t, ReduceOp::Avg).unwrap();
        g.reduce_scatter(&mut t, ReduceOp::Sum).unwrap();
        g.all_gather(&mut t).unwrap();
        g.broadcast(&mut t, 0).unwrap();
        g.barrier().unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        let mut h = [4.0f64, 6.0];
        g.all_reduce_host(&mut h, ReduceOp::Avg).unwrap();
        assert_eq!(h, [4.0, 6.0]);
        assert_eq!(g.all_gather_host(&[7u64]).unwrap(), vec![7]);

        let e = g.all_reduce_range(&mut t, 2..4, ReduceOp::Sum).unwrap_err().to_string();
        assert!(e.contains("all_reduce on process group 'world'") && e.contains("2..4"), "{e}");
        let e = g.broadcast(&mut t, 1).unwrap_err().to_string();
        assert!(e.contains("root 1 is not a rank"), "{e}");
        let e = g.send(&t, 0).unwrap_err().to_string();
        assert!(e.contains("destination 0 is this rank itself"), "{e}");
        let mut u = Tensor::from_vec(vec![1u32, 2], [2], &Device::Cpu).unwrap();
        let e = g.all_reduce(&mut u, ReduceOp::Avg).unwrap_err().to_string();
        assert!(e.contains("average of u32"), "{e}");
        let e = g.all_reduce_host(&mut [1u64], ReduceOp::Avg).unwrap_err().to_string();
        assert!(e.contains("average of integers"), "{e}");
    }

    #[test]
    fn single_group_exchange_is_checked() {
        let g = ProcessGroup::single("pp");
        g.exchange(&mut []).unwrap();
        let t = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
        let mut u = Tensor::zeros([4], DType::F32, &Device::Cpu).unwrap();
        let e = g.exchange(&mut [P2p::send(&t, 0)]).unwrap_err().to_string();
        assert!(e.contains("exchange on process group 'pp': destination 0 is this rank itself"), "{e}");
        let bad = P2p::Recv { tensor: &mut u, range: 2..6, peer: 0 };
        assert_eq!(bad.to_string(), "recv of 4 f32 elements from rank 0");
        let e = g.exchange(&mut [bad]).unwrap_err().to_string();
        assert!(e.contains("element range 2..6 is outside the tensor's 4 elements"), "{e}");
    }

    #[test]
    fn rank_lists_are_checked() {
        let e = |groups: &[Vec<usize>]| check_lists("tied", groups, 4).unwrap_err().to_string();
        check_lists("tied", &[vec![0, 3], vec![2, 1]], 4).unwrap();
        assert_eq!(e(&[vec![0], vec![]]), "process group 'tied': an empty list of ranks");
        assert_eq!(
            e(&[vec![0, 4]]),
            "process group 'tied': rank 4 in [0, 4] is not a rank of this job of 4 process(es) (0 to 3)"
        );
        assert_eq!(e(&[vec![3, 0, 3]]), "process group 'tied': rank 3 appears twice in [3, 0, 3]");
        assert!(e(&[vec![0, 3], vec![1, 3]]).contains("rank 3 is in both [0, 3] and [1, 3]"));

        let world = World::single(Default::default());
        let g = world.group_of("tied", &[0], &Device::Cpu).unwrap().unwrap();
        assert_eq!((g.name(), g.rank(), g.size(), g.members()), ("tied", 0, 1, &[0usize][..]));
        assert!(world.groups_of("none", &[], &Device::Cpu).unwrap().is_none());
        let e = world.group_of("tied", &[0, 1], &Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Config(_)) && e.to_string().contains("rank 1 in [0, 1]"), "{e}");
    }

    #[test]
    fn collective_trait_reaches_the_group() {
        let g = ProcessGroup::single("tp");
        let c: &dyn Collective = &g;
        assert_eq!((c.name(), c.rank(), c.size(), c.shard(0..6)), ("tp", 0, 1, 0..6));
        let mut t = Tensor::from_vec(vec![1.0f32, 2.0], [2], &Device::Cpu).unwrap();
        c.all_reduce(&mut t, ReduceOp::Max).unwrap();
        // The group's own error, whole, behind the core error.
        let e = c.all_gather_range(&mut t, 1..3).unwrap_err();
        assert!(matches!(e, trainer_core::Error::Collective(_)), "{e:?}");
        assert!(e.to_string().starts_with("all_gather on process group 'tp': element range 1..3"), "{e}");
    }

    #[test]
    fn shards() {
        assert_eq!(shard_len(10, 4), 12);
        assert_eq!(shard_len(12, 4), 12);
        assert_eq!(shard_len(0, 3), 0);
        assert_eq!(ProcessGroup::single("x").shard(4..10), 4..10);
        assert_eq!(ranks_text(&[0, 2]), "ranks 0,2");
        assert_eq!(ranks_text(&(0..10).collect::<Vec<_>>()), "ranks 0,1,2,3,4,5,6,7,... (10 ranks)");
    }
}
