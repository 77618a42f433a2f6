//! Exact nearest neighbours by a scan of every reference cell: one dot product per cell,
//! vectorised for the CPU's tier ([`crate::simd::Simd`]). A reference of 10^5 cells of 512
//! values is 5·10^7 multiply-adds a query.

use crate::simd::{dot, Simd};

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
}
