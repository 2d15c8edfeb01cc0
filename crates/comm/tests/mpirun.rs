//! Runs the comm_check program under `mpirun --oversubscribe` with 2, 3 and 4
//! ranks: the collectives (sum, avg, max, min, batched exchanges) on every
//! mesh layout and on groups of odd rank lists, a failing rank, a panicking
//! rank, timeouts of an all-reduce and an exchange, and mesh errors. Skips with a message where
//! mpirun is missing, unless TRAINER_REQUIRE_MPI=1 (CI). The NCCL variants run
//! only where at least two GPUs are visible.

use std::process::{Command, Output};
use std::sync::Mutex;

/// One job at a time: they share two cores and would only slow each other.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_comm_check");

/// Whether mpirun can be used; panics when it is required but missing.
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

/// `mpirun -np <np> comm_check <args>`, with mpirun's own time limit as the
/// guard against a hang (a hang is a failure of the test, never a wait).
fn mpirun(np: usize, args: &[&str]) -> Output {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--timeout", "300", "-np", &np.to_string()]);
    // NVLink multicast stays off on multi-GPU machines (DESIGN.md).
    for var in ["NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"] {
        cmd.env(var, if var == "NCCL_NVLS_ENABLE" { "0" } else { "1" }).args(["-x", var]);
    }
    cmd.arg(BIN).args(args);
    // Root in containers and CI; cross-memory attach is often not permitted there.
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    let out = cmd.output().expect("running mpirun");
    eprintln!(
        "mpirun -np {np} comm_check {}: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn collectives(np: usize, device: &str) {
    let out = mpirun(np, &["collectives", "--device", device]);
    let (stdout, _) = text(&out);
    assert!(out.status.success(), "collectives with {np} ranks on {device} failed");
    assert!(stdout.contains(&format!("comm_check collectives: world={np} ")), "{stdout}");
}

#[test]
fn collectives_2_ranks() {
    if mpi_available() {
        collectives(2, "cpu");
    }
}

#[test]
fn collectives_3_ranks() {
    if mpi_available() {
        collectives(3, "cpu");
    }
}

#[test]
fn collectives_4_ranks() {
    if mpi_available() {
        collectives(4, "cpu");
    }
}

#[test]
fn plain_run_is_one_process_without_mpi() {
    let out = Command::new(BIN).args(["collectives"]).output().expect("running comm_check");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("world=1 device=cpu"), "{stdout}");
}

#[test]
fn failing_rank_ends_every_rank_with_its_message() {
    if !mpi_available() {
        return;
    }
    let out = mpirun(3, &["fail", "--rank", "1"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("error: rank 1 of 3: deliberate failure on rank 1"), "{stderr}");
    // Stopped by the abort, not by their own 120 s collective timeout.
    assert!(!stderr.contains("was not stopped") && !stderr.contains("did not complete"), "{stderr}");
}

#[test]
fn panicking_rank_ends_every_rank() {
    if !mpi_available() {
        return;
    }
    let out = mpirun(2, &["fail", "--rank", "1", "--panic"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("error: rank 1 of 2: panicked at"), "{stderr}");
    assert!(stderr.contains("deliberate panic on rank 1"), "{stderr}");
    assert!(!stderr.contains("did not complete"), "{stderr}");
}

#[test]
fn collective_timeout_aborts_naming_the_operation() {
    if !mpi_available() {
        return;
    }
    for op in ["sum", "max"] {
        let out = mpirun(2, &["--timeout-ms", "1500", "timeout", "--rank", "1", "--op", op]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success());
        let said = format!(
            "error: rank 0 of 2: MPI all_reduce ({op}) of 4 f32 elements on process group 'world' (ranks 0,1) \
             did not complete within 1.5 s"
        );
        assert!(stderr.contains(&said), "{op}: {stderr}");
    }
}

#[test]
fn exchange_timeout_names_the_transfer_left() {
    if !mpi_available() {
        return;
    }
    // Rank 1 never posts its side; the others' receives from it stay open
    // (their small sends may complete into MPI's buffers).
    let out = mpirun(3, &["--timeout-ms", "1500", "timeout", "--rank", "1", "--op", "exchange"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("MPI exchange ("), "{stderr}");
    assert!(
        stderr.contains(
            "recv of 4 f32 elements from rank 1) on process group 'world' (ranks 0,1,2) did not complete within 1.5 s"
        ),
        "{stderr}"
    );
}

#[test]
fn communicator_creation_timeout_aborts() {
    if !mpi_available() {
        return;
    }
    let out = mpirun(2, &["--timeout-ms", "1500", "timeout", "--rank", "1", "--at-mesh"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "error: rank 0 of 2: creating the MPI communicator of process group 'world' did not complete within 1.5 s"
        ),
        "{stderr}"
    );
}

#[test]
fn mesh_is_validated_against_the_world() {
    if !mpi_available() {
        return;
    }
    let out = mpirun(4, &["mesh", "--tp", "3"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("parallel.tp x parallel.pp = 3 x 1 = 3 does not divide the number of processes, 4"),
        "{stderr}"
    );
    let out = mpirun(4, &["mesh", "--tp", "2"]);
    assert!(out.status.success());
    assert!(text(&out).0.contains("mesh dp=2 tp=2 pp=1"));
}

/// GPUs visible here (0 without a driver).
fn gpus() -> usize {
    let out = Command::new(BIN).arg("gpus").output().expect("running comm_check gpus");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn more_ranks_than_gpus_is_a_clear_error() {
    if !mpi_available() {
        return;
    }
    let visible = gpus();
    let n = (visible + 1).max(2);
    let out = mpirun(n, &["collectives", "--device", "cuda"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{n} ranks were started on it but it has {visible} visible GPU(s)")), "{stderr}");
}

#[test]
fn nccl_collectives() {
    let n = gpus().min(4);
    if n < 2 {
        eprintln!("skipping: NCCL checks need at least 2 GPUs, {n} visible");
        return;
    }
    if mpi_available() {
        collectives(n, "cuda");
    }
}

#[test]
fn nccl_timeout_aborts_naming_the_operation() {
    let n = gpus();
    if n < 2 {
        eprintln!("skipping: NCCL checks need at least 2 GPUs, {n} visible");
        return;
    }
    if !mpi_available() {
        return;
    }
    let out = mpirun(2, &["--timeout-ms", "3000", "timeout", "--rank", "1", "--device", "cuda"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("NCCL all_reduce (sum) of 4 f32 elements on process group 'world'"), "{stderr}");
    assert!(stderr.contains("did not complete within 3 s"), "{stderr}");

    let out = mpirun(2, &["--timeout-ms", "3000", "timeout", "--rank", "1", "--op", "exchange", "--device", "cuda"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "NCCL exchange (send of 4 f32 elements to rank 1; recv of 4 f32 elements from rank 1) on process group 'world'"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("did not complete within 3 s"), "{stderr}");
}
