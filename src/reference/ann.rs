//! Approximate search for large references: an HNSW graph (`instant-distance`) over the
//! reference's rows proposes candidates, and the exact scan's arithmetic ranks them. Where
//! the graph finds a cell's true nearest neighbours, the result is the exact scan's, bit for
//! bit (same distances, same order of ties); where it misses one, the next nearest it found
//! takes its place.
//!
//! The graph is built once (`cellstream reference`, all cores) and stored with the reference
//! as `index.hnsw`: the graph and its own copy of the rows, in the graph's order (postcard),
//! then the CRC-32C of those bytes (4 bytes, little-endian).

use std::cell::RefCell;
use std::fmt;

use instant_distance::{Builder, HnswMap, Point, Search};
use serde::{Deserialize, Serialize};

use super::knn::{self, Neighbours};

/// `cellstream reference --index auto` builds a graph above this many cells: below it the
/// batched exact scan keeps pace with the graph (BENCHMARKS "Reference mapping").
pub const AUTO_ABOVE: usize = 100_000;
/// Candidates kept while building each cell's links (the crate's default).
pub const EF_CONSTRUCTION: usize = 100;
/// Candidates a query collects before the exact ranking picks its `k`.
pub const EF_SEARCH: usize = 100;

/// A row as the graph stores it; distance `1 − cos` on normalised rows.
#[derive(Clone, Serialize, Deserialize)]
struct Row(Box<[f32]>);

impl Point for Row {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot(&self.0, &other.0)
    }
}

/// `a · b` on the best vector tier this CPU has: the graph's build and search are mostly these.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dot_avx2(a, b) };
    }
    crate::simd::dot(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    crate::simd::dot(a, b)
}

/// An HNSW graph over a reference's rows; values are the rows' indices.
pub struct Index {
    map: HnswMap<Row, u32>,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("points", &self.map.values.len())
            .finish()
    }
}

/// Per-thread buffers for [`Index::nearest`]: the query as the graph takes it, the crate's
/// search state (a visited mark per point) and the gathered candidates.
struct Scratch {
    query: Row,
    search: Search,
    ids: Vec<u32>,
    rows: Vec<f32>,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch {
            query: Row(Box::default()),
            search: Search::default(),
            ids: Vec::new(),
            rows: Vec::new(),
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Index {
    /// The graph over `rows` (`dim` wide, normalised), on all cores.
    pub fn build(rows: &[f32], dim: usize) -> Index {
        let points: Vec<Row> = rows.chunks_exact(dim).map(|r| Row(r.into())).collect();
        let values: Vec<u32> = (0..points.len() as u32).collect();
        let map = Builder::default()
            .ef_construction(EF_CONSTRUCTION)
            .ef_search(EF_SEARCH)
            .seed(0)
            .build(points, values);
        Index { map }
    }

    /// `index.hnsw`'s bytes, the CRC-32C trailer included.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let mut bytes = postcard::to_stdvec(&self.map).map_err(|e| e.to_string())?;
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        Ok(bytes)
    }

    /// The graph stored by [`Index::to_bytes`], its trailer checked, and checked against the
    /// reference's `rows`: one point per row, each the row it names.
    pub fn from_bytes(bytes: &[u8], rows: &[f32], dim: usize) -> Result<Index, String> {
        let Some(body_len) = bytes.len().checked_sub(4) else {
            return Err(format!("{} bytes, too short for an index", bytes.len()));
        };
        let (body, tail) = bytes.split_at(body_len);
        let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        let crc = crc32c::crc32c(body);
        if crc != stored {
            return Err(format!(
                "CRC-32C {crc:08x}, the file's last 4 bytes say {stored:08x}: damaged (rebuild the reference)"
            ));
        }
        let map: HnswMap<Row, u32> =
            postcard::from_bytes(body).map_err(|e| format!("not an HNSW index: {e}"))?;
        let cells = rows.len() / dim;
        if map.values.len() != cells {
            return Err(format!(
                "{} points, the reference has {cells} cells",
                map.values.len()
            ));
        }
        let mut seen = vec![false; cells];
        for (pid, point) in map.iter() {
            let v = map.values[pid.into_inner() as usize] as usize;
            if v >= cells || std::mem::replace(&mut seen[v], true) {
                return Err(format!(
                    "point {} names cell {v} twice or out of range",
                    pid.into_inner()
                ));
            }
            if point.0[..] != rows[v * dim..(v + 1) * dim] {
                return Err(format!(
                    "point for cell {v} differs from embeddings.f32 (rebuild the reference)"
                ));
            }
        }
        Ok(Index { map })
    }

    /// The `k` nearest of the graph's candidates for `query` (normalised), `skip` excluded,
    /// ranked as [`knn::scan`] ranks them.
    pub fn nearest(
        &self,
        rows: &[f32],
        dim: usize,
        query: &[f32],
        skip: Option<usize>,
        out: &mut Neighbours,
    ) {
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.query.0.len() == query.len() {
                scratch.query.0.copy_from_slice(query);
            } else {
                scratch.query = Row(query.into());
            }
            scratch.ids.clear();
            scratch.ids.extend(
                self.map
                    .search(&scratch.query, &mut scratch.search)
                    .map(|item| *item.value)
                    .filter(|&c| Some(c as usize) != skip),
            );
            // Row order, so that ties fall as they do in the full scan.
            scratch.ids.sort_unstable();
            scratch.rows.clear();
            for &c in &scratch.ids {
                let c = c as usize;
                scratch
                    .rows
                    .extend_from_slice(&rows[c * dim..(c + 1) * dim]);
            }
            knn::scan(&scratch.rows, dim, query, None, out);
            out.renumber(&scratch.ids);
        })
    }
}
