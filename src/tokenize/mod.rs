//! Tokenization exactly as scGPT's cell-embedding path does it (DESIGN.md §3).
//!
//! `vocab` maps gene symbols to token ids, `binning` reproduces `scgpt.preprocess.binning`
//! with numpy's float64 arithmetic, `rng` holds numpy's MT19937 and the per-cell generator,
//! `kernels` the per-entry loops (portable, and AVX2 where the CPU has it), and `tokenizer`
//! assembles `<cls>` + genes, subsampling cells longer than `max_len`.

pub mod binning;
pub mod kernels;
pub mod rng;
mod tokenizer;
pub mod vocab;

pub use tokenizer::{CellCoverage, TieMode, TokenBatch, Tokenizer, TokenizerConfig};
pub use vocab::{GeneMap, Vocab, VocabError};
