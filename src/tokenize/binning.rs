//! scGPT's per-cell quantile binning (`scgpt.preprocess.binning` / `_digitize`), exactly.
//!
//! For one cell's non-zero counts `x` (as float32, as scGPT holds them):
//! `edges = np.quantile(x, np.linspace(0, 1, n_bins - 1))` with numpy's "linear" method and its
//! float64 arithmetic, `left = np.digitize(x, edges)`, `right = np.digitize(x, edges, right=True)`,
//! and where `left != right` the bin is `ceil(u * (right - left) + left)` for a uniform `u`.
//!
//! Counts are integers, so no per-cell sort is needed: a histogram of the small counts gives the
//! order statistics in one ascending walk (only counts ≥ [`SMALL`] are sorted, and cells rarely
//! have more than a few), and `left`/`right` come from a table filled once per cell and
//! gathered per gene.

/// Counts below this go through the histogram; larger ones are sorted.
pub const SMALL: usize = 4096;
/// Interleaved histogram lanes (see [`Binner::prepare`]).
const LANES: usize = 4;

/// numpy's `np.linspace(0, 1, num)`: `arange(num) * (1/(num-1))`, last element exactly 1.
pub fn numpy_linspace01(num: usize) -> Vec<f64> {
    assert!(num >= 2, "linspace needs at least 2 points");
    let step = 1.0 / (num - 1) as f64;
    let mut q: Vec<f64> = (0..num).map(|i| i as f64 * step).collect();
    q[num - 1] = 1.0;
    q
}

/// Per-cell binning state, reused across cells so the hot loop allocates nothing.
pub struct Binner {
    quantiles: Vec<f64>,
    /// Histogram of small counts, [`LANES`] counters per value; all zero between cells.
    hist: Box<[u32; SMALL * LANES]>,
    /// Counts ≥ [`SMALL`] of the current cell, sorted.
    large: Vec<u32>,
    /// How many counts of the current cell are small.
    n_small: usize,
    edges: Vec<f64>,
    /// `left | right << 16` for every small count value up to the current cell's largest.
    lut: Vec<u32>,
}

impl Binner {
    /// `n_bins` as in scGPT (51): `n_bins - 1` edges, bins `1..=n_bins-1`.
    pub fn new(n_bins: u16) -> Binner {
        assert!(n_bins >= 3, "n_bins must be at least 3");
        let n_edges = n_bins as usize - 1;
        Binner {
            quantiles: numpy_linspace01(n_edges),
            hist: vec![0; SMALL * LANES]
                .try_into()
                .expect("SMALL * LANES counters"),
            large: Vec::new(),
            n_small: 0,
            edges: Vec::with_capacity(n_edges),
            lut: vec![0; SMALL],
        }
    }

    /// The edges of the last cell prepared.
    pub fn edges(&self) -> &[f64] {
        &self.edges
    }

    /// Computes the edges for one cell's counts (all > 0) and the digit table, so that
    /// [`Binner::digits`] answers for each of them.
    pub fn prepare(&mut self, counts: &[u32]) {
        let max = counts.iter().copied().max().unwrap_or(0);
        self.prepare_with_max(counts, max);
    }

    /// [`Binner::prepare`] when the caller already knows the largest count (`max` must be it).
    pub fn prepare_with_max(&mut self, counts: &[u32], max: u32) {
        self.edges.clear();
        self.large.clear();
        if counts.is_empty() {
            return;
        }
        let max = max as usize;
        let max_small = if max < SMALL {
            // Four interleaved histograms: consecutive equal counts (most are 1 or 2) land in
            // different slots, so the increments do not wait on each other's stores.
            // Every count is below SMALL here, so `slot` is the identity on it; it only lets
            // the compiler see that the index stays inside the fixed-size table.
            let hist = &mut *self.hist;
            let slot = |v: u32, lane: usize| (v as usize % SMALL) * LANES + lane;
            let mut chunks = counts.chunks_exact(LANES);
            for chunk in &mut chunks {
                for (lane, &v) in chunk.iter().enumerate() {
                    hist[slot(v, lane)] += 1;
                }
            }
            for &v in chunks.remainder() {
                hist[slot(v, 0)] += 1;
            }
            max
        } else {
            let mut max_small = 0usize;
            for &v in counts {
                let v = v as usize;
                if v < SMALL {
                    self.hist[v * LANES] += 1;
                    max_small = max_small.max(v);
                } else {
                    self.large.push(v as u32);
                }
            }
            self.large.sort_unstable();
            max_small
        };
        self.n_small = counts.len() - self.large.len();
        self.compute_edges(counts.len(), max_small);
        self.hist[..(max_small + 1) * LANES].fill(0);
        self.fill_lut(max_small);
    }

    /// The packed digit table `left | right << 16`, indexable by any count below [`SMALL`],
    /// when the prepared cell has no larger count (else `None`: use [`Binner::digits`]).
    pub fn small_lut(&self) -> Option<&[u32; SMALL]> {
        if self.large.is_empty() {
            self.lut.as_slice().try_into().ok()
        } else {
            None
        }
    }

    /// numpy's `digitize(v, edges)` and `digitize(v, edges, right=True)` for a prepared count.
    #[inline]
    pub fn digits(&self, v: u32) -> (u16, u16) {
        if (v as usize) < SMALL {
            let packed = self.lut[v as usize];
            (packed as u16, (packed >> 16) as u16)
        } else {
            let x = v as f32 as f64;
            (
                self.edges.partition_point(|&e| e <= x) as u16,
                self.edges.partition_point(|&e| e < x) as u16,
            )
        }
    }

    /// Edges, then the left and right digit of every count, into `left` and `right`.
    pub fn digitize(&mut self, counts: &[u32], left: &mut Vec<u16>, right: &mut Vec<u16>) {
        self.prepare(counts);
        left.clear();
        right.clear();
        for &v in counts {
            let (l, r) = self.digits(v);
            left.push(l);
            right.push(r);
        }
    }

    /// The same binning for arbitrary positive float values (normalised, log1p'd, …), by a
    /// plain sort. The reference the counting path is checked against, and the path for
    /// inputs that are not integer counts.
    pub fn digitize_f32(&mut self, values: &[f32], left: &mut Vec<u16>, right: &mut Vec<u16>) {
        left.clear();
        right.clear();
        self.edges.clear();
        if values.is_empty() {
            return;
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable_by(f32::total_cmp);
        quantile_edges(
            &self.quantiles,
            sorted.len(),
            |i| sorted[i],
            &mut self.edges,
        );
        for &v in values {
            let x = v as f64;
            left.push(self.edges.partition_point(|&e| e <= x) as u16);
            right.push(self.edges.partition_point(|&e| e < x) as u16);
        }
    }

    /// The order statistics the quantiles need, read off the cumulative histogram in one
    /// ascending walk (the ranks are non-decreasing), then numpy's interpolation.
    fn compute_edges(&mut self, n: usize, max_small: usize) {
        let hist = &self.hist[..(max_small + 1) * LANES];
        let (large, n_small) = (&self.large, self.n_small);
        // The lower and the upper neighbour of each virtual index are each non-decreasing
        // sequences of ranks: one forward walker for each.
        let mut lower = RankWalker::new(hist, large, n_small);
        let mut upper = RankWalker::new(hist, large, n_small);
        let last = n - 1;
        let last_f = last as f64;
        for &q in &self.quantiles {
            let vi = last_f * q;
            let edge = if vi >= last_f {
                // The maximum, known without walking the sparse top of the histogram.
                large.last().map_or(max_small as u32, |&m| m) as f32 as f64
            } else {
                let (i, prev) = floor_nonneg(vi);
                lerp(lower.at(i) as f32, upper.at(i + 1) as f32, vi - prev)
            };
            self.edges.push(edge);
        }
    }

    /// `left | right << 16` for every value 1..=max_small. Both digits are step functions of
    /// the value that change only at the edges, so the table is filled run by run: one
    /// `fill` per distinct edge, not one merge step per value (the largest small count of a
    /// cell is often in the hundreds, its 50 edges mostly below ten).
    fn fill_lut(&mut self, max_small: usize) {
        let edges = &self.edges;
        let (mut l, mut r) = (0usize, 0usize);
        let mut v = 1usize;
        while v <= max_small {
            let x = v as f64;
            while l < edges.len() && edges[l] <= x {
                l += 1;
            }
            while r < edges.len() && edges[r] < x {
                r += 1;
            }
            // `l` next moves at the first value >= edges[l], `r` at the first > edges[r].
            let mut stop = max_small + 1;
            if l < edges.len() {
                let (floor, exact) = floor_nonneg(edges[l]);
                stop = stop.min(floor + (exact < edges[l]) as usize);
            }
            if r < edges.len() {
                stop = stop.min(floor_nonneg(edges[r]).0 + 1);
            }
            let stop = stop.max(v + 1);
            self.lut[v..stop].fill(l as u32 | (r as u32) << 16);
            v = stop;
        }
    }
}

/// Reads order statistics off a histogram for non-decreasing ranks, walking forward only.
struct RankWalker<'a> {
    hist: &'a [u32],
    large: &'a [u32],
    n_small: usize,
    /// Current value, and how many counts are `<=` it.
    v: usize,
    cum: usize,
}

impl<'a> RankWalker<'a> {
    /// `hist` holds [`LANES`] interleaved counters per value.
    fn new(hist: &'a [u32], large: &'a [u32], n_small: usize) -> Self {
        let mut w = RankWalker {
            hist,
            large,
            n_small,
            v: 0,
            cum: 0,
        };
        w.cum = w.count_of(0);
        w
    }

    fn count_of(&self, v: usize) -> usize {
        self.hist[v * LANES..(v + 1) * LANES]
            .iter()
            .map(|&c| c as usize)
            .sum()
    }

    /// The `p`-th smallest count (0-based); `p` never decreases between calls.
    fn at(&mut self, p: usize) -> u32 {
        if p >= self.n_small {
            return self.large[p - self.n_small];
        }
        while self.cum <= p {
            self.v += 1;
            self.cum += self.count_of(self.v);
        }
        self.v as u32
    }
}

/// `floor(x)` of a finite `x` in `0..2^63`, as an index and as a float: truncation, which the
/// baseline x86-64 target does in one instruction where `f64::floor` is a libm call.
#[inline]
fn floor_nonneg(x: f64) -> (usize, f64) {
    let i = x as i64;
    (i as usize, i as f64)
}

/// numpy's `_lerp(a, b, g)` on float32 `a`, `b` promoted to float64.
#[inline]
fn lerp(a: f32, b: f32, g: f64) -> f64 {
    let d = (b - a) as f64;
    if g >= 0.5 {
        b as f64 - d * (1.0 - g)
    } else {
        a as f64 + d * g
    }
}

/// `np.quantile(x, q)` with the "linear" method for the sorted float32 values `at(0..n)`, in
/// numpy's exact operation order: `vi = (n-1)*q`, `g = vi - floor(vi)`, then `_lerp(a, b, g)`
/// on float32 `a`, `b` promoted to float64 (`a + (b-a)*g`, or `b - (b-a)*(1-g)` when `g >= 0.5`).
fn quantile_edges(quantiles: &[f64], n: usize, at: impl Fn(usize) -> f32, edges: &mut Vec<f64>) {
    let last = n - 1;
    let last_f = last as f64;
    for &q in quantiles {
        let vi = last_f * q;
        let edge = if vi >= last_f {
            at(last) as f64
        } else {
            let prev = vi.floor();
            let g = vi - prev;
            let i = prev as usize;
            lerp(at(i), at(i + 1), g)
        };
        edges.push(edge);
    }
}

/// scGPT's tie rule: `ceil(u * (right - left) + left)` in float64, a value in `right+1 ..= left`.
#[inline]
pub fn tie_bin(u: f64, left: u16, right: u16) -> f64 {
    (u * (right as f64 - left as f64) + left as f64).ceil()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy() {
        let q = numpy_linspace01(50);
        assert_eq!(q[1], 0.02040816326530612);
        assert_eq!(q[48], 0.9795918367346939);
        assert_eq!(q[49], 1.0);
    }

    #[test]
    fn single_value_cell_ties_over_every_bin() {
        let mut b = Binner::new(51);
        let (mut l, mut r) = (Vec::new(), Vec::new());
        b.digitize(&[7], &mut l, &mut r);
        assert_eq!((l[0], r[0]), (50, 0));
        assert!(b.edges().iter().all(|&e| e == 7.0));
    }

    #[test]
    fn large_counts_use_the_sorted_path() {
        let mut b = Binner::new(51);
        let (mut l, mut r) = (Vec::new(), Vec::new());
        let counts = [1, 5000, 2, 100_000, 3, 5000];
        b.digitize(&counts, &mut l, &mut r);
        // The largest count sits on the last edge: left = 50, right = 49.
        assert_eq!((l[3], r[3]), (50, 49));
        assert_eq!(l[1], l[5]);
        assert!(b.edges().windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn tie_bin_spans_right_plus_one_to_left() {
        assert_eq!(tie_bin(0.0, 5, 2), 5.0);
        assert_eq!(tie_bin(0.999_999, 5, 2), 3.0);
        assert_eq!(tie_bin(0.5, 4, 4), 4.0);
    }
}
