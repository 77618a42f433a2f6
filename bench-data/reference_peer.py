"""The peer of `cargo bench --bench reference`: faiss's exact inner-product search
(`IndexFlatIP`, what scGPT's reference-mapping tutorial builds) over the same reference folders
and query cells, k = 10, at 1 and 2 threads. Prints `PEER reference/faiss ...` lines.

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

for d in map(Path, sys.argv[1:]):
    dim = json.loads((d / "reference.json").read_text())["embedding_dim"]
    ref = np.fromfile(d / "embeddings.f32", dtype="<f4").reshape(-1, dim)
    q = np.fromfile(d / "queries.f32", dtype="<f4").reshape(-1, dim)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(ref)
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        times = []
        for _ in range(REPEAT):
            t = time.perf_counter()
            index.search(q, K)
            times.append(time.perf_counter() - t)
        best = sorted(times)[REPEAT // 2]
        print(f"PEER reference/faiss cells={len(ref)} dim={dim} queries={len(q)} "
              f"threads={threads} cells_per_s={len(q) / best:.1f}", flush=True)
