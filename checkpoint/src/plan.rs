//! The canonical chunk plan of a state and its stripes: pure, no I/O.
//!
//! Every rank computes the same plan from the same (replicated) tensors:
//! tensors sorted by name, each split into pieces of at most `chunk_bytes`
//! (a whole number of elements). Stripes are contiguous ranges of that list,
//! balanced by bytes: chunk `i` belongs to the rank whose share of the total
//! bytes contains the chunk's midpoint. Contiguous ranges keep the imbalance
//! below one chunk whatever the tensor sizes, where `i % world_size` can put
//! every large tensor on the same rank (e.g. alternating weight/bias tensors
//! at world size 2), and they make each rank's copy a few long memcpys.

use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// One tensor's place in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// The tensor's name; the plan's tensors are sorted by it.
    pub name: String,
    /// No chunk splits one of its elements.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Bytes of the tensor.
    pub len: usize,
    /// Index of the tensor's first chunk in [`ChunkPlan::chunks`].
    pub first_chunk: usize,
    /// Chunks the tensor is split into (0 for an empty tensor).
    pub chunk_count: usize,
}

/// One piece of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Index into [`ChunkPlan::tensors`].
    pub tensor: usize,
    /// Byte offset within the tensor.
    pub offset: usize,
    /// Bytes of the piece: `chunk_bytes` rounded down to whole elements, or
    /// less for a tensor's last piece.
    pub len: usize,
    /// Byte offset within the whole state (canonical order).
    pub global_offset: u64,
}

/// The canonical list of chunks of a state.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    /// Every tensor, sorted by name.
    pub tensors: Vec<TensorLayout>,
    /// Every piece, tensor by tensor, in byte order.
    pub chunks: Vec<PlannedChunk>,
    /// Bytes of the whole state.
    pub total_bytes: u64,
    /// Largest piece, as asked (at least 8).
    pub chunk_bytes: usize,
}

impl ChunkPlan {
    /// Plans `tensors` (any order; each must be consistent, names unique).
    pub fn new(tensors: &[TensorView<'_>], chunk_bytes: usize) -> Result<Self> {
        if chunk_bytes < 8 {
            return Err(Error::invalid(format!(
                "chunk_bytes {chunk_bytes} is below 8"
            )));
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| tensors[a].name.cmp(tensors[b].name));
        for pair in order.windows(2) {
            if tensors[pair[0]].name == tensors[pair[1]].name {
                return Err(Error::invalid(format!(
                    "tensor name {} appears twice",
                    tensors[pair[0]].name
                )));
            }
        }
        let mut layouts = Vec::with_capacity(tensors.len());
        let mut chunks = Vec::new();
        let mut global = 0u64;
        for &i in &order {
            let t = &tensors[i];
            if !t.is_consistent() {
                return Err(Error::invalid(format!(
                    "tensor {} has {} bytes for {:?} {:?}",
                    t.name,
                    t.data.len(),
                    t.dtype,
                    t.shape
                )));
            }
            let element = t.dtype.size();
            // A whole number of elements per chunk, so byte grouping never
            // splits an element.
            let piece = (chunk_bytes / element).max(1) * element;
            let first_chunk = chunks.len();
            let mut offset = 0;
            while offset < t.data.len() {
                let len = piece.min(t.data.len() - offset);
                chunks.push(PlannedChunk {
                    tensor: layouts.len(),
                    offset,
                    len,
                    global_offset: global + offset as u64,
                });
                offset += len;
            }
            global += t.data.len() as u64;
            layouts.push(TensorLayout {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                len: t.data.len(),
                first_chunk,
                chunk_count: chunks.len() - first_chunk,
            });
        }
        Ok(ChunkPlan {
            tensors: layouts,
            chunks,
            total_bytes: global,
            chunk_bytes,
        })
    }

    /// The rank that stores chunk `index` at `world_size`.
    pub fn owner(&self, index: usize, world_size: usize) -> usize {
        let c = &self.chunks[index];
        let mid = c.global_offset as u128 * 2 + c.len as u128;
        let total = self.total_bytes as u128 * 2;
        ((mid * world_size as u128 / total.max(1)) as usize).min(world_size - 1)
    }

    /// The contiguous range of chunk indices `rank` stores at `world_size`.
    pub fn stripe(&self, rank: usize, world_size: usize) -> Range<usize> {
        // Owners are non-decreasing in the index, so the stripe is the range
        // between two partition points.
        let start = first_index_with_owner_at_least(self, rank, world_size);
        let end = first_index_with_owner_at_least(self, rank + 1, world_size);
        start..end
    }

    /// A digest of the layout (names, dtypes, shapes, chunk size): ranks that
    /// planned different states produce different digests, and the committer
    /// refuses to mix their parts.
    pub fn layout_digest(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.chunk_bytes as u64).to_le_bytes());
        for t in &self.tensors {
            h.update((t.name.len() as u64).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update(t.dtype.name().as_bytes());
            h.update((t.shape.len() as u64).to_le_bytes());
            for &d in &t.shape {
                h.update((d as u64).to_le_bytes());
            }
        }
        hex::encode(&h.finalize()[..16])
    }
}

fn first_index_with_owner_at_least(plan: &ChunkPlan, rank: usize, world_size: usize) -> usize {
    if rank >= world_size {
        return plan.chunks.len();
    }
    let mut lo = 0;
    let mut hi = plan.chunks.len();
    while lo < hi {
        let mid = (lo + hi) / 2;
        if plan.owner(mid, world_size) < rank {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(sizes: &[(&str, usize)], chunk: usize) -> ChunkPlan {
        let shapes: Vec<Vec<usize>> = sizes.iter().map(|&(_, n)| vec![n]).collect();
        let data: Vec<Vec<u8>> = sizes.iter().map(|&(_, n)| vec![0u8; n * 4]).collect();
        let views: Vec<TensorView<'_>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(name, _))| TensorView {
                name,
                dtype: DType::F32,
                shape: &shapes[i],
                data: &data[i],
            })
            .collect();
        ChunkPlan::new(&views, chunk).unwrap()
    }

    #[test]
    fn chunks_cover_every_tensor_in_name_order_with_whole_elements() {
        let plan = plan_of(&[("b", 10), ("a", 3), ("c", 0)], 10);
        let names: Vec<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // 10-byte chunks round down to 8 bytes (two f32).
        let lens: Vec<usize> = plan.chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, [8, 4, 8, 8, 8, 8, 8]);
        assert_eq!(plan.tensors[2].chunk_count, 0);
        assert_eq!(plan.total_bytes, 52);
    }

    #[test]
    fn stripes_partition_the_chunks_and_balance_bytes_within_one_chunk() {
        // Alternating large and small tensors: `i % w` would put every large
        // one on rank 0 at world size 2.
        let sizes: Vec<(String, usize)> = (0..40)
            .map(|i| (format!("t{i:02}"), if i % 2 == 0 { 1000 } else { 10 }))
            .collect();
        let refs: Vec<(&str, usize)> = sizes.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let plan = plan_of(&refs, 4000);
        for world in 1..=7 {
            let mut next = 0;
            let mut bytes = vec![];
            for rank in 0..world {
                let s = plan.stripe(rank, world);
                assert_eq!(s.start, next, "world {world} rank {rank}");
                next = s.end;
                for i in s.clone() {
                    assert_eq!(plan.owner(i, world), rank);
                }
                bytes.push(plan.chunks[s].iter().map(|c| c.len as u64).sum::<u64>());
            }
            assert_eq!(next, plan.chunks.len());
            let ideal = plan.total_bytes / world as u64;
            for b in bytes {
                assert!(b.abs_diff(ideal) <= 4000, "world {world}: {b} vs {ideal}");
            }
        }
    }

    #[test]
    fn duplicate_names_and_inconsistent_views_are_refused() {
        let shape = [2usize];
        let data = [0u8; 8];
        let v = TensorView {
            name: "x",
            dtype: DType::F32,
            shape: &shape,
            data: &data,
        };
        assert!(ChunkPlan::new(&[v, v], 64).is_err());
        let bad = TensorView {
            data: &data[..7],
            ..v
        };
        assert!(ChunkPlan::new(&[bad], 64).is_err());
    }
}
