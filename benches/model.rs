//! Model forward in tract, per length bucket, at 1 and 2 threads; and end-to-end `embed`.
//!
//! `cargo bench --bench model` tokenizes pbmc3k with the shipped model's vocabulary, packs the
//! same 64 cells into padded batches for every bucket, shaped as the pipeline shapes them (rows
//! per batch from the token budget), writes them to `target/model-bench/` (so the onnxruntime
//! peer, `bench-data/ort_forward_peer.py`, runs the very same tensors), and prints
//! `RESULT name cells=N median_s=S cells_per_s=X min_s=… max_s=…` lines. `forward/tract/…`
//! rows run the graph as cellstream does (fused where this CPU has the kernels, see
//! `src/model/fuse`, and with `src/model/kernel_choice`'s matmul kernels);
//! `forward/unfused/…` rows, one thread, the same graph on tract's own ops and kernel choice.
//! `CELLSTREAM_MODEL=DIR` benchmarks another package; `CELLSTREAM_TOKEN_BUDGET=T` another
//! token budget (default: the pipeline's). For a large model: `CELLSTREAM_BENCH_BUCKETS=256,512`
//! (these lengths instead of every bucket), `CELLSTREAM_BENCH_CELLS=N` (cells per bucket,
//! default 64), `CELLSTREAM_BENCH_REPEAT=R` (timed runs, default 5) and
//! `CELLSTREAM_BENCH_SKIP=unfused,embed` (rows left out). `CELLSTREAM_PRECISION=int8` (or `f32`)
//! runs the products by constant weights in that precision, whatever the package says.

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cellstream::batch::{read_batch, ReadOptions};
use cellstream::config::DEFAULT_TOKEN_BUDGET;
use cellstream::embed::{EmbedConfig, Embedder};
use cellstream::model::chunking::{buckets, rows_for};
use cellstream::model::{ModelInput, ModelPackage, ModelRuntime, Options, Worker};
use cellstream::tokenize::{Tokenizer, TokenizerConfig};

/// A number from the environment variable `var`, else `default`.
fn knob(var: &str, default: usize) -> usize {
    std::env::var(var).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{var}: a number"))
    })
}

fn report(name: &str, cells: usize, mut times: Vec<f64>) {
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "RESULT {name} cells={cells} median_s={median:.6} cells_per_s={:.1} min_s={:.6} max_s={:.6}",
        cells as f64 / median,
        times[0],
        times[times.len() - 1]
    );
}

fn time(repeat: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    (0..repeat)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

fn write_batches(dir: &Path, s: usize, batches: &[ModelInput]) {
    let path = dir.join(format!("S{s}-N{}-B{}.bin", batches[0].n, batches.len()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for b in batches {
        f.write_all(bytemuck::cast_slice(&b.gene_ids)).unwrap();
    }
    for b in batches {
        f.write_all(bytemuck::cast_slice(&b.values)).unwrap();
    }
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_dir = std::env::var_os("CELLSTREAM_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("models/pbmc-compact"));
    let token_budget = std::env::var("CELLSTREAM_TOKEN_BUDGET")
        .map(|t| {
            t.parse()
                .expect("CELLSTREAM_TOKEN_BUDGET: a number of tokens")
        })
        .unwrap_or(DEFAULT_TOKEN_BUDGET);
    println!("token budget {token_budget}");
    let pkg = ModelPackage::load(&model_dir).unwrap();
    let rt = ModelRuntime::new(&pkg).unwrap();
    println!(
        "fusion {} ({} attention layers, {} LayerNorms fused, {} token tables), kernels {} (matmuls {}: {} products on ours), precision {} ({} int8 products)",
        rt.options.fusion.name(),
        rt.fused.attention_layers,
        rt.fused.layer_norms,
        rt.fused.token_tables,
        rt.options.simd.name(),
        rt.options.kernels.name(),
        rt.fused.f32_products,
        rt.precision.name(),
        rt.fused.int8_products
    );
    // The same graph on tract's own ops and kernel choice alone at the same tier, one
    // thread: what the fused ops and the kernel choice add.
    let unfused = Options::unfused(rt.options.simd);
    let skip = std::env::var("CELLSTREAM_BENCH_SKIP").unwrap_or_default();
    let unfused = (rt.options != unfused && !skip.contains("unfused"))
        .then(|| ModelRuntime::with(&pkg, unfused).unwrap());
    let (cells_per_bucket, repeat) = (
        knob("CELLSTREAM_BENCH_CELLS", 64),
        knob("CELLSTREAM_BENCH_REPEAT", 5),
    );
    let lengths: Vec<usize> = match std::env::var("CELLSTREAM_BENCH_BUCKETS") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse().expect("CELLSTREAM_BENCH_BUCKETS: lengths"))
            .collect(),
        Err(_) => buckets(rt.max_len),
    };
    let input = repo.join("bench-data/pbmc3k");
    let batch = read_batch(&input, &ReadOptions::default()).unwrap();
    let genes = pkg.vocab.map_genes(&batch.gene_names);
    let cfg = TokenizerConfig {
        n_bins: pkg.manifest.n_bins,
        max_len: pkg.manifest.max_len,
        pad_value: pkg.manifest.pad_value,
        ..TokenizerConfig::default()
    };
    let tokens = Tokenizer::new(&pkg.vocab, cfg).tokenize(&batch, &genes);
    let out_dir = repo.join("target/model-bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();

    // For every bucket the first cells with at least S tokens (as many as there are, the
    // shortest of the rest after them), cut to S tokens (<cls> and their first S-1 genes):
    // every row full where the data allows, so that the forward cost depends on S alone and
    // no side gains from skipping padding.
    for s in lengths {
        let mut by_fit: Vec<usize> = (0..tokens.n_cells()).collect();
        by_fit.sort_by_key(|&i| std::cmp::Reverse(tokens.cell(i).0.len().min(s)));
        let cells_used = &by_fit[..cells_per_bucket.min(by_fit.len())];
        let n = rows_for(s, token_budget).min(cells_per_bucket.div_ceil(2));
        let batches: Vec<ModelInput> = cells_used
            .chunks(n)
            .map(|rows| {
                let mut b = ModelInput::new(n, s);
                for (r, &i) in rows.iter().enumerate() {
                    let (ids, values) = tokens.cell(i);
                    let k = ids.len().min(s);
                    b.set_row(r, &ids[..k], &values[..k], rt.pad_id, rt.pad_value);
                }
                b
            })
            .collect();
        write_batches(&out_dir, s, &batches);
        let cells = n * batches.len();
        let mut worker = Worker::new(rt.clone());
        let t1 = time(repeat, || {
            for b in &batches {
                black_box(worker.run(b).unwrap());
            }
        });
        report(&format!("forward/tract/S{s}/t1"), cells, t1);
        if let Some(unfused) = &unfused {
            let mut worker = Worker::new(unfused.clone());
            let t = time(repeat, || {
                for b in &batches {
                    black_box(worker.run(b).unwrap());
                }
            });
            report(&format!("forward/unfused/S{s}/t1"), cells, t);
        }
        // Two threads: two workers (one tract State each) on half the batches each.
        let mut workers = [Worker::new(rt.clone()), Worker::new(rt.clone())];
        let t2 = time(repeat, || {
            std::thread::scope(|sc| {
                for (w, half) in workers
                    .iter_mut()
                    .zip(batches.chunks(batches.len().div_ceil(2)))
                {
                    sc.spawn(move || {
                        for b in half {
                            black_box(w.run(b).unwrap());
                        }
                    });
                }
            });
        });
        report(&format!("forward/tract/S{s}/t2"), cells, t2);
    }

    // End to end: read + tokenize + infer + results, all of pbmc3k.
    for threads in [1, 2] {
        if skip.contains("embed") {
            break;
        }
        let pkg = ModelPackage::load(&model_dir).unwrap();
        let mut embedder = Embedder::new(
            pkg,
            EmbedConfig {
                threads,
                token_budget,
                ..EmbedConfig::default()
            },
        )
        .unwrap();
        let times = time(1, || {
            let b = read_batch(&input, &ReadOptions::default()).unwrap();
            black_box(embedder.embed(&b).unwrap());
        });
        report(&format!("embed/pbmc3k/t{threads}"), batch.n_cells(), times);
    }
}
