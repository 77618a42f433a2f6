//! Reference mapping at the sizes a facility's own atlas reaches: how many query cells a
//! second the exact kNN labels against references of 10^4 to 10^6 cells, and how long
//! `cellstream reference` takes to calibrate one (its leave-one-out over up to 5,000 cells).
//!
//! `cargo bench --bench reference` prints, per reference size and embedding width:
//! `RESULT reference/build`, `RESULT reference/one-at-a-time` (each cell scans the reference
//! alone, [`Reference::map`]: what `embed --reference` did before batches were mapped
//! together) and `RESULT reference/batch` ([`Reference::map_many`], what `embed` and `serve`
//! run), the ratio of the two, and checks that both give every cell the same mapping.
//!
//! The references are synthetic (clusters of unit vectors: the scan's cost does not depend on
//! the values). `CELLSTREAM_BENCH_REF=CELLSxDIM,...` picks the sizes (default
//! `10000x128,100000x128,1000000x128,100000x512`), `CELLSTREAM_BENCH_QUERIES` the query cells
//! (default 2,000; one-at-a-time runs at most 500 of them on references above 10^5 cells).
//! `CELLSTREAM_BENCH_REF_DUMP=DIR` also writes each reference folder and its query cells
//! (`queries.f32`) under `DIR/CELLSxDIM/`, for the peer: `bench-data/reference_compare.sh`
//! runs this and faiss's exact search (what scGPT's reference-mapping tutorial uses) on the
//! same cells in one run.

use std::hint::black_box;
use std::time::Instant;

use cellstream::reference::{ModelId, Provenance, Reference};
use cellstream::tokenize::rng::CellRng;

const CLUSTERS: usize = 40;

/// `n` cells around `CLUSTERS` random centres, labelled by centre.
fn cells(n: usize, dim: usize, centres: &[Vec<f32>], seed: u64) -> Vec<(String, String, Vec<f32>)> {
    let mut rng = CellRng::for_cell(seed, "reference bench");
    (0..n)
        .map(|i| {
            let c = rng.below(CLUSTERS as u64) as usize;
            let e = (0..dim)
                .map(|j| centres[c][j] + (rng.next_f64() as f32 - 0.5) * 0.8)
                .collect();
            (format!("cell{i}"), format!("type{c}"), e)
        })
        .collect()
}

fn main() {
    let sizes = std::env::var("CELLSTREAM_BENCH_REF")
        .unwrap_or_else(|_| "10000x128,100000x128,1000000x128,100000x512".into());
    let n_queries: usize = std::env::var("CELLSTREAM_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for size in sizes.split(',') {
        let (n, dim) = size
            .split_once('x')
            .and_then(|(n, d)| Some((n.parse::<usize>().ok()?, d.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("CELLSTREAM_BENCH_REF: {size:?} is not CELLSxDIM"));
        let mut rng = CellRng::for_cell(7, "centres");
        let centres: Vec<Vec<f32>> = (0..CLUSTERS)
            .map(|_| (0..dim).map(|_| rng.next_f64() as f32 - 0.5).collect())
            .collect();
        let model = ModelId {
            name: "bench".into(),
            onnx_sha256: "00".repeat(32),
        };
        let t = Instant::now();
        let reference = Reference::build(
            cells(n, dim, &centres, 1),
            dim,
            model,
            Provenance::default(),
        )
        .unwrap();
        let build_s = t.elapsed().as_secs_f64();
        println!("RESULT reference/build cells={n} dim={dim} seconds={build_s:.3}");

        let queries: Vec<Vec<f32>> = cells(n_queries, dim, &centres, 2)
            .into_iter()
            .map(|c| c.2)
            .collect();
        if let Ok(dump) = std::env::var("CELLSTREAM_BENCH_REF_DUMP") {
            let dir = std::path::Path::new(&dump).join(size);
            reference.write(&dir).unwrap();
            let bytes: Vec<u8> = queries
                .iter()
                .flatten()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            std::fs::write(dir.join("queries.f32"), bytes).unwrap();
        }
        let alone = if n > 100_000 {
            n_queries.min(500)
        } else {
            n_queries
        };
        let t = Instant::now();
        let mut nb = reference.neighbours();
        let one: Vec<_> = queries[..alone]
            .iter()
            .map(|q| reference.map(black_box(q), &mut nb))
            .collect();
        let one_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let many = reference.map_many(queries.iter().map(|q| black_box(q.as_slice())));
        let many_s = t.elapsed().as_secs_f64();
        assert_eq!(
            one[..],
            many[..alone],
            "batched and one-at-a-time mappings differ"
        );
        let (one_rate, many_rate) = (alone as f64 / one_s, n_queries as f64 / many_s);
        println!(
            "RESULT reference/one-at-a-time cells={n} dim={dim} queries={alone} cells_per_s={one_rate:.1}"
        );
        println!(
            "RESULT reference/batch cells={n} dim={dim} queries={n_queries} cells_per_s={many_rate:.1} ratio={:.2}",
            many_rate / one_rate
        );
    }
}
