#!/usr/bin/env python3
"""Train and export the shipped `models/pbmc-compact` model (CPU, one thread, fixed seed).

One command, from the repository root (set-up: models/train/README.md):

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/train.py

It (1) splits pbmc3k (stratified 20% held out, written to models/train/heldout_barcodes.txt),
(2) chooses the gene vocabulary from the TRAINING cells only, (3) trains the compact
scGPT-architecture encoder + classifier with read-depth / panel / dropout augmentation on
scGPT-tokenized cells, (4) exports model.onnx (opset 18, symbolic N and S) and checks it with
onnxruntime against torch, (5) picks the confidence threshold on the held-out cells and
writes vocab.json, labels.txt, manifest.toml into models/pbmc-compact/.
Scores: models/train/evaluate.py. Reference outputs for the Rust tests: make_reference.py.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CLS, export_module, COARSE, DATA_3K, EOC, N_BINS, PACKAGE, PAD, PAD_VALUE, TIES,
                    TRAIN_DIR, Dataset10x, binned_entries, build_model, cell_rng, label_index,
                    length_batches, pad_batch, sha256_file, thin_counts, tokenize_cell,
                    tokenize_dataset, tokens_expected)

import torch  # noqa: E402  (after the thread settings)
import torch.nn.functional as F  # noqa: E402

EVAL_SEED = 0  # tokenization seed (seeded mode) for validation (the runtime's default)
# read depths of the validation cells for temperature and threshold: (fraction, thinning seed);
# the seeds differ from evaluate.py's (25, 10), which thin the test sets
VAL_DEPTHS = ((1.0, None), (0.25, 125), (0.10, 110))


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------------- split
def split_heldout(labels, seed, frac=0.2):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=frac, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def split_validation(tr, labels, seed, frac):
    """The training cells -> (fit, validation), stratified; validation is never trained on
    (temperature, threshold and the choice between training configurations use it)."""
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(tr, test_size=frac, stratify=labels[tr], random_state=seed + 1)
    return np.sort(fit), np.sort(val)


# ------------------------------------------------------------------------------ vocabulary
def choose_vocab(X, symbols, y, n_hvg, min_detect, n_markers, id_order="priority", exclude=None):
    """Gene selection on the training cells only. Returns (gene indices in file order, table).

    - highly variable: top `n_hvg` by variance of analytic Pearson residuals (theta=100,
      Lause et al. 2021) among genes detected in >= 3 training cells;
    - well expressed: detected in >= `min_detect` of the training cells (these are the genes
      that any panel or shallow run still measures, and they carry the rank context);
    - markers: per coarse class, the top `n_markers` genes by mean log-normalised expression
      difference (class vs rest) — the label-informative genes, rare classes included.
    Genes whose symbol matches the regular expression `exclude` are left out of all three.
    id_order "priority": vocabulary ids in order of variability (HVG rank), so that where the
    `expected` tokenizer keeps the largest counts of a long cell, a tie keeps the more
    variable gene; "file": ids in input-file order (the first shipped model).
    """
    import re
    det_n = (X > 0).sum(0).A1
    det = det_n / X.shape[0]
    cand = np.where(det_n >= 3)[0]
    if exclude:
        cand = np.array([g for g in cand if not re.search(exclude, symbols[g])], dtype=np.int64)
    Xc = X[:, cand].toarray().astype(np.float64)
    n = Xc.sum(1, keepdims=True)
    p = Xc.sum(0, keepdims=True) / Xc.sum()
    mu = n * p
    r = (Xc - mu) / np.sqrt(mu + mu**2 / 100.0)
    c = math.sqrt(Xc.shape[0])
    rv = np.clip(r, -c, c).var(0)
    hvg_rank = np.full(X.shape[1], np.iinfo(np.int64).max)
    order = np.argsort(-rv, kind="stable")
    hvg_rank[cand[order]] = np.arange(len(order))
    hvg = set(cand[order[:n_hvg]].tolist())
    well = set(cand[det[cand] >= min_detect].tolist())
    L = np.log1p(Xc / n * 1e4)
    marker_of = {}
    for k, name in enumerate(COARSE):
        a = y == k
        if not a.any():  # a class left out of training (leave-one-type-out)
            continue
        lfc = L[a].mean(0) - L[~a].mean(0)
        for g in cand[np.argsort(-lfc, kind="stable")[:n_markers]]:
            marker_of.setdefault(int(g), []).append(name)
    genes = np.array(sorted(hvg | well | set(marker_of)), dtype=np.int64)
    if id_order == "priority":
        genes = genes[np.argsort(hvg_rank[genes], kind="stable")]
    table = []
    for g in genes:
        why = [w for w, s in (("hvg", hvg), ("expressed", well)) if g in s]
        if g in marker_of:
            why.append("marker:" + "|".join(marker_of[g]))
        table.append((symbols[g], int(hvg_rank[g]) if hvg_rank[g] < 10**9 else -1,
                      float(det[g]), ",".join(why)))
    return genes, table, hvg_rank


# ---------------------------------------------------------------------------- augmentation
class Augmenter:
    """Per training cell: read-depth thinning, panel restriction, gene dropout; then tokenize.

    The panel restriction imitates a dataset that measures only part of the vocabulary (a
    targeted panel, or a "reduced" dataset that kept its highly variable genes): either a
    uniform random subset of the vocabulary, or a noisy top-K by training-set variability.
    Binning then runs on what is left, exactly as the runtime bins such a cell.
    """

    def __init__(self, vocab_size, hvg_weight, args):
        self.ties = args.ties
        self.G = vocab_size
        self.logw = np.log(hvg_weight)
        self.a = args

    def __call__(self, vids, counts, rng, max_len, cls_id):
        a = self.a
        counts = counts.copy()
        if rng.random() < a.p_thin:
            counts = rng.binomial(counts, rng.uniform(a.thin_min, 1.0))
        if rng.random() < a.p_panel:
            f = rng.uniform(a.panel_min, a.panel_max)
            k = max(1, int(round(f * self.G)))
            if rng.random() < 0.5:
                keep = rng.permutation(self.G)[:k]
            else:  # Gumbel top-k on log weights: a noisy "highly variable genes" panel
                keep = np.argpartition(-(self.logw + rng.gumbel(size=self.G)), k - 1)[:k]
            in_panel = np.zeros(self.G + 3, dtype=bool)
            in_panel[keep] = True
            counts = np.where(in_panel[np.maximum(vids, 0)], counts, 0)
        if rng.random() < a.p_drop:
            counts = np.where(rng.random(len(counts)) < rng.uniform(0, a.drop_max), 0, counts)
        entries = None
        if self.ties == "expected":
            entries = binned_entries(vids, counts)
            toks = tokens_expected(*entries, max_len, cls_id)
        else:
            toks = tokenize_cell(vids, counts, rng, max_len, cls_id)
        if not self.a.mvc:
            return toks
        # what --mvc reconstructs: every in-vocabulary gene of the augmented cell, binned as
        # the tokenizer bins (before the max_len selection); absent genes are 0
        ids, _, bins = entries if entries is not None else binned_entries(vids, counts)
        return toks, (ids, bins / (N_BINS - 1))


class MVCDecoder(torch.nn.Module):
    """Training-only decoder for --mvc (scGPT's MVCDecoder, inner-product form): a gene's
    value predicted from the <cls> embedding and the gene's own embedding, for every
    vocabulary gene. Meant to make the embedding carry the cell's expression profile, not
    only what separates the training classes (tried for unknown types: model card). Not
    exported: the ONNX graph is the same with or without it."""

    def __init__(self, d_model):
        super().__init__()
        self.gene2query = torch.nn.Linear(d_model, d_model)
        self.W = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, emb, gene_embs):
        q = torch.sigmoid(self.gene2query(gene_embs))  # [G, d]
        # on the unit-length embedding: the one the runtime and the reference use
        return F.normalize(emb, dim=1) @ self.W(q).T  # [N, G]


# --------------------------------------------------------------------------------- helpers
@torch.no_grad()
def predict_torch(model, tokens, pad_id, batch_size=64):
    model.eval()
    emb = np.zeros((len(tokens), model.encoder.embedding.embedding_dim), np.float32)
    logits = None
    for b in length_batches(tokens, batch_size):
        ids, vals = pad_batch([tokens[i] for i in b], pad_id)
        e, l = model(torch.from_numpy(ids), torch.from_numpy(vals))
        if logits is None:
            logits = np.zeros((len(tokens), l.shape[1]), np.float32)
        emb[b], logits[b] = e.numpy(), l.numpy()
    return emb, logits


def predict_ort(sess, tokens, pad_id, batch_size=64):
    emb, logits = [None] * len(tokens), [None] * len(tokens)
    for b in length_batches(tokens, batch_size):
        ids, vals = pad_batch([tokens[i] for i in b], pad_id)
        e, l = sess.run(["cell_embedding", "logits"], {"gene_ids": ids, "values": vals})
        for j, i in enumerate(b):
            emb[i], logits[i] = e[j], l[j]
    return np.stack(emb), np.stack(logits)


def accuracy(logits, y):
    return float((logits.argmax(1) == y).mean())


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------- export
def export_onnx(model, path, pad_id, opset):
    model.eval()
    exported = export_module(model) if opset >= 23 else model
    ids = torch.full((2, 9), pad_id, dtype=torch.int64)
    ids[:, 0] = pad_id + 1
    ids[0, 1:6] = torch.arange(5)
    ids[1, 1:9] = torch.arange(8)
    vals = torch.where(ids == pad_id, PAD_VALUE, torch.rand(2, 9) * 50)
    vals[:, 0] = PAD_VALUE
    N, S = torch.export.Dim("N"), torch.export.Dim("S", min=2)
    prog = torch.onnx.export(
        exported, (ids, vals), dynamo=True, opset_version=opset,
        input_names=["gene_ids", "values"], output_names=["cell_embedding", "logits"],
        dynamic_shapes={"gene_ids": {0: N, 1: S}, "values": {0: N, 1: S}},
        optimize=True, verify=False)
    prog.save(str(path), external_data=False)
    import onnx

    m = onnx.load(str(path))
    # name the symbolic dimensions N and S (the exporter calls them after the Dims or s0/s1)
    names = {}
    for vi in m.graph.input:
        d = vi.type.tensor_type.shape.dim
        names.setdefault(d[0].dim_param, "N")
        names.setdefault(d[1].dim_param, "S")
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]
    m.producer_name = "cellstream models/train/train.py"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def check_onnx(model, path, tokens, pad_id):
    """torch vs onnxruntime: two S and two N, then all given tokens. Returns max abs diffs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for vi in sess.get_inputs() + sess.get_outputs():
        log(f"  onnx {vi.name}: {vi.type} {vi.shape}")
    model.eval()
    rng = np.random.default_rng(1)
    for n, s in ((1, 7), (5, 256), (3, 100), (8, 33)):
        pick = [tokens[i] for i in rng.choice(len(tokens), n, replace=False)]
        pick = [(g[:s], v[:s]) for g, v in pick]
        ids, vals = pad_batch(pick, pad_id, length=s)
        e, l = sess.run(["cell_embedding", "logits"], {"gene_ids": ids, "values": vals})
        with torch.no_grad():
            te, tl = model(torch.from_numpy(ids), torch.from_numpy(vals))
        de, dl = np.abs(e - te.numpy()).max(), np.abs(l - tl.numpy()).max()
        log(f"  ort vs torch at N={n} S={s}: max|d emb|={de:.2e} max|d logits|={dl:.2e}")
        assert e.shape == (n, te.shape[1]) and de < 1e-3 and dl < 1e-3
    te, tl = predict_torch(model, tokens, pad_id)
    oe, ol = predict_ort(sess, tokens, pad_id)
    return sess, float(np.abs(te - oe).max()), float(np.abs(tl - ol).max()), oe, ol


def fit_temperature(logits, y):
    """T > 0 minimising the negative log-likelihood of softmax(logits / T) (bounded search on
    log T over [1/20, 20])."""
    from scipy.optimize import minimize_scalar

    def nll(logt):
        z = logits / np.exp(logt)
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())

    r = minimize_scalar(nll, bounds=(-math.log(20), math.log(20)), method="bounded",
                        options={"xatol": 1e-5})
    return float(np.exp(r.x)), nll(0.0), float(r.fun)


def ece(conf, correct, n_bins=15):
    """Expected calibration error: equal-width bins of the confidence over [0, 1], the
    cell-weighted mean of |accuracy - mean confidence| per bin."""
    b = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    e = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            e += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return float(e)


def choose_threshold(probs_list, y_list, target, step=0.01):
    """Smallest t (grid of `step`) at which the assigned cells (max prob >= t) have precision
    >= target, pooled over the given evaluation conditions."""
    p = np.concatenate([pr.max(1) for pr in probs_list])
    ok = np.concatenate([pr.argmax(1) == y for pr, y in zip(probs_list, y_list)])
    grid = np.round(np.arange(0.0, 1.0, step), 4)
    for t in grid:
        a = p >= t
        if a.sum() and ok[a].mean() >= target:
            return float(t), float(ok[a].mean()), float(a.mean())
    t = float(grid[-1])  # target not reachable on the grid: use the highest grid value
    a = p >= t
    return t, float(ok[a].mean()) if a.any() else float("nan"), float(a.mean())


# ------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=None,
                    help="seed of the held-out and validation splits (default: --seed); keep it "
                         "at 0 to vary only initialisation and augmentation draws")
    ap.add_argument("--out", type=Path, default=PACKAGE)
    ap.add_argument("--aux-dir", type=Path, default=TRAIN_DIR,
                    help="where heldout_barcodes.txt, validation_barcodes.txt, vocab_genes.tsv, "
                         "checkpoint.pt, train_summary.json go")
    ap.add_argument("--ties", choices=TIES, default="expected",
                    help="tokenization: expected (deterministic, the draw's mean; top counts "
                         "past max_len) or seeded (scGPT's random draw and subsample)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--nlayers", type=int, default=4)
    ap.add_argument("--nhead", type=int, default=4)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--views", type=int, choices=(1, 2), default=1,
                    help="2: two augmented views of each cell per step, with --consistency")
    ap.add_argument("--consistency", type=float, default=0.0,
                    help="weight of the symmetric KL between the two views' predictions")
    ap.add_argument("--mvc", type=float, default=0.0,
                    help="weight of an auxiliary loss: reconstruct every vocabulary gene's bin "
                         "from the <cls> embedding (mean squared error, bins / 50); 0: off")
    ap.add_argument("--ce-weight", type=float, default=1.0,
                    help="weight of the classification loss; 0 with --mvc: an embedding trained "
                         "without labels (the classifier head stays untrained)")
    ap.add_argument("--val-frac", type=float, default=0.15,
                    help="stratified share of the training cells kept for validation")
    ap.add_argument("--exclude-class", default="",
                    help="leave this class out of training and validation (unknown-type runs)")
    ap.add_argument("--n-hvg", type=int, default=2000)
    ap.add_argument("--min-detect", type=float, default=0.10)
    ap.add_argument("--n-markers", type=int, default=50)
    ap.add_argument("--vocab-order", choices=("priority", "file"), default="priority")
    ap.add_argument("--exclude-genes", default="",
                    help="regular expression: symbols left out of the vocabulary")
    ap.add_argument("--p-thin", type=float, default=0.7)
    ap.add_argument("--thin-min", type=float, default=0.1)
    ap.add_argument("--p-panel", type=float, default=0.6)
    ap.add_argument("--panel-min", type=float, default=0.1)
    ap.add_argument("--panel-max", type=float, default=0.8)
    ap.add_argument("--p-drop", type=float, default=0.3)
    ap.add_argument("--drop-max", type=float, default=0.3)
    ap.add_argument("--opset", type=int, default=23,
                    help="23: the fast form (common.export_module); 18: nn.TransformerEncoder")
    ap.add_argument("--precision-target", type=float, default=0.95)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--max-train-cells", type=int, default=0, help="debug: subsample training")
    args = ap.parse_args()

    t_start = time.time()
    aux = args.aux_dir
    aux.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"torch {torch.__version__} on {device}, threads {torch.get_num_threads()}; args {vars(args)}")

    d = Dataset10x(DATA_3K)
    y_all = label_index(d.coarse())
    assert (y_all >= 0).all()
    split_seed = args.seed if args.split_seed is None else args.split_seed
    tr, te = split_heldout(y_all, split_seed)
    fit, val = split_validation(tr, y_all, split_seed, args.val_frac)
    (aux / "heldout_barcodes.txt").write_text("".join(d.barcodes[i] + "\n" for i in te))
    (aux / "validation_barcodes.txt").write_text("".join(d.barcodes[i] + "\n" for i in val))
    if args.exclude_class:
        k = COARSE.index(args.exclude_class)
        fit, val = fit[y_all[fit] != k], val[y_all[val] != k]
    # the package's reference (cellstream reference --labels): every training cell, fit and
    # validation, with its coarse label
    ref_cells = np.sort(np.concatenate([fit, val]))
    (aux / "reference_labels.tsv").write_text("barcode\tcell_type_coarse\n" + "".join(
        f"{d.barcodes[i]}\t{COARSE[y_all[i]]}\n" for i in ref_cells))
    log(f"pbmc3k: {len(fit)} training cells, {len(val)} validation, {len(te)} held out (never "
        f"used here){'; class left out: ' + args.exclude_class if args.exclude_class else ''}")

    genes, table, hvg_rank = choose_vocab(d.X[fit], d.symbols, y_all[fit], args.n_hvg,
                                          args.min_detect, args.n_markers, args.vocab_order,
                                          args.exclude_genes)
    G = len(genes)
    vocab = {d.symbols[g]: i for i, g in enumerate(genes)}
    pad_id, cls_id = G, G + 1
    vocab.update({PAD: G, CLS: G + 1, EOC: G + 2})
    with open(aux / "vocab_genes.tsv", "w") as f:
        f.write("symbol\thvg_rank\tdetected_frac_train\tselected_as\n")
        for s, r, dt, why in table:
            f.write(f"{s}\t{r}\t{dt:.4f}\t{why}\n")
    log(f"vocabulary: {G} genes (+3 specials, ids in {args.vocab_order} order); "
        f"<pad>={pad_id} <cls>={cls_id}")

    g2v = np.full(len(d.symbols), -1, dtype=np.int64)
    g2v[genes] = np.arange(G)
    # panel weights for the "HVG-like panel" augmentation: by training-set variability rank
    hr = hvg_rank[genes].astype(np.float64)
    hr[hr > 10**9] = hr[hr < 10**9].max()
    hvg_weight = 1.0 / (1.0 + hr / 300.0)
    aug = Augmenter(G, hvg_weight, args)

    Xtr = d.X[fit]
    ytr = y_all[fit]
    if args.max_train_cells:
        sub = np.random.default_rng(args.seed).permutation(len(fit))[: args.max_train_cells]
        Xtr, ytr = Xtr[np.sort(sub)], ytr[np.sort(sub)]
    rows = [(g2v[Xtr.indices[Xtr.indptr[i]:Xtr.indptr[i + 1]]],
             Xtr.data[Xtr.indptr[i]:Xtr.indptr[i + 1]]) for i in range(Xtr.shape[0])]

    # validation cells at three read depths: progress log, temperature, threshold
    Xva, yva, bva = d.X[val], y_all[val], [d.barcodes[i] for i in val]
    va_toks = [tokenize_dataset(Xva if s is None else thin_counts(Xva, f, s), g2v, bva, EVAL_SEED,
                                args.max_len, cls_id, args.ties) for f, s in VAL_DEPTHS]
    # and restricted to the fit cells' 765 most variable genes (a "reduced" dataset; log only)
    panel = np.zeros(len(d.symbols))
    panel[np.argsort(hvg_rank, kind="stable")[:765]] = 1
    va_panel = tokenize_dataset((Xva @ sp.diags(panel)).astype(np.int64).tocsr(), g2v, bva,
                                EVAL_SEED, args.max_len, cls_id, args.ties)

    counts = np.bincount(ytr, minlength=len(COARSE)).astype(np.float64)
    cw = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    cw = cw / (cw * torch.tensor(counts / counts.sum(), dtype=torch.float32)).sum()
    log("class counts (train):", dict(zip(COARSE, counts.astype(int).tolist())),
        "weights:", [round(float(w), 2) for w in cw])

    model = build_model(G + 3, pad_id, len(COARSE), args.d_model, args.nhead, args.d_hid,
                        args.nlayers, args.dropout).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters")
    named = list(model.named_parameters())
    mvc = None
    if args.mvc:
        mvc = MVCDecoder(args.d_model).to(device)
        named += [("mvc." + n, p) for n, p in mvc.named_parameters()]
        all_genes = torch.arange(G, device=device)
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(rows) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warm = min(steps_per_epoch, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    rng = np.random.default_rng(args.seed + 1)
    history = []

    for epoch in range(1, args.epochs + 1):
        model.train()
        t0 = time.time()
        views = [[aug(v, c, rng, args.max_len, cls_id) for v, c in rows] for _ in range(args.views)]
        if mvc is not None:
            targets = [[t[1] for t in v] for v in views]
            views = [[t[0] for t in v] for v in views]
        toks = views[0]
        # length-bucketed batches (little padding), visited in random order
        order = np.argsort([len(t[0]) + rng.random() * 8 for t in toks], kind="stable")
        batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        rng.shuffle(batches)
        tot_loss, tot_ok, n_seen, n_tok, tot_mvc = 0.0, 0, 0, 0, 0.0
        for b in batches:
            ids, vals = pad_batch([v[i] for v in views for i in b], pad_id)
            yb = torch.from_numpy(ytr[b]).to(device)
            emb, logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(vals).to(device))
            yv = yb.repeat(args.views)
            loss = args.ce_weight * F.cross_entropy(logits, yv, weight=cw.to(device),
                                                    label_smoothing=args.label_smoothing)
            if mvc is not None:
                tgt = np.zeros((len(ids), G), np.float32)
                for r, (g, x) in enumerate(t[i] for t in targets for i in b):
                    tgt[r, g] = x
                pred = mvc(emb, model.encoder(all_genes))
                mvc_loss = F.mse_loss(pred, torch.from_numpy(tgt).to(device))
                loss = loss + args.mvc * mvc_loss
                tot_mvc += mvc_loss.item() * len(b)
            if args.views == 2 and args.consistency > 0:
                lp1, lp2 = F.log_softmax(logits[:len(b)], 1), F.log_softmax(logits[len(b):], 1)
                sym_kl = 0.5 * (F.kl_div(lp1, lp2, log_target=True, reduction="batchmean")
                                + F.kl_div(lp2, lp1, log_target=True, reduction="batchmean"))
                loss = loss + args.consistency * sym_kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(b)
            tot_ok += int((logits.argmax(1) == yv).sum())
            n_seen += len(b)
            n_tok += ids.size
        msg = (f"epoch {epoch}/{args.epochs}: loss {tot_loss / n_seen:.4f} train-acc(aug) "
               f"{tot_ok / (n_seen * args.views):.3f} lr {sched.get_last_lr()[0]:.2e} "
               f"{time.time() - t0:.1f}s ({n_tok / (time.time() - t0):.0f} tok/s)")
        if mvc is not None:
            msg += f" mvc-mse {tot_mvc / n_seen:.4f}"
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            model.cpu()
            accs = [accuracy(predict_torch(model, t, pad_id)[1], yva) for t in va_toks + [va_panel]]
            model.to(device)
            history.append({"epoch": epoch, "validation_accuracy": accs})
            msg += " | validation acc " + " / ".join(
                f"{a:.3f}" for a in accs) + " (depth 100/25/10%, HVG panel)"
        log(msg)
    train_s = time.time() - t_start
    model.cpu().eval()

    # -------------------------------------------------------------------------- package
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    hparams = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    torch.save({"state_dict": model.state_dict(), "args": hparams, "vocab": vocab}, aux / "checkpoint.pt")
    onnx_path = out / "model.onnx"
    export_onnx(model, onnx_path, pad_id, args.opset)
    log(f"exported {onnx_path} ({onnx_path.stat().st_size} bytes)")
    sess, de, dl, oe, ol = check_onnx(model, onnx_path, va_toks[0], pad_id)
    log(f"validation {len(val)} cells, torch vs onnxruntime: max|d emb|={de:.3e} max|d logits|={dl:.3e}")

    # calibration on the validation cells, read depths 100/25/10% pooled
    vlog = [predict_ort(sess, t, pad_id)[1] for t in va_toks]
    lg, yy = np.concatenate(vlog), np.concatenate([yva] * len(vlog))
    T, nll1, nllT = fit_temperature(lg, yy)
    T = round(T, 4)  # as the manifest carries it
    pT = softmax(lg / T)
    ece1 = ece(softmax(lg).max(1), softmax(lg).argmax(1) == yy)
    eceT = ece(pT.max(1), pT.argmax(1) == yy)
    log(f"temperature {T:.4f} (validation NLL {nll1:.4f} -> {nllT:.4f}, ECE {ece1:.4f} -> {eceT:.4f})")
    thr, prec, cov = choose_threshold([softmax(l / T) for l in vlog], [yva] * len(vlog),
                                      args.precision_target)
    log(f"confidence threshold {thr} (validation, depths 100/25/10% pooled): precision {prec:.3f}, "
        f"assigned {cov:.3f}")

    (out / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (out / "labels.txt").write_text("".join(c + "\n" for c in COARSE))
    (out / "manifest.toml").write_text(f"""name = "pbmc-compact"
architecture = "scgpt"
version = "2"
embedding_dim = {args.d_model}
n_bins = {N_BINS}
max_len = {args.max_len}
pad_token = "{PAD}"
cls_token = "{CLS}"
pad_value = {PAD_VALUE}
ties = "{args.ties}"   # tokenization the model was trained for (models/train/common.py)
normalize_embedding = true
temperature = {T}   # logits / temperature before the softmax; fitted on validation cells
confidence_threshold = {thr}   # precision >= {args.precision_target} on validation cells, see README
onnx_sha256 = "{sha256_file(onnx_path)}"
[inputs]
gene_ids = "gene_ids"
values = "values"
[outputs]
embedding = "cell_embedding"
logits = "logits"
""")
    summary = {
        "seed": args.seed, "args": hparams, "n_params": n_params,
        "vocab_size": G, "onnx_bytes": onnx_path.stat().st_size,
        "onnx_sha256": sha256_file(onnx_path), "train_seconds": round(train_s, 1),
        "cells": {"fit": len(fit), "validation": len(val), "heldout": len(te)},
        "validation_history": history,
        "validation_acc_ort": [accuracy(l, yva) for l in vlog],
        "validation_acc_ort_hvg_panel": accuracy(predict_ort(sess, va_panel, pad_id)[1], yva),
        "torch_vs_ort_max_abs_diff": {"embedding": de, "logits": dl},
        "temperature": {"value": T, "nll_before": nll1, "nll_after": nllT,
                        "ece_before": ece1, "ece_after": eceT,
                        "fitted_on": "validation cells at read depth 100/25/10% pooled"},
        "confidence_threshold": {"value": thr, "precision": prec, "assigned_fraction": cov,
                                 "target_precision": args.precision_target},
        "torch": torch.__version__, "device": str(device),
    }
    (aux / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t_start:.0f}s (training {train_s:.0f}s); summary in "
        f"{aux / 'train_summary.json'}")


if __name__ == "__main__":
    main()
