//! Tensor-parallel layers on 2 and 4 real ranks under `mpirun --oversubscribe`
//! (CPU, MPI), against the unsplit layer computed by every rank from the same
//! seeded weights and inputs:
//! - a column-parallel layer's output is bitwise the matching columns of the
//!   unsplit output (the same dot products), its weight and bias gradients
//!   bitwise the matching rows, its input gradient (summed over the ranks by
//!   "f") within fp32 reduction noise;
//! - a row-parallel layer's output (summed by "g"), input gradient slice and
//!   weight and bias gradients match within fp32 reduction noise.
//!
//! Tolerance: the sums over the input features that the unsplit GEMM does in
//! one accumulation are split into tp partial sums added by the all-reduce;
//! for these sizes (in = 48, values ~1) that moves an f32 result by a few
//! ulps: checked against 1e-5 relative to the tensor's largest value. A
//! missing all-reduce is off by the other ranks' share, order 1.
//!
//! The test runs itself as the ranks: the outer test starts `mpirun` on this
//! test binary with TRAINER_TP_RANK=1, which makes the ignored `rank` test
//! do the work. Skips with a message where mpirun is missing, unless
//! TRAINER_REQUIRE_MPI=1 (CI).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer_comm::{CommOptions, World};
use trainer_core::collective::Collective;
use trainer_core::{DType, Device, Tensor};
use trainer_nn::Linear;
use trainer_nn::tensor_parallel::{ColumnParallelLinear, RowParallelLinear};

const N: usize = 6;
const IN: usize = 48;
const OUT: usize = 40;
const TOL: f64 = 1e-5;

fn random(dims: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, dims.to_vec(), &Device::Cpu).unwrap()
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims.to_vec(), DType::F32, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

/// Columns `c0..c0 + w` of a row-major (R, C) matrix.
fn cols(v: &[f32], c: usize, c0: usize, w: usize) -> Vec<f32> {
    v.chunks_exact(c).flat_map(|row| row[c0..c0 + w].to_vec()).collect()
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let worst = got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    assert!(worst <= TOL * scale, "{what}: differs by {worst:e} (largest value {scale:e})");
}

/// The unsplit layer's output, input gradient, weight and bias gradients for `dout`.
fn unsplit(w: &Tensor, b: &Tensor, x: &Tensor, dout: &Tensor) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
    let mut l = Linear::new("full", in_f, out_f, true, DType::F32, &Device::Cpu).unwrap();
    trainer_core::ops::copy(&mut l.weight.value, w).unwrap();
    trainer_core::ops::copy(&mut l.bias.as_mut().unwrap().value, b).unwrap();
    let mut y = zeros(&[N, out_f]);
    l.forward(&mut y, x).unwrap();
    let mut dx = zeros(&[N, in_f]);
    l.backward(&mut dx, dout, x).unwrap();
    (f32s(&y), f32s(&dx), f32s(l.weight.grad().unwrap()), f32s(l.bias.as_ref().unwrap().grad().unwrap()))
}

fn column_parallel(group: &dyn Collective) {
    let (rank, tp) = (group.rank(), group.size());
    let (w, b, x, dout) = (random(&[OUT, IN], 1), random(&[OUT], 2), random(&[N, IN], 3), random(&[N, OUT], 4));
    let (y, dx, dw, db) = unsplit(&w, &b, &x, &dout);
    let rows = OUT / tp;
    let mut c = ColumnParallelLinear::new("c", IN, OUT, true, (rank, tp), DType::F32, &Device::Cpu).unwrap();
    c.load_full(&w, Some(&b)).unwrap();
    let mut yr = zeros(&[N, rows]);
    c.forward(&mut yr, &x).unwrap();
    assert_eq!(f32s(&yr), cols(&y, OUT, rank * rows, rows), "rank {rank}: column-parallel output slice");
    let dout_r = Tensor::from_vec(cols(&f32s(&dout), OUT, rank * rows, rows), [N, rows], &Device::Cpu).unwrap();
    let mut dxr = zeros(&[N, IN]);
    c.backward(&mut dxr, &dout_r, &x, group).unwrap();
    close(&format!("rank {rank}: column-parallel input gradient"), &f32s(&dxr), &dx);
    let (gw, gb) = (f32s(c.linear.weight.grad().unwrap()), f32s(c.linear.bias.as_ref().unwrap().grad().unwrap()));
    assert_eq!(gw, dw[rank * rows * IN..(rank + 1) * rows * IN], "rank {rank}: weight gradient rows");
    assert_eq!(gb, db[rank * rows..(rank + 1) * rows], "rank {rank}: bias gradient slice");
}

fn row_parallel(group: &dyn Collective) {
    let (rank, tp) = (group.rank(), group.size());
    let (w, b, x, dout) = (random(&[OUT, IN], 5), random(&[OUT], 6), random(&[N, IN], 7), random(&[N, OUT], 8));
    let (y, dx, dw, db) = unsplit(&w, &b, &x, &dout);
    let k = IN / tp;
    let mut r = RowParallelLinear::new("r", IN, OUT, true, (rank, tp), DType::F32, &Device::Cpu).unwrap();
    r.load_full(&w, Some(&b)).unwrap();
    let xr = Tensor::from_vec(cols(&f32s(&x), IN, rank * k, k), [N, k], &Device::Cpu).unwrap();
    let mut yr = zeros(&[N, OUT]);
    r.forward(&mut yr, &xr, group).unwrap();
    close(&format!("rank {rank}: row-parallel output"), &f32s(&yr), &y);
    let mut dxr = zeros(&[N, k]);
    r.backward(&mut dxr, &dout, &xr).unwrap();
    close(&format!("rank {rank}: row-parallel input gradient slice"), &f32s(&dxr), &cols(&dx, IN, rank * k, k));
    close(
        &format!("rank {rank}: row-parallel weight gradient"),
        &f32s(r.linear.weight.grad().unwrap()),
        &cols(&dw, IN, rank * k, k),
    );
    close(
        &format!("rank {rank}: row-parallel bias gradient"),
        &f32s(r.linear.bias.as_ref().unwrap().grad().unwrap()),
        &db,
    );
}

/// One rank's work, when started by [`layers_match_the_unsplit_ones_on_2_and_4_ranks`].
#[test]
#[ignore = "a rank of the mpirun job that layers_match_the_unsplit_ones_on_2_and_4_ranks starts"]
fn rank() {
    if std::env::var("TRAINER_TP_RANK").is_err() {
        return;
    }
    let world = World::init(CommOptions::default()).unwrap();
    let group = world.group(&Device::Cpu).unwrap();
    column_parallel(&group);
    row_parallel(&group);
    println!("rank {} of {}: tensor-parallel layers match", group.rank(), group.size());
}

fn mpi_available() -> bool {
    let ok = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("TRAINER_REQUIRE_MPI").is_ok_and(|v| v == "1") {
            panic!("mpirun was not found but TRAINER_REQUIRE_MPI=1: apt-get install openmpi-bin libopenmpi-dev");
        }
        eprintln!("skipping: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
    }
    ok
}

#[test]
fn layers_match_the_unsplit_ones_on_2_and_4_ranks() {
    if !mpi_available() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    for np in [2, 4] {
        let out = Command::new("mpirun")
            .args(["--oversubscribe", "--timeout", "120", "-np", &np.to_string(), "-x", "TRAINER_TP_RANK"])
            .arg(&exe)
            .args(["--exact", "rank", "--include-ignored", "--nocapture", "--test-threads", "1"])
            .env("TRAINER_TP_RANK", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{np} ranks:\n{stdout}\n{stderr}");
        assert_eq!(stdout.matches("tensor-parallel layers match").count(), np, "{stdout}");
    }
}
