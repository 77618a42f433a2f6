//! 2-D layouts of embeddings, for the daemon's map of cells (`GET /`): a reference ships the
//! coordinates of its own cells (`layout.f32`), and a query cell is placed at the
//! similarity-weighted mean of its nearest reference cells' coordinates, as reference-mapping
//! tools place query cells on a reference UMAP. Without a reference the map is the first two
//! principal components of the cells seen so far ([`Pca`]).

/// The first two principal axes of a set of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    pub mean: Vec<f32>,
    pub axes: [Vec<f32>; 2],
}

/// Power iterations per axis: plenty for the two leading axes of a few thousand rows.
const ITERATIONS: usize = 60;

impl Pca {
    /// The two leading axes of `rows` (`n × dim`, row-major), by power iteration on the
    /// centred rows. Each axis's sign follows `previous` when given (so that a map
    /// recomputed as cells arrive does not flip), else makes its largest entry positive.
    pub fn fit(rows: &[f32], dim: usize, previous: Option<&Pca>) -> Pca {
        if dim == 0 {
            return Pca {
                mean: Vec::new(),
                axes: [Vec::new(), Vec::new()],
            };
        }
        let n = rows.len() / dim;
        let mut mean = vec![0f64; dim];
        for r in rows.chunks_exact(dim) {
            for (m, &x) in mean.iter_mut().zip(r) {
                *m += f64::from(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        let centred: Vec<f64> = rows[..n * dim]
            .chunks_exact(dim)
            .flat_map(|r| r.iter().zip(&mean).map(|(&x, m)| f64::from(x) - m))
            .collect();
        let mut axes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for a in 0..2 {
            // A deterministic start that is not orthogonal to much: 1, 1/2, 1/3, ...
            let mut v: Vec<f64> = match previous {
                Some(p) if p.axes[a].len() == dim => {
                    p.axes[a].iter().map(|&x| f64::from(x)).collect()
                }
                _ => (0..dim).map(|j| 1.0 / (1 + (j + a) % dim) as f64).collect(),
            };
            for _ in 0..ITERATIONS {
                if a == 1 {
                    orthogonalise(&mut v, &axes[0]);
                }
                normalise(&mut v);
                // w = Xcᵀ (Xc v)
                let mut w = vec![0f64; dim];
                for row in centred.chunks_exact(dim) {
                    let s: f64 = row.iter().zip(&v).map(|(x, y)| x * y).sum();
                    w.iter_mut().zip(row).for_each(|(wj, x)| *wj += s * x);
                }
                if w.iter().all(|&x| x == 0.0) {
                    break; // all rows equal (or none): keep the start
                }
                v = w;
            }
            if a == 1 {
                orthogonalise(&mut v, &axes[0]);
            }
            normalise(&mut v);
            let flip = match previous {
                Some(p) if p.axes[a].len() == dim => {
                    v.iter()
                        .zip(&p.axes[a])
                        .map(|(x, &y)| x * f64::from(y))
                        .sum::<f64>()
                        < 0.0
                }
                _ => v
                    .iter()
                    .copied()
                    .max_by(|x, y| x.abs().total_cmp(&y.abs()))
                    .is_some_and(|x| x < 0.0),
            };
            if flip {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            axes[a] = v;
        }
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Pca {
            mean: f32s(&mean),
            axes: [f32s(&axes[0]), f32s(&axes[1])],
        }
    }

    /// A row's coordinates on the two axes.
    pub fn project(&self, row: &[f32]) -> [f32; 2] {
        let along = |axis: &[f32]| {
            row.iter()
                .zip(&self.mean)
                .zip(axis)
                .map(|((&x, &m), &a)| (x - m) * a)
                .sum::<f32>()
        };
        [along(&self.axes[0]), along(&self.axes[1])]
    }
}

fn normalise(v: &mut [f64]) {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

fn orthogonalise(v: &mut [f64], against: &[f64]) {
    let d: f64 = v.iter().zip(against).map(|(a, b)| a * b).sum();
    v.iter_mut().zip(against).for_each(|(a, b)| *a -= d * b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_directions_of_largest_spread_and_keeps_their_signs() {
        // Spread 3 along x, 1 along y, nothing along z; centred at (1, 1, 1).
        let mut rows = Vec::new();
        for i in 0..50 {
            let t = (i as f32 / 49.0) * 2.0 - 1.0;
            let s = ((i * 7 % 50) as f32 / 49.0) * 2.0 - 1.0;
            rows.extend([1.0 + 3.0 * t, 1.0 + s, 1.0]);
        }
        let p = Pca::fit(&rows, 3, None);
        assert!((p.axes[0][0].abs() - 1.0).abs() < 1e-3, "{p:?}");
        assert!((p.axes[1][1].abs() - 1.0).abs() < 1e-2, "{p:?}");
        assert!(p.axes[0][0] > 0.0, "largest entry made positive");
        let [x, _] = p.project(&[4.0, 1.0, 1.0]);
        assert!((x - 3.0).abs() < 1e-2);
        // Refit from a flipped previous fit: the signs follow it.
        let mut flipped = p.clone();
        flipped.axes[0].iter_mut().for_each(|x| *x = -*x);
        let q = Pca::fit(&rows, 3, Some(&flipped));
        assert!(q.axes[0][0] < 0.0);
    }
}
