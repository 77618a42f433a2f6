#!/usr/bin/env python3
"""This CPU's single-core sgemm peak (numpy's OpenBLAS, float32), on a large square product and
on the matmul shapes of the model's forward pass at one length bucket, and the share of that
peak a forward pass achieves at a given throughput.

    OPENBLAS_NUM_THREADS=1 python bench-data/sgemm_peak.py [--tract-cells-per-s X] [--s 256]
        [--shape compact|whole-human]

The model's shapes (compact: d_model 128, 4 heads, FFN 256, 4 layers, models/pbmc-compact/README.md;
whole-human: d_model 512, 8 heads, FFN 512, 12 layers, scGPT's whole-human checkpoint):
the value encoder's S x d x d, then per layer and cell of S tokens, Q/K/V and output
projections S x d x 4d, the FFN S x d x 2 dff, attention scores and weighted sum 2 x heads x S
x S x d/heads; the last layer as exported: keys and values for S tokens, everything else for the
<cls> row alone. 2 FLOPs per multiply-add. The share of peak counts the FLOPs cellstream's plan
executes: the graph's, less the products its token tables replace (value encoder, and the first
layer's Q/K/V projection where its tables fit: the compact model's, not a 48k-gene vocabulary's)
and with the last layer's keys and values replaced by the one-query attention
(src/model/fuse/token_tables.rs, cls_attention.rs); the graph's count is printed beside it.
Prints `SGEMM shape=... gflops=...` lines, then `PEAK gflops=...` and, given a throughput,
`ACHIEVED gflops=... percent_of_peak=...`.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse, time

import numpy as np


def gflops(m, k, n, seconds=0.5):
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    best, t_end = float("inf"), time.perf_counter() + seconds
    reps = max(1, int(2e8 / (m * k * n)))
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(reps):
            np.matmul(a, b, out=c)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best / 1e9


SHAPES = {  # d_model, heads, FFN width, layers, first layer's Q/K/V folded into token tables
    "compact": (128, 4, 256, 4, True),
    "whole-human": (512, 8, 512, 12, False),
}


def forward_flops(s, d=128, heads=4, dff=256, layers=4, qkv_folded=True):
    """(FLOPs the graph spells, FLOPs cellstream's plan executes) per cell at length s."""
    def layer(rows):  # `rows` query rows against s keys
        keys_values = 2 * s * d * 2 * d
        rest = 2 * rows * (2 * d * d + 2 * d * dff) + 2 * 2 * rows * s * d
        return keys_values + rest
    graph = 2 * s * d * d + (layers - 1) * layer(s) + layer(1)
    folded = 2 * s * d * d + (2 * s * d * 3 * d if qkv_folded else 0)
    one_query = 2 * heads * (2 * s * d + 2 * d * (d // heads))
    return graph, graph - folded - 2 * s * d * 2 * d + one_query


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s", type=int, default=256, help="length bucket")
    ap.add_argument("--tract-cells-per-s", type=float, help="forward throughput at one thread")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="compact")
    args = ap.parse_args()
    d, heads, dff, layers, qkv_folded = SHAPES[args.shape]
    s, dh = args.s, d // heads
    shapes = [(1024, 1024, 1024), (s, d, 3 * d), (s, d, d), (s, d, dff), (s, dff, d), (s, dh, s), (s, s, dh)]
    print(f"numpy {np.__version__}; one thread")
    peak = 0.0
    for m, k, n in shapes:
        g = gflops(m, k, n)
        peak = max(peak, g)
        print(f"SGEMM shape={m}x{k}x{n} gflops={g:.1f}")
    print(f"PEAK gflops={peak:.1f}")
    graph, executed = forward_flops(s, d, heads, dff, layers, qkv_folded)
    print(f"FORWARD s={s} flops_per_cell={executed} graph_flops_per_cell={graph}")
    if args.tract_cells_per_s:
        achieved = executed * args.tract_cells_per_s / 1e9
        print(f"ACHIEVED gflops={achieved:.1f} percent_of_peak={100 * achieved / peak:.0f}")


if __name__ == "__main__":
    main()
