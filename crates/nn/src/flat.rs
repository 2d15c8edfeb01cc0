//! The flat layout of all parameters: one index space in which optimizer state
//! lives, gradients are all-reduced in buckets, and ZeRO shards are contiguous
//! ranges of equal size.

use std::ops::Range;

use trainer_core::ops::Span;

use crate::Param;

/// Each parameter starts at a multiple of this many elements (aligned vector
/// loads; bucket and shard edges rarely split a short parameter).
const ALIGN: usize = 16;

/// One parameter's place in the flat index space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatEntry {
    /// Position in the module's parameter order.
    pub param: usize,
    pub offset: usize,
    pub len: usize,
    pub decays: bool,
}

/// A part of one parameter inside a range of the flat space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatPiece {
    pub param: usize,
    /// First element within the parameter.
    pub param_start: usize,
    /// The same element's flat index.
    pub flat_start: usize,
    pub len: usize,
    pub decays: bool,
}

impl FlatPiece {
    /// The piece within the parameter itself (tensor number = parameter index).
    pub fn in_param(&self) -> Span {
        Span { tensor: self.param, start: self.param_start, len: self.len }
    }

    /// The piece within a flat buffer, tensor number `tensor` of a list.
    pub fn in_flat(&self, tensor: usize) -> Span {
        Span { tensor, start: self.flat_start, len: self.len }
    }
}

/// Parameters that decay come first, then the rest (PyTorch's two parameter
/// groups), each in module order; the total is padded so it splits into
/// `shards` equal ranges. Padding elements belong to no parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    pub entries: Vec<FlatEntry>,
    /// Padded length of the flat space.
    pub len: usize,
    pub shards: usize,
}

impl FlatLayout {
    pub fn new(params: &[&Param], shards: usize) -> Self {
        let shards = shards.max(1);
        let mut entries = Vec::with_capacity(params.len());
        let mut offset = 0;
        for decays in [true, false] {
            for (i, p) in params.iter().enumerate().filter(|(_, p)| p.decays() == decays) {
                entries.push(FlatEntry { param: i, offset, len: p.value.numel(), decays });
                offset = (offset + p.value.numel()).next_multiple_of(ALIGN);
            }
        }
        FlatLayout { entries, len: offset.next_multiple_of(ALIGN * shards), shards }
    }

    /// The range of flat indices that shard `rank` owns.
    pub fn shard(&self, rank: usize) -> Range<usize> {
        let size = self.len / self.shards;
        rank * size..(rank + 1) * size
    }

    /// The parts of parameters inside `range`, in flat order.
    pub fn pieces(&self, range: Range<usize>) -> Vec<FlatPiece> {
        self.entries
            .iter()
            .filter_map(|e| {
                let start = e.offset.max(range.start);
                let end = (e.offset + e.len).min(range.end);
                (start < end).then(|| FlatPiece {
                    param: e.param,
                    param_start: start - e.offset,
                    flat_start: start,
                    len: end - start,
                    decays: e.decays,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use trainer_core::{DType, Device};

    use super::*;

    fn params() -> Vec<Param> {
        let p = |name: &str, dims: &[usize]| Param::zeros(name, dims, DType::F32, &Device::Cpu).unwrap();
        vec![p("bias", &[5]), p("weight", &[3, 7]), p("gain", &[40]), p("emb", &[2, 9])]
    }

    #[test]
    fn decaying_parameters_come_first_aligned() {
        let ps = params();
        let refs: Vec<&Param> = ps.iter().collect();
        let layout = FlatLayout::new(&refs, 1);
        let order: Vec<(usize, usize)> = layout.entries.iter().map(|e| (e.param, e.offset)).collect();
        assert_eq!(order, vec![(1, 0), (3, 32), (0, 64), (2, 80)]);
        assert_eq!(layout.len, 128);
    }

    #[test]
    fn shards_cover_every_element_once() {
        let ps = params();
        let refs: Vec<&Param> = ps.iter().collect();
        for shards in 1..=5 {
            let layout = FlatLayout::new(&refs, shards);
            assert_eq!(layout.len % shards, 0);
            let mut seen: Vec<Vec<bool>> = ps.iter().map(|p| vec![false; p.value.numel()]).collect();
            for rank in 0..shards {
                for piece in layout.pieces(layout.shard(rank)) {
                    for s in &mut seen[piece.param][piece.param_start..piece.param_start + piece.len] {
                        assert!(!*s, "element covered twice");
                        *s = true;
                    }
                }
            }
            assert!(seen.iter().flatten().all(|&s| s), "{shards} shards miss an element");
        }
    }
}
