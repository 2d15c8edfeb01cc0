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
use std::ffi::{CStr, c_int};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::result::{self as nccl, NcclError, NcclStatus};
use cudarc::nccl::sys;
use trainer_core::{CudaDevice, DType};

use crate::error::{cuda_err, nccl_err};
use crate::mpi_backend::{self, Deadline, MpiComm};
use crate::world::{abort_job_after, guarded};
use crate::{CommOptions, Error, Result};

/// The raw communicators of one group, shared with the watchdog: the main
/// one, and the background one capped at a few thread blocks (see
/// [`crate::CommOptions::background_ctas`]).
struct RawComm {
    main: sys::ncclComm_t,
    background: Option<sys::ncclComm_t>,
}

impl RawComm {
    fn all(&self) -> impl Iterator<Item = sys::ncclComm_t> {
        std::iter::once(self.main).chain(self.background)
    }
}

impl Drop for RawComm {
    /// Runs when the last holder lets go: [`NcclComm`] after finishing its
    /// queued work and joining the watchdog, or an error path of
    /// [`NcclComm::new`]. The split communicator goes before its parent.
    fn drop(&mut self) {
        for comm in self.background.into_iter().chain([self.main]) {
            // SAFETY: the communicator is valid and nothing is queued on it
            // or uses it any more (no other holder is left).
            let _ = unsafe { nccl::comm_destroy(comm) };
        }
    }
}

// SAFETY: NCCL communicators are handles usable from any thread; the only
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
    /// `TRAINER_NCCL_TRACE=1`: what every traced time is measured from.
    trace_origin: Option<Arc<TraceOrigin>>,
}

/// An event on the idle communication stream and the host time at which it
/// had completed: GPU and host times since then are comparable (to within
/// the synchronization's latency, some microseconds).
struct TraceOrigin {
    event: CudaEvent,
    host: Instant,
}

/// GPU timestamps of one traced operation: when the compute stream reached
/// the launch (its inputs were ready) and when the communication stream
/// started it; its end is the operation's completion event.
struct Trace {
    origin: Arc<TraceOrigin>,
    /// When the host launched the operation.
    host: Instant,
    ready: CudaEvent,
    start: CudaEvent,
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
        (rank, size): (usize, usize),
        label: &str,
        options: &CommOptions,
    ) -> Result<Self> {
        let timeout = options.timeout;
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
        // Owned from here: an error below frees what was made.
        let mut comms = RawComm { main: raw, background: None };
        // ncclCommSplit and the thread-block cap need NCCL 2.18; with an
        // older library background collectives share the main communicator.
        match (options.background_ctas, nccl_version()) {
            (0, _) => {}
            (ctas, v) if v >= 21800 => comms.background = Some(split_capped(comms.main, rank, ctas, label, timeout)?),
            (_, v) if rank == 0 => eprintln!(
                "warning: NCCL {v} has no ncclCommSplit (2.18 and later): overlapped all-reduces of {label} run \
                 with NCCL's own choice of thread blocks"
            ),
            _ => {}
        }
        let raw = Arc::new(comms);
        let stream = device.context().new_stream().map_err(|e| cuda_err("creating the NCCL stream", e))?;
        let watchdog = Watchdog::spawn(raw.clone(), device.clone(), format!("{label} rank {rank}"), timeout)?;
        let trace_origin = match std::env::var("TRAINER_NCCL_TRACE").is_ok_and(|v| v == "1") {
            true => {
                let event = timed_event(&stream, "recording the trace origin")?;
                event.synchronize().map_err(|e| cuda_err("synchronizing the trace origin", e))?;
                Some(Arc::new(TraceOrigin { event, host: Instant::now() }))
            }
            false => None,
        };
        Ok(NcclComm {
            raw,
            device: device.clone(),
            stream,
            launch_lock: Mutex::new(()),
            watchdog: Some(watchdog),
            trace_origin,
        })
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
        self.wait_for_compute(None).map(drop)
    }

    /// [`NcclComm::comm_waits_for_compute`], returning the compute stream's
    /// event (recorded with `flags`: timed for the trace).
    fn wait_for_compute(&self, flags: Option<CUevent_flags>) -> Result<CudaEvent> {
        let ev = self.device.stream().record_event(flags).map_err(|e| cuda_err("recording a compute event", e))?;
        self.stream.wait(&ev).map_err(|e| cuda_err("comm stream waiting for compute", e))?;
        Ok(ev)
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
    /// stream's work so far, on the background communicator if `background`
    /// (and there is one), else the main one; returns the event that
    /// completes with it. The watchdog aborts the job if that takes longer
    /// than the timeout.
    ///
    /// The watch starts before the call: NCCL may block the calling thread
    /// in it, not only the stream (it connects to a peer on the first
    /// collective that needs the connection, and waits there for a peer that
    /// never comes).
    pub(crate) fn launch(
        &self,
        what: String,
        background: bool,
        call: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> std::result::Result<NcclStatus, NcclError>,
    ) -> Result<Arc<CudaEvent>> {
        let _guard = self.launch_lock.lock().map_err(|_| cuda_err("NCCL launch", "poisoned lock"))?;
        let host = Instant::now();
        let timed = self.trace_origin.as_ref().map(|_| CUevent_flags::CU_EVENT_DEFAULT);
        let ready = self.wait_for_compute(timed)?;
        let trace = match &self.trace_origin {
            Some(origin) => {
                let start = timed_event(&self.stream, "recording a trace event")?;
                Some(Trace { origin: origin.clone(), host, ready, start })
            }
            None => None,
        };
        self.device.context().bind_to_thread().map_err(|e| cuda_err("binding the context", e))?;
        let queued = Arc::new(OnceLock::new());
        if let Some(w) = &self.watchdog {
            w.watch(what.clone(), queued.clone(), trace);
        }
        let comm = if background { self.raw.background.unwrap_or(self.raw.main) } else { self.raw.main };
        let called = call(comm, self.stream.cu_stream() as sys::cudaStream_t)
            .map_err(|e| nccl_err(what.clone(), describe(Some(comm), e.0)));
        // Recorded whether or not the call queued anything: the watch ends
        // with it (a failed call is reported to the caller, not timed out).
        let done = Arc::new(self.stream.record_event(timed).map_err(|e| cuda_err(format!("{what}: recording"), e))?);
        let _ = queued.set(done.clone());
        called?;
        Ok(done)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Finish queued work (the watchdog still guards it) and stop the
        // watchdog; the communicators go with the last `raw` (RawComm's drop).
        let _ = self.stream.synchronize();
        drop(self.watchdog.take());
    }
}

/// The NCCL library's version code (2.18.1 is 21801), 0 if unknown.
fn nccl_version() -> c_int {
    let mut v: c_int = 0;
    // SAFETY: `v` is a valid out-pointer; the call only reports the version.
    let code = unsafe { sys::ncclGetVersion(&mut v) };
    if code == sys::ncclResult_t::ncclSuccess { v } else { 0 }
}

/// A communicator over the same ranks as `parent` whose collectives use at
/// most `ctas` thread blocks (collective over the parent's ranks).
fn split_capped(
    parent: sys::ncclComm_t,
    rank: usize,
    ctas: u32,
    label: &str,
    timeout: Duration,
) -> Result<sys::ncclComm_t> {
    // NCCL_CONFIG_INITIALIZER: every field undefined (NCCL's defaults) but
    // the thread-block range, 1 to `ctas`. NCCL reads min(size, its own size) bytes, so this
    // (newer or older) layout is understood by any NCCL >= 2.17.
    const UNDEF: c_int = c_int::MIN;
    let mut config = sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 23000,
        blocking: UNDEF,
        cgaClusterSize: UNDEF,
        minCTAs: 1,
        maxCTAs: ctas.min(c_int::MAX as u32) as c_int,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    };
    let mut child: sys::ncclComm_t = std::ptr::null_mut();
    let what = format!("ncclCommSplit (background communicator, {ctas} thread blocks) for {label}");
    // SAFETY: `parent` is a valid communicator, `child` and `config` valid
    // pointers for the call; every rank of the parent makes the same call.
    let code =
        guarded(&what, timeout, || unsafe { sys::ncclCommSplit(parent, 0, rank as c_int, &mut child, &mut config) });
    if code != sys::ncclResult_t::ncclSuccess || child.is_null() {
        return Err(nccl_err(what, describe(Some(parent), code)));
    }
    Ok(child)
}

/// An operation the watchdog waits for: first for the host call that
/// queues it to return (`done` unset), then for its completion event.
struct Watched {
    what: String,
    done: Arc<OnceLock<Arc<CudaEvent>>>,
    since: Instant,
    trace: Option<Trace>,
}

/// An event that can be timed, recorded on `stream` now.
fn timed_event(stream: &CudaStream, what: &str) -> Result<CudaEvent> {
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| cuda_err(what, e))
}

/// Prints one traced operation's times in ms since the trace origin: when the
/// host launched it, when the compute stream reached the launch (its inputs
/// ready: if much later than the host's launch, the host runs ahead of the
/// GPU, as it should), when the communication stream started it and when it
/// ended, and the NCCL time (end - start, waiting for peers included).
fn print_trace(label: &str, what: &str, trace: &Trace, done: &CudaEvent) {
    let at = |e: &CudaEvent| trace.origin.event.elapsed_ms(e).unwrap_or(f32::NAN);
    let host = trace.host.saturating_duration_since(trace.origin.host).as_secs_f64() * 1e3;
    let (ready, start, end) = (at(&trace.ready), at(&trace.start), at(done));
    // Measured directly: f32 milliseconds since the origin lose precision in long runs.
    let nccl = trace.start.elapsed_ms(done).unwrap_or(f32::NAN);
    let line = format!(
        "nccl-trace {label}: {what} host {host:.3} ready {ready:.3} start {start:.3} end {end:.3} nccl {nccl:.3}\n"
    );
    // One write, so that the lines of ranks sharing a terminal or pipe do not interleave.
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
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

    fn watch(&self, what: String, done: Arc<OnceLock<Arc<CudaEvent>>>, trace: Option<Trace>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Watched { what, done, since: Instant::now(), trace });
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
                    if let Some(trace) = &front.trace {
                        print_trace(&label, &front.what, trace, done);
                    }
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
        for comm in raw.all() {
            let mut code = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator stays valid until this thread has exited.
            let _ = unsafe { sys::ncclCommGetAsyncError(comm, &mut code) };
            if !matches!(code, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                let what = pending.front().map_or("an NCCL operation", |w| w.what.as_str());
                fail(&raw, &format!("{what} on {label}: NCCL reported {}", describe(Some(comm), code)));
            }
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
            for comm in raw.all() {
                // SAFETY: the communicator is valid; ncclCommAbort may be
                // called while operations are in flight, which is its purpose.
                let _ = unsafe { nccl::comm_abort(comm) };
            }
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(10));
    })
}
