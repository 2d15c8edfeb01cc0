//! Communication for parallel training: who this process is ([`World`],
//! read from the launcher's environment), how the ranks form a mesh
//! ([`Mesh`]: tp innermost, then dp, then pp; groups of any other rank list
//! from [`World::group_of`]), and the collectives and batched point-to-point
//! transfers a group of ranks runs ([`ProcessGroup`]): MPI for tensors in
//! host memory, NCCL for tensors on a GPU (bootstrapped through MPI), nothing
//! at all for a group of one. The model crates reach a group through the
//! [`Collective`] trait of `trainer-core`.
//!
//! A plain run, without `mpirun`, is a world of one that never initializes
//! MPI. Under a launcher, MPI is initialized once in [`World::init`]; every
//! collective has a deadline ([`CommOptions::timeout`]) after which the job is
//! aborted with the operation's name, and [`abort_job`] ends every rank when
//! one fails.
//!
//! Typical use by the trainer:
//!
//! ```no_run
//! # fn main() -> trainer_comm::Result<()> {
//! use trainer_comm::{CommOptions, Mesh, MeshSpec, ReduceOp, World};
//! let world = World::init(CommOptions::default())?;
//! let device = trainer_core::Device::Cpu; // or world.cuda_device()?
//! let mesh = Mesh::new(&world, &MeshSpec::default(), &device)?;
//! let mut grads = trainer_core::Tensor::zeros([1024], trainer_core::DType::F32, &device)?;
//! let work = mesh.dp().start_all_reduce(&mut grads, 0..512, ReduceOp::Avg)?; // a bucket
//! work.wait()?; // the compute stream waits; the host does not
//! # Ok(()) }
//! ```

mod error;
mod group;
pub mod launch;
mod mesh;
mod mpi_backend;
mod nccl;
mod world;

pub use error::{Error, Result};
pub use group::{HostScalar, P2p, ProcessGroup, Work, shard_len};
pub use launch::LaunchEnv;
pub use mesh::{Axis, Coords, Mesh, MeshShape, MeshSpec};
pub use trainer_core::collective::{Collective, ReduceOp};
pub use world::{CommOptions, World, abort_job, on_abort};
