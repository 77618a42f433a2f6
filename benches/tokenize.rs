//! Tokenizer throughput on the real pbmc3k batch (all 2,638 cells), one thread.
//!
//! `cargo bench --bench tokenize` prints one `RESULT name cells=N median_s=S cells_per_s=X`
//! line per benchmark (min and max beside it); `bench-data/tokenize_compare.sh` runs this and
//! scGPT's own Python tokenization in the same run and prints the ratio.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use cellstream::batch::{read_batch, write_csb_file, ReadOptions};
use cellstream::simd::Simd;
use cellstream::tokenize::{TieMode, TokenBatch, Tokenizer, TokenizerConfig, Vocab};

const REPEAT: usize = 20;

/// Runs `f` twice to warm up, then `REPEAT` times; prints and returns the median seconds.
/// `cargo bench --bench tokenize -- NAME` runs only the benchmarks whose name contains NAME.
fn bench(name: &str, cells: usize, mut f: impl FnMut()) -> f64 {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !name.contains(&f)) {
        return 0.0;
    }
    f();
    f();
    let mut times: Vec<f64> = (0..REPEAT)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[REPEAT / 2];
    println!(
        "RESULT {name} cells={cells} median_s={median:.6} cells_per_s={:.1} min_s={:.6} max_s={:.6}",
        cells as f64 / median,
        times[0],
        times[REPEAT - 1]
    );
    median
}

/// What scGPT's DataCollator hands the model: every cell padded to `max_len`.
fn pad(tokens: &TokenBatch, max_len: usize, pad_id: i64, ids: &mut [i64], values: &mut [f32]) {
    for i in 0..tokens.n_cells() {
        let (gid, val) = tokens.cell(i);
        let row = i * max_len..(i + 1) * max_len;
        let (ids, values) = (&mut ids[row.clone()], &mut values[row]);
        for (dst, &id) in ids.iter_mut().zip(gid) {
            *dst = id as i64;
        }
        values[..val.len()].copy_from_slice(val);
        ids[gid.len()..].fill(pad_id);
        values[val.len()..].fill(-2.0);
    }
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let input = repo.join("bench-data/pbmc3k");
    let vocab =
        Vocab::from_json_file(&repo.join("tests/fixtures/scgpt_default_gene_vocab.json")).unwrap();
    let opts = ReadOptions::default();
    let batch = read_batch(&input, &opts).unwrap();
    let n = batch.n_cells();
    let genes = vocab.map_genes(&batch.gene_names);

    for (name, ties) in [("seeded", TieMode::Seeded), ("numpy", TieMode::Numpy)] {
        let cfg = TokenizerConfig {
            ties,
            ..TokenizerConfig::default()
        };
        let mut tok = Tokenizer::new(&vocab, cfg);
        // Output buffers recycled between batches, as a pipeline does in steady state.
        let mut out = TokenBatch::default();
        bench(&format!("tokenize/pbmc3k-{name}"), n, || {
            tok.tokenize_into(black_box(&batch), &genes, &mut out);
            black_box(&out);
        });
    }

    // The portable loops, for CPUs without AVX2 (the rows above use the fastest this CPU has).
    if Simd::detect() != Simd::Portable {
        let mut tok = Tokenizer::with_kernels(&vocab, TokenizerConfig::default(), Simd::Portable);
        let mut out = TokenBatch::default();
        bench("tokenize/pbmc3k-seeded-scalar", n, || {
            tok.tokenize_into(black_box(&batch), &genes, &mut out);
            black_box(&out);
        });
    }

    // Tokenize and pad to max_len, the whole of what scGPT's collator produces per cell.
    let max_len = TokenizerConfig::default().max_len;
    let mut tok = Tokenizer::new(&vocab, TokenizerConfig::default());
    let mut ids = vec![0i64; n * max_len];
    let mut values = vec![0f32; n * max_len];
    let mut t = TokenBatch::default();
    bench("tokenize/pbmc3k-seeded-padded", n, || {
        tok.tokenize_into(black_box(&batch), &genes, &mut t);
        pad(&t, max_len, vocab.pad_id as i64, &mut ids, &mut values);
        black_box((&ids, &values));
    });

    // Readers, for scale: what a batch costs before tokenization.
    let dir = std::env::temp_dir().join(format!("cellstream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csb = dir.join("pbmc3k.csb");
    let zst = dir.join("pbmc3k.csb.zst");
    write_csb_file(&batch, &csb).unwrap();
    write_csb_file(&batch, &zst).unwrap();
    for (name, path) in [
        ("mtx-gz", input.as_path()),
        ("csb", csb.as_path()),
        ("csb-zst", zst.as_path()),
    ] {
        bench(&format!("read/pbmc3k-{name}"), n, || {
            black_box(read_batch(path, &opts).unwrap());
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}
