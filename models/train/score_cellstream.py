"""Scores a reference folder as cellstream applies it: runs `cellstream embed --reference` on
the held-out pbmc3k cells at 100 / 25 / 10% depth (evaluate.py's thinning seeds, each depth
one batch) and on pbmc68k_reduced, and reads the records it writes. No model runs here: the
labels, `assigned` and novelty are the binary's.

  .venv-train/bin/python models/train/score_cellstream.py --reference DIR [--model DIR] \
      [--unseen TYPE] [--cellstream target/release/cellstream] [--json OUT]

Per set: cells, accuracy of the assigned cells (against the coarse labels; pbmc68k_reduced's
monocytes as one class, as evaluate.py scores it), the share assigned. With `--unseen T` (a
reference without type T, e.g. a leave-one-type-out run's): the share of T's cells that end
`unassigned` and of the other cells that stay assigned, on pbmc3k only.
"""
import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import DATA_3K, DATA_68K, TRAIN_DIR, Dataset10x, thin_counts
from evaluate import DEPTHS


def merge_mono(v):
    """Both monocyte classes as one (pbmc68k's bulk label "CD14+ Monocyte" covers both)."""
    return np.where(v == "FCGR3A Mono", "CD14 Mono", v)


def write_mtx(out: Path, X, barcodes, symbols):
    """A 10x v3 directory (gzipped members) holding X (cells × genes, CSR)."""
    out.mkdir(parents=True)
    X = X.tocoo()
    with gzip.open(out / "matrix.mtx.gz", "wt") as f:
        f.write("%%MatrixMarket matrix coordinate integer general\n")
        f.write(f"{X.shape[1]} {X.shape[0]} {X.nnz}\n")
        for r, c, v in zip(X.row, X.col, X.data):
            f.write(f"{c + 1} {r + 1} {int(v)}\n")
    with gzip.open(out / "features.tsv.gz", "wt") as f:
        for s in symbols:
            f.write(f"{s}\t{s}\tGene Expression\n")
    with gzip.open(out / "barcodes.tsv.gz", "wt") as f:
        f.write("".join(f"{b}\n" for b in barcodes))


def run(binary, batch: Path, reference, model, out: Path):
    cmd = [binary, "embed", str(batch), "--reference", str(reference), "--threads", "2",
           "--out", str(out)]
    if model:
        cmd += ["--model", str(model)]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return {r["cell"]: r for r in map(json.loads, out.read_text().splitlines()) if "cell" in r}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model")
    ap.add_argument("--unseen")
    ap.add_argument("--cellstream", default="target/release/cellstream")
    ap.add_argument("--json")
    a = ap.parse_args()
    d3 = Dataset10x(DATA_3K)
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    te = np.array([i for i, b in enumerate(d3.barcodes) if b in held])
    y3 = d3.coarse()[te]
    sets = []
    for frac, seed in DEPTHS:
        X = d3.X[te] if seed is None else thin_counts(d3.X[te], frac, seed)
        sets.append((f"pbmc3k held-out {int(frac * 100)}%", X, [d3.barcodes[i] for i in te],
                     d3.symbols, y3, False))
    if not a.unseen:
        d68 = Dataset10x(DATA_68K)
        c68 = d68.coarse()
        keep = np.where(c68 != "CD34+")[0]  # no coarse class (evaluate.py leaves them out)
        sets.append(("pbmc68k_reduced", d68.X[keep], [d68.barcodes[i] for i in keep],
                     d68.symbols, c68[keep], True))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, X, bars, symbols, y, mono) in enumerate(sets):
            batch = Path(tmp) / f"set{k}"
            write_mtx(batch, X, bars, symbols)
            recs = run(a.cellstream, batch, a.reference, a.model, Path(tmp) / f"set{k}.ndjson")
            assigned = np.array([recs[b]["assigned"] for b in bars])
            label = np.array([recs[b]["label"] for b in bars])
            truth = merge_mono(y) if mono else y
            pred = merge_mono(label) if mono else label
            r = {"cells": len(bars)}
            if a.unseen:
                unseen = truth == a.unseen
                r["unseen_cells"] = int(unseen.sum())
                r["unseen_unassigned"] = float(np.mean(~assigned[unseen]))
                r["known_assigned"] = float(np.mean(assigned[~unseen]))
                ok = assigned & ~unseen
                r["known_accuracy_of_assigned"] = float(np.mean(pred[ok] == truth[ok]))
            else:
                r["assigned"] = float(np.mean(assigned))
                r["accuracy_of_assigned"] = float(np.mean(pred[assigned] == truth[assigned]))
            results[name] = r
            print(name, json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
