#!/usr/bin/env bash
# Label / embedding stability across 8 tokenizer seeds (issue 19): bench-data/stability.py.
#
#   bench-data/stability.sh                      # onnxruntime: seeded and expected tokenization
#   bench-data/stability.sh target/release/cellstream [MODEL_DIR]   # the Rust tokenizer/runtime
#
# Python: $PYTHON, default .venv-train/bin/python (models/train/README.md); the binary mode needs
# only numpy and scipy. JSON figures go to bench-data/generated/stability-*.json (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv-train/bin/python}
export OMP_NUM_THREADS=1
mkdir -p bench-data/generated
if [[ $# -ge 1 ]]; then
    model=${2:-models/pbmc-compact}
    "$PY" bench-data/stability.py --cellstream "$1" --model "$model" \
        --out bench-data/generated/stability-cellstream.json
else
    for ties in seeded expected; do
        "$PY" bench-data/stability.py --ties "$ties" --out "bench-data/generated/stability-$ties.json"
    done
fi
