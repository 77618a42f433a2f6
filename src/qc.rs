//! Per-cell quality figures reported beside every embedding.

use serde::Serialize;

use crate::batch::CountBatch;
use crate::tokenize::CellCoverage;

/// QC of one cell, as in the output record's `qc` object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CellQc {
    /// UMIs in the cell (all genes).
    pub total_counts: u64,
    /// Genes with a non-zero count.
    pub n_genes: u32,
    /// Percent of the UMIs on mitochondrial genes (`MT-`/`mt-` symbols).
    pub pct_mito: f32,
    /// Fraction of the UMIs on genes the model's vocabulary knows.
    pub vocab_matched: f32,
}

/// Which columns are mitochondrial genes, once per batch.
pub fn mito_mask(gene_names: &[String]) -> Vec<bool> {
    gene_names
        .iter()
        .map(|g| g.starts_with("MT-") || g.starts_with("mt-"))
        .collect()
}

/// QC of cell `i` of `batch`, with the coverage the tokenizer measured.
pub fn cell_qc(batch: &CountBatch, i: usize, mito: &[bool], coverage: &CellCoverage) -> CellQc {
    let cell = batch.cell(i);
    let mito_counts: u64 = cell
        .genes
        .iter()
        .zip(cell.counts)
        .map(|(&g, &c)| if mito[g as usize] { c as u64 } else { 0 })
        .sum();
    let total = coverage.total_counts;
    let frac = |x: u64| {
        if total > 0 {
            x as f64 / total as f64
        } else {
            0.0
        }
    };
    CellQc {
        total_counts: total,
        n_genes: coverage.n_genes,
        pct_mito: (100.0 * frac(mito_counts)) as f32,
        vocab_matched: frac(coverage.counts_in_vocab) as f32,
    }
}
