//! Which CUDA libraries the trainer's loader (cudarc's, the names and paths
//! it tries) opens on this machine: NVRTC, cuBLAS, cuBLASLt and NCCL, and the
//! driver, which a GPU host provides. By default it only reports;
//! `TRAINER_REQUIRE_CUDA_LIBS=nvrtc,cublas,cublaslt,nccl` makes each library
//! named there a requirement. scripts/test-image.sh runs this test inside the
//! SageMaker image, where the libraries come from docker/cuda-wheels.txt.

#[test]
fn the_cuda_libraries_the_trainer_loads_are_found() {
    // SAFETY: each call only tries to open the library by its candidate names.
    let found = unsafe {
        [
            ("nvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("cublas", cudarc::cublas::sys::is_culib_present()),
            ("cublaslt", cudarc::cublaslt::sys::is_culib_present()),
            ("nccl", cudarc::nccl::sys::is_culib_present()),
            ("driver", cudarc::driver::sys::is_culib_present()),
        ]
    };
    for (name, present) in found {
        eprintln!("{name}: {}", if present { "found" } else { "not found" });
    }
    let required = std::env::var("TRAINER_REQUIRE_CUDA_LIBS").unwrap_or_default();
    for name in required.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let present = found.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
        match present {
            Some(p) => assert!(p, "TRAINER_REQUIRE_CUDA_LIBS names {name}, but its library was not found"),
            None => panic!(
                "TRAINER_REQUIRE_CUDA_LIBS: unknown library {name:?}; known: nvrtc, cublas, cublaslt, nccl, driver"
            ),
        }
    }
}
