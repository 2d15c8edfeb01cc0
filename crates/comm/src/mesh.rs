//! The device mesh: world = tp x dp x pp, tensor parallel innermost (its
//! ranks are consecutive, so they share a host and its NVLink), then data
//! parallel, then pipeline stages outermost.
//!
//! rank = tp_index + tp * (dp_index + dp * pp_index)

use std::fmt;

use trainer_core::Device;

use crate::group::ProcessGroup;
use crate::world::World;
use crate::{Error, Result};

/// The `[parallel]` sizes as the user wrote them; the trainer's config fills
/// it. `dp: None` means "whatever the world size leaves": world / (tp x pp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshSpec {
    pub dp: Option<usize>,
    pub tp: usize,
    pub pp: usize,
}

impl Default for MeshSpec {
    fn default() -> Self {
        MeshSpec { dp: None, tp: 1, pp: 1 }
    }
}

/// The three axes of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    Tp,
    Dp,
    Pp,
}

impl Axis {
    pub const ALL: [Axis; 3] = [Axis::Tp, Axis::Dp, Axis::Pp];

    pub fn name(self) -> &'static str {
        match self {
            Axis::Tp => "tp",
            Axis::Dp => "dp",
            Axis::Pp => "pp",
        }
    }
}

/// A rank's position on each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Coords {
    pub tp: usize,
    pub dp: usize,
    pub pp: usize,
}

/// The resolved sizes: their product is the world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshShape {
    pub tp: usize,
    pub dp: usize,
    pub pp: usize,
}

impl fmt::Display for MeshShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dp={} tp={} pp={}", self.dp, self.tp, self.pp)
    }
}

impl MeshShape {
    /// Checks `spec` against the world size and infers dp. Errors name the
    /// `[parallel]` keys and their values.
    pub fn resolve(spec: &MeshSpec, world_size: usize) -> Result<MeshShape> {
        for (key, v) in [("tp", Some(spec.tp)), ("pp", Some(spec.pp)), ("dp", spec.dp)] {
            if v == Some(0) {
                return Err(Error::Config(format!("parallel.{key} = 0: must be at least 1")));
            }
        }
        let (tp, pp) = (spec.tp, spec.pp);
        let dp = match spec.dp {
            Some(dp) => {
                if dp.checked_mul(tp).and_then(|x| x.checked_mul(pp)) != Some(world_size) {
                    return Err(Error::Config(format!(
                        "parallel.dp x parallel.tp x parallel.pp = {dp} x {tp} x {pp} must equal the number of \
                         processes, {world_size} (as started by the launcher, e.g. mpirun -np {world_size}); \
                         leave parallel.dp out to infer it"
                    )));
                }
                dp
            }
            None => {
                let tp_pp = tp.saturating_mul(pp);
                if !world_size.is_multiple_of(tp_pp) {
                    return Err(Error::Config(format!(
                        "parallel.tp x parallel.pp = {tp} x {pp} = {tp_pp} does not divide the number of processes, \
                         {world_size}; parallel.dp is inferred as processes / (tp x pp), so start a multiple of \
                         {tp_pp} processes or change parallel.tp / parallel.pp"
                    )));
                }
                world_size / tp_pp
            }
        };
        Ok(MeshShape { tp, dp, pp })
    }

    pub fn world_size(&self) -> usize {
        self.tp * self.dp * self.pp
    }

    pub fn size(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }

    pub fn coords(&self, rank: usize) -> Coords {
        Coords { tp: rank % self.tp, dp: (rank / self.tp) % self.dp, pp: rank / (self.tp * self.dp) }
    }

    pub fn rank_of(&self, c: Coords) -> usize {
        c.tp + self.tp * (c.dp + self.dp * c.pp)
    }

    /// The world ranks that share every coordinate of `rank` but `axis`'s,
    /// in order along `axis`.
    pub fn group_members(&self, axis: Axis, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.size(axis))
            .map(|i| {
                let mut m = c;
                match axis {
                    Axis::Tp => m.tp = i,
                    Axis::Dp => m.dp = i,
                    Axis::Pp => m.pp = i,
                }
                self.rank_of(m)
            })
            .collect()
    }

    /// Every group of the axis, indexed by [`MeshShape::group_index`], each
    /// in order along the axis (they partition the world).
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.world_size() / self.size(axis)];
        // Ranks grow with every coordinate, so ascending ranks are in axis order.
        for r in 0..self.world_size() {
            groups[self.group_index(axis, r)].push(r);
        }
        groups
    }

    /// Which of the axis's groups `rank` is in (0 .. world / axis size).
    pub fn group_index(&self, axis: Axis, rank: usize) -> usize {
        let c = self.coords(rank);
        match axis {
            Axis::Tp => c.dp + self.dp * c.pp,
            Axis::Dp => c.tp + self.tp * c.pp,
            Axis::Pp => c.tp + self.tp * c.dp,
        }
    }
}

/// The world, this rank's place on the mesh, and its group on each axis.
/// Built once (collectively, by every rank) and passed to whoever needs a
/// group. Groups of other rank lists (the tied embedding of the first and
/// last stage) come from [`World::group_of`] and [`World::groups_of`].
#[derive(Debug)]
pub struct Mesh {
    shape: MeshShape,
    coords: Coords,
    world: ProcessGroup,
    tp: ProcessGroup,
    dp: ProcessGroup,
    pp: ProcessGroup,
}

impl Mesh {
    /// Resolves `spec` against the world and makes the groups: MPI
    /// communicators, and NCCL communicators too when `device` is a GPU. An
    /// axis of size 1 is a group of one; an axis that spans the world shares
    /// the world group's communicators.
    pub fn new(world: &World, spec: &MeshSpec, device: &Device) -> Result<Mesh> {
        let shape = MeshShape::resolve(spec, world.size())?;
        let rank = world.rank();
        let world_group = world.group(device)?;
        let axis_group = |axis: Axis| -> Result<ProcessGroup> {
            if shape.size(axis) == world.size() {
                return Ok(world_group.renamed(axis.name()));
            }
            world
                .groups_of(axis.name(), &shape.groups(axis), device)?
                .ok_or_else(|| Error::Launch(format!("rank {rank} is in no {} group of mesh {shape}", axis.name())))
        };
        let tp = axis_group(Axis::Tp)?;
        let dp = axis_group(Axis::Dp)?;
        let pp = axis_group(Axis::Pp)?;
        Ok(Mesh { shape, coords: shape.coords(rank), world: world_group, tp, dp, pp })
    }

    pub fn shape(&self) -> MeshShape {
        self.shape
    }

    pub fn coords(&self) -> Coords {
        self.coords
    }

    pub fn world(&self) -> &ProcessGroup {
        &self.world
    }

    pub fn tp(&self) -> &ProcessGroup {
        &self.tp
    }

    pub fn dp(&self) -> &ProcessGroup {
        &self.dp
    }

    pub fn pp(&self) -> &ProcessGroup {
        &self.pp
    }

    pub fn group(&self, axis: Axis) -> &ProcessGroup {
        match axis {
            Axis::Tp => &self.tp,
            Axis::Dp => &self.dp,
            Axis::Pp => &self.pp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dp: Option<usize>, tp: usize, pp: usize) -> MeshSpec {
        MeshSpec { dp, tp, pp }
    }

    #[test]
    fn infers_dp_and_validates() {
        assert_eq!(MeshShape::resolve(&MeshSpec::default(), 4).unwrap(), MeshShape { tp: 1, dp: 4, pp: 1 });
        assert_eq!(MeshShape::resolve(&spec(None, 2, 2), 8).unwrap(), MeshShape { tp: 2, dp: 2, pp: 2 });
        assert_eq!(MeshShape::resolve(&spec(Some(1), 1, 1), 1).unwrap().world_size(), 1);

        let e = MeshShape::resolve(&spec(None, 3, 1), 4).unwrap_err().to_string();
        assert!(e.contains("parallel.tp x parallel.pp = 3 x 1 = 3 does not divide") && e.contains("4"), "{e}");
        let e = MeshShape::resolve(&spec(Some(2), 2, 2), 4).unwrap_err().to_string();
        assert!(e.contains("2 x 2 x 2 must equal the number of processes, 4"), "{e}");
        let e = MeshShape::resolve(&spec(None, 0, 1), 4).unwrap_err().to_string();
        assert!(e.contains("parallel.tp = 0"), "{e}");
        let e = MeshShape::resolve(&spec(Some(0), 1, 1), 4).unwrap_err().to_string();
        assert!(e.contains("parallel.dp = 0"), "{e}");
    }

    #[test]
    fn tp_innermost_then_dp_then_pp() {
        let s = MeshShape { tp: 2, dp: 3, pp: 2 };
        for r in 0..s.world_size() {
            assert_eq!(s.rank_of(s.coords(r)), r);
        }
        assert_eq!(s.coords(7), Coords { tp: 1, dp: 0, pp: 1 });
        assert_eq!(s.group_members(Axis::Tp, 7), vec![6, 7]);
        assert_eq!(s.group_members(Axis::Dp, 7), vec![7, 9, 11]);
        assert_eq!(s.group_members(Axis::Pp, 7), vec![1, 7]);
        // Each axis's groups partition the world, and the index names the group.
        for axis in Axis::ALL {
            for r in 0..s.world_size() {
                let m = s.group_members(axis, r);
                assert!(m.contains(&r));
                for &o in &m {
                    assert_eq!(s.group_index(axis, o), s.group_index(axis, r));
                }
            }
            let groups: std::collections::HashSet<usize> = (0..12).map(|r| s.group_index(axis, r)).collect();
            assert_eq!(groups.len(), s.world_size() / s.size(axis));
            let all = s.groups(axis);
            for r in 0..s.world_size() {
                assert_eq!(all[s.group_index(axis, r)], s.group_members(axis, r));
            }
        }
    }

    #[test]
    fn single_process_mesh() {
        let world = World::single(Default::default());
        let mesh = Mesh::new(&world, &MeshSpec::default(), &Device::Cpu).unwrap();
        assert_eq!(mesh.shape(), MeshShape { tp: 1, dp: 1, pp: 1 });
        for axis in Axis::ALL {
            assert_eq!(mesh.group(axis).size(), 1);
            assert_eq!(mesh.group(axis).name(), axis.name());
        }
        let e = Mesh::new(&world, &spec(None, 2, 1), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("does not divide the number of processes, 1"), "{e}");
    }
}
