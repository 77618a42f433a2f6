//! cellstream: single-cell count batches in, scGPT tokens, embeddings and labels out.
//!
//! The pipeline reads as its modules: [`batch`] (readers → `CountBatch`), [`tokenize`]
//! (`CountBatch` → `TokenBatch`, exactly as scGPT bins), and the model, [`embed`] (the stages wired) and the sinks
//! that follow.

pub mod batch;
pub mod config;
#[cfg(feature = "runtime")]
pub mod daemon;
#[cfg(feature = "runtime")]
pub mod embed;
pub mod fsutil;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod model;
#[cfg(feature = "runtime")]
pub mod nats;
pub mod qc;
pub mod reference;
pub mod simd;
#[cfg(feature = "runtime")]
pub mod sink;
pub mod source;
pub mod tokenize;
