//! Large realistic batches for benchmarks: real pbmc3k cells drawn with replacement, each
//! thinned to a random fraction of its reads (binomial thinning, as a shallower run would
//! have sequenced it), written as `.csb` batches.
//!
//! ```sh
//! cargo run --release --example resample -- [--cells 100000] [--batch-cells 5000] \
//!     [--seed 1] [--min-depth 0.3] [--format csb|mtx|mtx.gz] [--out bench-data/generated]
//! ```
//!
//! `--format mtx` writes each batch as a 10x v3 Matrix Market directory (`matrix.mtx`,
//! `features.tsv`, `barcodes.tsv`; entries sorted by cell, as Cell Ranger writes them), and
//! `mtx.gz` the same members gzipped: the inputs of the reader benchmarks and the memory
//! tests (docs/robustness.md, "Bounded memory").
//!
//! Every cell keeps a real cell's gene profile (so tokenizing and the model see realistic
//! sequences: cells of pbmc3k carry ~850 expressed genes, ~780 of them in the vocabulary);
//! thinning each count `c` to Binomial(c, p) with `p` uniform in [min-depth, 1] spreads the
//! read depth the way runs of different depth do, and drops genes whose counts thin to zero.
//! Barcodes are the source barcode plus `-r<draw>`, unique. Deterministic for a seed.

use std::path::PathBuf;

use cellstream::batch::{read_batch, write_csb_file, CountBatch, CsrArrays, ReadOptions};
use cellstream::tokenize::rng::Mt19937;

/// Uniform draws from the tokenizer's generator (numpy's MT19937).
trait Draws {
    fn below(&mut self, n: usize) -> usize;
    /// Binomial(n, p) by n Bernoulli draws: counts are small (median 1, rarely > 100).
    fn binomial(&mut self, n: u32, p: f64) -> u32;
}

impl Draws for Mt19937 {
    fn below(&mut self, n: usize) -> usize {
        ((self.next_f64() * n as f64) as usize).min(n - 1)
    }

    fn binomial(&mut self, n: u32, p: f64) -> u32 {
        (0..n).filter(|_| self.next_f64() < p).count() as u32
    }
}

struct Args {
    cells: usize,
    batch_cells: usize,
    seed: u32,
    min_depth: f64,
    source: PathBuf,
    out: PathBuf,
    format: String,
}

fn parse_args() -> Args {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        cells: 100_000,
        batch_cells: 5_000,
        seed: 1,
        min_depth: 0.3,
        source: repo.join("bench-data/pbmc3k"),
        out: repo.join("bench-data/generated"),
        format: "csb".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--cells" => a.cells = number(&flag, &value),
            "--batch-cells" => a.batch_cells = number(&flag, &value),
            "--seed" => a.seed = number(&flag, &value),
            "--min-depth" => a.min_depth = number(&flag, &value),
            "--source" => a.source = value.into(),
            "--out" => a.out = value.into(),
            "--format" if ["csb", "mtx", "mtx.gz"].contains(&value.as_str()) => a.format = value,
            _ => {
                panic!("unknown flag {flag}; see the comment at the top of bench-data/resample.rs")
            }
        }
    }
    assert!(
        a.cells > 0 && a.batch_cells > 0,
        "--cells and --batch-cells must be > 0"
    );
    assert!(
        (0.0..=1.0).contains(&a.min_depth),
        "--min-depth is a fraction"
    );
    a
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> T
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .unwrap_or_else(|e| panic!("{flag} {value}: {e}"))
}

/// `n` cells drawn from `src` with replacement, each thinned; draw numbers start at `first`.
fn resample(src: &CountBatch, n: usize, first: usize, a: &Args, rng: &mut Mt19937) -> CountBatch {
    let mut indptr = Vec::with_capacity(n + 1);
    indptr.push(0u64);
    let (mut indices, mut data) = (Vec::new(), Vec::new());
    let mut barcodes = Vec::with_capacity(n);
    for k in 0..n {
        let i = rng.below(src.n_cells());
        let p = a.min_depth + (1.0 - a.min_depth) * rng.next_f64();
        let cell = src.cell(i);
        for (&g, &c) in cell.genes.iter().zip(cell.counts) {
            let t = rng.binomial(c, p);
            if t > 0 {
                indices.push(g);
                data.push(t);
            }
        }
        // A cell thinned to nothing keeps one read of its first gene: batches hold cells.
        if indices.len() as u64 == *indptr.last().unwrap() && !cell.genes.is_empty() {
            indices.push(cell.genes[0]);
            data.push(1);
        }
        indptr.push(indices.len() as u64);
        barcodes.push(format!("{}-r{}", src.barcodes[i], first + k));
    }
    CountBatch::from_csr(
        src.source.clone(),
        src.format,
        src.gene_names.clone(),
        src.gene_ids.clone(),
        barcodes,
        CsrArrays {
            indptr,
            indices,
            data,
        },
    )
    .expect("thinned rows of a valid batch form a valid batch")
}

fn main() {
    let a = parse_args();
    let src = read_batch(&a.source, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("reading {}: {e}", a.source.display()));
    std::fs::create_dir_all(&a.out).unwrap();
    let mut rng = Mt19937::new(a.seed);
    let (mut done, mut k, mut entries) = (0, 0, 0);
    while done < a.cells {
        let n = a.batch_cells.min(a.cells - done);
        let batch = resample(&src, n, done, &a, &mut rng);
        let name = format!("pbmc3k-resampled-s{}-{:04}", a.seed, k);
        match a.format.as_str() {
            "csb" => write_csb_file(&batch, &a.out.join(format!("{name}.csb")))
                .unwrap_or_else(|e| panic!("{e}")),
            f => write_mtx_dir(&batch, &a.out.join(name), f == "mtx.gz")
                .unwrap_or_else(|e| panic!("{e}")),
        }
        entries += batch.nnz();
        done += n;
        k += 1;
    }
    eprintln!(
        "wrote {k} batches, {done} cells, {entries} entries ({:.0} per cell) to {}",
        entries as f64 / done as f64,
        a.out.display()
    );
}

/// `batch` as a 10x v3 Matrix Market directory, each member gzipped when `gz`.
fn write_mtx_dir(batch: &CountBatch, dir: &std::path::Path, gz: bool) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let member = |name: &str| -> std::io::Result<Box<dyn Write>> {
        let file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(dir.join(if gz {
                format!("{name}.gz")
            } else {
                name.into()
            }))?,
        );
        Ok(if gz {
            Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::default(),
            ))
        } else {
            Box::new(file)
        })
    };
    let mut m = member("matrix.mtx")?;
    writeln!(m, "%%MatrixMarket matrix coordinate integer general")?;
    writeln!(
        m,
        "%metadata_json: {{\"generator\": \"bench-data/resample.rs\"}}"
    )?;
    writeln!(m, "{} {} {}", batch.n_genes(), batch.n_cells(), batch.nnz())?;
    for i in 0..batch.n_cells() {
        let cell = batch.cell(i);
        for (&g, &c) in cell.genes.iter().zip(cell.counts) {
            writeln!(m, "{} {} {c}", g + 1, i + 1)?;
        }
    }
    m.flush()?;
    drop(m);
    let ids = batch.gene_ids.as_ref().unwrap_or(&batch.gene_names);
    let mut f = member("features.tsv")?;
    for (id, name) in ids.iter().zip(&batch.gene_names) {
        writeln!(f, "{id}\t{name}\tGene Expression")?;
    }
    f.flush()?;
    drop(f);
    let mut b = member("barcodes.tsv")?;
    for bc in &batch.barcodes {
        writeln!(b, "{bc}")?;
    }
    b.flush()
}
