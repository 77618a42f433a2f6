#!/usr/bin/env python3
"""Score the exported model (onnxruntime, what ships) against a logistic-regression baseline,
with calibration and reference mapping.

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/evaluate.py [--model models/pbmc-compact]

Test sets: (a) the 20% pbmc3k held-out split (models/train/heldout_barcodes.txt), (b)
pbmc68k_reduced with its bulk labels mapped to the coarse classes (CD34+ has no coarse class
and is excluded). Each at full depth and at 25% / 10% read depth (binomial thinning of the
TEST counts, fixed seeds). Model cells are tokenized as the runtime does in the manifest's
mode (`ties`: "expected" is seed-free; "seeded" uses the per-cell RNG from (seed 0, barcode)).
Classifier: softmax(logits / temperature) (manifest), label = arg-max, confidence = its
probability, assigned = confidence >= confidence_threshold; expected calibration error (ECE)
over 15 equal-width confidence bins.
Reference mapping (models/train/refmap.py): the package's embeddings of the reference cells
(models/train/reference_labels.tsv: the pbmc3k training cells) as the reference; k = 10
cosine kNN vote, calibrated vote confidence, novelty and its depth cuts (the reference cells
thinned as `cellstream reference` does); scored on the same test cells, each set as one batch.
Baseline: sklearn LogisticRegression on normalize_total(1e4)+log1p of the genes shared with
the test set, trained on the same pbmc3k training cells.
Writes models/train/scores.json, the reliability diagrams (--figures, default
models/pbmc-compact/figures/reliability.png) and prints markdown tables.
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
from common import (COARSE, DATA_3K, DATA_68K, PACKAGE, TRAIN_DIR, Dataset10x,  # noqa: E402
                    gene_to_vocab, label_index, length_batches, pad_batch, sha256_file,
                    thin_counts, tokenize_dataset)
from refmap import Reference  # noqa: E402

DEPTHS = ((1.0, None), (0.25, 25), (0.10, 10))  # (fraction, thinning seed)
EVAL_SEED = 0
N_ECE_BINS = 15


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


def merge_mono_probs(p):
    q = p.copy()
    q[:, MONO] += q[:, FCGR3A]
    q[:, FCGR3A] = 0
    return q


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def reliability(conf, correct, n_bins=N_ECE_BINS):
    """Per equal-width bin: (cells, mean confidence, accuracy); and the ECE."""
    b = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    rows, e = [], 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            rows.append((int(m.sum()), float(conf[m].mean()), float(correct[m].mean())))
            e += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return float(e), rows


def metrics(y, pred, conf=None, thr=None, assigned=None):
    from sklearn.metrics import f1_score

    present = sorted(set(y.tolist()))
    r = {"n": int(len(y)), "accuracy": float((pred == y).mean()),
         "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0))}
    if conf is not None:
        a = conf >= thr if assigned is None else assigned
        r["assigned_fraction"] = float(a.mean())
        r["accuracy_of_assigned"] = float((pred[a] == y[a]).mean()) if a.any() else float("nan")
        r["ece"], r["reliability"] = reliability(conf, pred == y)
    return r


class Package:
    def __init__(self, path):
        import onnxruntime as ort

        self.man = tomllib.loads((path / "manifest.toml").read_text())
        assert self.man["onnx_sha256"] == sha256_file(path / "model.onnx"), "manifest sha256"
        self.vocab = json.loads((path / "vocab.json").read_text())
        assert (path / "labels.txt").read_text().split("\n")[:-1] == COARSE
        self.pad_id = self.vocab[self.man["pad_token"]]
        self.cls_id = self.vocab[self.man["cls_token"]]
        self.max_len = self.man["max_len"]
        self.ties = self.man.get("ties", "seeded")
        self.T = float(self.man.get("temperature", 1.0))
        self.thr = float(self.man["confidence_threshold"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path / "model.onnx"), so,
                                         providers=["CPUExecutionProvider"])

    def run(self, X, barcodes, symbols):
        """-> (tokens, raw embeddings, logits)."""
        toks = tokenize_dataset(X, gene_to_vocab(symbols, self.vocab), barcodes, EVAL_SEED,
                                self.max_len, self.cls_id, self.ties)
        emb = np.zeros((len(toks), self.man["embedding_dim"]), np.float32)
        logits = np.zeros((len(toks), len(COARSE)), np.float32)
        for b in length_batches(toks, 64):
            ids, vals = pad_batch([toks[i] for i in b], self.pad_id)
            emb[b], logits[b] = self.sess.run(["cell_embedding", "logits"],
                                              {"gene_ids": ids, "values": vals})
        return toks, emb, logits


# The reference's cells thinned for its depth cuts, as `cellstream reference` does (its own
# draws differ; the depths are the same): (fraction, thinning seed).
REFERENCE_THINNING = ((0.5, 105), (0.25, 125), (0.10, 110))


def build_reference(pkg, X, barcodes, symbols, labels):
    """A Reference of these cells as the package embeds them, with its depth cuts."""
    _, emb, _ = pkg.run(X, barcodes, symbols)
    thinned = []
    for frac, seed in REFERENCE_THINNING:
        Xt = thin_counts(X, frac, seed)
        _, temb, _ = pkg.run(Xt, barcodes, symbols)
        thinned.append((frac, temb, np.asarray(Xt.sum(1)).ravel()))
    return Reference(emb, labels, umis=np.asarray(X.sum(1)).ravel(), thinned=thinned)


def batch_depth(X):
    """The depth a batch's cells are mapped at (cellstream: the batch's median UMIs)."""
    return np.full(X.shape[0], np.median(np.asarray(X.sum(1)).ravel()))


def fit_baseline(d3, tr, y_tr, symbols):
    """The baseline: logistic regression on log-normalised genes shared with the test set,
    fitted on pbmc3k's cells `tr`. -> (predict(X of the test set's genes), shared genes)."""
    from sklearn.linear_model import LogisticRegression

    idx3 = {s: i for i, s in enumerate(d3.symbols)}
    shared = [(idx3[s], j) for j, s in enumerate(symbols) if s in idx3]
    a3, at = np.array([p[0] for p in shared]), np.array([p[1] for p in shared])
    clf = LogisticRegression(max_iter=5000).fit(lognorm(d3.X[tr][:, a3]), y_tr)
    return (lambda X: clf.predict(lognorm(X[:, at]))), len(shared)


def load_test_sets():
    """-> (pbmc3k, its training cells' indices, its coarse labels, the test sets by name:
    (counts, barcodes, symbols, labels), pbmc68k_reduced's CD34+ cells left out (they have no
    coarse class))."""
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
    return d3, tr, y3, tests, len(c68) - len(keep68)


def read_labels_tsv(path, column):
    rows = [l.split("\t") for l in Path(path).read_text().splitlines()]
    j = rows[0].index(column)
    return {r[0]: r[j] for r in rows[1:]}


def plot_reliability(results, path, thr_note):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["sets"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7.6))
    colours = {"100": "#1f77b4", "25": "#ff7f0e", "10": "#2ca02c"}
    for col, name in enumerate(names):
        s = results["sets"][name]
        for row, (kind, title) in enumerate((("model", "classifier (softmax / T)"),
                                             ("reference", "reference kNN (calibrated vote)"))):
            ax = axes[row, col]
            ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":")
            for frac, _ in DEPTHS:
                dk = str(int(frac * 100))
                r = s[f"depth_{dk}"][kind]
                rel = np.array(r["reliability"])
                ax.plot(rel[:, 1], rel[:, 2], "-", color=colours[dk], lw=1,
                        label=f"{dk}% depth: ECE {r['ece']:.3f}, acc {r['accuracy']:.3f}")
                ax.scatter(rel[:, 1], rel[:, 2], s=4 + 60 * np.sqrt(rel[:, 0] / rel[:, 0].sum()),
                           color=colours[dk], zorder=3)
                mk = f"{kind}_mono_merged"
                if mk in s[f"depth_{dk}"] and dk == "100":
                    rm = s[f"depth_{dk}"][mk]
                    rel = np.array(rm["reliability"])
                    ax.plot(rel[:, 1], rel[:, 2], "--s", color="0.3", ms=3,
                            label=f"100%, monocytes merged: ECE {rm['ece']:.3f}")
            ax.set_xlim(0, 1.02)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("confidence (bin mean)")
            ax.set_ylabel("fraction right")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Reliability: 15 equal-width confidence bins (marker area ~ cells in the bin); "
                 f"{thr_note}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=64)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=PACKAGE)
    ap.add_argument("--out", type=Path, default=TRAIN_DIR / "scores.json")
    ap.add_argument("--reference-labels", type=Path, default=TRAIN_DIR / "reference_labels.tsv",
                    help="TSV (barcode, cell_type_coarse) of the pbmc3k reference cells")
    ap.add_argument("--figures", type=Path, default=None,
                    help="reliability diagram PNG (default: MODEL/figures/reliability.png)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    pkg = Package(args.model)
    d3, tr, y3, tests, cd34 = load_test_sets()
    held = set(tests["pbmc3k_heldout"][1])

    # the reference: the package's embeddings of the reference cells, with its depth cuts
    ref_lab = read_labels_tsv(args.reference_labels, "cell_type_coarse")
    ri = np.array([i for i, b in enumerate(d3.barcodes) if b in ref_lab])
    assert not (set(d3.barcodes[i] for i in ri) & held), "reference holds held-out cells"
    ref = build_reference(pkg, d3.X[ri], [d3.barcodes[i] for i in ri], d3.symbols,
                          label_index([ref_lab[d3.barcodes[i]] for i in ri]))
    print(f"model {args.model} sha256 {pkg.man['onnx_sha256'][:12]}…, ties {pkg.ties}, max_len "
          f"{pkg.max_len}, temperature {pkg.T}, threshold {pkg.thr}; reference {len(ri)} cells "
          f"(leave-one-out accuracy {ref.loo_correct.mean():.3f}, vote threshold "
          f"{ref.threshold:.3f}); pbmc68k_reduced: {len(tests['pbmc68k_reduced'][3])} cells "
          f"scored, {cd34} CD34+ excluded", flush=True)

    results = {"model": str(args.model), "onnx_sha256": pkg.man["onnx_sha256"], "ties": pkg.ties,
               "temperature": pkg.T, "confidence_threshold": pkg.thr, "tokenize_seed": EVAL_SEED,
               "ece_bins": N_ECE_BINS, "depth_thinning_seeds": {str(f): s for f, s in DEPTHS},
               "reference": {"labels": os.path.relpath(args.reference_labels, TRAIN_DIR.parents[1]),
                             **ref.summary()},
               "sets": {}}
    for name, (X, bcs, symbols, y) in tests.items():
        g2v = gene_to_vocab(symbols, pkg.vocab)
        setres = {"genes_in_panel": len(symbols), "panel_genes_in_vocab": int((g2v >= 0).sum()),
                  "per_class_n": {COARSE[k]: int((y == k).sum()) for k in range(len(COARSE))}}
        if not args.no_baseline:
            t0 = time.time()
            baseline, setres["baseline_shared_genes"] = fit_baseline(d3, tr, y3[tr], symbols)
            setres["baseline_fit_seconds"] = round(time.time() - t0, 1)
        for frac, seed in DEPTHS:
            Xd = X if seed is None else thin_counts(X, frac, seed)
            toks, emb, logits = pkg.run(Xd, bcs, symbols)
            p = softmax(logits / pkg.T)
            m = metrics(y, p.argmax(1), p.max(1), pkg.thr)
            m["mean_tokens_per_cell"] = float(np.mean([len(t[0]) for t in toks]))
            m["confusion"] = np.array([[int(((y == i) & (p.argmax(1) == j)).sum())
                                        for j in range(len(COARSE))]
                                       for i in range(len(COARSE))]).tolist()
            depth = batch_depth(Xd)
            mp = ref.map(emb, depth)
            rm = metrics(y, mp["label"], mp["confidence"], assigned=mp["assigned"])
            rm["novelty_median"] = float(np.median(mp["novelty"]))
            rm["novelty_above_1"] = float((mp["novelty"] > 1).mean())
            rm["novelty_above_cut"] = float((mp["novelty"] > ref.cut_at(depth)).mean())
            rm["agrees_with_classifier"] = float((mp["label"] == p.argmax(1)).mean())
            r = {"model": m, "reference": rm}
            if not args.no_baseline:
                bp = baseline(Xd)
                r["baseline"] = metrics(y, bp)
            if name == "pbmc68k_reduced":
                pm = merge_mono_probs(p)
                r["model_mono_merged"] = metrics(merge_mono(y), pm.argmax(1), pm.max(1), pkg.thr)
                r["reference_mono_merged"] = metrics(merge_mono(y), merge_mono(mp["label"]),
                                                     mp["confidence"], assigned=mp["assigned"])
                if not args.no_baseline:
                    r["baseline_mono_merged"] = metrics(merge_mono(y), merge_mono(bp))
            setres[f"depth_{int(frac * 100)}"] = r
            line = (f"{name:16s} depth {int(frac * 100):3d}%: model acc {m['accuracy']:.3f} "
                    f"F1 {m['macro_f1']:.3f} ECE {m['ece']:.3f} (assigned "
                    f"{m['assigned_fraction']:.2f}, acc of assigned {m['accuracy_of_assigned']:.3f},"
                    f" tokens {m['mean_tokens_per_cell']:.0f}) | reference acc {rm['accuracy']:.3f}"
                    f" F1 {rm['macro_f1']:.3f} ECE {rm['ece']:.3f} assigned "
                    f"{rm['assigned_fraction']:.2f} novelty>1 {rm['novelty_above_1']:.3f}")
            if not args.no_baseline:
                line += f" | baseline acc {r['baseline']['accuracy']:.3f} F1 {r['baseline']['macro_f1']:.3f}"
            print(line, flush=True)
            if "model_mono_merged" in r:
                mm, rr, bm = r["model_mono_merged"], r["reference_mono_merged"], r.get("baseline_mono_merged", {})
                print(f"{'  monos merged':16s} depth {int(frac * 100):3d}%: model acc "
                      f"{mm['accuracy']:.3f} F1 {mm['macro_f1']:.3f} ECE {mm['ece']:.3f} | reference"
                      f" acc {rr['accuracy']:.3f} | baseline acc "
                      f"{bm.get('accuracy', float('nan')):.3f} F1 {bm.get('macro_f1', float('nan')):.3f}")
        results["sets"][name] = setres
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    fig = args.figures or args.model / "figures/reliability.png"
    plot_reliability(results, fig, f"temperature {pkg.T}, tokenization {pkg.ties}")
    print(f"wrote {args.out} and {fig}")

    nan = float("nan")
    print("\n| test set | read depth | model accuracy | model macro-F1 | baseline accuracy | "
          "baseline macro-F1 | reference kNN accuracy | model ECE | assigned (conf ≥ %.2f) | "
          "accuracy of assigned |" % pkg.thr)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in results["sets"].items():
        for frac, _ in DEPTHS:
            r = s[f"depth_{int(frac * 100)}"]
            for suffix, label in (("", name), ("_mono_merged", f"{name}, monocytes merged")):
                if "model" + suffix not in r:
                    continue
                m, b, k = r["model" + suffix], r.get("baseline" + suffix, {}), r["reference" + suffix]
                print(f"| {label} | {int(frac * 100)}% | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | "
                      f"{b.get('accuracy', nan):.3f} | {b.get('macro_f1', nan):.3f} | "
                      f"{k['accuracy']:.3f} | {m['ece']:.3f} | {m['assigned_fraction']:.3f} | "
                      f"{m['accuracy_of_assigned']:.3f} |")


if __name__ == "__main__":
    main()
