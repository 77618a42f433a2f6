#!/usr/bin/env python3
"""onnxruntime peer of `cargo bench --bench model`: the same ONNX file, the same padded tensors
(target/model-bench/S{s}-N{n}-B{b}.bin, written by the Rust bench), 1 and 2 threads.

Two-thread figures take the better of ORT's two ways to use two cores: one session with
intra_op_num_threads=2, or two single-threaded sessions running half the batches each in
parallel (ORT releases the GIL while it runs). Prints `PEER forward/ort/S{s}/t{k} ...` lines.
"""
import argparse, os, re, statistics, sys, threading, time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent


def session(model, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])


def load(path):
    s, n, b = map(int, re.match(r"S(\d+)-N(\d+)-B(\d+)\.bin", path.name).groups())
    raw = path.read_bytes()
    ids = np.frombuffer(raw[: b * n * s * 8], dtype="<i8").reshape(b, n, s)
    vals = np.frombuffer(raw[b * n * s * 8 :], dtype="<f4").reshape(b, n, s)
    return s, n, [(ids[i], vals[i]) for i in range(b)]


def timed(repeat, f):
    f()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def report(name, cells, times):
    times = sorted(times)
    med = statistics.median(times)
    print(f"PEER {name} cells={cells} median_s={med:.6f} cells_per_s={cells / med:.1f} "
          f"min_s={times[0]:.6f} max_s={times[-1]:.6f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("CELLSTREAM_MODEL", REPO / "models/pbmc-compact")) / "model.onnx")
    ap.add_argument("--tensors", type=Path, default=REPO / "target/model-bench")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, {args.model}")
    files = sorted(args.tensors.glob("S*-N*-B*.bin"), key=lambda p: int(re.match(r"S(\d+)", p.name).group(1)))
    if not files:
        sys.exit(f"no tensors in {args.tensors}: run `cargo bench --bench model` first")
    one, two = session(args.model, 1), session(args.model, 2)
    pair = [session(args.model, 1), session(args.model, 1)]
    for f in files:
        s, n, batches = load(f)
        cells = n * len(batches)
        run = lambda sess, bs: [sess.run(None, {"gene_ids": i, "values": v}) for i, v in bs]
        report(f"forward/ort/S{s}/t1", cells, timed(5, lambda: run(one, batches)))
        intra = timed(5, lambda: run(two, batches))
        half = len(batches) // 2

        def parallel():
            ts = [threading.Thread(target=run, args=(pair[k], batches[k * half:(k + 1) * half])) for k in range(2)]
            [t.start() for t in ts]
            [t.join() for t in ts]

        inter = timed(5, parallel)
        best = min((statistics.median(intra), intra, "intra-op 2"), (statistics.median(inter), inter, "2 sessions"))
        print(f"# S{s} t2: intra-op median {statistics.median(intra):.4f} s, two sessions {statistics.median(inter):.4f} s -> {best[2]}")
        report(f"forward/ort/S{s}/t2", cells, best[1])


if __name__ == "__main__":
    main()
