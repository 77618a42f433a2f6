//! Wiring the stages: `CountBatch` → `TokenBatch` → chunks → `CellResult`s.

pub mod pool;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::unbounded;

use crate::batch::CountBatch;
use crate::model::chunking::{buckets, plan_chunks, rows_for};
use crate::model::runner::release_free_memory;
use crate::model::shared_weights::PackedUsage;
use crate::model::{ModelInput, ModelPackage, ModelRuntime};
use crate::qc::{cell_qc, mito_mask, CellQc};
use crate::reference::{l2_normalize, Reference, ReferenceError};
use crate::tokenize::{GeneMap, TokenBatch, Tokenizer, TokenizerConfig};
use pool::{InferencePool, Job};

/// Label of a cell whose confidence is under the threshold (or that has no known gene).
pub const UNASSIGNED: &str = "unassigned";

/// What cellstream reports for one cell.
#[derive(Debug, Clone)]
pub struct CellResult {
    pub label: String,
    pub confidence: f32,
    pub assigned: bool,
    /// The `<cls>` embedding (L2-normalised when the manifest says so); `None` for a cell
    /// with no gene in the vocabulary, whose embedding would carry no information.
    pub embedding: Option<Vec<f32>>,
    pub qc: CellQc,
    /// Tokens the model saw for this cell, `<cls>` included.
    pub n_tokens: u32,
    /// With a reference: how far the cell lies from the reference's cells (below 1 for
    /// theirs, [`crate::reference`]).
    pub novelty: Option<f32>,
}

/// Where the time of one [`Embedder::embed_timed`] call went.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbedTimings {
    pub tokenize: Duration,
    /// The model, and turning its outputs into results.
    pub infer: Duration,
}

/// The model's raw outputs for one cell.
#[derive(Debug, Clone, Default)]
struct CellOutput {
    embedding: Vec<f32>,
    logits: Option<Vec<f32>>,
}

/// Settings of the embed stage.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    pub threads: usize,
    /// Tokens per chunk (rows × padded length).
    pub token_budget: usize,
    pub seed: u64,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            threads: 1,
            token_budget: crate::config::DEFAULT_TOKEN_BUDGET,
            seed: 0,
        }
    }
}

/// Tokenizer, model and workers: turns count batches into results.
pub struct Embedder {
    pub package: ModelPackage,
    rt: Arc<ModelRuntime>,
    pool: InferencePool,
    tokenizer: Tokenizer,
    tokens: TokenBatch,
    buckets: Vec<usize>,
    cfg: EmbedConfig,
    /// Labels come from this reference by kNN, when set, rather than from the model's head.
    reference: Option<Arc<Reference>>,
}

/// Why a batch cannot be embedded at all (as opposed to single cells that get no label).
#[derive(Debug, thiserror::Error)]
#[error("{}: none of its {n_genes} genes is in the model's vocabulary ({vocab}); check that the input has gene symbols of the model's species", path.display())]
pub struct NoGeneInVocab {
    pub path: std::path::PathBuf,
    pub n_genes: usize,
    pub vocab: String,
}

impl Embedder {
    pub fn new(package: ModelPackage, cfg: EmbedConfig) -> anyhow::Result<Embedder> {
        let rt = ModelRuntime::new(&package)?;
        let m = &package.manifest;
        let tokenizer = Tokenizer::new(
            &package.vocab,
            TokenizerConfig {
                n_bins: m.n_bins,
                max_len: m.max_len,
                pad_value: m.pad_value,
                seed: cfg.seed,
                ties: package.ties().unwrap_or_default(),
            },
        );
        Ok(Embedder {
            pool: InferencePool::new(rt.clone(), cfg.threads),
            buckets: buckets(m.max_len),
            rt,
            tokenizer,
            tokens: TokenBatch::default(),
            package,
            cfg,
            reference: None,
        })
    }

    /// Labels cells by kNN over `reference` from now on (it must be this model's: see
    /// [`Embedder::load_reference`]).
    pub fn set_reference(&mut self, reference: Arc<Reference>) {
        self.reference = Some(reference);
    }

    pub fn reference(&self) -> Option<&Arc<Reference>> {
        self.reference.as_ref()
    }

    /// The reference in `dir`, refused when it was built for another model.
    pub fn load_reference(&self, dir: &std::path::Path) -> Result<Reference, ReferenceError> {
        Reference::load(dir, Some(&self.package.model_id()))
    }

    /// The vocabulary mapping for a batch, failing when it matches no gene at all.
    pub fn gene_map(&self, batch: &CountBatch) -> Result<GeneMap, NoGeneInVocab> {
        let map = self.package.vocab.map_genes(&batch.gene_names);
        if map.n_matched == 0 {
            return Err(NoGeneInVocab {
                path: batch.source.clone(),
                n_genes: batch.n_genes(),
                vocab: self.package.dir.join("vocab.json").display().to_string(),
            });
        }
        Ok(map)
    }

    /// Results for every cell of `batch`, in input order.
    pub fn embed(&mut self, batch: &CountBatch) -> anyhow::Result<Vec<CellResult>> {
        self.embed_with_progress(batch, &mut |_| {})
    }

    /// [`Embedder::embed`], calling `progress(cells)` as each chunk completes.
    pub fn embed_with_progress(
        &mut self,
        batch: &CountBatch,
        progress: &mut dyn FnMut(usize),
    ) -> anyhow::Result<Vec<CellResult>> {
        Ok(self.embed_timed(batch, progress)?.0)
    }

    /// [`Embedder::embed_with_progress`], also saying where the time went.
    pub fn embed_timed(
        &mut self,
        batch: &CountBatch,
        progress: &mut dyn FnMut(usize),
    ) -> anyhow::Result<(Vec<CellResult>, EmbedTimings)> {
        let start = Instant::now();
        let genes = self.gene_map(batch)?;
        self.tokenizer
            .tokenize_into(batch, &genes, &mut self.tokens);
        let tokenized = Instant::now();
        let mut outputs = self.infer(progress)?;
        let mito = mito_mask(&batch.gene_names);
        let labels = self.package.labels.as_deref();
        let threshold = self.package.confidence_threshold();
        let temperature = self.package.temperature();
        let reference = self.reference.as_deref();
        let normalize = self.package.manifest.normalize_embedding;
        if normalize {
            outputs
                .iter_mut()
                .for_each(|o| l2_normalize(&mut o.embedding));
        }
        let mapped = |i: &usize| self.tokens.expressed[*i].n_in_vocab > 0;
        // Every mapped cell's neighbours in one pass over the reference; the novelty cut is
        // read at the batch's depth (its median UMIs): depth is the run's, and a cell that is
        // small by type is no shallower than its reference counterparts.
        let mut umis: Vec<u64> = (0..outputs.len())
            .filter(mapped)
            .map(|i| self.tokens.expressed[i].total_counts)
            .collect();
        let depth = (!umis.is_empty()).then(|| {
            let mid = umis.len() / 2;
            *umis.select_nth_unstable(mid).1
        });
        let mut mappings: Vec<_> = reference
            .map(|r| {
                r.map_many(
                    (0..outputs.len())
                        .filter(mapped)
                        .map(|i| outputs[i].embedding.as_slice()),
                    depth,
                )
            })
            .unwrap_or_default();
        if let Some(r) = reference {
            r.check_expression(
                batch,
                (0..outputs.len()).filter(mapped),
                depth,
                &mut mappings,
            );
        }
        let mut mappings = mappings.into_iter();
        let results = outputs
            .into_iter()
            .enumerate()
            .map(|(i, CellOutput { embedding, logits })| {
                let coverage = &self.tokens.expressed[i];
                let qc = cell_qc(batch, i, &mito, coverage);
                let n_tokens = self.tokens.cell(i).0.len() as u32;
                if !mapped(&i) {
                    return CellResult {
                        label: UNASSIGNED.into(),
                        confidence: 0.0,
                        assigned: false,
                        embedding: None,
                        qc,
                        n_tokens,
                        novelty: None,
                    };
                }
                if let Some(reference) = reference {
                    let m = mappings.next().expect("a mapping for every mapped cell");
                    return CellResult {
                        label: if m.assigned {
                            reference.label_name(m.label).into()
                        } else {
                            UNASSIGNED.into()
                        },
                        confidence: m.confidence,
                        assigned: m.assigned,
                        embedding: Some(embedding),
                        qc,
                        n_tokens,
                        novelty: Some(m.novelty),
                    };
                }
                let (label, confidence) = match (labels, &logits) {
                    (Some(labels), Some(logits)) => {
                        let (best, p) = softmax_max(logits, temperature);
                        (labels[best].clone(), p)
                    }
                    _ => (UNASSIGNED.to_string(), 0.0),
                };
                let assigned = labels.is_some() && confidence >= threshold;
                CellResult {
                    label: if assigned { label } else { UNASSIGNED.into() },
                    confidence,
                    assigned,
                    embedding: Some(embedding),
                    qc,
                    n_tokens,
                    novelty: None,
                }
            })
            .collect();
        let timings = EmbedTimings {
            tokenize: tokenized - start,
            infer: tokenized.elapsed(),
        };
        Ok((results, timings))
    }

    /// Frees the buffers the last batch's tokens took (kept otherwise for the next batch, at
    /// the size of the largest batch seen): the daemon calls it after each batch, so that
    /// what it holds between batches does not depend on what came before.
    pub fn release_buffers(&mut self) {
        self.tokens = TokenBatch::default();
    }

    /// Compiles the plan of every length bucket now, on as many threads as the embedder
    /// has, so that the first batches do not pay for it (the daemon calls this before it
    /// reports ready), then releases the parsed graph and the heap pages the optimizer freed:
    /// these are the only shapes `infer` runs (one per bucket, its rows fixed by the token
    /// budget), and the plans hold all they need.
    pub fn warm_up(&self) -> anyhow::Result<PackedUsage> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.cfg.threads.clamp(1, self.buckets.len()))
                .map(|_| {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&s) = self.buckets.get(i) else {
                            return Ok(());
                        };
                        self.rt.plan(rows_for(s, self.cfg.token_budget), s)?;
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a plan build panicked")))
            })
        })?;
        self.rt.release_graph();
        release_free_memory();
        self.rt.packed_weights()
    }

    /// Runs every tokenized cell through the model.
    fn infer(&self, progress: &mut dyn FnMut(usize)) -> anyhow::Result<Vec<CellOutput>> {
        let t = &self.tokens;
        let lengths: Vec<usize> = (0..t.n_cells()).map(|i| t.cell(i).0.len()).collect();
        let chunks = plan_chunks(&lengths, &self.buckets, self.cfg.token_budget);
        let (reply, results) = unbounded();
        let rt = &self.rt;
        let mut per_cell = vec![CellOutput::default(); t.n_cells()];
        let (d, c) = (rt.embedding_dim, rt.n_classes);
        let mut received = 0;
        let mut take =
            |id: usize, out: anyhow::Result<crate::model::Outputs>| -> anyhow::Result<()> {
                received += 1;
                let out = out.with_context(|| format!("chunk {id}"))?;
                progress(chunks[id].cells.len());
                for (row, &cell) in chunks[id].cells.iter().enumerate() {
                    per_cell[cell] = CellOutput {
                        embedding: out.embedding[row * d..(row + 1) * d].to_vec(),
                        logits: out
                            .logits
                            .as_ref()
                            .map(|l| l[row * c..(row + 1) * c].to_vec()),
                    };
                }
                Ok(())
            };
        // Packing runs here while the workers compute; `submit` blocks when they fall behind.
        for (id, chunk) in chunks.iter().enumerate() {
            let mut batch = ModelInput::new(chunk.n, chunk.s);
            for row in 0..chunk.n {
                match chunk.cells.get(row) {
                    Some(&cell) => {
                        let (ids, values) = t.cell(cell);
                        batch.set_row(row, ids, values, rt.pad_id, rt.pad_value);
                    }
                    // Filler rows: `<cls>` alone (an all-padding row would mask every key).
                    None => batch.set_row(
                        row,
                        &[rt.cls_id as u32],
                        &[rt.pad_value],
                        rt.pad_id,
                        rt.pad_value,
                    ),
                }
            }
            self.pool.submit(Job {
                id,
                batch,
                reply: reply.clone(),
            });
            // Take what is done already: progress (the daemon's watchdog heartbeat) must
            // move while a large batch is still being submitted, not only at its end.
            while let Ok((id, out)) = results.try_recv() {
                take(id, out)?;
            }
        }
        drop(reply);
        for (id, out) in results {
            take(id, out)?;
        }
        anyhow::ensure!(
            received == chunks.len(),
            "{} of {} chunks never came back from the inference workers",
            chunks.len() - received,
            chunks.len()
        );
        Ok(per_cell)
    }
}

/// The top class and its probability, softmax of `logits / temperature`.
fn softmax_max(logits: &[f32], temperature: f32) -> (usize, f32) {
    let (best, &max) = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("at least one class");
    let sum: f32 = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .sum();
    (best, 1.0 / sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_max_is_the_top_probability() {
        let (i, p) = softmax_max(&[1.0, 3.0, 2.0], 1.0);
        assert_eq!(i, 1);
        let e = [1f32, 3.0, 2.0].map(f32::exp);
        assert!((p - e[1] / e.iter().sum::<f32>()).abs() < 1e-6);
        let (_, p) = softmax_max(&[1000.0, 0.0], 1.0);
        assert!((p - 1.0).abs() < 1e-6, "stable for large logits");
        // A temperature of 2 is the softmax of the halved logits.
        let (_, p) = softmax_max(&[1.0, 3.0, 2.0], 2.0);
        let e = [0.5f32, 1.5, 1.0].map(f32::exp);
        assert!((p - e[1] / e.iter().sum::<f32>()).abs() < 1e-6);
    }
}
