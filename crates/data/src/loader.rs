//! Micro-batches from shards: each batch is one window of B*T+1 consecutive
//! tokens, inputs the first B*T and targets the same shifted by one (llm.c's
//! scheme). Windows start at multiples of B*T within a shard.
//!
//! Order: the list of all windows is shuffled once per epoch by a generator seeded
//! from (seed, epoch), so a run is reproducible and a resumed run can recompute
//! where it was from (epoch, index) alone. With `world` data-parallel ranks, rank r
//! takes windows r, r + world, r + 2*world, ... of that order: the ranks' batches
//! are disjoint and together cover the global batch. An epoch ends when fewer
//! than `world` windows remain, so every rank always has a batch.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::{Batch, Error, Loader, Result, Shard};

/// Where a loader is in its stream: enough to resume it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderPosition {
    pub epoch: u64,
    /// Global windows consumed in this epoch (by all ranks together).
    pub index: usize,
}

#[derive(Debug)]
pub struct BatchLoader {
    shards: Vec<Shard>,
    b: usize,
    t: usize,
    /// (shard, first token) of every window.
    windows: Vec<(usize, usize)>,
    order: Vec<usize>,
    shuffle: bool,
    seed: u64,
    rank: usize,
    world: usize,
    pos: LoaderPosition,
    buf: Vec<u32>,
}

impl BatchLoader {
    /// Shards are used in the order given. `shuffle = false` reads windows in
    /// file order (validation).
    pub fn new(
        shards: Vec<Shard>,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        if b == 0 || t == 0 || world == 0 || rank >= world {
            return Err(Error::Invalid(format!("bad loader shape b={b} t={t} rank={rank} world={world}")));
        }
        let span = b * t;
        let mut windows = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            // A window needs span + 1 tokens: the last target.
            let n = s.len().saturating_sub(1) / span;
            windows.extend((0..n).map(|k| (i, k * span)));
        }
        if windows.len() < world {
            let total: usize = shards.iter().map(Shard::len).sum();
            let names: Vec<String> = shards.iter().map(|s| s.path().display().to_string()).collect();
            return Err(Error::Invalid(format!(
                "{} ({total} tokens) hold {} batches of {b} x {t} + 1 tokens, fewer than the {world} needed per step: \
                 use more data or a smaller batch or sequence length",
                names.join(", "),
                windows.len()
            )));
        }
        let mut loader = BatchLoader {
            shards,
            b,
            t,
            order: (0..windows.len()).collect(),
            windows,
            shuffle,
            seed,
            rank,
            world,
            pos: LoaderPosition { epoch: 0, index: 0 },
            buf: vec![0; span + 1],
        };
        loader.seek(loader.pos);
        Ok(loader)
    }

    /// Batches each rank gets per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.windows.len() / self.world
    }

    /// Windows (micro-batches of one rank) in the data: each epoch reads all
    /// but the last `windows() % world` of its order.
    pub fn windows(&self) -> usize {
        self.windows.len()
    }

    pub fn position(&self) -> LoaderPosition {
        self.pos
    }

    /// Jumps to a position (e.g. from a checkpoint); recomputes that epoch's order.
    pub fn seek(&mut self, pos: LoaderPosition) {
        self.pos = pos;
        self.order = (0..self.windows.len()).collect();
        if self.shuffle {
            // Seed mixes in the epoch so every epoch has its own permutation.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ pos.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            self.order.shuffle(&mut rng);
        }
    }

    /// Back to the start (validation runs the same batches every time).
    pub fn reset(&mut self) {
        self.seek(LoaderPosition { epoch: 0, index: 0 });
    }

    /// Fills inputs and targets (each B*T) with this rank's next batch.
    pub fn next_batch(&mut self, inputs: &mut [u32], targets: &mut [u32]) {
        let span = self.b * self.t;
        assert!(inputs.len() == span && targets.len() == span, "batch buffers must hold B*T tokens");
        if self.pos.index + self.world > self.windows.len() {
            self.seek(LoaderPosition { epoch: self.pos.epoch + 1, index: 0 });
        }
        let (shard, start) = self.windows[self.order[self.pos.index + self.rank]];
        self.shards[shard].read(start, &mut self.buf);
        inputs.copy_from_slice(&self.buf[..span]);
        targets.copy_from_slice(&self.buf[1..]);
        self.pos.index += self.world;
    }
}

impl Loader for BatchLoader {
    fn new_batch(&self) -> Batch {
        Batch::tokens(self.b, self.t)
    }

    fn next_batch(&mut self, batch: &mut Batch) {
        match batch {
            Batch::Tokens { inputs, targets, .. } => BatchLoader::next_batch(self, inputs, targets),
            Batch::Images { .. } => unreachable!("a token loader fills the batches it makes"),
        }
    }

    fn position(&self) -> LoaderPosition {
        self.pos
    }

    fn seek(&mut self, pos: LoaderPosition) {
        BatchLoader::seek(self, pos)
    }

    fn micro_batches(&self) -> usize {
        self.windows.len()
    }

    fn batches_per_epoch(&self) -> usize {
        BatchLoader::batches_per_epoch(self)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::write_shard;

    fn shards(dir: &std::path::Path, sizes: &[usize]) -> Vec<Shard> {
        let mut next = 0u32;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let toks: Vec<u32> = (0..n as u32).map(|k| next + k).collect();
                next += n as u32;
                let p = dir.join(format!("s{i}.bin"));
                write_shard(&p, &toks).unwrap();
                Shard::open(&p).unwrap()
            })
            .collect()
    }

    #[test]
    fn targets_are_inputs_shifted_and_order_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let (b, t) = (2, 3);
        let run = |seed| {
            let mut l = BatchLoader::new(shards(dir.path(), &[25, 13]), b, t, seed, true, 0, 1).unwrap();
            assert_eq!(l.batches_per_epoch(), 4 + 2);
            let (mut x, mut y) = (vec![0; 6], vec![0; 6]);
            (0..6)
                .map(|_| {
                    l.next_batch(&mut x, &mut y);
                    assert!(x.iter().zip(&y).all(|(a, b)| a + 1 == *b));
                    x[0]
                })
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(1), "same seed, same order");
        assert_ne!(a, run(2), "another seed, another order");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 6, 12, 18, 25, 31], "each window once per epoch");
    }

    #[test]
    fn ranks_get_disjoint_windows_and_resume_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let world = 3;
        let mut loaders: Vec<_> = (0..world)
            .map(|r| BatchLoader::new(shards(dir.path(), &[100]), 1, 4, 7, true, r, world).unwrap())
            .collect();
        let (mut x, mut y) = (vec![0; 4], vec![0; 4]);
        let mut seen = HashSet::new();
        for _ in 0..loaders[0].batches_per_epoch() {
            for l in &mut loaders {
                l.next_batch(&mut x, &mut y);
                assert!(seen.insert(x[0]), "window {} served twice", x[0]);
            }
        }
        assert_eq!(seen.len(), 24);
        // A loader moved to a saved position continues identically.
        let pos = loaders[1].position();
        let mut resumed = BatchLoader::new(shards(dir.path(), &[100]), 1, 4, 7, true, 1, world).unwrap();
        resumed.seek(pos);
        for _ in 0..10 {
            let (mut a, mut b) = (vec![0; 4], vec![0; 4]);
            loaders[1].next_batch(&mut x, &mut y);
            resumed.next_batch(&mut a, &mut b);
            assert_eq!(x, a);
        }
    }

    #[test]
    fn too_little_data_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = BatchLoader::new(shards(dir.path(), &[10]), 2, 8, 0, true, 0, 1).unwrap_err().to_string();
        assert!(e.contains("s0.bin") && e.contains("fewer than"), "{e}");
    }
}
