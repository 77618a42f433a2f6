//! `CountBatch` → `TokenBatch`: vocabulary mapping, binning, `<cls>`, subsampling beyond `max_len`.

use super::binning::{tie_bin, Binner};
use super::kernels::{self, seeded_bin, Selected, SELECT_SLACK};
use super::rng::{CellRng, Mt19937};
use super::vocab::{GeneMap, Vocab};
use crate::batch::CountBatch;
use crate::simd::Simd;

/// How ties (`left != right`) are broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TieMode {
    /// A per-cell generator keyed by (seed, barcode): a cell gets the same tokens in any batch.
    #[default]
    Seeded,
    /// numpy's global MT19937 after `np.random.seed(seed)`, one `rand(k)` per cell in order:
    /// bit-identical to scGPT's `binning` under the same seed.
    Numpy,
    /// No randomness: a tied count gets the mean of scGPT's draw (`left` where `left ==
    /// right`, else `(left + right + 1) / 2`, possibly a half-integer), and a cell longer
    /// than `max_len` keeps its genes with the largest counts (ties: the lowest token id).
    /// For models trained this way (`ties = "expected"` in their manifest): a cell's tokens
    /// depend on its counts alone, never on a seed.
    Expected,
}

impl TieMode {
    pub fn name(self) -> &'static str {
        match self {
            TieMode::Seeded => "seeded",
            TieMode::Numpy => "numpy",
            TieMode::Expected => "expected",
        }
    }

    /// The mode called `name`, as manifests and the command line spell it.
    pub fn from_name(name: &str) -> Option<TieMode> {
        [TieMode::Seeded, TieMode::Numpy, TieMode::Expected]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct TokenizerConfig {
    /// scGPT's `n_bins` (51): values are bins `1..=n_bins-1`.
    pub n_bins: u16,
    /// Longest sequence, `<cls>` included (scGPT: 1200).
    pub max_len: usize,
    /// Value of the `<cls>` token (scGPT: −2).
    pub pad_value: f32,
    pub ties: TieMode,
    pub seed: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            n_bins: 51,
            max_len: 1200,
            pad_value: -2.0,
            ties: TieMode::Seeded,
            seed: 0,
        }
    }
}

/// Tokens of a batch's cells, unpadded, `<cls>` first in each cell.
#[derive(Debug, Clone, Default)]
pub struct TokenBatch {
    /// Token ids (u32: half the bytes of the model's i64, widened when the input tensor is
    /// packed).
    pub gene_ids: Vec<u32>,
    pub values: Vec<f32>,
    /// Cell `i`'s tokens are `offsets[i]..offsets[i+1]`.
    pub offsets: Vec<usize>,
    /// Per cell: how many non-zero genes it has, and how many of them are in the vocabulary.
    pub expressed: Vec<CellCoverage>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CellCoverage {
    pub n_genes: u32,
    pub n_in_vocab: u32,
    pub total_counts: u64,
    pub counts_in_vocab: u64,
}

impl TokenBatch {
    pub fn n_cells(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Token ids and values of cell `i`.
    pub fn cell(&self, i: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[i]..self.offsets[i + 1];
        (&self.gene_ids[r.clone()], &self.values[r])
    }
}

/// Turns count batches into tokens. Holds per-cell scratch buffers: one per thread.
pub struct Tokenizer {
    cfg: TokenizerConfig,
    cls_id: u32,
    kernels: Simd,
    binner: Binner,
    /// The current cell's kept counts (scratch).
    counts: Vec<u32>,
    pick: Vec<u32>,
    kept: Vec<bool>,
}

impl Tokenizer {
    pub fn new(vocab: &Vocab, cfg: TokenizerConfig) -> Tokenizer {
        Tokenizer::with_kernels(vocab, cfg, Simd::detect())
    }

    /// [`Tokenizer::new`] with a chosen implementation of the per-entry loops (every one
    /// gives the same tokens; tests and benchmarks compare them).
    pub fn with_kernels(vocab: &Vocab, cfg: TokenizerConfig, kernels: Simd) -> Tokenizer {
        assert!(
            cfg.max_len >= 2,
            "max_len must leave room for <cls> and a gene"
        );
        Tokenizer {
            binner: Binner::new(cfg.n_bins),
            cls_id: vocab.cls_id,
            kernels,
            cfg,
            counts: Vec::new(),
            pick: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// Tokenizes every cell of `batch` in order. In `numpy` tie mode the generator is seeded
    /// once here and consumed cell after cell, as scGPT's collator does over a dataset.
    pub fn tokenize(&mut self, batch: &CountBatch, genes: &GeneMap) -> TokenBatch {
        let mut out = TokenBatch::default();
        self.tokenize_into(batch, genes, &mut out);
        out
    }

    /// [`Tokenizer::tokenize`] into a recycled `TokenBatch` (its buffers are cleared and reused,
    /// so a pipeline that hands batches back allocates nothing in steady state).
    pub fn tokenize_into(&mut self, batch: &CountBatch, genes: &GeneMap, out: &mut TokenBatch) {
        // Upper bounds, so that nothing regrows: every stored entry plus one <cls> per cell,
        // at most max_len of them kept; gene_ids holds a cell's every kept gene before
        // subsampling, and its selection may write SELECT_SLACK past them.
        let cap = batch.nnz().min(batch.n_cells() * self.cfg.max_len) + batch.n_cells();
        out.gene_ids.clear();
        out.values.clear();
        out.offsets.clear();
        out.expressed.clear();
        out.gene_ids
            .reserve(batch.nnz() + batch.n_cells() + SELECT_SLACK);
        out.values.reserve(cap);
        out.offsets.reserve(batch.n_cells() + 1);
        out.expressed.reserve(batch.n_cells());
        out.offsets.push(0);
        let mut mt = match self.cfg.ties {
            TieMode::Numpy => Some(Mt19937::new(self.cfg.seed as u32)),
            TieMode::Seeded | TieMode::Expected => None,
        };
        for i in 0..batch.n_cells() {
            let cell = batch.cell(i);
            let coverage = self.tokenize_cell(
                cell.genes,
                cell.counts,
                genes,
                &batch.barcodes[i],
                mt.as_mut(),
                out,
            );
            out.expressed.push(coverage);
            out.offsets.push(out.gene_ids.len());
        }
    }

    /// Appends one cell's tokens to `out`.
    fn tokenize_cell(
        &mut self,
        gene_idx: &[u32],
        counts: &[u32],
        genes: &GeneMap,
        barcode: &str,
        mt: Option<&mut Mt19937>,
        out: &mut TokenBatch,
    ) -> CellCoverage {
        out.gene_ids.push(self.cls_id);
        out.values.push(self.cfg.pad_value);
        let start = out.values.len();
        let selected = self.select_in_vocab(gene_idx, counts, genes, &mut out.gene_ids);
        let cov = selected.coverage;
        let k = cov.n_in_vocab as usize;
        let counts = &self.counts[..k];
        self.binner.prepare_with_max(counts, selected.max_count);
        let mut rng = CellRng::for_cell(self.cfg.seed, barcode);

        let binner = &self.binner;
        let expected = self.cfg.ties == TieMode::Expected;
        match (mt, binner.small_lut()) {
            (_, _) if expected => out.values.extend(counts.iter().map(|&c| {
                let (l, r) = binner.digits(c);
                expected_bin(l, r)
            })),
            // scGPT draws one double per value, tie or not, and rounds up.
            (Some(mt), _) => out.values.extend(counts.iter().map(|&c| {
                let (l, r) = binner.digits(c);
                tie_bin(mt.next_f64(), l, r) as f32
            })),
            (None, Some(lut)) => kernels::seeded_bins(
                self.kernels,
                lut,
                counts,
                rng.next_u64() as u32,
                &mut out.values,
            ),
            (None, None) => {
                let key = rng.next_u64() as u32;
                out.values.extend(counts.iter().enumerate().map(|(i, &c)| {
                    let (l, r) = binner.digits(c);
                    seeded_bin(l as u32, r as u32, key, i as u32) as f32
                }));
            }
        }

        let keep = self.cfg.max_len - 1;
        if k > keep {
            // `keep` genes kept in input order: marked, then compacted in place front to back
            // (no kept token is overwritten before it moves).
            self.pick.clear();
            self.pick.extend(0..k as u32);
            self.kept.clear();
            self.kept.resize(k, false);
            if expected {
                // The largest counts, ties to the lowest token id.
                let ids = &out.gene_ids[start..start + k];
                let rank = |&i: &u32| (std::cmp::Reverse(counts[i as usize]), ids[i as usize]);
                self.pick
                    .select_nth_unstable_by(keep - 1, |a, b| rank(a).cmp(&rank(b)));
                for &j in &self.pick[..keep] {
                    self.kept[j as usize] = true;
                }
            } else {
                // A uniform random subset (partial Fisher–Yates).
                for j in 0..keep {
                    let s = j + rng.below((k - j) as u64) as usize;
                    self.pick.swap(j, s);
                    self.kept[self.pick[j] as usize] = true;
                }
            }
            let mut dst = start;
            for (src, &kept) in self.kept.iter().enumerate() {
                out.gene_ids[dst] = out.gene_ids[start + src];
                out.values[dst] = out.values[start + src];
                dst += kept as usize;
            }
            out.gene_ids.truncate(start + keep);
            out.values.truncate(start + keep);
        }
        cov
    }

    /// Appends the cell's non-zero, in-vocabulary token ids to `gene_ids` (written straight
    /// into its spare capacity) and keeps their counts at the front of `self.counts`.
    fn select_in_vocab(
        &mut self,
        gene_idx: &[u32],
        counts: &[u32],
        genes: &GeneMap,
        gene_ids: &mut Vec<u32>,
    ) -> Selected {
        let room = gene_idx.len() + SELECT_SLACK;
        gene_ids.reserve(room);
        if self.counts.len() < room {
            self.counts.resize(room, 0);
        }
        let start = gene_ids.len();
        let selected = kernels::select_in_vocab(
            self.kernels,
            gene_idx,
            counts,
            &genes.token_of_gene,
            gene_ids.spare_capacity_mut(),
            &mut self.counts,
        );
        // SAFETY: `select_in_vocab` initialised the first `n_in_vocab` elements of the spare
        // capacity (its documented contract, checked by its tests for every kernel).
        unsafe { gene_ids.set_len(start + selected.coverage.n_in_vocab as usize) };
        selected
    }
}

/// The mean of scGPT's tie draw `ceil(u·(right − left) + left)`, `u` uniform in [0, 1): the
/// integers `right + 1 ..= left` are equally likely.
pub fn expected_bin(left: u16, right: u16) -> f32 {
    if left == right {
        left as f32
    } else {
        (left as f32 + right as f32 + 1.0) / 2.0
    }
}
