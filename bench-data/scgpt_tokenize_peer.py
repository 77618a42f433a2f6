#!/usr/bin/env python3
"""Python peer for `cargo bench --bench tokenize`: scGPT's own tokenization of pbmc3k, one core.

Per cell it does what scgpt 0.2.4 does in `tasks/cell_emb.py` (Dataset.__getitem__) and
`data_collator.DataCollator(do_padding=True, pad_value=-2, do_mlm=False, do_binning=True,
max_length=1200, sampling=True, keep_first_n_tokens=1)`: prepend <cls>/pad_value, bin the
non-zero counts with scGPT's real `binning` (n_bins=51), then sample (beyond max_length) or pad.

STUBBING: torch, scanpy, anndata are NOT installed (too heavy). `scgpt/preprocess.py` imports them
(and `from scgpt import logger`) at module import time, so lightweight stub modules are put into
sys.modules and the *file* scgpt/preprocess.py is loaded directly with importlib (the package's
heavy __init__ is never executed). `binning` and `_digitize` run unmodified from the installed
file; its sha256 is checked against the wheel's RECORD. The stubs are never called on this path
(the input rows are numpy arrays, so `isinstance(row, torch.Tensor)` is False).
"""
import os

# One core: must be set before numpy is imported.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse, base64, gzip, hashlib, importlib.util, json, logging, statistics, sys, time, types
from pathlib import Path

import numpy as np
import scipy
import scipy.io

REPO = Path(__file__).resolve().parent.parent
PAD_VALUE, N_BINS, MAX_LENGTH = -2.0, 51, 1200
SPECIALS = ["<pad>", "<cls>", "<eoc>"]  # appended in embed_data's order if missing
STUBBED = ["torch", "scanpy", "scanpy.get", "anndata", "scgpt (package: only `logger`)"]


def load_scgpt_preprocess():
    """Import scgpt/preprocess.py from the installed scgpt with stubbed heavy dependencies."""
    spec = importlib.util.find_spec("scgpt")  # locates the package without executing it
    pkg_dir = Path(spec.submodule_search_locations[0])
    path = pkg_dir / "preprocess.py"
    record = next(pkg_dir.parent.glob("scgpt-*.dist-info")) / "RECORD"
    want = next(l.split(",")[1] for l in record.read_text().splitlines()
                if l.startswith("scgpt/preprocess.py,"))
    got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
    assert got == want, f"{path} differs from the scgpt wheel ({got} != {want})"

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class _Stub:  # stands in for torch.Tensor / anndata.AnnData in annotations and isinstance
        pass

    def _absent(*_a, **_k):
        raise RuntimeError("stubbed: not installed in the peer benchmark")

    stub("torch", Tensor=_Stub, from_numpy=_absent, zeros_like=_absent)
    stub("scanpy", get=stub("scanpy.get", _get_obs_rep=_absent, _set_obs_rep=_absent))
    stub("anndata", AnnData=_Stub)
    stub("scgpt", logger=logging.getLogger("scGPT"), __path__=[])
    mod_spec = importlib.util.spec_from_file_location("scgpt.preprocess", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod, path


def load_cells(data_dir, vocab_path):
    """Untimed: CSR cells x genes (float32 counts, file gene order), genes filtered to the vocab."""
    vocab = json.loads(Path(vocab_path).read_text())
    for s in SPECIALS:
        vocab.setdefault(s, len(vocab))
    with gzip.open(data_dir / "features.tsv.gz", "rt") as f:
        symbols = [line.rstrip("\n").split("\t")[1] for line in f]
    with gzip.open(data_dir / "barcodes.tsv.gz", "rt") as f:
        barcodes = [line.strip() for line in f]
    keep = np.array([s in vocab for s in symbols])
    gene_ids = np.array([vocab[s] for s in symbols if s in vocab], dtype=np.int64)
    m = scipy.io.mmread(data_dir / "matrix.mtx.gz").T.tocsr().astype(np.float32)  # cells x genes
    m = m[:, keep].tocsr()
    m.sum_duplicates()
    m.sort_indices()
    m.eliminate_zeros()
    assert m.shape == (len(barcodes), len(gene_ids))
    return m, gene_ids, vocab, barcodes


def tokenize_all(m, gene_ids, cls_id, pad_id, binning):
    """Timed: one pass over all cells, as Dataset.__getitem__ + DataCollator do per cell."""
    indptr, indices, data = m.indptr, m.indices, m.data
    out_genes = np.empty((m.shape[0], MAX_LENGTH), dtype=np.int64)
    out_values = np.empty((m.shape[0], MAX_LENGTH), dtype=np.float32)
    for i in range(m.shape[0]):
        lo, hi = indptr[i], indptr[i + 1]
        genes = np.insert(gene_ids[indices[lo:hi]], 0, cls_id)
        values = np.insert(data[lo:hi], 0, PAD_VALUE)  # float32, like torch .float()
        values[1:] = binning(row=values[1:], n_bins=N_BINS)
        n = len(genes)
        if n > MAX_LENGTH:
            # DataCollator._sample: torch.randperm replaced by np.random.permutation because
            # torch is not installed (same work: one random permutation of n-1 indices).
            idx = np.concatenate([np.arange(1), np.random.permutation(n - 1)[: MAX_LENGTH - 1] + 1])
            genes, values = genes[idx], values[idx]
        elif n < MAX_LENGTH:
            # DataCollator._pad. (scGPT pads to min(max_length, longest cell in the batch of 64);
            # on pbmc3k every batch has a cell longer than 1200, so that is max_length.)
            genes = np.concatenate([genes, np.full(MAX_LENGTH - n, pad_id, dtype=genes.dtype)])
            values = np.concatenate([values, np.full(MAX_LENGTH - n, PAD_VALUE, dtype=values.dtype)])
        out_genes[i], out_values[i] = genes, values
    return out_genes, out_values


def check_fixture(path, m, gene_ids, cls_id, binning):
    """Untimed: the fixture's semantics (seed 0 once, binning only, no sampling), first N cells."""
    with gzip.open(path, "rt") as f:
        header, *cells = [json.loads(line) for line in f]
    assert header["cls_id"] == cls_id and header["n_bins"] == N_BINS, header
    np.random.seed(header["seed"])
    bad_values = bad_edges = 0
    for c in cells:
        i = c["index"]
        lo, hi = m.indptr[i], m.indptr[i + 1]
        counts = m.data[lo:hi]
        assert [cls_id, *gene_ids[m.indices[lo:hi]].tolist()] == c["gene_ids"], f"gene ids, cell {i}"
        assert counts.tolist() == c["counts"], f"counts, cell {i}"
        edges = np.quantile(counts, np.linspace(0, 1, N_BINS - 1))  # what binning computes
        bad_edges += edges.astype(np.float64).tolist() != c["edges"]
        values = [PAD_VALUE, *binning(row=counts.copy(), n_bins=N_BINS).tolist()]
        bad_values += values != c["values"]
    print(f"fixture check: {len(cells)} cells, values mismatching: {bad_values}, "
          f"edges mismatching: {bad_edges} (fixture numpy {header['numpy']})")
    return bad_values == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench-data/pbmc3k")
    ap.add_argument("--vocab", type=Path, default=REPO / "tests/fixtures/scgpt_default_gene_vocab.json")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--check", type=Path, metavar="FIXTURE", help="scgpt_tokens_pbmc3k_seed0.jsonl.gz")
    args = ap.parse_args()

    pre, pre_path = load_scgpt_preprocess()
    print(f"scGPT binning: unmodified {pre_path} (sha256 matches the scgpt wheel's RECORD)")
    print(f"stubbed modules (not installed, never called here): {', '.join(STUBBED)}")
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, python {sys.version.split()[0]}")

    m, gene_ids, vocab, _ = load_cells(args.data, args.vocab)
    cls_id, pad_id = vocab["<cls>"], vocab["<pad>"]
    n = m.shape[0]
    print(f"{n} cells, {len(gene_ids)} genes in vocab, {m.nnz} non-zeros; "
          f"<pad>={pad_id} <cls>={cls_id}; max_length={MAX_LENGTH}, n_bins={N_BINS}")

    if args.check and not check_fixture(args.check, m, gene_ids, cls_id, pre.binning):
        sys.exit("fixture check FAILED")

    times = []
    for _ in range(args.repeat):
        np.random.seed(0)
        t0 = time.perf_counter()
        tokenize_all(m, gene_ids, cls_id, pad_id, pre.binning)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"scGPT tokenize, {args.repeat} passes x {n} cells, 1 core: "
          f"min {min(times):.4f} s, median {med:.4f} s, max {max(times):.4f} s; "
          f"{n / med:.1f} cells/s per core (median)")
    print(f"PEER scgpt_tokenize cells={n} median_s={med:.6f} cells_per_s={n / med:.1f}")


if __name__ == "__main__":
    main()
