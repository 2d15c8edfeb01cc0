//! The CUDA backend: a device (context, stream, cuBLAS), device storage, kernels
//! compiled by NVRTC from `kernels/*.cu`, and the launchers behind `ops`.
//!
//! Everything is loaded at run time (cudarc's dynamic loading): a machine with
//! no CUDA builds and runs the CPU path, and asking it for a GPU is a clear
//! error, never a panic.

pub mod compile;
pub(crate) mod gemm_lt;
pub(crate) mod launch;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};

use self::gemm_lt::BlasLt;
use crate::{DType, Error, Result};

pub(crate) fn cuda_err(context: impl Into<String>, e: impl fmt::Display) -> Error {
    Error::Cuda { context: context.into(), msg: e.to_string() }
}

/// One GPU: its context, the stream every op runs on (so ops are ordered
/// without host synchronization), a cuBLAS handle bound to that stream, and
/// the kernel modules loaded so far. Cloning shares all of it.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLASLt for bf16 GEMMs (plans per shape, fused bias and bias-gradient epilogues).
    blas_lt: BlasLt,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Bytes held by live tensors on this device, and the most ever held.
    allocated: AtomicUsize,
    peak: AtomicUsize,
    /// With TRAINER_PROFILE_KERNELS=1: per kernel, (calls, seconds), each launch
    /// timed between two stream synchronizations (so profiling slows the run).
    profile: Option<Mutex<HashMap<String, (u64, f64)>>>,
    /// Workspace for multi-stage kernels, grown on demand and then reused: ops
    /// run in order on the one stream, so one buffer serves them all and the
    /// steady-state step allocates nothing.
    scratch: Mutex<Option<CudaSlice<f32>>>,
    /// Arrival counters of the one-launch column reductions (kernels/common.cuh):
    /// zero between kernels (each reduction's last block resets its own).
    counters: Mutex<Option<CudaSlice<u32>>>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({}: {}, sm_{}{})", self.inner.ordinal, self.inner.name, self.cc().0, self.cc().1)
    }
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        self.inner.ordinal == other.inner.ordinal
    }
}

impl CudaDevice {
    pub fn new(ordinal: usize) -> Result<Self> {
        let unavailable = |reason: String| Error::DeviceUnavailable { device: format!("cuda:{ordinal}"), reason };
        // SAFETY: only probes whether the driver library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(unavailable("no CUDA driver (libcuda.so) found on this machine".into()));
        }
        let count = CudaContext::device_count().map_err(|e| unavailable(format!("CUDA driver: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!("this machine has {count} CUDA device(s)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(e.to_string()))?;
        // SAFETY: every op runs on this device's one stream, in program order,
        // so cudarc's per-buffer events (which order work across streams) are
        // not needed; turning them off saves two driver calls per kernel launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // SAFETY: only probes whether the cuBLAS library can be opened.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(unavailable("cuBLAS (libcublas.so) not found".into()));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable(format!("cuBLAS: {e}")))?;
        // SAFETY: only probes whether the cuBLASLt library can be opened.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(unavailable("cuBLASLt (libcublasLt.so) not found".into()));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let compute_capability = ctx.compute_capability().map_err(|e| unavailable(e.to_string()))?;
        let blas_lt = BlasLt::new(&stream, compute_capability.0).map_err(|e| unavailable(e.to_string()))?;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                name,
                compute_capability,
                ctx,
                stream,
                blas,
                blas_lt,
                modules: Mutex::new(HashMap::new()),
                allocated: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                profile: std::env::var_os("TRAINER_PROFILE_KERNELS").map(|_| Mutex::new(HashMap::new())),
                scratch: Mutex::new(None),
                counters: Mutex::new(None),
            }),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn cc(&self) -> (i32, i32) {
        self.inner.compute_capability
    }

    /// Dense bf16 tensor-core peak in FLOP/s, for MFU, where known: the
    /// datasheet figures the peer benchmark uses (H100/H200 SXM 989e12, A100 312e12).
    pub fn bf16_peak_flops(&self) -> Option<f64> {
        match self.cc() {
            (9, 0) => Some(989e12),
            (8, 0) => Some(312e12),
            _ => None,
        }
    }

    /// (bytes held by tensors now, the most held at once so far): what
    /// PyTorch reports as memory_allocated and max_memory_allocated.
    pub fn memory_stats(&self) -> (usize, usize) {
        (self.inner.allocated.load(Ordering::Relaxed), self.inner.peak.load(Ordering::Relaxed))
    }

    /// Runs `work` (one kernel launch or library call named `name`); when
    /// profiling, times it between stream synchronizations.
    pub(crate) fn timed(&self, name: &str, work: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(profile) = &self.inner.profile else { return work() };
        self.synchronize()?;
        let start = std::time::Instant::now();
        work()?;
        self.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        let mut p = profile.lock().map_err(|_| cuda_err("profile", "poisoned lock"))?;
        let e = p.entry(name.to_string()).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
        Ok(())
    }

    /// Runs `f` with the device address of at least `floats` f32 of scratch.
    /// Whatever `f` launches must be done with the scratch by the time the next
    /// op is queued, which stream order guarantees.
    pub(crate) fn with_scratch<R>(&self, floats: usize, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
        use cudarc::driver::DevicePtrMut;
        let stream = self.stream().clone();
        self.with_scratch_slice(floats, |buf| f(buf.device_ptr_mut(&stream).0))
    }

    /// Runs `f` with the device address of at least `n` zeroed u32 counters,
    /// which the kernels `f` launches must leave zeroed.
    pub(crate) fn with_counters<R>(&self, n: usize, f: impl FnOnce(u64) -> Result<R>) -> Result<R> {
        use cudarc::driver::DevicePtrMut;
        let stream = self.stream().clone();
        self.with_grown(&self.inner.counters, "counters", n, |buf| f(buf.device_ptr_mut(&stream).0))
    }

    /// Like [`CudaDevice::with_scratch`], handing over the buffer itself (for
    /// reading results back to the host).
    pub(crate) fn with_scratch_slice<R>(
        &self,
        floats: usize,
        f: impl FnOnce(&mut CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        self.with_grown(&self.inner.scratch, "scratch", floats, f)
    }

    /// Runs `f` with the buffer in `slot`, first replaced by a zeroed one of
    /// `n` elements if it is missing or shorter.
    fn with_grown<T, R>(
        &self,
        slot: &Mutex<Option<CudaSlice<T>>>,
        what: &str,
        n: usize,
        f: impl FnOnce(&mut CudaSlice<T>) -> Result<R>,
    ) -> Result<R>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let mut guard = slot.lock().map_err(|_| cuda_err(what, "poisoned lock"))?;
        if guard.as_ref().is_none_or(|b| b.len() < n) {
            *guard = None; // free the old buffer before asking for a bigger one
            let buf = self.stream().alloc_zeros::<T>(n.max(1)).map_err(|e| cuda_err(what, e))?;
            *guard = Some(buf);
        }
        match guard.as_mut() {
            Some(buf) => f(buf),
            None => unreachable!("allocated above"),
        }
    }

    /// Forgets the profile so far (e.g. after a warm-up step whose first calls
    /// pay for lazy module loading).
    pub fn reset_kernel_profile(&self) {
        if let Some(Ok(mut p)) = self.inner.profile.as_ref().map(|p| p.lock()) {
            p.clear();
        }
    }

    /// The kernel profile so far, slowest total first: (name, calls, seconds).
    /// Empty unless TRAINER_PROFILE_KERNELS was set when the device was opened.
    pub fn kernel_profile(&self) -> Vec<(String, u64, f64)> {
        let Some(profile) = &self.inner.profile else { return Vec::new() };
        let Ok(p) = profile.lock() else { return Vec::new() };
        let mut v: Vec<_> = p.iter().map(|(k, &(n, s))| (k.clone(), n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    fn track_alloc(&self, bytes: usize) {
        let now = self.inner.allocated.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    /// The compute stream every op runs on. Work on other streams (NCCL's)
    /// is ordered against it with events.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The CUDA context (for creating further streams and events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.inner.blas
    }

    pub(crate) fn blas_lt(&self) -> &BlasLt {
        &self.inner.blas_lt
    }

    /// A kernel of one of the `kernels/*.cu` modules, compiling (or loading
    /// from the disk cache) and loading the module on first use.
    pub(crate) fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut modules = self.inner.modules.lock().map_err(|_| cuda_err("module cache", "poisoned lock"))?;
            match modules.get(module) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile::module_ptx(module, self.cc())?;
                    let m = self.inner.ctx.load_module(ptx).map_err(|e| cuda_err(format!("loading {module}"), e))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(name).map_err(|e| cuda_err(format!("kernel {name} in {module}"), e))
    }
}

/// Device memory, one variant per dtype the GPU path computes with.
#[derive(Debug)]
pub enum CudaData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<half::bf16>),
    U32(CudaSlice<u32>),
}

/// A tensor's bytes on a GPU, and the device that owns them.
#[derive(Debug)]
pub struct CudaStorage {
    pub(crate) data: CudaData,
    pub(crate) device: CudaDevice,
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.device.inner.allocated.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

impl CudaStorage {
    fn new(data: CudaData, device: &CudaDevice) -> Self {
        let s = CudaStorage { data, device: device.clone() };
        device.track_alloc(s.bytes());
        s
    }

    fn bytes(&self) -> usize {
        match &self.data {
            CudaData::F32(v) => v.num_bytes(),
            CudaData::BF16(v) => v.num_bytes(),
            CudaData::U32(v) => v.num_bytes(),
        }
    }

    pub(crate) fn zeros(device: &CudaDevice, dtype: DType, n: usize) -> Result<Self> {
        let s = device.stream();
        let alloc = |e| cuda_err(format!("allocating {n} x {dtype}"), e);
        let data = match dtype {
            DType::F32 => CudaData::F32(s.alloc_zeros(n).map_err(alloc)?),
            DType::BF16 => CudaData::BF16(s.alloc_zeros(n).map_err(alloc)?),
            DType::U32 => CudaData::U32(s.alloc_zeros(n).map_err(alloc)?),
            other => {
                return Err(Error::Unsupported {
                    op: "allocation",
                    dtype: other,
                    device: format!("cuda:{}", device.ordinal()),
                });
            }
        };
        Ok(CudaStorage::new(data, device))
    }

    /// The device that owns the bytes.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            CudaData::F32(v) => v.len(),
            CudaData::BF16(v) => v.len(),
            CudaData::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of the first element, for libraries that take raw
    /// pointers (NCCL). Whoever uses it on another stream orders that work
    /// against this device's stream with events, and keeps the tensor alive
    /// until the work is done.
    pub fn device_address(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let s = self.device.stream();
        match &self.data {
            CudaData::F32(v) => v.device_ptr(s).0,
            CudaData::BF16(v) => v.device_ptr(s).0,
            CudaData::U32(v) => v.device_ptr(s).0,
        }
    }

    /// Like [`CudaStorage::device_address`], for work that writes the buffer.
    pub fn device_address_mut(&mut self) -> u64 {
        use cudarc::driver::DevicePtrMut;
        let s = self.device.stream().clone();
        match &mut self.data {
            CudaData::F32(v) => v.device_ptr_mut(&s).0,
            CudaData::BF16(v) => v.device_ptr_mut(&s).0,
            CudaData::U32(v) => v.device_ptr_mut(&s).0,
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self.data {
            CudaData::F32(_) => DType::F32,
            CudaData::BF16(_) => DType::BF16,
            CudaData::U32(_) => DType::U32,
        }
    }

    pub(crate) fn try_clone(&self) -> Result<Self> {
        let s = self.device.stream();
        let e = |e| cuda_err("device-to-device copy", e);
        let data = match &self.data {
            CudaData::F32(v) => CudaData::F32(s.clone_dtod(v).map_err(e)?),
            CudaData::BF16(v) => CudaData::BF16(s.clone_dtod(v).map_err(e)?),
            CudaData::U32(v) => CudaData::U32(s.clone_dtod(v).map_err(e)?),
        };
        Ok(CudaStorage::new(data, &self.device))
    }

    /// Uploads host data of a supported dtype.
    pub(crate) fn from_host(device: &CudaDevice, cpu: &crate::CpuStorage) -> Result<Self> {
        let s = device.stream();
        let e = |e| cuda_err("host-to-device copy", e);
        let data = match cpu {
            crate::CpuStorage::F32(v) => CudaData::F32(s.clone_htod(v).map_err(e)?),
            crate::CpuStorage::BF16(v) => CudaData::BF16(s.clone_htod(v).map_err(e)?),
            crate::CpuStorage::U32(v) => CudaData::U32(s.clone_htod(v).map_err(e)?),
            other => {
                return Err(Error::Unsupported {
                    op: "upload",
                    dtype: other.dtype(),
                    device: format!("cuda:{}", device.ordinal()),
                });
            }
        };
        Ok(CudaStorage::new(data, device))
    }

    /// Downloads to host memory (waits for the stream).
    pub(crate) fn to_host(&self) -> Result<crate::CpuStorage> {
        let s = self.device.stream();
        let e = |e| cuda_err("device-to-host copy", e);
        Ok(match &self.data {
            CudaData::F32(v) => crate::CpuStorage::F32(s.clone_dtoh(v).map_err(e)?),
            CudaData::BF16(v) => crate::CpuStorage::BF16(s.clone_dtoh(v).map_err(e)?),
            CudaData::U32(v) => crate::CpuStorage::U32(s.clone_dtoh(v).map_err(e)?),
        })
    }

    /// Overwrites with host data of the same dtype and length.
    pub(crate) fn copy_from_host(&mut self, cpu: &crate::CpuStorage) -> Result<()> {
        let s = self.device.stream().clone();
        let e = |e| cuda_err("host-to-device copy", e);
        match (&mut self.data, cpu) {
            (CudaData::F32(d), crate::CpuStorage::F32(v)) => s.memcpy_htod(v, d).map_err(e),
            (CudaData::BF16(d), crate::CpuStorage::BF16(v)) => s.memcpy_htod(v, d).map_err(e),
            (CudaData::U32(d), crate::CpuStorage::U32(v)) => s.memcpy_htod(v, d).map_err(e),
            _ => Err(Error::DType { op: "copy_from_slice", expected: self.dtype(), got: cpu.dtype() }),
        }
    }
}
