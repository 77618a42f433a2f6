#!/usr/bin/env python3
"""Light checks of export_scgpt.py's args.json handling: every refused variant is refused with
`args.json <key> = <value>: ...` (or the checkpoint key that shows it), the exported variants
export and verify, labels files parse, and scGPT's pre-norm layer is not torch's norm_first=True.

    OMP_NUM_THREADS=1 python tools/export-scgpt/check_export.py      # ~1 min, one thread

Tiny random checkpoints (100 genes, embsize 32, 4 heads, 2 layers) in a temporary directory;
nothing is written elsewhere. Exit status 1 on the first failed check.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_scgpt as E  # noqa: E402

BASE_ARGS = {"embsize": 32, "nheads": 4, "d_hid": 16, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2,
             "pad_token": "<pad>", "pad_value": -2, "n_bins": 51, "max_seq_len": 64,
             "input_emb_style": "continuous", "fast_transformer": True}
N_GENES = 100  # verify() draws sequences of up to 70 distinct genes


def make_ckpt(root, name, args=None, scheme="post", n_cls=1, names="Wqkv", extra=None, drop=()):
    """A random checkpoint directory built with scGPT's TransformerModel."""
    model_mod, _ = E.load_scgpt_model_module()
    a = dict(BASE_ARGS, **(args or {}))
    vocab = {f"G{i}": i for i in range(N_GENES)}
    full = dict(vocab, **{s: N_GENES + i for i, s in enumerate(E.SPECIALS)})
    torch.manual_seed(1)
    model = E.build_model(model_mod, BASE_ARGS, full, scheme, n_cls=n_cls)
    E.randomise_weights(model)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(drop)}
    if names == "Wqkv":
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    else:
        state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}
    state.update(extra or {})
    d = Path(root) / name
    d.mkdir()
    torch.save(state, d / "best_model.pt")
    (d / "args.json").write_text(json.dumps(a))
    (d / "vocab.json").write_text(json.dumps(vocab))
    return d


def convert(ckpt, out, **kw):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return E.convert(ckpt, out, command="check_export.py", **kw)


failures = []


def check(what, cond, detail=""):
    print(f"{'ok  ' if cond else 'FAIL'} {what}{': ' + detail if detail and not cond else ''}", flush=True)
    if not cond:
        failures.append(what)


def refused(root, what, expect, **ck):
    conv = ck.pop("convert_kw", {})
    ckpt = make_ckpt(root, f"r{len(os.listdir(root))}", **ck)
    try:
        convert(ckpt, Path(root) / f"out-{ckpt.name}", **conv)
    except E.ExportError as e:
        check(f"refused: {what}", expect in str(e), f"message {str(e)!r} lacks {expect!r}")
        return
    check(f"refused: {what}", False, "exported")


def main():
    with tempfile.TemporaryDirectory(prefix="check-export-") as root:
        # --- refused variants, each naming the key and value
        refused(root, "category value encoder", 'args.json input_emb_style = "category": ',
                args={"input_emb_style": "category"})
        refused(root, "scaling value encoder", 'args.json input_emb_style = "scaling": ',
                args={"input_emb_style": "scaling"})
        refused(root, "non-binned input", 'args.json input_style = "log1p": ', args={"input_style": "log1p"})
        refused(root, "avg-pool cell embedding", 'args.json cell_emb_style = "avg-pool": ',
                args={"cell_emb_style": "avg-pool"})
        refused(root, "multi-omic model", "args.json use_mod = true: ", args={"use_mod": True})
        refused(root, "DSBN", "args.json DSBN = true: ", args={"DSBN": True})
        refused(root, "domain_spec_batchnorm batchnorm", 'args.json domain_spec_batchnorm = "batchnorm": ',
                args={"domain_spec_batchnorm": "batchnorm"})
        refused(root, "DSBN weights without args", "checkpoint key dsbn.",
                extra={"dsbn.bns.0.running_mean": torch.zeros(32)})
        refused(root, "linear attention", 'args.json fast_transformer_backend = "linear": ',
                args={"fast_transformer_backend": "linear"})
        refused(root, "layer count", "args.json nlayers = 3: the checkpoint has 2 encoder layers",
                args={"nlayers": 3})
        refused(root, "embsize", "args.json embsize = 48: ", args={"embsize": 48, "nheads": 4})
        refused(root, "pre_norm with torch-named attention", "args.json pre_norm = true: ",
                args={"pre_norm": True}, names="in_proj_")
        refused(root, "fine-tuned without --labels", "pass --labels FILE with its 5 class names", n_cls=5)
        lab = Path(root) / "three.txt"
        lab.write_text("a\nb\nc\n")
        refused(root, "label count", "3 class names, but the classifier has 5 classes", n_cls=5,
                convert_kw={"labels": lab})
        refused(root, "--labels on a pretrained checkpoint", "--labels given, but the checkpoint has no trained",
                convert_kw={"labels": lab})
        refused(root, "missing encoder weight", "does not provide every weight",
                drop=("transformer_encoder.layers.1.linear1.",))

        # --- labels files
        cases = {"names.txt": ("x\ny\nz\n", ["x", "y", "z"]),
                 "list.json": ('["x", "y", "z"]', ["x", "y", "z"]),
                 "id2type.json": ('{"2": "z", "0": "x", "1": "y"}', ["x", "y", "z"]),
                 "type2id.json": ('{"z": 2, "x": 0, "y": 1}', ["x", "y", "z"])}
        for fname, (text, want) in cases.items():
            p = Path(root) / fname
            p.write_text(text)
            got, _ = E.read_labels(p)
            check(f"labels {fname}", got == want, f"{got}")
        for fname, text, expect in (("gap.txt", "x\n\ny\n", "empty or multi-line"),
                                    ("dup.txt", "x\nx\n", "duplicate"),
                                    ("ids.json", '{"0": "x", "2": "y"}', "not 0..1")):
            p = Path(root) / fname
            p.write_text(text)
            try:
                E.read_labels(p)
                check(f"labels {fname} refused", False, "accepted")
            except E.ExportError as e:
                check(f"labels {fname} refused", expect in str(e), str(e))

        # --- exported variants
        ck = make_ckpt(root, "prenorm-torch-layers", args={"pre_norm": True, "fast_transformer": False},
                       names="in_proj_")
        res = convert(ck, Path(root) / "o1")
        check("pre_norm with fast_transformer false exports post-norm", res["plan"]["norm_scheme"] == "post")
        ck = make_ckpt(root, "prenorm-forced", args={"pre_norm": True}, scheme="pre", names="in_proj_")
        res = convert(ck, Path(root) / "o2", norm_scheme="pre", form="torch")
        check("--norm-scheme pre on in_proj_ names (torch form)", res["plan"]["norm_scheme"] == "pre")
        ck = make_ckpt(root, "batch-labels", args={"use_batch_labels": True, "DSBN": False},
                       extra={"batch_encoder.embedding.weight": torch.randn(3, 32)})
        res = convert(ck, Path(root) / "o3")
        check("use_batch_labels without DSBN exports", "batch_encoder.embedding.weight" in res["report"]["unexpected"])
        ck = make_ckpt(root, "finetuned", n_cls=3)
        res = convert(ck, Path(root) / "o4", labels=Path(root) / "type2id.json")
        out = Path(root) / "o4"
        man = (out / "manifest.toml").read_text()
        check("fine-tuned: logits output, labels.txt, no confidence_threshold",
              res["outputs"] == ("cell_embedding", "logits") and 'logits = "logits"' in man
              and "confidence_threshold =" not in man and (out / "labels.txt").read_text() == "x\ny\nz\n")
        res = convert(ck, Path(root) / "o5", embedding_only=True)
        check("fine-tuned with --embedding-only", res["outputs"] == ("cell_embedding",))

        # --- scGPT's pre-norm is not torch's norm_first=True (so that is not the reference)
        model_mod, _ = E.load_scgpt_model_module()
        vocab = {f"G{i}": i for i in range(N_GENES)}
        vocab.update({s: N_GENES + i for i, s in enumerate(E.SPECIALS)})
        torch.manual_seed(2)
        pre = E.build_model(model_mod, BASE_ARGS, vocab, "pre").eval()
        E.randomise_weights(pre)
        layer = pre.transformer_encoder.layers[0]
        ref = nn.TransformerEncoderLayer(32, 4, 16, 0.0, batch_first=True, norm_first=True).eval()
        sd = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in layer.state_dict().items()}
        ref.load_state_dict(sd)
        x = torch.randn(2, 7, 32)
        with torch.no_grad():
            ours = layer(x, src_key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
            scgpt_formula = layer.norm1(x)
            scgpt_formula = scgpt_formula + layer.self_attn(scgpt_formula)[0]
            h = layer.norm2(scgpt_formula)
            scgpt_formula = h + layer.linear2(torch.relu(layer.linear1(h)))
            nf = ref(x)
        check("FlashTransformerEncoderLayer('pre') = norm1; +SA; norm2; +FF",
              float((ours - scgpt_formula).abs().max()) < 1e-5)
        check("... and differs from nn.TransformerEncoderLayer(norm_first=True)",
              float((ours - nf).abs().max()) > 1e-2, f"{float((ours - nf).abs().max())}")
    print(f"{len(failures)} failed" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
