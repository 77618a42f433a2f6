#!/usr/bin/env python3
"""Score the exported model (onnxruntime, what ships) against a logistic-regression baseline.

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/evaluate.py [--model models/pbmc-compact]

Test sets: (a) the 20% pbmc3k held-out split (models/train/heldout_barcodes.txt), (b)
pbmc68k_reduced with its bulk labels mapped to the coarse classes (CD34+ has no coarse class
and is excluded). Each at full depth and at 25% / 10% read depth (binomial thinning of the
TEST counts, fixed seeds). Model cells are tokenized exactly as the runtime does (scGPT
binning, per-cell RNG from (seed 0, barcode), <cls> + uniform subsample to max_len).
Baseline: sklearn LogisticRegression on normalize_total(1e4)+log1p of the genes shared with
the test set, trained on the same pbmc3k training cells.
Writes models/train/scores.json and prints a markdown table.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CLS, COARSE, DATA_3K, DATA_68K, PACKAGE, PAD, TRAIN_DIR, Dataset10x,
                    gene_to_vocab, label_index, length_batches, pad_batch, sha256_file,
                    thin_counts, tokenize_dataset)

DEPTHS = ((1.0, None), (0.25, 25), (0.10, 10))  # (fraction, thinning seed)
EVAL_SEED = 0


def lognorm(X):
    X = sp.csr_matrix(X, dtype=np.float64)
    tot = np.asarray(X.sum(1)).ravel()
    tot[tot == 0] = 1
    X = sp.diags(1e4 / tot) @ X
    X.data = np.log1p(X.data)
    return X


MONO, FCGR3A = COARSE.index("CD14 Mono"), COARSE.index("FCGR3A Mono")


def merge_mono(v):
    """Both monocyte classes as one (pbmc68k's bulk label "CD14+ Monocyte" covers both)."""
    return np.where(v == FCGR3A, MONO, v)


def metrics(y, pred, conf=None, thr=None):
    from sklearn.metrics import f1_score

    present = sorted(set(y.tolist()))
    r = {"n": int(len(y)), "accuracy": float((pred == y).mean()),
         "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0))}
    if conf is not None:
        a = conf >= thr
        r["assigned_fraction"] = float(a.mean())
        r["accuracy_of_assigned"] = float((pred[a] == y[a]).mean()) if a.any() else float("nan")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=PACKAGE)
    ap.add_argument("--out", type=Path, default=TRAIN_DIR / "scores.json")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    import onnxruntime as ort

    man = tomllib.loads((args.model / "manifest.toml").read_text())
    assert man["onnx_sha256"] == sha256_file(args.model / "model.onnx"), "manifest sha256"
    vocab = json.loads((args.model / "vocab.json").read_text())
    labels = (args.model / "labels.txt").read_text().split("\n")[:-1]
    assert labels == COARSE
    pad_id, cls_id, max_len = vocab[man["pad_token"]], vocab[man["cls_token"]], man["max_len"]
    thr = man["confidence_threshold"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(args.model / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])

    d3 = Dataset10x(DATA_3K)
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    te = np.array([i for i, b in enumerate(d3.barcodes) if b in held])
    tr = np.array([i for i, b in enumerate(d3.barcodes) if b not in held])
    y3 = label_index(d3.coarse())
    d68 = Dataset10x(DATA_68K)
    c68 = d68.coarse()
    keep68 = np.where(c68 != "CD34+")[0]
    y68 = label_index(c68[keep68])
    assert (y68 >= 0).all()
    tests = {
        "pbmc3k_heldout": (d3.X[te], [d3.barcodes[i] for i in te], d3.symbols, y3[te]),
        "pbmc68k_reduced": (d68.X[keep68], [d68.barcodes[i] for i in keep68], d68.symbols, y68),
    }
    print(f"model {args.model} sha256 {man['onnx_sha256'][:12]}…, max_len {max_len}, "
          f"threshold {thr}; pbmc68k_reduced: {len(keep68)} cells scored, "
          f"{len(c68) - len(keep68)} CD34+ excluded")

    results = {"model": str(args.model), "onnx_sha256": man["onnx_sha256"],
               "confidence_threshold": thr, "tokenize_seed": EVAL_SEED,
               "depth_thinning_seeds": {str(f): s for f, s in DEPTHS}, "sets": {}}
    for name, (X, bcs, symbols, y) in tests.items():
        g2v = gene_to_vocab(symbols, vocab)
        in_vocab = g2v >= 0
        setres = {"genes_in_panel": len(symbols), "panel_genes_in_vocab": int(in_vocab.sum()),
                  "per_class_n": {COARSE[k]: int((y == k).sum()) for k in range(len(COARSE))}}
        # baseline: genes shared between pbmc3k and this test set
        if not args.no_baseline:
            from sklearn.linear_model import LogisticRegression

            idx3 = {s: i for i, s in enumerate(d3.symbols)}
            shared = [(idx3[s], j) for j, s in enumerate(symbols) if s in idx3]
            a3, at = np.array([p[0] for p in shared]), np.array([p[1] for p in shared])
            t0 = time.time()
            clf = LogisticRegression(max_iter=5000)
            clf.fit(lognorm(d3.X[tr][:, a3]), y3[tr])
            setres["baseline_shared_genes"] = len(shared)
            setres["baseline_fit_seconds"] = round(time.time() - t0, 1)
        for frac, seed in DEPTHS:
            Xd = X if seed is None else thin_counts(X, frac, seed)
            toks = tokenize_dataset(Xd, g2v, bcs, EVAL_SEED, max_len, cls_id)
            logits = np.zeros((len(toks), len(labels)), np.float32)
            for b in length_batches(toks, 64):
                ids, vals = pad_batch([toks[i] for i in b], pad_id)
                logits[b] = sess.run(["logits"], {"gene_ids": ids, "values": vals})[0]
            z = logits - logits.max(1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            m = metrics(y, p.argmax(1), p.max(1), thr)
            m["mean_tokens_per_cell"] = float(np.mean([len(t[0]) for t in toks]))
            m["confusion"] = np.array([[int(((y == i) & (p.argmax(1) == j)).sum())
                                        for j in range(len(COARSE))]
                                       for i in range(len(COARSE))]).tolist()
            r = {"model": m}
            if not args.no_baseline:
                bp = clf.predict(lognorm(Xd[:, at]))
                r["baseline"] = metrics(y, bp)
            if name == "pbmc68k_reduced":
                r["model_mono_merged"] = metrics(merge_mono(y), merge_mono(p.argmax(1)),
                                                 p.max(1), thr)
                if not args.no_baseline:
                    r["baseline_mono_merged"] = metrics(merge_mono(y), merge_mono(bp))
            setres[f"depth_{int(frac * 100)}"] = r
            line = (f"{name:16s} depth {int(frac * 100):3d}%: model acc {m['accuracy']:.3f} "
                    f"F1 {m['macro_f1']:.3f} (assigned {m['assigned_fraction']:.2f}, acc of "
                    f"assigned {m['accuracy_of_assigned']:.3f}, tokens {m['mean_tokens_per_cell']:.0f})")
            if not args.no_baseline:
                line += f" | baseline acc {r['baseline']['accuracy']:.3f} F1 {r['baseline']['macro_f1']:.3f}"
            print(line, flush=True)
            if "model_mono_merged" in r:
                mm, bm = r["model_mono_merged"], r.get("baseline_mono_merged", {})
                print(f"{'  monos merged':16s} depth {int(frac * 100):3d}%: model acc "
                      f"{mm['accuracy']:.3f} F1 {mm['macro_f1']:.3f} | baseline acc "
                      f"{bm.get('accuracy', float('nan')):.3f} F1 {bm.get('macro_f1', float('nan')):.3f}")
        results["sets"][name] = setres
    args.out.write_text(json.dumps(results, indent=1) + "\n")

    print("\n| test set | read depth | model accuracy | model macro-F1 | baseline accuracy | baseline macro-F1 | assigned (conf ≥ %.2f) | accuracy of assigned |" % thr)
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results["sets"].items():
        for frac, _ in DEPTHS:
            r = s[f"depth_{int(frac * 100)}"]
            m, b = r["model"], r.get("baseline", {})
            print(f"| {name} | {int(frac * 100)}% | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                  f"{b.get('accuracy', float('nan')):.3f} | {b.get('macro_f1', float('nan')):.3f} | "
                  f"{m['assigned_fraction']:.3f} | {m['accuracy_of_assigned']:.3f} |")
            if "model_mono_merged" in r:
                m, b = r["model_mono_merged"], r.get("baseline_mono_merged", {})
                print(f"| {name}, monocytes merged | {int(frac * 100)}% | {m['accuracy']:.3f} | "
                      f"{m['macro_f1']:.3f} | {b.get('accuracy', float('nan')):.3f} | "
                      f"{b.get('macro_f1', float('nan')):.3f} | {m['assigned_fraction']:.3f} | "
                      f"{m['accuracy_of_assigned']:.3f} |")


if __name__ == "__main__":
    main()
