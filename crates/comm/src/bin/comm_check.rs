//! Checks and measures the communication layer under a launcher; the tests in
//! crates/comm/tests and scripts/device/comm_checks.sh run it, e.g.
//!
//!   mpirun -np 4 comm_check collectives --device cpu
//!   mpirun -np 4 comm_check bench --device cuda --max-mib 1024
//!
//! Every rank checks its own results against values it computes itself; a
//! mismatch aborts the job with the check's name, the element, and both values.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use trainer_comm::{
    Axis, Collective, CommOptions, Mesh, MeshSpec, P2p, ProcessGroup, ReduceOp, World, abort_job, shard_len,
};
use trainer_core::{DType, Device, Tensor};

#[derive(Parser)]
#[command(about = "Checks and benchmarks for trainer-comm (run under mpirun)")]
struct Cli {
    /// Collective timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 120_000)]
    timeout_ms: u64,
    /// Thread blocks of each GPU group's background communicator (0: none);
    /// `bench` then measures background all-reduces.
    #[arg(long, global = true, default_value_t = 0)]
    background_ctas: u32,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TimeoutOp {
    Sum,
    Max,
    Exchange,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every collective on the world, on the groups of every mesh layout and
    /// on groups of odd rank lists; a large two-way exchange.
    Collectives {
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Rank `rank` fails after a barrier (an error, or a panic); the others
    /// wait in a collective that can only end by the job being aborted.
    Fail {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        panic: bool,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Rank `rank` never joins an operation (--op; or, with --at-mesh, the
    /// creation of the mesh's communicators); the others must time out.
    Timeout {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        at_mesh: bool,
        /// What the others wait in: an all-reduce (sum or max) of 4 f32
        /// elements, or an exchange (send 4 f32 elements to `rank` and
        /// receive 4 from it).
        #[arg(long, value_enum, default_value = "sum")]
        op: TimeoutOp,
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceKind,
    },
    /// Builds a mesh from --dp/--tp/--pp (errors end the job like the trainer's).
    Mesh {
        #[arg(long)]
        dp: Option<usize>,
        #[arg(long, default_value_t = 1)]
        tp: usize,
        #[arg(long, default_value_t = 1)]
        pp: usize,
    },
    /// All-reduce bus bandwidth over the world group.
    Bench {
        #[arg(long, value_enum, default_value = "cuda")]
        device: DeviceKind,
        /// Largest message in MiB (sizes go up by 4x from 1 MiB).
        #[arg(long, default_value_t = 1024)]
        max_mib: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Prints how many GPUs this process can see.
    Gpus,
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Gpus = cli.cmd {
        println!("{}", visible_gpus());
        return;
    }
    let options = CommOptions { timeout: Duration::from_millis(cli.timeout_ms), background_ctas: cli.background_ctas };
    let world = match World::init(options) {
        Ok(w) => w,
        Err(e) => abort_job(&format!("{e:#}")),
    };
    if let Err(e) = run(&world, cli.cmd) {
        abort_job(&format!("{e:#}"));
    }
}

fn visible_gpus() -> usize {
    // SAFETY: only probes whether the driver library can be opened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

fn device(world: &World, kind: DeviceKind) -> Result<Device> {
    Ok(match kind {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => world.cuda_device()?,
    })
}

fn run(world: &World, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Collectives { device: kind } => {
            let device = device(world, kind)?;
            let mut c = Checker { device: device.clone(), checks: 0 };
            let mesh = Mesh::new(world, &MeshSpec::default(), &device)?;
            c.group(mesh.world())?;
            for (tp, pp) in factor_pairs(world.size()) {
                let mesh = Mesh::new(world, &MeshSpec { dp: None, tp, pp }, &device)?;
                let shape = mesh.shape();
                for axis in Axis::ALL {
                    let g = mesh.group(axis);
                    let expected = shape.group_members(axis, world.rank());
                    let position = expected.iter().position(|&r| r == world.rank());
                    if g.members() != expected.as_slice() || Some(g.rank()) != position {
                        bail!(
                            "mesh {shape}: {} group has members {:?}, expected {expected:?}",
                            axis.name(),
                            g.members()
                        );
                    }
                    c.group(g).with_context(|| format!("mesh {shape}, {} group", axis.name()))?;
                }
            }
            c.rank_lists(world, mesh.world())?;
            c.large_exchange(mesh.world())?;
            mesh.world().barrier()?;
            if world.rank() == 0 {
                println!(
                    "comm_check collectives: world={} device={} checks={} (per rank) ok",
                    world.size(),
                    device,
                    c.checks
                );
            }
            Ok(())
        }
        Cmd::Fail { rank, panic, device: kind } => {
            let device = device(world, kind)?;
            let mesh = Mesh::new(world, &MeshSpec::default(), &device)?;
            mesh.world().barrier()?;
            if world.rank() == rank {
                if panic {
                    panic!("deliberate panic on rank {rank}");
                }
                abort_job(&format!("deliberate failure on rank {rank}"));
            }
            let mut t = Tensor::zeros([4], DType::F32, &device)?;
            mesh.world().all_reduce(&mut t, ReduceOp::Sum)?;
            device.synchronize()?;
            bail!("rank {} was not stopped after rank {rank} failed", world.rank())
        }
        Cmd::Timeout { rank, at_mesh, op, device: kind } => {
            let device = device(world, kind)?;
            if at_mesh && world.rank() == rank {
                std::thread::sleep(Duration::from_secs(600));
            }
            let mesh = Mesh::new(world, &MeshSpec::default(), &device)?;
            mesh.world().barrier()?;
            if world.rank() == rank {
                // Stays out of the collective; the job's abort ends it.
                std::thread::sleep(Duration::from_secs(600));
                return Ok(());
            }
            let mut t = Tensor::zeros([4], DType::F32, &device)?;
            match op {
                TimeoutOp::Sum => mesh.world().all_reduce(&mut t, ReduceOp::Sum)?,
                TimeoutOp::Max => mesh.world().all_reduce(&mut t, ReduceOp::Max)?,
                TimeoutOp::Exchange => {
                    let out = Tensor::zeros([4], DType::F32, &device)?;
                    mesh.world().exchange(&mut [P2p::send(&out, rank), P2p::recv(&mut t, rank)])?
                }
            }
            device.synchronize()?;
            bail!("rank {}: the operation completed without rank {rank}", world.rank())
        }
        Cmd::Mesh { dp, tp, pp } => {
            let mesh = Mesh::new(world, &MeshSpec { dp, tp, pp }, &Device::Cpu)?;
            if world.rank() == 0 {
                println!("mesh {}", mesh.shape());
            }
            Ok(())
        }
        Cmd::Bench { device: kind, max_mib, iters, dtype } => {
            let device = device(world, kind)?;
            let dtype = match dtype.as_str() {
                "f32" => DType::F32,
                "bf16" => DType::BF16,
                other => bail!("--dtype {other}: expected f32 or bf16"),
            };
            let mesh = Mesh::new(world, &MeshSpec::default(), &device)?;
            bench(world, mesh.world(), &device, dtype, max_mib, iters.max(1))
        }
        Cmd::Gpus => Ok(()),
    }
}

/// (tp, pp) of every mesh of `n` ranks (dp inferred).
fn factor_pairs(n: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for tp in 1..=n {
        for pp in 1..=n {
            if n.is_multiple_of(tp * pp) {
                v.push((tp, pp));
            }
        }
    }
    v
}

/// The value world rank `r` contributes at element `i`: small integers, so
/// sums over a few ranks are exact even in bf16.
fn value(r: usize, i: usize) -> f64 {
    ((r * 7 + i * 3) % 11) as f64 - 5.0
}

/// A hash of the tensor's values (FNV-1a over their f64 bits).
fn fingerprint(t: &Tensor) -> Result<u64> {
    Ok(t.to_vec_f64()?.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ v.to_bits()).wrapping_mul(0x100_0000_01b3)))
}

struct Checker {
    device: Device,
    checks: usize,
}

impl Checker {
    fn dtypes(&self) -> Vec<DType> {
        match self.device {
            Device::Cpu => vec![DType::F32, DType::F64, DType::BF16, DType::F16],
            Device::Cuda(_) => vec![DType::F32, DType::BF16],
        }
    }

    fn tensor(&self, vals: &[f64], dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_vec(vals.to_vec(), [vals.len()], &Device::Cpu)?.to_dtype(dtype)?;
        Ok(t.to_device(&self.device)?)
    }

    /// Compares element by element; sums of small integers must be exact, an
    /// average may be off by the rounding of its dtype.
    fn expect(&mut self, what: &str, t: &Tensor, want: &[Option<f64>], exact: bool) -> Result<()> {
        let got = t.to_vec_f64()?;
        let tol = match t.dtype() {
            DType::BF16 | DType::F16 => 1e-2,
            DType::F32 => 1e-6,
            _ => 1e-12,
        };
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let Some(w) = w else { continue };
            let ok = if exact { g == w } else { (g - w).abs() <= tol * w.abs().max(1.0) };
            if !ok {
                bail!("check '{what}' ({}) failed at element {i} of {}: got {g}, expected {w}", t.dtype(), got.len());
            }
        }
        self.checks += 1;
        Ok(())
    }

    fn group(&mut self, g: &ProcessGroup) -> Result<()> {
        let me = g.members()[g.rank()];
        let (size, gr) = (g.size(), g.rank());
        let members = g.members().to_vec();
        let sum = |i: usize| members.iter().map(|&r| value(r, i)).sum::<f64>();
        // Which member holds the extreme differs from element to element.
        let max = |i: usize| members.iter().map(|&r| value(r, i)).fold(f64::NEG_INFINITY, f64::max);
        let min = |i: usize| members.iter().map(|&r| value(r, i)).fold(f64::INFINITY, f64::min);
        for dtype in self.dtypes() {
            for n in [0usize, 1, 5, 1000, 4099] {
                let mine: Vec<f64> = (0..n).map(|i| value(me, i)).collect();
                // all-reduce, whole tensor
                let mut t = self.tensor(&mine, dtype)?;
                g.all_reduce(&mut t, ReduceOp::Sum)?;
                let want: Vec<Option<f64>> = (0..n).map(|i| Some(sum(i))).collect();
                self.expect(&format!("all_reduce sum n={n}"), &t, &want, true)?;
                let mut t = self.tensor(&mine, dtype)?;
                g.all_reduce(&mut t, ReduceOp::Avg)?;
                let avg: Vec<Option<f64>> = (0..n).map(|i| Some(sum(i) / size as f64)).collect();
                self.expect(&format!("all_reduce avg n={n}"), &t, &avg, false)?;
                // Replicas must stay bitwise identical: every rank gets the same bits.
                let bits = fingerprint(&t)?;
                let all = g.all_gather_host(&[bits])?;
                if all.iter().any(|&b| b != bits) {
                    bail!("all_reduce avg n={n} ({dtype}): ranks got different bits: {all:x?}");
                }
                for (op, f) in [(ReduceOp::Max, &max as &dyn Fn(usize) -> f64), (ReduceOp::Min, &min)] {
                    let mut t = self.tensor(&mine, dtype)?;
                    g.all_reduce(&mut t, op)?;
                    let want: Vec<Option<f64>> = (0..n).map(|i| Some(f(i))).collect();
                    self.expect(&format!("all_reduce {op} n={n}"), &t, &want, true)?;
                }

                // all-reduce of a sub-range: the rest is untouched
                let pad: Vec<f64> = (0..n + 6).map(|i| value(me, i)).collect();
                let mut t = self.tensor(&pad, dtype)?;
                g.all_reduce_range(&mut t, 3..n + 3, ReduceOp::Sum)?;
                let want: Vec<Option<f64>> =
                    (0..n + 6).map(|i| Some(if (3..n + 3).contains(&i) { sum(i) } else { value(me, i) })).collect();
                self.expect(&format!("all_reduce_range n={n}"), &t, &want, true)?;

                // broadcast from every root
                for (root, &root_world) in members.iter().enumerate() {
                    let mut t = self.tensor(&mine, dtype)?;
                    g.broadcast(&mut t, root)?;
                    let want: Vec<Option<f64>> = (0..n).map(|i| Some(value(root_world, i))).collect();
                    self.expect(&format!("broadcast from {root} n={n}"), &t, &want, true)?;
                }

                // send/recv around a ring (even ranks send first, so odd rings
                // cannot deadlock either)
                if size > 1 {
                    let (next, prev) = ((gr + 1) % size, (gr + size - 1) % size);
                    let out = self.tensor(&mine, dtype)?;
                    let mut inb = self.tensor(&vec![-99.0; n], dtype)?;
                    if gr % 2 == 0 {
                        g.send(&out, next)?;
                        g.recv(&mut inb, prev)?;
                    } else {
                        g.recv(&mut inb, prev)?;
                        g.send(&out, next)?;
                    }
                    let want: Vec<Option<f64>> = (0..n).map(|i| Some(value(members[prev], i))).collect();
                    self.expect(&format!("send/recv ring n={n}"), &inb, &want, true)?;

                    // Both ways around the ring in one batch (with blocking
                    // sends, every rank would wait in its first one), the
                    // backward way on ranges. In a group of two, next and
                    // prev are one rank: its transfers match in list order.
                    let back: Vec<f64> = (0..n + 3).map(|i| value(me, i) + 20.0).collect();
                    let back = self.tensor(&back, dtype)?;
                    let mut from_prev = self.tensor(&vec![-99.0; n], dtype)?;
                    let mut from_next = self.tensor(&vec![-99.0; n + 3], dtype)?;
                    g.exchange(&mut [
                        P2p::send(&out, next),
                        P2p::Send { tensor: &back, range: 3..n + 3, peer: prev },
                        P2p::recv(&mut from_prev, prev),
                        P2p::Recv { tensor: &mut from_next, range: 0..n, peer: next },
                    ])?;
                    self.expect(&format!("exchange forward n={n}"), &from_prev, &want, true)?;
                    let want: Vec<Option<f64>> = (0..n + 3)
                        .map(|i| Some(if i < n { value(members[next], i + 3) + 20.0 } else { -99.0 }))
                        .collect();
                    self.expect(&format!("exchange backward n={n}"), &from_next, &want, true)?;
                }
            }

            // reduce-scatter and all-gather on shards inside a larger buffer
            for per in [0usize, 1, 3, 1025] {
                let len = per * size;
                let (off, total) = (2, len + 5);
                let range = off..off + len;
                let shard = g.shard(range.clone());
                let base: Vec<f64> = (0..total).map(|i| value(me, i)).collect();

                let mut t = self.tensor(&base, dtype)?;
                g.reduce_scatter_range(&mut t, range.clone(), ReduceOp::Sum)?;
                let want: Vec<Option<f64>> = (0..total)
                    .map(|i| {
                        if shard.contains(&i) {
                            Some(sum(i))
                        } else if range.contains(&i) {
                            None
                        } else {
                            Some(value(me, i))
                        }
                    })
                    .collect();
                self.expect(&format!("reduce_scatter {per}/rank"), &t, &want, true)?;

                let mut t = self.tensor(&base, dtype)?;
                g.reduce_scatter_range(&mut t, range.clone(), ReduceOp::Max)?;
                let want: Vec<Option<f64>> = (0..total)
                    .map(|i| match (shard.contains(&i), range.contains(&i)) {
                        (true, _) => Some(max(i)),
                        (false, true) => None,
                        (false, false) => Some(value(me, i)),
                    })
                    .collect();
                self.expect(&format!("reduce_scatter max {per}/rank"), &t, &want, true)?;

                let mut gathered: Vec<f64> = vec![-99.0; total];
                for i in shard.clone() {
                    gathered[i] = value(me, i);
                }
                let mut t = self.tensor(&gathered, dtype)?;
                g.all_gather_range(&mut t, range.clone())?;
                let want: Vec<Option<f64>> =
                    (0..total)
                        .map(|i| {
                            if range.contains(&i) {
                                Some(value(members[(i - off) / per.max(1)], i))
                            } else {
                                Some(-99.0)
                            }
                        })
                        .collect();
                self.expect(&format!("all_gather {per}/rank"), &t, &want, true)?;

                // ZeRO-1's round trip: reduce-scatter (avg), then all-gather,
                // gives every rank the all-reduced average, as two overlapped
                // starts show too.
                let mut t = self.tensor(&base, dtype)?;
                let w = g.start_reduce_scatter(&mut t, range.clone(), ReduceOp::Avg)?;
                w.wait()?;
                let w = g.start_all_gather(&mut t, range.clone())?;
                g.compute_waits_for_comm()?;
                let _ = w.is_complete()?;
                drop(w);
                let want: Vec<Option<f64>> = (0..total)
                    .map(|i| Some(if range.contains(&i) { sum(i) / size as f64 } else { value(me, i) }))
                    .collect();
                self.expect(&format!("reduce_scatter+all_gather avg {per}/rank"), &t, &want, false)?;
            }

            // Two buckets of one buffer in flight at once.
            let n = 2000;
            let mut t = self.tensor(&(0..n).map(|i| value(me, i)).collect::<Vec<_>>(), dtype)?;
            let a = g.start_all_reduce(&mut t, 0..700, ReduceOp::Sum)?;
            let b = g.start_all_reduce(&mut t, 700..n, ReduceOp::Sum)?;
            a.wait()?;
            b.synchronize()?;
            let want: Vec<Option<f64>> = (0..n).map(|i| Some(sum(i))).collect();
            self.expect("two buckets in flight", &t, &want, true)?;

            // Background and main all-reduces in flight together, in order
            // (compared within rounding: an average over 3 ranks is inexact).
            let mut t = self.tensor(&(0..n).map(|i| value(me, i)).collect::<Vec<_>>(), dtype)?;
            let a = g.start_background_all_reduce(&mut t, 0..900, ReduceOp::Sum)?;
            let b = g.start_all_reduce(&mut t, 900..1500, ReduceOp::Avg)?;
            let c = g.start_background_all_reduce(&mut t, 1500..n, ReduceOp::Sum)?;
            for w in [a, b, c] {
                w.wait()?;
            }
            let want: Vec<Option<f64>> =
                (0..n).map(|i| Some(if (900..1500).contains(&i) { sum(i) / size as f64 } else { sum(i) })).collect();
            self.expect("background and main buckets in flight", &t, &want, false)?;

            // Through the interface the model crates use: max, then the sum
            // of the (now equal) maxima scattered and gathered back.
            let col: &dyn Collective = g;
            let n = 3 * size;
            let mut t = self.tensor(&(0..n).map(|i| value(me, i)).collect::<Vec<_>>(), dtype)?;
            col.all_reduce(&mut t, ReduceOp::Max)?;
            col.reduce_scatter(&mut t, ReduceOp::Sum)?;
            col.all_gather(&mut t)?;
            let want: Vec<Option<f64>> = (0..n).map(|i| Some(size as f64 * max(i))).collect();
            self.expect(&format!("Collective trait on '{}'", col.name()), &t, &want, true)?;

            // Shards that do not divide: refused on every rank, nothing sent.
            if size > 1 {
                let mut t = self.tensor(&vec![1.0; size * 2 + 1], dtype)?;
                match g.reduce_scatter(&mut t, ReduceOp::Sum) {
                    Err(e)
                        if e.to_string().contains(&format!("pad the buffer to {}", shard_len(size * 2 + 1, size))) =>
                    {
                        self.checks += 1
                    }
                    other => bail!("reduce_scatter of {} elements over {size} ranks: {other:?}", size * 2 + 1),
                }
            }
        }

        // u32 sums (token counts)
        let n = 33;
        let mine: Vec<u32> = (0..n).map(|i| (me * 100 + i) as u32).collect();
        let mut t = Tensor::from_vec(mine, [n], &Device::Cpu)?.to_device(&self.device)?;
        g.all_reduce(&mut t, ReduceOp::Sum)?;
        let want: Vec<Option<f64>> =
            (0..n).map(|i| Some(members.iter().map(|&r| (r * 100 + i) as f64).sum())).collect();
        self.expect("all_reduce u32", &t, &want, true)?;
        let mine: Vec<u32> = (0..n).map(|i| (me * 100 + i) as u32).collect();
        let mut t = Tensor::from_vec(mine, [n], &Device::Cpu)?.to_device(&self.device)?;
        g.all_reduce(&mut t, ReduceOp::Max)?;
        let top = members.iter().max().copied().unwrap_or(0);
        let want: Vec<Option<f64>> = (0..n).map(|i| Some((top * 100 + i) as f64)).collect();
        self.expect("all_reduce u32 max", &t, &want, true)?;

        // host values
        let mut h = [me as f64, 1.0];
        g.all_reduce_host(&mut h, ReduceOp::Avg)?;
        let mean = members.iter().sum::<usize>() as f64 / size as f64;
        if (h[0] - mean).abs() > 1e-12 || h[1] != 1.0 {
            bail!("all_reduce_host avg: got {h:?}, expected [{mean}, 1]");
        }
        let bottom = members.iter().min().copied().unwrap_or(0);
        let mut h = [me as f64, -(me as f64)];
        g.all_reduce_host(&mut h, ReduceOp::Max)?;
        let mut f = [me as f32 * 0.5];
        g.all_reduce_host(&mut f, ReduceOp::Min)?;
        let mut u = [me as u64];
        g.all_reduce_host(&mut u, ReduceOp::Max)?;
        if h != [top as f64, -(bottom as f64)] || f != [bottom as f32 * 0.5] || u != [top as u64] {
            bail!("all_reduce_host max/min: got {h:?} {f:?} {u:?} over ranks {members:?}");
        }
        let mut c = [me as u64 + 1];
        g.all_reduce_host(&mut c, ReduceOp::Sum)?;
        if c[0] != members.iter().map(|&r| r as u64 + 1).sum::<u64>() {
            bail!("all_reduce_host u64 sum: got {}", c[0]);
        }
        let all = g.all_gather_host(&[me as u64, 7])?;
        let want: Vec<u64> = members.iter().flat_map(|&r| [r as u64, 7]).collect();
        if all != want {
            bail!("all_gather_host: got {all:?}, expected {want:?}");
        }
        let mut b = [me as i64; 3];
        g.broadcast_host(&mut b, size - 1)?;
        if b != [members[size - 1] as i64; 3] {
            bail!("broadcast_host: got {b:?}");
        }
        g.barrier()?;
        self.checks += 5;
        Ok(())
    }
}

impl Checker {
    /// Groups of odd rank lists: their members run every check inside them,
    /// the other ranks get no group and carry on; a world all-reduce after
    /// each shows every rank still in step. A bad list fails on every rank.
    fn rank_lists(&mut self, world: &World, whole: &ProcessGroup) -> Result<()> {
        let (n, me) = (world.size(), world.rank());
        let mut lists: Vec<Vec<Vec<usize>>> = Vec::new();
        if n >= 2 {
            lists.extend([
                vec![vec![0, n - 1]],   // the first and last pipeline stage
                vec![(1..n).collect()], // all but the first
                vec![vec![n - 1, 0]],   // group order is list order
            ]);
        }
        if n >= 3 {
            lists.push(vec![vec![0, n - 1], (1..n - 1).collect()]); // two at once
        }
        for groups in &lists {
            let g = world.groups_of("odd", groups, &self.device)?;
            match (&g, groups.iter().find(|m| m.contains(&me))) {
                (Some(g), Some(m)) if g.members() == m.as_slice() && m[g.rank()] == me => {
                    self.group(g).with_context(|| format!("group of ranks {m:?}"))?
                }
                (None, None) => {}
                _ => bail!("rank {me}: groups {groups:?} gave {:?}", g.as_ref().map(ProcessGroup::members)),
            }
            let mut t = self.tensor(&[me as f64], DType::F32)?;
            whole.all_reduce(&mut t, ReduceOp::Sum)?;
            let want = [Some((0..n).sum::<usize>() as f64)];
            self.expect(&format!("world all_reduce after groups {groups:?}"), &t, &want, true)?;
        }
        match world.group_of("bad", &[0, n], &self.device) {
            Err(e) if e.to_string().contains(&format!("rank {n} in [0, {n}] is not a rank of this job")) => {
                self.checks += 1
            }
            other => bail!("group of ranks [0, {n}]: {other:?}"),
        }
        Ok(())
    }

    /// Both ways around the ring of `g` at once, 1M f32 elements (4 MiB)
    /// each way: more than MPI sends eagerly, so every send waits for its
    /// receive, which deadlocks unless they are posted together.
    fn large_exchange(&mut self, g: &ProcessGroup) -> Result<()> {
        let (size, gr, n) = (g.size(), g.rank(), 1usize << 20);
        if size < 2 {
            return Ok(());
        }
        let (next, prev) = ((gr + 1) % size, (gr + size - 1) % size);
        let members = g.members();
        // Distinct and exact in f32 (below 2^24).
        let tag = |r: usize, i: usize| (r * n + i) as f64;
        let fwd = self.tensor(&(0..n).map(|i| tag(members[gr], i)).collect::<Vec<_>>(), DType::F32)?;
        let back = self.tensor(&(0..n).map(|i| -tag(members[gr], i)).collect::<Vec<_>>(), DType::F32)?;
        let mut from_prev = Tensor::zeros([n], DType::F32, &self.device)?;
        let mut from_next = Tensor::zeros([n], DType::F32, &self.device)?;
        g.exchange(&mut [
            P2p::send(&fwd, next),
            P2p::send(&back, prev),
            P2p::recv(&mut from_prev, prev),
            P2p::recv(&mut from_next, next),
        ])?;
        let want: Vec<Option<f64>> = (0..n).map(|i| Some(tag(members[prev], i))).collect();
        self.expect("large exchange forward", &from_prev, &want, true)?;
        let want: Vec<Option<f64>> = (0..n).map(|i| Some(-tag(members[next], i))).collect();
        self.expect("large exchange backward", &from_next, &want, true)
    }
}

/// One all-reduce (sum) of the whole tensor, on the background communicator or not.
fn all_reduce(g: &ProcessGroup, t: &mut Tensor, background: bool) -> Result<()> {
    let n = t.numel();
    match background {
        true => g.start_background_all_reduce(t, 0..n, ReduceOp::Sum)?.wait()?,
        false => g.all_reduce(t, ReduceOp::Sum)?,
    }
    Ok(())
}

fn bench(world: &World, g: &ProcessGroup, device: &Device, dtype: DType, max_mib: usize, iters: usize) -> Result<()> {
    let n = g.size();
    let background = world.options().background_ctas > 0;
    if world.rank() == 0 {
        let comm = match world.options().background_ctas {
            0 => String::new(),
            c => format!(", background communicator ({c} thread blocks)"),
        };
        println!("all_reduce (sum) over {n} rank(s), {dtype}, {device}, {iters} iterations per size{comm}");
        println!("{:>12} {:>12} {:>12} {:>12}", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s");
    }
    let mut mib = 1;
    while mib <= max_mib {
        let bytes = mib << 20;
        let elems = bytes / dtype.size_in_bytes();
        let mut t = Tensor::zeros([elems], dtype, device)?;
        for _ in 0..3 {
            all_reduce(g, &mut t, background)?;
        }
        device.synchronize()?;
        g.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            all_reduce(g, &mut t, background)?;
        }
        device.synchronize()?;
        let mut secs = [start.elapsed().as_secs_f64() / iters as f64];
        // The slowest rank's time is the collective's.
        let all = g.all_gather_host(&secs)?;
        secs[0] = all.iter().cloned().fold(0.0, f64::max);
        let algbw = bytes as f64 / secs[0] / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        if world.rank() == 0 {
            println!("{bytes:>12} {:>12.1} {algbw:>12.2} {busbw:>12.2}", secs[0] * 1e6);
            if mib == 1024 {
                println!("busbw at 1 GiB ({dtype}, {n} ranks): {busbw:.1} GB/s");
            }
        }
        mib *= 4;
    }
    Ok(())
}
