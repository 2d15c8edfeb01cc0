//! Launchers: one function per op, called by `ops` after it has checked
//! shapes, dtypes and devices. Kernels receive raw device pointers and sizes;
//! every launch goes on the device's single stream, so ops are ordered without
//! host synchronization.

use std::sync::OnceLock;

use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::gemm_lt::{Epilogue, LtShape};
use super::{CudaData, CudaDevice, CudaStorage, cuda_err};
use crate::ops::Gelu;
use crate::{DType, Error, Result};

/// Threads per block for one-dimensional kernels.
const BLOCK: u32 = 256;
/// Grid-stride kernels need no more blocks than this to fill any current GPU.
const MAX_BLOCKS: usize = 132 * 32;

/// A kernel argument. Pointers travel as 64-bit device addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
    Dims(AttnDims),
    Adam(AdamWScalars),
    Norm(PixelNorm),
}

/// Mirrors `struct PixelNorm` in kernels/image_tokens.cu: per channel (at
/// most 4), value = pixel * scale - shift.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PixelNorm {
    pub scale: [f32; 4],
    pub shift: [f32; 4],
}

// SAFETY: PixelNorm is plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for PixelNorm {}

/// Mirrors `struct Dims` in kernels/attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnDims {
    pub t: i32,
    pub h: i32,
    pub hs: i32,
    pub scale: f32,
    pub causal: i32,
}

// SAFETY: AttnDims is plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for AttnDims {}

/// Mirrors `struct AdamWScalars` in kernels/multi_tensor.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWScalars {
    lr_decay: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

// SAFETY: AdamWScalars is plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for AdamWScalars {}

fn suffix(s: &CudaStorage) -> Result<&'static str> {
    match s.dtype() {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::Unsupported { op: "cuda kernel", dtype: other, device: "cuda".into() }),
    }
}

/// The device address of a buffer.
fn addr(s: &CudaStorage) -> u64 {
    let stream = s.device.stream();
    match &s.data {
        CudaData::F32(v) => v.device_ptr(stream).0,
        CudaData::BF16(v) => v.device_ptr(stream).0,
        CudaData::U32(v) => v.device_ptr(stream).0,
    }
}

/// The device address of a buffer the kernel writes.
fn addr_mut(s: &mut CudaStorage) -> u64 {
    let stream = s.device.stream().clone();
    match &mut s.data {
        CudaData::F32(v) => v.device_ptr_mut(&stream).0,
        CudaData::BF16(v) => v.device_ptr_mut(&stream).0,
        CudaData::U32(v) => v.device_ptr_mut(&stream).0,
    }
}

fn ptr(s: &CudaStorage) -> Arg {
    Arg::Ptr(addr(s))
}

fn ptr_mut(s: &mut CudaStorage) -> Arg {
    Arg::Ptr(addr_mut(s))
}

fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn launch(dev: &CudaDevice, module: &'static str, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let f = dev.function(module, name)?;
    let stream = dev.stream();
    let mut b = stream.launch_builder(&f);
    for a in args {
        match a {
            Arg::Ptr(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::U32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::Dims(v) => b.arg(v),
            Arg::Adam(v) => b.arg(v),
            Arg::Norm(v) => b.arg(v),
        };
    }
    dev.timed(name, || {
        // SAFETY: each launcher below passes exactly the arguments, in order and
        // type, of the extern "C" kernel it names in kernels/*.cu, and `ops`
        // checked that every buffer holds the elements the kernel indexes.
        // Outputs come from `&mut` tensors, so no buffer is written while aliased.
        unsafe { b.launch(cfg) }.map(drop).map_err(|e| cuda_err(format!("launching {name}"), e))
    })
}

fn n64(n: usize) -> Arg {
    Arg::I64(n as i64)
}

// ------------------------------------------------------------------ elementwise

pub(crate) fn fill(out: &mut CudaStorage, value: f64, n: usize) -> Result<()> {
    let dev = out.device.clone();
    if let CudaData::U32(_) = out.data {
        return launch(&dev, "elementwise", "fill_u32", grid_1d(n), &[ptr_mut(out), Arg::U32(value as u32), n64(n)]);
    }
    let name = format!("fill_{}", suffix(out)?);
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(out), Arg::F32(value as f32), n64(n)])
}

pub(crate) fn copy(dst: &mut CudaStorage, src: &CudaStorage) -> Result<()> {
    let stream = dst.device.stream().clone();
    let e = |e| cuda_err("device-to-device copy", e);
    match (&mut dst.data, &src.data) {
        (CudaData::F32(d), CudaData::F32(s)) => stream.memcpy_dtod(s, d).map_err(e),
        (CudaData::BF16(d), CudaData::BF16(s)) => stream.memcpy_dtod(s, d).map_err(e),
        (CudaData::U32(d), CudaData::U32(s)) => stream.memcpy_dtod(s, d).map_err(e),
        _ => Err(Error::DType { op: "copy", expected: dst.dtype(), got: src.dtype() }),
    }
}

/// dst[dst_off .. dst_off + n] = src[src_off .. src_off + n] (elements); `ops`
/// checked both ranges.
pub(crate) fn copy_range(
    dst: &mut CudaStorage,
    dst_off: usize,
    src: &CudaStorage,
    src_off: usize,
    n: usize,
) -> Result<()> {
    let stream = dst.device.stream().clone();
    let e = |e| cuda_err("device-to-device copy", e);
    let (d, s) = (dst_off..dst_off + n, src_off..src_off + n);
    match (&mut dst.data, &src.data) {
        (CudaData::F32(dv), CudaData::F32(sv)) => stream.memcpy_dtod(&sv.slice(s), &mut dv.slice_mut(d)).map_err(e),
        (CudaData::BF16(dv), CudaData::BF16(sv)) => stream.memcpy_dtod(&sv.slice(s), &mut dv.slice_mut(d)).map_err(e),
        (CudaData::U32(dv), CudaData::U32(sv)) => stream.memcpy_dtod(&sv.slice(s), &mut dv.slice_mut(d)).map_err(e),
        _ => Err(Error::DType { op: "copy_rows", expected: dst.dtype(), got: src.dtype() }),
    }
}

pub(crate) fn add(out: &mut CudaStorage, a: &CudaStorage, b: &CudaStorage, n: usize) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("add_{}", suffix(out)?));
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(out), ptr(a), ptr(b), n64(n)])
}

pub(crate) fn add_assign(acc: &mut CudaStorage, x: &CudaStorage, n: usize) -> Result<()> {
    let (dev, name) = (acc.device.clone(), format!("add_assign_{}", suffix(acc)?));
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(acc), ptr(x), n64(n)])
}

pub(crate) fn scale(x: &mut CudaStorage, s: f64, n: usize) -> Result<()> {
    let (dev, name) = (x.device.clone(), format!("scale_{}", suffix(x)?));
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(x), Arg::F32(s as f32), n64(n)])
}

fn gelu_name(kind: Gelu) -> &'static str {
    match kind {
        Gelu::Tanh => "gelu",
        Gelu::Erf => "gelu_erf",
    }
}

pub(crate) fn gelu_forward(out: &mut CudaStorage, inp: &CudaStorage, n: usize, kind: Gelu) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("{}_forward_{}", gelu_name(kind), suffix(out)?));
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(out), ptr(inp), n64(n)])
}

pub(crate) fn gelu_backward(
    dinp: &mut CudaStorage,
    inp: &CudaStorage,
    dout: &CudaStorage,
    n: usize,
    kind: Gelu,
) -> Result<()> {
    let (dev, name) = (dinp.device.clone(), format!("{}_backward_{}", gelu_name(kind), suffix(dinp)?));
    launch(&dev, "elementwise", &name, grid_1d(n), &[ptr_mut(dinp), ptr(inp), ptr(dout), n64(n)])
}

pub(crate) fn add_bias(out: &mut CudaStorage, bias: &CudaStorage, rows: usize, cols: usize) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("add_bias_{}", suffix(out)?));
    launch(&dev, "elementwise", &name, grid_1d(rows * cols), &[ptr_mut(out), ptr(bias), n64(rows), n64(cols)])
}

/// Rows per stage-1 block of the column reductions (COLUMN_CHUNK in common.cuh).
const COLUMN_CHUNK: usize = 256;

fn column_chunks(rows: usize) -> usize {
    rows.div_ceil(COLUMN_CHUNK).max(1)
}

fn column_partials_cfg(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(32).max(1) as u32, column_chunks(rows) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// Runs `f` with (partials, counters) for a column reduction of `outputs`
/// column sums of `cols` columns over `rows` rows (kernels/common.cuh).
fn with_column_scratch<R>(
    dev: &CudaDevice,
    rows: usize,
    cols: usize,
    outputs: usize,
    f: impl FnOnce(u64, u64) -> Result<R>,
) -> Result<R> {
    let strips = cols.div_ceil(32).max(1);
    dev.with_scratch(outputs * column_chunks(rows) * cols, |partials| {
        dev.with_counters(strips, |counters| f(partials, counters))
    })
}

pub(crate) fn bias_grad(dbias: &mut CudaStorage, dout: &CudaStorage, rows: usize, cols: usize) -> Result<()> {
    let (dev, s) = (dbias.device.clone(), suffix(dbias)?);
    with_column_scratch(&dev, rows, cols, 1, |partials, counters| {
        let args = [ptr_mut(dbias), Arg::Ptr(partials), Arg::Ptr(counters), ptr(dout), n64(rows), n64(cols)];
        launch(&dev, "elementwise", &format!("bias_grad_{s}"), column_partials_cfg(rows, cols), &args)
    })
}

// ------------------------------------------------------------------ matmul

/// out (m, n) = [out +] op(a) (m, k) @ op(b) (k, n) [+ bias (n) per row],
/// row-major. cuBLAS is column-major, so it computes out^T = op(b)^T @ op(a)^T:
/// a row-major matrix is its own transpose read column-major. f32 goes to
/// cuBLAS (exact fp32: cuBLASLt's f32 path would use TF32); bf16 to cuBLASLt,
/// which picks a kernel per shape and adds the bias in its epilogue.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    out: &mut CudaStorage,
    a: &CudaStorage,
    b: &CudaStorage,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    bias: Option<&CudaStorage>,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    if out.dtype() == DType::BF16 {
        let epilogue = match bias {
            None => Epilogue::None,
            Some(v) if v.dtype() == DType::BF16 => Epilogue::Bias { bias: addr(v) },
            Some(v) => return Err(Error::DType { op: "matmul bias", expected: DType::BF16, got: v.dtype() }),
        };
        return lt_matmul(out, a, b, (m, n, k), (trans_a, trans_b), accumulate, epilogue);
    }
    let dim = |v: usize| i32::try_from(v).map_err(|_| cuda_err("matmul", format!("dimension {v} exceeds i32")));
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
    let dev = out.device.clone();
    let blas = dev.blas();
    match (&mut out.data, &a.data, &b.data, bias) {
        (CudaData::F32(o), CudaData::F32(x), CudaData::F32(y), None) => {
            let cfg = GemmConfig {
                transa: op(trans_b),
                transb: op(trans_a),
                m: ni,
                n: mi,
                k: ki,
                alpha: 1.0f32,
                lda: if trans_b { ki } else { ni },
                ldb: if trans_a { mi } else { ki },
                beta: if accumulate { 1.0 } else { 0.0 },
                ldc: ni,
            };
            let name =
                format!("cublas_gemm {m}x{n}x{k} ta={} tb={} acc={}", trans_a as u8, trans_b as u8, accumulate as u8);
            dev.timed(&name, || {
                // SAFETY: `ops::matmul` checked that a, b and out hold m*k, k*n and
                // m*n elements; the leading dimensions above describe exactly those
                // row-major layouts, so cuBLAS reads and writes within bounds.
                unsafe { blas.gemm(cfg, y, x, o) }.map_err(|e| cuda_err("cuBLAS gemm", e))
            })
        }
        _ => Err(Error::Unsupported { op: "matmul", dtype: out.dtype(), device: "cuda".into() }),
    }
}

/// bf16, one cuBLASLt GEMM: pre (rows, h) = inp (rows, c) @ weight (h, c)^T + bias,
/// gelu (rows, h) = GELU(pre).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_gelu_forward(
    gelu: &mut CudaStorage,
    pre: &mut CudaStorage,
    inp: &CudaStorage,
    weight: &CudaStorage,
    bias: &CudaStorage,
    rows: usize,
    h: usize,
    c: usize,
) -> Result<()> {
    let epilogue = Epilogue::GeluAuxBias { bias: addr(bias), aux: addr_mut(pre) };
    lt_matmul(gelu, inp, weight, (rows, h, c), (false, true), false, epilogue)
}

/// bf16, one cuBLASLt GEMM: dpre (rows, h) = (dout (rows, c) @ weight (c, h)) * GELU'(pre).
pub(crate) fn matmul_dgelu(
    dpre: &mut CudaStorage,
    dout: &CudaStorage,
    weight: &CudaStorage,
    pre: &CudaStorage,
    rows: usize,
    h: usize,
    c: usize,
) -> Result<()> {
    let epilogue = Epilogue::DGelu { aux: addr(pre) };
    lt_matmul(dpre, dout, weight, (rows, h, c), (false, false), false, epilogue)
}

/// The bf16 GEMM of [`matmul`] through cuBLASLt, with `epilogue`.
fn lt_matmul(
    out: &mut CudaStorage,
    a: &CudaStorage,
    b: &CudaStorage,
    (m, n, k): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    accumulate: bool,
    epilogue: Epilogue,
) -> Result<()> {
    for s in [&*out, a, b] {
        if s.dtype() != DType::BF16 {
            return Err(Error::DType { op: "matmul", expected: DType::BF16, got: s.dtype() });
        }
    }
    // Column-major: out^T (n, m) = op(b)^T (n, k) @ op(a)^T (k, m).
    let shape = LtShape {
        m: n as u64,
        n: m as u64,
        k: k as u64,
        trans_a: trans_b,
        trans_b: trans_a,
        lda: (if trans_b { k } else { n }) as i64,
        ldb: (if trans_a { m } else { k }) as i64,
        ldc: n as i64,
    };
    let dev = out.device.clone();
    let name = format!(
        "cublaslt {m}x{n}x{k} ta={} tb={} acc={} {}",
        trans_a as u8,
        trans_b as u8,
        accumulate as u8,
        epilogue.name()
    );
    let (o, x, y) = (addr_mut(out), addr(a), addr(b));
    dev.timed(&name, || {
        // SAFETY: `ops` checked that a, b and out hold m*k, k*n and m*n bf16
        // elements (row-major; the shape above reads them column-major within
        // those bounds) and sized the epilogue's vector; all live on this
        // device until the stream has run the GEMM.
        unsafe { dev.blas_lt().matmul(dev.stream(), &shape, y, x, o, if accumulate { 1.0 } else { 0.0 }, epilogue) }
    })
}

// ------------------------------------------------------------------ layernorm

/// Rows per block in the warp-per-row kernels (block 256 = 8 warps).
const ROWS_PER_BLOCK: usize = 8;

fn warp_rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Pairs per lane of the register-resident bf16 LayerNorm kernels for rows of
/// `c` elements (even, up to 2048), if they take it.
pub(crate) fn layernorm_pairs(c: usize) -> Option<usize> {
    [6usize, 12, 16, 20, 25, 32].into_iter().find(|p| c <= 64 * p).filter(|_| c.is_multiple_of(2))
}

/// Packs of 8 per lane of the bf16 input backward with 16-byte accesses
/// (layernorm_backward_input_bf16_v1 .. _v8) for rows of `c` elements (a
/// multiple of 8, up to 2048), if it takes them.
fn layernorm_backward_packs(c: usize) -> Option<usize> {
    (c > 0 && c.is_multiple_of(8) && c <= 256 * 8).then(|| c.div_ceil(256))
}

/// Column pairs per block of layernorm_params_pairs_bf16 (32 lanes, a pair each).
const PARAMS_PAIRS_STRIP: usize = 64;

/// out = LayerNorm(inp); with `residual` = (resid, b), first resid = inp + b
/// and out = LayerNorm(resid), in the same kernel (bf16 rows that
/// [`layernorm_pairs`] takes only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_forward(
    out: &mut CudaStorage,
    mean: &mut CudaStorage,
    rstd: &mut CudaStorage,
    inp: &CudaStorage,
    residual: Option<(&mut CudaStorage, &CudaStorage)>,
    weight: &CudaStorage,
    bias: &CudaStorage,
    rows: usize,
    c: usize,
    eps: f64,
) -> Result<()> {
    let (dev, s) = (out.device.clone(), suffix(out)?);
    if let Some(p) = layernorm_pairs(c).filter(|_| s == "bf16") {
        // Without a residual, `resid` and `b` are null and the kernel reads `a` = inp.
        let (resid, b) = match residual {
            Some((resid, b)) => (ptr_mut(resid), ptr(b)),
            None => (Arg::Ptr(0), Arg::Ptr(0)),
        };
        let (o, m, r, x, w, bi) = (ptr_mut(out), ptr_mut(mean), ptr_mut(rstd), ptr(inp), ptr(weight), ptr(bias));
        let args = [o, m, r, resid, x, b, w, bi, n64(rows), Arg::I32(c as i32), Arg::F32(eps as f32)];
        return launch(&dev, "layernorm", &format!("layernorm_forward_bf16_p{p}"), warp_rows_cfg(rows), &args);
    }
    if residual.is_some() {
        return Err(Error::Unsupported { op: "residual_layernorm_forward", dtype: out.dtype(), device: "cuda".into() });
    }
    let (o, m, r, x, w, bi) = (ptr_mut(out), ptr_mut(mean), ptr_mut(rstd), ptr(inp), ptr(weight), ptr(bias));
    let args = [o, m, r, x, w, bi, n64(rows), Arg::I32(c as i32), Arg::F32(eps as f32)];
    launch(&dev, "layernorm", &format!("layernorm_forward_{s}"), warp_rows_cfg(rows), &args)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    dinp: &mut CudaStorage,
    dweight: &mut CudaStorage,
    dbias: &mut CudaStorage,
    dout: &CudaStorage,
    inp: &CudaStorage,
    weight: &CudaStorage,
    mean: &CudaStorage,
    rstd: &CudaStorage,
    rows: usize,
    c: usize,
) -> Result<()> {
    let dev = dinp.device.clone();
    let s = suffix(dinp)?;
    let args = [ptr_mut(dinp), ptr(dout), ptr(inp), ptr(weight), ptr(mean), ptr(rstd), n64(rows), Arg::I32(c as i32)];
    let name = match (layernorm_backward_packs(c), layernorm_pairs(c)) {
        (Some(p), _) if s == "bf16" => format!("layernorm_backward_input_bf16_v{p}"),
        (None, Some(p)) if s == "bf16" => format!("layernorm_backward_input_bf16_p{p}"),
        _ => format!("layernorm_backward_input_{s}"),
    };
    launch(&dev, "layernorm", &name, warp_rows_cfg(rows), &args)?;
    // bf16 with even C: column pairs, both sums in one pass (64-column strips,
    // so fewer counters than the with_column_scratch's 32-column ones).
    let (name, cfg) = if s == "bf16" && c.is_multiple_of(2) {
        let mut cfg = column_partials_cfg(rows, c);
        cfg.grid_dim.0 = c.div_ceil(PARAMS_PAIRS_STRIP).max(1) as u32;
        ("layernorm_params_pairs_bf16".to_string(), cfg)
    } else {
        (format!("layernorm_params_{s}"), column_partials_cfg(rows, c))
    };
    with_column_scratch(&dev, rows, c, 2, |partials, counters| {
        let args = [
            ptr_mut(dweight),
            ptr_mut(dbias),
            Arg::Ptr(partials),
            Arg::Ptr(counters),
            ptr(dout),
            ptr(inp),
            ptr(mean),
            ptr(rstd),
            n64(rows),
            n64(c),
        ];
        launch(&dev, "layernorm", &name, cfg, &args)
    })
}

// ------------------------------------------------------------------ embedding

pub(crate) fn embedding_forward(
    out: &mut CudaStorage,
    tokens: &CudaStorage,
    wte: &CudaStorage,
    wpe: &CudaStorage,
    bt: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("embedding_forward_{}", suffix(out)?));
    let args = [ptr_mut(out), ptr(tokens), ptr(wte), ptr(wpe), n64(bt), Arg::I32(t as i32), Arg::I32(c as i32)];
    launch(&dev, "embedding", &name, grid_1d(bt * c), &args)
}

/// dwte via the token index (ids, starts, order) with `distinct` buckets; dwpe by columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn embedding_backward(
    dwte: &mut CudaStorage,
    dwpe: &mut CudaStorage,
    dout: &CudaStorage,
    ids: &CudaStorage,
    starts: &CudaStorage,
    order: &CudaStorage,
    distinct: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let dev = dwte.device.clone();
    let s = suffix(dwte)?;
    let args = [ptr_mut(dwpe), ptr(dout), Arg::I32(b as i32), Arg::I32(t as i32), Arg::I32(c as i32)];
    launch(&dev, "embedding", &format!("embedding_backward_wpe_{s}"), grid_1d(t * c), &args)?;
    if distinct == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (distinct as u32, 1, 1),
        block_dim: (c.next_multiple_of(32).min(1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [ptr_mut(dwte), ptr(dout), ptr(ids), ptr(starts), ptr(order), Arg::I32(c as i32)];
    launch(&dev, "embedding", &format!("embedding_backward_wte_{s}"), cfg, &args)
}

// ------------------------------------------------------------------ image tokens (ViT)

/// `out` (b, (s/p)^2, c*p*p) from the packed uint8 pixels (b, s, s, c).
#[allow(clippy::too_many_arguments)]
pub(crate) fn patchify(
    out: &mut CudaStorage,
    packed: &CudaStorage,
    b: usize,
    s: usize,
    p: usize,
    c: usize,
    norm: PixelNorm,
) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("patchify_{}", suffix(out)?));
    let dims = [b, s, p, c].map(|v| Arg::I32(v as i32));
    let args = [ptr_mut(out), ptr(packed), dims[0], dims[1], dims[2], dims[3], Arg::Norm(norm)];
    launch(&dev, "image_tokens", &name, grid_1d(b * s * s * c), &args)
}

pub(crate) fn image_tokens_forward(
    out: &mut CudaStorage,
    patches: &CudaStorage,
    cls: &CudaStorage,
    pos: &CudaStorage,
    b: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("image_tokens_forward_{}", suffix(out)?));
    let dims = [Arg::I32(b as i32), Arg::I32(n as i32), Arg::I32(c as i32)];
    let args = [ptr_mut(out), ptr(patches), ptr(cls), ptr(pos), dims[0], dims[1], dims[2]];
    launch(&dev, "image_tokens", &name, grid_1d(b * (n + 1) * c), &args)
}

/// One thread per (token, channel), looping over the batch in order.
pub(crate) fn image_tokens_backward(
    dpatches: &mut CudaStorage,
    dcls: &mut CudaStorage,
    dpos: &mut CudaStorage,
    dout: &CudaStorage,
    b: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let (dev, name) = (dpatches.device.clone(), format!("image_tokens_backward_{}", suffix(dpatches)?));
    let dims = [Arg::I32(b as i32), Arg::I32(n as i32), Arg::I32(c as i32)];
    let args = [ptr_mut(dpatches), ptr_mut(dcls), ptr_mut(dpos), ptr(dout), dims[0], dims[1], dims[2]];
    launch(&dev, "image_tokens", &name, grid_1d((n + 1) * c), &args)
}

pub(crate) fn pool_tokens_forward(
    out: &mut CudaStorage,
    x: &CudaStorage,
    b: usize,
    t: usize,
    c: usize,
    mean: bool,
) -> Result<()> {
    let (dev, name) = (out.device.clone(), format!("pool_tokens_forward_{}", suffix(out)?));
    let args =
        [ptr_mut(out), ptr(x), Arg::I32(b as i32), Arg::I32(t as i32), Arg::I32(c as i32), Arg::I32(mean.into())];
    launch(&dev, "image_tokens", &name, grid_1d(b * c), &args)
}

pub(crate) fn pool_tokens_backward(
    dx: &mut CudaStorage,
    dout: &CudaStorage,
    b: usize,
    t: usize,
    c: usize,
    mean: bool,
) -> Result<()> {
    let (dev, name) = (dx.device.clone(), format!("pool_tokens_backward_{}", suffix(dx)?));
    let args =
        [ptr_mut(dx), ptr(dout), Arg::I32(b as i32), Arg::I32(t as i32), Arg::I32(c as i32), Arg::I32(mean.into())];
    launch(&dev, "image_tokens", &name, grid_1d(b * t * c), &args)
}

// ------------------------------------------------------------------ loss

/// Most 16-byte packs (8 bf16) a thread holds in the register-resident
/// cross-entropy kernels (cross_entropy_rows_bf16_p1 .. _p7): 1024 threads
/// hold rows of up to 57344 bf16 (GPT-2's 50304 takes 7). 8 spills on sm_80
/// in the 64 registers a thread of a 1024-thread block may have.
const CE_MAX_PACKS: usize = 7;

/// (packs per thread, threads) of the register-resident bf16 cross-entropy for
/// rows of `vp` columns, if it takes them: rows of whole 16-byte packs that fit
/// in the registers of one block. Short rows get fewer threads (one pack each)
/// rather than idle ones.
fn cross_entropy_rows_cfg(vp: usize) -> Option<(usize, u32)> {
    if !vp.is_multiple_of(8) {
        return None;
    }
    let packs = vp / 8;
    let threads = packs.next_multiple_of(32).clamp(32, 1024);
    let np = packs.div_ceil(threads).max(1);
    (np <= CE_MAX_PACKS).then_some((np, threads as u32))
}

pub(crate) fn cross_entropy(
    logits: &mut CudaStorage,
    losses: &mut CudaStorage,
    targets: &CudaStorage,
    rows: usize,
    vp: usize,
    v: usize,
    grad_scale: Option<f64>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let dev = logits.device.clone();
    let (scale, with_grad) = (Arg::F32(grad_scale.unwrap_or(0.0) as f32), Arg::I32(grad_scale.is_some() as i32));
    // bf16 rows that fit in registers: one read and one write of the logits.
    if let Some((np, threads)) = cross_entropy_rows_cfg(vp).filter(|_| logits.dtype() == DType::BF16) {
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // vp <= 8 * 1024 * CE_MAX_PACKS, so both fit the kernel's int.
        let args =
            [ptr_mut(logits), ptr_mut(losses), ptr(targets), Arg::I32(vp as i32), Arg::I32(v as i32), scale, with_grad];
        return launch(&dev, "cross_entropy", &format!("cross_entropy_rows_bf16_p{np}"), cfg, &args);
    }
    // 16-byte packs need rows that are a whole number of them (and so aligned:
    // every allocation is).
    let packed = (vp * logits.dtype().size_in_bytes()).is_multiple_of(16);
    let name = format!("cross_entropy_{}{}", if packed { "vec_" } else { "" }, suffix(logits)?);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let args = [ptr_mut(logits), ptr_mut(losses), ptr(targets), n64(vp), n64(v), scale, with_grad];
    launch(&dev, "cross_entropy", &name, cfg, &args)
}

// ------------------------------------------------------------------ attention

const ATTN_ROWS: u32 = 8;

/// Head sizes with tensor-core (bf16) kernels in attention_mma.cu; 64 rows per block.
const MMA_HEAD_SIZES: [usize; 4] = [32, 64, 96, 128];
const MMA_ROWS: u32 = 64;

/// The tensor-core kernels' launch shape, when they serve this call.
fn mma_cfg(s: &CudaStorage, b: usize, t: usize, c: usize, n_head: usize) -> Option<(usize, LaunchConfig)> {
    let hs = c / n_head;
    (s.dtype() == DType::BF16 && MMA_HEAD_SIZES.contains(&hs)).then(|| {
        let cfg = LaunchConfig {
            // Heads along x (up to 2^31 - 1), row blocks along y (T / 64 <= 65535).
            grid_dim: ((b * n_head) as u32, (t as u32).div_ceil(MMA_ROWS), 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        (hs, cfg)
    })
}

/// A kernel of attention_mma.cu, asking for the largest shared-memory carveout:
/// under the driver's default split an H200 ran 3 blocks of ~37 KB per SM
/// (ncu: "Block Limit Shared Mem") where the registers allow 4.
fn launch_attention_mma(dev: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as CARVEOUT;
    dev.function("attention_mma", name)?
        .set_attribute(CARVEOUT, 100)
        .map_err(|e| cuda_err(format!("shared-memory carveout of {name}"), e))?;
    launch(dev, "attention_mma", name, cfg, args)
}

/// The Hopper (wgmma) kernels of attention_wgmma.cu serve this call: bf16,
/// head size 64, compute capability 9.0 (the module is built for compute_90a),
/// unless TRAINER_PORTABLE_ATTENTION=1 asks for the mma.sync kernels every
/// GPU runs (to compare, or to rule the Hopper kernels out).
fn wgmma_attention(s: &CudaStorage, c: usize, n_head: usize) -> bool {
    static PORTABLE: OnceLock<bool> = OnceLock::new();
    let portable = *PORTABLE.get_or_init(|| std::env::var("TRAINER_PORTABLE_ATTENTION").is_ok_and(|v| v == "1"));
    !portable && s.dtype() == DType::BF16 && c / n_head == 64 && s.device.cc() == (9, 0)
}

/// A kernel of attention_wgmma.cu: grid (heads, ceil(T / 64)), one warpgroup,
/// `shared` bytes of dynamic shared memory (its 1 KB-aligned tiles), under the
/// largest carveout so that several blocks share an SM.
fn launch_attention_wgmma(
    dev: &CudaDevice,
    name: &str,
    heads: usize,
    t: usize,
    shared: u32,
    args: &[Arg],
) -> Result<()> {
    use cudarc::driver::sys::CUfunction_attribute::{
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC,
        CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT as CARVEOUT,
    };
    let f = dev.function("attention_wgmma", name)?;
    f.set_attribute(MAX_DYNAMIC, shared as i32).map_err(|e| cuda_err(format!("dynamic shared memory of {name}"), e))?;
    f.set_attribute(CARVEOUT, 100).map_err(|e| cuda_err(format!("shared-memory carveout of {name}"), e))?;
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, t.div_ceil(64) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared,
    };
    launch(dev, "attention_wgmma", name, cfg, args)
}

const KB: u32 = 1024;

/// Head size and 32-lane groups per head row of the warp-per-row kernels
/// (attention.cu, attention_cached.cu), which take head sizes up to 128.
fn head_lanes(op: &'static str, c: usize, n_head: usize) -> Result<(usize, usize)> {
    let hs = c / n_head;
    let r = hs.div_ceil(32);
    if r == 0 || r > 4 {
        return Err(Error::Shape { op, msg: format!("head size {hs} is not supported: it must be between 1 and 128") });
    }
    Ok((hs, r))
}

fn attn_setup(b: usize, t: usize, c: usize, n_head: usize, causal: bool) -> Result<(AttnDims, usize)> {
    let (hs, r) = head_lanes("attention (cuda)", c, n_head)?;
    // The tensor-core kernels put all sequences' heads along grid x (up to
    // 2^31 - 1) and 64-row blocks along grid y, which stops at 65535.
    let heads = b * n_head;
    if t.div_ceil(64) > 65_535 || heads > i32::MAX as usize || t > i32::MAX as usize {
        return Err(Error::Shape {
            op: "attention (cuda)",
            msg: format!("B * n_head = {heads}, T = {t}: at most 2^31 - 1 heads and T <= 4194240"),
        });
    }
    let dims = AttnDims {
        t: t as i32,
        h: n_head as i32,
        hs: hs as i32,
        scale: 1.0 / (hs as f32).sqrt(),
        causal: causal as i32,
    };
    Ok((dims, r))
}

/// The launch shape of attention.cu's kernels: blocks of ATTN_ROWS rows along
/// grid x, the heads of all sequences along grid y (at most 65535).
fn cuda_core_attn_cfg(b: usize, t: usize, n_head: usize) -> Result<LaunchConfig> {
    let heads = b * n_head;
    if heads > 65_535 {
        return Err(Error::Shape {
            op: "attention (cuda)",
            msg: format!("B * n_head = {heads}: at most 65535 for this dtype and head size"),
        });
    }
    Ok(LaunchConfig {
        grid_dim: ((t as u32).div_ceil(ATTN_ROWS), heads as u32, 1),
        block_dim: (32 * ATTN_ROWS, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    out: &mut CudaStorage,
    lse: &mut CudaStorage,
    qkv: &CudaStorage,
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    causal: bool,
) -> Result<()> {
    let (dims, r) = attn_setup(b, t, c, n_head, causal)?;
    if b * t == 0 {
        return Ok(()); // an empty grid is a launch error
    }
    let dev = out.device.clone();
    let args = [ptr_mut(out), ptr_mut(lse), ptr(qkv), Arg::Dims(dims)];
    if wgmma_attention(qkv, c, n_head) {
        // Q (8 KB), K and V tiles of 128 keys in two stages (64 KB), 1 KB to align.
        const SHARED: u32 = (8 + 64 + 1) * KB;
        return launch_attention_wgmma(&dev, "attention_forward_wgmma_d64", b * n_head, t, SHARED, &args);
    }
    if let Some((hs, cfg)) = mma_cfg(qkv, b, t, c, n_head) {
        return launch_attention_mma(&dev, &format!("attention_forward_mma_d{hs}"), cfg, &args);
    }
    let cfg = cuda_core_attn_cfg(b, t, n_head)?;
    launch(&dev, "attention", &format!("attention_forward_{}_r{r}", suffix(out)?), cfg, &args)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    dqkv: &mut CudaStorage,
    dout: &CudaStorage,
    qkv: &CudaStorage,
    out: &CudaStorage,
    lse: &CudaStorage,
    delta: &mut CudaStorage,
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    causal: bool,
) -> Result<()> {
    let (dims, r) = attn_setup(b, t, c, n_head, causal)?;
    if b * t == 0 {
        return Ok(()); // an empty grid is a launch error
    }
    let dev = dqkv.device.clone();
    let s = suffix(dqkv)?;
    // The tensor-core dQ kernels also compute delta, which their dK/dV kernels read.
    let dq_args = [ptr_mut(dqkv), ptr_mut(delta), ptr(dout), ptr(qkv), ptr(out), ptr(lse), Arg::Dims(dims)];
    let args = [ptr_mut(dqkv), ptr(dout), ptr(qkv), ptr(lse), ptr(delta), Arg::Dims(dims)];
    if wgmma_attention(qkv, c, n_head) {
        // Six 8 KB tiles and 1 KB to align them; dK/dV also keeps lse and delta
        // of its two query stages (1 KB).
        const DQ_SHARED: u32 = (48 + 1) * KB;
        const DKV_SHARED: u32 = (48 + 1 + 1) * KB;
        let heads = b * n_head;
        launch_attention_wgmma(&dev, "attention_backward_dq_wgmma_d64", heads, t, DQ_SHARED, &dq_args)?;
        return launch_attention_wgmma(&dev, "attention_backward_dkv_wgmma_d64", heads, t, DKV_SHARED, &args);
    }
    if let Some((hs, cfg)) = mma_cfg(qkv, b, t, c, n_head) {
        launch_attention_mma(&dev, &format!("attention_backward_dq_mma_d{hs}"), cfg, &dq_args)?;
        return launch_attention_mma(&dev, &format!("attention_backward_dkv_mma_d{hs}"), cfg, &args);
    }
    let cfg = cuda_core_attn_cfg(b, t, n_head)?;
    let rows = b * n_head * t;
    let delta_args = [ptr_mut(delta), ptr(out), ptr(dout), Arg::Dims(dims), n64(rows)];
    launch(&dev, "attention", &format!("attention_delta_{s}"), warp_rows_cfg(rows), &delta_args)?;
    launch(&dev, "attention", &format!("attention_backward_dq_{s}_r{r}"), cfg, &args)?;
    launch(&dev, "attention", &format!("attention_backward_dkv_{s}_r{r}"), cfg, &args)
}

/// Incremental decoding: out (B, tq, C) from the KV cache (B, tmax, 3C), query i
/// at position past + i. One warp per (query, batch, head).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_cached(
    out: &mut CudaStorage,
    cache: &CudaStorage,
    b: usize,
    tmax: usize,
    past: usize,
    tq: usize,
    c: usize,
    n_head: usize,
) -> Result<()> {
    let (hs, r) = head_lanes("attention_cached (cuda)", c, n_head)?;
    if tq == 0 || b == 0 {
        return Ok(());
    }
    let dev = out.device.clone();
    let cfg =
        LaunchConfig { grid_dim: (tq as u32, (b * n_head) as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let args = [
        ptr_mut(out),
        ptr(cache),
        Arg::I32(tmax as i32),
        Arg::I32(past as i32),
        Arg::I32(tq as i32),
        Arg::I32(n_head as i32),
        Arg::I32(hs as i32),
        Arg::F32(1.0 / (hs as f32).sqrt()),
    ];
    launch(&dev, "attention_cached", &format!("attention_cached_{}_r{r}", suffix(out)?), cfg, &args)
}

// ------------------------------------------------------------------ multi-tensor

/// Blocks per span (grid x) for a span table: enough for the longest span to
/// fill the GPU, fixed by the spans alone so partial sums are deterministic.
fn span_grid(max_len: usize, spans: usize) -> Result<LaunchConfig> {
    if spans > 65_535 {
        return Err(Error::Shape { op: "multi-tensor op", msg: format!("{spans} spans (at most 65535 per launch)") });
    }
    let gx = max_len.div_ceil(BLOCK as usize * 8).clamp(1, 512) as u32;
    Ok(LaunchConfig { grid_dim: (gx, spans.max(1) as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 })
}

/// Uploads a span table into the device scratch behind `reserve` floats (left
/// for the kernel's outputs) and runs `f(scratch, table address)`. Stream order
/// keeps the table alive until the kernel has read it.
fn with_span_table<R>(
    dev: &CudaDevice,
    reserve: usize,
    table: &[i64],
    f: impl FnOnce(&mut cudarc::driver::CudaSlice<f32>, u64) -> Result<R>,
) -> Result<R> {
    let reserve = reserve.next_multiple_of(2); // the i64 table needs 8-byte alignment
    let words: &[f32] = bytemuck::cast_slice(table);
    let stream = dev.stream().clone();
    dev.with_scratch_slice(reserve + words.len(), |buf| {
        stream
            .memcpy_htod(words, &mut buf.slice_mut(reserve..reserve + words.len()))
            .map_err(|e| cuda_err("span table upload", e))?;
        let table_addr = buf.device_ptr_mut(&stream).0 + 4 * reserve as u64;
        f(buf, table_addr)
    })
}

fn elem_offset(base: u64, s: &CudaStorage, start: usize) -> i64 {
    (base + (start * s.dtype().size_in_bytes()) as u64) as i64
}

pub(crate) fn fill_spans(xs: &mut [&mut CudaStorage], value: f64) -> Result<()> {
    let Some(first) = xs.first() else { return Ok(()) };
    let (dev, name) = (first.device.clone(), format!("fill_spans_{}", suffix(first)?));
    let max_len = xs.iter().map(|x| x.len()).max().unwrap_or(0);
    let table: Vec<i64> = xs.iter_mut().flat_map(|x| [addr_mut(x) as i64, x.len() as i64]).collect();
    let cfg = span_grid(max_len, xs.len())?;
    with_span_table(&dev, 0, &table, |_, t| {
        launch(&dev, "multi_tensor", &name, cfg, &[Arg::Ptr(t), Arg::F32(value as f32)])
    })
}

pub(crate) fn copy_spans(
    dst: &mut [&mut CudaStorage],
    src: &[&CudaStorage],
    pairs: &[(crate::ops::Span, crate::ops::Span)],
) -> Result<()> {
    let Some(first) = dst.first() else { return Ok(()) };
    let (dev, name) = (first.device.clone(), format!("copy_spans_{}", suffix(first)?));
    let dst_base: Vec<u64> = dst.iter_mut().map(|d| addr_mut(d)).collect();
    let mut table = Vec::with_capacity(3 * pairs.len());
    for (d, s) in pairs {
        let (dt, st) = (&dst[d.tensor], src[s.tensor]);
        table.extend([elem_offset(dst_base[d.tensor], dt, d.start), elem_offset(addr(st), st, s.start), d.len as i64]);
    }
    let cfg = span_grid(pairs.iter().map(|p| p.0.len).max().unwrap_or(0), pairs.len())?;
    with_span_table(&dev, 0, &table, |_, t| launch(&dev, "multi_tensor", &name, cfg, &[Arg::Ptr(t)]))
}

/// Sum (or sum of squares) over spans, in f64 on the host from per-block float
/// partials: one launch into the device's scratch (no allocation in the steady
/// state), one download. Waits for the device: the caller needs the value.
pub(crate) fn sum_spans(xs: &[&CudaStorage], spans: &[crate::ops::Span], squares: bool) -> Result<f64> {
    let Some(first) = xs.first() else { return Ok(0.0) };
    if spans.is_empty() {
        return Ok(0.0);
    }
    let kind = if squares { "sumsq" } else { "sum" };
    let (dev, name) = (first.device.clone(), format!("{kind}_spans_{}", suffix(first)?));
    let table: Vec<i64> =
        spans.iter().flat_map(|s| [elem_offset(addr(xs[s.tensor]), xs[s.tensor], s.start), s.len as i64]).collect();
    let cfg = span_grid(spans.iter().map(|s| s.len).max().unwrap_or(0), spans.len())?;
    let n_partials = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
    let stream = dev.stream().clone();
    let partials = with_span_table(&dev, n_partials, &table, |buf, t| {
        let out = buf.device_ptr_mut(&stream).0;
        launch(&dev, "multi_tensor", &name, cfg, &[Arg::Ptr(out), Arg::Ptr(t)])?;
        let mut host = vec![0f32; n_partials];
        stream.memcpy_dtoh(&buf.slice(..n_partials), &mut host).map_err(|e| cuda_err("device-to-host copy", e))?;
        stream.synchronize().map_err(|e| cuda_err("synchronize", e))?;
        Ok(host)
    })?;
    Ok(partials.iter().map(|&p| p as f64).sum())
}

/// f32 parameters update in place; bf16 ones through the f32 `master` array.
pub(crate) fn adamw_spans(
    params: &mut [&mut CudaStorage],
    grads: &[&CudaStorage],
    master: Option<&mut CudaStorage>,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    spans: &[crate::ops::AdamWSpan],
    h: crate::ops::AdamWHyper,
) -> Result<()> {
    let Some(first) = params.first() else { return Ok(()) };
    if spans.is_empty() {
        return Ok(());
    }
    let dev = first.device.clone();
    let p_base: Vec<u64> = params.iter_mut().map(|p| addr_mut(p)).collect();
    let mut table = Vec::with_capacity(5 * spans.len());
    for s in spans {
        let (p, g) = (&params[s.param.tensor], grads[s.grad.tensor]);
        table.extend([
            elem_offset(p_base[s.param.tensor], p, s.param.start),
            elem_offset(addr(g), g, s.grad.start),
            s.state_start as i64,
            s.param.len as i64,
            s.decays as i64,
        ]);
    }
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let scalars = AdamWScalars {
        lr_decay: (1.0 - h.lr * h.weight_decay) as f32,
        one_minus_b1: (1.0 - h.beta1) as f32,
        b2: h.beta2 as f32,
        one_minus_b2: (1.0 - h.beta2) as f32,
        step_size: (h.lr / bc1) as f32,
        bc2_sqrt: (1.0 - h.beta2.powi(h.step as i32)).sqrt() as f32,
        eps: h.eps as f32,
        grad_scale: h.grad_scale as f32,
    };
    let (name, mut args) = match (params[0].dtype(), master) {
        (DType::F32, None) => ("adamw_spans_f32", vec![]),
        (DType::BF16, Some(master)) => ("adamw_spans_bf16", vec![ptr_mut(master)]),
        (dtype, _) => {
            return Err(Error::Unsupported { op: "adamw_update (master weights)", dtype, device: "cuda".into() });
        }
    };
    args.extend([ptr_mut(m), ptr_mut(v), Arg::Adam(scalars)]);
    let cfg = span_grid(spans.iter().map(|s| s.param.len).max().unwrap_or(0), spans.len())?;
    with_span_table(&dev, 0, &table, |_, t| {
        let all: Vec<Arg> = std::iter::once(Arg::Ptr(t)).chain(args.iter().copied()).collect();
        launch(&dev, "multi_tensor", name, cfg, &all)
    })
}
