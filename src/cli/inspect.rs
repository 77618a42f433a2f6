use std::path::PathBuf;

use anyhow::Context;
use cellstream::batch::CountBatch;
use cellstream::model::fuse::Precision;
use cellstream::model::{ModelPackage, ModelRuntime};
use cellstream::reference::Reference;
use cellstream::tokenize::Vocab;
use serde_json::json;

use super::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// The batch to inspect, a model package directory, a reference folder, or an NDJSON
    /// output of `embed` or the daemon (run-level QC per batch).
    input: PathBuf,
    /// A vocabulary (vocab.json) to report gene coverage against.
    #[arg(long)]
    vocab: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    caps: super::InputCaps,
}

/// "ensembl" when most names look like `ENSG00000141510`, else "symbol".
fn id_kind(names: &[String]) -> &'static str {
    let looks_ensembl = |s: &String| {
        s.starts_with("ENS")
            && s.len() >= 11
            && s[s.len() - 11..].bytes().all(|b| b.is_ascii_digit())
    };
    if names.iter().filter(|s| looks_ensembl(s)).count() * 2 > names.len() {
        "ensembl"
    } else {
        "symbol"
    }
}

fn median(mut v: Vec<u64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
}

fn summary(batch: &CountBatch, vocab: Option<&Vocab>) -> serde_json::Value {
    let per_cell_counts: Vec<u64> = (0..batch.n_cells())
        .map(|i| batch.cell(i).counts.iter().map(|&c| c as u64).sum())
        .collect();
    let per_cell_genes: Vec<u64> = (0..batch.n_cells())
        .map(|i| batch.cell(i).counts.iter().filter(|&&c| c > 0).count() as u64)
        .collect();
    let total: u64 = per_cell_counts.iter().sum();
    let mut v = json!({
        "input": batch.source.display().to_string(),
        "format": batch.format.name(),
        "batch_id": batch.batch_id(),
        "cells": batch.n_cells(),
        "genes": batch.n_genes(),
        "nnz": batch.nnz(),
        "density": batch.nnz() as f64 / (batch.n_cells() as f64 * batch.n_genes() as f64),
        "gene_name_kind": id_kind(&batch.gene_names),
        "gene_id_kind": batch.gene_ids.as_deref().map(id_kind),
        "total_counts": total,
        "median_counts_per_cell": median(per_cell_counts),
        "median_genes_per_cell": median(per_cell_genes),
    });
    if let Some(vocab) = vocab {
        let map = vocab.map_genes(&batch.gene_names);
        let in_vocab: u64 = batch
            .indices()
            .iter()
            .zip(batch.data())
            .filter(|(&g, _)| {
                map.token_of_gene[g as usize] != cellstream::tokenize::vocab::NOT_IN_VOCAB
            })
            .map(|(_, &c)| c as u64)
            .sum();
        v["vocab"] = json!({
            "tokens": vocab.len(),
            "genes_matched": map.n_matched,
            "genes_matched_fraction": map.n_matched as f64 / batch.n_genes() as f64,
            "counts_matched_fraction": if total > 0 { in_vocab as f64 / total as f64 } else { 0.0 },
        });
    }
    v
}

/// A model package: validated (manifest, sha256, vocabulary, labels) and probed in tract.
fn inspect_model(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let pkg = ModelPackage::load(dir)?;
    let rt = ModelRuntime::new(&pkg)?;
    let m = &pkg.manifest;
    let v = json!({
        "model": dir.display().to_string(),
        "name": m.name,
        "version": m.version,
        "architecture": m.architecture,
        "embedding_dim": m.embedding_dim,
        "max_len": m.max_len,
        "n_bins": m.n_bins,
        "vocab_tokens": pkg.vocab.len(),
        "labels": pkg.labels,
        "confidence_threshold": m.confidence_threshold,
        "onnx_bytes": pkg.onnx.len,
        "onnx_sha256": m.onnx_sha256,
        "probe": "ok",
        "classes": rt.n_classes,
        "fusion": rt.options.fusion.name(),
        "simd": rt.options.simd.name(),
        "fused_attention_layers": rt.fused.attention_layers,
        "fused_layer_norms": rt.fused.layer_norms,
        "token_tables": rt.fused.token_tables,
        "token_table_bytes": rt.fused.token_table_bytes,
        "token_table_replaced_bytes": rt.fused.token_table_replaced_bytes,
        "kernels": rt.options.kernels.name(),
        "precision": rt.precision.name(),
        "int8_products": rt.fused.int8_products,
        "int8_weight_bytes": rt.fused.int8_weight_bytes,
        "int8_attention_layers": rt.fused.int8_attention_layers,
        "f32_products": rt.fused.f32_products,
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "model:        {} ({}, version {})",
            dir.display(),
            m.name,
            m.version.as_deref().unwrap_or("-")
        );
        println!(
            "architecture: {}, embedding {}, max_len {}, {} bins",
            m.architecture, m.embedding_dim, m.max_len, m.n_bins
        );
        println!("vocabulary:   {} tokens", pkg.vocab.len());
        match &pkg.labels {
            Some(l) => println!(
                "labels:       {} ({}), confidence threshold {}",
                l.len(),
                l.join(", "),
                pkg.confidence_threshold()
            ),
            None => println!("labels:       none (embeddings only)"),
        }
        println!(
            "onnx:         {} bytes, sha256 verified; probe inference ok",
            pkg.onnx.len
        );
        println!(
            "fusion:       {} ({} attention layers, {} LayerNorms fused, {} token tables)",
            rt.options.fusion.name(),
            rt.fused.attention_layers,
            rt.fused.layer_norms,
            rt.fused.token_tables
        );
        if rt.fused.token_tables > 0 {
            println!(
                "token tables: {:.1} MB, replacing {:.1} MB of the graph's constants",
                rt.fused.token_table_bytes as f64 / 1e6,
                rt.fused.token_table_replaced_bytes as f64 / 1e6
            );
        }
        println!(
            "kernels:      {} (matmuls: {})",
            rt.options.simd.name(),
            rt.options.kernels.name()
        );
        match rt.precision {
            Precision::F32 if rt.fused.f32_products > 0 => println!(
                "precision:    f32 ({} products by constant weights on our own kernel)",
                rt.fused.f32_products
            ),
            Precision::F32 => println!("precision:    f32"),
            Precision::Int8 => println!(
                "precision:    int8 ({} products by constant weights, {:.1} MB packed; \
                 {} attention weighted sums)",
                rt.fused.int8_products,
                rt.fused.int8_weight_bytes as f64 / 1e6,
                rt.fused.int8_attention_layers
            ),
        }
    }
    Ok(())
}

/// A reference folder: what it holds, how it scores on its own cells, its composition.
fn inspect_reference(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let r = Reference::load(dir, None)?;
    let m = &r.meta;
    if json {
        println!("{}", serde_json::to_string(m)?);
        return Ok(());
    }
    println!("reference:    {}", dir.display());
    println!(
        "model:        {} (onnx sha256 {})",
        m.model.name, m.model.onnx_sha256
    );
    println!(
        "cells:        {} of {} labels, {}-dimensional embeddings, k = {}",
        m.cells,
        m.labels.len(),
        m.embedding_dim,
        m.k
    );
    match &m.index {
        None => println!("search:       exact scan"),
        Some(i) => println!(
            "search:       {} graph ({}; ef_construction {}, ef_search {}), exact ranking of its candidates",
            i.kind, i.file, i.ef_construction, i.ef_search
        ),
    }
    let l = &m.leave_one_out;
    println!(
        "own cells:    leave-one-out accuracy {:.3}; {:.1}% assigned at confidence ≥ {:.2}, precision {:.3}",
        l.accuracy,
        100.0 * l.assigned_fraction,
        m.confidence_threshold,
        l.precision_of_assigned
    );
    let cuts: Vec<String> = m
        .depth_cuts
        .iter()
        .map(|c| {
            format!(
                "{:.2} at {:.0}% ({:.0} UMIs)",
                c.novelty_cut,
                100.0 * c.depth,
                c.median_umis
            )
        })
        .collect();
    println!(
        "novelty cut:  {}",
        if cuts.is_empty() {
            format!("{:.2} (every depth)", m.novelty_cut)
        } else {
            cuts.join(", ")
        }
    );
    if let Some(e) = r.expression() {
        let levels: Vec<String> = e
            .meta
            .levels
            .iter()
            .map(|l| {
                format!(
                    "{:.2} and {:.2} at {:.0}% ({:.0} UMIs)",
                    l.novelty_cut,
                    l.embedding_cut,
                    100.0 * l.depth,
                    l.median_umis
                )
            })
            .collect();
        println!(
            "expression:   {} genes, {} components; cuts (expression and embedding novelty) {}",
            e.meta.genes.len(),
            e.meta.components,
            levels.join(", ")
        );
    }
    let composition: Vec<String> = m
        .composition
        .iter()
        .map(|(label, f)| format!("{label} {:.1}%", 100.0 * f))
        .collect();
    println!("composition:  {}", composition.join(", "));
    println!(
        "built from:   {} (labels {}, column {})",
        m.built.inputs.join(", "),
        m.built.labels_file,
        m.built.column
    );
    Ok(())
}

/// Whether `path` is a file of cellstream's NDJSON records (its first line opens with
/// `{"batch":`).
fn is_records(path: &std::path::Path) -> bool {
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok_and(|()| &head == b"{\"batch\":")
}

/// Per batch of a records file: how many cells, how many assigned, the labels' shares among
/// the assigned, the median novelty (with a reference) and QC.
#[derive(Default)]
struct RecordsQc {
    cells: usize,
    assigned: usize,
    labels: std::collections::BTreeMap<String, usize>,
    novelty: Vec<f64>,
    genes: Vec<f64>,
    umis: Vec<f64>,
    mito: Vec<f64>,
}

fn median_of(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Run-level QC of an NDJSON output: per batch, the fraction unassigned, the composition of
/// the assigned cells, the median novelty against the reference (when the records carry it)
/// and QC medians.
fn inspect_records(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use std::io::BufRead;
    /// Longer lines are no cellstream record (one holds an embedding of a few thousand values).
    const MAX_LINE: usize = 16 << 20;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut batches: Vec<(String, RecordsQc)> = Vec::new();
    let mut line = String::new();
    for n in 1.. {
        line.clear();
        let read = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        if read > MAX_LINE {
            anyhow::bail!(
                "{}: line {n} is longer than {MAX_LINE} bytes",
                path.display()
            );
        }
        if line.trim().is_empty() {
            continue;
        }
        let r: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            UsageError(format!(
                "{}: line {n}: not a cellstream record: {e}",
                path.display()
            ))
        })?;
        let batch = r["batch"].as_str().unwrap_or_default().to_string();
        if batches.last().is_none_or(|b| b.0 != batch) {
            batches.push((batch, RecordsQc::default()));
        }
        let qc = &mut batches.last_mut().expect("pushed above").1;
        qc.cells += 1;
        if r["assigned"].as_bool() == Some(true) {
            qc.assigned += 1;
            *qc.labels
                .entry(r["label"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        if let Some(x) = r["novelty"].as_f64() {
            qc.novelty.push(x);
        }
        for (v, key) in [
            (&mut qc.genes, "n_genes"),
            (&mut qc.umis, "total_counts"),
            (&mut qc.mito, "pct_mito"),
        ] {
            if let Some(x) = r["qc"][key].as_f64() {
                v.push(x);
            }
        }
    }
    let summaries: Vec<serde_json::Value> = batches
        .iter_mut()
        .map(|(batch, qc)| {
            let composition: serde_json::Map<String, serde_json::Value> = qc
                .labels
                .iter()
                .map(|(l, &c)| (l.clone(), json!(c as f64 / qc.assigned.max(1) as f64)))
                .collect();
            json!({
                "batch": batch,
                "cells": qc.cells,
                "assigned": qc.assigned,
                "unassigned_fraction": (qc.cells - qc.assigned) as f64 / qc.cells.max(1) as f64,
                "composition": composition,
                "median_novelty": median_of(&mut qc.novelty),
                "median": {
                    "n_genes": median_of(&mut qc.genes),
                    "total_counts": median_of(&mut qc.umis),
                    "pct_mito": median_of(&mut qc.mito),
                },
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            json!({"records": path.display().to_string(), "batches": summaries})
        );
        return Ok(());
    }
    let cells: usize = batches.iter().map(|b| b.1.cells).sum();
    println!(
        "records:      {}: {} batch(es), {cells} cells",
        path.display(),
        batches.len()
    );
    for s in &summaries {
        let composition: Vec<String> = s["composition"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(l, f)| format!("{l} {:.1}%", 100.0 * f.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        let novelty = s["median_novelty"]
            .as_f64()
            .map_or(String::new(), |n| format!("; median novelty {n:.2}"));
        println!(
            "batch {}: {} cells, {:.1}% unassigned{novelty}; median {:.0} genes, {:.0} UMIs, {:.1}% mito",
            s["batch"].as_str().unwrap_or_default(),
            s["cells"],
            100.0 * s["unassigned_fraction"].as_f64().unwrap_or(0.0),
            s["median"]["n_genes"].as_f64().unwrap_or(0.0),
            s["median"]["total_counts"].as_f64().unwrap_or(0.0),
            s["median"]["pct_mito"].as_f64().unwrap_or(0.0)
        );
        println!("  composition (assigned): {}", composition.join(", "));
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.input.is_file() && is_records(&args.input) {
        return inspect_records(&args.input, args.json);
    }
    if args.input.join("manifest.toml").is_file() {
        return inspect_model(&args.input, args.json);
    }
    if args.input.join("reference.json").is_file() {
        return inspect_reference(&args.input, args.json);
    }
    let vocab = args
        .vocab
        .as_deref()
        .map(Vocab::from_json_file)
        .transpose()?;
    let batch = args.caps.read(&args.input)?;
    let s = summary(&batch, vocab.as_ref());
    if args.json {
        println!("{s}");
        return Ok(());
    }
    println!("input:        {}", batch.source.display());
    println!("format:       {}", s["format"].as_str().unwrap_or_default());
    println!("shape:        {} cells × {} genes", s["cells"], s["genes"]);
    println!(
        "nnz:          {} ({:.2}% dense)",
        s["nnz"],
        s["density"].as_f64().unwrap_or(0.0) * 100.0
    );
    println!(
        "gene names:   {}{}",
        s["gene_name_kind"].as_str().unwrap_or_default(),
        match s["gene_id_kind"].as_str() {
            Some(k) => format!(" (feature ids: {k})"),
            None => String::new(),
        }
    );
    println!(
        "counts:       {} total, median {} per cell, median {} genes per cell",
        s["total_counts"], s["median_counts_per_cell"], s["median_genes_per_cell"]
    );
    if let Some(v) = s.get("vocab") {
        println!(
            "vocabulary:   {} of {} genes ({:.1}%) in a {}-token vocabulary, covering {:.1}% of counts",
            v["genes_matched"],
            s["genes"],
            v["genes_matched_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            v["tokens"],
            v["counts_matched_fraction"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}
