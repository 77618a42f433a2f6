#!/usr/bin/env python3
"""Unknown cell types: score leave-one-type-out models on held-out pbmc3k cells.

    # one training per left-out type (train.py --exclude-class; see models/train/README.md)
    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/train.py --exclude-class B \\
        --epochs 40 --out models/train/loto/B40/pkg --aux-dir models/train/loto/B40
    ...
    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/unknown_types.py \\
        models/train/loto/B40 models/train/loto/NK40 models/train/loto/CD14_Mono40

Each run directory holds the package (pkg/), train_summary.json (which class was left out) and
reference_labels.tsv (its training cells, the left-out type absent). For each run: the
reference = the package's embeddings of those cells, with the same cells thinned to 50 / 25 /
10% for its depth cuts (models/train/refmap.py, as `cellstream reference` builds it);
queries = the held-out pbmc3k cells (never trained on) at full depth and at 25% / 10% depth.
Scores, separating the left-out type (positive) from the known types:
- AUROC of the novelty score, of 1 - classifier confidence (softmax(logits / T)), and of
  1 - the reference vote's calibrated confidence;
- the fraction of left-out cells that end unassigned, and of known cells that stay assigned,
  under four rules: reference mapping (vote confidence >= its threshold and novelty within
  the reference's cut for the batch's median UMI count: what cellstream does), the same with the
  earlier cut, novelty <= 1 at every depth (`reference_p99`), classifier and novelty
  (classifier confidence >= the manifest's threshold and novelty within the cut), classifier
  alone (confidence >= threshold).
Writes models/train/unknown_types.json and models/pbmc-compact/figures/unknown_types.png.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COARSE, DATA_3K, PACKAGE, TRAIN_DIR, Dataset10x, label_index, thin_counts  # noqa: E402
from evaluate import (DEPTHS, Package, batch_depth, build_reference, read_labels_tsv,  # noqa: E402
                      softmax)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=TRAIN_DIR / "unknown_types.json")
    ap.add_argument("--figure", type=Path, default=PACKAGE / "figures/unknown_types.png")
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score, roc_curve

    d = Dataset10x(DATA_3K)
    y = label_index(d.coarse())
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    te = np.array([i for i, b in enumerate(d.barcodes) if b in held])
    res, curves = {}, {}
    for run in args.runs:
        summ = json.loads((run / "train_summary.json").read_text())
        left = summ["args"]["exclude_class"]
        k = COARSE.index(left)
        pkg = Package(run / "pkg")
        labs = read_labels_tsv(run / "reference_labels.tsv", "cell_type_coarse")
        ri = np.array([i for i, b in enumerate(d.barcodes) if b in labs])
        assert not (set(d.barcodes[i] for i in ri) & held) and (y[ri] != k).all()
        ref = build_reference(pkg, d.X[ri], [d.barcodes[i] for i in ri], d.symbols, y[ri])
        out = {"left_out": left, "epochs": summ["args"]["epochs"], "reference_cells": len(ri),
               "reference_threshold": ref.threshold, "novelty_cut": ref.cut,
               "depth_cuts": [list(c) for c in ref.depth_cuts],
               "classifier_threshold": pkg.thr, "temperature": pkg.T, "depths": {}}
        for frac, seed in DEPTHS:
            X = d.X[te] if seed is None else thin_counts(d.X[te], frac, seed)
            _, emb, logits = pkg.run(X, [d.barcodes[i] for i in te], d.symbols)
            unseen = y[te] == k
            p = softmax(logits / pkg.T)
            conf = p.max(1)
            umis = batch_depth(X)  # the held-out set as one batch
            mp = ref.map(emb, umis)
            nov = mp["novelty"]
            rules = {
                "reference": mp["assigned"],
                "reference_p99": (mp["confidence"] >= ref.threshold) & (nov <= 1),
                "classifier_and_novelty": (conf >= pkg.thr) & (nov <= ref.cut_at(umis)),
                "classifier": conf >= pkg.thr,
            }
            r = {"unseen_cells": int(unseen.sum()), "known_cells": int((~unseen).sum()),
                 "auroc_novelty": float(roc_auc_score(unseen, nov)),
                 "auroc_classifier_confidence": float(roc_auc_score(unseen, -conf)),
                 "auroc_reference_confidence": float(roc_auc_score(unseen, -mp["confidence"])),
                 "unseen_novelty_median": float(np.median(nov[unseen])),
                 "known_novelty_median": float(np.median(nov[~unseen])),
                 "unseen_called_as": {COARSE[c]: int(n) for c, n in
                                      zip(*np.unique(p.argmax(1)[unseen], return_counts=True))},
                 "known_accuracy_classifier": float((p.argmax(1) == y[te])[~unseen].mean()),
                 "known_accuracy_reference": float((mp["label"] == y[te])[~unseen].mean())}
            for name, a in rules.items():
                r[f"unseen_unassigned_{name}"] = float((~a[unseen]).mean())
                r[f"known_assigned_{name}"] = float(a[~unseen].mean())
            out["depths"][str(int(frac * 100))] = r
            if seed is None:
                curves[left] = {"novelty": (nov, unseen), "classifier": (-conf, unseen),
                                "reference vote": (-mp["confidence"], unseen), "cut": ref.cut}
            print(f"left out {left:10s} depth {int(frac * 100):3d}%: AUROC novelty "
                  f"{r['auroc_novelty']:.3f}, classifier conf {r['auroc_classifier_confidence']:.3f}, "
                  f"vote conf {r['auroc_reference_confidence']:.3f}; unseen unassigned "
                  f"ref {r['unseen_unassigned_reference']:.2f} / ref p99 "
                  f"{r['unseen_unassigned_reference_p99']:.2f} / clf+nov "
                  f"{r['unseen_unassigned_classifier_and_novelty']:.2f} / clf "
                  f"{r['unseen_unassigned_classifier']:.2f}; known assigned ref "
                  f"{r['known_assigned_reference']:.2f} / ref p99 "
                  f"{r['known_assigned_reference_p99']:.2f} / clf+nov "
                  f"{r['known_assigned_classifier_and_novelty']:.2f} / clf "
                  f"{r['known_assigned_classifier']:.2f}", flush=True)
        res[left] = out
    args.out.write_text(json.dumps(res, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6.6), squeeze=False)
    for j, (left, c) in enumerate(curves.items()):
        ax = axes[0, j]
        for name, (score, pos) in ((n, v) for n, v in c.items() if n != "cut"):
            fpr, tpr, _ = roc_curve(pos, score)
            ax.plot(fpr, tpr, label=f"{name}: AUROC {roc_auc_score(pos, score):.3f}")
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":")
        ax.set_title(f"{left} left out (held-out pbmc3k, 100%)", fontsize=9)
        ax.set_xlabel("known cells flagged")
        ax.set_ylabel(f"{left} cells flagged")
        ax.legend(fontsize=7, loc="lower right")
        ax = axes[1, j]
        nov, pos = c["novelty"]
        bins = np.linspace(0, max(3.0, float(np.percentile(nov, 99.5))), 40)
        ax.hist(nov[~pos], bins, alpha=0.6, density=True, label="known types")
        ax.hist(nov[pos], bins, alpha=0.6, density=True, label=f"{left} (never seen)")
        ax.axvline(1.0, color="0.5", lw=1, ls=":")
        ax.axvline(c["cut"], color="k", lw=1, ls="--", label=f"full-depth cut {c['cut']:.2f}")
        ax.set_xlabel("novelty (1 = reference's own p99)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=64)
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
