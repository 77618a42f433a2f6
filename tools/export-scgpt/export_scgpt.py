#!/usr/bin/env python3
"""Convert a scGPT checkpoint directory into a cellstream model package (DESIGN.md §4).

    export_scgpt.py CHECKPOINT_DIR OUT_DIR [--name NAME] [--form fast|torch] [--labels FILE]
    export_scgpt.py --self-test OUT_DIR [--preset NAME] [--form fast|torch]

CHECKPOINT_DIR holds what scGPT's `embed_data` reads: `best_model.pt` (or Tutorial_Annotation's
`model.pt`), `args.json`, `vocab.json` (e.g. the whole-human checkpoint, which the user downloads;
this tool never downloads anything). OUT_DIR receives `model.onnx`, `vocab.json`, `manifest.toml`,
`README.md`, and `labels.txt` for a fine-tuned classifier.

The model is scGPT's own `TransformerModel` from `scgpt/model/model.py`, built from args.json as
`scgpt/tasks/cell_emb.py::embed_data` (scgpt 0.2.4) builds it, except where the checkpoint says
otherwise: a pre-norm checkpoint gets scGPT's `FlashTransformerEncoderLayer(norm_scheme="pre")`
(embed_data would build post-norm layers and compute wrong numbers), and a fine-tuned annotation
checkpoint keeps its trained `cls_decoder` (n_cls classes). Weights are loaded like scGPT's
`load_pretrained` (non-strict, `Wqkv.` <-> `in_proj_`), except that a missing weight the graph uses
is an error here instead of silently random. args.json values that change what `_encode` computes
and that this tool does not export are refused, naming the key and value.

Two graph forms of the same function (gene_ids, values) -> cell_embedding [, logits]:
  --form fast  (default) opset 23, the form of models/train/common.py::export_module that
               cellstream's tract rewrites recognise (einsum attention with an additive [N,S] key
               mask, LayerNorm as centring + RMSNormalization, one qkv projection, and the last
               layer for the <cls> row only);
  --form torch opset 18, torch.onnx's export of the module itself (nn.TransformerEncoder).
Both are verified in onnxruntime against the original scGPT module in torch.

IMPORTING scGPT: `import scgpt` runs the package's `__init__`, which imports scanpy, anndata,
pandas, matplotlib, IPython, scib, ... (none needed here). Instead the installed files
`scgpt/model/{model,dsbn,grad_reverse}.py` (install with `pip install --no-deps scgpt==0.2.4`)
are loaded directly with importlib under a stub `scgpt` package that provides only `logger`;
their sha256 is checked against the wheel's RECORD. They need only torch, numpy and tqdm.
flash-attn is not needed either: for pre-norm layers scGPT's FlashTransformerEncoderLayer is built
around `TorchFlashMHA`, flash_attn 1.x's FlashMHA written out in plain fp32 torch.
"""
import os

# One thread: must be set before torch / numpy / onnxruntime are imported.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import math
import re
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
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

OPSET = 18  # --form torch (the original export)
OPSET_FAST = 23  # --form fast: RMSNormalization needs opset 23
FORMS = ("fast", "torch")
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


class TorchFlashMHA(nn.Module):
    """flash_attn 1.x `flash_attn.flash_attention.FlashMHA` (what scGPT's FlashTransformerEncoderLayer
    builds) in plain fp32 torch, so that scGPT's own layer code runs without flash-attn:
    `Wqkv = Linear(d, 3d)`, rearranged 'b s (three h d) -> b s three h d'; softmax(q·kᵀ/√head_dim)
    over the keys whose `key_padding_mask` is True (flash_attn's convention: True = keep; scGPT passes
    `~src_key_padding_mask`); padded query rows give 0 before `out_proj` (flash_attn unpads and
    `pad_input`s zeros); `out_proj = Linear(d, d)`. Returns (output, None) as FlashMHA does.
    No data-dependent branches, so torch.export traces it (the torch form of pre-norm layers)."""

    def __init__(self, embed_dim, num_heads, bias=True, batch_first=True, attention_dropout=0.0,
                 causal=False, device=None, dtype=None, **kwargs):
        super().__init__()
        if not batch_first or causal:
            raise ExportError("scGPT builds FlashMHA with batch_first=True, causal=False")
        if embed_dim % num_heads:
            raise ExportError(f"embsize {embed_dim} is not divisible by nheads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = batch_first
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x, key_padding_mask=None, need_weights=False):
        b, s, d = x.shape
        q, k, v = self.Wqkv(x).reshape(b, s, 3, self.num_heads, self.head_dim).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (self.head_dim ** -0.5)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        ctx = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
        if key_padding_mask is not None:
            ctx = ctx * key_padding_mask[:, :, None, None].to(ctx.dtype)
        return self.out_proj(ctx.reshape(b, s, d)), None


class flash_stub:
    """Context: scGPT's model module sees `TorchFlashMHA` as flash_attn's FlashMHA while a model is
    built (TransformerModel(use_fast_transformer=True) falls back to torch layers without it)."""

    def __init__(self, model_mod):
        self.mod = model_mod

    def __enter__(self):
        self.saved = (getattr(self.mod, "FlashMHA", None), self.mod.flash_attn_available)
        self.mod.FlashMHA, self.mod.flash_attn_available = TorchFlashMHA, True

    def __exit__(self, *exc):
        self.mod.FlashMHA, self.mod.flash_attn_available = self.saved
        if self.saved[0] is None:
            del self.mod.FlashMHA


# ------------------------------------------------------------------------------ checkpoint
WEIGHT_FILES = ("best_model.pt", "model.pt")  # embed_data's name; Tutorial_Annotation saves model.pt


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
    weights = next((w for w in WEIGHT_FILES if (ckpt_dir / w).is_file()), WEIGHT_FILES[0])
    files = {k: ckpt_dir / k for k in (weights, "args.json", "vocab.json")}
    for k, p in files.items():
        if not p.is_file():
            raise ExportError(f"{p}: missing (a scGPT checkpoint directory has best_model.pt (or model.pt), "
                              "args.json, vocab.json)")
    args = json.loads(files["args.json"].read_text())
    if not isinstance(args, dict):
        raise ExportError(f"{files['args.json']}: expected a JSON object")
    vocab, appended = read_vocab(files["vocab.json"])
    try:
        state = torch.load(files[weights], map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - explain, do not unpickle arbitrary code
        raise ExportError(f"{files[weights]}: cannot load as a weights-only state dict: {e}") from e
    if isinstance(state, dict) and "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{files[weights]}: not a state dict of tensors")
    if any(k.startswith("module.") for k in state):  # saved from DistributedDataParallel (pretrain.py strips it too)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    info = {k: {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size} for k, p in files.items()}
    return args, vocab, appended, state, info


def arg(args, *keys, default=None, required=True):
    for k in keys:
        if k in args:
            return args[k]
    if required and default is None:
        raise ExportError(f"args.json has none of {keys}")
    return default


def read_labels(path):
    """Class names in class-id order from a text file (one name per line) or a JSON list, or a JSON
    object id -> name (scGPT's `id2type`) or name -> id. Ids must be exactly 0..n-1."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, list):
        names, how = obj, "a JSON list"
    elif isinstance(obj, dict):
        def as_id(x):
            if isinstance(x, bool):
                return None
            if isinstance(x, int):
                return x
            if isinstance(x, str) and re.fullmatch(r"-?[0-9]+", x.strip()):
                return int(x)
            return None
        if obj and all(isinstance(v, int) and not isinstance(v, bool) for v in obj.values()):
            by_id, how = {v: k for k, v in obj.items()}, "a JSON object name -> id"
            if len(by_id) != len(obj):
                raise ExportError(f"{path}: two names have the same class id")
        elif obj and all(as_id(k) is not None for k in obj) and all(isinstance(v, str) for v in obj.values()):
            by_id, how = {as_id(k): v for k, v in obj.items()}, "a JSON object id -> name"
            if len(by_id) != len(obj):
                raise ExportError(f"{path}: a class id appears twice")
        else:
            raise ExportError(f"{path}: a JSON object must map class id -> name (as scGPT's id2type) "
                              "or name -> class id")
        if sorted(by_id) != list(range(len(by_id))):
            raise ExportError(f"{path}: class ids are {sorted(by_id)[:10]}{'...' if len(by_id) > 10 else ''}, "
                              f"not 0..{len(by_id) - 1}")
        names = [by_id[i] for i in range(len(by_id))]
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        names, how = lines, "one name per line"
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ExportError(f"{path}: class {i} is {n!r}, not a string")
        if not n.strip() or "\n" in n or "\r" in n:
            raise ExportError(f"{path}: class {i} has an empty or multi-line name {n!r} "
                              "(labels.txt is one name per line; cellstream skips blank lines)")
        if n != n.strip():
            warnings.warn(f"{path}: class {i} name {n!r} stripped of surrounding whitespace (cellstream trims it)")
        out.append(n.strip())
    if not out:
        raise ExportError(f"{path}: no class names")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ExportError(f"{path}: duplicate class names {dup}")
    return out, how


# ------------------------------------------------------------------------------ what to export
def _truthy(v):
    return v not in (None, False, 0, "", "false", "False", "none", "None")


def plan_export(args, state, labels_path=None, embedding_only=False, norm_scheme=None):
    """Reads args.json and the state dict: which model to build and what to export, or refuses.

    Returns a dict: norm_scheme ("post" | "pre"), classifier (None | {n_cls, nlayers_cls}), notes
    (what was read from args.json / the checkpoint, for the README). Refusals are ExportErrors
    `args.json <key> = <value>: <why>` (or naming the checkpoint key that shows the variant)."""
    notes = []

    def refuse(key, why):
        raise ExportError(f"args.json {key} = {json.dumps(args[key])}: {why}")

    def refuse_state(prefix, why):
        keys = sorted(k for k in state if k.startswith(prefix))
        raise ExportError(f"checkpoint key {keys[0]} ({len(keys)} keys {prefix}*): {why}")

    # --- what _encode computes: refuse what is not exported
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        refuse("input_emb_style", {
            "category": "scGPT's CategoryValueEncoder looks up one learned vector per bin; only the continuous "
                        "value encoder (Linear-ReLU-Linear-LayerNorm of the bin value) is exported",
            "scaling": "the gene embedding is multiplied by the raw value (no value encoder); only the "
                       "continuous value encoder is exported",
        }.get(style, "not a scGPT input_emb_style (category, continuous, scaling)"))
    if "value_encoder.embedding.weight" in state:
        refuse_state("value_encoder.embedding.", "a categorical value encoder (input_emb_style category); "
                     "only the continuous value encoder is exported")
    if "input_style" in args and args["input_style"] != "binned":
        refuse("input_style", "the model was trained on normalised/log1p expression values, not on scGPT's "
               "per-cell bins; cellstream (like embed_data) feeds bins 1..n_bins-1")
    if args.get("cell_emb_style", "cls") != "cls":
        refuse("cell_emb_style", "the model's cell embedding (and its classifier's input) is a pooling of all "
               "token outputs; cellstream's graph outputs the <cls> row (cell_emb_style cls)")
    if _truthy(args.get("use_mod")):
        refuse("use_mod", "a multi-omic model (MultiOmicTransformerModel): its sequences mix RNA genes with "
               "other modalities' features; cellstream tokenises RNA counts only")
    for key in ("DSBN", "domain_spec_batchnorm"):
        v = args.get(key)
        if v is True or v in ("dsbn", "batchnorm"):
            refuse(key, "_encode normalises the input embeddings per batch (domain-specific batch norm, "
                   "needing the batch label of every cell) or with a BatchNorm1d; not exported")
        if v == "do_affine":
            notes.append(f'args.json `{key} = "do_affine"`: scGPT 0.2.4 builds no batch norm for this value '
                         "(its affine branch is unreachable), so `_encode` has none")
    for prefix in ("dsbn.", "bn."):
        if any(k.startswith(prefix) for k in state):
            refuse_state(prefix, "the checkpoint was trained with (domain-specific) batch normalisation of the "
                         "input embeddings (DSBN); not exported")
    if args.get("fast_transformer_backend", "flash") != "flash":
        refuse("fast_transformer_backend", "the linear-attention encoder (fast_transformers) is a different "
               "attention; only softmax attention layers are exported")
    if any(k.startswith("transformer_encoder.fast_transformer_encoder.") for k in state):
        refuse_state("transformer_encoder.fast_transformer_encoder.", "a linear-attention encoder "
                     "(fast_transformer_backend linear); not exported")
    for key in ("use_batch_labels", "INPUT_BATCH_LABELS"):
        if _truthy(args.get(key)):
            notes.append(f"args.json `{key} = {json.dumps(args[key])}`: exported; without DSBN, batch labels "
                         "reach only the expression decoders (not `_encode`, not the `<cls>` embedding, not "
                         "`cls_decoder`), which are not in the graph")
            break
    else:
        if any(k.startswith("batch_encoder.") for k in state):
            notes.append("checkpoint has `batch_encoder.*` (trained with batch labels): exported; without DSBN "
                         "batch labels reach only the expression decoders, which are not in the graph")
    if _truthy(args.get("include_zero_gene")):
        notes.append("args.json `include_zero_gene = true`: the model was trained with zero-count genes in its "
                     "sequences; cellstream (like embed_data) feeds the non-zero genes only")
    ignored = [k for k in ("explicit_zero_prob", "mvc_decoder_style", "MVC", "GEPC", "do_mvc", "ecs_thres",
                           "ecs_threshold", "DAB", "do_dab", "dab_weight", "USE_CLS", "CLS", "no_cls", "USE_CCE",
                           "CCE", "no_cce", "USE_GENERATIVE_TRAINING", "training_tasks", "n_input_bins",
                           "mask_value", "dropout", "fp16", "amp") if k in args]
    if ignored:
        notes.append("read and not needed (training objectives, decoders outside the graph, or values that do "
                     "not change the eval-mode `<cls>` output): " + ", ".join(f"`{k}`" for k in ignored))

    # --- shape keys against the weights
    d = int(arg(args, "embsize"))
    nheads = int(arg(args, "nheads", "nhead"))
    if d % nheads:
        refuse("nheads" if "nheads" in args else "nhead", f"embsize {d} is not divisible by it")
    layer_ids = {int(m.group(1)) for k in state for m in [re.match(r"transformer_encoder\.layers\.(\d+)\.", k)] if m}
    if layer_ids and len(layer_ids) != int(arg(args, "nlayers")):
        refuse("nlayers", f"the checkpoint has {len(layer_ids)} encoder layers")
    w = state.get("encoder.embedding.weight")
    if w is not None and w.ndim == 2 and w.shape[1] != d:
        refuse("embsize", f"the checkpoint's gene embedding is {w.shape[1]} wide")
    w = state.get("transformer_encoder.layers.0.linear1.weight")
    if w is not None and w.ndim == 2 and w.shape[0] != int(arg(args, "d_hid")):
        refuse("d_hid", f"the checkpoint's feed-forward layers are {w.shape[0]} wide")

    # --- norm scheme
    flash_names = any(".self_attn.Wqkv." in k for k in state)
    torch_names = any(".self_attn.in_proj_" in k for k in state)
    if norm_scheme:
        scheme = norm_scheme
        notes.append(f"norm scheme `{scheme}` given on the command line (--norm-scheme)")
    elif not _truthy(args.get("pre_norm")):
        scheme = "post"
    elif "fast_transformer" in args and not _truthy(args["fast_transformer"]):
        scheme = "post"
        notes.append("args.json `pre_norm = true` with `fast_transformer = false`: scGPT builds torch "
                     "`nn.TransformerEncoderLayer`s then, which are post-norm (pre_norm only reaches "
                     "FlashTransformerEncoderLayer), so the model is post-norm")
    elif flash_names and not torch_names:
        scheme = "pre"
    else:
        refuse("pre_norm", "ambiguous: the attention weights are named `self_attn.in_proj_*`, as scGPT saves a "
               "model built without flash-attn, whose torch layers ignore pre_norm (post-norm); flash-attn's "
               "pre-norm layers save `self_attn.Wqkv.*`. Which one trained this checkpoint cannot be told from "
               "it: pass --norm-scheme pre or --norm-scheme post")
    if scheme == "pre":
        notes.append("pre-norm layers: scGPT's `FlashTransformerEncoderLayer(norm_scheme=\"pre\")`, "
                     "`x = norm1(x); x = x + SA(x); x = norm2(x); x = x + FF(x)` (the residual is taken after "
                     "each norm, unlike torch's `norm_first=True`), no final norm")

    # --- classifier head
    classifier = None
    w = state.get("cls_decoder.out_layer.weight")
    trained = w is not None and w.ndim == 2 and w.shape[0] > 1
    if trained and not embedding_only:
        n_cls = int(w.shape[0])
        lin = sorted({int(m.group(1)) for k in state
                      for m in [re.match(r"cls_decoder\._decoder\.(\d+)\.weight$", k)] if m and state[k].ndim == 2})
        if lin != [3 * i for i in range(len(lin))]:
            raise ExportError(f"cls_decoder has Linear layers at _decoder indices {lin}; scGPT's ClsDecoder has "
                              "them at 0, 3, 6, ... (Linear, ReLU, LayerNorm)")
        nlayers_cls = len(lin) + 1
        if "n_layers_cls" in args and int(args["n_layers_cls"]) != nlayers_cls:
            notes.append(f"args.json `n_layers_cls = {args['n_layers_cls']}`, but the checkpoint's trained "
                         f"cls_decoder has {nlayers_cls} layers (scGPT's Tutorial_Annotation builds it with "
                         "nlayers_cls=3 whatever args.json says): built as in the checkpoint")
        if labels_path is None:
            raise ExportError(f"the checkpoint has a trained cell-type classifier (cls_decoder.out_layer.weight "
                              f"{list(w.shape)}, {n_cls} classes): pass --labels FILE with its {n_cls} class names "
                              "in class-id order (one per line, or the JSON id2type mapping saved at fine-tuning), "
                              "or --embedding-only to export the embedding alone")
        labels, how = read_labels(labels_path)
        if len(labels) != n_cls:
            raise ExportError(f"{labels_path}: {len(labels)} class names, but the classifier has {n_cls} classes "
                              f"(cls_decoder.out_layer.weight {list(w.shape)})")
        classifier = {"n_cls": n_cls, "nlayers_cls": nlayers_cls, "labels": labels, "labels_how": how,
                      "labels_path": str(labels_path)}
    elif labels_path is not None:
        if embedding_only:
            raise ExportError("--labels and --embedding-only contradict each other")
        raise ExportError(f"--labels given, but the checkpoint has no trained classifier "
                          f"(cls_decoder.out_layer.weight is {'absent' if w is None else list(w.shape)}; a "
                          "fine-tuned annotation model has one row per class)")
    elif trained:
        notes.append(f"trained classifier (cls_decoder.out_layer.weight {list(w.shape)}) left out: "
                     "--embedding-only")
    return {"norm_scheme": scheme, "classifier": classifier, "notes": notes}


def build_model(model_mod, args, vocab, norm_scheme="post", n_cls=1, nlayers_cls=None):
    """TransformerModel as scgpt 0.2.4 embed_data builds it (use_fast_transformer=False: torch
    post-norm layers); for pre-norm, FlashTransformerEncoderLayer(norm_scheme="pre") around
    TorchFlashMHA; n_cls / nlayers_cls for a fine-tuned classifier head."""
    with flash_stub(model_mod) if norm_scheme == "pre" else _nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True")  # (flash layers)
        return model_mod.TransformerModel(
            ntoken=len(vocab),
            d_model=arg(args, "embsize"),
            nhead=arg(args, "nheads", "nhead"),  # embed_data reads "nheads" (the whole-human args.json key)
            d_hid=arg(args, "d_hid"),
            nlayers=arg(args, "nlayers"),
            nlayers_cls=arg(args, "n_layers_cls") if nlayers_cls is None else nlayers_cls,
            n_cls=n_cls,
            vocab=vocab,
            dropout=arg(args, "dropout"),
            pad_token=arg(args, "pad_token"),
            pad_value=arg(args, "pad_value"),
            do_mvc=True,
            do_dab=False,
            use_batch_labels=False,
            domain_spec_batchnorm=False,
            explicit_zero_prob=False,
            use_fast_transformer=norm_scheme == "pre",
            fast_transformer_backend="flash",
            pre_norm=norm_scheme == "pre",
        )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_weights(model, state, allow_missing=False, used_prefixes=ENCODE_PREFIXES):
    """scGPT's load_pretrained (strict=False): flash-attn `Wqkv.` and torch `in_proj_` names mapped to
    the model's, keep keys whose name and shape match. Here what was not loaded is reported, and a
    missing or mismatched weight that the exported graph uses fails."""
    model_dict = model.state_dict()
    if any(".self_attn.Wqkv." in k for k in model_dict):  # flash layers (pre-norm)
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    else:
        state = {k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()}
    loaded = {k: v for k, v in state.items() if k in model_dict and v.shape == model_dict[k].shape}
    unexpected = sorted(k for k in state if k not in model_dict)
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_dict[k].shape)}"
                        for k in state if k in model_dict and state[k].shape != model_dict[k].shape)
    missing = sorted(k for k in model_dict if k not in loaded)
    missing_encode = [k for k in missing if k.startswith(used_prefixes)]
    mismatched_used = [m for m in mismatched if m.startswith(used_prefixes)]
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
    if (missing_encode or mismatched_used) and not allow_missing:
        raise ExportError("the checkpoint does not provide every weight _encode uses (see above); "
                          "refusing to export a partly random model (--allow-missing overrides)")
    return report


# ------------------------------------------------------------------------------ graph modules
class CellEmbedding(nn.Module):
    """gene_ids i64 [N,S], values f32 [N,S] -> cell_embedding f32 [N,d] (and logits f32 [N,n_cls] when
    the model has a trained classifier): the <cls> position of the last encoder layer, as embed_data's
    get_batch_cell_embeddings (before its L2 normalisation), and `cls_decoder` of it, as scGPT's
    forward(CLS=True) computes `cls_output`. This is the original scGPT module: the reference every
    export is verified against, and what the torch form of post-norm layers exports."""

    def __init__(self, model, pad_id, with_logits=False):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)
        self.with_logits = with_logits

    def forward(self, gene_ids, values):
        mask = gene_ids.eq(self.pad_id)
        emb = self.model._encode(gene_ids, values, src_key_padding_mask=mask)[:, 0, :]
        return (emb, self.model.cls_decoder(emb)) if self.with_logits else emb


class PreNormTorch(nn.Module):
    """The torch form of pre-norm layers: scGPT's FlashTransformerEncoderLayer(norm_scheme="pre")
    forward, step for step, on the same submodules, without its `src_key_padding_mask.any().item()`
    branch (data-dependent: torch.export cannot trace it; with no padding the mask is all True and
    the result is the same)."""

    def __init__(self, model, pad_id, with_logits=False):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)
        self.with_logits = with_logits

    def forward(self, gene_ids, values):
        m = self.model
        keep = gene_ids.ne(self.pad_id)
        x = m.encoder(gene_ids) + m.value_encoder(values)
        for layer in m.transformer_encoder.layers:
            x = layer.norm1(x)
            x = x + layer.self_attn(x, key_padding_mask=keep)[0]
            x = layer.norm2(x)
            x = x + layer.linear2(layer.activation(layer.linear1(x)))
        emb = x[:, 0, :]
        return (emb, m.cls_decoder(emb)) if self.with_logits else emb


def _layer_norm(x, norm):
    """LayerNorm as models/train/common.py writes it for tract: (x - mean) through RMSNormalization,
    plus the bias, the mean as a matmul by a constant 1/d column."""
    d = x.shape[-1]
    centred = x - x @ torch.full((d, 1), 1.0 / d)
    return F.rms_norm(centred, (d,), weight=norm.weight, eps=norm.eps) + norm.bias


def _attention(layer):
    """(qkv weight [3d, d], qkv bias [3d], out_proj, heads) of a torch or a flash (TorchFlashMHA) layer."""
    at = layer.self_attn
    if isinstance(at, nn.MultiheadAttention):
        return at.in_proj_weight, at.in_proj_bias, at.out_proj, at.num_heads
    return at.Wqkv.weight, at.Wqkv.bias, at.out_proj, at.num_heads


def _check_relu(layer):
    act = getattr(layer, "activation", None)
    relu = act is F.relu or isinstance(act, nn.ReLU) or getattr(layer, "activation_relu_or_gelu", 0) == 1
    if not relu:
        raise ExportError(f"encoder layer activation {act!r}: scGPT's layers use ReLU")


class FastScGPT(nn.Module):
    """The fast form: the function of CellEmbedding written as models/train/common.py::export_module
    writes the compact model (same ops, same spelling, so that cellstream's tract rewrites match):

    - the key-padding mask [N,S] of 0 / -inf from gene_ids == <pad>, added by broadcasting to scores
      laid out [heads, S_query, N, S_key] (`einsum("nqhd,nkhd->hqnk")`, then softmax over the last
      axis and `einsum("hqnk,nkhd->nqhd")`);
    - every LayerNorm as centring by a matmul with a constant 1/d column + `RMSNormalization` + bias;
    - q, k, v from one projection reshaped [N,S,3,d] and indexed;
    - the last layer for the <cls> row only: keys and values of every token (`in_proj_weight[d:]`),
      the query, attention, residual, feed-forward and norms of row 0 alone.

    Post-norm layers (nn.TransformerEncoderLayer, FlashTransformerEncoderLayer "post"):
        x = LN1(x + SA(x)); x = LN2(x + FF(x))
    Pre-norm layers (FlashTransformerEncoderLayer "pre"; the residual is the normed value):
        x = LN1(x); x = x + SA(x); x = LN2(x); x = x + FF(x)
    In the last pre-norm layer LN1 runs on every token (keys and values need it), the rest on row 0."""

    def __init__(self, model, pad_id, norm_scheme, with_logits=False):
        super().__init__()
        self.m = model
        self.pad_id = int(pad_id)
        self.pre = norm_scheme == "pre"
        self.with_logits = with_logits
        for layer in model.transformer_encoder.layers:
            _check_relu(layer)

    def forward(self, gene_ids, values):
        m = self.m
        n = gene_ids.shape[0]
        key_mask = torch.where(gene_ids == self.pad_id, float("-inf"), 0.0).to(torch.float32)
        ve = m.value_encoder
        value = torch.clamp(values.unsqueeze(-1), max=ve.max_value)
        x = _layer_norm(m.encoder.embedding(gene_ids), m.encoder.enc_norm) + _layer_norm(
            ve.linear2(F.relu(ve.linear1(value))), ve.norm)
        layers = m.transformer_encoder.layers
        for i, layer in enumerate(layers):
            w, b, out_proj, h = _attention(layer)
            d = w.shape[1]
            heads = lambda t: t.reshape(n, -1, h, d // h)  # noqa: E731
            if self.pre:
                x = _layer_norm(x, layer.norm1)
            if i + 1 < len(layers):
                qkv = F.linear(x, w, b).reshape(n, -1, 3, d)
                q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            else:  # keys and values of every token, the rest for row 0 (<cls>) alone
                kv = F.linear(x, w[d:], b[d:]).reshape(n, -1, 2, d)
                k, v = kv[:, :, 0], kv[:, :, 1]
                x = x[:, :1, :]
                q = F.linear(x, w[:d], b[:d])
            scores = torch.einsum("nqhd,nkhd->hqnk", heads(q) * (1.0 / math.sqrt(d // h)), heads(k))
            p = torch.softmax(scores + key_mask, dim=-1)
            o = torch.einsum("hqnk,nkhd->nqhd", p, heads(v)).reshape(n, -1, d)
            if self.pre:
                x = _layer_norm(x + out_proj(o), layer.norm2)
                x = x + layer.linear2(F.relu(layer.linear1(x)))
            else:
                x = _layer_norm(x + out_proj(o), layer.norm1)
                x = _layer_norm(x + layer.linear2(F.relu(layer.linear1(x))), layer.norm2)
        emb = x[:, 0, :]
        return (emb, m.cls_decoder(emb)) if self.with_logits else emb


# ------------------------------------------------------------------------------ export + check
def export_onnx(wrapper, path, pad_id, cls_id, gene_pool, pad_value, opset=OPSET, output_names=("cell_embedding",)):
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
            wrapper, (ids, vals), dynamo=True, opset_version=opset,
            input_names=["gene_ids", "values"], output_names=list(output_names),
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
    if [i.name for i in m.graph.input] != ["gene_ids", "values"] or [o.name for o in m.graph.output] != list(output_names):
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
def torch_outputs(wrapper, ids, vals):
    """The wrapper's outputs as a list of arrays: [embedding] or [embedding, logits]."""
    out = wrapper(torch.from_numpy(ids), torch.from_numpy(vals))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def torch_embed(wrapper, ids, vals):
    return torch_outputs(wrapper, ids, vals)[0]


VERIFY_CASES = ((2, 23), (5, 70), (3, 70), (6, 23))


def verify(wrapper, sess, pad_id, cls_id, pad_value, n_bins, gene_pool, seed=1, output_names=("cell_embedding",),
           long_s=None):
    """torch vs onnxruntime at two N and two S (and N=2 at S=long_s), padded rows included; and each
    padded row vs the same sequence run alone unpadded in torch (the in-graph mask). Fails above TOL.
    Differences are named per output: `torch_vs_ort`, ... for the embedding, `logits_...` for logits."""
    rng = np.random.default_rng(seed)
    prefixes = ["", "logits_"][: len(output_names)]
    worst = {f"{p}{k}": 0.0 for p in prefixes
             for k in ("torch_vs_ort", "padded_vs_unpadded_torch", "ort_vs_unpadded_torch")}
    cases = VERIFY_CASES + (((2, long_s),) if long_s else ())
    for n, s in cases:
        lengths = [s] + list(rng.integers(2, s, size=n - 1))  # one full row, the others padded
        seqs = [random_sequence(rng, int(L), gene_pool, cls_id, pad_value, n_bins) for L in lengths]
        ids, vals = pad_batch(seqs, pad_id, pad_value, length=s)
        outs = sess.run(list(output_names), {"gene_ids": ids, "values": vals})
        touts = torch_outputs(wrapper, ids, vals)
        alones = [torch_outputs(wrapper, g[None], v[None]) for g, v in seqs]
        line = []
        for j, (p, o, t) in enumerate(zip(prefixes, outs, touts)):
            alone = np.concatenate([a[j] for a in alones])
            if o.shape != t.shape:
                raise ExportError(f"onnxruntime shape {o.shape} != torch {t.shape}")
            d = {f"{p}torch_vs_ort": float(np.abs(o - t).max()),
                 f"{p}padded_vs_unpadded_torch": float(np.abs(t - alone).max()),
                 f"{p}ort_vs_unpadded_torch": float(np.abs(o - alone).max())}
            line += [f"{k} {v:.2e}" for k, v in d.items()]
            for k, v in d.items():
                worst[k] = max(worst[k], v)
        log(f"  N={n} S={s} lengths={sorted(int(x) for x in lengths)}: " + ", ".join(line))
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    if bad:
        raise ExportError(f"verification failed, max abs diff above {TOL}: {bad}")
    return worst


# ------------------------------------------------------------------------------ package
def toml_str(s):
    return json.dumps(str(s), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_manifest(path, name, d, n_bins, max_len, pad_token, cls_token, pad_value, onnx_sha, comments=(),
                   logits=False, precision="f32"):
    path.write_text(
        "".join(f"# {c}\n" for c in comments) +
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
        + (f'precision = "{precision}"   # opt-in: cellstream runs the products by weights in int8\n'
           if precision != "f32" else "")
        + f'onnx_sha256 = "{onnx_sha}"\n'
        f"[inputs]\n"
        f'gene_ids = "gene_ids"\n'
        f'values = "values"\n'
        f"[outputs]\n"
        f'embedding = "cell_embedding"\n'
        + ('logits = "logits"\n' if logits else ""))


def versions():
    import onnx
    import onnxruntime
    import onnxscript

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


NORM_TEXT = {
    "post": "post-norm (`x = norm1(x + SA(x)); x = norm2(x + FF(x))`)",
    "pre": "pre-norm as scGPT's FlashTransformerEncoderLayer(norm_scheme=\"pre\") computes it "
           "(`x = norm1(x); x = x + SA(x); x = norm2(x); x = x + FF(x)`, no final norm)",
}


def convert(ckpt_dir, out_dir, name=None, allow_missing=False, command=None, self_test_note=None,
            ckpt_display=None, form="fast", labels=None, embedding_only=False, norm_scheme=None,
            precision="f32"):
    if form not in FORMS:
        raise ExportError(f"--form {form!r}: one of {FORMS}")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model_mod, scgpt_info = load_scgpt_model_module()
    args, vocab, appended, state, ckpt_info = read_checkpoint(ckpt_dir)
    plan = plan_export(args, state, labels_path=labels, embedding_only=embedding_only, norm_scheme=norm_scheme)
    scheme, cls = plan["norm_scheme"], plan["classifier"]
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
    for note in plan["notes"]:
        log(f"  note: {note}")

    torch.manual_seed(0)
    model = build_model(model_mod, args, vocab, scheme, n_cls=cls["n_cls"] if cls else 1,
                        nlayers_cls=cls["nlayers_cls"] if cls else None)
    used = ENCODE_PREFIXES + (("cls_decoder.",) if cls else ())
    report = load_weights(model, state, allow_missing=allow_missing, used_prefixes=used)
    model.eval()
    with_logits = cls is not None
    wrapper = CellEmbedding(model, pad_id, with_logits).eval()
    d = int(arg(args, "embsize"))
    log(f"model: d_model {d}, heads {arg(args, 'nheads', 'nhead')}, d_hid {args['d_hid']}, "
        f"layers {args['nlayers']} ({scheme}-norm), dropout {args['dropout']} (inactive in eval)"
        + (f", classifier {cls['n_cls']} classes ({cls['nlayers_cls']} layers)" if cls else ""))

    specials = set(SPECIALS) | {pad_token, cls_token}
    gene_pool = np.array([i for t, i in vocab.items() if t not in specials], dtype=np.int64)

    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    outputs = ("cell_embedding", "logits") if with_logits else ("cell_embedding",)
    if form == "fast":
        graph, opset = FastScGPT(model, pad_id, scheme, with_logits).eval(), OPSET_FAST
    elif scheme == "pre":
        graph, opset = PreNormTorch(model, pad_id, with_logits).eval(), OPSET
    else:
        graph, opset = wrapper, OPSET
    log(f"exporting {onnx_path} ({form} form, opset {opset}, dynamo, symbolic N and S) ...")
    export_onnx(graph, onnx_path, pad_id, cls_id, gene_pool, pad_value, opset=opset, output_names=outputs)
    log(f"  {onnx_path.stat().st_size} bytes")
    sess = ort_session(onnx_path)
    for vi in sess.get_inputs() + sess.get_outputs():
        log(f"  onnx {vi.name}: {vi.type} {vi.shape}")
    long_s = min(max_len, len(gene_pool) + 1) if form == "fast" and min(max_len, len(gene_pool) + 1) > 70 else None
    log("verifying onnxruntime against torch (the original scGPT module):")
    worst = verify(wrapper, sess, pad_id, cls_id, pad_value, n_bins, gene_pool, output_names=outputs, long_s=long_s)
    log("  max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) + f" (limit {TOL})")

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    if cls:
        (out_dir / "labels.txt").write_text("".join(f"{n}\n" for n in cls["labels"]))
    onnx_sha = sha256_file(onnx_path)
    legacy = form == "torch" and scheme == "post" and not cls  # byte for byte what earlier versions wrote
    comments = [] if legacy else [
        f"converted by tools/export-scgpt: graph form {form} (opset {opset}); scGPT encoder layers "
        f"norm_scheme = {scheme}: {NORM_TEXT[scheme]}"]
    if cls:
        comments.append(f"logits = cls_decoder(<cls> embedding), {cls['n_cls']} classes in labels.txt order. No "
                        "confidence_threshold: none is principled without held-out data (see README.md)")
    write_manifest(out_dir / "manifest.toml", name, d, n_bins, max_len, pad_token, cls_token, pad_value, onnx_sha,
                   comments=comments, logits=bool(cls), precision=precision)
    write_readme(out_dir / "README.md", name, ckpt_display or ckpt_dir, ckpt_info, args, appended, report, worst,
                 scgpt_info, onnx_sha, command, self_test_note, form=form, opset=opset, plan=plan, long_s=long_s)
    log(f"package written to {out_dir}")
    return {"wrapper": wrapper, "sess": sess, "vocab": vocab, "pad_id": pad_id, "cls_id": cls_id,
            "pad_value": pad_value, "n_bins": n_bins, "worst": worst, "report": report, "outputs": outputs,
            "plan": plan, "graph": graph}


def write_readme(path, name, ckpt_dir, ckpt_info, args, appended, report, worst, scgpt_info, onnx_sha,
                 command, self_test_note, form="torch", opset=OPSET, plan=None, long_s=None):
    v = versions()
    scheme = plan["norm_scheme"] if plan else "post"
    cls = plan["classifier"] if plan else None
    legacy = form == "torch" and scheme == "post" and not cls
    arch_keys = ("embsize", "nheads", "nhead", "d_hid", "nlayers", "n_layers_cls", "dropout", "pad_token",
                 "pad_value", "n_bins", "max_seq_len", "input_emb_style")
    if not legacy:
        arch_keys += ("input_style", "cell_emb_style", "pre_norm", "fast_transformer", "fast_transformer_backend",
                      "DSBN", "domain_spec_batchnorm", "use_batch_labels", "use_mod", "explicit_zero_prob",
                      "mvc_decoder_style")
    arch = {k: args.get(k) for k in arch_keys if k in args}
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
    lines += ["", f"Command: `{command}`" if command else "", "", "## What it is", ""]
    if legacy:
        lines += [
            f"scGPT {scgpt_info['scgpt_version']} `TransformerModel` built as `scgpt.tasks.embed_data` builds it",
            "(`use_fast_transformer=False`, post-norm, `do_mvc=True`, no batch labels / DSBN / DAB), weights",
            "loaded like scGPT's `load_pretrained` (flash-attn `Wqkv.` renamed to `in_proj_`).",
            f"args.json (architecture keys): `{json.dumps(arch)}`.", "",
            f"`model.onnx` (opset {OPSET}, sha256 `{onnx_sha}`): `gene_ids` i64 [N,S], `values` f32 [N,S] ->",
            "`cell_embedding` f32 [N,d] = `_encode(gene_ids, values, gene_ids == pad_id)[:, 0, :]`, not",
            "normalised (the manifest's `normalize_embedding = true` makes cellstream L2-normalise it, as",
            "embed_data does). The MLM/MVC/classifier decoders are not in the graph. No classifier head,",
            "so no `labels.txt` and no `logits` output.", "",
        ]
    else:
        if scheme == "pre":
            layers = ("scGPT's `FlashTransformerEncoderLayer(norm_scheme=\"pre\")` layers (built around "
                      "`TorchFlashMHA`, flash_attn 1.x's FlashMHA in plain fp32 torch; embed_data would build "
                      "post-norm layers instead and compute other numbers)")
        else:
            layers = ("torch `nn.TransformerEncoderLayer`s as `scgpt.tasks.embed_data` builds them "
                      "(`use_fast_transformer=False`; flash-attn's post-norm layers compute the same)")
        lines += [
            f"scGPT {scgpt_info['scgpt_version']} `TransformerModel` with {layers}, `do_mvc=True`, no batch "
            "labels / DSBN / DAB" + (f", and a trained `cls_decoder` ({cls['nlayers_cls']} layers, "
                                     f"{cls['n_cls']} classes)" if cls else "") + "; weights loaded like scGPT's "
            "`load_pretrained` (flash-attn `Wqkv.` and torch `in_proj_` names mapped onto each other).",
            f"args.json (architecture keys): `{json.dumps(arch)}`.", "",
            f"**Encoder layers: {NORM_TEXT[scheme]}.**", "",
            f"`model.onnx` (**{form} form**, opset {opset}, sha256 `{onnx_sha}`): `gene_ids` i64 [N,S], `values` "
            "f32 [N,S] -> `cell_embedding` f32 [N,d] = the `<cls>` row of `_encode(gene_ids, values, gene_ids == "
            "pad_id)`, not normalised (the manifest's `normalize_embedding = true` makes cellstream L2-normalise "
            "it, as embed_data does)"
            + (f"; `logits` f32 [N,{cls['n_cls']}] = `cls_decoder(cell_embedding)` (scGPT's `cls_output`: the "
               "unnormalised embedding in, unnormalised class scores out)." if cls else "."),
        ]
        if form == "fast":
            lines += [
                "The fast form is the form of `models/train/common.py::export_module`, which cellstream's tract "
                "rewrites recognise: attention as `einsum(\"nqhd,nkhd->hqnk\")` of the scaled queries and the "
                "keys, plus the key-padding mask [N,S] (0 / -inf from `gene_ids == <pad>`) broadcast, softmax "
                "over the keys, `einsum(\"hqnk,nkhd->nqhd\")` with the values; each LayerNorm as centring "
                "(a matmul by a constant 1/d column) + `RMSNormalization` + bias; q, k, v from one projection "
                "reshaped [N,S,3,d]; the last layer for the `<cls>` row only (keys and values of every token)."]
        else:
            lines += ["The torch form is torch.onnx's export of the module itself."]
        if cls:
            lines += [
                "", f"`labels.txt`: the {cls['n_cls']} class names in class-id order, from `{Path(cls['labels_path']).name}` "
                f"({cls['labels_how']}). The manifest has no `confidence_threshold` (cellstream then assigns every "
                "cell its argmax class): a threshold is a property of the data it was chosen on, and a checkpoint "
                "carries none; choose one on held-out cells and add `confidence_threshold = ...` to the manifest "
                "(the `onnx_sha256` does not change)."]
        lines += ["", "MLM / MVC decoders are not in the graph."]
        if plan["notes"]:
            lines += ["", "Read from args.json and the checkpoint:", ""] + [f"- {n}" for n in plan["notes"]]
        lines += [""]
    lines += [
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
    where = "N in {2,3,5,6} and S in {23,70}" + (f", and N=2 at S={long_s}" if long_s else "")
    lines += [
        "", "## Verification", "",
        f"onnxruntime (CPU, 1 thread) against torch at {where}, padded rows",
        "included, and each padded row against the same sequence run alone unpadded in torch. Max abs diff:", "",
    ]
    if not legacy:
        lines[-3] = (f"onnxruntime (CPU, 1 thread) on `model.onnx` against the original scGPT module in torch at "
                     f"{where}, padded rows")
    lines += [f"- {k}: {x:.3e}" for k, x in worst.items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------ self-test
REF_LENGTHS = [2, 3, 5, 9, 17, 33, 64, 100, 300, 511, 700, 1200]
PRESETS = {
    # the original fixture: torch form, post-norm, pretrained (embedding only)
    "scgpt-random": {"n_genes": 1000, "embsize": 64, "nheads": 4, "d_hid": 128, "nlayers": 2, "seed": 0,
                     "form": "torch", "pre_norm": False, "n_cls": 1, "attn_names": "Wqkv", "weights": "best_model.pt",
                     "lengths": [2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22, 26, 31, 36, 41, 47, 52, 57, 61, 64]},
    # head width 64: post-norm, fine-tuned annotation checkpoint (as Tutorial_Annotation saves it)
    "scgpt-h64": {"n_genes": 1250, "embsize": 128, "nheads": 2, "d_hid": 256, "nlayers": 2, "seed": 0,
                  "form": "fast", "pre_norm": False, "n_cls": 5, "attn_names": "in_proj_", "weights": "model.pt",
                  "labels": ["B cell", "CD4 T cell", "CD8 T cell", "NK cell", "monocyte"],
                  "lengths": REF_LENGTHS},
    # head width 128: pre-norm (flash-attn layers), pretrained (embedding only)
    "scgpt-h128-prenorm": {"n_genes": 1250, "embsize": 256, "nheads": 2, "d_hid": 128, "nlayers": 2, "seed": 0,
                           "form": "fast", "pre_norm": True, "n_cls": 1, "attn_names": "Wqkv",
                           "weights": "best_model.pt", "lengths": REF_LENGTHS},
    # head width 16: pre-norm in the torch form (TorchFlashMHA as torch.onnx writes it), pretrained
    "scgpt-h16-prenorm-torch": {"n_genes": 1250, "embsize": 64, "nheads": 4, "d_hid": 64, "nlayers": 2, "seed": 1,
                                "form": "torch", "pre_norm": True, "n_cls": 1, "attn_names": "Wqkv",
                                "weights": "best_model.pt", "lengths": REF_LENGTHS},
}


def randomise_weights(model):
    """Fresh random values for every weight matrix (Xavier-uniform) and every bias (U(-0.1, 0.1)),
    from torch's global generator, so that no two layers share values: nn.TransformerEncoder builds
    its layers as deep copies of one, and torch's MultiheadAttention starts its biases at 0, which the
    ONNX optimiser would fold into shared initialisers. The gene embedding keeps scGPT's
    U(-0.1, 0.1) init; LayerNorm parameters are left to the caller."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms or name == "encoder.embedding.weight":
                continue
            if p.ndim >= 2:
                nn.init.xavier_uniform_(p)
            else:
                p.uniform_(-0.1, 0.1)


def self_test_note(name, cfg, command, form):
    if name == "scgpt-random":  # the committed fixture's text, unchanged
        return (f"**Test fixture, random weights.** Written by `{command}`: a randomly initialised "
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
    kind = (f"a fine-tuned annotation checkpoint (trained-looking `cls_decoder`: 3 layers, {cfg['n_cls']} classes; "
            f"weights saved as `{cfg['weights']}` as Tutorial_Annotation does; made-up labels "
            f"{', '.join(cfg['labels'])} given as a JSON id2type file)" if cfg["n_cls"] > 1 else
            "a pretrained checkpoint (no trained classifier: embedding only)")
    layers = ("pre-norm layers (`pre_norm: true`, scGPT's `FlashTransformerEncoderLayer(norm_scheme=\"pre\")` "
              "around TorchFlashMHA)" if cfg["pre_norm"] else "post-norm layers")
    names = ("`Wqkv.` as in flash-attn-trained checkpoints" if cfg["attn_names"] == "Wqkv"
             else "`in_proj_` as scGPT saves a model trained without flash-attn")
    out = "`embedding_torch`, `embedding_ort`" + (", `logits_torch`, `logits_ort`" if cfg["n_cls"] > 1 else "")
    return (f"**Test fixture, random weights.** Written by `{command}`: a randomly initialised (torch seed "
            f"{cfg['seed']}; every layer's own Xavier-uniform weights and U(-0.1, 0.1) biases; LayerNorm "
            f"weights/biases perturbed by 0.2·N(0,1)) scGPT `TransformerModel` with the "
            f"first {cfg['n_genes']} genes (ids 0..{cfg['n_genes'] - 1}) of scGPT's default gene vocabulary, "
            f"embsize {cfg['embsize']}, {cfg['nheads']} heads (width {cfg['embsize'] // cfg['nheads']}), d_hid "
            f"{cfg['d_hid']}, {cfg['nlayers']} {layers}; {kind}; saved as a checkpoint directory in a temporary "
            f"directory (attention weights named {names}) and converted ({form} form). `reference.jsonl`: one "
            f"line per crafted sequence (lengths {', '.join(map(str, cfg['lengths']))}; `<cls>` first with value "
            f"-2, then distinct random genes with integer bins 1..50): `gene_ids`, `values` (unpadded), {out}; "
            f"`*_torch` from the original scGPT module in torch, the sequence alone, unpadded; `*_ort` from "
            f"onnxruntime on `model.onnx`, all {len(cfg['lengths'])} sequences padded together to "
            f"S={max(cfg['lengths'])}; raw, not normalised.")


def self_test(out_dir, command, preset="scgpt-random", form=None):
    out_dir = Path(out_dir)
    cfg = PRESETS[preset]
    form = form or cfg["form"]
    model_mod, _ = load_scgpt_model_module()
    full = json.loads((REPO / "tests/fixtures/scgpt_default_gene_vocab.json").read_text())
    # the first n genes by id: ids 0..n-1, the same ids as in the full scGPT vocabulary
    genes = sorted(full.items(), key=lambda kv: kv[1])[: cfg["n_genes"]]
    assert [i for _, i in genes] == list(range(cfg["n_genes"]))
    ckpt_vocab = dict(genes)  # no specials: the converter appends them, as embed_data does
    args = {  # the keys of the whole-human args.json that embed_data reads, plus a few for context
        "embsize": cfg["embsize"], "nheads": cfg["nheads"], "d_hid": cfg["d_hid"], "nlayers": cfg["nlayers"],
        "n_layers_cls": 3, "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2, "mask_value": -1,
        "n_bins": 51, "max_seq_len": 1200, "input_emb_style": "continuous", "fast_transformer": True,
    }
    if preset != "scgpt-random":  # what a fine-tuning run's / a pre-norm run's args.json adds
        args.update({"input_style": "binned", "cell_emb_style": "cls", "pre_norm": cfg["pre_norm"], "DSBN": False,
                     "use_batch_labels": False, "explicit_zero_prob": False, "ecs_thres": 0.0})
    vocab_full = dict(ckpt_vocab)
    for s in SPECIALS:
        vocab_full[s] = len(vocab_full)
    torch.manual_seed(cfg["seed"])
    scheme = "pre" if cfg["pre_norm"] else "post"
    model = build_model(model_mod, args, vocab_full, scheme, n_cls=cfg["n_cls"])
    if preset != "scgpt-random":  # (the committed scgpt-random has its two layers equal but for the norms)
        randomise_weights(model)
    with torch.no_grad():  # LayerNorms away from identity, so that their parameters matter in the test
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
                mod.bias.add_(0.2 * torch.randn_like(mod.bias))
    # attention weights named as flash-attn-trained checkpoints (the whole-human one) name them, or
    # as scGPT saves a model whose flash-attn was not installed
    if cfg["attn_names"] == "Wqkv":
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v.clone() for k, v in model.state_dict().items()}
    else:
        state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v.clone() for k, v in model.state_dict().items()}

    with tempfile.TemporaryDirectory(prefix=f"{preset}-ckpt-") as tmp:
        ckpt = Path(tmp) / preset
        ckpt.mkdir()
        torch.save(state, ckpt / cfg["weights"])
        (ckpt / "args.json").write_text(json.dumps(args, indent=2) + "\n")
        (ckpt / "vocab.json").write_text(json.dumps(ckpt_vocab) + "\n")
        labels = None
        if cfg["n_cls"] > 1:  # as Tutorial_Annotation's id2type = dict(enumerate(categories)), saved as JSON
            labels = Path(tmp) / "id2type.json"
            labels.write_text(json.dumps({str(i): n for i, n in enumerate(cfg["labels"])}, indent=2) + "\n")
        note = self_test_note(preset, cfg, command, form)
        res = convert(ckpt, out_dir, name=preset, command=command, self_test_note=note,
                      ckpt_display=f"{preset} (a temporary directory, removed afterwards)", form=form, labels=labels)

    # the converted model must be the model that was saved
    w, pad_id, cls_id, pv = res["wrapper"], res["pad_id"], res["cls_id"], res["pad_value"]
    loaded = w.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded[k]), f"{k} differs after the round trip"

    rng = np.random.default_rng(cfg["seed"] + 7)
    gene_pool = np.arange(cfg["n_genes"], dtype=np.int64)
    seqs = [random_sequence(rng, L, gene_pool, cls_id, pv, res["n_bins"]) for L in cfg["lengths"]]
    ids, vals = pad_batch(seqs, pad_id, pv)
    outputs = res["outputs"]
    ort_outs = res["sess"].run(list(outputs), {"gene_ids": ids, "values": vals})
    alone = [torch_outputs(w, g[None], v[None]) for g, v in seqs]
    torch_alone = [np.concatenate([a[j] for a in alone]) for j in range(len(outputs))]
    torch_padded = torch_outputs(w, ids, vals)
    diffs = {}
    for p, ta, tp, o in zip(["", "logits_"], torch_alone, torch_padded, ort_outs):
        diffs.update({f"{p}torch_alone_vs_ort_padded": float(np.abs(ta - o).max()),
                      f"{p}torch_padded_vs_ort_padded": float(np.abs(tp - o).max()),
                      f"{p}torch_alone_vs_torch_padded": float(np.abs(ta - tp).max())})
    log("reference sequences: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if not all(v <= TOL for v in diffs.values()):
        raise ExportError(f"reference check failed: {diffs}")
    with open(out_dir / "reference.jsonl", "w") as f:
        for i, (g, v) in enumerate(seqs):
            rec = {"gene_ids": [int(x) for x in g], "values": [float(x) for x in v],
                   "embedding_torch": [float(x) for x in torch_alone[0][i]],
                   "embedding_ort": [float(x) for x in ort_outs[0][i]]}
            if len(outputs) > 1:
                rec["logits_torch"] = [float(x) for x in torch_alone[1][i]]
                rec["logits_ort"] = [float(x) for x in ort_outs[1][i]]
            f.write(json.dumps(rec) + "\n")
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
    ap.add_argument("--form", choices=FORMS,
                    help="graph form: fast (opset 23, the form cellstream's rewrites recognise; the default) or "
                         "torch (opset 18, torch.onnx's export of nn.TransformerEncoder)")
    ap.add_argument("--labels", metavar="FILE",
                    help="class names of a fine-tuned classifier, in class-id order: a text file (one per line), "
                         "a JSON list, or a JSON object id -> name (scGPT's id2type) or name -> id")
    ap.add_argument("--embedding-only", action="store_true",
                    help="export the embedding alone even if the checkpoint has a trained classifier")
    ap.add_argument("--norm-scheme", choices=("post", "pre"),
                    help="override args.json pre_norm (only needed where the checkpoint is ambiguous; see README)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="export even if the checkpoint lacks weights _encode uses (they stay random)")
    ap.add_argument("--precision", choices=("f32", "int8"), default="f32",
                    help="write precision = \"int8\" into the manifest: cellstream then runs the products by "
                         "constant weights in 8-bit integers (opt-in, faster on AVX2; see cellstream's README)")
    ap.add_argument("--self-test", metavar="OUTDIR",
                    help="convert a small randomly initialised model and write OUTDIR/reference.jsonl")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="scgpt-random",
                    help="--self-test: which fixture (default scgpt-random)")
    a = ap.parse_args()
    try:
        if a.self_test:
            if a.checkpoint or a.out or a.labels or a.embedding_only or a.norm_scheme or a.name:
                ap.error("--self-test takes only OUTDIR, --preset and --form")
            # The command recorded in the fixture's README: the canonical one that reproduces it
            # (--preset / --form only where they differ from the defaults).
            command = ("python tools/export-scgpt/export_scgpt.py --self-test " + shlex.quote(a.self_test)
                       + (f" --preset {a.preset}" if a.preset != "scgpt-random" else "")
                       + (f" --form {a.form}" if a.form and a.form != PRESETS[a.preset]["form"] else ""))
            self_test(a.self_test, command, preset=a.preset, form=a.form)
        else:
            if not (a.checkpoint and a.out):
                ap.error("CHECKPOINT_DIR and OUT_DIR are required")
            command = "python tools/export-scgpt/export_scgpt.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
            convert(a.checkpoint, a.out, name=a.name, allow_missing=a.allow_missing, command=command,
                    form=a.form or "fast", labels=a.labels, embedding_only=a.embedding_only,
                    norm_scheme=a.norm_scheme, precision=a.precision)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
