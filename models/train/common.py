"""Shared pieces of the pbmc-compact training: data loading, scGPT tokenization, the model.

Imported by train.py, evaluate.py and make_reference.py. Nothing here trains or writes files.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one core: the machine is shared

import gzip
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
DATA_3K = REPO / "bench-data/pbmc3k"
DATA_68K = REPO / "bench-data/pbmc68k_reduced"
PACKAGE = REPO / "models/pbmc-compact"
TRAIN_DIR = REPO / "models/train"

PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"
N_BINS = 51
PAD_VALUE = -2.0
MAX_VALUE = 512  # scGPT ContinuousValueEncoder clamps values at this
COARSE = ["CD4 T", "CD8 T", "B", "NK", "CD14 Mono", "FCGR3A Mono", "DC", "Platelet"]


# ----------------------------------------------------------------------------------------- data
class Dataset10x:
    """A 10x Matrix Market directory as cells x genes CSR (int64 counts, file gene order)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with gzip.open(self.path / "features.tsv.gz", "rt") as f:
            self.symbols = [line.rstrip("\n").split("\t")[1] for line in f]
        with gzip.open(self.path / "barcodes.tsv.gz", "rt") as f:
            self.barcodes = [line.strip() for line in f]
        m = scipy.io.mmread(self.path / "matrix.mtx.gz")  # genes x cells
        x = sp.csr_matrix(m.T)
        assert np.all(x.data == np.round(x.data)), "non-integer counts"
        x = x.astype(np.int64)
        x.sum_duplicates()
        x.sort_indices()
        x.eliminate_zeros()
        self.X = x
        assert self.X.shape == (len(self.barcodes), len(self.symbols))
        self.labels = {}
        lab = self.path / "labels.tsv"
        if lab.exists():
            rows = [l.rstrip("\n").split("\t") for l in lab.read_text().splitlines()]
            head, rows = rows[0], rows[1:]
            for r in rows:
                self.labels[r[0]] = dict(zip(head[1:], r[1:]))

    def coarse(self):
        return np.array([self.labels[b]["cell_type_coarse"] for b in self.barcodes])


def label_index(names):
    return np.array([COARSE.index(n) if n in COARSE else -1 for n in names], dtype=np.int64)


def thin_counts(X: sp.csr_matrix, frac: float, seed: int) -> sp.csr_matrix:
    """Binomial thinning of every count to `frac` of the reads (fixed seed)."""
    rng = np.random.default_rng(seed)
    Y = X.copy()
    Y.data = rng.binomial(Y.data, frac)
    Y.eliminate_zeros()
    return Y


# ----------------------------------------------------------------------------------- vocabulary
def load_vocab(path: Path):
    """vocab.json: symbol -> id; the specials are the last three ids."""
    return json.loads(Path(path).read_text())


def gene_to_vocab(symbols, vocab):
    """Per input gene: its vocabulary id, or -1 when the symbol is not in the vocabulary."""
    return np.array([vocab.get(s, -1) if s not in (PAD, CLS, EOC) else -1 for s in symbols],
                    dtype=np.int64)


# --------------------------------------------------------------------------------- tokenization
def bin_counts(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scGPT `binning` of one cell's non-zero counts (float32 as scGPT feeds them).

    edges = np.quantile(x, linspace(0, 1, n_bins-1)); left/right digitize; where they differ a
    uniform draw u picks ceil(u*(right-left)+left), i.e. one of right+1..=left.
    """
    edges = np.quantile(x, np.linspace(0, 1, N_BINS - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    u = rng.random(len(x))
    return np.ceil(u * (right - left) + left).astype(np.int64)


def tokenize_cell(vocab_ids, counts, rng, max_len, cls_id):
    """One cell -> (gene_ids i64, values f32), unpadded, <cls> first.

    vocab_ids: vocabulary id per non-zero entry of the cell (-1 = not in vocab), input order;
    counts: the raw counts of those entries.
    """
    keep = (vocab_ids >= 0) & (counts > 0)
    ids = vocab_ids[keep]
    x = counts[keep].astype(np.float32)
    bins = bin_counts(x, rng) if len(x) else np.zeros(0, np.int64)
    if len(ids) + 1 > max_len:
        sel = np.sort(rng.permutation(len(ids))[: max_len - 1])
        ids, bins = ids[sel], bins[sel]
    gene_ids = np.concatenate([[cls_id], ids]).astype(np.int64)
    values = np.concatenate([[PAD_VALUE], bins.astype(np.float32)]).astype(np.float32)
    return gene_ids, values


def bin_counts_expected(x: np.ndarray) -> np.ndarray:
    """`bin_counts` with the draw replaced by its mean (float32, possibly a half-integer).

    Same edges and left/right digitize; value = left where left == right, else
    (left + right + 1) / 2, the mean of the uniform draw over right+1..=left.
    """
    edges = np.quantile(x, np.linspace(0, 1, N_BINS - 1))
    left = np.digitize(x, edges)
    right = np.digitize(x, edges, right=True)
    return np.where(left == right, left, (left + right + 1) / 2).astype(np.float32)


def select_expected(ids: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """Indices (input order) of the `n` entries with the largest counts, ties broken by the
    lowest vocabulary id, then (the same gene twice in one input) by input position."""
    order = np.lexsort((np.arange(len(ids)), ids, -x.astype(np.float64)))
    return np.sort(order[:n])


def binned_entries(vocab_ids, counts):
    """A cell's in-vocabulary non-zero entries (input order): ids, counts as float32, and
    their bins (`bin_counts_expected`, over all of them)."""
    keep = (vocab_ids >= 0) & (counts > 0)
    x = counts[keep].astype(np.float32)
    return vocab_ids[keep], x, bin_counts_expected(x) if len(x) else np.zeros(0, np.float32)


def tokenize_cell_expected(vocab_ids, counts, max_len, cls_id):
    """Tokenization mode `expected`: deterministic, no RNG. One cell -> (gene_ids, values).

    1. the in-vocabulary non-zero entries in input order, counts as float32;
    2. scGPT binning over ALL of them with the tie draw replaced by its mean
       (`bin_counts_expected`);
    3. more than max_len - 1 entries: keep the max_len - 1 largest counts, ties by lowest
       vocabulary id, survivors in input order (binning happens before selection, as scGPT's);
    4. <cls> first with value pad_value.
    """
    return tokens_expected(*binned_entries(vocab_ids, counts), max_len, cls_id)


def tokens_expected(ids, x, vals, max_len, cls_id):
    """Steps 3 and 4 of `tokenize_cell_expected`, on `binned_entries`' output."""
    if len(ids) + 1 > max_len:
        sel = select_expected(ids, x, max_len - 1)
        ids, vals = ids[sel], vals[sel]
    gene_ids = np.concatenate([[cls_id], ids]).astype(np.int64)
    values = np.concatenate([[PAD_VALUE], vals]).astype(np.float32)
    return gene_ids, values


TIES = ("seeded", "expected")  # tokenization modes: scGPT's random draw / its mean


def cell_rng(seed: int, barcode: str) -> np.random.Generator:
    """Per-cell RNG from (run seed, barcode): a cell's tokens do not depend on its batch."""
    return np.random.default_rng([seed, zlib.crc32(barcode.encode())])


def tokenize_dataset(X, g2v, barcodes, seed, max_len, cls_id, ties="seeded"):
    """All cells of a CSR matrix, deterministic per (seed, barcode); `ties="expected"`:
    the seed-free mode (`tokenize_cell_expected`)."""
    assert ties in TIES, ties
    out = []
    for i in range(X.shape[0]):
        lo, hi = X.indptr[i], X.indptr[i + 1]
        if ties == "expected":
            out.append(tokenize_cell_expected(g2v[X.indices[lo:hi]], X.data[lo:hi], max_len, cls_id))
        else:
            out.append(tokenize_cell(g2v[X.indices[lo:hi]], X.data[lo:hi],
                                     cell_rng(seed, barcodes[i]), max_len, cls_id))
    return out


def pad_batch(tokens, pad_id, length=None):
    """List of (ids, values) -> padded int64 [N,S], float32 [N,S] (pad id / pad_value)."""
    S = length or max(len(t[0]) for t in tokens)
    ids = np.full((len(tokens), S), pad_id, dtype=np.int64)
    vals = np.full((len(tokens), S), PAD_VALUE, dtype=np.float32)
    for i, (g, v) in enumerate(tokens):
        ids[i, : len(g)] = g
        vals[i, : len(v)] = v
    return ids, vals


def length_batches(tokens, batch_size):
    """Index batches of cells of similar length (sorted by length, stable)."""
    order = np.argsort([len(t[0]) for t in tokens], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- model
def build_model(ntoken, pad_id, n_cls, d_model=128, nhead=4, d_hid=256, nlayers=4, dropout=0.1):
    import torch
    from torch import nn

    class GeneEncoder(nn.Module):  # scGPT GeneEncoder
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(ntoken, d_model, padding_idx=pad_id)
            self.enc_norm = nn.LayerNorm(d_model)

        def forward(self, x):
            return self.enc_norm(self.embedding(x))

    class ContinuousValueEncoder(nn.Module):  # scGPT ContinuousValueEncoder
        def __init__(self):
            super().__init__()
            self.dropout = nn.Dropout(dropout)
            self.linear1 = nn.Linear(1, d_model)
            self.activation = nn.ReLU()
            self.linear2 = nn.Linear(d_model, d_model)
            self.norm = nn.LayerNorm(d_model)

        def forward(self, x):
            x = torch.clamp(x.unsqueeze(-1), max=MAX_VALUE)
            x = self.activation(self.linear1(x))
            return self.dropout(self.norm(self.linear2(x)))

    class ClsDecoder(nn.Module):  # scGPT ClsDecoder with nlayers=2
        def __init__(self):
            super().__init__()
            self._decoder = nn.ModuleList([nn.Linear(d_model, d_model), nn.ReLU(),
                                           nn.LayerNorm(d_model)])
            self.out_layer = nn.Linear(d_model, n_cls)

        def forward(self, x):
            for layer in self._decoder:
                x = layer(x)
            return self.out_layer(x)

    class CompactScGPT(nn.Module):
        """scGPT TransformerModel._encode + ClsDecoder: (gene_ids, values) -> (<cls> emb, logits)."""

        def __init__(self):
            super().__init__()
            self.pad_id = pad_id
            self.encoder = GeneEncoder()
            self.value_encoder = ContinuousValueEncoder()
            layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout, activation="relu",
                                               batch_first=True, norm_first=False)
            self.transformer_encoder = nn.TransformerEncoder(layer, nlayers,
                                                             enable_nested_tensor=False)
            self.cls_decoder = ClsDecoder()
            # scGPT init_weights
            self.encoder.embedding.weight.data.uniform_(-0.1, 0.1)
            with torch.no_grad():
                self.encoder.embedding.weight[pad_id].zero_()

        def forward(self, gene_ids, values):
            mask = gene_ids == self.pad_id
            x = self.encoder(gene_ids) + self.value_encoder(values)
            h = self.transformer_encoder(x, src_key_padding_mask=mask)
            emb = h[:, 0, :]
            return emb, self.cls_decoder(emb)

    return CompactScGPT()


def export_module(model):
    """The same weights as `build_model`'s CompactScGPT, written for export at opset >= 23 in
    the form tract runs fastest (each step measured, see BENCHMARKS.md "Model forward"):

    - attention as two `Einsum`s whose score tensor is laid out [heads, S_query, N, S_key],
      so that the key-padding mask [N, S_key] (0 / -inf from gene_ids == <pad>) is added by
      broadcasting over leading axes only, which tract runs as its vectorised "unicast"
      kernel, and the matmuls run on tract's own kernels. The earlier forms were slower in
      tract: the opset-18 nn.TransformerEncoder graph (~30 Reshape/Transpose/MatMul per
      layer), and one ONNX `Attention` node per layer with a [N,1,S,S] mask, which tract runs
      as a head-by-head flash SDPA with scalar exp;
    - the last layer computed for the `<cls>` row only: the model's outputs are the `<cls>`
      embedding and its logits, so the last layer needs keys and values of every token but
      the query, attention, feed-forward and norms of row 0 alone (a quarter of the work
      dropped, none of it reaching an output);
    - each LayerNorm as (x - mean(x)) through `RMSNormalization`, plus the bias, with the mean
      as a matmul by a constant 1/d column: tract expands ONNX `LayerNormalization` into a
      per-row sum that cost more than the rest of the norm together;
    - the query, key and value projection as one matmul whose output is reshaped to
      [N, S, 3, d] and indexed: split on its last axis instead, tract moves the split above
      the matmul and runs three 128-wide products (~72 GFLOP/s each here) instead of one
      384-wide one (~93 GFLOP/s).

    Outputs match the module to ~2e-6."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    def layer_norm(x, norm):
        d = x.shape[-1]
        centred = x - x @ torch.full((d, 1), 1.0 / d)
        return F.rms_norm(centred, (d,), weight=norm.weight, eps=norm.eps) + norm.bias

    class ExportScGPT(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, gene_ids, values):
            m = self.m
            n, s = gene_ids.shape
            key_mask = torch.where(gene_ids == m.pad_id, float("-inf"), 0.0).to(torch.float32)
            ve = m.value_encoder
            value = torch.clamp(values.unsqueeze(-1), max=MAX_VALUE)
            x = layer_norm(m.encoder.embedding(gene_ids), m.encoder.enc_norm) + layer_norm(
                ve.linear2(F.relu(ve.linear1(value))), ve.norm)
            layers = m.transformer_encoder.layers
            for i, layer in enumerate(layers):
                at = layer.self_attn
                d, h = at.embed_dim, at.num_heads
                heads = lambda t: t.reshape(n, -1, h, d // h)
                # q, k, v picked from one projection reshaped [N, S, 3, d] rather than split
                # on its last axis: tract pushes a split up into three 128-wide matmuls,
                # slower than the one 384-wide product (see the docstring).
                if i + 1 < len(layers):
                    qkv = F.linear(x, at.in_proj_weight, at.in_proj_bias).reshape(n, -1, 3, d)
                    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
                else:  # keys and values of every token, the rest for row 0 (<cls>) alone
                    kv = F.linear(x, at.in_proj_weight[d:], at.in_proj_bias[d:]).reshape(n, -1, 2, d)
                    k, v = kv[:, :, 0], kv[:, :, 1]
                    x = x[:, :1, :]
                    q = F.linear(x, at.in_proj_weight[:d], at.in_proj_bias[:d])
                scores = torch.einsum("nqhd,nkhd->hqnk", heads(q) * (1.0 / math.sqrt(d // h)), heads(k))
                p = torch.softmax(scores + key_mask, dim=-1)
                o = torch.einsum("hqnk,nkhd->nqhd", p, heads(v)).reshape(n, -1, d)
                x = layer_norm(x + at.out_proj(o), layer.norm1)
                x = layer_norm(x + layer.linear2(F.relu(layer.linear1(x))), layer.norm2)
            emb = x[:, 0, :]
            return emb, m.cls_decoder(emb)

    return ExportScGPT(model).eval()
