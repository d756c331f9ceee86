//! Connected-component labelling of binary volumes, shared by the host's metrics and post-processing plugins.
//!
//! Volumes are flat, C-ordered `[X, Y, Z]` arrays (the layout of a contiguous `[X, Y, Z]` tensor): voxel
//! `(x, y, z)` sits at `(x * Y + y) * Z + z`. Labelling is one raster scan with a union-find over the
//! already-visited half of the neighbourhood, then one relabelling pass, so it runs in (almost) linear time.
//!
//! Labels are numbered from 1 in the order in which each component's first voxel is met in that scan, as
//! `scipy.ndimage.label` numbers them; 0 is background. ivadomed labels lesions with
//! `scipy.ndimage.label(.., structure=generate_binary_structure(3, 2))`, i.e. 18-connectivity, which is
//! therefore the default here.

/// Which neighbours of a voxel touch it in 3D.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Connectivity {
    /// Shared face only (scipy `generate_binary_structure(3, 1)`).
    Six,
    /// Shared face or edge (scipy `generate_binary_structure(3, 2)`, ivadomed's choice).
    #[default]
    Eighteen,
    /// Shared face, edge or corner (scipy `generate_binary_structure(3, 3)`).
    TwentySix,
}

impl Connectivity {
    /// Most coordinates an offset may change and still be a neighbour.
    fn max_changed_axes(self) -> usize {
        match self {
            Connectivity::Six => 1,
            Connectivity::Eighteen => 2,
            Connectivity::TwentySix => 3,
        }
    }
}

/// Which in-plane neighbours of a pixel touch it within one 2D slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceConnectivity {
    /// Shared edge only (scipy's 2D default, `generate_binary_structure(2, 1)`).
    Four,
    /// Shared edge or corner (`generate_binary_structure(2, 2)`).
    Eight,
}

/// A labelled volume: `labels[i]` is 0 for background, else the component number in `1..=count()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Components {
    pub dims: [usize; 3],
    pub labels: Vec<u32>,
    /// `sizes[k - 1]` is the number of voxels of component `k`.
    pub sizes: Vec<usize>,
}

impl Components {
    pub fn count(&self) -> usize {
        self.sizes.len()
    }

    /// Voxel count of component `label` (1-based); 0 for background or an unknown label.
    pub fn size_of(&self, label: u32) -> usize {
        match label {
            0 => 0,
            k => self.sizes.get(k as usize - 1).copied().unwrap_or(0),
        }
    }

    /// The same labelling without the components smaller than `min_voxels` (ivadomed's removal of small
    /// objects); the kept components are renumbered from 1 in their original order.
    pub fn retain_min_size(&self, min_voxels: f64) -> Components {
        let mut renumbered = vec![0u32; self.sizes.len() + 1];
        let mut sizes = Vec::new();
        for (index, &size) in self.sizes.iter().enumerate() {
            if size as f64 >= min_voxels {
                sizes.push(size);
                renumbered[index + 1] = sizes.len() as u32;
            }
        }
        Components {
            dims: self.dims,
            labels: self
                .labels
                .iter()
                .map(|&label| renumbered[label as usize])
                .collect(),
            sizes,
        }
    }
}

/// Labels the 3D connected components of `mask` (C-ordered `[X, Y, Z]`).
///
/// Panics if `mask.len()` is not `X * Y * Z`.
pub fn label(mask: &[bool], dims: [usize; 3], connectivity: Connectivity) -> Components {
    let max_changed = connectivity.max_changed_axes();
    let offsets =
        backward_offsets(|offset| offset.iter().filter(|&&d| d != 0).count() <= max_changed);
    label_with_offsets(mask, dims, &offsets)
}

/// Labels the 2D connected components of every slice of `mask` taken across `axis` (0, 1 or 2): voxels of
/// different slices are never connected. Labels are unique over the whole volume and numbered in the
/// same C-order scan as [`label`], so for `axis` 0 they run slice by slice.
///
/// Panics if `axis > 2` or `mask.len()` is not `X * Y * Z`.
pub fn label_slices(
    mask: &[bool],
    dims: [usize; 3],
    axis: usize,
    connectivity: SliceConnectivity,
) -> Components {
    assert!(axis < 3, "slice axis must be 0, 1 or 2, got {axis}");
    let max_changed = match connectivity {
        SliceConnectivity::Four => 1,
        SliceConnectivity::Eight => 2,
    };
    let offsets = backward_offsets(|offset| {
        offset[axis] == 0 && offset.iter().filter(|&&d| d != 0).count() <= max_changed
    });
    label_with_offsets(mask, dims, &offsets)
}

/// The neighbour offsets met before the centre voxel in a C-order scan (lexicographically negative),
/// restricted to those `keep` accepts. Checking only these during the scan sees every adjacency once.
fn backward_offsets(keep: impl Fn(&[isize; 3]) -> bool) -> Vec<[isize; 3]> {
    let mut offsets = Vec::new();
    for dx in -1isize..=1 {
        for dy in -1isize..=1 {
            for dz in -1isize..=1 {
                let offset = [dx, dy, dz];
                if offset < [0, 0, 0] && keep(&offset) {
                    offsets.push(offset);
                }
            }
        }
    }
    offsets
}

fn label_with_offsets(mask: &[bool], dims: [usize; 3], offsets: &[[isize; 3]]) -> Components {
    let [nx, ny, nz] = dims;
    let total = nx * ny * nz;
    assert_eq!(
        mask.len(),
        total,
        "mask has {} voxels but dims {dims:?} need {total}",
        mask.len()
    );
    assert!(
        total <= u32::MAX as usize,
        "volume too large to label ({total} voxels)"
    );
    let strides = [(ny * nz) as isize, nz as isize, 1isize];
    let steps: Vec<isize> = offsets
        .iter()
        .map(|o| o[0] * strides[0] + o[1] * strides[1] + o[2] * strides[2])
        .collect();

    // When the previous voxel of the row is foreground it has already been joined to its own backward
    // neighbours, and they are this voxel's too except the few `fresh` ones: joining to the previous voxel
    // and those covers them all. Dense masks (an untrained model's output) label about twice as fast.
    const PREVIOUS: [isize; 3] = [0, 0, -1];
    let row_continues = offsets.contains(&PREVIOUS);
    let fresh: Vec<usize> = (0..offsets.len())
        .filter(|&i| {
            let o = offsets[i];
            let from_previous = [o[0], o[1], o[2] + 1];
            o == PREVIOUS || !offsets.contains(&from_previous)
        })
        .collect();

    // Union-find over voxel indices; a root is always the smallest (first scanned) index of its set.
    let mut parent: Vec<u32> = (0..total as u32).collect();
    for x in 0..nx {
        for y in 0..ny {
            // Away from the borders every backward neighbour exists: skip the per-offset bounds checks.
            let inner_row = x > 0 && y > 0 && y + 1 < ny;
            for z in 0..nz {
                let index = (x * ny + y) * nz + z;
                if !mask[index] {
                    continue;
                }
                let interior = inner_row && z > 0 && z + 1 < nz;
                let after_foreground = row_continues && z > 0 && mask[index - 1];
                // `index` is still its own root (only later voxels link to it), and every neighbour is
                // earlier, so `root` stays the smallest index of the merged set.
                let mut root = index as u32;
                let mut join = |i: usize| {
                    let offset = offsets[i];
                    if !interior
                        && (shifted(x, offset[0], nx).is_none()
                            || shifted(y, offset[1], ny).is_none()
                            || shifted(z, offset[2], nz).is_none())
                    {
                        return;
                    }
                    let neighbour = (index as isize + steps[i]) as usize;
                    if !mask[neighbour] {
                        return;
                    }
                    let other = find(&mut parent, neighbour as u32);
                    if other < root {
                        parent[root as usize] = other;
                        root = other;
                    } else if other > root {
                        parent[other as usize] = root;
                    }
                };
                if after_foreground {
                    fresh.iter().for_each(|&i| join(i));
                } else {
                    (0..offsets.len()).for_each(join);
                }
            }
        }
    }

    // Roots are the first voxel of their component, so numbering roots in scan order numbers components
    // by first appearance. A root is always visited before the other voxels of its set.
    let mut labels = vec![0u32; total];
    let mut sizes: Vec<usize> = Vec::new();
    for index in 0..total {
        if !mask[index] {
            continue;
        }
        let root = find(&mut parent, index as u32) as usize;
        let component = if root == index {
            sizes.push(0);
            sizes.len() as u32
        } else {
            labels[root]
        };
        labels[index] = component;
        sizes[component as usize - 1] += 1;
    }
    Components {
        dims,
        labels,
        sizes,
    }
}

fn shifted(coordinate: usize, delta: isize, extent: usize) -> Option<usize> {
    let moved = coordinate.checked_add_signed(delta)?;
    (moved < extent).then_some(moved)
}

fn find(parent: &mut [u32], mut node: u32) -> u32 {
    // Path halving keeps the trees flat without recursion.
    while parent[node as usize] != node {
        let grandparent = parent[parent[node as usize] as usize];
        parent[node as usize] = grandparent;
        node = grandparent;
    }
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dims: [usize; 3], voxels: &[[usize; 3]]) -> Vec<bool> {
        let mut mask = vec![false; dims.iter().product()];
        for &[x, y, z] in voxels {
            mask[(x * dims[1] + y) * dims[2] + z] = true;
        }
        mask
    }

    /// Four isolated groups, far apart from each other:
    /// a face-touching pair, an edge-touching pair, a corner-touching pair and a single voxel.
    fn touching_pairs() -> ([usize; 3], Vec<bool>) {
        let dims = [12, 6, 6];
        let voxels = [
            [1, 1, 1],
            [1, 1, 2], // face pair: differs in one axis
            [4, 1, 1],
            [4, 2, 2], // edge pair: differs in two axes
            [7, 1, 1],
            [8, 2, 2], // corner pair: differs in all three axes
            [10, 4, 4],
        ];
        (dims, volume(dims, &voxels))
    }

    /// Labels by breadth-first flood fill from each unlabelled voxel in scan order, testing every neighbour
    /// offset directly: an independent reference for the union-find scan.
    fn flood_fill(
        mask: &[bool],
        dims: [usize; 3],
        touches: impl Fn([isize; 3]) -> bool,
    ) -> Components {
        let [nx, ny, nz] = dims;
        let mut labels = vec![0u32; mask.len()];
        let mut sizes = Vec::new();
        for start in 0..mask.len() {
            if !mask[start] || labels[start] != 0 {
                continue;
            }
            sizes.push(0);
            let label = sizes.len() as u32;
            labels[start] = label;
            let mut queue = std::collections::VecDeque::from([start]);
            while let Some(index) = queue.pop_front() {
                sizes[label as usize - 1] += 1;
                let (x, y, z) = (index / (ny * nz), index / nz % ny, index % nz);
                for dx in -1isize..=1 {
                    for dy in -1isize..=1 {
                        for dz in -1isize..=1 {
                            if [dx, dy, dz] == [0, 0, 0] || !touches([dx, dy, dz]) {
                                continue;
                            }
                            let (Some(a), Some(b), Some(c)) =
                                (shifted(x, dx, nx), shifted(y, dy, ny), shifted(z, dz, nz))
                            else {
                                continue;
                            };
                            let neighbour = (a * ny + b) * nz + c;
                            if mask[neighbour] && labels[neighbour] == 0 {
                                labels[neighbour] = label;
                                queue.push_back(neighbour);
                            }
                        }
                    }
                }
            }
        }
        Components {
            dims,
            labels,
            sizes,
        }
    }

    #[test]
    fn labelling_matches_a_flood_fill_on_random_masks_of_every_density() {
        // A xorshift generator: fixed masks without a dependency. Densities from sparse specks to the
        // near-full masks where the scan takes its shortcut along rows.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dims = [7, 9, 11];
        for density in [0.1, 0.3, 0.5, 0.7, 0.9] {
            let mask: Vec<bool> = (0..dims.iter().product::<usize>())
                .map(|_| (next() % 1000) as f64 / 1000.0 < density)
                .collect();
            for (connectivity, axes) in [
                (Connectivity::Six, 1),
                (Connectivity::Eighteen, 2),
                (Connectivity::TwentySix, 3),
            ] {
                let expected = flood_fill(&mask, dims, |o| {
                    o.iter().filter(|&&d| d != 0).count() <= axes
                });
                assert_eq!(
                    label(&mask, dims, connectivity),
                    expected,
                    "{connectivity:?} at {density}"
                );
            }
            for axis in 0..3 {
                for (connectivity, axes) in
                    [(SliceConnectivity::Four, 1), (SliceConnectivity::Eight, 2)]
                {
                    let expected = flood_fill(&mask, dims, |o| {
                        o[axis] == 0 && o.iter().filter(|&&d| d != 0).count() <= axes
                    });
                    assert_eq!(
                        label_slices(&mask, dims, axis, connectivity),
                        expected,
                        "{connectivity:?} slices across axis {axis} at {density}"
                    );
                }
            }
        }
    }

    #[test]
    fn component_counts_follow_connectivity() {
        let (dims, mask) = touching_pairs();
        // 6: only the face pair merges -> 1 + 2 + 2 + 1 = 6 components.
        let six = label(&mask, dims, Connectivity::Six);
        assert_eq!(six.count(), 6);
        assert_eq!(six.sizes, vec![2, 1, 1, 1, 1, 1]);
        // 18: face and edge pairs merge -> 1 + 1 + 2 + 1 = 5.
        let eighteen = label(&mask, dims, Connectivity::Eighteen);
        assert_eq!(eighteen.count(), 5);
        assert_eq!(eighteen.sizes, vec![2, 2, 1, 1, 1]);
        // 26: every pair merges -> 1 + 1 + 1 + 1 = 4.
        let twenty_six = label(&mask, dims, Connectivity::TwentySix);
        assert_eq!(twenty_six.count(), 4);
        assert_eq!(twenty_six.sizes, vec![2, 2, 2, 1]);
        assert_eq!(Connectivity::default(), Connectivity::Eighteen);
        // Sizes add up to the foreground count (7 voxels) whatever the connectivity.
        for components in [&six, &eighteen, &twenty_six] {
            assert_eq!(components.sizes.iter().sum::<usize>(), 7);
        }
    }

    #[test]
    fn labels_are_numbered_in_scan_order_of_first_voxel() {
        // A "U" that is only joined late in the scan: its two arms start as separate provisional sets
        // and must end up one component numbered 1, before the isolated voxel at x = 3 (label 2).
        let dims = [4, 3, 3];
        let voxels = [
            [0, 0, 0],
            [0, 0, 2],
            [1, 0, 0],
            [1, 0, 1],
            [1, 0, 2],
            [3, 2, 2],
        ];
        let mask = volume(dims, &voxels);
        let components = label(&mask, dims, Connectivity::Six);
        assert_eq!(components.count(), 2);
        assert_eq!(components.sizes, vec![5, 1]);
        let at = |x: usize, y: usize, z: usize| components.labels[(x * 3 + y) * 3 + z];
        assert_eq!(at(0, 0, 0), 1);
        assert_eq!(at(0, 0, 2), 1);
        assert_eq!(at(1, 0, 1), 1);
        assert_eq!(at(3, 2, 2), 2);
        assert_eq!(at(2, 1, 1), 0);
        assert_eq!(components.size_of(1), 5);
        assert_eq!(components.size_of(0), 0);
        assert_eq!(components.size_of(9), 0);
    }

    #[test]
    fn slice_labelling_never_crosses_slices() {
        // In slice z = 0: a diagonal pair (8-connected, not 4-connected). In slice z = 1: one voxel right
        // above a voxel of the pair, so 3D labelling would merge across slices.
        let dims = [3, 3, 2];
        let voxels = [[0, 0, 0], [1, 1, 0], [1, 1, 1]];
        let mask = volume(dims, &voxels);
        // Slices across z: slice 0 has 2 (4-conn) or 1 (8-conn) components, slice 1 has 1.
        assert_eq!(
            label_slices(&mask, dims, 2, SliceConnectivity::Four).count(),
            3
        );
        let eight = label_slices(&mask, dims, 2, SliceConnectivity::Eight);
        assert_eq!(eight.count(), 2);
        assert_eq!(eight.sizes, vec![2, 1]);
        // Slices across x: x = 0 holds one voxel, x = 1 holds (1,1,0)-(1,1,1), face-adjacent in-plane.
        let across_x = label_slices(&mask, dims, 0, SliceConnectivity::Four);
        assert_eq!(across_x.sizes, vec![1, 2]);
        // Slices across y: y = 0 holds one voxel, y = 1 holds the same face-adjacent pair.
        assert_eq!(
            label_slices(&mask, dims, 1, SliceConnectivity::Four).sizes,
            vec![1, 2]
        );
        // For reference, 3D 18-connectivity joins the pair with its neighbour above into one
        // component, and the diagonal (edge) pair too: a single component of 3.
        assert_eq!(label(&mask, dims, Connectivity::Eighteen).sizes, vec![3]);
    }

    #[test]
    fn small_components_are_dropped_and_the_rest_renumbered() {
        // 6-connectivity sizes are [2, 1, 1, 1, 1, 1]; keeping sizes >= 2 leaves only the face pair.
        let (dims, mask) = touching_pairs();
        let kept = label(&mask, dims, Connectivity::Six).retain_min_size(2.0);
        assert_eq!(kept.sizes, vec![2]);
        assert_eq!(kept.labels.iter().filter(|&&l| l == 1).count(), 2);
        assert_eq!(kept.labels.iter().filter(|&&l| l > 1).count(), 0);
        // 26-connectivity sizes are [2, 2, 2, 1]: the three pairs survive as labels 1, 2, 3.
        let kept = label(&mask, dims, Connectivity::TwentySix).retain_min_size(2.0);
        assert_eq!(kept.sizes, vec![2, 2, 2]);
        assert_eq!(kept.labels[(10 * 6 + 4) * 6 + 4], 0);
    }

    #[test]
    fn empty_and_full_volumes() {
        let dims = [3, 4, 5];
        let empty = label(&[false; 60], dims, Connectivity::TwentySix);
        assert_eq!(empty.count(), 0);
        assert!(empty.labels.iter().all(|&l| l == 0));
        let full = label(&[true; 60], dims, Connectivity::Six);
        assert_eq!(full.sizes, vec![60]);
        assert!(full.labels.iter().all(|&l| l == 1));
    }
}
