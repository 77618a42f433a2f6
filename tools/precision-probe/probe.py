"""Issue 18 point 5: is int8 a usable precision lever? Measured, nothing built.

Runs onnxruntime only (no cellstream): what int8 costs in agreement with f32, and what
onnxruntime's own int8 gains in speed on this CPU.

  .venv-train/bin/python tools/precision-probe/probe.py            # both parts, ~3 min, 2 cores
  .venv-train/bin/python tools/precision-probe/probe.py --skip-speed

1. Fake quantisation (quantise, then dequantise to f32, so only the rounding is measured) of
   every MatMul/Gemm whose second input is a weight: weights symmetric int8 per output
   column; optionally the activation entering each such product symmetric per row (per
   token), 8 bits, or 7 (what AVX2's vpmaddubsw needs to never saturate). Agreement with
   the f32 model: embedding cosine on random tokens of the whole-human-shaped package
   (bench-data/whole_human.sh), and on the shipped compact model, cosine and identical
   labels on the held-out pbmc3k and pbmc68k_reduced cells (the issue's acceptance rule:
   cosine >= 0.999, identical labels).
2. onnxruntime's quantize_dynamic (int8 weights per channel, u8 activations per tensor, the
   usual recipe) on the whole-human-shaped package: speed against its f32 at 1 thread, and
   its cosine.
Needs numpy, onnx, onnxruntime (models/train/requirements.txt).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "models/train"))
WHOLE = REPO / "bench-data/generated/scgpt-whole-human/model.onnx"
COMPACT = REPO / "models/pbmc-compact"


def fake_quant(src: Path, dst: Path, act_bits):
    """Weights int8 per output column; activations per row at act_bits (None: f32)."""
    m = onnx.load(str(src))
    init = {i.name: i for i in m.graph.initializer}
    nodes, k = [], 0
    if act_bits:
        qmax = float(2 ** (act_bits - 1) - 1)
        m.graph.initializer.extend([
            numpy_helper.from_array(np.array(qmax, np.float32), "pq_qmax"),
            numpy_helper.from_array(np.array(-qmax, np.float32), "pq_qmin"),
            numpy_helper.from_array(np.array(1e-30, np.float32), "pq_eps"),
            numpy_helper.from_array(np.array([-1], np.int64), "pq_axis")])
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in init:
            w = numpy_helper.to_array(init[n.input[1]]).astype(np.float32)
            trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            axis = 1 if trans_b else 0  # reduce over K, one scale per output column
            s = np.abs(w).max(axis=axis, keepdims=True) / 127.0
            s[s == 0] = 1
            q = (np.clip(np.round(w / s), -127, 127) * s).astype(np.float32)
            init[n.input[1]].CopyFrom(numpy_helper.from_array(q, n.input[1]))
            if act_bits:
                a, p = n.input[0], f"pq{k}_"
                nodes += [helper.make_node("Abs", [a], [p + "abs"]),
                          helper.make_node("ReduceMax", [p + "abs", "pq_axis"], [p + "max"], keepdims=1),
                          helper.make_node("Div", [p + "max", "pq_qmax"], [p + "s0"]),
                          helper.make_node("Max", [p + "s0", "pq_eps"], [p + "s"]),
                          helper.make_node("Div", [a, p + "s"], [p + "x"]),
                          helper.make_node("Round", [p + "x"], [p + "r"]),
                          helper.make_node("Clip", [p + "r", "pq_qmin", "pq_qmax"], [p + "c"]),
                          helper.make_node("Mul", [p + "c", p + "s"], [p + "q"])]
                n.input[0] = p + "q"
            k += 1
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))
    return k


def session(path, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def random_tokens(rng, n, s, vocab, cls_id):
    ids = rng.integers(0, vocab, (n, s)).astype(np.int64)
    ids[:, 0] = cls_id
    vals = rng.integers(1, 51, (n, s)).astype(np.float32)
    vals[:, 0] = -2
    return {"gene_ids": ids, "values": vals}


def whole_human_agreement(tmp):
    vocab = json.loads((WHOLE.parent / "vocab.json").read_text())
    cls_id, genes = vocab["<cls>"], vocab["<pad>"]  # genes are ids 0..<pad>
    rng = np.random.default_rng(0)
    f32 = session(WHOLE, 2)
    feeds = [random_tokens(rng, 8, 256, genes, cls_id), random_tokens(rng, 2, 1024, genes, cls_id)]
    ref = [f32.run(["cell_embedding"], f)[0] for f in feeds]
    for bits in (None, 8, 7):
        dst = tmp / f"wh_{bits}.onnx"
        n = fake_quant(WHOLE, dst, bits)
        s = session(dst, 2)
        cs = [cosine(r, s.run(["cell_embedding"], f)[0]) for r, f in zip(ref, feeds)]
        print(f"whole-human, {n} products, weights int8/col, activations "
              f"{'f32' if bits is None else f'int{bits}/row'}: cosine S=256 min {cs[0].min():.6f}, "
              f"S=1024 min {cs[1].min():.6f}", flush=True)


def compact_agreement(tmp):
    from common import DATA_3K, DATA_68K, TRAIN_DIR, Dataset10x
    from evaluate import Package
    pkg = Package(COMPACT)
    sets = []
    ds = Dataset10x(DATA_3K)
    held = set((TRAIN_DIR / "heldout_barcodes.txt").read_text().split())
    rows = [i for i, b in enumerate(ds.barcodes) if b in held]
    sets.append(("pbmc3k held-out", ds.X[rows], [ds.barcodes[i] for i in rows], ds.symbols))
    d68 = Dataset10x(DATA_68K)
    sets.append(("pbmc68k_reduced", d68.X, d68.barcodes, d68.symbols))
    base = {name: pkg.run(X, b, s) for name, X, b, s in sets}
    for bits in (None, 8, 7):
        dst = tmp / f"compact_{bits}.onnx"
        n = fake_quant(COMPACT / "model.onnx", dst, bits)
        pkg.sess = session(dst, 1)
        for name, X, b, s in sets:
            _, e0, l0 = base[name]
            _, e1, l1 = pkg.run(X, b, s)
            c = cosine(e0, e1)
            same = (l0.argmax(1) == l1.argmax(1)).mean()
            print(f"compact, {n} products, activations {'f32' if bits is None else f'int{bits}/row'}, "
                  f"{name} ({len(b)} cells): cosine min {c.min():.6f} median {np.median(c):.6f}, "
                  f"same label {same:.4f}", flush=True)


def ort_int8_speed(tmp):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    dst = tmp / "wh_ort_int8.onnx"
    quantize_dynamic(str(WHOLE), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    vocab = json.loads((WHOLE.parent / "vocab.json").read_text())
    rng = np.random.default_rng(1)
    for s_len in (256, 1024):
        feed = random_tokens(rng, max(1, 4096 // s_len), s_len, vocab["<pad>"], vocab["<cls>"])
        res = {}
        for name, path in (("f32", WHOLE), ("int8", dst)):
            s = session(path, 1)
            s.run(None, feed)
            best = min(timed(s, feed) for _ in range(3))
            res[name] = (best, s.run(["cell_embedding"], feed)[0])
        n = feed["gene_ids"].shape[0]
        print(f"onnxruntime quantize_dynamic, whole-human, S={s_len}, 1 thread: f32 "
              f"{n / res['f32'][0]:.2f} cells/s, int8 {n / res['int8'][0]:.2f} cells/s "
              f"({res['f32'][0] / res['int8'][0]:.2f}x); cosine min "
              f"{cosine(res['f32'][1], res['int8'][1]).min():.4f}", flush=True)


def timed(s, feed):
    t0 = time.perf_counter()
    s.run(None, feed)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        compact_agreement(tmp)
        if not WHOLE.exists():
            print(f"{WHOLE} missing: run bench-data/whole_human.sh for the whole-human parts")
            return
        whole_human_agreement(tmp)
        if not args.skip_speed:
            ort_int8_speed(tmp)


if __name__ == "__main__":
    main()
