"""Issue 19 point 5, the search for a better novelty score, in expression space only (no model,
so no leave-one-type-out training run is needed): for each left-out type T, the reference is
every training cell (`reference_labels.tsv`) not of type T, the queries the held-out pbmc3k
cells at 100/25/10% depth (evaluate.py's thinning seeds), and the reference is thinned the same
way as the query (binomial, seed 1000 + the query's) so that scores and their scale are
measured at the query's depth. Measured, not shipped.

  OMP_NUM_THREADS=1 .venv-train/bin/python models/train/novelty_expression_probe.py [TYPE ...]

Scores ("unseen" = score > 1, each scaled by the 99th percentile of the thinned reference
cells' own scores, leaving themselves out):
  expr_m  mean Euclidean distance to the 10 nearest reference cells over 20 principal
          components of normalize_total(1e4) + log1p of the reference's 2,000 most variable
          genes, standardised (novelty_probe.py's `expr_m`, reproduced)
  dev_m   Poisson deviance per UMI of the cell's counts against the pooled profile of those 10
          nearest reference cells at full depth (pseudo-count: ALPHA reads of the reference's
          mean profile, default 200): how badly the neighbours explain the counts, genes
          outside the principal components included
  max     the larger of the two
AUROC unseen against known; u>1 / k<=1 at the rule's threshold; at90 the unseen cells past the
threshold that keeps exactly 90% of the known test cells below it (an upper bound for any
threshold on that score)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from common import COARSE, DATA_3K, TRAIN_DIR, Dataset10x, label_index, thin_counts  # noqa: E402
from evaluate import DEPTHS, read_labels_tsv  # noqa: E402
from novelty_probe import ExpressionSpace  # noqa: E402

K = 10
ALPHA = float(os.environ.get("ALPHA", "200"))


def knn(q, ref, exclude_self=False):
    d = ((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    i = np.argsort(d, 1)[:, :K]
    return i, np.sqrt(np.take_along_axis(d, i, 1)).mean(1)


class Space(ExpressionSpace):
    """novelty_probe.py's expression space, plus the counts for the deviance."""

    def __init__(self, X):
        super().__init__(X)
        self.X = sp.csr_matrix(X, dtype=np.float64)
        total = self.X.sum()
        # Every gene a small share, so that a count of a gene the reference never saw is finite.
        self.mean = (np.asarray(self.X.sum(0)).ravel() + 0.5) / (total + 0.5 * self.X.shape[1])

    def deviance(self, X, nbr):
        """2 Σ x log(x / μ) per UMI (Σ μ = Σ x: the other terms cancel), μ = n · profile."""
        X = sp.csr_matrix(X, dtype=np.float64)
        n = np.asarray(X.sum(1)).ravel()
        out = np.empty(X.shape[0])
        for c in range(X.shape[0]):
            S = self.X[nbr[c]]
            prof = (np.asarray(S.sum(0)).ravel() + ALPHA * self.mean) / (S.sum() + ALPHA)
            row = X[c]
            x = row.data
            out[c] = 2 * (x * np.log(x / (n[c] * prof[row.indices]))).sum() / max(n[c], 1)
        return out


def main():
    from sklearn.metrics import roc_auc_score

    d = Dataset10x(DATA_3K)
    y = label_index(d.coarse())
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    te = np.array([i for i, b in enumerate(d.barcodes) if b in held])
    labs = read_labels_tsv(TRAIN_DIR / "reference_labels.tsv", "cell_type_coarse")
    train = np.array([i for i, b in enumerate(d.barcodes) if b in labs])
    for T in sys.argv[1:] or ["B", "NK", "CD14 Mono"]:
        k = COARSE.index(T)
        ri = train[y[train] != k]
        space = Space(d.X[ri])
        for frac, seed in DEPTHS:
            X = d.X[te] if seed is None else thin_counts(d.X[te], frac, seed)
            XR = d.X[ri] if seed is None else thin_counts(d.X[ri], frac, 1000 + seed)
            unseen = y[te] == k
            q, r = space(X), space(XR)
            qi, qd = knn(q, r)
            rself, rd = knn(r, r, exclude_self=True)
            s = {"expr_m": qd / np.percentile(rd, 99)}
            s["dev_m"] = space.deviance(X, qi) / np.percentile(space.deviance(XR, rself), 99)
            s["max"] = np.maximum(s["expr_m"], s["dev_m"])
            print(f"left out {T}, depth {int(frac * 100)}%: " + "; ".join(
                f"{n} AUROC {roc_auc_score(unseen, v):.3f} u>1 {np.mean(v[unseen] > 1):.2f} "
                f"k<=1 {np.mean(v[~unseen] <= 1):.2f} "
                f"at90 {np.mean(v[unseen] > np.percentile(v[~unseen], 90)):.2f}"
                for n, v in s.items()), flush=True)


if __name__ == "__main__":
    main()
