#!/usr/bin/env python3
"""Stability of labels and embeddings under the tokenizer's seed (issue 19).

For held-out pbmc3k cells (models/train/heldout_barcodes.txt) and pbmc68k_reduced (all 700
cells), at full depth and binomially thinned to 25% and 10% (common.thin_counts, seeds 25 and
10 as evaluate.py), each cell is embedded and labelled under 8 run seeds (0..7). Reported per
set and depth:

- same_label: fraction of cells whose label, as a record carries it, is the same under all
  seeds: "unassigned" (confidence below the manifest's confidence_threshold) counts as a label
  of its own; python mode also gives same_top_label (the arg-max of the logits, assigned or
  not). The accuracy under each seed counts an unassigned cell as not right (pbmc68k: CD34+
  cells have no coarse class and are left out of the accuracy only);
- cosine: the cosine between a cell's embeddings under two seeds, over every cell and every
  pair of seeds (28 pairs): median and 5th percentile; also the 5th percentile of each cell's
  worst pair.

Two ways to run it (from the repository root):

  python (onnxruntime on a package, common.py's tokenizer):
    OMP_NUM_THREADS=1 .venv-train/bin/python bench-data/stability.py --ties seeded
    OMP_NUM_THREADS=1 .venv-train/bin/python bench-data/stability.py --ties expected

  a cellstream binary (the Rust tokenizer and runtime; the manifest decides the mode):
    OMP_NUM_THREADS=1 .venv-train/bin/python bench-data/stability.py \\
        --cellstream target/release/cellstream [--cellstream-arg=--threads --cellstream-arg=2]

  The binary mode writes each set and depth as a 10x Matrix Market directory under
  bench-data/generated/stability/ (git-ignored) and runs
  `cellstream embed DIR --seed S --model MODEL --out F.ndjson` for each seed. It needs only
  numpy and scipy (any Python 3.11 with them; onnxruntime is not imported).

--out FILE writes the figures as JSON; a markdown table is printed.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import base64
import gzip
import itertools
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models/train"))
from common import (COARSE, DATA_3K, DATA_68K, PACKAGE, TIES, TRAIN_DIR, Dataset10x,  # noqa: E402
                    gene_to_vocab, label_index, length_batches, pad_batch, thin_counts,
                    tokenize_dataset)

DEPTHS = ((1.0, None), (0.25, 25), (0.10, 10))  # as evaluate.py
UNASSIGNED = -2


def test_sets():
    d3 = Dataset10x(DATA_3K)
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    te = np.array([i for i, b in enumerate(d3.barcodes) if b in held])
    d68 = Dataset10x(DATA_68K)
    return {
        "pbmc3k_heldout": (d3.X[te], [d3.barcodes[i] for i in te], d3.symbols,
                           label_index(d3.coarse()[te])),
        "pbmc68k_reduced": (d68.X, d68.barcodes, d68.symbols, label_index(d68.coarse())),
    }


# ------------------------------------------------------------------------------ python mode
class OrtRunner:
    def __init__(self, model, ties):
        import onnxruntime as ort

        self.man = tomllib.loads((model / "manifest.toml").read_text())
        self.vocab = json.loads((model / "vocab.json").read_text())
        self.pad_id = self.vocab[self.man["pad_token"]]
        self.cls_id = self.vocab[self.man["cls_token"]]
        self.max_len = self.man["max_len"]
        self.ties = ties
        self.T = float(self.man.get("temperature", 1.0))
        self.thr = float(self.man["confidence_threshold"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(model / "model.onnx"), so,
                                         providers=["CPUExecutionProvider"])

    def __call__(self, X, barcodes, symbols, seed, tag):
        g2v = gene_to_vocab(symbols, self.vocab)
        toks = tokenize_dataset(X, g2v, barcodes, seed, self.max_len, self.cls_id, self.ties)
        emb = np.zeros((len(toks), self.man["embedding_dim"]), np.float32)
        logits = np.zeros((len(toks), len(COARSE)), np.float32)
        for b in length_batches(toks, 64):
            ids, vals = pad_batch([toks[i] for i in b], self.pad_id)
            emb[b], logits[b] = self.sess.run(["cell_embedding", "logits"],
                                              {"gene_ids": ids, "values": vals})
        z = logits / self.T
        z = z - z.max(1, keepdims=True)
        conf = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).max(1)
        top = logits.argmax(1)
        return emb, np.where(conf >= self.thr, top, UNASSIGNED), top


# ---------------------------------------------------------------------------- binary mode
def write_mtx(dirpath, X, barcodes, symbols):
    """cells x genes CSR -> 10x v3 directory (genes x cells, gzipped)."""
    dirpath.mkdir(parents=True, exist_ok=True)
    def gz(name):
        return gzip.GzipFile(dirpath / name, "wb", mtime=0)

    with gz("matrix.mtx.gz") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(X.T), field="integer")
    with gz("features.tsv.gz") as f:
        f.write("".join(f"{s}\t{s}\tGene Expression\n" for s in symbols).encode())
    with gz("barcodes.tsv.gz") as f:  # last: its presence marks a complete directory
        f.write("".join(b + "\n" for b in barcodes).encode())


class BinaryRunner:
    def __init__(self, binary, model, extra, workdir):
        self.binary, self.model, self.extra, self.workdir = binary, model, extra, workdir
        self.labels = (model / "labels.txt").read_text().split("\n")[:-1]

    def __call__(self, X, barcodes, symbols, seed, tag):
        d = self.workdir / tag
        if not (d / "barcodes.tsv.gz").exists():
            write_mtx(d, X, barcodes, symbols)
        out = self.workdir / f"{tag}.seed{seed}.ndjson"
        cmd = [str(self.binary), "embed", str(d), "--seed", str(seed), "--model", str(self.model),
               "--out", str(out), *self.extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        recs = [json.loads(l) for l in out.read_text().splitlines() if l.strip()]
        recs = [r for r in recs if "cell" in r and "label" in r]
        assert [r["cell"] for r in recs] == list(barcodes), "records not in input order"
        emb, lab = [], []
        for r in recs:
            if r.get("embedding_b64"):
                e = np.frombuffer(base64.b64decode(r["embedding_b64"]), "<f4")
            elif r.get("embedding") is not None:
                e = np.asarray(r["embedding"], np.float32)
            else:
                e = np.full(len(emb[0]) if emb else 1, np.nan, np.float32)
            emb.append(e)
            lab.append(self.labels.index(r["label"]) if r["label"] in self.labels else UNASSIGNED)
        return np.stack(emb), np.asarray(lab), None


# -------------------------------------------------------------------------------- figures
def stability_figures(embs, labs, tops, y):
    """embs [seeds][n, d], labs (emitted) / tops (arg-max or None) [seeds][n] -> dict."""
    L = np.stack(labs)
    same = (L == L[0]).all(0)
    extra = {}
    if tops[0] is not None:
        T = np.stack(tops)
        extra["same_top_label"] = float((T == T[0]).all(0).mean())
    E = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in embs]
    cos = np.stack([(E[a] * E[b]).sum(1) for a, b in itertools.combinations(range(len(E)), 2)])
    scored = y >= 0
    acc = [float((l[scored] == y[scored]).mean()) for l in L]
    return {"cells": int(L.shape[1]), "seeds": len(labs), "same_label": float(same.mean()),
            "cos_median": float(np.median(cos)), "cos_p5": float(np.percentile(cos, 5)),
            "cell_worst_cos_p5": float(np.percentile(cos.min(0), 5)),
            "accuracy_per_seed": acc, "accuracy_mean": float(np.mean(acc)),
            "accuracy_min": float(np.min(acc)), "accuracy_max": float(np.max(acc)),
            "assigned_mean": float((L != UNASSIGNED).mean()), **extra}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=PACKAGE)
    ap.add_argument("--ties", choices=TIES, default="seeded",
                    help="python mode: the tokenizer mode (the binary takes it from its manifest)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--cellstream", type=Path, help="run this binary instead of onnxruntime")
    ap.add_argument("--cellstream-arg", action="append", default=[],
                    help="extra argument for `cellstream embed` (repeat)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench-data/generated/stability")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    if args.cellstream:
        runner = BinaryRunner(args.cellstream.resolve(), args.model.resolve(), args.cellstream_arg,
                              args.workdir)
        how = f"cellstream binary {args.cellstream}"
    else:
        runner = OrtRunner(args.model, args.ties)
        how = f"onnxruntime, common.py tokenizer, ties={args.ties}"
    print(f"stability: model {args.model}, {how}, seeds 0..{args.seeds - 1}", flush=True)
    res = {"model": str(args.model), "how": how, "seeds": list(range(args.seeds)), "sets": {}}
    for name, (X, bcs, symbols, y) in test_sets().items():
        res["sets"][name] = {}
        for frac, tseed in DEPTHS:
            Xd = X if tseed is None else thin_counts(X, frac, tseed)
            tag = f"{name}_depth{int(frac * 100)}"
            t0 = time.time()
            embs, labs, tops = zip(*[runner(Xd, bcs, symbols, s, tag) for s in range(args.seeds)])
            f = stability_figures(embs, labs, tops, y)
            f["seconds"] = round(time.time() - t0, 1)
            res["sets"][name][f"depth_{int(frac * 100)}"] = f
            print(f"{name:16s} {int(frac * 100):3d}%: same label {f['same_label']:.3f}, cosine "
                  f"median {f['cos_median']:.4f} p5 {f['cos_p5']:.4f} (worst pair p5 "
                  f"{f['cell_worst_cos_p5']:.4f}), accuracy {f['accuracy_min']:.3f}-"
                  f"{f['accuracy_max']:.3f}, assigned {f['assigned_mean']:.3f}"
                  + (f", same top label {f['same_top_label']:.3f}" if "same_top_label" in f else "")
                  + f" ({f['seconds']} s)", flush=True)
    print("\n| set | depth | same label, 8 seeds | cosine median | cosine p5 | accuracy (min-max over seeds) |")
    print("|---|---|---|---|---|---|")
    for name, s in res["sets"].items():
        for k, f in s.items():
            print(f"| {name} | {k.split('_')[1]}% | {f['same_label']:.3f} | {f['cos_median']:.4f} | "
                  f"{f['cos_p5']:.4f} | {f['accuracy_min']:.3f}-{f['accuracy_max']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
