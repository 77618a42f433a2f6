#!/usr/bin/env python3
"""Convert a scGPT checkpoint directory into a cellstream model package (DESIGN.md §4).

    export_scgpt.py CHECKPOINT_DIR OUT_DIR [--name NAME]
    export_scgpt.py --self-test OUT_DIR

CHECKPOINT_DIR holds what scGPT's `embed_data` reads: `best_model.pt`, `args.json`, `vocab.json`
(e.g. the whole-human checkpoint, which the user downloads; this tool never downloads anything).
OUT_DIR receives `model.onnx`, `vocab.json`, `manifest.toml`, `README.md`.

The model is built exactly as `scgpt/tasks/cell_emb.py::embed_data` (scgpt 0.2.4) builds it, from
scGPT's own `scgpt/model/model.py`, and loaded like its `load_pretrained` (non-strict, `Wqkv.` ->
`in_proj_`), except that missing encoder weights are an error here instead of silently random.
The exported graph is `_encode(gene_ids, values, gene_ids == pad_id)[:, 0, :]`, unnormalised.

IMPORTING scGPT: `import scgpt` runs the package's `__init__`, which imports scanpy, anndata,
pandas, matplotlib, IPython, scib, ... (none needed here). Instead the installed files
`scgpt/model/{model,dsbn,grad_reverse}.py` (install with `pip install --no-deps scgpt==0.2.4`)
are loaded directly with importlib under a stub `scgpt` package that provides only `logger`;
their sha256 is checked against the wheel's RECORD. They need only torch, numpy and tqdm.
"""
import os

# One thread: must be set before torch / numpy / onnxruntime are imported.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import base64
import hashlib
import importlib.util
import json
import logging
import shlex
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

OPSET = 18
TOL = 1e-4  # max abs diff torch vs onnxruntime; above it the export fails
SPECIALS = ["<pad>", "<cls>", "<eoc>"]  # appended in this order if missing, as embed_data does
SCGPT_VERSION = "0.2.4"
SCGPT_FILES = ["model/dsbn.py", "model/grad_reverse.py", "model/model.py"]
# Parameters _encode uses: if any of these is not in the checkpoint, the output is garbage.
ENCODE_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def log(msg):
    print(msg, flush=True)


class ExportError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ scGPT import
def load_scgpt_model_module():
    """scgpt/model/model.py (with dsbn.py, grad_reverse.py) from the installed scgpt, without
    running scgpt/__init__.py. Returns (module, info dict)."""
    spec = importlib.util.find_spec("scgpt")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("scgpt is not installed: pip install --no-deps scgpt==0.2.4")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    dist = sorted(pkg_dir.parent.glob("scgpt-*.dist-info"))
    if not dist:
        raise ExportError(f"no scgpt-*.dist-info next to {pkg_dir}")
    version = dist[-1].name[len("scgpt-"):-len(".dist-info")]
    if version != SCGPT_VERSION:
        warnings.warn(f"scgpt {version} installed; this tool was written against {SCGPT_VERSION}")
    record = {l.split(",")[0]: l.split(",")[1] for l in (dist[-1] / "RECORD").read_text().splitlines()
              if l.count(",") >= 2}
    for rel in SCGPT_FILES:
        path = pkg_dir / rel
        got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        want = record.get(f"scgpt/{rel}")
        if got != want:
            raise ExportError(f"{path} differs from the scgpt wheel's RECORD ({got} != {want})")

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    saved = {k: sys.modules.get(k) for k in ("scgpt", "scgpt.model")}
    stub("scgpt", logger=logging.getLogger("scGPT"), __path__=[], __version__=version)
    stub("scgpt.model", __path__=[])
    mods = {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flash_attn is not installed")
            for rel in SCGPT_FILES:
                name = "scgpt." + rel[:-3].replace("/", ".")
                s = importlib.util.spec_from_file_location(name, pkg_dir / rel)
                mod = importlib.util.module_from_spec(s)
                sys.modules[name] = mod
                s.loader.exec_module(mod)
                mods[name] = mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    model_mod = mods["scgpt.model.model"]
    return model_mod, {"scgpt_version": version, "scgpt_model_py": str(pkg_dir / "model/model.py")}


# ------------------------------------------------------------------------------ checkpoint
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_vocab(path):
    """vocab.json (token -> id) with <pad>, <cls>, <eoc> appended if missing (GeneVocab.from_file
    + append_token, as embed_data does). Ids must be 0..n-1 (GeneVocab requires it)."""
    token2idx = json.loads(Path(path).read_text())
    if not isinstance(token2idx, dict):
        raise ExportError(f"{path}: expected a JSON object token -> id")
    ids = sorted(token2idx.values())
    if ids != list(range(len(ids))):
        raise ExportError(f"{path}: ids are not 0..{len(ids) - 1} (scGPT's GeneVocab requires consecutive ids)")
    vocab = dict(sorted(token2idx.items(), key=lambda kv: kv[1]))
    appended = []
    for s in SPECIALS:
        if s not in vocab:
            vocab[s] = len(vocab)
            appended.append(s)
    return vocab, appended


def read_checkpoint(ckpt_dir):
    ckpt_dir = Path(ckpt_dir)
    files = {k: ckpt_dir / k for k in ("best_model.pt", "args.json", "vocab.json")}
    for k, p in files.items():
        if not p.is_file():
            raise ExportError(f"{p}: missing (a scGPT checkpoint directory has best_model.pt, args.json, vocab.json)")
    args = json.loads(files["args.json"].read_text())
    vocab, appended = read_vocab(files["vocab.json"])
    try:
        state = torch.load(files["best_model.pt"], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - explain, do not unpickle arbitrary code
        raise ExportError(f"{files['best_model.pt']}: cannot load as a weights-only state dict: {e}") from e
    if isinstance(state, dict) and "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{files['best_model.pt']}: not a state dict of tensors")
    info = {k: {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size} for k, p in files.items()}
    return args, vocab, appended, state, info


def arg(args, *keys, default=None, required=True):
    for k in keys:
        if k in args:
            return args[k]
    if required and default is None:
        raise ExportError(f"args.json has none of {keys}")
    return default


def build_model(model_mod, args, vocab):
    """TransformerModel exactly as scgpt 0.2.4 embed_data builds it (use_fast_transformer=False)."""
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ExportError(f"args.json input_emb_style={style!r}: embed_data builds a continuous value "
                          "encoder; this checkpoint is not usable through embed_data")
    if args.get("pre_norm", False):
        warnings.warn("args.json pre_norm=true, but embed_data builds a post-norm model (pre_norm=False); "
                      "following embed_data")
    return model_mod.TransformerModel(
        ntoken=len(vocab),
        d_model=arg(args, "embsize"),
        nhead=arg(args, "nheads", "nhead"),  # embed_data reads "nheads" (the whole-human args.json key)
        d_hid=arg(args, "d_hid"),
        nlayers=arg(args, "nlayers"),
        nlayers_cls=arg(args, "n_layers_cls"),
        n_cls=1,
        vocab=vocab,
        dropout=arg(args, "dropout"),
        pad_token=arg(args, "pad_token"),
        pad_value=arg(args, "pad_value"),
        do_mvc=True,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        use_fast_transformer=False,
        fast_transformer_backend="flash",
        pre_norm=False,
    )


def load_weights(model, state, allow_missing=False):
    """scGPT's load_pretrained (strict=False): rename flash-attn `Wqkv.` to `in_proj_`, keep keys whose
    name and shape match. Here what was not loaded is reported, and a missing encoder weight fails."""
    state = {k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()}
    model_dict = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in model_dict and v.shape == model_dict[k].shape}
    unexpected = sorted(k for k in state if k not in model_dict)
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_dict[k].shape)}"
                        for k in state if k in model_dict and state[k].shape != model_dict[k].shape)
    missing = sorted(k for k in model_dict if k not in loaded)
    missing_encode = [k for k in missing if k.startswith(ENCODE_PREFIXES)]
    model_dict.update(loaded)
    model.load_state_dict(model_dict)
    report = {"loaded": len(loaded), "missing": missing, "missing_used_by_encode": missing_encode,
              "unexpected": unexpected, "shape_mismatch": mismatched}
    log(f"weights: {len(loaded)} tensors loaded; {len(missing)} model keys not in the checkpoint "
        f"({len(missing_encode)} of them used by _encode); {len(unexpected)} checkpoint keys unused; "
        f"{len(mismatched)} shape mismatches")
    for k in missing:
        log(f"  missing   {k}{'   <-- used by _encode' if k in missing_encode else ''}")
    for k in unexpected:
        log(f"  unused    {k}")
    for k in mismatched:
        log(f"  mismatch  {k}")
    if (missing_encode or mismatched) and not allow_missing:
        raise ExportError("the checkpoint does not provide every weight _encode uses (see above); "
                          "refusing to export a partly random model (--allow-missing overrides)")
    return report


class CellEmbedding(nn.Module):
    """gene_ids i64 [N,S], values f32 [N,S] -> cell_embedding f32 [N,d]: the <cls> position of the
    last encoder layer, as embed_data's get_batch_cell_embeddings (before its L2 normalisation)."""

    def __init__(self, model, pad_id):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, gene_ids, values):
        mask = gene_ids.eq(self.pad_id)
        return self.model._encode(gene_ids, values, src_key_padding_mask=mask)[:, 0, :]


# ------------------------------------------------------------------------------ export + check
def export_onnx(wrapper, path, pad_id, cls_id, gene_pool, pad_value):
    ids = torch.full((2, 9), pad_id, dtype=torch.int64)
    ids[:, 0] = cls_id
    ids[0, 1:6] = torch.as_tensor(gene_pool[:5])
    ids[1, 1:9] = torch.as_tensor(gene_pool[5:13])
    vals = torch.where(ids == pad_id, float(pad_value), torch.randint(1, 51, (2, 9)).float())
    vals[:, 0] = float(pad_value)
    N, S = torch.export.Dim("N"), torch.export.Dim("S")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            wrapper, (ids, vals), dynamo=True, opset_version=OPSET,
            input_names=["gene_ids", "values"], output_names=["cell_embedding"],
            dynamic_shapes={"gene_ids": {0: N, 1: S}, "values": {0: N, 1: S}},
            optimize=True, verify=False)
    prog.save(str(path), external_data=False)
    import onnx

    m = onnx.load(str(path))
    names = {}
    for vi in m.graph.input:
        d = vi.type.tensor_type.shape.dim
        if len(d) != 2 or not d[0].dim_param or not d[1].dim_param:
            raise ExportError(f"input {vi.name} has a fixed shape {d}: N and S must be symbolic")
        names.setdefault(d[0].dim_param, "N")
        names.setdefault(d[1].dim_param, "S")
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.dim_param = names[d.dim_param]
    if [i.name for i in m.graph.input] != ["gene_ids", "values"] or [o.name for o in m.graph.output] != ["cell_embedding"]:
        raise ExportError(f"unexpected graph signature {[i.name for i in m.graph.input]} -> {[o.name for o in m.graph.output]}")
    # The exporter annotates every node with its Python stack trace (local paths): drop it, so the
    # file (and its sha256) does not depend on where the tool ran.
    for n in list(m.graph.node) + list(m.graph.value_info) + list(m.graph.initializer):
        del n.metadata_props[:]
    m.producer_name = "cellstream tools/export-scgpt"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def pad_batch(seqs, pad_id, pad_value, length=None):
    S = length or max(len(g) for g, _ in seqs)
    ids = np.full((len(seqs), S), pad_id, dtype=np.int64)
    vals = np.full((len(seqs), S), pad_value, dtype=np.float32)
    for i, (g, v) in enumerate(seqs):
        ids[i, :len(g)] = g
        vals[i, :len(v)] = v
    return ids, vals


def random_sequence(rng, length, gene_pool, cls_id, pad_value, n_bins):
    genes = rng.choice(gene_pool, size=length - 1, replace=False)
    vals = rng.integers(1, n_bins, size=length - 1).astype(np.float32)  # bins 1..n_bins-1
    return (np.concatenate([[cls_id], genes]).astype(np.int64),
            np.concatenate([[pad_value], vals]).astype(np.float32))


@torch.no_grad()
def torch_embed(wrapper, ids, vals):
    return wrapper(torch.from_numpy(ids), torch.from_numpy(vals)).numpy()


def verify(wrapper, sess, pad_id, cls_id, pad_value, n_bins, gene_pool, seed=1):
    """torch vs onnxruntime at two N and two S, padded rows included; and each padded row vs the
    same sequence run alone unpadded in torch (the in-graph mask). Fails above TOL."""
    rng = np.random.default_rng(seed)
    worst = {"torch_vs_ort": 0.0, "padded_vs_unpadded_torch": 0.0, "ort_vs_unpadded_torch": 0.0}
    for n, s in ((2, 23), (5, 70), (3, 70), (6, 23)):
        lengths = [s] + list(rng.integers(2, s, size=n - 1))  # one full row, the others padded
        seqs = [random_sequence(rng, int(L), gene_pool, cls_id, pad_value, n_bins) for L in lengths]
        ids, vals = pad_batch(seqs, pad_id, pad_value, length=s)
        (o,) = sess.run(["cell_embedding"], {"gene_ids": ids, "values": vals})
        t = torch_embed(wrapper, ids, vals)
        alone = np.concatenate([torch_embed(wrapper, g[None], v[None]) for g, v in seqs])
        if o.shape != t.shape:
            raise ExportError(f"onnxruntime shape {o.shape} != torch {t.shape}")
        d = {"torch_vs_ort": float(np.abs(o - t).max()),
             "padded_vs_unpadded_torch": float(np.abs(t - alone).max()),
             "ort_vs_unpadded_torch": float(np.abs(o - alone).max())}
        log(f"  N={n} S={s} lengths={sorted(int(x) for x in lengths)}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
        for k, v in d.items():
            worst[k] = max(worst[k], v)
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    if bad:
        raise ExportError(f"verification failed, max abs diff above {TOL}: {bad}")
    return worst


# ------------------------------------------------------------------------------ package
def toml_str(s):
    return json.dumps(str(s), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_manifest(path, name, d, n_bins, max_len, pad_token, cls_token, pad_value, onnx_sha):
    path.write_text(
        f"name = {toml_str(name)}\n"
        f'architecture = "scgpt"\n'
        f'version = "1"\n'
        f"embedding_dim = {int(d)}\n"
        f"n_bins = {int(n_bins)}\n"
        f"max_len = {int(max_len)}\n"
        f"pad_token = {toml_str(pad_token)}\n"
        f"cls_token = {toml_str(cls_token)}\n"
        f"pad_value = {float(pad_value)!r}\n"
        f"normalize_embedding = true\n"
        f'onnx_sha256 = "{onnx_sha}"\n'
        f"[inputs]\n"
        f'gene_ids = "gene_ids"\n'
        f'values = "values"\n'
        f"[outputs]\n"
        f'embedding = "cell_embedding"\n')


def versions():
    import onnx
    import onnxruntime
    import onnxscript

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def convert(ckpt_dir, out_dir, name=None, allow_missing=False, command=None, self_test_note=None,
            ckpt_display=None):
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model_mod, scgpt_info = load_scgpt_model_module()
    args, vocab, appended, state, ckpt_info = read_checkpoint(ckpt_dir)
    name = name or ckpt_dir.resolve().name
    pad_token, cls_token = arg(args, "pad_token"), "<cls>"
    pad_value = float(arg(args, "pad_value"))
    n_bins = int(args.get("n_bins", 51))
    max_len = int(args.get("max_seq_len", 1200))
    for t in (pad_token, cls_token):
        if t not in vocab:
            raise ExportError(f"{t} not in the vocabulary")
    pad_id, cls_id = vocab[pad_token], vocab[cls_token]
    log(f"checkpoint {ckpt_dir}: vocab {len(vocab)} tokens (appended {appended or 'none'}), "
        f"pad_id {pad_id}, cls_id {cls_id}, pad_value {pad_value}, n_bins {n_bins}, max_len {max_len}")

    torch.manual_seed(0)
    model = build_model(model_mod, args, vocab)
    report = load_weights(model, state, allow_missing=allow_missing)
    model.eval()
    wrapper = CellEmbedding(model, pad_id).eval()
    d = int(arg(args, "embsize"))
    log(f"model: d_model {d}, heads {arg(args, 'nheads', 'nhead')}, d_hid {args['d_hid']}, "
        f"layers {args['nlayers']}, dropout {args['dropout']} (inactive in eval)")

    specials = set(SPECIALS) | {pad_token, cls_token}
    gene_pool = np.array([i for t, i in vocab.items() if t not in specials], dtype=np.int64)

    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    log(f"exporting {onnx_path} (opset {OPSET}, dynamo, symbolic N and S) ...")
    export_onnx(wrapper, onnx_path, pad_id, cls_id, gene_pool, pad_value)
    log(f"  {onnx_path.stat().st_size} bytes")
    sess = ort_session(onnx_path)
    for vi in sess.get_inputs() + sess.get_outputs():
        log(f"  onnx {vi.name}: {vi.type} {vi.shape}")
    log("verifying onnxruntime against torch:")
    worst = verify(wrapper, sess, pad_id, cls_id, pad_value, n_bins, gene_pool)
    log("  max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) + f" (limit {TOL})")

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    onnx_sha = sha256_file(onnx_path)
    write_manifest(out_dir / "manifest.toml", name, d, n_bins, max_len, pad_token, cls_token, pad_value, onnx_sha)
    write_readme(out_dir / "README.md", name, ckpt_display or ckpt_dir, ckpt_info, args, appended, report, worst,
                 scgpt_info, onnx_sha, command, self_test_note)
    log(f"package written to {out_dir}")
    return {"wrapper": wrapper, "sess": sess, "vocab": vocab, "pad_id": pad_id, "cls_id": cls_id,
            "pad_value": pad_value, "n_bins": n_bins, "worst": worst, "report": report}


def write_readme(path, name, ckpt_dir, ckpt_info, args, appended, report, worst, scgpt_info, onnx_sha,
                 command, self_test_note):
    v = versions()
    arch = {k: args.get(k) for k in ("embsize", "nheads", "nhead", "d_hid", "nlayers", "n_layers_cls",
                                      "dropout", "pad_token", "pad_value", "n_bins", "max_seq_len",
                                      "input_emb_style") if k in args}
    lines = [f"# {name}", ""]
    if self_test_note:
        lines += [self_test_note, ""]
    lines += [
        f"A cellstream model package converted by `tools/export-scgpt/export_scgpt.py` from the scGPT",
        f"checkpoint directory `{ckpt_dir}`:", "",
        "| file | sha256 | bytes |", "| --- | --- | --- |",
    ]
    for k, i in ckpt_info.items():
        lines.append(f"| `{k}` | `{i['sha256']}` | {i['bytes']} |")
    lines += [
        "", f"Command: `{command}`" if command else "", "",
        "## What it is", "",
        f"scGPT {scgpt_info['scgpt_version']} `TransformerModel` built as `scgpt.tasks.embed_data` builds it",
        "(`use_fast_transformer=False`, post-norm, `do_mvc=True`, no batch labels / DSBN / DAB), weights",
        "loaded like scGPT's `load_pretrained` (flash-attn `Wqkv.` renamed to `in_proj_`).",
        f"args.json (architecture keys): `{json.dumps(arch)}`.", "",
        f"`model.onnx` (opset {OPSET}, sha256 `{onnx_sha}`): `gene_ids` i64 [N,S], `values` f32 [N,S] ->",
        "`cell_embedding` f32 [N,d] = `_encode(gene_ids, values, gene_ids == pad_id)[:, 0, :]`, not",
        "normalised (the manifest's `normalize_embedding = true` makes cellstream L2-normalise it, as",
        "embed_data does). The MLM/MVC/classifier decoders are not in the graph. No classifier head,",
        "so no `labels.txt` and no `logits` output.", "",
        f"`vocab.json`: the checkpoint's vocabulary"
        + (f" with {', '.join(f'`{t}`' for t in appended)} appended (ids = size at append time, as embed_data)."
           if appended else " (specials already present)."), "",
        "## Weights", "",
        f"{report['loaded']} tensors loaded. Model keys not in the checkpoint: {len(report['missing'])}"
        f" ({len(report['missing_used_by_encode'])} used by `_encode`). Checkpoint keys not used: "
        f"{len(report['unexpected'])}. Shape mismatches: {len(report['shape_mismatch'])}.", "",
    ]
    for title, keys in (("missing", report["missing"]), ("unused", report["unexpected"]),
                        ("shape mismatch", report["shape_mismatch"])):
        if keys:
            lines.append(f"- {title}: " + ", ".join(f"`{k}`" for k in keys))
    lines += [
        "", "## Verification", "",
        "onnxruntime (CPU, 1 thread) against torch at N in {2,3,5,6} and S in {23,70}, padded rows",
        "included, and each padded row against the same sequence run alone unpadded in torch. Max abs diff:", "",
    ]
    lines += [f"- {k}: {x:.3e}" for k, x in worst.items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------ self-test
SELF_TEST = {"n_genes": 1000, "embsize": 64, "nheads": 4, "d_hid": 128, "nlayers": 2, "seed": 0,
             "lengths": [2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 26, 31, 36, 41, 47, 52, 57, 61, 64]}


def self_test(out_dir, command):
    out_dir = Path(out_dir)
    cfg = SELF_TEST
    model_mod, _ = load_scgpt_model_module()
    full = json.loads((REPO / "tests/fixtures/scgpt_default_gene_vocab.json").read_text())
    # the first 1,000 genes by id: ids 0..999, the same ids as in the full scGPT vocabulary
    genes = sorted(full.items(), key=lambda kv: kv[1])[: cfg["n_genes"]]
    assert [i for _, i in genes] == list(range(cfg["n_genes"]))
    ckpt_vocab = dict(genes)  # no specials: the converter appends them, as embed_data does
    args = {  # the keys of the whole-human args.json that embed_data reads, plus a few for context
        "embsize": cfg["embsize"], "nheads": cfg["nheads"], "d_hid": cfg["d_hid"], "nlayers": cfg["nlayers"],
        "n_layers_cls": 3, "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2, "mask_value": -1,
        "n_bins": 51, "max_seq_len": 1200, "input_emb_style": "continuous", "fast_transformer": True,
    }
    vocab_full = dict(ckpt_vocab)
    for s in SPECIALS:
        vocab_full[s] = len(vocab_full)
    torch.manual_seed(cfg["seed"])
    model = build_model(model_mod, args, vocab_full)
    with torch.no_grad():  # LayerNorms away from identity, so that their parameters matter in the test
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
                mod.bias.add_(0.2 * torch.randn_like(mod.bias))
    # saved as a flash-attn-trained checkpoint (the whole-human one) names them: in_proj_ -> Wqkv.
    state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v.clone() for k, v in model.state_dict().items()}

    with tempfile.TemporaryDirectory(prefix="scgpt-random-ckpt-") as tmp:
        ckpt = Path(tmp) / "scgpt-random"
        ckpt.mkdir()
        torch.save(state, ckpt / "best_model.pt")
        (ckpt / "args.json").write_text(json.dumps(args, indent=2) + "\n")
        (ckpt / "vocab.json").write_text(json.dumps(ckpt_vocab) + "\n")
        note = (f"**Test fixture, random weights.** Written by `{command}`: a randomly initialised "
                f"(torch seed {cfg['seed']}, LayerNorm weights/biases perturbed by 0.2·N(0,1)) scGPT "
                f"`TransformerModel` with the first {cfg['n_genes']} genes (ids 0..{cfg['n_genes'] - 1}) of "
                f"scGPT's default gene vocabulary, embsize {cfg['embsize']}, {cfg['nheads']} heads, d_hid "
                f"{cfg['d_hid']}, {cfg['nlayers']} layers, saved as a checkpoint directory in a temporary "
                f"directory (attention weights named `Wqkv.` as in flash-attn-trained checkpoints) and "
                f"converted. `reference.jsonl`: one line per crafted sequence (lengths "
                f"{cfg['lengths'][0]}..{cfg['lengths'][-1]}, `<cls>` first with value -2, then distinct "
                f"random genes with integer bins 1..50): `gene_ids`, `values` (unpadded), "
                f"`embedding_torch` (torch, the sequence alone, unpadded), `embedding_ort` (onnxruntime, "
                f"all {len(cfg['lengths'])} sequences padded together to S={max(cfg['lengths'])}); raw, "
                f"not normalised.")
        res = convert(ckpt, out_dir, name="scgpt-random", command=command, self_test_note=note,
                      ckpt_display="scgpt-random (a temporary directory, removed afterwards)")

    # the converted model must be the model that was saved
    w, pad_id, cls_id, pv = res["wrapper"], res["pad_id"], res["cls_id"], res["pad_value"]
    loaded = w.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded[k]), f"{k} differs after the round trip"

    rng = np.random.default_rng(cfg["seed"] + 7)
    gene_pool = np.arange(cfg["n_genes"], dtype=np.int64)
    seqs = [random_sequence(rng, L, gene_pool, cls_id, pv, res["n_bins"]) for L in cfg["lengths"]]
    ids, vals = pad_batch(seqs, pad_id, pv)
    (ort_out,) = res["sess"].run(["cell_embedding"], {"gene_ids": ids, "values": vals})
    torch_alone = np.concatenate([torch_embed(w, g[None], v[None]) for g, v in seqs])
    torch_padded = torch_embed(w, ids, vals)
    diffs = {"torch_alone_vs_ort_padded": float(np.abs(torch_alone - ort_out).max()),
             "torch_padded_vs_ort_padded": float(np.abs(torch_padded - ort_out).max()),
             "torch_alone_vs_torch_padded": float(np.abs(torch_alone - torch_padded).max())}
    log("reference sequences: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if not all(v <= TOL for v in diffs.values()):
        raise ExportError(f"reference check failed: {diffs}")
    with open(out_dir / "reference.jsonl", "w") as f:
        for (g, v), et, eo in zip(seqs, torch_alone, ort_out):
            f.write(json.dumps({"gene_ids": [int(x) for x in g], "values": [float(x) for x in v],
                                "embedding_torch": [float(x) for x in et],
                                "embedding_ort": [float(x) for x in eo]}) + "\n")
    with open(out_dir / "README.md", "a") as f:
        f.write("\n## reference.jsonl\n\n" + "\n".join(f"- {k}: {v:.3e}" for k, v in diffs.items()) + "\n")
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    log(f"self-test package: {out_dir} ({total} bytes)")
    return diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", help="scGPT checkpoint directory (best_model.pt, args.json, vocab.json)")
    ap.add_argument("out", nargs="?", help="package directory to create (must not exist or be empty)")
    ap.add_argument("--name", help="manifest name (default: the checkpoint directory's name)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="export even if the checkpoint lacks weights _encode uses (they stay random)")
    ap.add_argument("--self-test", metavar="OUTDIR",
                    help="convert a small randomly initialised model and write OUTDIR/reference.jsonl")
    a = ap.parse_args()
    command = "python tools/export-scgpt/export_scgpt.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    try:
        if a.self_test:
            if a.checkpoint or a.out:
                ap.error("--self-test takes only OUTDIR")
            self_test(a.self_test, command)
        else:
            if not (a.checkpoint and a.out):
                ap.error("CHECKPOINT_DIR and OUT_DIR are required")
            convert(a.checkpoint, a.out, name=a.name, allow_missing=a.allow_missing, command=command)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
