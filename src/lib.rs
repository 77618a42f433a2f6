//! cellstream: single-cell count batches in, scGPT tokens, embeddings and labels out.
//!
//! The pipeline reads as its modules: [`batch`] (readers → `CountBatch`), [`tokenize`]
//! (`CountBatch` → `TokenBatch`, exactly as scGPT bins), and the model, pipeline and sinks
//! that follow.

pub mod batch;
pub mod config;
pub mod daemon;
pub mod fsutil;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod qc;
pub mod sink;
pub mod source;
pub mod tokenize;
