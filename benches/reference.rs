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
//!
//! Then the search graph (`cellstream reference --index hnsw`), for the sizes in
//! `CELLSTREAM_BENCH_GRAPH` (default `100000x128,1000000x128`; empty skips it), on cells of a
//! lower intrinsic dimension (each cluster a random 12-dimensional patch, as embeddings are;
//! a graph's recall depends on the data, unlike the scan): `RESULT reference/graph-build`
//! (graph and calibration), `RESULT reference/graph-load` (reading the folder back),
//! `RESULT reference/graph` (batched queries through the graph, and the exact scan's batched
//! rate on the same cells as the peer), `RESULT reference/graph-recall` (neighbours found of
//! the exact 10, over at most 500 queries) and `RESULT reference/graph-agreement` (queries
//! whose label and `assigned` match the exact scan's, and the largest novelty difference).
//! With `CELLSTREAM_BENCH_REF_DUMP=DIR` these cells go to `DIR/graph-CELLSxDIM/` too, for
//! faiss's HNSW on the same cells.

use std::hint::black_box;
use std::time::Instant;

use cellstream::reference::{ModelId, Provenance, Reference, Search};
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

/// `n` cells on `CLUSTERS` patches of dimension `PATCH` (a centre plus a random basis),
/// with a little isotropic noise, labelled by patch.
fn patch_cells(n: usize, dim: usize, seed: u64) -> Vec<(String, String, Vec<f32>)> {
    const PATCH: usize = 12;
    let mut rng = CellRng::for_cell(11, "patches");
    let normal = |rng: &mut CellRng| {
        let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let patches: Vec<(Vec<f32>, Vec<Vec<f32>>)> = (0..CLUSTERS)
        .map(|_| {
            let centre = (0..dim).map(|_| normal(&mut rng)).collect();
            let basis = (0..PATCH)
                .map(|_| (0..dim).map(|_| normal(&mut rng) * 0.3).collect())
                .collect();
            (centre, basis)
        })
        .collect();
    let mut rng = CellRng::for_cell(seed, "patch cells");
    (0..n)
        .map(|i| {
            let c = rng.below(CLUSTERS as u64) as usize;
            let (centre, basis) = &patches[c];
            let mut e: Vec<f32> = centre.clone();
            for b in basis {
                let z = normal(&mut rng);
                e.iter_mut().zip(b).for_each(|(x, y)| *x += z * y);
            }
            e.iter_mut().for_each(|x| *x += normal(&mut rng) * 0.05);
            (format!("cell{i}"), format!("type{c}"), e)
        })
        .collect()
}

/// With `CELLSTREAM_BENCH_REF_DUMP=DIR`: the reference folder and its query cells
/// (`queries.f32`) under `DIR/name/`, for the peer.
fn dump(name: &str, reference: &Reference, queries: &[Vec<f32>]) {
    let Ok(dump) = std::env::var("CELLSTREAM_BENCH_REF_DUMP") else {
        return;
    };
    let dir = std::path::Path::new(&dump).join(name);
    reference.write(&dir).unwrap();
    let bytes: Vec<u8> = queries
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(dir.join("queries.f32"), bytes).unwrap();
}

fn model() -> ModelId {
    ModelId {
        name: "bench".into(),
        onnx_sha256: "00".repeat(32),
    }
}

/// The graph against the exact scan on the same cells.
fn graph(n: usize, dim: usize, n_queries: usize) {
    let cells = patch_cells(n, dim, 1);
    let exact = Reference::build(
        cells.clone(),
        dim,
        model(),
        Provenance::default(),
        Search::Exact,
    )
    .unwrap();
    let t = Instant::now();
    let graph = Reference::build(cells, dim, model(), Provenance::default(), Search::Hnsw).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    println!("RESULT reference/graph-build cells={n} dim={dim} seconds={build_s:.1}");
    let dir = tempfile::tempdir().unwrap();
    graph.write(dir.path()).unwrap();
    let bytes = std::fs::metadata(dir.path().join("index.hnsw"))
        .unwrap()
        .len();
    let t = Instant::now();
    let graph = Reference::load(dir.path(), None).unwrap();
    println!(
        "RESULT reference/graph-load cells={n} dim={dim} seconds={:.2} index_bytes={bytes}",
        t.elapsed().as_secs_f64()
    );
    drop(dir);

    let queries: Vec<Vec<f32>> = patch_cells(n_queries, dim, 2)
        .into_iter()
        .map(|c| c.2)
        .collect();
    dump(&format!("graph-{n}x{dim}"), &exact, &queries);
    let t = Instant::now();
    let want = exact.map_many(queries.iter().map(|q| black_box(q.as_slice())), None);
    let exact_rate = n_queries as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let got = graph.map_many(queries.iter().map(|q| black_box(q.as_slice())), None);
    let graph_rate = n_queries as f64 / t.elapsed().as_secs_f64();
    println!(
        "RESULT reference/graph cells={n} dim={dim} queries={n_queries} cells_per_s={graph_rate:.1} exact_cells_per_s={exact_rate:.1} ratio={:.2}",
        graph_rate / exact_rate
    );
    let sample = n_queries.min(500);
    let (mut nb_e, mut nb_g) = (exact.neighbours(), graph.neighbours());
    let mut found = 0;
    for q in &queries[..sample] {
        exact.map(q, None, &mut nb_e);
        graph.map(q, None, &mut nb_g);
        found += nb_g
            .sorted()
            .iter()
            .filter(|g| nb_e.sorted().iter().any(|e| e.1 == g.1))
            .count();
    }
    println!(
        "RESULT reference/graph-recall cells={n} dim={dim} queries={sample} recall_at_k={:.4}",
        found as f64 / (sample * exact.meta.k) as f64
    );
    let same = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w.label == g.label && w.assigned == g.assigned)
        .count();
    let novelty = want
        .iter()
        .zip(&got)
        .map(|(w, g)| (w.novelty - g.novelty).abs())
        .fold(0f32, f32::max);
    println!(
        "RESULT reference/graph-agreement cells={n} dim={dim} queries={n_queries} same_label_and_assigned={:.4} max_novelty_difference={novelty:.4}",
        same as f64 / n_queries as f64
    );
}

fn main() {
    let sizes = std::env::var("CELLSTREAM_BENCH_REF")
        .unwrap_or_else(|_| "10000x128,100000x128,1000000x128,100000x512".into());
    let n_queries: usize = std::env::var("CELLSTREAM_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for size in sizes.split(',').filter(|s| !s.is_empty()) {
        let (n, dim) = size
            .split_once('x')
            .and_then(|(n, d)| Some((n.parse::<usize>().ok()?, d.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("CELLSTREAM_BENCH_REF: {size:?} is not CELLSxDIM"));
        let mut rng = CellRng::for_cell(7, "centres");
        let centres: Vec<Vec<f32>> = (0..CLUSTERS)
            .map(|_| (0..dim).map(|_| rng.next_f64() as f32 - 0.5).collect())
            .collect();
        let t = Instant::now();
        let reference = Reference::build(
            cells(n, dim, &centres, 1),
            dim,
            model(),
            Provenance::default(),
            Search::Exact,
        )
        .unwrap();
        let build_s = t.elapsed().as_secs_f64();
        println!("RESULT reference/build cells={n} dim={dim} seconds={build_s:.3}");

        let queries: Vec<Vec<f32>> = cells(n_queries, dim, &centres, 2)
            .into_iter()
            .map(|c| c.2)
            .collect();
        dump(size, &reference, &queries);
        let alone = if n > 100_000 {
            n_queries.min(500)
        } else {
            n_queries
        };
        let t = Instant::now();
        let mut nb = reference.neighbours();
        let one: Vec<_> = queries[..alone]
            .iter()
            .map(|q| reference.map(black_box(q), None, &mut nb))
            .collect();
        let one_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let many = reference.map_many(queries.iter().map(|q| black_box(q.as_slice())), None);
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
    let graphs =
        std::env::var("CELLSTREAM_BENCH_GRAPH").unwrap_or_else(|_| "100000x128,1000000x128".into());
    for size in graphs.split(',').filter(|s| !s.is_empty()) {
        let (n, dim) = size
            .split_once('x')
            .and_then(|(n, d)| Some((n.parse::<usize>().ok()?, d.parse::<usize>().ok()?)))
            .unwrap_or_else(|| panic!("CELLSTREAM_BENCH_GRAPH: {size:?} is not CELLSxDIM"));
        graph(n, dim, n_queries);
    }
}
