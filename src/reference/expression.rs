//! Novelty in expression space, beside the embedding's: a model trained on labels places a
//! cell of an unseen type near its closest known relative (NK cells among CD8 T cells), where
//! the counts themselves still tell them apart (model card, "Unknown types").
//!
//! The space (as `models/train/novelty_probe.py`'s `expr_m`): each cell's counts scaled to
//! 10^4 in all and `ln(1 + x)`; the [`GENES`] genes of largest variance over the reference's
//! calibration cells, each standardised by the reference's mean and standard deviation; its
//! first [`COMPONENTS`] principal components. Distances are Euclidean, a cell's novelty the
//! mean distance to its [`K`] nearest reference cells over the 99th percentile of the same
//! among the reference's own cells (each leaving itself out). Distances grow as a cell gets
//! shallower, known or not, so the reference keeps its calibration cells thinned to each depth
//! of its depth cuts (a *level*), and a query is measured against the level nearest its depth.
//!
//! Files beside `reference.json` (older readers ignore them; a folder without them maps as
//! before): `expression.json` ([`ExpressionMeta`]) and `expression.f32` (little-endian f32:
//! the projection, genes × components, already divided by each gene's standard deviation; the
//! offset, components; then each level's cells × components).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{percentile, ReferenceError};
use crate::batch::CountBatch;
use crate::fsutil::write_atomic;

/// Genes of the space: the reference's most variable.
pub const GENES: usize = 2000;
/// Principal components kept.
pub const COMPONENTS: usize = 20;
/// Neighbours a distance averages over.
pub const K: usize = 10;
/// A batch holding fewer of the space's genes than this share is not measured in it (its
/// missing genes would read as zeros and every cell as novel).
pub const MIN_COVERAGE: f64 = 0.9;
/// Counts per cell after scaling (scanpy's `normalize_total(target_sum=1e4)`).
const TARGET_SUM: f64 = 1e4;
/// Added to each gene's standard deviation (a gene constant over the reference).
const SD_FLOOR: f64 = 1e-6;

const META: &str = "expression.json";
const DATA: &str = "expression.f32";
const FORMAT: &str = "cellstream-expression-space";

/// One depth level: the calibration cells thinned to `depth`, in the space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub depth: f64,
    /// The level's cells' median UMIs: a query batch is measured at the level nearest its
    /// median (in log UMIs).
    pub median_umis: f64,
    pub cells: usize,
    /// The 99th percentile of the level's cells' distances to the other cells of the level.
    pub novelty_scale: f64,
    /// `assigned` needs expression novelty at most this,
    pub novelty_cut: f64,
    /// and the embedding's novelty at most this (the pair is set together).
    pub embedding_cut: f64,
}

/// `expression.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpressionMeta {
    pub format: String,
    pub version: u32,
    pub components: usize,
    pub k: usize,
    /// The space's genes by name, in the projection's row order.
    pub genes: Vec<String>,
    /// Deepest first.
    pub levels: Vec<Level>,
}

/// A cell's log-normalised values: (gene, `ln(1 + 10^4 count / total)`), genes as
/// [`Genes`] numbers them.
pub type Profile = Vec<(u32, f32)>;

/// Gene names across the reference's inputs, numbered as first met.
#[derive(Debug, Default)]
pub struct Genes {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Genes {
    /// Each of `batch`'s genes' number.
    pub fn numbers(&mut self, batch: &CountBatch) -> Vec<u32> {
        batch
            .gene_names
            .iter()
            .map(|name| {
                *self.ids.entry(name.clone()).or_insert_with(|| {
                    self.names.push(name.clone());
                    self.names.len() as u32 - 1
                })
            })
            .collect()
    }

    /// Cell `row` of `batch` (its genes numbered by `numbers`); `None` without counts.
    pub fn profile(batch: &CountBatch, numbers: &[u32], row: usize) -> Option<Profile> {
        Some(
            log_normalised(batch, row)?
                .map(|(g, v)| (numbers[g as usize], v))
                .collect(),
        )
    }
}

/// Cell `row` of `batch` as (batch gene, `ln(1 + 10^4 count / total)`); `None` without counts.
fn log_normalised(batch: &CountBatch, row: usize) -> Option<impl Iterator<Item = (u32, f32)> + '_> {
    let cell = batch.cell(row);
    let total: u64 = cell.counts.iter().map(|&c| u64::from(c)).sum();
    let scale = TARGET_SUM / total as f64;
    (total > 0).then(|| {
        cell.genes
            .iter()
            .zip(cell.counts)
            .map(move |(&g, &c)| (g, (f64::from(c) * scale).ln_1p() as f32))
    })
}

/// The fitted projection, before its levels are measured.
#[derive(Debug, Clone)]
pub struct Projection {
    genes: Vec<String>,
    /// genes × components, each row divided by the gene's standard deviation.
    weights: Vec<f32>,
    /// Σ mean / sd × component: subtracted after the sparse sum.
    offset: Vec<f32>,
}

impl Projection {
    /// Fits the space to the reference's calibration cells (`profiles`, genes numbered by
    /// `genes`). `None` with fewer than three cells or no gene that varies.
    pub fn fit(genes: &Genes, profiles: &[&Profile]) -> Option<Projection> {
        let n = profiles.len();
        if n < 3 {
            return None;
        }
        let g_all = genes.names.len();
        let (mut sum, mut sq) = (vec![0f64; g_all], vec![0f64; g_all]);
        for p in profiles {
            for &(g, v) in p.iter() {
                sum[g as usize] += f64::from(v);
                sq[g as usize] += f64::from(v) * f64::from(v);
            }
        }
        let var = |g: usize| sq[g] / n as f64 - (sum[g] / n as f64).powi(2);
        let mut order: Vec<usize> = (0..g_all).filter(|&g| var(g) > 0.0).collect();
        // Largest variance first; equal variances in gene order (a stable sort).
        order.sort_by(|&a, &b| var(b).total_cmp(&var(a)));
        order.truncate(GENES);
        if order.is_empty() {
            return None;
        }
        let g = order.len();
        let mut column = vec![u32::MAX; g_all];
        for (j, &gene) in order.iter().enumerate() {
            column[gene] = j as u32;
        }
        let mean: Vec<f64> = order.iter().map(|&x| sum[x] / n as f64).collect();
        let sd: Vec<f64> = order.iter().map(|&x| var(x).sqrt() + SD_FLOOR).collect();
        // The standardised cells, dense: n × g.
        let mut a = vec![0f64; n * g];
        for (i, p) in profiles.iter().enumerate() {
            let row = &mut a[i * g..(i + 1) * g];
            for (j, r) in row.iter_mut().enumerate() {
                *r = -mean[j] / sd[j];
            }
            for &(gene, v) in p.iter() {
                let j = column[gene as usize];
                if j != u32::MAX {
                    let j = j as usize;
                    row[j] = (f64::from(v) - mean[j]) / sd[j];
                }
            }
        }
        let c = COMPONENTS.min(g).min(n);
        let v = top_right_singular_vectors(&a, n, g, c);
        let mut weights = vec![0f32; g * COMPONENTS];
        let mut offset = vec![0f32; COMPONENTS];
        for j in 0..g {
            for k in 0..c {
                let w = v[j * c + k];
                weights[j * COMPONENTS + k] = (w / sd[j]) as f32;
                offset[k] += (mean[j] / sd[j] * w) as f32;
            }
        }
        Some(Projection {
            genes: order.iter().map(|&x| genes.names[x].clone()).collect(),
            weights,
            offset,
        })
    }

    /// Per gene number of `genes`, its row in the projection.
    pub fn rows(&self, genes: &Genes) -> HashMap<u32, usize> {
        self.genes
            .iter()
            .enumerate()
            .filter_map(|(j, name)| Some((*genes.ids.get(name)?, j)))
            .collect()
    }

    /// A reference cell's coordinates (its profile numbered as `rows` reads them).
    pub fn project_profile(&self, rows: &HashMap<u32, usize>, profile: &Profile) -> Vec<f32> {
        self.project(
            profile
                .iter()
                .filter_map(|(g, v)| Some((*rows.get(g)?, *v))),
        )
        .to_vec()
    }

    /// Coordinates of a cell given as (row of the projection, log-normalised value).
    fn project(&self, entries: impl Iterator<Item = (usize, f32)>) -> [f32; COMPONENTS] {
        let mut out = [0f32; COMPONENTS];
        for (j, v) in entries {
            axpy(
                &mut out,
                v,
                &self.weights[j * COMPONENTS..(j + 1) * COMPONENTS],
            );
        }
        out.iter_mut().zip(&self.offset).for_each(|(o, b)| *o -= b);
        out
    }
}

fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    out.iter_mut().zip(x).for_each(|(o, x)| *o += a * x);
}

/// The space with its measured levels: what a reference carries.
#[derive(Debug, Clone)]
pub struct ExpressionSpace {
    pub meta: ExpressionMeta,
    projection: Projection,
    /// Per level, cells × [`COMPONENTS`].
    coords: Vec<Vec<f32>>,
}

/// Where a batch's genes sit in a space: per batch gene its row in the projection.
pub struct Panel {
    rows: Vec<u32>,
    /// Whether the batch holds enough of the space's genes to be measured in it.
    pub covered: bool,
}

impl ExpressionSpace {
    /// The space with `levels` (deepest first): each its cells' coordinates (cells ×
    /// [`COMPONENTS`]), depth and median UMIs. Measures each level's scale; the cuts start at
    /// infinity ([`ExpressionSpace::set_cuts`]).
    pub fn new(projection: Projection, levels: Vec<(f64, f64, Vec<f32>)>) -> ExpressionSpace {
        let (mut meta_levels, mut coords) = (Vec::new(), Vec::new());
        for (depth, median_umis, c) in levels {
            let mut spread = self_spread(&c);
            let scale = percentile(&mut spread, 0.99).max(f64::MIN_POSITIVE);
            meta_levels.push(Level {
                depth,
                median_umis,
                cells: c.len() / COMPONENTS,
                novelty_scale: scale,
                novelty_cut: f64::INFINITY,
                embedding_cut: f64::INFINITY,
            });
            coords.push(c);
        }
        ExpressionSpace {
            meta: ExpressionMeta {
                format: FORMAT.into(),
                version: 1,
                components: COMPONENTS,
                k: K,
                genes: projection.genes.clone(),
                levels: meta_levels,
            },
            projection,
            coords,
        }
    }

    /// Each of level `level`'s cells' novelty among the others of the level.
    pub fn self_novelty(&self, level: usize) -> Vec<f64> {
        let scale = self.meta.levels[level].novelty_scale;
        self_spread(&self.coords[level])
            .into_iter()
            .map(|s| s / scale)
            .collect()
    }

    pub fn set_cuts(&mut self, level: usize, embedding_cut: f64, expression_cut: f64) {
        let l = &mut self.meta.levels[level];
        l.embedding_cut = embedding_cut;
        l.novelty_cut = expression_cut;
    }

    /// Where `batch`'s genes sit in the space.
    pub fn panel(&self, gene_names: &[String]) -> Panel {
        let rows_by_name: HashMap<&str, u32> = self
            .meta
            .genes
            .iter()
            .enumerate()
            .map(|(j, g)| (g.as_str(), j as u32))
            .collect();
        let rows: Vec<u32> = gene_names
            .iter()
            .map(|g| rows_by_name.get(g.as_str()).copied().unwrap_or(u32::MAX))
            .collect();
        let mut seen = vec![false; self.meta.genes.len()];
        rows.iter()
            .filter(|&&r| r != u32::MAX)
            .for_each(|&r| seen[r as usize] = true);
        let held = seen.iter().filter(|&&s| s).count();
        Panel {
            rows,
            covered: held as f64 >= MIN_COVERAGE * self.meta.genes.len() as f64,
        }
    }

    /// The level a batch of `umis` median UMIs per cell is measured at: nearest in log UMIs
    /// (unknown: the deepest).
    pub fn level_at(&self, umis: Option<u64>) -> usize {
        let Some(u) = umis else { return 0 };
        let x = (u.max(1) as f64).ln();
        (0..self.meta.levels.len())
            .min_by(|&a, &b| {
                let da = (self.meta.levels[a].median_umis.ln() - x).abs();
                let db = (self.meta.levels[b].median_umis.ln() - x).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(0)
    }

    /// Cell `row` of `batch`'s novelty at `level`; `None` without counts.
    pub fn novelty(
        &self,
        batch: &CountBatch,
        panel: &Panel,
        row: usize,
        level: usize,
    ) -> Option<f64> {
        let q = self
            .projection
            .project(log_normalised(batch, row)?.filter_map(|(g, v)| {
                let j = panel.rows[g as usize];
                (j != u32::MAX).then_some((j as usize, v))
            }));
        let spread = mean_nearest(&self.coords[level], &q, None);
        Some(spread / self.meta.levels[level].novelty_scale)
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        write_atomic(&dir.join(DATA), |w| {
            let p = &self.projection;
            for x in p
                .weights
                .iter()
                .chain(&p.offset)
                .chain(self.coords.iter().flatten())
            {
                w.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        })?;
        write_atomic(&dir.join(META), |w| {
            serde_json::to_writer_pretty(&mut *w, &self.meta)?;
            writeln!(w)
        })
    }

    /// Removes a space's files from `dir`, if it has them.
    pub fn remove(dir: &Path) -> std::io::Result<()> {
        for name in [META, DATA] {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The space in `dir`, if the reference has one.
    pub fn load(dir: &Path) -> Result<Option<ExpressionSpace>, ReferenceError> {
        let path = dir.join(META);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(ReferenceError::Io { path, err }),
        };
        let invalid = |path: &Path, what: String| ReferenceError::Invalid {
            path: path.to_path_buf(),
            what,
        };
        let meta: ExpressionMeta = serde_json::from_str(&text)
            .map_err(|e| invalid(&path, format!("not an expression space: {e}")))?;
        let ok = meta.format == FORMAT
            && meta.version == 1
            && meta.components == COMPONENTS
            && meta.k >= 1
            && !meta.genes.is_empty()
            && !meta.levels.is_empty()
            && meta.levels.iter().all(|l| {
                l.cells > meta.k
                    && l.median_umis > 0.0
                    && l.novelty_scale > 0.0
                    && l.novelty_cut > 0.0
                    && l.embedding_cut > 0.0
            });
        if !ok {
            return Err(invalid(
                &path,
                format!(
                    "expected format {FORMAT:?} version 1 with {COMPONENTS} components, k ≥ 1, genes, and levels of more than k cells with positive UMIs, scale and cut; got format {:?} version {}, {} components, k {}, {} genes, levels {:?}",
                    meta.format, meta.version, meta.components, meta.k, meta.genes.len(), meta.levels
                ),
            ));
        }
        let dpath = dir.join(DATA);
        let g = meta.genes.len();
        let cells: usize = meta.levels.iter().map(|l| l.cells).sum();
        let want = (g * COMPONENTS + COMPONENTS + cells * COMPONENTS) * 4;
        let bytes = std::fs::read(&dpath).map_err(|err| ReferenceError::Io {
            path: dpath.clone(),
            err,
        })?;
        if bytes.len() != want {
            return Err(invalid(
                &dpath,
                format!(
                    "{} bytes, expected {want} (({g} genes + 1 + {cells} level cells) × {COMPONENTS} f32)",
                    bytes.len()
                ),
            ));
        }
        let values = super::finite_f32s(&bytes).map_err(|what| invalid(&dpath, what))?;
        let (weights, rest) = values.split_at(g * COMPONENTS);
        let (offset, mut rest) = rest.split_at(COMPONENTS);
        let mut coords = Vec::new();
        for l in &meta.levels {
            let (c, r) = rest.split_at(l.cells * COMPONENTS);
            coords.push(c.to_vec());
            rest = r;
        }
        Ok(Some(ExpressionSpace {
            projection: Projection {
                genes: meta.genes.clone(),
                weights: weights.to_vec(),
                offset: offset.to_vec(),
            },
            meta,
            coords,
        }))
    }
}

/// Mean Euclidean distance from `q` to its [`K`] nearest rows of `rows`, row `skip` left out.
fn mean_nearest(rows: &[f32], q: &[f32], skip: Option<usize>) -> f64 {
    let mut best: Vec<f32> = Vec::with_capacity(K + 1);
    for (i, r) in rows.chunks_exact(COMPONENTS).enumerate() {
        if skip == Some(i) {
            continue;
        }
        let d: f32 = r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
        if best.len() == K && best[K - 1] <= d {
            continue;
        }
        let at = best.partition_point(|&b| b <= d);
        best.insert(at, d);
        best.truncate(K);
    }
    best.iter().map(|&d| f64::from(d).sqrt()).sum::<f64>() / best.len().max(1) as f64
}

/// Each row's mean distance to its nearest other rows.
fn self_spread(rows: &[f32]) -> Vec<f64> {
    rows.chunks_exact(COMPONENTS)
        .enumerate()
        .map(|(i, q)| mean_nearest(rows, q, Some(i)))
        .collect()
}

/// The first `c` right singular vectors of `a` (`n × g`, row-major) as `g × c`, row-major:
/// a randomised range finder with power iterations (Halko, Martinsson and Tropp 2011), then
/// the small problem solved exactly. Only the subspace matters here (distances within it).
fn top_right_singular_vectors(a: &[f64], n: usize, g: usize, c: usize) -> Vec<f64> {
    let l = (c + 20).min(n).min(g);
    // Ω: g × l, uniform in [−1, 1) from a fixed seed (the fit is reproducible).
    let mut state = 0x6578_7072u64;
    let mut omega = vec![0f64; g * l];
    for x in &mut omega {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    }
    let mut y = matmul(a, n, g, &omega, l); // n × l
    orthonormalize(&mut y, n, l);
    for _ in 0..8 {
        let mut z = matmul_t(a, n, g, &y, l); // g × l
        orthonormalize(&mut z, g, l);
        y = matmul(a, n, g, &z, l);
        orthonormalize(&mut y, n, l);
    }
    // B = Yᵀ A (l × g), held as its transpose Bᵀ = Aᵀ Y (g × l).
    let bt = matmul_t(a, n, g, &y, l);
    // B Bᵀ = U Σ² Uᵀ; the right singular vectors are Bᵀ U Σ⁻¹.
    let mut bbt = vec![0f64; l * l];
    for r in 0..g {
        let row = &bt[r * l..(r + 1) * l];
        for i in 0..l {
            for j in 0..l {
                bbt[i * l + j] += row[i] * row[j];
            }
        }
    }
    let (values, vectors) = symmetric_eigen(bbt, l);
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&x, &y| values[y].total_cmp(&values[x]));
    let mut v = vec![0f64; g * c];
    for (k, &e) in order.iter().take(c).enumerate() {
        let sigma = values[e].max(0.0).sqrt();
        if sigma <= 0.0 {
            continue;
        }
        for r in 0..g {
            let dot: f64 = (0..l).map(|i| bt[r * l + i] * vectors[i * l + e]).sum();
            v[r * c + k] = dot / sigma;
        }
    }
    v
}

/// `a` (n × g) times `b` (g × l).
fn matmul(a: &[f64], n: usize, g: usize, b: &[f64], l: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * l];
    for i in 0..n {
        let o = &mut out[i * l..(i + 1) * l];
        for (j, &x) in a[i * g..(i + 1) * g].iter().enumerate() {
            if x != 0.0 {
                o.iter_mut()
                    .zip(&b[j * l..(j + 1) * l])
                    .for_each(|(o, b)| *o += x * b);
            }
        }
    }
    out
}

/// `a`ᵀ (g × n) times `b` (n × l).
fn matmul_t(a: &[f64], n: usize, g: usize, b: &[f64], l: usize) -> Vec<f64> {
    let mut out = vec![0f64; g * l];
    for i in 0..n {
        let bi = &b[i * l..(i + 1) * l];
        for (j, &x) in a[i * g..(i + 1) * g].iter().enumerate() {
            out[j * l..(j + 1) * l]
                .iter_mut()
                .zip(bi)
                .for_each(|(o, b)| *o += x * b);
        }
    }
    out
}

/// Orthonormal columns of `m` (rows × cols) in place: modified Gram–Schmidt, twice.
fn orthonormalize(m: &mut [f64], rows: usize, cols: usize) {
    for _ in 0..2 {
        for j in 0..cols {
            for k in 0..j {
                let dot: f64 = (0..rows).map(|r| m[r * cols + j] * m[r * cols + k]).sum();
                (0..rows).for_each(|r| m[r * cols + j] -= dot * m[r * cols + k]);
            }
            let norm = (0..rows)
                .map(|r| m[r * cols + j].powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                (0..rows).for_each(|r| m[r * cols + j] /= norm);
            }
        }
    }
}

/// Eigenvalues and eigenvectors (columns of the second, `n × n`) of the symmetric `m`:
/// cyclic Jacobi rotations.
fn symmetric_eigen(mut m: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j].powi(2))
            .sum();
        let diag: f64 = (0..n).map(|i| m[i * n + i].powi(2)).sum();
        if off <= 1e-24 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                // The smaller rotation that zeroes m[p][q]; θ = 0 (a ±45° turn) takes t = 1.
                let t = if theta == 0.0 {
                    1.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let cs = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * cs;
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = cs * mkp - sn * mkq;
                    m[k * n + q] = sn * mkp + cs * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = cs * mpk - sn * mqk;
                    m[q * n + k] = sn * mpk + cs * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = cs * vkp - sn * vkq;
                    v[k * n + q] = sn * vkp + cs * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| m[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_recovers_a_known_spectrum() {
        // Q diag(5, 2, 1) Qᵀ for a rotation Q.
        let (c, s) = (0.6f64, 0.8f64);
        let q = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
        let d = [5.0, 2.0, 1.0];
        let mut m = vec![0f64; 9];
        for i in 0..3 {
            for j in 0..3 {
                m[i * 3 + j] = (0..3).map(|k| q[i * 3 + k] * d[k] * q[j * 3 + k]).sum();
            }
        }
        let (mut values, vectors) = symmetric_eigen(m.clone(), 3);
        // Each eigenpair satisfies M v = λ v.
        for e in 0..3 {
            for i in 0..3 {
                let mv: f64 = (0..3).map(|k| m[i * 3 + k] * vectors[k * 3 + e]).sum();
                assert!((mv - values[e] * vectors[i * 3 + e]).abs() < 1e-9);
            }
        }
        values.sort_by(f64::total_cmp);
        assert!((values[0] - 1.0).abs() < 1e-9 && (values[2] - 5.0).abs() < 1e-9);
    }

    #[test]
    fn the_range_finder_finds_the_planted_subspace() {
        // 200 × 50 of rank 3 plus small noise: the top three right singular vectors span the
        // planted directions.
        let (n, g) = (200, 50);
        let mut state = 7u64;
        let mut rand = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let dirs: Vec<Vec<f64>> = (0..3)
            .map(|d| (0..g).map(|j| if j % 3 == d { 1.0 } else { 0.0 }).collect())
            .collect();
        let mut a = vec![0f64; n * g];
        for i in 0..n {
            let w = [10.0 * rand(), 6.0 * rand(), 3.0 * rand()];
            for j in 0..g {
                a[i * g + j] = (0..3).map(|d| w[d] * dirs[d][j]).sum::<f64>() + 1e-3 * rand();
            }
        }
        let v = top_right_singular_vectors(&a, n, g, 3);
        for d in &dirs {
            let norm2: f64 = d.iter().map(|x| x * x).sum();
            // The planted direction's length within the found subspace.
            let inside: f64 = (0..3)
                .map(|k| (0..g).map(|j| d[j] * v[j * 3 + k]).sum::<f64>().powi(2))
                .sum();
            assert!(inside / norm2 > 0.999, "{inside} of {norm2}");
        }
    }

    #[test]
    fn self_spread_leaves_each_row_out() {
        // Eleven points on a line, one unit apart: the middle one's ten others average 3.
        let mut rows = vec![0f32; 11 * COMPONENTS];
        for i in 0..11 {
            rows[i * COMPONENTS] = i as f32;
        }
        let s = self_spread(&rows);
        assert!((s[5] - 3.0).abs() < 1e-9, "{}", s[5]);
        assert!((s[0] - 5.5).abs() < 1e-9, "{}", s[0]);
    }
}
