//! Exact nearest neighbours by a scan of every reference cell: one dot product per cell,
//! vectorised for the CPU's tier ([`crate::simd::Simd`]). A reference of 10^5 cells of 512
//! values is 5·10^7 multiply-adds a query, and 200 MB: far more than the caches, so one
//! query at a time would wait on memory. [`scan_many`] scores many queries against each
//! cache-sized block of the reference, four at a time per row it loads.

#[cfg(target_arch = "x86_64")]
use crate::simd::dot4_avx2;
use crate::simd::{dot, dot4, Simd};

/// Bytes of reference rows per block of [`scan_many`]: a block stays in the core's L2 cache
/// while every query is scored against it.
const BLOCK_BYTES: usize = 128 * 1024;

/// The `k` nearest cells seen so far: (distance `1 − cos`, cell), nearest first.
#[derive(Debug, Clone)]
pub struct Neighbours {
    k: usize,
    best: Vec<(f64, u32)>,
}

impl Neighbours {
    pub fn new(k: usize) -> Neighbours {
        Neighbours {
            k,
            best: Vec::with_capacity(k + 1),
        }
    }

    fn clear(&mut self) {
        self.best.clear();
    }

    /// Keeps `cell` if it is among the `k` nearest so far.
    fn offer(&mut self, distance: f64, cell: u32) {
        if self.best.len() == self.k && self.best.last().is_some_and(|w| w.0 <= distance) {
            return;
        }
        let at = self.best.partition_point(|b| b.0 <= distance);
        self.best.insert(at, (distance, cell));
        self.best.truncate(self.k);
    }

    /// Nearest first.
    pub fn sorted(&self) -> &[(f64, u32)] {
        &self.best
    }

    pub fn len(&self) -> usize {
        self.best.len()
    }

    pub fn is_empty(&self) -> bool {
        self.best.is_empty()
    }

    pub fn mean_distance(&self) -> f64 {
        self.best.iter().map(|b| b.0).sum::<f64>() / self.best.len().max(1) as f64
    }
}

/// The nearest rows of `rows` (`dim` wide, normalised) to `query` (normalised) into `out`,
/// row `skip` left out.
pub fn scan(rows: &[f32], dim: usize, query: &[f32], skip: Option<usize>, out: &mut Neighbours) {
    assert_eq!(query.len(), dim);
    out.clear();
    match Simd::detect() {
        // SAFETY: the CPU runs the tier it detected.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { scan_avx512(rows, dim, query, skip, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { scan_avx2(rows, dim, query, skip, out) },
        _ => scan_any(rows, dim, query, skip, out),
    }
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_avx512(
    rows: &[f32],
    dim: usize,
    q: &[f32],
    skip: Option<usize>,
    out: &mut Neighbours,
) {
    scan_any(rows, dim, q, skip, out)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_avx2(
    rows: &[f32],
    dim: usize,
    q: &[f32],
    skip: Option<usize>,
    out: &mut Neighbours,
) {
    scan_any(rows, dim, q, skip, out)
}

#[inline(always)]
fn scan_any(rows: &[f32], dim: usize, q: &[f32], skip: Option<usize>, out: &mut Neighbours) {
    for (i, row) in rows.chunks_exact(dim).enumerate() {
        if Some(i) != skip {
            out.offer(1.0 - dot(row, q) as f64, i as u32);
        }
    }
}

/// [`scan`] for many queries at once: `queries` holds `outs.len()` normalised rows of `dim`
/// values, query `j` leaving out reference row `skips[j]` (when given). Each query's
/// neighbours are exactly what [`scan`] finds for it alone (same distances, offered in the
/// same order).
pub fn scan_many(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
) {
    assert_eq!(queries.len(), dim * outs.len());
    assert!(skips.is_none_or(|s| s.len() == outs.len()));
    outs.iter_mut().for_each(Neighbours::clear);
    if dim == 0 {
        return;
    }
    match Simd::detect() {
        // SAFETY: the CPU runs the tier it detected.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { scan_many_avx512(rows, dim, queries, skips, outs) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { scan_many_avx2(rows, dim, queries, skips, outs) },
        _ => scan_many_any(rows, dim, queries, skips, outs),
    }
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_many_avx512(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
) {
    // SAFETY: AVX-512F CPUs have AVX2 and FMA.
    scan_many_with(rows, dim, queries, skips, outs, |a, b| unsafe {
        dot4_avx2(a, b)
    })
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_many_avx2(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
) {
    // SAFETY: the caller's CPU has AVX2 and FMA.
    scan_many_with(rows, dim, queries, skips, outs, |a, b| unsafe {
        dot4_avx2(a, b)
    })
}

fn scan_many_any(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
) {
    scan_many_with(rows, dim, queries, skips, outs, dot4)
}

#[inline(always)]
fn scan_many_with(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
    dot4: impl Fn(&[f32], [&[f32]; 4]) -> [f32; 4],
) {
    let n_rows = rows.len() / dim.max(1);
    let block = (BLOCK_BYTES / (4 * dim.max(1))).max(1);
    let skip = |j: usize| skips.map(|s| s[j]);
    for start in (0..n_rows).step_by(block) {
        let end = (start + block).min(n_rows);
        let block_rows = &rows[start * dim..end * dim];
        let mut j = 0;
        while j + 4 <= outs.len() {
            let q = |t: usize| &queries[(j + t) * dim..(j + t + 1) * dim];
            let tile = [q(0), q(1), q(2), q(3)];
            for (r, row) in block_rows.chunks_exact(dim).enumerate() {
                let i = start + r;
                let dots = dot4(row, tile);
                for t in 0..4 {
                    if skip(j + t) != Some(i) {
                        outs[j + t].offer(1.0 - dots[t] as f64, i as u32);
                    }
                }
            }
            j += 4;
        }
        for j in j..outs.len() {
            let q = &queries[j * dim..(j + 1) * dim];
            for (r, row) in block_rows.chunks_exact(dim).enumerate() {
                let i = start + r;
                if skip(j) != Some(i) {
                    outs[j].offer(1.0 - dot(row, q) as f64, i as u32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_k_nearest_in_order_and_skips_one() {
        // Unit vectors at angles 0, 10, ..., 90 degrees from the query (1, 0).
        let rows: Vec<f32> = (0..10)
            .flat_map(|i| {
                let a = (i as f32 * 10.0).to_radians();
                [a.cos(), a.sin()]
            })
            .collect();
        let mut nb = Neighbours::new(3);
        scan(&rows, 2, &[1.0, 0.0], None, &mut nb);
        let cells: Vec<u32> = nb.sorted().iter().map(|b| b.1).collect();
        assert_eq!(cells, [0, 1, 2]);
        scan(&rows, 2, &[1.0, 0.0], Some(0), &mut nb);
        let cells: Vec<u32> = nb.sorted().iter().map(|b| b.1).collect();
        assert_eq!(cells, [1, 2, 3]);
        assert!((nb.sorted()[0].0 - (1.0 - 10f64.to_radians().cos())).abs() < 1e-6);
    }

    #[test]
    fn many_queries_find_what_each_finds_alone() {
        // Enough rows for several blocks at this width, queries not a multiple of four.
        let dim = 100;
        let n = 3 * BLOCK_BYTES / (4 * dim) + 17;
        let unit = |seed: usize| -> Vec<f32> {
            let mut v: Vec<f32> = (0..dim)
                .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 997.0 - 0.5)
                .collect();
            crate::reference::l2_normalize(&mut v);
            v
        };
        let rows: Vec<f32> = (0..n).flat_map(unit).collect();
        let queries: Vec<f32> = (0..11).flat_map(|j| unit(n + j)).collect();
        let skips: Vec<usize> = (0..11).map(|j| j * 97 % n).collect();
        for skip in [None, Some(&skips[..])] {
            let mut many = vec![Neighbours::new(10); 11];
            scan_many(&rows, dim, &queries, skip, &mut many);
            for (j, got) in many.iter().enumerate() {
                let mut alone = Neighbours::new(10);
                let q = &queries[j * dim..(j + 1) * dim];
                scan(&rows, dim, q, skip.map(|s| s[j]), &mut alone);
                assert_eq!(got.sorted(), alone.sorted(), "query {j}");
                assert_eq!(got.len(), 10);
            }
        }
    }
}
