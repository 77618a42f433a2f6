//! Shared helpers for the end-to-end tests: paths to the committed fixtures, running the real
//! binary, and batch comparison.
#![allow(dead_code)]

pub mod browser;
pub mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cellstream::batch::{read_batch, CountBatch, ReadOptions};
use cellstream::model::fuse::Precision;
use cellstream::model::Options;
use cellstream::simd::Simd;

/// libhdf5 opens files without close-on-exec and `flock`s them, so a child spawned while an
/// HDF5 file is open inherits the lock until it exits, and the next open of that file fails
/// ("unable to lock file, errno = 11"). Tests that read HDF5 and tests that spawn the binary,
/// in one test process, hold this in turn.
pub static HDF5_OR_SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn hdf5_or_spawn() -> std::sync::MutexGuard<'static, ()> {
    HDF5_OR_SPAWN.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

pub fn pbmc3k() -> PathBuf {
    repo().join("bench-data/pbmc3k")
}

pub fn vocab_path() -> PathBuf {
    fixture("scgpt_default_gene_vocab.json")
}

pub fn read(path: &Path) -> CountBatch {
    read_batch(path, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The cosine of two vectors, summed in f64.
pub fn cosine<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x.into() * y.into()).sum();
    let norm = |v: &[T]| v.iter().map(|&x| x.into() * x.into()).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The fastest form on `simd`'s kernels with the products by constant weights in int8.
pub fn int8_options(simd: Simd) -> Options {
    Options {
        precision: Some(Precision::Int8),
        ..Options::tier(simd)
    }
}

/// Runs `cellstream ARGS…` and returns its output.
pub fn cellstream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellstream"))
        .args(args)
        .output()
        .expect("running the cellstream binary")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Same cells, genes, barcodes and counts (the format and source may differ).
pub fn assert_same_matrix(a: &CountBatch, b: &CountBatch) {
    let what = format!("{} vs {}", a.source.display(), b.source.display());
    assert_eq!(a.n_cells(), b.n_cells(), "cells: {what}");
    assert_eq!(a.gene_names, b.gene_names, "gene names: {what}");
    assert_eq!(a.barcodes, b.barcodes, "barcodes: {what}");
    assert_eq!(a.indptr(), b.indptr(), "indptr: {what}");
    assert_eq!(a.indices(), b.indices(), "indices: {what}");
    assert_eq!(a.data(), b.data(), "counts: {what}");
}
