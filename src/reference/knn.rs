//! Exact nearest neighbours by a scan of every reference cell, vectorised for the CPU's tier
//! ([`crate::simd::Simd`]). A reference of 10^5 cells of 512 values is 5·10^7 multiply-adds a
//! query and 200 MB: far more than the caches, so one query at a time would wait on memory.
//! [`scan_many`] scores many queries against each cache-sized block of the reference, in
//! register tiles of [`TILE_QUERIES`] queries × [`TILE_ROWS`] rows (each value loaded once
//! per tile, as a matrix product does).
//!
//! A pair's dot product is the same arithmetic whatever tile computes it (eight partial sums
//! in the order of the values, then a fixed tree), so a query's neighbours do not depend on
//! which other queries it was scanned with: [`scan`] is [`scan_many`] of one query.

use crate::simd::Simd;

/// Bytes of reference rows per block of [`scan_many`]: a block stays in the core's L2 cache
/// while every query is scored against it.
const BLOCK_BYTES: usize = 128 * 1024;
/// Queries per register tile.
const TILE_QUERIES: usize = 4;
/// Reference rows per register tile (with [`TILE_QUERIES`], 8 accumulators: AVX2's 16
/// registers hold them, the tile's queries and a row).
const TILE_ROWS: usize = 2;
/// Partial sums per dot product: one AVX register.
const W: usize = 8;

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

    /// Renames each neighbour `i` to `ids[i]` (a scan over rows gathered from `ids`).
    pub(super) fn renumber(&mut self, ids: &[u32]) {
        for b in &mut self.best {
            b.1 = ids[b.1 as usize];
        }
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
    let skips = skip.map(|s| [s]);
    scan_many(
        rows,
        dim,
        query,
        skips.as_ref().map(|s| &s[..]),
        std::slice::from_mut(out),
    );
}

/// `query`'s dot products with four `rows`, each `dim` long, as [`scan`] computes each pair
/// (a tile of one query and four rows: the query's values are loaded once for the four), on
/// `simd`, a tier the CPU runs (the caller detects it once, not per call).
pub fn dots4(simd: Simd, rows: [&[f32]; 4], query: &[f32], dim: usize) -> [f32; 4] {
    match simd {
        // SAFETY: the caller's tier runs here (AVX-512F CPUs have AVX2 and FMA).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx2 => unsafe { dots_avx2::<1, 4>(rows, [query], dim).map(|d| d[0]) },
        _ => Portable::dots::<1, 4>(rows, [query], dim).map(|d| d[0]),
    }
}

/// `query`'s dot product with `row`, as [`scan`] computes it, on `simd` (as in [`dots4`]).
pub fn dot1(simd: Simd, row: &[f32], query: &[f32], dim: usize) -> f32 {
    match simd {
        // SAFETY: as in `dots4`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx2 => unsafe { dots_avx2::<1, 1>([row], [query], dim)[0][0] },
        _ => Portable::dots::<1, 1>([row], [query], dim)[0][0],
    }
}

/// [`scan`] for many queries at once: `queries` holds `outs.len()` normalised rows of `dim`
/// values, query `j` leaving out reference row `skips[j]` (when given).
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
        // SAFETY: the CPU runs the tier it detected (AVX-512F CPUs have AVX2 and FMA).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx2 => unsafe { scan_many_avx2(rows, dim, queries, skips, outs) },
        _ => scan_many_with::<Portable>(rows, dim, queries, skips, outs),
    }
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
    scan_many_with::<Avx2>(rows, dim, queries, skips, outs)
}

/// Dot products of a tile: `rows` × `queries`, each `dim` long.
trait Dots {
    fn dots<const Q: usize, const R: usize>(
        rows: [&[f32]; R],
        queries: [&[f32]; Q],
        dim: usize,
    ) -> [[f32; Q]; R];
}

#[inline(always)]
fn scan_many_with<D: Dots>(
    rows: &[f32],
    dim: usize,
    queries: &[f32],
    skips: Option<&[usize]>,
    outs: &mut [Neighbours],
) {
    const Q: usize = TILE_QUERIES;
    const R: usize = TILE_ROWS;
    let n_rows = rows.len() / dim;
    let block = (BLOCK_BYTES / (4 * dim)).max(R);
    let row = |i: usize| &rows[i * dim..(i + 1) * dim];
    let query = |j: usize| &queries[j * dim..(j + 1) * dim];
    let n_queries = outs.len();
    // Query j's dot product with row i into its neighbours.
    let mut offer = |j: usize, i: usize, dot: f32| {
        if skips.map(|s| s[j]) != Some(i) {
            outs[j].offer(1.0 - f64::from(dot), i as u32);
        }
    };
    for start in (0..n_rows).step_by(block) {
        let end = (start + block).min(n_rows);
        let mut j = 0;
        while j < n_queries {
            let q = (n_queries - j).min(Q);
            let mut i = start;
            while i < end {
                let r = (end - i).min(R);
                if q == Q && r == R {
                    let d = D::dots(
                        [row(i), row(i + 1)],
                        [query(j), query(j + 1), query(j + 2), query(j + 3)],
                        dim,
                    );
                    for (dr, ri) in d.iter().zip(i..) {
                        for (t, dt) in dr.iter().enumerate() {
                            offer(j + t, ri, *dt);
                        }
                    }
                } else {
                    for ri in i..i + r {
                        for t in 0..q {
                            let d = D::dots([row(ri)], [query(j + t)], dim);
                            offer(j + t, ri, d[0][0]);
                        }
                    }
                }
                i += r;
            }
            j += q;
        }
    }
}

/// The pair arithmetic written so that the compiler vectorises it for the target's baseline.
struct Portable;

impl Dots for Portable {
    #[inline(always)]
    fn dots<const Q: usize, const R: usize>(
        rows: [&[f32]; R],
        queries: [&[f32]; Q],
        dim: usize,
    ) -> [[f32; Q]; R] {
        let whole = dim - dim % W;
        let mut out = [[0f32; Q]; R];
        for r in 0..R {
            for t in 0..Q {
                let (x, y) = (&rows[r][..dim], &queries[t][..dim]);
                let mut acc = [0f32; W];
                for c in (0..whole).step_by(W) {
                    for l in 0..W {
                        acc[l] += x[c + l] * y[c + l];
                    }
                }
                out[r][t] = reduce(acc) + tail(&x[whole..], &y[whole..]);
            }
        }
        out
    }
}

/// The eight partial sums in a fixed tree: lanes l + 4 onto l, then l + 2, then l + 1.
#[inline(always)]
fn reduce(a: [f32; W]) -> f32 {
    let v = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let w = [v[0] + v[2], v[1] + v[3]];
    w[0] + w[1]
}

/// The values past the last whole register, in order.
#[inline(always)]
fn tail(x: &[f32], y: &[f32]) -> f32 {
    let mut s = 0f32;
    for (a, b) in x.iter().zip(y) {
        s += a * b;
    }
    s
}

/// The pair arithmetic in AVX registers with fused multiply-adds; the same tree as
/// [`reduce`].
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Dots for Avx2 {
    #[inline(always)]
    fn dots<const Q: usize, const R: usize>(
        rows: [&[f32]; R],
        queries: [&[f32]; Q],
        dim: usize,
    ) -> [[f32; Q]; R] {
        // SAFETY: only called from scan_many_avx2, on a CPU with AVX2 and FMA.
        unsafe { dots_avx2(rows, queries, dim) }
    }
}

/// # Safety
/// The CPU has AVX2 and FMA; every slice holds at least `dim` values.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const Q: usize, const R: usize>(
    rows: [&[f32]; R],
    queries: [&[f32]; Q],
    dim: usize,
) -> [[f32; Q]; R] {
    use std::arch::x86_64::*;
    for s in rows.iter().chain(queries.iter()) {
        assert!(s.len() >= dim);
    }
    let whole = dim - dim % W;
    let mut acc = [[_mm256_setzero_ps(); Q]; R];
    let mut q = [_mm256_setzero_ps(); Q];
    let mut c = 0;
    while c < whole {
        // SAFETY: c + W <= whole <= dim, within every slice (asserted above).
        unsafe {
            for t in 0..Q {
                q[t] = _mm256_loadu_ps(queries[t].as_ptr().add(c));
            }
            for r in 0..R {
                let x = _mm256_loadu_ps(rows[r].as_ptr().add(c));
                for t in 0..Q {
                    acc[r][t] = _mm256_fmadd_ps(x, q[t], acc[r][t]);
                }
            }
        }
        c += W;
    }
    let mut out = [[0f32; Q]; R];
    // [`reduce`]'s tree: lanes l + 4 onto l (the register's halves), then l + 2, then l + 1.
    let halves = |a: __m256| _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    for r in 0..R {
        if Q == 4 {
            // Four queries' trees side by side: the same sums, four to an instruction.
            let v = [0, 1, 2, 3].map(|t| halves(acc[r][t]));
            // [v0₀ + v0₂, v0₁ + v0₃, v1₀ + v1₂, v1₁ + v1₃], and the same for v2, v3.
            let w01 = _mm_add_ps(_mm_movelh_ps(v[0], v[1]), _mm_movehl_ps(v[1], v[0]));
            let w23 = _mm_add_ps(_mm_movelh_ps(v[2], v[3]), _mm_movehl_ps(v[3], v[2]));
            let sums = _mm_add_ps(
                _mm_shuffle_ps::<0b10_00_10_00>(w01, w23),
                _mm_shuffle_ps::<0b11_01_11_01>(w01, w23),
            );
            let mut four = [0f32; 4];
            // SAFETY: `four` holds 4 floats.
            unsafe { _mm_storeu_ps(four.as_mut_ptr(), sums) };
            out[r][..4].copy_from_slice(&four);
        } else {
            for t in 0..Q {
                let v = halves(acc[r][t]);
                let w = _mm_add_ps(v, _mm_movehl_ps(v, v));
                out[r][t] = _mm_cvtss_f32(_mm_add_ss(w, _mm_movehdup_ps(w)));
            }
        }
        if whole < dim {
            for t in 0..Q {
                out[r][t] += tail(&rows[r][whole..dim], &queries[t][whole..dim]);
            }
        }
    }
    out
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

    #[test]
    fn every_tier_finds_the_exact_neighbours() {
        let dim = 133; // whole registers and a tail
        let unit = |seed: usize| -> Vec<f32> {
            let mut v: Vec<f32> = (0..dim)
                .map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 997.0 - 0.5)
                .collect();
            crate::reference::l2_normalize(&mut v);
            v
        };
        let n = 500;
        let rows: Vec<f32> = (0..n).flat_map(unit).collect();
        let queries: Vec<f32> = (0..7).flat_map(|j| unit(n + j)).collect();
        let mut tiers: Vec<(&str, Vec<Neighbours>)> = Vec::new();
        let mut portable = vec![Neighbours::new(10); 7];
        portable.iter_mut().for_each(Neighbours::clear);
        scan_many_with::<Portable>(&rows, dim, &queries, None, &mut portable);
        tiers.push(("portable", portable));
        #[cfg(target_arch = "x86_64")]
        if Simd::available().contains(&Simd::Avx2) {
            let mut avx2 = vec![Neighbours::new(10); 7];
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { scan_many_avx2(&rows, dim, &queries, None, &mut avx2) };
            tiers.push(("avx2", avx2));
        } else {
            eprintln!("avx2 tier skipped: this CPU lacks AVX2 or FMA");
        }
        for j in 0..7 {
            let q = &queries[j * dim..(j + 1) * dim];
            let mut exact: Vec<(f64, u32)> = rows
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, r)| {
                    let d: f64 = r
                        .iter()
                        .zip(q)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    (1.0 - d, i as u32)
                })
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (name, got) in &tiers {
                let got = got[j].sorted();
                assert_eq!(got.len(), 10);
                for (g, e) in got.iter().zip(&exact) {
                    assert_eq!(g.1, e.1, "{name}, query {j}");
                    assert!(
                        (g.0 - e.0).abs() < 1e-5,
                        "{name}, query {j}: {g:?} vs {e:?}"
                    );
                }
            }
        }
    }
}
