//! Reference mapping: a cell's label from its nearest labelled cells in embedding space, for
//! any model that makes embeddings (scGPT's pretrained checkpoints have no classifier head;
//! scGPT's own tutorials map by exact kNN, k = 10, majority vote).
//!
//! A reference is a folder (`cellstream reference` writes it): `reference.json` (what it was
//! built from and for, its calibration), `embeddings.f32` (the cells' L2-normalised embeddings,
//! little-endian f32, `cells × embedding_dim`), `cells.tsv` (barcode and label per cell, in the
//! same order) and, from this version on, `layout.f32` (each cell's 2-D coordinates for the
//! daemon's map, little-endian f32, `cells × 2`, the same order; a folder without it still
//! loads, and older readers ignore it). For a query cell ([`Reference::map`]):
//!
//! - distance `1 − cos`; the `k` nearest reference cells by exact scan, or for a reference
//!   built with an HNSW graph (`index.hnsw`, [`ann`]; by default past [`ann::AUTO_ABOVE`]
//!   cells) the `k` nearest among the graph's candidates;
//! - `label`: the majority among them (a tie goes to the label met first, nearest first);
//! - `confidence`: the probability that this label is right, read from a table by the
//!   winner's vote count `m`: the fraction of the reference's own cells, in leave-one-out
//!   kNN, whose label was right when the winner got `m` votes (counts with fewer than
//!   [`MIN_PER_BIN`] cells pooled with their neighbours, made non-decreasing in `m`);
//! - `novelty`: the mean distance to the `k` nearest, divided by the 99th percentile of the
//!   same over the reference's own cells in leave-one-out: the reference's cells sit below 1;
//! - `assigned`: confidence at least the reference's threshold (the lowest giving ≥ 95%
//!   precision in leave-one-out) and novelty at most the reference's cut for the cell's
//!   depth: the [`NOVELTY_QUANTILE`] of its own cells' novelty in leave-one-out, at full depth
//!   and with its cells thinned to [`THINNED_DEPTHS`] (a shallow cell lies farther from
//!   everything, known or not), read at the query's depth in UMIs (`embed` and the daemon
//!   pass the batch's median) between those depths' medians;
//! - with an expression space (`cellstream reference --expression-space`, [`expression`]),
//!   for a batch holding its genes: `assigned` also needs the cell's counts near reference
//!   cells' at its depth, and the two cuts at each depth are set together so that the same
//!   95% of the reference's own cells stay within both. `novelty` stays the embedding's.

pub mod ann;
pub mod expression;
mod knn;
pub mod layout;

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::batch::CountBatch;
use crate::fsutil::write_atomic;
use expression::{ExpressionSpace, Projection};
pub use knn::Neighbours;

/// Neighbours a vote takes (scGPT's tutorials use 10).
pub const K: usize = 10;
/// A vote count seen for fewer reference cells than this is pooled with its neighbours.
pub const MIN_PER_BIN: usize = 20;
/// Precision among assigned cells the threshold is chosen for.
pub const TARGET_PRECISION: f64 = 0.95;
/// Share of the reference's own cells (leave-one-out, at each depth) whose novelty is within
/// the cut `assigned` needs: the other 5% are what the cut costs known cells.
pub const NOVELTY_QUANTILE: f64 = 0.95;
/// Fractions of the reference's depth its cells are thinned to for the depth cuts.
pub const THINNED_DEPTHS: [f64; 3] = [0.5, 0.25, 0.1];
/// Leave-one-out runs over at most this many reference cells (evenly spaced).
const LOO_CELLS: usize = 5000;

/// The reference cells (indices) a reference of `cells` cells calibrates on in leave-one-out:
/// all of them up to [`LOO_CELLS`], else that many evenly spaced. Only these need thinned
/// copies ([`Reference::calibrate_depths`]).
pub fn calibration_sample(cells: usize) -> Vec<usize> {
    (0..cells)
        .step_by(cells.div_ceil(LOO_CELLS).max(1))
        .collect()
}
/// Queries scanned together ([`Reference::map_many`]): the reference is read once per this
/// many cells, and their rows take `QUERY_CHUNK × embedding_dim` floats.
pub const QUERY_CHUNK: usize = 256;

const META: &str = "reference.json";
const EMBEDDINGS: &str = "embeddings.f32";
const CELLS: &str = "cells.tsv";
const LAYOUT: &str = "layout.f32";
const INDEX: &str = "index.hnsw";
const FORMAT: &str = "cellstream-reference";

/// Which model a reference's embeddings come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelId {
    pub name: String,
    pub onnx_sha256: String,
}

/// How a reference was made.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Provenance {
    pub inputs: Vec<String>,
    pub labels_file: String,
    pub column: String,
    pub cellstream: String,
    /// Cells of the inputs left out for want of a label.
    pub unlabelled_cells: usize,
}

/// Leave-one-out over the reference's own cells.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SelfScores {
    pub cells: usize,
    pub accuracy: f64,
    pub assigned_fraction: f64,
    pub precision_of_assigned: f64,
}

/// `reference.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    pub model: ModelId,
    pub k: usize,
    pub embedding_dim: usize,
    pub cells: usize,
    /// The labels, in first-seen order (`cells.tsv` names them).
    pub labels: Vec<String>,
    /// Fraction of the reference's cells per label.
    pub composition: BTreeMap<String, f64>,
    /// `calibration[m - 1]`: confidence when the winner got `m` of `k` votes.
    pub calibration: Vec<f64>,
    pub novelty_scale: f64,
    /// `assigned` needs novelty at most this (without depth cuts, or at full depth); 1 for
    /// references written before it.
    #[serde(default = "one")]
    pub novelty_cut: f64,
    /// The cut by depth, deepest first (the first is full depth); empty: `novelty_cut` for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depth_cuts: Vec<DepthCut>,
    pub confidence_threshold: f64,
    pub leave_one_out: SelfScores,
    pub built: Provenance,
    /// The search graph, when the reference has one (absent: exact scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<IndexMeta>,
}

fn one() -> f64 {
    1.0
}

/// The novelty cut for the reference's cells thinned to `depth`: a query with
/// `median_umis` UMIs gets `novelty_cut`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthCut {
    pub depth: f64,
    pub median_umis: f64,
    pub novelty_cut: f64,
}

/// The reference's [`calibration_sample`] cells (in its order) thinned to `depth` and
/// embedded again: per cell its embedding and UMI count, `None` when thinning left it no
/// gene in the vocabulary.
pub struct Thinned {
    pub depth: f64,
    pub cells: Vec<Option<ThinnedCell>>,
}

/// A thinned cell's embedding and UMI count.
pub type ThinnedCell = (Vec<f32>, u64);

/// `reference.json`'s `index`: an HNSW graph in `index.hnsw` (its last 4 bytes the CRC-32C
/// of the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexMeta {
    pub kind: String,
    pub file: String,
    pub ef_construction: usize,
    pub ef_search: usize,
}

/// How a reference finds a query's nearest cells (`cellstream reference --index`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Search {
    /// An HNSW graph past 100,000 cells, else exact.
    // (The number is ann::AUTO_ABOVE; this text is the CLI's help.)
    Auto,
    /// A scan of every cell.
    Exact,
    /// An approximate graph, stored as index.hnsw.
    Hnsw,
}

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{}: cannot read: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{}: built for model {reference_model} (onnx sha256 {reference_sha}), not for {model} (onnx sha256 {model_sha}): embed the reference cells again with this model (`cellstream reference`)", dir.display())]
    OtherModel {
        dir: PathBuf,
        reference_model: String,
        reference_sha: String,
        model: String,
        model_sha: String,
    },
}

/// A loaded (or freshly built) reference.
#[derive(Debug, Clone)]
pub struct Reference {
    pub meta: Meta,
    /// `cells × embedding_dim`, L2-normalised.
    embeddings: Vec<f32>,
    /// Per cell, its label's index in `meta.labels`.
    labels: Vec<u32>,
    barcodes: Vec<String>,
    /// Per cell, its 2-D coordinates on the reference's map (`layout.f32`), if it has one.
    layout: Option<Vec<[f32; 2]>>,
    index: Option<Arc<ann::Index>>,
    /// Novelty in expression space, when the reference was built with one.
    expression: Option<Arc<ExpressionSpace>>,
}

/// The reference's [`calibration_sample`] cells in a fitted expression space, for
/// [`Reference::calibrate_depths`]: per depth (full, then as the thinned copies), per sampled
/// cell its coordinates (`None` when it has no counts at that depth).
pub struct ExpressionFit {
    pub projection: Projection,
    pub coords: Vec<Vec<Option<Vec<f32>>>>,
}

/// A query cell's mapping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mapping {
    /// Index into the reference's labels.
    pub label: usize,
    pub confidence: f32,
    pub assigned: bool,
    pub novelty: f32,
}

/// Scales `v` to unit length (left as is when it is all zeros).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

impl Reference {
    /// A reference of `cells` (barcode, label, embedding), each embedding `dim` wide, for
    /// `model`: normalises the embeddings, builds the search graph if `search` asks for one,
    /// and calibrates by leave-one-out (with the search that will map queries).
    pub fn build(
        cells: Vec<(String, String, Vec<f32>)>,
        dim: usize,
        model: ModelId,
        built: Provenance,
        search: Search,
    ) -> Result<Reference, String> {
        if cells.len() < 2 {
            return Err(format!(
                "{} labelled cell(s) with an embedding: a reference needs at least 2",
                cells.len()
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let (mut embeddings, mut labels, mut barcodes) = (
            Vec::with_capacity(cells.len() * dim),
            Vec::with_capacity(cells.len()),
            Vec::with_capacity(cells.len()),
        );
        for (barcode, label, mut e) in cells {
            if e.len() != dim {
                return Err(format!(
                    "{barcode}: embedding of {} values, not {dim}",
                    e.len()
                ));
            }
            l2_normalize(&mut e);
            let i = match names.iter().position(|n| *n == label) {
                Some(i) => i,
                None => {
                    names.push(label);
                    names.len() - 1
                }
            };
            embeddings.extend_from_slice(&e);
            labels.push(i as u32);
            barcodes.push(barcode);
        }
        let n = labels.len();
        let mut composition = BTreeMap::new();
        for &l in &labels {
            *composition.entry(names[l as usize].clone()).or_insert(0.0) += 1.0 / n as f64;
        }
        let mut reference = Reference {
            meta: Meta {
                format: FORMAT.into(),
                version: 1,
                model,
                k: K.min(n - 1),
                embedding_dim: dim,
                cells: n,
                labels: names,
                composition,
                calibration: Vec::new(),
                novelty_scale: 1.0,
                novelty_cut: 1.0,
                depth_cuts: Vec::new(),
                confidence_threshold: 0.0,
                leave_one_out: SelfScores::default(),
                built,
                index: None,
            },
            embeddings,
            labels,
            barcodes,
            layout: None,
            index: None,
            expression: None,
        };
        let hnsw = match search {
            Search::Auto => n > ann::AUTO_ABOVE,
            Search::Exact => false,
            Search::Hnsw => true,
        };
        if hnsw {
            reference.index = Some(Arc::new(ann::Index::build(&reference.embeddings, dim)));
            reference.meta.index = Some(IndexMeta {
                kind: "hnsw".into(),
                file: INDEX.into(),
                ef_construction: ann::EF_CONSTRUCTION,
                ef_search: ann::EF_SEARCH,
            });
        }
        reference.calibrate();
        // A map until one is given (`cellstream reference --layout`): the two principal axes.
        let pca = layout::Pca::fit(&reference.embeddings, dim, None);
        reference.layout = Some(
            reference
                .embeddings
                .chunks_exact(dim)
                .map(|e| pca.project(e))
                .collect(),
        );
        Ok(reference)
    }

    /// Leave-one-out over (up to [`LOO_CELLS`] of) the reference's own cells: the
    /// calibration table, the novelty scale and the threshold, and how they score.
    fn calibrate(&mut self) {
        let (n, k) = (self.meta.cells, self.meta.k);
        let mut votes = Vec::new(); // (winner's votes, right)
        let mut spread = Vec::new(); // mean distance to the k nearest
        let cells = calibration_sample(n);
        let rows = cells.iter().map(|&i| self.row(i));
        let mut cell = cells.iter();
        self.nearest_each(rows, Some(&cells), false, |nb| {
            let i = *cell.next().expect("a cell per query");
            let (winner, m) = self.vote(nb);
            votes.push((m, winner == self.labels[i] as usize));
            spread.push(nb.mean_distance());
        });
        self.meta.calibration = calibration_table(&votes, k);
        let mut sorted = spread.clone();
        self.meta.novelty_scale = percentile(&mut sorted, 0.99).max(f64::MIN_POSITIVE);
        let scale = self.meta.novelty_scale;
        let cut = percentile(&mut sorted, NOVELTY_QUANTILE) / scale;
        self.meta.novelty_cut = cut;
        // Each cell's (confidence, novelty within the cut, right).
        let scored: Vec<(f64, bool, bool)> = votes
            .iter()
            .zip(&spread)
            .map(|(&(m, right), &s)| (self.meta.calibration[m - 1], s / scale <= cut, right))
            .collect();
        let mut candidates: Vec<f64> = self.meta.calibration.clone();
        candidates.sort_by(f64::total_cmp);
        candidates.dedup();
        let precision_at = |t: f64| {
            let assigned: Vec<bool> = scored
                .iter()
                .filter(|s| s.0 >= t && s.1)
                .map(|s| s.2)
                .collect();
            let right = assigned.iter().filter(|&&r| r).count();
            (right as f64 / assigned.len().max(1) as f64, assigned.len())
        };
        let threshold = candidates
            .iter()
            .copied()
            .find(|&t| precision_at(t).0 >= TARGET_PRECISION)
            .unwrap_or_else(|| candidates.last().copied().unwrap_or(1.0));
        let (precision, assigned) = precision_at(threshold);
        self.meta.confidence_threshold = threshold;
        self.meta.leave_one_out = SelfScores {
            cells: votes.len(),
            accuracy: votes.iter().filter(|v| v.1).count() as f64 / votes.len() as f64,
            assigned_fraction: assigned as f64 / votes.len() as f64,
            precision_of_assigned: precision,
        };
    }

    /// The depth cuts: `umis` per reference cell (its order), and its [`calibration_sample`]
    /// thinned to shallower depths ([`Thinned`], deepest first), each cell's leave-one-out
    /// novelty against the full-depth reference. With `expression` (the same cells in an
    /// expression space, at full depth and at each thinned depth) the reference also keeps
    /// the space, a level per depth cut, each with its own pair of cuts for batches measured
    /// in both spaces ([`Reference::check_expression`]).
    pub fn calibrate_depths(
        &mut self,
        umis: &[u64],
        thinned: &[Thinned],
        expression: Option<ExpressionFit>,
    ) -> Result<(), String> {
        let n = self.meta.cells;
        let sample = calibration_sample(n);
        if umis.len() != n || thinned.iter().any(|t| t.cells.len() != sample.len()) {
            return Err(format!(
                "depth calibration: not one UMI count per reference cell ({n}) and one thinned entry per sampled cell ({})",
                sample.len()
            ));
        }
        if let Some(e) = &expression {
            if e.coords.len() != thinned.len() + 1
                || e.coords.iter().any(|c| c.len() != sample.len())
            {
                return Err(format!(
                    "depth calibration: expression coordinates for {} depths, expected {} of {} cells each",
                    e.coords.len(),
                    thinned.len() + 1,
                    sample.len()
                ));
            }
        }
        let scale = self.meta.novelty_scale;
        let median_of = |mut v: Vec<f64>| percentile(&mut v, 0.5);
        let mut cuts = vec![DepthCut {
            depth: 1.0,
            median_umis: median_of(sample.iter().map(|&i| umis[i] as f64).collect()),
            novelty_cut: self.meta.novelty_cut,
        }];
        // Per kept depth, per sampled cell: its leave-one-out novelty (None: no embedding).
        let mut novelty: Vec<(usize, Vec<Option<f64>>)> = Vec::new();
        if expression.is_some() {
            let mut full = Vec::with_capacity(sample.len());
            self.nearest_each(
                sample.iter().map(|&i| self.row(i)),
                Some(&sample),
                false,
                |nb| full.push(Some(nb.mean_distance() / scale)),
            );
            novelty.push((0, full));
        }
        for (j, t) in thinned.iter().enumerate() {
            // (position in the sample, reference cell, its thinned embedding and UMIs), for
            // those thinning left one.
            let (kept, copies): (Vec<(usize, usize)>, Vec<&ThinnedCell>) = sample
                .iter()
                .zip(&t.cells)
                .enumerate()
                .filter_map(|(p, (&i, c))| Some(((p, i), c.as_ref()?)))
                .unzip();
            let cells: Vec<usize> = kept.iter().map(|k| k.1).collect();
            let mut spread = Vec::with_capacity(cells.len());
            self.nearest_each(
                copies.iter().map(|c| c.0.as_slice()),
                Some(&cells),
                true,
                |nb| spread.push(nb.mean_distance()),
            );
            let median_umis = median_of(copies.iter().map(|c| c.1 as f64).collect());
            let last = cuts.last().expect("full depth first");
            if cells.len() < MIN_PER_BIN || median_umis <= 0.0 || median_umis >= last.median_umis {
                // Too few cells left, or no shallower than the depth before: nothing to add.
                continue;
            }
            if expression.is_some() {
                let mut by_position = vec![None; sample.len()];
                for (&(p, _), &s) in kept.iter().zip(&spread) {
                    by_position[p] = Some(s / scale);
                }
                novelty.push((j + 1, by_position));
            }
            cuts.push(DepthCut {
                depth: t.depth,
                median_umis,
                novelty_cut: percentile(&mut spread, NOVELTY_QUANTILE) / scale,
            });
        }
        if let Some(fit) = expression {
            self.fit_expression(fit, &cuts, &novelty)?;
        }
        self.meta.depth_cuts = if cuts.len() > 1 { cuts } else { Vec::new() };
        Ok(())
    }

    /// The expression space's levels (one per depth in `cuts`, whose cells' `<cls>` novelty
    /// `novelty` holds by the depth's index into the fit), each with the two spaces' cuts set
    /// together: at the same quantile of each novelty, the lowest that leaves
    /// [`NOVELTY_QUANTILE`] of the level's cells within both.
    fn fit_expression(
        &mut self,
        fit: ExpressionFit,
        cuts: &[DepthCut],
        novelty: &[(usize, Vec<Option<f64>>)],
    ) -> Result<(), String> {
        // Per level: the positions measured in both spaces.
        let mut levels = Vec::new();
        let mut both: Vec<Vec<usize>> = Vec::new();
        for (cut, (d, cls)) in cuts.iter().zip(novelty) {
            let positions: Vec<usize> = (0..cls.len())
                .filter(|&p| cls[p].is_some() && fit.coords[*d][p].is_some())
                .collect();
            if positions.len() <= expression::K {
                return Err(format!(
                    "expression space: {} cells at depth {} (more than {} needed)",
                    positions.len(),
                    cut.depth,
                    expression::K
                ));
            }
            let coords: Vec<f32> = positions
                .iter()
                .flat_map(|&p| fit.coords[*d][p].clone().expect("measured"))
                .collect();
            levels.push((cut.depth, cut.median_umis, coords));
            both.push(positions);
        }
        let mut space = ExpressionSpace::new(fit.projection, levels);
        for (l, ((_, cls), positions)) in novelty.iter().zip(&both).enumerate() {
            let a: Vec<f64> = positions
                .iter()
                .map(|&p| cls[p].expect("measured"))
                .collect();
            let b = space.self_novelty(l);
            let (embedding_cut, expression_cut) = joint_cuts(&a, &b, NOVELTY_QUANTILE);
            space.set_cuts(l, embedding_cut, expression_cut);
        }
        self.expression = Some(Arc::new(space));
        Ok(())
    }

    /// The expression space, when the reference has one.
    pub fn expression(&self) -> Option<&ExpressionSpace> {
        self.expression.as_deref()
    }

    /// Decides `assigned` again for `mappings` (cells `rows` of `batch`, in order, mapped at a
    /// depth of `umis`) with both spaces, at the expression level nearest that depth: the
    /// confidence threshold, `novelty` within the level's embedding cut and the expression
    /// novelty within its expression cut. Nothing without an expression space, or when
    /// `batch` lacks too many of its genes ([`expression::MIN_COVERAGE`]; the embedding's
    /// depth cuts alone then decide); returns whether the batch was measured.
    pub fn check_expression(
        &self,
        batch: &CountBatch,
        rows: impl IntoIterator<Item = usize>,
        umis: Option<u64>,
        mappings: &mut [Mapping],
    ) -> bool {
        let Some(space) = &self.expression else {
            return false;
        };
        let panel = space.panel(&batch.gene_names);
        if !panel.covered {
            return false;
        }
        let level = space.level_at(umis);
        let l = &space.meta.levels[level];
        for (row, m) in rows.into_iter().zip(mappings.iter_mut()) {
            let near = space
                .novelty(batch, &panel, row, level)
                .is_none_or(|e| e <= l.novelty_cut);
            m.assigned = f64::from(m.confidence) >= self.meta.confidence_threshold
                && f64::from(m.novelty) <= l.embedding_cut
                && near;
        }
        true
    }

    /// The novelty cut at a depth of `umis` UMIs per cell (unknown: full depth's): between two
    /// depths' medians, interpolated in log UMIs; past the ends, the end's.
    pub fn novelty_cut_at(&self, umis: Option<u64>) -> f64 {
        let cuts = &self.meta.depth_cuts;
        let (Some(u), Some(first)) = (umis, cuts.first()) else {
            return self.meta.novelty_cut;
        };
        let x = (u.max(1) as f64).ln();
        if x >= first.median_umis.ln() {
            return first.novelty_cut;
        }
        for w in cuts.windows(2) {
            let (xa, xb) = (w[0].median_umis.ln(), w[1].median_umis.ln());
            if x >= xb {
                let t = (xa - x) / (xa - xb);
                return w[0].novelty_cut + t * (w[1].novelty_cut - w[0].novelty_cut);
            }
        }
        cuts.last().map_or(self.meta.novelty_cut, |c| c.novelty_cut)
    }

    fn row(&self, i: usize) -> &[f32] {
        let d = self.meta.embedding_dim;
        &self.embeddings[i * d..(i + 1) * d]
    }

    /// The `k` nearest reference cells to `query` (normalised), `skip` excluded.
    fn nearest(&self, query: &[f32], skip: Option<usize>, out: &mut Neighbours) {
        let dim = self.meta.embedding_dim;
        match &self.index {
            Some(index) => index.nearest(&self.embeddings, dim, query, skip, out),
            None => knn::scan(&self.embeddings, dim, query, skip, out),
        }
    }

    /// [`Reference::nearest`] for each of `queries` (normalised here when `normalize`), query
    /// `j` leaving out reference cell `skips[j]`: [`QUERY_CHUNK`] queries per pass over the
    /// reference; `each` gets their neighbours in order.
    fn nearest_each<'a>(
        &self,
        queries: impl IntoIterator<Item = &'a [f32]>,
        skips: Option<&[usize]>,
        normalize: bool,
        mut each: impl FnMut(&Neighbours),
    ) {
        let dim = self.meta.embedding_dim;
        if let Some(index) = &self.index {
            // The graph takes one query at a time.
            let mut nb = self.neighbours();
            let mut q = Vec::with_capacity(dim);
            for (j, query) in queries.into_iter().enumerate() {
                assert_eq!(query.len(), dim, "an embedding of the reference's width");
                q.clear();
                q.extend_from_slice(query);
                if normalize {
                    l2_normalize(&mut q);
                }
                let skip = skips.map(|s| s[j]);
                index.nearest(&self.embeddings, dim, &q, skip, &mut nb);
                each(&nb);
            }
            return;
        }
        let mut nbs = vec![self.neighbours(); QUERY_CHUNK];
        let mut rows = Vec::with_capacity(QUERY_CHUNK * dim);
        let mut queries = queries.into_iter().peekable();
        let mut done = 0;
        while queries.peek().is_some() {
            rows.clear();
            for q in queries.by_ref().take(QUERY_CHUNK) {
                assert_eq!(q.len(), dim, "an embedding of the reference's width");
                let start = rows.len();
                rows.extend_from_slice(q);
                if normalize {
                    l2_normalize(&mut rows[start..]);
                }
            }
            let nbs = &mut nbs[..rows.len() / dim];
            let skips = skips.map(|s| &s[done..done + nbs.len()]);
            knn::scan_many(&self.embeddings, dim, &rows, skips, nbs);
            nbs.iter().for_each(&mut each);
            done += nbs.len();
        }
    }

    /// The majority label among `nb` and its vote count; a tie goes to the label met first,
    /// nearest first.
    fn vote(&self, nb: &Neighbours) -> (usize, usize) {
        let mut counts: Vec<(usize, usize)> = Vec::with_capacity(nb.len());
        for &(_, cell) in nb.sorted() {
            let l = self.labels[cell as usize] as usize;
            match counts.iter_mut().find(|c| c.0 == l) {
                Some(c) => c.1 += 1,
                None => counts.push((l, 1)),
            }
        }
        // max_by_key keeps the last maximum; scanning reversed keeps the first.
        counts
            .iter()
            .rev()
            .max_by_key(|c| c.1)
            .copied()
            .unwrap_or((0, 0))
    }

    /// The mapping of one cell's embedding (normalised here if it is not) at a depth of `umis`
    /// UMIs per cell (None: taken as full depth).
    pub fn map(&self, embedding: &[f32], umis: Option<u64>, nb: &mut Neighbours) -> Mapping {
        let mut q = embedding.to_vec();
        l2_normalize(&mut q);
        self.nearest(&q, None, nb);
        self.mapping(nb, self.novelty_cut_at(umis))
    }

    /// [`Reference::map`] for many cells of one batch, all at a depth of `umis` UMIs per cell:
    /// what each would get alone, with the reference read once per [`QUERY_CHUNK`] cells
    /// instead of once per cell.
    pub fn map_many<'a>(
        &self,
        embeddings: impl IntoIterator<Item = &'a [f32]>,
        umis: Option<u64>,
    ) -> Vec<Mapping> {
        let cut = self.novelty_cut_at(umis);
        let mut out = Vec::new();
        self.nearest_each(embeddings, None, true, |nb| out.push(self.mapping(nb, cut)));
        out
    }

    /// A query's mapping from its nearest reference cells, assigned within novelty `cut`.
    fn mapping(&self, nb: &Neighbours, cut: f64) -> Mapping {
        let (label, m) = self.vote(nb);
        let confidence = self.meta.calibration[m.max(1) - 1];
        let novelty = nb.mean_distance() / self.meta.novelty_scale;
        Mapping {
            label,
            confidence: confidence as f32,
            assigned: confidence >= self.meta.confidence_threshold && novelty <= cut,
            novelty: novelty as f32,
        }
    }

    /// A [`Neighbours`] buffer sized for this reference's `k`.
    pub fn neighbours(&self) -> Neighbours {
        Neighbours::new(self.meta.k)
    }

    pub fn label_name(&self, label: usize) -> &str {
        &self.meta.labels[label]
    }

    /// The reference's cells' barcodes, in order.
    pub fn barcodes(&self) -> &[String] {
        &self.barcodes
    }

    /// Cell `i`'s label, an index into `meta.labels`.
    pub fn label_of(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    /// Each cell's 2-D map coordinates, when the reference has a layout.
    pub fn layout(&self) -> Option<&[[f32; 2]]> {
        self.layout.as_deref()
    }

    /// Replaces the layout (one pair of coordinates per cell, in order; all finite).
    pub fn set_layout(&mut self, coords: Vec<[f32; 2]>) -> Result<(), String> {
        if coords.len() != self.barcodes.len() {
            return Err(format!(
                "{} coordinates for {} cells",
                coords.len(),
                self.barcodes.len()
            ));
        }
        if let Some(i) = coords
            .iter()
            .position(|c| !c[0].is_finite() || !c[1].is_finite())
        {
            return Err(format!("cell {}: coordinates not finite", self.barcodes[i]));
        }
        self.layout = Some(coords);
        Ok(())
    }

    /// Where a query cell goes on the reference's map: the mean of its `k` nearest reference
    /// cells' coordinates, each weighted by its similarity `1 − distance` (floored at a
    /// small positive weight). `None` without a layout.
    pub fn place(&self, embedding: &[f32], nb: &mut Neighbours) -> Option<[f32; 2]> {
        let layout = self.layout.as_ref()?;
        let mut q = embedding.to_vec();
        l2_normalize(&mut q);
        self.nearest(&q, None, nb);
        let (mut x, mut y, mut total) = (0f64, 0f64, 0f64);
        for &(d, cell) in nb.sorted() {
            let w = (1.0 - d).max(1e-3);
            let [cx, cy] = layout[cell as usize];
            x += w * f64::from(cx);
            y += w * f64::from(cy);
            total += w;
        }
        (total > 0.0).then(|| [(x / total) as f32, (y / total) as f32])
    }

    /// Writes the folder (each file atomically).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_atomic(&dir.join(EMBEDDINGS), |w| {
            for x in &self.embeddings {
                w.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        })?;
        write_atomic(&dir.join(CELLS), |w| {
            writeln!(w, "cell\tlabel")?;
            for (b, &l) in self.barcodes.iter().zip(&self.labels) {
                writeln!(w, "{b}\t{}", self.meta.labels[l as usize])?;
            }
            Ok(())
        })?;
        if let Some(index) = &self.index {
            let bytes = index.to_bytes().map_err(std::io::Error::other)?;
            write_atomic(&dir.join(INDEX), |w| w.write_all(&bytes))?;
        }
        match &self.expression {
            Some(space) => space.write(dir)?,
            // A space left from an earlier build would be read as this one's.
            None => ExpressionSpace::remove(dir)?,
        }
        if let Some(layout) = &self.layout {
            write_atomic(&dir.join(LAYOUT), |w| {
                for [x, y] in layout {
                    w.write_all(&x.to_le_bytes())?;
                    w.write_all(&y.to_le_bytes())?;
                }
                Ok(())
            })?;
        }
        // Last: a folder with reference.json is a complete reference.
        write_atomic(&dir.join(META), |w| {
            serde_json::to_writer_pretty(&mut *w, &self.meta)?;
            writeln!(w)
        })
    }

    /// Reads the folder `dir`, refusing one built for another model than `model` (when
    /// given) or whose files disagree with each other.
    pub fn load(dir: &Path, model: Option<&ModelId>) -> Result<Reference, ReferenceError> {
        let path = dir.join(META);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| ReferenceError::Io { path, err }
        };
        let invalid = |path: &Path, what: String| ReferenceError::Invalid {
            path: path.to_path_buf(),
            what,
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let meta: Meta = serde_json::from_str(&text)
            .map_err(|e| invalid(&path, format!("not a reference: {e}")))?;
        if meta.format != FORMAT || meta.version != 1 {
            return Err(invalid(
                &path,
                format!(
                    "format {:?} version {}, expected {FORMAT:?} version 1",
                    meta.format, meta.version
                ),
            ));
        }
        if let Some(m) = model {
            if !m.onnx_sha256.eq_ignore_ascii_case(&meta.model.onnx_sha256) {
                return Err(ReferenceError::OtherModel {
                    dir: dir.to_path_buf(),
                    reference_model: meta.model.name.clone(),
                    reference_sha: meta.model.onnx_sha256.clone(),
                    model: m.name.clone(),
                    model_sha: m.onnx_sha256.clone(),
                });
            }
        }
        let ok = meta.k >= 1
            && meta.k < meta.cells
            && meta.calibration.len() == meta.k
            && meta.embedding_dim > 0
            && !meta.labels.is_empty()
            && meta.novelty_scale > 0.0
            && meta.novelty_cut > 0.0
            && meta
                .depth_cuts
                .iter()
                .all(|c| c.median_umis > 0.0 && c.novelty_cut > 0.0)
            && meta
                .depth_cuts
                .windows(2)
                .all(|w| w[1].median_umis < w[0].median_umis);
        if !ok {
            return Err(invalid(
                &path,
                format!(
                    "inconsistent: k {}, {} cells, {} calibration entries, embedding_dim {}, {} labels, novelty_scale {}, novelty_cut {}, depth_cuts {:?} (positive, UMIs decreasing)",
                    meta.k,
                    meta.cells,
                    meta.calibration.len(),
                    meta.embedding_dim,
                    meta.labels.len(),
                    meta.novelty_scale,
                    meta.novelty_cut,
                    meta.depth_cuts
                ),
            ));
        }
        let epath = dir.join(EMBEDDINGS);
        let want = meta.cells * meta.embedding_dim * 4;
        let file = std::fs::File::open(&epath).map_err(io(&epath))?;
        let len = file.metadata().map_err(io(&epath))?.len();
        if len != want as u64 {
            return Err(invalid(
                &epath,
                format!(
                    "{len} bytes, expected {want} ({} cells × {} f32)",
                    meta.cells, meta.embedding_dim
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(want);
        file.take(want as u64)
            .read_to_end(&mut bytes)
            .map_err(io(&epath))?;
        let embeddings = finite_f32s(&bytes).map_err(|what| invalid(&epath, what))?;
        let cpath = dir.join(CELLS);
        let file = std::fs::File::open(&cpath).map_err(io(&cpath))?;
        let (mut barcodes, mut labels) = (Vec::new(), Vec::new());
        for (n, line) in std::io::BufReader::new(file).lines().enumerate().skip(1) {
            let line = line.map_err(io(&cpath))?;
            let (barcode, label) = line.split_once('\t').ok_or_else(|| {
                invalid(&cpath, format!("line {}: expected cell<TAB>label", n + 1))
            })?;
            let l = meta.labels.iter().position(|x| x == label).ok_or_else(|| {
                invalid(
                    &cpath,
                    format!("line {}: label {label:?} is not in reference.json", n + 1),
                )
            })?;
            barcodes.push(barcode.to_string());
            labels.push(l as u32);
        }
        if labels.len() != meta.cells {
            return Err(invalid(
                &cpath,
                format!("{} cells, reference.json says {}", labels.len(), meta.cells),
            ));
        }
        let layout = load_layout(&dir.join(LAYOUT), meta.cells)?;
        let index = match &meta.index {
            None => None,
            Some(im) => Some(Arc::new(load_index(
                dir,
                im,
                &embeddings,
                meta.embedding_dim,
                &path,
            )?)),
        };
        let expression = ExpressionSpace::load(dir)?.map(Arc::new);
        Ok(Reference {
            meta,
            embeddings,
            labels,
            barcodes,
            layout,
            index,
            expression,
        })
    }
}

/// The search graph `index` describes, checked against the reference's rows.
fn load_index(
    dir: &Path,
    index: &IndexMeta,
    rows: &[f32],
    dim: usize,
    meta_path: &Path,
) -> Result<ann::Index, ReferenceError> {
    if index.kind != "hnsw" || index.file != INDEX {
        return Err(ReferenceError::Invalid {
            path: meta_path.to_path_buf(),
            what: format!(
                "index of kind {:?} in {:?}, expected \"hnsw\" in {INDEX:?}",
                index.kind, index.file
            ),
        });
    }
    let path = dir.join(INDEX);
    let bytes = std::fs::read(&path).map_err(|err| ReferenceError::Io {
        path: path.clone(),
        err,
    })?;
    ann::Index::from_bytes(&bytes, rows, dim).map_err(|what| ReferenceError::Invalid { path, what })
}

/// `layout.f32` when the folder has one (references built before it existed do not).
fn load_layout(path: &Path, cells: usize) -> Result<Option<Vec<[f32; 2]>>, ReferenceError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(ReferenceError::Io {
                path: path.to_path_buf(),
                err,
            })
        }
    };
    let invalid = |what: String| ReferenceError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    if bytes.len() != cells * 8 {
        return Err(invalid(format!(
            "{} bytes, expected {} ({cells} cells × 2 f32)",
            bytes.len(),
            cells * 8
        )));
    }
    let coords: Vec<[f32; 2]> = bytes
        .chunks_exact(8)
        .map(|b| {
            [
                f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                f32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            ]
        })
        .collect();
    if let Some(i) = coords
        .iter()
        .position(|c| !c[0].is_finite() || !c[1].is_finite())
    {
        return Err(invalid(format!("cell {i}: coordinates not finite")));
    }
    Ok(Some(coords))
}

/// The calibration table from leave-one-out `(winner's votes, right)` pairs: per vote count
/// `m` in 1..=k the fraction right, sparse counts pooled, then made non-decreasing in `m`
/// (pool-adjacent-violators, weighted by cells).
fn calibration_table(votes: &[(usize, bool)], k: usize) -> Vec<f64> {
    let mut right = vec![0usize; k + 1];
    let mut total = vec![0usize; k + 1];
    for &(m, r) in votes {
        total[m] += 1;
        right[m] += r as usize;
    }
    // Blocks of consecutive vote counts: (first m, last m, right, total).
    let mut blocks: Vec<(usize, usize, usize, usize)> = Vec::new();
    for m in 1..=k {
        let open = blocks.last().is_some_and(|b| b.3 < MIN_PER_BIN);
        match blocks.last_mut() {
            Some(b) if open => {
                b.1 = m;
                b.2 += right[m];
                b.3 += total[m];
            }
            _ => blocks.push((m, m, right[m], total[m])),
        }
    }
    // A sparse last block joins the one before it.
    if blocks.len() > 1 && blocks.last().is_some_and(|b| b.3 < MIN_PER_BIN) {
        let last = blocks.pop().unwrap();
        let prev = blocks.last_mut().unwrap();
        prev.1 = last.1;
        prev.2 += last.2;
        prev.3 += last.3;
    }
    // Pool adjacent violators.
    let rate = |b: &(usize, usize, usize, usize)| b.2 as f64 / b.3.max(1) as f64;
    let mut merged: Vec<(usize, usize, usize, usize)> = Vec::new();
    for b in blocks {
        merged.push(b);
        while merged.len() > 1 && {
            let n = merged.len();
            rate(&merged[n - 2]) > rate(&merged[n - 1])
        } {
            let last = merged.pop().unwrap();
            let prev = merged.last_mut().unwrap();
            prev.1 = last.1;
            prev.2 += last.2;
            prev.3 += last.3;
        }
    }
    let mut table = vec![0.0; k];
    for b in &merged {
        for m in b.0..=b.1 {
            table[m - 1] = rate(b);
        }
    }
    table
}

/// The `q` quantile (linear interpolation, numpy's default) of `v`; 0 for none.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Little-endian f32 values, refused if any is not finite.
fn finite_f32s(bytes: &[u8]) -> Result<Vec<f32>, String> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    match values.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!("value {i} is not finite")),
        None => Ok(values),
    }
}

/// Cuts on two scores of the same cells at one quantile `q` of each, the lowest `q` from
/// `quantile` up at which `quantile` of the cells are within both.
fn joint_cuts(a: &[f64], b: &[f64], quantile: f64) -> (f64, f64) {
    let (mut sa, mut sb) = (a.to_vec(), b.to_vec());
    let within = |ca: f64, cb: f64| {
        a.iter()
            .zip(b)
            .filter(|&(&x, &y)| x <= ca && y <= cb)
            .count() as f64
            / a.len() as f64
    };
    let mut q = quantile;
    loop {
        let (ca, cb) = (percentile(&mut sa, q), percentile(&mut sb, q));
        if q >= 1.0 || within(ca, cb) >= quantile {
            return (ca, cb);
        }
        q = (q + 0.0005).min(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::rng::CellRng;

    /// Three clusters around orthogonal centres, `per` cells each.
    fn clusters(per: usize, spread: f32, rng: &mut CellRng) -> Vec<(String, String, Vec<f32>)> {
        let mut cells = Vec::new();
        for c in 0..3 {
            for i in 0..per {
                let e: Vec<f32> = (0..8)
                    .map(|j| (j == c) as u8 as f32 + (rng.next_f64() as f32 - 0.5) * spread)
                    .collect();
                cells.push((format!("c{c}-{i}"), format!("type{c}"), e));
            }
        }
        cells
    }

    /// A reference of [`clusters`] (60 cells each, spread 0.3), exact search.
    fn three_clusters(rng: &mut CellRng) -> Reference {
        Reference::build(
            clusters(60, 0.3, rng),
            8,
            model(),
            Provenance::default(),
            Search::Exact,
        )
        .unwrap()
    }

    fn model() -> ModelId {
        ModelId {
            name: "m".into(),
            onnx_sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn separated_clusters_map_to_their_label_and_far_cells_are_novel() {
        let mut rng = CellRng::for_cell(1, "reference");
        let r = three_clusters(&mut rng);
        assert_eq!(r.meta.k, K);
        assert!(
            r.meta.leave_one_out.accuracy > 0.99,
            "{:?}",
            r.meta.leave_one_out
        );
        let mut nb = r.neighbours();
        let m = r.map(&[0.0, 1.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0], None, &mut nb);
        assert_eq!(r.label_name(m.label), "type1");
        assert!(m.assigned && m.novelty < 1.0, "{m:?}");
        // A direction no reference cell points to.
        let far = r.map(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], None, &mut nb);
        assert!(far.novelty > 1.0 && !far.assigned, "{far:?}");
    }

    #[test]
    fn shallower_cells_get_a_wider_cut_read_at_their_umis() {
        let mut rng = CellRng::for_cell(4, "depth cuts");
        let mut r = three_clusters(&mut rng);
        // About 5% of its own cells lie past the full-depth cut, none past the scale.
        assert!(
            r.meta.novelty_cut > 0.3 && r.meta.novelty_cut < 1.0,
            "{:?}",
            r.meta
        );
        // Thinned copies: the same cells, noisier, at fewer UMIs.
        let copy = |spread: f32, umis: u64, rng: &mut CellRng| {
            clusters(60, spread, rng)
                .into_iter()
                .map(|(_, _, e)| Some((e, umis)))
                .collect()
        };
        let thinned = [
            Thinned {
                depth: 0.5,
                cells: copy(0.6, 50, &mut rng),
            },
            Thinned {
                depth: 0.2,
                cells: copy(1.0, 20, &mut rng),
            },
        ];
        r.calibrate_depths(&vec![100; 180], &thinned, None).unwrap();
        let cuts: Vec<f64> = r.meta.depth_cuts.iter().map(|c| c.novelty_cut).collect();
        assert_eq!(cuts.len(), 3, "{:?}", r.meta.depth_cuts);
        assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
        assert_eq!(r.novelty_cut_at(None), cuts[0]);
        assert_eq!(r.novelty_cut_at(Some(500)), cuts[0]);
        assert_eq!(r.novelty_cut_at(Some(50)), cuts[1]);
        assert_eq!(r.novelty_cut_at(Some(3)), cuts[2]);
        let between = r.novelty_cut_at(Some(70));
        assert!(cuts[0] < between && between < cuts[1], "{between} {cuts:?}");
        // A cell just past the full-depth cut: novel at full depth, not when shallow.
        let mut nb = r.neighbours();
        let (mut q, mut m) = (vec![0f32; 8], None);
        for step in 0..200 {
            q[0] = 1.0;
            q[1] = step as f32 * 0.01;
            let got = r.map(&q, None, &mut nb);
            if (got.novelty as f64) > cuts[0] * 1.05 {
                m = Some(got);
                break;
            }
        }
        let m = m.expect("a query past the full-depth cut");
        assert!(
            !m.assigned && (m.novelty as f64) < cuts[1],
            "{m:?} {cuts:?}"
        );
        assert!(r.map(&q, Some(20), &mut nb).assigned);
        assert!(!r.map(&q, Some(1000), &mut nb).assigned);
        assert!(
            r.map_many([&q[..]], Some(20))[0].assigned && !r.map_many([&q[..]], None)[0].assigned
        );
        // Written and read back with the cuts.
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(back.meta.depth_cuts, r.meta.depth_cuts);
        assert_eq!(back.novelty_cut_at(Some(70)), between);
    }

    /// Cells × 40 genes: type `t` (0–3) expresses genes `10t..10t + 10` at about 20 counts,
    /// every other gene at about 1 in 3 cells; `rows` gives each cell's type.
    fn typed_counts(types: &[usize], rng: &mut CellRng) -> CountBatch {
        use crate::batch::{CsrArrays, Format};
        let mut csr = CsrArrays {
            indptr: vec![0],
            ..CsrArrays::default()
        };
        for &t in types {
            for g in 0..40u32 {
                let c = if g as usize / 10 == t {
                    15 + rng.below(10) as u32
                } else {
                    (rng.below(3) == 0) as u32
                };
                if c > 0 {
                    csr.indices.push(g);
                    csr.data.push(c);
                }
            }
            csr.indptr.push(csr.indices.len() as u64);
        }
        let barcodes = (0..types.len()).map(|i| format!("q{i}")).collect();
        let genes = (0..40).map(|g| format!("G{g}")).collect();
        CountBatch::from_csr("test", Format::Mtx, genes, None, barcodes, csr).unwrap()
    }

    #[test]
    fn an_expression_space_unassigns_cells_whose_counts_no_reference_cell_has() {
        let mut rng = CellRng::for_cell(6, "expression");
        let mut r = three_clusters(&mut rng);
        let full_depth_cut = r.meta.novelty_cut;
        // The reference's cells: types 0–2, in the order `clusters` makes them.
        let types: Vec<usize> = (0..180).map(|i| i / 60).collect();
        let batch = typed_counts(&types, &mut rng);
        let mut genes = expression::Genes::default();
        let numbers = genes.numbers(&batch);
        let profiles: Vec<expression::Profile> = (0..180)
            .map(|i| expression::Genes::profile(&batch, &numbers, i).unwrap())
            .collect();
        let projection =
            Projection::fit(&genes, &profiles.iter().collect::<Vec<_>>()).expect("a space");
        let rows = projection.rows(&genes);
        let coords = vec![profiles
            .iter()
            .map(|p| Some(projection.project_profile(&rows, p)))
            .collect()];
        r.calibrate_depths(
            &vec![100; 180],
            &[],
            Some(ExpressionFit { projection, coords }),
        )
        .unwrap();
        // The embedding's own cut stays; the level's pair, set together, is at least as wide.
        assert_eq!(r.meta.novelty_cut, full_depth_cut);
        let space = r.expression().expect("kept");
        assert_eq!(space.meta.levels.len(), 1);
        let level = &space.meta.levels[0];
        assert!(level.embedding_cut >= full_depth_cut, "{level:?}");
        // Queries whose embeddings all sit in type 0's cluster; their counts of type 0, of
        // type 3 (no reference cell's) and of type 1.
        let queries = typed_counts(&[0, 3, 1], &mut rng);
        let e = [1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut m = r.map_many([&e[..], &e[..], &e[..]], None);
        assert!(m.iter().all(|m| m.assigned), "{m:?}");
        assert!(r.check_expression(&queries, 0..3, None, &mut m));
        // Counts of a type the reference holds pass whatever the embedding says: only
        // distance in expression space counts here.
        assert_eq!(
            m.iter().map(|m| m.assigned).collect::<Vec<_>>(),
            [true, false, true]
        );
        // Without most of the space's genes a batch is not measured.
        let few = queries.select_rows(&[1]);
        let few = CountBatch::from_csr(
            "test",
            crate::batch::Format::Mtx,
            (0..40).map(|g| format!("other{g}")).collect(),
            None,
            few.barcodes.clone(),
            crate::batch::CsrArrays {
                indptr: vec![0, 0],
                ..Default::default()
            },
        )
        .unwrap();
        let mut one = r.map_many([&e[..]], None);
        assert!(!r.check_expression(&few, 0..1, None, &mut one));
        assert!(one[0].assigned);
        // Written and read back; a rebuild without a space leaves none behind.
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(back.expression().unwrap().meta, space.meta);
        let mut again = r.map_many([&e[..], &e[..], &e[..]], None);
        back.check_expression(&queries, 0..3, None, &mut again);
        assert_eq!(again, m);
        let plain = three_clusters(&mut rng);
        plain.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert!(back.expression().is_none());
    }

    #[test]
    fn depth_cuts_read_only_the_calibration_sample() {
        let mut rng = CellRng::for_cell(5, "sample");
        let cells = clusters(2000, 0.3, &mut rng);
        let n = cells.len();
        let mut r =
            Reference::build(cells, 8, model(), Provenance::default(), Search::Exact).unwrap();
        let sample = calibration_sample(n);
        assert!(sample.len() <= LOO_CELLS && sample.len() > LOO_CELLS / 2);
        let noisy = clusters(2000, 0.6, &mut rng);
        let t = Thinned {
            depth: 0.5,
            cells: sample
                .iter()
                .map(|&i| Some((noisy[i].2.clone(), 50)))
                .collect(),
        };
        r.calibrate_depths(&vec![100; n], &[t], None).unwrap();
        let cuts = &r.meta.depth_cuts;
        assert_eq!(cuts.len(), 2, "{cuts:?}");
        assert!(cuts[1].novelty_cut > cuts[0].novelty_cut, "{cuts:?}");
    }

    #[test]
    fn calibration_is_monotone_and_pools_sparse_counts() {
        let mut votes = Vec::new();
        for (m, right, wrong) in [(10, 95, 5), (9, 20, 5), (7, 3, 4), (6, 30, 2), (5, 10, 10)] {
            votes.extend(std::iter::repeat_n((m, true), right));
            votes.extend(std::iter::repeat_n((m, false), wrong));
        }
        let t = calibration_table(&votes, 10);
        assert!(t.windows(2).all(|w| w[0] <= w[1]), "{t:?}");
        assert!((t[9] - 0.95).abs() < 1e-9);
        // 6 (32 cells, 0.94) sits above 7 (pooled with 8: 7 cells, 0.43): they pool.
        assert_eq!(t[5], t[6]);
    }

    #[test]
    fn written_references_read_back_and_refuse_another_model() {
        let mut rng = CellRng::for_cell(2, "reference io");
        let r = Reference::build(
            clusters(20, 0.2, &mut rng),
            8,
            model(),
            Provenance::default(),
            Search::Exact,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(back.layout, r.layout);
        let mut nb = back.neighbours();
        let placed = back.place(&back.embeddings[..8], &mut nb).unwrap();
        assert!(placed.iter().all(|c| c.is_finite()));
        // A folder written before layouts existed loads without one.
        std::fs::remove_file(dir.path().join(LAYOUT)).unwrap();
        let old = Reference::load(dir.path(), Some(&model())).unwrap();
        assert!(old.layout().is_none() && old.place(&[1.0; 8], &mut nb).is_none());
        // One written before the novelty cut keeps the old rule, novelty at most 1.
        let meta = dir.path().join(META);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("novelty_cut");
        std::fs::write(&meta, json.to_string()).unwrap();
        let old = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(old.novelty_cut_at(Some(100)), 1.0);
        r.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(back.embeddings, r.embeddings);
        assert_eq!(back.labels, r.labels);
        assert_eq!(back.meta.calibration, r.meta.calibration);
        let other = ModelId {
            name: "other".into(),
            onnx_sha256: "cd".repeat(32),
        };
        let err = Reference::load(dir.path(), Some(&other))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&"ab".repeat(32)) && err.contains(&"cd".repeat(32)),
            "{err}"
        );
    }

    #[test]
    fn a_search_graph_finds_what_the_scan_finds_and_reads_back() {
        let mut rng = CellRng::for_cell(3, "reference graph");
        let cells = clusters(150, 0.8, &mut rng);
        let build = |search| {
            Reference::build(cells.clone(), 8, model(), Provenance::default(), search).unwrap()
        };
        let (exact, graph) = (build(Search::Exact), build(Search::Hnsw));
        assert!(exact.meta.index.is_none() && graph.meta.index.is_some());
        let queries: Vec<Vec<f32>> = clusters(50, 0.8, &mut rng)
            .into_iter()
            .map(|c| c.2)
            .collect();
        let neighbours = |r: &Reference| {
            let mut out = Vec::new();
            r.nearest_each(queries.iter().map(|q| &q[..]), None, true, |nb| {
                out.push(nb.sorted().to_vec())
            });
            out
        };
        let (want, got) = (neighbours(&exact), neighbours(&graph));
        // Where the graph finds the k nearest, the distances and order are the scan's.
        let same = want.iter().zip(&got).filter(|(w, g)| w == g).count();
        assert!(same * 100 >= 99 * want.len(), "{same} of {}", want.len());
        let map = |r: &Reference| r.map_many(queries.iter().map(|q| &q[..]), None);
        assert_eq!(map(&graph).len(), queries.len());
        // One cell alone and in a batch: the same neighbours.
        let mut nb = graph.neighbours();
        graph.map(&queries[7], None, &mut nb);
        assert_eq!(nb.sorted(), &got[7][..]);

        let dir = tempfile::tempdir().unwrap();
        graph.write(dir.path()).unwrap();
        let back = Reference::load(dir.path(), Some(&model())).unwrap();
        assert_eq!(back.meta.index, graph.meta.index);
        assert_eq!(neighbours(&back), got);
        // A damaged graph is refused, naming the file; so is one for other embeddings.
        let path = dir.path().join(INDEX);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Reference::load(dir.path(), None).unwrap_err().to_string();
        assert!(
            err.contains("index.hnsw") && err.contains("CRC-32C"),
            "{err}"
        );
        exact.write(dir.path()).unwrap();
        let mut meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(META)).unwrap()).unwrap();
        meta["index"] = serde_json::to_value(graph.meta.index.as_ref().unwrap()).unwrap();
        std::fs::write(dir.path().join(META), meta.to_string()).unwrap();
        let mut other = graph.clone();
        other.embeddings[0] += 0.5;
        std::fs::write(&path, graph.index.as_ref().unwrap().to_bytes().unwrap()).unwrap();
        assert!(Reference::load(dir.path(), None).is_ok());
        std::fs::write(
            dir.path().join(EMBEDDINGS),
            other
                .embeddings
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let err = Reference::load(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("differs from embeddings.f32"), "{err}");
    }
}
