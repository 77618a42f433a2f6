#!/usr/bin/env python3
"""Re-export the weights of a training run (models/train/checkpoint.pt, written by train.py)
into models/pbmc-compact/model.onnx without retraining, and refresh the manifest's sha256.

    OMP_NUM_THREADS=1 .venv-train/bin/python models/train/reexport.py [--opset 23]

train.py exports the same way at the end of training; this exists so the ONNX form can change
(e.g. opset 18 -> 23) while the weights, scores and threshold stay exactly those of the run.
"""
import argparse
import re

import numpy as np
import torch

from common import PACKAGE, TRAIN_DIR, build_model, sha256_file
from train import export_onnx, log


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opset", type=int, default=23)
    ap.add_argument("--checkpoint", default=str(TRAIN_DIR / "checkpoint.pt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = torch.load(args.checkpoint, weights_only=False)
    a, vocab = ck["args"], ck["vocab"]
    pad_id = vocab["<pad>"]
    n_cls = ck["state_dict"]["cls_decoder.out_layer.weight"].shape[0]
    model = build_model(len(vocab), pad_id, n_cls, a["d_model"], a["nhead"], a["d_hid"], a["nlayers"], 0.0)
    model.load_state_dict(ck["state_dict"])
    model.eval()
    onnx_path = PACKAGE / "model.onnx"
    export_onnx(model, onnx_path, pad_id, args.opset)

    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cls_id, genes = vocab["<cls>"], len(vocab) - 3
    for n, s in ((1, 1), (1, 7), (5, 256), (3, 100), (8, 33)):
        ids = np.full((n, s), pad_id, dtype=np.int64)
        vals = np.full((n, s), -2.0, dtype=np.float32)
        for r in range(n):
            k = int(rng.integers(1, s + 1))
            ids[r, 0] = cls_id
            ids[r, 1:k] = rng.choice(genes, k - 1, replace=False)
            vals[r, 1:k] = rng.integers(1, 51, k - 1)
        e, l = sess.run(["cell_embedding", "logits"], {"gene_ids": ids, "values": vals})
        with torch.no_grad():
            te, tl = model(torch.from_numpy(ids), torch.from_numpy(vals))
        de, dl = np.abs(e - te.numpy()).max(), np.abs(l - tl.numpy()).max()
        log(f"ort vs torch at N={n} S={s}: max|d emb|={de:.2e} max|d logits|={dl:.2e}")
        assert de < 1e-4 and dl < 1e-4, "exported graph disagrees with torch"
    manifest = PACKAGE / "manifest.toml"
    text = re.sub(r'onnx_sha256 = "[0-9a-f]*"', f'onnx_sha256 = "{sha256_file(onnx_path)}"',
                  manifest.read_text())
    manifest.write_text(text)
    log(f"wrote {onnx_path} (opset {args.opset}, {onnx_path.stat().st_size} bytes) and its sha256")


if __name__ == "__main__":
    main()
