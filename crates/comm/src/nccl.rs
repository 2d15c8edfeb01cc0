//! NCCL communicators for GPU tensors: bootstrapped through MPI, run on a
//! communication stream of their own, and watched by a thread that aborts the
//! job when an operation outlives the timeout or NCCL reports an error.
//!
//! Ordering: each operation is queued on the communication stream after the
//! compute stream's work so far (an event recorded on the compute stream), and
//! records a completion event that the compute stream can be made to wait on.
//! Nothing blocks the host, so backward keeps queueing kernels while buckets
//! are reduced.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;
use trainer_core::{CudaDevice, DType};

use crate::error::{cuda_err, nccl_err};
use crate::mpi_backend::{self, Deadline, MpiComm};
use crate::world::{abort_job_after, guarded};
use crate::{Error, Result};

/// The raw communicator, shared with the watchdog.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator is a handle usable from any thread; the only
// calls made from the watchdog thread, ncclCommGetAsyncError and
// ncclCommAbort, are documented as safe while operations are in flight on
// another thread.
unsafe impl Send for RawComm {}
// SAFETY: as above.
unsafe impl Sync for RawComm {}

pub(crate) struct NcclComm {
    raw: Arc<RawComm>,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    /// Serializes launches: NCCL wants one thread at a time per communicator.
    launch_lock: Mutex<()>,
    watchdog: Option<Watchdog>,
}

/// NCCL's name and text for an error code, plus its last message.
fn describe(raw: Option<sys::ncclComm_t>, code: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string for any code;
    // ncclGetLastError a string owned by NCCL, valid until the next call.
    unsafe {
        let text = CStr::from_ptr(sys::ncclGetErrorString(code)).to_string_lossy().into_owned();
        let last = match raw {
            Some(c) => CStr::from_ptr(sys::ncclGetLastError(c)).to_string_lossy().into_owned(),
            None => String::new(),
        };
        if last.is_empty() { format!("{code:?} ({text})") } else { format!("{code:?} ({text}): {last}") }
    }
}

pub(crate) fn nccl_dtype(dtype: DType) -> Option<sys::ncclDataType_t> {
    match dtype {
        DType::F32 => Some(sys::ncclDataType_t::ncclFloat32),
        DType::BF16 => Some(sys::ncclDataType_t::ncclBfloat16),
        DType::F16 => Some(sys::ncclDataType_t::ncclFloat16),
        DType::U32 => Some(sys::ncclDataType_t::ncclUint32),
        DType::F64 => Some(sys::ncclDataType_t::ncclFloat64),
    }
}

impl NcclComm {
    /// Creates this rank's member of an NCCL communicator over the ranks of
    /// `mpi` (collective over them): rank 0 makes the unique id and MPI
    /// broadcasts it.
    pub(crate) fn new(
        device: &CudaDevice,
        mpi: &MpiComm,
        rank: usize,
        size: usize,
        label: &str,
        timeout: Duration,
    ) -> Result<Self> {
        // SAFETY: only probes whether the NCCL library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Nccl {
                context: format!("for {label}"),
                msg: "the NCCL library (libnccl.so.2) was not found; install NCCL or train on the CPU".into(),
            });
        }
        let mut id = [0u8; 128];
        if rank == 0 {
            let unique = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", describe(None, e.0)))?;
            for (d, s) in id.iter_mut().zip(unique.internal) {
                *d = s as u8;
            }
        }
        let what = || format!("MPI broadcast of the NCCL id for {label}");
        mpi_backend::broadcast(mpi, &mut id[..], 0, &Deadline::new(timeout, &what));
        let unique = sys::ncclUniqueId { internal: id.map(|b| b as ::core::ffi::c_char) };

        device.context().bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; rank < size, and every rank of
        // the group passes the same id and size (the broadcast above).
        guarded(&format!("NCCL initialization of {label}"), timeout, || unsafe {
            nccl::comm_init_rank(&mut raw, size as i32, unique, rank as i32)
        })
        .map_err(|e| nccl_err(format!("ncclCommInitRank for {label}"), describe(None, e.0)))?;
        let raw = Arc::new(RawComm(raw));
        let stream = device.context().new_stream().map_err(|e| cuda_err("creating the NCCL stream", e))?;
        let watchdog = Watchdog::spawn(raw.clone(), device.clone(), label.to_string(), timeout)?;
        Ok(NcclComm { raw, device: device.clone(), stream, launch_lock: Mutex::new(()), watchdog: Some(watchdog) })
    }

    pub(crate) fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The communication stream.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The communication stream waits for the compute stream's work so far.
    pub(crate) fn comm_waits_for_compute(&self) -> Result<()> {
        let ev = self.device.stream().record_event(None).map_err(|e| cuda_err("recording a compute event", e))?;
        self.stream.wait(&ev).map_err(|e| cuda_err("comm stream waiting for compute", e))
    }

    /// The compute stream waits for the communication queued so far.
    pub(crate) fn compute_waits_for_comm(&self) -> Result<()> {
        let ev = self.stream.record_event(None).map_err(|e| cuda_err("recording a comm event", e))?;
        self.device.stream().wait(&ev).map_err(|e| cuda_err("compute stream waiting for comm", e))
    }

    /// Blocks the host until the queued communication is done.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronizing the NCCL stream", e))
    }

    /// Queues one NCCL call on the communication stream after the compute
    /// stream's work so far; returns the event that completes with it. The
    /// watchdog aborts the job if that takes longer than the timeout.
    ///
    /// The watch starts before the call: NCCL may block the calling thread
    /// in it, not only the stream (it connects to a peer on the first
    /// collective that needs the connection, and waits there for a peer that
    /// never comes).
    pub(crate) fn launch(
        &self,
        what: String,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> std::result::Result<NcclStatus, NcclError>,
    ) -> Result<Arc<CudaEvent>> {
        let _guard = self.launch_lock.lock().map_err(|_| cuda_err("NCCL launch", "poisoned lock"))?;
        self.comm_waits_for_compute()?;
        self.device.context().bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        let queued = Arc::new(OnceLock::new());
        if let Some(w) = &self.watchdog {
            w.watch(what.clone(), queued.clone());
        }
        let called = call(self.raw.0, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_err(what.clone(), describe(Some(self.raw.0), e.0)));
        // Recorded whether or not the call queued anything: the watch ends
        // with it (a failed call is reported to the caller, not timed out).
        let done = Arc::new(self.stream.record_event(None).map_err(|e| cuda_err(format!("{what}: recording"), e))?);
        let _ = queued.set(done.clone());
        called?;
        Ok(done)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Finish queued work (the watchdog still guards it), stop the
        // watchdog, then free the communicator.
        let _ = self.stream.synchronize();
        drop(self.watchdog.take());
        // SAFETY: the communicator is valid, nothing is queued on it any
        // more, and the watchdog that shared it has exited.
        let _ = unsafe { nccl::comm_destroy(self.raw.0) };
    }
}

/// An operation the watchdog waits for: first for the host call that
/// queues it to return (`done` unset), then for its completion event.
struct Watched {
    what: String,
    done: Arc<OnceLock<Arc<CudaEvent>>>,
    since: Instant,
}

struct Watchdog {
    tx: Option<mpsc::Sender<Watched>>,
    thread: Option<JoinHandle<()>>,
}

/// How often the watchdog looks at the queue and NCCL's error state.
const POLL: Duration = Duration::from_millis(20);

impl Watchdog {
    fn spawn(raw: Arc<RawComm>, device: CudaDevice, label: String, timeout: Duration) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Watched>();
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || watch_loop(rx, raw, device, label, timeout))
            .map_err(|e| cuda_err("starting the NCCL watchdog thread", e))?;
        Ok(Watchdog { tx: Some(tx), thread: Some(thread) })
    }

    fn watch(&self, what: String, done: Arc<OnceLock<Arc<CudaEvent>>>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Watched { what, done, since: Instant::now() });
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(rx: mpsc::Receiver<Watched>, raw: Arc<RawComm>, device: CudaDevice, label: String, timeout: Duration) {
    let _ = device.context().bind_to_thread();
    let mut pending: VecDeque<Watched> = VecDeque::new();
    let mut open = true;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(w) => pending.push_back(w),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        while let Ok(w) = rx.try_recv() {
            pending.push_back(w);
        }
        // Operations on one stream finish in order: the oldest is the one
        // that can be late.
        while let Some(front) = pending.front() {
            let Some(done) = front.done.get() else { break }; // still in the host call
            match done.try_is_complete() {
                Ok(true) => {
                    pending.pop_front();
                }
                Ok(false) => break,
                Err(e) => fail(&raw, &format!("{} on {label} failed: CUDA error {e}", front.what)),
            }
        }
        if let Some(front) = pending.front()
            && front.since.elapsed() >= timeout
        {
            fail(
                &raw,
                &format!(
                    "{} on {label} did not complete within {} s (another rank failed, hangs or never called it); \
                     aborting the job",
                    front.what,
                    timeout.as_secs_f64()
                ),
            );
        }
        let mut code = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator stays valid until this thread has exited.
        let _ = unsafe { sys::ncclCommGetAsyncError(raw.0, &mut code) };
        if !matches!(code, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
            let what = pending.front().map_or("an NCCL operation", |w| w.what.as_str());
            fail(&raw, &format!("{what} on {label}: NCCL reported {}", describe(Some(raw.0), code)));
        }
        if !open && pending.is_empty() {
            return;
        }
    }
}

/// Prints the message, aborts the communicator so that its kernels return
/// (waiting at most a few seconds for that), then ends the job.
fn fail(raw: &Arc<RawComm>, msg: &str) -> ! {
    let raw = raw.clone();
    abort_job_after(msg, move || {
        let (tx, rx) = mpsc::channel();
        let _ = std::thread::Builder::new().name("nccl-abort".into()).spawn(move || {
            // SAFETY: the communicator is valid; ncclCommAbort may be called
            // while operations are in flight, which is its purpose.
            let _ = unsafe { nccl::comm_abort(raw.0) };
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(10));
    })
}
