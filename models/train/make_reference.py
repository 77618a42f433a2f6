#!/usr/bin/env python3
"""Reference outputs of the shipped model for the Rust tests: tests/fixtures/model_reference.jsonl.gz

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/make_reference.py

Line 1: {"type": "header", ...} (model sha256, onnxruntime version, grouping/padding).
Then one line per cell: {"cell", "gene_ids", "values", "embedding", "logits", "group", "padded_to"}
- gene_ids / values: the EXACT unpadded tokens fed (<cls> first), as common.py's tokenizer
  produced them in the manifest's mode (`ties`): "expected" (seed-free, so a Rust tokenizer in
  that mode must reproduce them exactly from the raw counts of bench-data/pbmc3k), or "seeded"
  (scGPT binning, per-cell RNG from (seed 0, barcode); a Rust test should feed these tokens,
  not re-tokenize: its tie draws use another RNG);
- embedding: the raw <cls> output of the last layer (NOT normalised); logits: classifier output;
- computed by onnxruntime (CPU, 1 thread) running each group padded to a common length
  `padded_to` with <pad> / pad_value (outputs do not depend on the padding up to float error).
Rows: >= 200 real held-out pbmc3k cells, then crafted rows (cells named "crafted:*").
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import gzip
import json
import sys
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DATA_3K, PACKAGE, PAD_VALUE, REPO, TRAIN_DIR, Dataset10x, cell_rng,
                    gene_to_vocab, length_batches, pad_batch, sha256_file, tokenize_cell,
                    tokenize_cell_expected)

SEED = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=PACKAGE)
    ap.add_argument("--cells", type=int, default=240)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/model_reference.jsonl.gz")
    args = ap.parse_args()

    import onnxruntime as ort

    man = tomllib.loads((args.model / "manifest.toml").read_text())
    sha = sha256_file(args.model / "model.onnx")
    assert man["onnx_sha256"] == sha
    vocab = json.loads((args.model / "vocab.json").read_text())
    pad_id, cls_id, max_len = vocab[man["pad_token"]], vocab[man["cls_token"]], man["max_len"]
    ties = man.get("ties", "seeded")
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(args.model / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])

    d = Dataset10x(DATA_3K)
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    rows = [i for i, b in enumerate(d.barcodes) if b in held][: args.cells]
    g2v = gene_to_vocab(d.symbols, vocab)
    cells, tokens = [], []
    for i in rows:
        lo, hi = d.X.indptr[i], d.X.indptr[i + 1]
        if ties == "expected":
            tokens.append(tokenize_cell_expected(g2v[d.X.indices[lo:hi]], d.X.data[lo:hi],
                                                 max_len, cls_id))
        else:
            tokens.append(tokenize_cell(g2v[d.X.indices[lo:hi]], d.X.data[lo:hi],
                                        cell_rng(SEED, d.barcodes[i]), max_len, cls_id))
        cells.append(d.barcodes[i])
    real = len(cells)

    # crafted rows: 1 gene, 2 genes, exactly max_len (a real cell with more genes, its own
    # tokens), only <cls> (no in-vocabulary gene), a cell of max_len-1 tokens
    first = tokens[0]
    crafted = {
        "crafted:one_gene": (np.array([cls_id, first[0][1]]), np.array([PAD_VALUE, 37.0], np.float32)),
        "crafted:two_genes": (np.array([cls_id, first[0][1], first[0][2]]),
                              np.array([PAD_VALUE, 50.0, 1.0], np.float32)),
        "crafted:cls_only": (np.array([cls_id]), np.array([PAD_VALUE], np.float32)),
    }
    full = next(t for t in tokens if len(t[0]) == max_len)
    crafted["crafted:max_len"] = full
    crafted["crafted:max_len_minus_1"] = (full[0][:-1], full[1][:-1])
    for name, (g, v) in crafted.items():
        cells.append(name)
        tokens.append((np.asarray(g, np.int64), np.asarray(v, np.float32)))

    # real cells: groups of `group_size` in length order, padded to the group's longest;
    # crafted rows: one group padded to max_len
    groups = length_batches(tokens[:real], args.group_size)
    groups.append(np.arange(real, len(tokens)))
    out = [None] * len(tokens)
    for gi, b in enumerate(groups):
        S = max_len if gi == len(groups) - 1 else max(len(tokens[i][0]) for i in b)
        ids, vals = pad_batch([tokens[i] for i in b], pad_id, length=S)
        e, l = sess.run(["cell_embedding", "logits"], {"gene_ids": ids, "values": vals})
        for j, i in enumerate(b):
            out[i] = (gi, S, e[j], l[j])

    header = {
        "type": "header", "model": man["name"], "model_dir": "models/pbmc-compact",
        "onnx_sha256": sha, "onnxruntime": ort.__version__, "numpy": np.__version__,
        "execution": "onnxruntime CPUExecutionProvider, 1 intra-op thread, default graph optimisations",
        "pad_id": pad_id, "cls_id": cls_id, "pad_value": PAD_VALUE, "max_len": max_len,
        "n_real_cells": real, "n_crafted": len(tokens) - real,
        "source": "bench-data/pbmc3k, first %d held-out cells (models/train/heldout_barcodes.txt) "
                  "in file order" % real,
        "ties": ties,
        "tokenization": ("models/train/common.py tokenize_cell_expected: scGPT binning (n_bins 51) "
                         "with each tie draw replaced by its mean (left where left == right, else "
                         "(left + right + 1) / 2), <cls> first, past max_len the max_len - 1 "
                         "largest counts (ties: lowest vocabulary id) in input order; no RNG"
                         if ties == "expected" else
                         "models/train/common.py tokenize_cell: scGPT binning (n_bins 51), "
                         "per-cell numpy default_rng([0, crc32(barcode)]), <cls> first, "
                         "uniform subsample to max_len keeping input order"),
        "grouping": "real cells sorted by token count (stable), groups of %d, each padded to its "
                    "longest cell; crafted rows one group padded to max_len; padding = <pad> id "
                    "and pad_value; `group` and `padded_to` on each line" % args.group_size,
        "embedding": "raw <cls> output of the last encoder layer, not normalised",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write((json.dumps(header) + "\n").encode())
        for name, (g, v), (gi, S, e, l) in zip(cells, tokens, out):
            rec = {"cell": name, "gene_ids": [int(x) for x in g], "values": [float(x) for x in v],
                   "embedding": [float(x) for x in e], "logits": [float(x) for x in l],
                   "group": gi, "padded_to": S}
            f.write((json.dumps(rec) + "\n").encode())
    print(f"wrote {args.out}: {real} real + {len(tokens) - real} crafted cells, "
          f"{len(groups)} groups; {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
