//! The job as a whole: which process this is, MPI's lifetime, the GPU of
//! this rank, and aborting every rank when one fails.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use trainer_core::Device;

use crate::group::ProcessGroup;
use crate::launch::{self, LaunchEnv};
use crate::{Error, Result};

/// Settings of the communication layer that the trainer's `[parallel]`
/// section fills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommOptions {
    /// A collective that has not completed this long after it was started
    /// aborts the job, naming the operation and the group.
    pub timeout: Duration,
    /// Thread blocks (NCCL channels) for a GPU group's background
    /// collectives ([`crate::ProcessGroup::start_background_all_reduce`]),
    /// which get a communicator of their own capped at this many; 0: no such
    /// communicator, they run like any other collective (NCCL picks the
    /// channels, one thread block each).
    pub background_ctas: u32,
}

impl Default for CommOptions {
    fn default() -> Self {
        CommOptions { timeout: Duration::from_secs(600), background_ctas: 0 }
    }
}

/// MPI stays initialized while anything holds this; dropping the last holder
/// finalizes it, so communicators (freed when their groups drop) always go
/// first.
pub(crate) struct MpiRuntime {
    _universe: Universe,
}

/// This process's place in the job. Built once at start-up and handed to
/// whoever needs it; there is no global state.
///
/// Keep it alive until the end of `main` and let it drop normally: MPI must be
/// finalized on every rank, or the launcher treats the job as failed. On an
/// error, call [`abort_job`] (or [`World::abort`]) instead of returning, so
/// that the other ranks do not wait for this one until the timeout.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    host: String,
    launcher: Option<&'static str>,
    options: CommOptions,
    mpi: Option<Arc<MpiRuntime>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("host", &self.host)
            .field("launcher", &self.launcher)
            .field("mpi", &self.mpi.is_some())
            .finish()
    }
}

impl World {
    /// Reads the launcher's variables; with more than one process, initializes
    /// MPI (and installs a panic hook that aborts the whole job), otherwise
    /// stays a plain single process that never touches MPI.
    pub fn init(options: CommOptions) -> Result<World> {
        match launch::detect()? {
            Some(env) if env.is_distributed() => World::init_mpi(env, options),
            _ => Ok(World::single(options)),
        }
    }

    /// A world of one process, without MPI.
    pub fn single(options: CommOptions) -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            launcher: None,
            options,
            mpi: None,
        }
    }

    fn init_mpi(env: LaunchEnv, options: CommOptions) -> Result<World> {
        // Multiple: the NCCL watchdog and the panic hook may call MPI_Abort
        // from threads other than the one that initialized MPI.
        let Some((universe, _provided)) = mpi::initialize_with_threading(Threading::Multiple) else {
            return Err(Error::Launch("MPI was already initialized in this process".into()));
        };
        let runtime = Arc::new(MpiRuntime { _universe: universe });
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if env.world_size.is_some_and(|n| n != size) || env.rank != rank {
            let library = mpi::environment::library_version().unwrap_or_default();
            let library = library.lines().next().unwrap_or("unknown").trim().to_string();
            return Err(Error::Launch(format!(
                "{} started {} processes and calls this one rank {}, but MPI sees {size} process(es) and rank {rank}: \
                 this binary uses a different MPI than the launcher ({library}); launch it with that MPI's mpirun",
                env.launcher,
                env.world_size.map_or("?".to_string(), |n| n.to_string()),
                env.rank,
            )));
        }
        // The processes of this host, in world-rank order: exact, whatever
        // the launcher exports.
        let host_comm =
            guarded("MPI_Comm_split_type (processes per host)", options.timeout, || world.split_shared(rank as i32));
        let (local_rank, local_size) = (host_comm.rank() as usize, host_comm.size() as usize);
        let host = mpi::environment::processor_name().unwrap_or_else(|_| "unknown host".into());
        install_panic_hook();
        Ok(World {
            rank,
            size,
            local_rank,
            local_size,
            host,
            launcher: Some(env.launcher),
            options,
            mpi: Some(runtime),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's index among the processes on its host (its GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn local_size(&self) -> usize {
        self.local_size
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The launcher family ("Open MPI", "Slurm srun", ...), None for a plain run.
    pub fn launcher(&self) -> Option<&'static str> {
        self.launcher
    }

    pub fn options(&self) -> &CommOptions {
        &self.options
    }

    pub fn is_distributed(&self) -> bool {
        self.mpi.is_some()
    }

    pub(crate) fn mpi_runtime(&self) -> Option<&Arc<MpiRuntime>> {
        self.mpi.as_ref()
    }

    /// This rank's GPU: the one numbered by its local rank, after checking
    /// that the host shows at least as many GPUs as it runs ranks.
    pub fn cuda_device(&self) -> Result<Device> {
        if self.local_size > 1 {
            let visible = visible_gpus();
            if visible < self.local_size {
                let env = std::env::var("CUDA_VISIBLE_DEVICES")
                    .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
                    .unwrap_or_default();
                return Err(Error::TooFewGpus { host: self.host.clone(), local_size: self.local_size, visible, env });
            }
        }
        Ok(Device::cuda(self.local_rank)?)
    }

    /// The group of every process, with an NCCL communicator when `device` is
    /// a GPU. Every rank must call this (it is collective).
    pub fn group(&self, device: &Device) -> Result<ProcessGroup> {
        let members: Vec<usize> = (0..self.size).collect();
        self.group_of("world", &members, device)?
            .ok_or_else(|| Error::Launch(format!("rank {} is not in the world group", self.rank)))
    }

    /// The group of world ranks `ranks`, in that order (group rank `i` is
    /// world rank `ranks[i]`), e.g. the first and last pipeline stage that
    /// share the tied embedding. Collective over the whole world: every rank
    /// calls it with the same list; the members get the group, every other
    /// rank None (it has nothing to call, so nothing it could call by
    /// mistake). The list must be non-empty, of ranks of this job, without
    /// repeats: [`Error::Config`] otherwise, on every rank, before anything
    /// is communicated. With a GPU `device`, the members also make an NCCL
    /// communicator among themselves.
    pub fn group_of(&self, name: &str, ranks: &[usize], device: &Device) -> Result<Option<ProcessGroup>> {
        ProcessGroup::from_lists(self, name, &[ranks.to_vec()], device)
    }

    /// Several disjoint groups in one collective call (each like
    /// [`World::group_of`]): every rank passes the same lists and gets the
    /// group it is in, None if it is in none. One call instead of one per
    /// group, e.g. the tied-embedding pair of every (tp, dp) position.
    pub fn groups_of(&self, name: &str, groups: &[Vec<usize>], device: &Device) -> Result<Option<ProcessGroup>> {
        ProcessGroup::from_lists(self, name, groups, device)
    }

    /// Prints `msg` as this rank's error and ends the whole job.
    pub fn abort(&self, msg: &str) -> ! {
        abort_job(msg)
    }
}

/// GPUs this process can see (0 where there is no CUDA driver).
fn visible_gpus() -> usize {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Runs a blocking collective call that has no deadline of its own (MPI
/// communicator creation, NCCL initialization) under a guard thread that
/// aborts the job if it has not returned within `timeout`.
pub(crate) fn guarded<R>(what: &str, timeout: Duration, call: impl FnOnce() -> R) -> R {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let what = what.to_string();
    let guard = std::thread::Builder::new().name("comm-guard".into()).spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
            abort_job(&format!(
                "{what} did not complete within {} s (another rank failed, hangs or never called it); aborting the job",
                timeout.as_secs_f64()
            ));
        }
    });
    let result = call();
    drop(done);
    if let Ok(g) = guard {
        let _ = g.join();
    }
    result
}

/// Prints `msg` as an `error:` line prefixed by this rank and ends the whole
/// job: under MPI through MPI_Abort, which makes the launcher kill every rank
/// (all exit non-zero, this rank's message in the log); in a plain run it
/// exits with status 1. For the binary's error path: any rank that fails
/// calls this rather than returning.
pub fn abort_job(msg: &str) -> ! {
    abort_job_after(msg, || {})
}

/// Something to be told the reason before [`abort_job`] ends the process.
type AbortObserver = Box<dyn Fn(&str) + Send + Sync>;

static ABORT_OBSERVER: OnceLock<AbortObserver> = OnceLock::new();

/// Registers `observer` (once per process; later calls are ignored) to be
/// called with the error line, rank included, whenever this process ends the
/// job through [`abort_job`], a collective's timeout or a panic under MPI:
/// those never return to the caller, so a container that reports failures
/// in a file (SageMaker's /opt/ml/output/failure) learns the reason here.
pub fn on_abort(observer: impl Fn(&str) + Send + Sync + 'static) {
    let _ = ABORT_OBSERVER.set(Box::new(observer));
}

/// Like [`abort_job`], running `cleanup` between the message and the abort
/// (the NCCL watchdog aborts its communicator there).
pub(crate) fn abort_job_after(msg: &str, cleanup: impl FnOnce()) -> ! {
    let _ = std::io::stdout().flush();
    let world = mpi_active().then(SimpleCommunicator::world);
    let reason = match &world {
        Some(w) => format!("rank {} of {}: {msg}", w.rank(), w.size()),
        None => msg.to_string(),
    };
    print_line(&format!("error: {reason}\n"));
    if let Some(observe) = ABORT_OBSERVER.get() {
        observe(&reason);
    }
    cleanup();
    match world {
        Some(w) => w.abort(1),
        None => std::process::exit(1),
    }
}

/// One write per line, so that lines of ranks sharing the launcher's stderr
/// do not interleave.
fn print_line(line: &str) {
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn mpi_active() -> bool {
    mpi::environment::is_initialized() && !mpi::environment::is_finalized()
}

/// A panic on one rank would otherwise unwind into MPI_Finalize and wait
/// there for ranks that are waiting for it. The hook prints the panic as
/// usual, then aborts the job.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if mpi_active() {
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            abort_job(&format!("panicked{at}: {what}"));
        }
    }));
}
