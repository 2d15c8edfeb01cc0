//! Kernel build: the `kernels/*.cu` sources (embedded in the binary) compiled
//! by NVRTC for the GPU's architecture, and cached on disk by a hash of source,
//! options and architecture so a second start compiles nothing.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{Error, Result};

/// The shared header, prepended to every module (NVRTC needs no include path
/// for our own code this way; only CUDA's headers are looked up).
const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// Every kernel module: (name, source). A module is compiled as a whole.
pub const MODULES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../../../kernels/elementwise.cu")),
    ("layernorm", include_str!("../../../../kernels/layernorm.cu")),
    ("embedding", include_str!("../../../../kernels/embedding.cu")),
    ("image_tokens", include_str!("../../../../kernels/image_tokens.cu")),
    ("cross_entropy", include_str!("../../../../kernels/cross_entropy.cu")),
    ("multi_tensor", include_str!("../../../../kernels/multi_tensor.cu")),
    ("attention", include_str!("../../../../kernels/attention.cu")),
    ("attention_mma", include_str!("../../../../kernels/attention_mma.cu")),
    ("attention_wgmma", include_str!("../../../../kernels/attention_wgmma.cu")),
    ("attention_cached", include_str!("../../../../kernels/attention_cached.cu")),
];

/// Directories that may hold cuda_bf16.h, in order: TRAINER_CUDA_INCLUDE, then
/// CUDA_HOME, CUDA_PATH, /usr/local/cuda, then pip's nvidia wheels.
fn include_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("TRAINER_CUDA_INCLUDE") {
        out.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Ok(p) = std::env::var(var) {
            out.push(Path::new(&p).join("include"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/include"));
    // pip: nvidia-cuda-runtime puts the headers in site-packages/nvidia/cu13/include.
    let mut site_dirs: Vec<PathBuf> =
        std::env::var("PYTHONPATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for pattern in [
        "/usr/local/lib/python3*/dist-packages",
        "/usr/lib/python3/dist-packages",
        "/usr/local/lib/python3*/site-packages",
        "/root/.pyenv/versions/*/lib/python3*/site-packages",
        "/opt/*/.venv/lib/python3*/site-packages",
    ] {
        site_dirs.extend(glob_dirs(pattern));
    }
    if let Ok(home) = std::env::var("HOME") {
        site_dirs.extend(glob_dirs(&format!("{home}/.local/lib/python3*/site-packages")));
    }
    for site in site_dirs {
        out.push(site.join("nvidia/cu13/include"));
        out.push(site.join("nvidia/cuda_runtime/include"));
    }
    out
}

/// Directories matching a pattern with `*` wildcards (no glob crate in core).
fn glob_dirs(pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::from("/")];
    for part in pattern.trim_start_matches('/').split('/') {
        let mut next = Vec::new();
        for base in &found {
            if part.contains('*') {
                let (pre, post) = part.split_once('*').unwrap_or((part, ""));
                if let Ok(rd) = std::fs::read_dir(base) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with(pre) && name.ends_with(post) && e.path().is_dir() {
                            next.push(e.path());
                        }
                    }
                }
            } else {
                let p = base.join(part);
                if p.is_dir() {
                    next.push(p);
                }
            }
        }
        found = next;
    }
    found
}

/// The first candidate directory holding cuda_bf16.h.
pub fn find_cuda_include() -> Result<PathBuf> {
    let candidates = include_candidates();
    candidates.iter().find(|d| d.join("cuda_bf16.h").is_file()).cloned().ok_or_else(|| Error::KernelCompile {
        kernel: "all".into(),
        msg: format!(
            "CUDA headers (cuda_bf16.h) not found; set CUDA_HOME or TRAINER_CUDA_INCLUDE, or pip install \
             nvidia-cuda-runtime. Looked in: {}",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// 64-bit FNV-1a: stable across builds and platforms (unlike std's hasher).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TRAINER_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .ok()
        .map(PathBuf::from)
        .or_else(|| std::env::var("HOME").ok().map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("trainer").join("kernels"))
}

/// The virtual architecture NVRTC targets: PTX for compute_XY, which the driver
/// turns into machine code for the exact GPU when it loads the module.
fn arch_name(cc: (i32, i32)) -> &'static str {
    match cc {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, minor) => Box::leak(format!("compute_{major}{minor}").into_boxed_str()),
    }
}

/// Modules with Hopper-only instructions (wgmma): on compute capability 9.0
/// they are compiled for compute_90a, whose PTX only sm_90 GPUs load; for any
/// other target they compile to stubs that are never launched.
const HOPPER_MODULES: &[&str] = &["attention_wgmma"];

fn module_arch(module: &str, cc: (i32, i32)) -> &'static str {
    if cc == (9, 0) && HOPPER_MODULES.contains(&module) { "compute_90a" } else { arch_name(cc) }
}

fn options() -> Vec<String> {
    // No --use_fast_math: results must match the CPU reference.
    vec!["-std=c++17".into()]
}

/// Compiles `module` for compute capability `cc` to PTX, through the disk cache.
pub fn module_ptx(module: &'static str, cc: (i32, i32)) -> Result<Ptx> {
    let src = MODULES
        .iter()
        .find(|m| m.0 == module)
        .map(|m| m.1)
        .ok_or_else(|| Error::KernelCompile { kernel: module.into(), msg: "no such kernel module".into() })?;
    let arch = module_arch(module, cc);
    let opts = options();
    let full = format!("{COMMON}\n{src}");
    let key = format!("{module}-{arch}-{:016x}.ptx", fnv1a(&[&full, arch, &opts.join(" ")]));
    let cached = cache_dir().map(|d| d.join(&key));
    if let Some(Ok(ptx)) = cached.as_ref().map(std::fs::read_to_string) {
        return Ok(Ptx::from_src(ptx));
    }
    let ptx = compile(module, &full, arch, opts)?;
    if let Some(path) = &cached {
        // Best effort: a read-only home only costs a recompile next time.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
    Ok(ptx)
}

/// Runs NVRTC on one module's full source.
pub fn compile(module: &str, full_source: &str, arch: &'static str, options: Vec<String>) -> Result<Ptx> {
    // SAFETY: only probes whether the NVRTC library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::KernelCompile {
            kernel: module.into(),
            msg: "NVRTC (libnvrtc.so) not found: install the CUDA toolkit or pip install nvidia-cuda-nvrtc, \
                  and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        });
    }
    let include = find_cuda_include()?;
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options,
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(full_source, opts)
        .map_err(|e| Error::KernelCompile { kernel: module.into(), msg: e.to_string().replace('\n', " | ") })
}

/// Compiles every module for `arch` without a GPU (CI's compile check).
pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static str, usize)>> {
    MODULES
        .iter()
        .map(|(name, src)| {
            let ptx = compile(name, &format!("{COMMON}\n{src}"), arch, options())?;
            Ok((*name, ptx.to_src().len()))
        })
        .collect()
}
