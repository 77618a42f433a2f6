#!/usr/bin/env python3
"""Python peer of `cellstream embed`, end to end: the pipeline a Python user would build from
scGPT's tokenization and onnxruntime, on the same .csb batches and the same model file.

Per batch: read the .csb (numpy views of its sections; no validation), map the genes to the
model's vocabulary, and per cell do what scgpt 0.2.4's `Dataset.__getitem__` +
`DataCollator(do_padding=True, pad_value=-2, do_binning=True, max_length=<the manifest's max_len:
256 for the compact model, 1200 for scGPT whole-human>, sampling=True, keep_first_n_tokens=1)`
do: <cls> first, bin the non-zero counts with scGPT's own `binning` (loaded unmodified, as
bench-data/scgpt_tokenize_peer.py does), sample cells longer than max_length, pad the rest to
max_length. Then onnxruntime on the package's ONNX (`--model`), `--threads` single-threaded
sessions running batches of `--batch` cells in parallel threads (onnxruntime releases the GIL;
this was its fastest way to use two cores, see BENCHMARKS.md), and the L2-normalised <cls>
embedding and, when the model has a `logits` output, the argmax label per cell. The timed region
is everything from opening the first file to the last cell's label; session creation is excluded.

Prints `PEER e2e/python-ort/<name> cells=N seconds=S cells_per_s=X`.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse, json, struct, sys, threading, time, tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scgpt_tokenize_peer import load_scgpt_preprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def read_csb(path):
    """gene names, barcodes and CSR arrays of a .csb (docs/FORMAT.md), as numpy views."""
    b = Path(path).read_bytes()
    _magic, _version, _flags, n_cells, n_genes, _nnz = struct.unpack_from("<4sHH3Q", b)
    table = struct.unpack_from("<12Q", b, 32)
    sec = [(table[2 * i], table[2 * i + 1]) for i in range(6)]
    strings = lambda i, n: b[sec[i][0]:sec[i][0] + sec[i][1]].decode().split("\0")[:n]
    arr = lambda i, dt: np.frombuffer(b, dtype=dt, count=sec[i][1] // np.dtype(dt).itemsize,
                                      offset=sec[i][0])
    return strings(0, n_genes), strings(2, n_cells), arr(3, "<u8"), arr(4, "<u4"), arr(5, "<u4")


def tokenize(path, vocab, cls_id, pad_id, max_len, pad_value, n_bins, binning, rng):
    genes, barcodes, indptr, indices, data = read_csb(path)
    token_of = np.array([vocab.get(g, -1) for g in genes], dtype=np.int64)
    n = len(barcodes)
    ids = np.full((n, max_len), pad_id, dtype=np.int64)
    vals = np.full((n, max_len), pad_value, dtype=np.float32)
    for i in range(n):
        lo, hi = indptr[i], indptr[i + 1]
        tok = token_of[indices[lo:hi]]
        keep = tok >= 0
        g = np.insert(tok[keep], 0, cls_id)
        v = np.insert(data[lo:hi][keep].astype(np.float32), 0, pad_value)
        v[1:] = binning(row=v[1:], n_bins=n_bins)
        if len(g) > max_len:  # DataCollator._sample, numpy's permutation for torch.randperm
            idx = np.concatenate([[0], rng.permutation(len(g) - 1)[: max_len - 1] + 1])
            g, v = g[idx], v[idx]
        ids[i, : len(g)], vals[i, : len(v)] = g, v
    return barcodes, ids, vals


def infer(sessions, ids, vals, batch):
    """Embeddings (L2-normalised) and labels of every row (-1 where the model has no classifier
    head, e.g. a pretrained scGPT), sessions in parallel threads."""
    n = len(ids)
    emb, labels = [None] * n, np.full(n, -1, dtype=np.int64)
    starts = list(range(0, n, batch))

    def work(k):
        for s in starts[k :: len(sessions)]:
            e, *logits = sessions[k].run(None, {"gene_ids": ids[s : s + batch], "values": vals[s : s + batch]})
            emb[s : s + batch] = list(e / np.linalg.norm(e, axis=1, keepdims=True))
            if logits:
                labels[s : s + batch] = logits[0].argmax(axis=1)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sessions))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return emb, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batches", nargs="+", type=Path, help=".csb files")
    ap.add_argument("--name", default="run")
    ap.add_argument("--model", type=Path, default=REPO / "models/pbmc-compact",
                    help="model package directory (e.g. bench-data/generated/scgpt-whole-human); its "
                         "manifest gives max_len, n_bins, pad_value, the <cls> and <pad> tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="cells per onnxruntime call")
    args = ap.parse_args()

    pre, _ = load_scgpt_preprocess()
    manifest = tomllib.loads((args.model / "manifest.toml").read_text())
    vocab = json.loads((args.model / "vocab.json").read_text())
    cls_id, pad_id = vocab[manifest["cls_token"]], vocab[manifest["pad_token"]]
    max_len, pad_value, n_bins = manifest["max_len"], manifest["pad_value"], manifest["n_bins"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = [ort.InferenceSession(str(args.model / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                for _ in range(args.threads)]
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}; {args.threads} session(s) x 1 thread, "
          f"{args.batch} cells per call, max_len {max_len}; {len(args.batches)} batch file(s)", flush=True)

    rng = np.random.RandomState(0)
    cells, t0 = 0, time.perf_counter()
    t_tok = 0.0
    for path in args.batches:
        t = time.perf_counter()
        barcodes, ids, vals = tokenize(path, vocab, cls_id, pad_id, max_len, pad_value, n_bins, pre.binning, rng)
        t_tok += time.perf_counter() - t
        emb, labels = infer(sessions, ids, vals, args.batch)
        assert len(emb) == len(barcodes) == len(labels)
        cells += len(barcodes)
    secs = time.perf_counter() - t0
    print(f"read + tokenize {t_tok:.2f} s of {secs:.2f} s")
    print(f"PEER e2e/python-ort/{args.name} cells={cells} seconds={secs:.3f} cells_per_s={cells / secs:.1f}")


if __name__ == "__main__":
    main()
