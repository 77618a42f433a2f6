#!/usr/bin/env python3
"""Python peer of `cellstream embed`, row (b): scGPT's own `embed_data` path on CPU with torch,
the shipped model's weights loaded into scgpt 0.2.4's `TransformerModel`.

Per .csb batch (the timed region, from opening the first file to the last embedding): read the
file, keep the genes the model's vocabulary knows and give them their token ids, as
`embed_data` does before it calls `get_batch_cell_embeddings`; then scGPT's unmodified
`get_batch_cell_embeddings(cell_embedding_mode="cls", max_length=<the model's max_len>,
batch_size=64)`: its Dataset (dense rows, <cls> first with pad_value), its `DataCollator`
(binning, sampling, padding), a torch DataLoader with scGPT's worker count, `model._encode`
under `torch.no_grad()`, the <cls> row, L2 normalisation. Model construction and weight
loading are outside the timed region (as session creation is for the onnxruntime peer).

What is not scGPT's own code, and why: `embed_data` itself reads an AnnData with scanpy and
maps genes through `GeneVocab` (torchtext, which does not install with this torch); this peer
does those two steps itself. scgpt is installed without its dependencies, so its package
`__init__` (which imports scanpy, scib, ...) is never run: `tasks/cell_emb.py`,
`data_collator.py`, `preprocess.py` and `model/*.py` are loaded from the installed wheel with
importlib after their sha256 is checked against the wheel's RECORD, under stub `scanpy`,
`anndata`, `scgpt.tokenizer` and `scgpt.utils` modules that this path never calls.

The architecture maps one to one: models/train/common.py builds the compact model from scGPT's
GeneEncoder, ContinuousValueEncoder (clamp 512), post-norm nn.TransformerEncoder and ClsDecoder
with the same parameter names; every parameter `_encode` uses is loaded (checked below).

With `--checkpoint DIR` the model is a scGPT checkpoint directory instead (e.g. the whole-human-shaped
one bench-data/whole_human.sh generates), built and loaded as embed_data does.

Runs in the training venv (models/train/requirements.txt: torch 2.15.0) plus
`pip install --no-deps scgpt==0.2.4` and tqdm (bench-data/requirements-torch-peer.txt).
Prints `PEER e2e/scgpt-torch/<name> cells=N seconds=S cells_per_s=X`.
"""
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # scGPT's progress bar, on stderr

import argparse, base64, contextlib, hashlib, importlib.util, json, logging, sys, time, tomllib, types, warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tools/export-scgpt"))
from e2e_ort_peer import read_csb  # noqa: E402
import export_scgpt  # noqa: E402
from export_scgpt import ENCODE_PREFIXES, load_scgpt_model_module  # noqa: E402

PEER_FILES = ["preprocess.py", "data_collator.py", "tasks/cell_emb.py"]


def load_cell_emb():
    """scgpt/tasks/cell_emb.py with the real DataCollator and binning, and TransformerModel."""
    model_mod, _ = load_scgpt_model_module()
    pkg_dir = Path(list(importlib.util.find_spec("scgpt").submodule_search_locations)[0])
    record = next(pkg_dir.parent.glob("scgpt-*.dist-info")) / "RECORD"
    want = {l.split(",")[0]: l.split(",")[1] for l in record.read_text().splitlines() if l.count(",") >= 2}
    for rel in PEER_FILES:
        got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256((pkg_dir / rel).read_bytes()).digest()).rstrip(b"=").decode()
        assert got == want[f"scgpt/{rel}"], f"{pkg_dir / rel} differs from the scgpt wheel"

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def absent(*_a, **_k):
        raise RuntimeError("stubbed: not used on the embed_data path")

    class AnnData:  # annotations and isinstance only
        pass

    stub("scanpy", get=stub("scanpy.get", _get_obs_rep=absent, _set_obs_rep=absent))
    stub("anndata", AnnData=AnnData)
    stub("scgpt", logger=logging.getLogger("scGPT"), __path__=[])
    stub("scgpt.model", __path__=[], TransformerModel=model_mod.TransformerModel)
    stub("scgpt.tokenizer", GeneVocab=absent)
    stub("scgpt.utils", load_pretrained=absent)
    stub("scgpt.tasks", __path__=[])
    mods = {}
    for rel in PEER_FILES:
        name = "scgpt." + rel[:-3].replace("/", ".")
        s = importlib.util.spec_from_file_location(name, pkg_dir / rel)
        mods[name] = importlib.util.module_from_spec(s)
        sys.modules[name] = mods[name]
        s.loader.exec_module(mods[name])
    return model_mod, mods["scgpt.tasks.cell_emb"]


def build(model_mod, package):
    """TransformerModel as embed_data builds it, with the compact model's weights."""
    manifest = tomllib.loads((package / "manifest.toml").read_text())
    vocab = json.loads((package / "vocab.json").read_text())
    ckpt = torch.load(REPO / "models/train/checkpoint.pt", map_location="cpu", weights_only=False)
    hp, state = ckpt["args"], ckpt["state_dict"]
    n_cls = state["cls_decoder.out_layer.weight"].shape[0]
    model = model_mod.TransformerModel(
        ntoken=len(vocab), d_model=state["encoder.embedding.weight"].shape[1],
        nhead=hp["nhead"], d_hid=hp["d_hid"], nlayers=hp["nlayers"],
        nlayers_cls=2, n_cls=n_cls, vocab=vocab, dropout=0.0, pad_token=manifest["pad_token"],
        pad_value=manifest["pad_value"], do_mvc=False, do_dab=False, use_batch_labels=False,
        domain_spec_batchnorm=False, input_emb_style="continuous", n_input_bins=manifest["n_bins"],
        cell_emb_style="cls", explicit_zero_prob=False, use_fast_transformer=False, pre_norm=False)
    own = model.state_dict()
    used = [k for k in own if k.startswith(ENCODE_PREFIXES)]
    missing = [k for k in used if k not in state or state[k].shape != own[k].shape]
    assert not missing, f"_encode parameters not in the compact model: {missing}"
    model.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})
    model.eval()
    configs = {"pad_token": manifest["pad_token"], "pad_value": manifest["pad_value"],
               "embsize": own["encoder.embedding.weight"].shape[1]}
    return model, vocab, configs, manifest["max_len"]


def build_from_checkpoint(model_mod, ckpt_dir):
    """TransformerModel from a scGPT checkpoint directory (best_model.pt, args.json, vocab.json) as
    embed_data builds and loads it: vocabulary + appended specials, embed_data's constructor
    arguments, load_pretrained's non-strict load (flash-attn `Wqkv.` -> `in_proj_`); max_length =
    args.json max_seq_len (embed_data's default, 1200, for whole-human). Through
    tools/export-scgpt, which refuses what embed_data would silently mis-load (and builds a
    pre-norm checkpoint's layers as scGPT's pre-norm FlashTransformerEncoderLayer, where embed_data
    would build post-norm ones)."""
    args, vocab, _appended, state, _info = export_scgpt.read_checkpoint(ckpt_dir)
    plan = export_scgpt.plan_export(args, state, embedding_only=True)
    model = export_scgpt.build_model(model_mod, args, vocab, plan["norm_scheme"])
    export_scgpt.load_weights(model, state)
    model.eval()
    configs = {"pad_token": args["pad_token"], "pad_value": args["pad_value"], "embsize": args["embsize"]}
    return model, vocab, configs, int(args.get("max_seq_len", 1200))


class Batch:
    """What get_batch_cell_embeddings reads of an AnnData: X (cells x in-vocabulary genes)."""

    def __init__(self, path, vocab):
        genes, barcodes, indptr, indices, data = read_csb(path)
        ids = np.array([vocab.get(g, -1) for g in genes], dtype=np.int64)
        keep = np.flatnonzero(ids >= 0)  # embed_data: adata[:, id_in_vocab >= 0]
        m = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(barcodes), len(genes)))
        self.X, self.gene_ids, self.n = m[:, keep], ids[keep], len(barcodes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("batches", nargs="+", type=Path, help=".csb files")
    ap.add_argument("--name", default="run")
    ap.add_argument("--model", type=Path, default=REPO / "models/pbmc-compact",
                    help="cellstream package whose manifest and vocabulary to use, with the compact "
                         "model's weights from models/train/checkpoint.pt (not read with --checkpoint)")
    ap.add_argument("--checkpoint", type=Path,
                    help="a scGPT checkpoint directory (best_model.pt, args.json, vocab.json), e.g. "
                         "bench-data/generated/scgpt-whole-human-ckpt: model, vocabulary and max_length "
                         "from it, as embed_data loads them")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--check", type=Path, help="cellstream embed NDJSON of the same batches: "
                    "report the cosine of each cell's embedding with cellstream's")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_mod, cell_emb = load_cell_emb()
    if args.checkpoint:
        with contextlib.redirect_stdout(sys.stderr):  # the weight-loading report
            model, vocab, configs, max_len = build_from_checkpoint(model_mod, args.checkpoint)
    else:
        model, vocab, configs, max_len = build(model_mod, args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); scgpt get_batch_cell_embeddings, "
          f"max_length {max_len}, batch_size 64; {len(args.batches)} batch file(s)", flush=True)

    out, cells, t0 = [], 0, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.autocast on a CPU-only run
        for path in args.batches:
            b = Batch(path, vocab)
            emb = cell_emb.get_batch_cell_embeddings(
                b, cell_embedding_mode="cls", model=model, vocab=vocab, max_length=max_len,
                batch_size=64, model_configs=configs, gene_ids=b.gene_ids, use_batch_labels=False)
            assert emb.shape == (b.n, configs["embsize"])
            out.append(emb)
            cells += b.n
    secs = time.perf_counter() - t0
    if args.check:
        ours = np.array([json.loads(l)["embedding"] for l in args.check.read_text().splitlines()])
        cos = np.sum(np.concatenate(out) * ours, axis=1)
        print(f"cosine with cellstream's embeddings: median {np.median(cos):.4f}, min {cos.min():.4f} "
              "(tie draws and sampling differ, so not 1)")
    print(f"PEER e2e/scgpt-torch/{args.name} cells={cells} seconds={secs:.3f} cells_per_s={cells / secs:.1f}")


if __name__ == "__main__":
    main()
