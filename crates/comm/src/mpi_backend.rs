//! Collectives on host memory through MPI.
//!
//! Every operation is started non-blocking and then polled until it completes
//! or its deadline passes; past the deadline the job is aborted with the
//! operation's name (so a missing rank never hangs the others). Polling yields
//! the core first and then sleeps in short steps: under `--oversubscribe`
//! several ranks share a core, and a spinning rank would starve the one it is
//! waiting for.
//!
//! MPI has no bf16 or f16 arithmetic, so half-precision data is reduced as
//! f32: each rank widens its values, MPI reduces in f32, and the result is
//! rounded once (an average divided before rounding). This is exact for the
//! sums of a few bf16 values and for max/min, deterministic, and the CPU path
//! moves little data, so the doubled volume does not matter. Data that is
//! only moved (broadcast, all-gather, send/recv) travels as raw 16-bit words;
//! a batched exchange moves raw bytes.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::world::{MpiRuntime, abort_job};

/// A communicator and the MPI runtime it needs (declared in that order so the
/// communicator is freed before MPI can be finalized).
pub(crate) struct MpiComm {
    pub(crate) comm: SimpleCommunicator,
    _runtime: Arc<MpiRuntime>,
}

impl MpiComm {
    pub(crate) fn new(comm: SimpleCommunicator, runtime: Arc<MpiRuntime>) -> Self {
        MpiComm { comm, _runtime: runtime }
    }
}

/// When an operation started and what to call it if it never finishes.
pub(crate) struct Deadline<'a> {
    start: Instant,
    timeout: Duration,
    what: &'a dyn Fn() -> String,
}

impl<'a> Deadline<'a> {
    pub(crate) fn new(timeout: Duration, what: &'a dyn Fn() -> String) -> Self {
        Deadline { start: Instant::now(), timeout, what }
    }

    pub(crate) fn check(&self) {
        if self.start.elapsed() >= self.timeout {
            abort_job(&format!(
                "{} did not complete within {} s (another rank failed, hangs or never called it); aborting the job",
                (self.what)(),
                self.timeout.as_secs_f64()
            ));
        }
    }
}

/// Paces a polling loop: yields the core first, then sleeps in growing steps
/// (up to 0.5 ms) so that a rank sharing its core lets the peer it waits for run.
struct Backoff(u64);

impl Backoff {
    fn pause(&mut self) {
        self.0 += 1;
        if self.0 < 256 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros((self.0 - 255).min(500)));
        }
    }
}

/// Polls `req` to completion, aborting the job at the deadline.
fn complete<'a, D: ?Sized, S: Scope<'a>>(
    mut req: Request<'a, D, S>,
    deadline: &Deadline,
) -> mpi::point_to_point::Status {
    let mut backoff = Backoff(0);
    loop {
        match req.test() {
            Ok(status) => return status,
            Err(pending) => req = pending,
        }
        deadline.check();
        backoff.pause();
    }
}

/// Reduces `data` across the group with `op`, converting each element to the
/// wire type `W` and back (`from_wire` divides for an average).
pub(crate) fn all_reduce<T: Copy, W: Equivalence + Copy + Default>(
    c: &MpiComm,
    data: &mut [T],
    op: SystemOperation,
    to_wire: impl Fn(T) -> W,
    from_wire: impl Fn(W) -> T,
    deadline: &Deadline,
) {
    let send: Vec<W> = data.iter().map(|&x| to_wire(x)).collect();
    let mut recv = vec![W::default(); data.len()];
    mpi::request::scope(|scope| {
        let req = c.comm.immediate_all_reduce_into(scope, &send[..], &mut recv[..], op);
        complete(req, deadline);
    });
    for (d, r) in data.iter_mut().zip(recv) {
        *d = from_wire(r);
    }
}

/// Reduces `data` (the group's size times `chunk` elements) and leaves this
/// rank's chunk of the result at its place; the other chunks keep their input.
pub(crate) fn reduce_scatter<T: Copy, W: Equivalence + Copy + Default>(
    c: &MpiComm,
    data: &mut [T],
    mine: Range<usize>,
    op: SystemOperation,
    to_wire: impl Fn(T) -> W,
    from_wire: impl Fn(W) -> T,
    deadline: &Deadline,
) {
    let send: Vec<W> = data.iter().map(|&x| to_wire(x)).collect();
    let mut recv = vec![W::default(); mine.len()];
    mpi::request::scope(|scope| {
        let req = c.comm.immediate_reduce_scatter_block_into(scope, &send[..], &mut recv[..], op);
        complete(req, deadline);
    });
    for (d, r) in data[mine].iter_mut().zip(recv) {
        *d = from_wire(r);
    }
}

/// Fills every chunk of `data` from the rank that owns it; this rank's input
/// is its own chunk, `mine`.
pub(crate) fn all_gather<T: Equivalence + Copy>(c: &MpiComm, data: &mut [T], mine: Range<usize>, deadline: &Deadline) {
    let send: Vec<T> = data[mine].to_vec();
    mpi::request::scope(|scope| {
        let req = c.comm.immediate_all_gather_into(scope, &send[..], data);
        complete(req, deadline);
    });
}

pub(crate) fn broadcast<T: Equivalence>(c: &MpiComm, data: &mut [T], root: usize, deadline: &Deadline) {
    let root = c.comm.process_at_rank(root as i32);
    mpi::request::scope(|scope| {
        let req = root.immediate_broadcast_into(scope, data);
        complete(req, deadline);
    });
}

pub(crate) fn send<T: Equivalence>(c: &MpiComm, data: &[T], dst: usize, deadline: &Deadline) {
    let dst = c.comm.process_at_rank(dst as i32);
    mpi::request::scope(|scope| {
        let req = dst.immediate_send(scope, data);
        complete(req, deadline);
    });
}

/// Receives into `data`; returns how many elements arrived (the sender may
/// have sent fewer; more is an MPI error that aborts the job).
pub(crate) fn recv<T: Equivalence>(c: &MpiComm, data: &mut [T], src: usize, deadline: &Deadline) -> usize {
    let src = c.comm.process_at_rank(src as i32);
    let status = mpi::request::scope(|scope| {
        let req = src.immediate_receive_into(scope, data);
        complete(req, deadline)
    });
    status.count(T::equivalent_datatype()).max(0) as usize
}

/// One side of a point-to-point transfer: raw bytes and the peer's rank.
pub(crate) enum Transfer<'b> {
    Send(&'b [u8], usize),
    Recv(&'b mut [u8], usize),
}

/// Posts every transfer non-blocking and polls until all have completed, in
/// whatever order their peers allow, aborting the job at the deadline; so no
/// pattern of sends and receives between ranks that all post theirs can
/// deadlock. Transfers between the same two ranks match in list order.
/// `pending[i]` is cleared when transfer `i` completes (the deadline's
/// message names those left). Returns the bytes each transfer moved.
pub(crate) fn exchange(
    c: &MpiComm,
    transfers: Vec<Transfer<'_>>,
    pending: &[Cell<bool>],
    deadline: &Deadline,
) -> Vec<usize> {
    let mut moved = vec![0; transfers.len()];
    let is_recv: Vec<bool> = transfers.iter().map(|t| matches!(t, Transfer::Recv(..))).collect();
    mpi::request::scope(|scope| {
        let mut reqs: Vec<Option<Request<'_, [u8], _>>> = Vec::with_capacity(transfers.len());
        let mut sends = Vec::new();
        // Receives first: a send that finds its receive posted needs no buffering.
        for (i, t) in transfers.into_iter().enumerate() {
            reqs.push(match t {
                Transfer::Recv(buf, peer) => {
                    Some(c.comm.process_at_rank(peer as i32).immediate_receive_into(scope, buf))
                }
                Transfer::Send(buf, peer) => {
                    sends.push((i, buf, peer));
                    None
                }
            });
        }
        for (i, buf, peer) in sends {
            moved[i] = buf.len();
            reqs[i] = Some(c.comm.process_at_rank(peer as i32).immediate_send(scope, buf));
        }
        let mut backoff = Backoff(0);
        loop {
            for (i, slot) in reqs.iter_mut().enumerate() {
                let Some(req) = slot.take() else { continue };
                match req.test() {
                    Ok(status) => {
                        if let Some(p) = pending.get(i) {
                            p.set(false);
                        }
                        if is_recv[i] {
                            moved[i] = status.count(u8::equivalent_datatype()).max(0) as usize;
                        }
                    }
                    Err(req) => *slot = Some(req),
                }
            }
            if reqs.iter().all(Option::is_none) {
                return;
            }
            deadline.check();
            backoff.pause();
        }
    });
    moved
}

pub(crate) fn barrier(c: &MpiComm, deadline: &Deadline) {
    let req = c.comm.immediate_barrier();
    complete(req, deadline);
}
