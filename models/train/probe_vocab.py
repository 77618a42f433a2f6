#!/usr/bin/env python3
"""A cheap probe of vocabulary choices for the `expected` tokenizer, before any training.

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/probe_vocab.py

A cell reaches the model as at most 255 (gene, bin) tokens; which genes survive depends on the
vocabulary (what is in it, and its id order, which breaks ties between equal counts). This
probe measures how much label information the surviving tokens carry: a logistic regression
on each cell's tokens scattered over the vocabulary (value = bin / 50, 0 for genes not kept),
in 5-fold cross-validation over the pbmc3k TRAINING cells (never the held-out pbmc3k cells or
pbmc68k_reduced; the vocabulary chosen on each fold's training part), scored at read depth
100/25/10% and restricted to a 765-gene "HVG panel" (the fold's most variable genes, imitating
a reduced dataset), trained on the same four kinds of input.
A linear probe, not the transformer: it ranks choices, it does not predict the model's score.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_3K, Dataset10x, label_index, thin_counts, tokenize_cell_expected  # noqa: E402
from train import choose_vocab, split_heldout, split_validation  # noqa: E402

MAX_LEN = 256
VARIANTS = {  # name: (n_hvg, min_detect, order, exclude)
    "shipped genes, file order": (2000, 0.10, "file", ""),
    "shipped genes, priority order": (2000, 0.10, "priority", ""),
    "no RPL/RPS/MT-, priority": (2000, 0.10, "priority", r"^(RPL|RPS|MT-)"),
    "2000 HVG + markers, priority": (2000, 1.01, "priority", ""),
    "3000 HVG + markers, priority": (3000, 1.01, "priority", ""),
}


def features(X, g2v, G):
    rows, cols, vals = [], [], []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        ids, v = tokenize_cell_expected(g2v[X.indices[lo:hi]], X.data[lo:hi], MAX_LEN, G + 1)
        rows += [i] * (len(ids) - 1)
        cols += ids[1:].tolist()
        vals += (v[1:] / 50.0).tolist()
    return sp.csr_matrix((vals, (rows, cols)), shape=(X.shape[0], G))


def main():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    d = Dataset10x(DATA_3K)
    y = label_index(d.coarse())
    tr, _ = split_heldout(y, 0)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(tr, y[tr]))
    tests = ("100%", "25%", "10%", "HVG panel")
    print(f"{len(tr)} training cells, 5-fold cross-validation")
    print("| vocabulary | genes | tokens/cell at 100% | " + " | ".join(tests) + " |")
    print("|---|---|---|" + "---|" * len(tests))
    for name, (n_hvg, md, order, excl) in VARIANTS.items():
        t0 = time.time()
        ok, ntok, nG = np.zeros(len(tests)), [], []
        for fi, (a, b) in enumerate(folds):
            fit, val = tr[a], tr[b]
            Xf, Xv = d.X[fit], d.X[val]
            # the HVG panel: the 765 most variable genes of the fit cells
            _, _, rank = choose_vocab(Xf, d.symbols, y[fit], 765, 1.01, 0, "file")
            panel = np.isin(np.arange(len(d.symbols)), np.argsort(rank)[:765]).astype(np.float64)
            restrict = lambda X: (X @ sp.diags(panel)).astype(np.int64).tocsr()  # noqa: E731
            train_sets = [Xf, thin_counts(Xf, 0.25, 1 + fi), thin_counts(Xf, 0.1, 2 + fi),
                          restrict(Xf)]
            test_sets = [Xv, thin_counts(Xv, 0.25, 3 + fi), thin_counts(Xv, 0.1, 4 + fi),
                         restrict(Xv)]
            genes, _, _ = choose_vocab(Xf, d.symbols, y[fit], n_hvg, md, 50, order, excl)
            G = len(genes)
            g2v = np.full(len(d.symbols), -1, np.int64)
            g2v[genes] = np.arange(G)
            F = sp.vstack([features(X, g2v, G) for X in train_sets])
            clf = LogisticRegression(max_iter=3000, C=0.5)
            clf.fit(F, np.concatenate([y[fit]] * len(train_sets)))
            for j, X in enumerate(test_sets):
                ok[j] += (clf.predict(features(X, g2v, G)) == y[val]).sum()
            ntok += np.minimum(np.diff((Xv[:, genes] > 0).tocsr().indptr), MAX_LEN - 1).tolist()
            nG.append(G)
        print(f"| {name} | {np.mean(nG):.0f} | {np.mean(ntok):.0f} | "
              + " | ".join(f"{a / len(tr):.3f}" for a in ok)
              + f" |   ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
