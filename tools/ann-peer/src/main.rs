//! The `hnsw_rs` crate's HNSW as a peer of cellstream's search graph (`cargo bench --bench
//! reference`, `--index hnsw`): on the graph folders the bench writes with
//! `CELLSTREAM_BENCH_REF_DUMP`, the same parameters (M = 32, 64 links on level 0,
//! ef_construction = ef_search = 100, inner product on normalised rows), built on 2 threads,
//! queried one query at a time on 1 thread, k = 10. Prints one `PEER reference/hnsw_rs` line
//! per folder: build seconds, cells/s (median of 3 passes over the queries), and recall of the
//! exact 10 over the first 500 queries.
//!
//!   cargo run --release --manifest-path tools/ann-peer/Cargo.toml -- DIR/graph-CELLSxDIM ...

use std::path::Path;
use std::time::Instant;

use hnsw_rs::prelude::{DistDot, Hnsw};

const K: usize = 10;
const M: usize = 32;
const EF: usize = 100;
const REPEAT: usize = 3;
const RECALL_QUERIES: usize = 500;

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `embedding_dim` from the folder's reference.json, without a JSON dependency.
fn width(dir: &Path) -> usize {
    let json = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let at = json
        .find("\"embedding_dim\"")
        .expect("reference.json: no embedding_dim");
    let rest = &json[at + "\"embedding_dim\"".len()..];
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .expect("reference.json: embedding_dim is not a number")
}

fn normalise(rows: &mut [f32], dim: usize) {
    for row in rows.chunks_exact_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The exact 10 by brute force (not timed).
fn exact(rows: &[f32], query: &[f32], dim: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = rows
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, r)| (dot(r, query), i))
        .collect();
    scored.select_nth_unstable_by(K, |a, b| b.0.total_cmp(&a.0));
    scored.truncate(K);
    scored.into_iter().map(|(_, i)| i).collect()
}

fn main() {
    for dir in std::env::args().skip(1) {
        let dir = Path::new(&dir);
        let dim = width(dir);
        let rows = read_f32(&dir.join("embeddings.f32"));
        let mut queries = read_f32(&dir.join("queries.f32"));
        normalise(&mut queries, dim);
        let cells = rows.len() / dim;
        let n_queries = queries.len() / dim;

        let hnsw = Hnsw::<f32, DistDot>::new(M, cells, 16, EF, DistDot {});
        let items: Vec<(&[f32], usize)> = rows.chunks_exact(dim).zip(0..).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let t = Instant::now();
        pool.install(|| hnsw.parallel_insert_slice(&items));
        let build_s = t.elapsed().as_secs_f64();

        let mut rates = Vec::new();
        for _ in 0..REPEAT {
            let t = Instant::now();
            let mut found = 0usize;
            for q in queries.chunks_exact(dim) {
                found += std::hint::black_box(hnsw.search(q, K, EF)).len();
            }
            assert_eq!(found, n_queries * K);
            rates.push(n_queries as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);

        let sample = n_queries.min(RECALL_QUERIES);
        let hits: usize = queries
            .chunks_exact(dim)
            .take(sample)
            .map(|q| {
                let truth = exact(&rows, q, dim);
                let got = hnsw.search(q, K, EF);
                got.iter().filter(|n| truth.contains(&n.d_id)).count()
            })
            .sum();
        println!(
            "PEER reference/hnsw_rs cells={cells} dim={dim} queries={n_queries} build_s={build_s:.1} cells_per_s_1={:.1} recall_at_k={:.4}",
            rates[REPEAT / 2],
            hits as f64 / (sample * K) as f64
        );
    }
}
