//! bf16 GEMMs through cuBLASLt with fused epilogues, and a plan cache.
//!
//! cudarc's safe cuBLASLt wrapper creates the descriptors and asks for a
//! heuristic on every call, and offers only the forward bias epilogue. Here a
//! plan (descriptor, layouts, chosen algorithm) is made once per shape and
//! epilogue and reused.
//!
//! Tried and left out: the bias gradient from the weight-gradient GEMM
//! (BGRADB epilogue). cuBLASLt 13 takes it only in bf16, and on an H200 the
//! GEMMs with it ran as much slower as the separate reduction it saved
//! (GPT-2 124M: 410-413k tok/s either way, benches/RESULTS.md).
//!
//! Everything is column-major, as cuBLASLt sees it: D (m, n) = op(A) op(B) +
//! beta C, with C = D. The launchers translate from our row-major tensors.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::cuda_err;
use crate::Result;

/// What the GEMM does after the product. `aux` matrices are bf16, shaped and
/// strided like D.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    None,
    /// Adds a bf16 vector of m elements (one per row of D) to every column.
    Bias {
        bias: u64,
    },
    /// x = product + bias; writes x to `aux` and GELU(x) (tanh form) to D.
    GeluAuxBias {
        bias: u64,
        aux: u64,
    },
    /// D = product * GELU'(aux): the GELU backward applied to the gradient.
    DGelu {
        aux: u64,
    },
}

impl Epilogue {
    fn kind(self) -> u8 {
        match self {
            Epilogue::None => 0,
            Epilogue::Bias { .. } => 1,
            Epilogue::GeluAuxBias { .. } => 2,
            Epilogue::DGelu { .. } => 3,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Epilogue::None => "",
            Epilogue::Bias { .. } => "bias",
            Epilogue::GeluAuxBias { .. } => "gelu_aux_bias",
            Epilogue::DGelu { .. } => "dgelu",
        }
    }
}

/// A column-major bf16 GEMM's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LtShape {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
}

/// A descriptor, its layouts and the algorithm cuBLASLt chose for them.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once;
        // a failure to free at teardown is not worth a panic.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// Per (shape, epilogue kind).
    plans: Mutex<HashMap<(LtShape, u8), Plan>>,
}

// SAFETY: the cuBLASLt handle and the plans' descriptors are only used while
// holding the `plans` lock, so never from two threads at once; the handle
// is not tied to the thread that created it.
unsafe impl Send for BlasLt {}
// SAFETY: as above.
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        if let Ok(plans) = self.plans.get_mut() {
            plans.clear();
        }
        // SAFETY: created in `new`, destroyed once, after every plan.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn lt_err(what: &str, e: impl std::fmt::Display) -> crate::Error {
    cuda_err(format!("cuBLASLt {what}"), e)
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `desc` must be a live descriptor and `T` the attribute's documented type.
unsafe fn set_attr<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    // SAFETY: the caller's contract; `v` is valid for size_of::<T>() bytes.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, size_of::<T>()) }
        .map_err(|e| lt_err("descriptor attribute", e))
}

impl BlasLt {
    /// A handle and a workspace (32 MiB on Hopper and later, 4 MiB before:
    /// NVIDIA's recommendation) on `stream`.
    pub(crate) fn new(stream: &Arc<CudaStream>, compute_major: i32) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
        let bytes = if compute_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(bytes).map_err(|e| lt_err("workspace", e))?;
        Ok(BlasLt { handle, workspace, plans: Mutex::new(HashMap::new()) })
    }

    fn plan(&self, s: &LtShape, epilogue: Epilogue) -> Result<Plan> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| lt_err("descriptor", e))?;
        let layout = |rows: u64, cols: u64, ld: i64| {
            lt::create_matrix_layout(bf16, rows, cols, ld).map_err(|e| lt_err("matrix layout", e))
        };
        let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        // The plan owns each handle as soon as it exists, so an error below frees them.
        let mut plan = Plan {
            desc,
            a: layout(ar, ac, s.lda)?,
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.b = layout(br, bc, s.ldb)?;
        plan.c = layout(s.m, s.n, s.ldc)?;
        use cudarc::cublas::sys::cublasOperation_t as Op;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        use sys::cublasLtEpilogue_t as E;
        let epi = match epilogue {
            Epilogue::None => E::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias { .. } => E::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluAuxBias { .. } => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            Epilogue::DGelu { .. } => E::CUBLASLT_EPILOGUE_DGELU,
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: the descriptor is live; each value has its attribute's type
        // (cublasOperation_t, cublasLtEpilogue_t: 32-bit enums; the aux
        // leading dimension an int64_t). The aux pointer is set per call.
        unsafe {
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op(s.trans_a))?;
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &op(s.trans_b))?;
            set_attr(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            if let Epilogue::GeluAuxBias { aux, .. } | Epilogue::DGelu { aux } = epilogue {
                // The heuristic checks the aux matrix's alignment from its pointer.
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?;
                set_attr(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &s.ldc)?;
            }
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let ws = self.workspace.len();
        // SAFETY: `pref` is live; the attribute is a size_t; it is destroyed once below.
        let heuristic = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                size_of::<usize>(),
            );
            let h = set
                .and_then(|()| lt::get_matmul_algo_heuristic(self.handle, desc, plan.a, plan.b, plan.c, plan.c, pref));
            let _ = lt::destroy_matmul_pref(pref);
            h
        };
        plan.algo = heuristic.map_err(|e| lt_err(&format!("algorithm for {s:?} {epilogue:?}"), e))?.algo;
        Ok(plan)
    }

    /// D (at `d`, m x n) = op(A) op(B) + beta D, queued on `stream`.
    ///
    /// # Safety
    /// `a`, `b` and `d` must be bf16 device buffers holding the matrices the
    /// shape describes (with their leading dimensions), and the epilogue's
    /// bias m bf16 elements, its aux matrix m x n bf16 with D's leading
    /// dimension; all on this handle's device, not freed before
    /// the stream has run the GEMM.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn matmul(
        &self,
        stream: &CudaStream,
        s: &LtShape,
        a: u64,
        b: u64,
        d: u64,
        beta: f32,
        epilogue: Epilogue,
    ) -> Result<()> {
        let mut plans = self.plans.lock().map_err(|_| lt_err("plan cache", "poisoned lock"))?;
        let plan = match plans.entry((*s, epilogue.kind())) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => slot.insert(self.plan(s, epilogue)?),
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: the plan's descriptor is live and only used under the lock;
        // both attributes are device pointers (void*).
        unsafe {
            match epilogue {
                Epilogue::None => {}
                Epilogue::Bias { bias } => set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?,
                Epilogue::GeluAuxBias { bias, aux } => {
                    set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
                    set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?;
                }
                Epilogue::DGelu { aux } => set_attr(plan.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?,
            }
        }
        let alpha = 1.0f32;
        let (ws, _sync) = self.workspace.device_ptr(stream);
        // SAFETY: the caller guarantees the buffers; the plan describes them;
        // the workspace is this handle's and only used by GEMMs on the one stream.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                plan.a,
                b as *const c_void,
                plan.b,
                d as *const c_void,
                plan.c,
                d as *mut c_void,
                plan.c,
                &plan.algo,
                ws as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(&format!("matmul {s:?}"), e))
    }
}
