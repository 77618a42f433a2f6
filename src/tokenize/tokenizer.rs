//! `CountBatch` → `TokenBatch`: vocabulary mapping, binning, `<cls>`, subsampling beyond `max_len`.

use super::binning::{tie_bin, Binner};
use super::rng::{CellRng, Mt19937};
use super::vocab::{GeneMap, Vocab, NOT_IN_VOCAB};
use crate::batch::CountBatch;

/// How ties (`left != right`) are broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TieMode {
    /// A per-cell generator keyed by (seed, barcode): a cell gets the same tokens in any batch.
    #[default]
    Seeded,
    /// numpy's global MT19937 after `np.random.seed(seed)`, one `rand(k)` per cell in order:
    /// bit-identical to scGPT's `binning` under the same seed.
    Numpy,
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
    pub gene_ids: Vec<i64>,
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
    pub fn cell(&self, i: usize) -> (&[i64], &[f32]) {
        let r = self.offsets[i]..self.offsets[i + 1];
        (&self.gene_ids[r.clone()], &self.values[r])
    }
}

/// Turns count batches into tokens. Holds per-cell scratch buffers: one per thread.
pub struct Tokenizer {
    cfg: TokenizerConfig,
    cls_id: i64,
    binner: Binner,
    tokens: Vec<u32>,
    counts: Vec<u32>,
    left: Vec<u16>,
    right: Vec<u16>,
    bins: Vec<f32>,
    pick: Vec<u32>,
}

impl Tokenizer {
    pub fn new(vocab: &Vocab, cfg: TokenizerConfig) -> Tokenizer {
        assert!(
            cfg.max_len >= 2,
            "max_len must leave room for <cls> and a gene"
        );
        Tokenizer {
            binner: Binner::new(cfg.n_bins),
            cls_id: vocab.cls_id as i64,
            cfg,
            tokens: Vec::new(),
            counts: Vec::new(),
            left: Vec::new(),
            right: Vec::new(),
            bins: Vec::new(),
            pick: Vec::new(),
        }
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.cfg
    }

    /// Tokenizes every cell of `batch` in order. In `numpy` tie mode the generator is seeded
    /// once here and consumed cell after cell, as scGPT's collator does over a dataset.
    pub fn tokenize(&mut self, batch: &CountBatch, genes: &GeneMap) -> TokenBatch {
        let mut out = TokenBatch {
            offsets: vec![0],
            ..Default::default()
        };
        let mut mt = match self.cfg.ties {
            TieMode::Numpy => Some(Mt19937::new(self.cfg.seed as u32)),
            TieMode::Seeded => None,
        };
        for i in 0..batch.n_cells() {
            let cell = batch.cell(i);
            let coverage = self.tokenize_cell(
                cell.genes,
                cell.counts,
                genes,
                &batch.barcodes[i],
                mt.as_mut(),
                &mut out,
            );
            out.expressed.push(coverage);
            out.offsets.push(out.gene_ids.len());
        }
        out
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
        let mut cov = CellCoverage::default();
        self.tokens.clear();
        self.counts.clear();
        for (&g, &c) in gene_idx.iter().zip(counts) {
            if c == 0 {
                continue;
            }
            cov.n_genes += 1;
            cov.total_counts += c as u64;
            let t = genes.token_of_gene[g as usize];
            if t != NOT_IN_VOCAB {
                self.tokens.push(t);
                self.counts.push(c);
            }
        }
        cov.n_in_vocab = self.tokens.len() as u32;
        cov.counts_in_vocab = self.counts.iter().map(|&c| c as u64).sum();

        self.binner
            .digitize(&self.counts, &mut self.left, &mut self.right);
        let mut rng = CellRng::for_cell(self.cfg.seed, barcode);
        self.bins.clear();
        match mt {
            // scGPT draws one double per value, tie or not.
            Some(mt) => {
                for (&l, &r) in self.left.iter().zip(&self.right) {
                    self.bins.push(tie_bin(mt.next_f64(), l, r) as f32);
                }
            }
            None => {
                for (&l, &r) in self.left.iter().zip(&self.right) {
                    let bin = if l == r {
                        l as f32
                    } else {
                        tie_bin(rng.next_f64(), l, r) as f32
                    };
                    self.bins.push(bin);
                }
            }
        }

        out.gene_ids.push(self.cls_id);
        out.values.push(self.cfg.pad_value);
        let k = self.tokens.len();
        let keep = self.cfg.max_len - 1;
        if k <= keep {
            out.gene_ids.extend(self.tokens.iter().map(|&t| t as i64));
            out.values.extend_from_slice(&self.bins);
        } else {
            // A uniform random subset of `keep` genes (partial Fisher–Yates), kept in input order.
            self.pick.clear();
            self.pick.extend(0..k as u32);
            for j in 0..keep {
                let s = j + rng.below((k - j) as u64) as usize;
                self.pick.swap(j, s);
            }
            self.pick.truncate(keep);
            self.pick.sort_unstable();
            for &p in &self.pick {
                out.gene_ids.push(self.tokens[p as usize] as i64);
                out.values.push(self.bins[p as usize]);
            }
        }
        cov
    }
}
