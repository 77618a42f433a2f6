"""The peer of `cargo bench --bench reference`: faiss's exact inner-product search
(`IndexFlatIP`, what scGPT's reference-mapping tutorial builds) over the same reference folders
and query cells, k = 10, at 1 and 2 threads. Prints `PEER reference/faiss ...` lines. For the
bench's `graph-*` folders, faiss's HNSW instead (`IndexHNSWFlat`, inner product, M = 32,
efConstruction = efSearch = 100: the parameters of cellstream's graph): build time on 2
threads, cells/s at 1 and 2 threads, and recall of the exact 10 over the first 500 queries
(`PEER reference/faiss-hnsw ...`).

  .venv-bench/bin/python bench-data/reference_peer.py DIR/CELLSxDIM [...]

Each DIR is what the bench writes with CELLSTREAM_BENCH_REF_DUMP: a reference folder
(`reference.json`, `embeddings.f32`: normalised rows) and `queries.f32`. Queries are
normalised here, as cellstream does; the vote is not timed (it is the same few operations
either way)."""
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

K = 10
REPEAT = 3



def rate(index, q):
    """Queries a second, the median of REPEAT searches."""
    times = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        index.search(q, K)
        times.append(time.perf_counter() - t)
    return len(q) / sorted(times)[REPEAT // 2]


for d in map(Path, sys.argv[1:]):
    dim = json.loads((d / "reference.json").read_text())["embedding_dim"]
    ref = np.fromfile(d / "embeddings.f32", dtype="<f4").reshape(-1, dim)
    q = np.fromfile(d / "queries.f32", dtype="<f4").reshape(-1, dim)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(ref)
    if not d.name.startswith("graph-"):
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            print(f"PEER reference/faiss cells={len(ref)} dim={dim} queries={len(q)} "
                  f"threads={threads} cells_per_s={rate(flat, q):.1f}", flush=True)
        continue
    faiss.omp_set_num_threads(2)
    _, exact = flat.search(q[:500], K)
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 100
    t = time.perf_counter()
    hnsw.add(ref)
    build = time.perf_counter() - t
    hnsw.hnsw.efSearch = 100
    _, found = hnsw.search(q[:500], K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, found)])
    rates = []
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        rates.append(rate(hnsw, q))
    print(f"PEER reference/faiss-hnsw cells={len(ref)} dim={dim} queries={len(q)} "
          f"build_s={build:.1f} cells_per_s_1={rates[0]:.1f} cells_per_s_2={rates[1]:.1f} "
          f"recall_at_k={recall:.4f}", flush=True)
