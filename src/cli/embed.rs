use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use cellstream::batch::{BatchError, CountBatch};
use cellstream::config::EmbeddingEncoding;
use cellstream::embed::{EmbedConfig, Embedder};
use cellstream::model::{default_model_dir, ModelPackage};
use cellstream::sink::{ndjson, parquet::ParquetWriter};
use crossbeam_channel::{bounded, Receiver};

#[derive(clap::Args)]
pub struct Args {
    /// Batches to embed, in order (any readable format).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Model package directory (default: the shipped models/pbmc-compact).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output file: NDJSON ("-" for stdout), or a Parquet table when the name ends in
    /// `.parquet` (a row per cell, the embedding a fixed-size list of float32).
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// Inference threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run seed (tie draws and subsampling are keyed by it and the barcode).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How records carry the embedding: "array" of numbers, or "base64" (`embedding_b64`:
    /// the f32 values' little-endian bytes).
    #[arg(long, value_enum, default_value = "array")]
    embedding: EmbeddingEncoding,
    /// Label cells by their nearest cells in this reference folder (`cellstream reference`),
    /// adding `novelty` to each record, instead of by the model's classifier head.
    #[arg(long)]
    reference: Option<PathBuf>,
    #[command(flatten)]
    caps: super::InputCaps,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    // The inputs are read one ahead on their own thread, from before the model loads: while
    // batch k runs through the inference workers, batch k+1 is parsed, so the workers do not
    // wait for the reader between batches. A failed read stops the run at that input, in
    // order, as a sequential loop would.
    // The sender moves into the reader thread: its end ends the consumer's loop.
    let (batches, ready) = bounded(0);
    let inputs = &args.inputs;
    let caps = args.caps;
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("read".into())
            .spawn_scoped(scope, move || {
                for input in inputs {
                    let read = caps.read(input);
                    let failed = read.is_err();
                    if batches.send(read).is_err() || failed {
                        break;
                    }
                }
            })
            .context("spawning the reader thread")?;
        embed_all(&args, start, ready)
    })
}

/// Embeds the batches `ready` delivers, in input order, writing each as it completes.
fn embed_all(
    args: &Args,
    start: Instant,
    ready: Receiver<Result<CountBatch, BatchError>>,
) -> anyhow::Result<()> {
    let model_dir = args.model.clone().unwrap_or_else(default_model_dir);
    let package = ModelPackage::load(&model_dir)?;
    let cfg = EmbedConfig {
        threads: args.threads.max(1),
        seed: args.seed,
        ..EmbedConfig::default()
    };
    let mut embedder = Embedder::new(package, cfg)?;
    if let Some(dir) = &args.reference {
        let reference = embedder.load_reference(dir)?;
        embedder.set_reference(std::sync::Arc::new(reference));
    }
    // Every bucket's plan now (while the reader reads), then the parsed graph goes.
    embedder.warm_up()?;
    eprintln!(
        "model {} loaded and warmed in {:.2} s",
        model_dir.display(),
        start.elapsed().as_secs_f64()
    );

    let writing = || format!("writing {}", args.out.display());
    let mut out = if args.out.to_string_lossy().ends_with(".parquet") {
        let file = std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?;
        let dim = embedder.package.manifest.embedding_dim;
        let table = ParquetWriter::new(std::io::BufWriter::new(file), dim).with_context(writing)?;
        Output::Parquet(Box::new(table))
    } else {
        Output::Ndjson(super::open_output(&args.out)?)
    };
    // Cells are counted as each batch arrives (they are read one ahead).
    let bar = super::progress::cells(0);
    let mut cells = 0usize;
    for (k, batch) in ready.iter().enumerate() {
        let batch = batch?;
        bar.inc_length(batch.n_cells() as u64);
        bar.set_message(format!(
            "{} ({}/{})",
            batch.batch_id(),
            k + 1,
            args.inputs.len()
        ));
        let results = embedder.embed_with_progress(&batch, &mut |n| bar.inc(n as u64))?;
        match &mut out {
            Output::Ndjson(w) => ndjson::write_batch(
                w,
                &batch.batch_id(),
                &batch.barcodes,
                &results,
                args.embedding,
            ),
            Output::Parquet(w) => w.write_batch(&batch.batch_id(), &batch.barcodes, &results),
        }
        .with_context(writing)?;
        cells += results.len();
    }
    bar.finish_and_clear();
    match out {
        Output::Ndjson(mut w) => w.flush(),
        Output::Parquet(w) => w.finish().and_then(|mut w| w.flush()),
    }
    .with_context(writing)?;
    eprintln!(
        "embedded {cells} cells from {} batch(es) in {:.2} s with {}",
        args.inputs.len(),
        start.elapsed().as_secs_f64(),
        model_dir.display()
    );
    Ok(())
}

/// Where `embed` writes its records.
enum Output {
    Ndjson(std::io::BufWriter<Box<dyn Write>>),
    Parquet(Box<ParquetWriter<std::io::BufWriter<std::fs::File>>>),
}
