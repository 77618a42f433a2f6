//! A package made by tools/export-scgpt from a randomly initialised scGPT 0.2.4
//! `TransformerModel` runs in cellstream and agrees with torch and onnxruntime
//! (tests/fixtures/scgpt-random/reference.jsonl, written by the converter's self-test).

mod common;

use cellstream::model::{Batch, ModelPackage, ModelRuntime, Worker};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    gene_ids: Vec<u32>,
    values: Vec<f32>,
    embedding_torch: Vec<f32>,
    embedding_ort: Vec<f32>,
}

#[test]
fn converted_scgpt_model_agrees_with_torch_and_onnxruntime() {
    let dir = common::fixture("scgpt-random");
    let pkg = ModelPackage::load(&dir).unwrap();
    assert!(pkg.labels.is_none(), "an embedding-only model");
    let rt = ModelRuntime::new(&pkg).unwrap();
    let text = std::fs::read_to_string(dir.join("reference.jsonl")).unwrap();
    let refs: Vec<Reference> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(refs.len() >= 10);
    let mut worker = Worker::new(rt.clone());
    let longest = refs.iter().map(|r| r.gene_ids.len()).max().unwrap();
    // All sequences padded together, as onnxruntime ran them.
    let mut batch = Batch::new(refs.len(), longest);
    for (row, r) in refs.iter().enumerate() {
        batch.set_row(row, &r.gene_ids, &r.values, rt.pad_id, rt.pad_value);
    }
    let out = worker.run(&batch).unwrap();
    let d = rt.embedding_dim;
    let (mut vs_torch, mut vs_ort) = (0f32, 0f32);
    for (row, r) in refs.iter().enumerate() {
        for (k, &x) in out.embedding[row * d..(row + 1) * d].iter().enumerate() {
            vs_torch = vs_torch.max((x - r.embedding_torch[k]).abs());
            vs_ort = vs_ort.max((x - r.embedding_ort[k]).abs());
        }
    }
    assert!(
        vs_ort <= 1e-4 && vs_torch <= 1e-4,
        "max abs diff: vs onnxruntime {vs_ort}, vs torch {vs_torch}"
    );
}
