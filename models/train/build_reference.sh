#!/usr/bin/env bash
# The shipped package's reference folder, models/pbmc-compact/reference: the package's own
# training cells (pbmc3k without the held-out split in heldout_barcodes.txt) embedded by the
# package and labelled with their coarse cell type. Run it after every retraining: a
# reference is refused by any other model (its onnx sha256 is recorded).
#
#   models/train/build_reference.sh       (a few seconds; needs only the Rust toolchain)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p target
labels=target/pbmc-compact-training-labels.tsv
awk -F'\t' 'NR == FNR { held[$1] = 1; next } FNR == 1 || !($1 in held)' \
    models/train/heldout_barcodes.txt bench-data/pbmc3k/labels.tsv > "$labels"
cargo run --release -- reference bench-data/pbmc3k --labels "$labels" \
    --column cell_type_coarse --model models/pbmc-compact --out models/pbmc-compact/reference \
    --threads 2
