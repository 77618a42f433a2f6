#!/usr/bin/env bash
# The whole-human-shaped scGPT benchmark model of issue 18, generated (never committed: ~176 MB):
#
#   bench-data/generated/scgpt-whole-human-ckpt/   random checkpoint directory of scGPT's whole-human
#                                                  shape (tools/export-scgpt/make_random_checkpoint.py)
#   bench-data/generated/scgpt-whole-human/        its cellstream package, fast form (opset 23)
#   bench-data/generated/scgpt-whole-human-torch/  the same, torch form (opset 18, nn.TransformerEncoder)
#
#   bench-data/whole_human.sh        (skips what already exists; ~1.5 min and ~2.5 GB on 2 vCPUs)
#
# Needs a Python with torch, onnx, onnxruntime and scgpt (tools/export-scgpt/README.md, "Set-up"):
# EXPORT_PYTHON, else .venv-export/bin/python, else .venv-train/bin/python. One thread.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${EXPORT_PYTHON:-}"
if [ -z "$py" ]; then
    for v in .venv-export .venv-train; do
        if [ -x "$v/bin/python" ]; then py="$v/bin/python"; break; fi
    done
fi
if [ -z "$py" ]; then
    echo "no Python with torch: set EXPORT_PYTHON or create .venv-export (tools/export-scgpt/README.md)" >&2
    exit 1
fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

gen=bench-data/generated
ckpt=$gen/scgpt-whole-human-ckpt
mkdir -p "$gen"
if [ -f "$ckpt/best_model.pt" ]; then
    echo "$ckpt exists, skipped"
else
    "$py" tools/export-scgpt/make_random_checkpoint.py "$ckpt" --shape whole-human --seed 0
fi
for form in fast torch; do
    name=scgpt-whole-human
    [ "$form" = torch ] && name=scgpt-whole-human-torch
    out=$gen/$name
    if [ -f "$out/manifest.toml" ]; then
        echo "$out exists, skipped"
        continue
    fi
    rm -rf "$out"  # what an interrupted run left (the manifest is written last)
    "$py" tools/export-scgpt/export_scgpt.py "$ckpt" "$out" --name "$name" --form "$form"
done
