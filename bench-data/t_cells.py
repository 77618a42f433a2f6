#!/usr/bin/env python3
"""The whole-human benchmark's input (issue 18): the first N pbmc3k cells labelled CD4 T or CD8 T
(bench-data/pbmc3k/labels.tsv), in file order, written as a 10x Matrix Market directory with
all of pbmc3k's genes. Deterministic. Offline tooling: numpy and scipy (models/train's venv).

    bench-data/t_cells.py OUT_DIR [--cells 200]
"""
import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
import scipy.io

SRC = Path(__file__).resolve().parent / "pbmc3k"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cells", type=int, default=200)
    a = ap.parse_args()
    with gzip.open(SRC / "barcodes.tsv.gz", "rt") as f:
        barcodes = [l.strip() for l in f]
    rows = [l.rstrip("\n").split("\t") for l in (SRC / "labels.tsv").read_text().splitlines()[1:]]
    coarse = {r[0]: r[2] for r in rows}
    keep = [i for i, b in enumerate(barcodes) if coarse.get(b) in ("CD4 T", "CD8 T")][: a.cells]
    m = scipy.io.mmread(SRC / "matrix.mtx.gz").tocsc()  # genes x cells
    sub = m[:, keep]
    a.out.mkdir(parents=True, exist_ok=True)
    with gzip.open(a.out / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sub.astype(np.int64), field="integer")
    shutil.copy(SRC / "features.tsv.gz", a.out / "features.tsv.gz")
    with gzip.open(a.out / "barcodes.tsv.gz", "wt") as f:
        f.write("".join(barcodes[i] + "\n" for i in keep))
    print(f"{len(keep)} T cells -> {a.out}")


if __name__ == "__main__":
    main()
