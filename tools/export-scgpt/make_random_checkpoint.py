#!/usr/bin/env python3
"""Write a random scGPT checkpoint directory of a real model's shape, for benchmarks.

    make_random_checkpoint.py OUT_DIR --shape whole-human [--seed 0]

OUT_DIR gets what scGPT's pretraining script (`examples/pretrain.py`) leaves and `embed_data`
reads: `best_model.pt` (a state dict), `args.json`, `vocab.json`. Speed does not depend on weight
values, so the weights are random; everything else is the real model's:

- `whole-human`: scGPT's whole-human model (embsize 512, 8 heads of width 64, d_hid 512, 12
  layers, n_layers_cls 3, dropout 0.2, `<pad>` / pad_value -2, n_bins 51, max_seq_len 1200,
  continuous value encoder on binned input); `vocab.json` = the 48,292 genes of
  tests/fixtures/scgpt_default_gene_vocab.json (ids 0..48291, no specials: the converter appends
  `<pad>`, `<cls>`, `<eoc>` as embed_data does). `args.json` has the keys pretrain.py writes
  (`vars(args)`), with the whole-human values; `best_model.pt` the parameters of scGPT 0.2.4's
  `TransformerModel` as pretraining builds it (MLM and MVC decoders, a 1-class cls_decoder),
  attention weights named `self_attn.Wqkv.*` as in the flash-attn-trained original.

Weights: scGPT's own init for the gene embedding, then every other matrix Xavier-uniform and every
bias U(-0.1, 0.1) (each layer its own values), LayerNorm weights 1 + 0.2·N(0,1) and biases
0.2·N(0,1); torch seed `--seed`. Deterministic: the same bytes on every run. ~200 MB.
Written to OUT_DIR.partial and renamed at the end, so an existing OUT_DIR is always complete.
"""
import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import export_scgpt as E  # noqa: E402

SHAPES = {
    "whole-human": {
        "vocab": "tests/fixtures/scgpt_default_gene_vocab.json",
        # examples/pretrain.py's argparse keys (it saves vars(args) as args.json), whole-human values
        "args": {
            "data_source": "random weights: tools/export-scgpt/make_random_checkpoint.py --shape whole-human",
            "save_dir": None, "load_model": None, "n_hvg": None, "valid_size_or_ratio": 0.003,
            "grad_accu_steps": 1, "pad_token": "<pad>", "input_style": "binned", "input_emb_style": "continuous",
            "n_bins": 51, "max_seq_len": 1200, "training_tasks": "both", "mask_ratio": [0.25, 0.5, 0.75],
            "trunc_by_sample": True, "vocab_path": None, "local_rank": -1, "batch_size": 32,
            "eval_batch_size": 64, "epochs": 6, "lr": 0.0001, "scheduler_interval": 100,
            "scheduler_factor": 0.99, "warmup_ratio_or_step": 10000.0, "no_cls": True, "no_cce": True,
            "fp16": True, "fast_transformer": True, "nlayers": 12, "nheads": 8, "embsize": 512, "d_hid": 512,
            "dropout": 0.2, "n_layers_cls": 3, "log_interval": 9000, "save_interval": 27000,
            "mask_value": -1, "pad_value": -2,
        },
    },
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="checkpoint directory to create (must not exist or be empty)")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"error: {a.out} exists and is not empty")
    t0 = time.perf_counter()
    shape = SHAPES[a.shape]
    args = dict(shape["args"])
    genes = json.loads((E.REPO / shape["vocab"]).read_text())
    if sorted(genes.values()) != list(range(len(genes))):
        sys.exit(f"error: {shape['vocab']}: ids are not 0..n-1")
    vocab = dict(sorted(genes.items(), key=lambda kv: kv[1]))
    full = dict(vocab)
    for s in E.SPECIALS:
        full[s] = len(full)

    model_mod, _ = E.load_scgpt_model_module()
    torch.manual_seed(a.seed)
    model = E.build_model(model_mod, args, full, "post")  # pretraining's model: n_cls 1, do_mvc
    E.randomise_weights(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v.contiguous()
             for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in state.values())

    tmp = a.out.with_name(a.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "best_model.pt")
    (tmp / "args.json").write_text(json.dumps(args, indent=2) + "\n")
    (tmp / "vocab.json").write_text(json.dumps(vocab, indent=2) + "\n")
    if a.out.exists():
        a.out.rmdir()
    tmp.rename(a.out)
    size = sum(p.stat().st_size for p in a.out.iterdir())
    print(f"{a.out}: {a.shape}, {len(vocab)} genes, {n_params} parameters in {len(state)} tensors, "
          f"{size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
