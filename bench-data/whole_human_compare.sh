#!/usr/bin/env bash
# Issue 18's comparisons on a model of scGPT whole-human's shape (embsize 512, 8 heads of 64,
# d_hid 512, 12 layers, 48,292 genes, max_len 1200; random weights: speed does not depend on
# them), each peer in the same run, same cells, same thread budget. Prints a table of ratios.
#
#   bench-data/whole_human_compare.sh     (REPEAT=2 runs per end-to-end row; ~25 min on 2 vCPUs,
#                                           most of it the torch peer; E2E=0: the forward rows
#                                           alone, ~7 min once the model exists)
#
# Rows: end to end on 200 pbmc3k T cells at max_len 1200, 2 threads: `cellstream embed` vs the
# Python scGPT-binning + onnxruntime pipeline (bench-data/e2e_ort_peer.py, same package) and vs
# scGPT's own embed_data path with torch (bench-data/scgpt_embed_peer.py, the checkpoint);
# cellstream's peak RSS (overall, and while embedding: after its plans are built) against the
# model file; the forward pass at S = 256, 512, 1024 at 1 and 2 threads vs onnxruntime on the
# same tensors, and its share of the numpy sgemm peak (executed FLOPs).
# Needs a Python with torch, onnx, onnxruntime, scipy and scgpt (models/train's .venv-train with
# tqdm and scgpt --no-deps, or PYTHON=...): makes the model with bench-data/whole_human.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv-train/bin/python}"
repeat="${REPEAT:-2}" threads=2
gen=bench-data/generated
pkg=$gen/scgpt-whole-human ckpt=$gen/scgpt-whole-human-ckpt
out=target/whole-human
log=$out/log
rm -rf "$log" && mkdir -p "$log"

EXPORT_PYTHON="$py" bench-data/whole_human.sh
cargo build --release --bin cellstream
bin=target/release/cellstream
e2e="${E2E:-1}"
if [ "$e2e" != 0 ]; then
    [ -d "$gen/pbmc-t200" ] || "$py" bench-data/t_cells.py "$gen/pbmc-t200" --cells 200
    $bin convert "$gen/pbmc-t200" "$out/t200.csb"
fi

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
stats() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[1], v[int((NR+1)/2)], v[NR]}'; }

[ "$e2e" = 0 ] && repeat=0
echo "== end to end, $threads threads, 200 T cells ($repeat runs)"
: > "$log/e2e-rust.txt"; : > "$log/e2e-ort.txt"; : > "$log/e2e-torch.txt"; : > "$log/rss.txt"
for _ in $(seq "$repeat"); do
    "$py" bench-data/peak_rss.py -- $bin embed "$out/t200.csb" --model "$pkg" --threads $threads \
        --out "$out/e2e.ndjson" 2> "$log/embed-stderr.txt" >> "$log/rss.txt"
    sed -n 's/.*embedded \([0-9]*\) cells.* in \([0-9.]*\) s.*/\1 \2/p' "$log/embed-stderr.txt" >> "$log/e2e-rust.txt"
    "$py" bench-data/e2e_ort_peer.py "$out/t200.csb" --model "$pkg" --name t200 --threads $threads |
        grep '^PEER' | sed -n 's/.* cells=\([0-9]*\) seconds=\([0-9.]*\).*/\1 \2/p' >> "$log/e2e-ort.txt"
    "$py" bench-data/scgpt_embed_peer.py "$out/t200.csb" --checkpoint "$ckpt" --name t200 --threads $threads |
        grep '^PEER' | sed -n 's/.* cells=\([0-9]*\) seconds=\([0-9.]*\).*/\1 \2/p' >> "$log/e2e-torch.txt"
done
cat "$log"/e2e-*.txt "$log/rss.txt"

echo "== model forward"
CELLSTREAM_MODEL="$pkg" CELLSTREAM_BENCH_BUCKETS=256,512,1024 CELLSTREAM_BENCH_CELLS=8 \
    CELLSTREAM_BENCH_REPEAT=3 CELLSTREAM_BENCH_SKIP=unfused,embed cargo bench --bench model |
    tee "$log/rust-forward.txt"
"$py" bench-data/ort_forward_peer.py --model "$pkg/model.onnx" | tee "$log/ort-forward.txt"
# The opt-in int8 products (`precision = "int8"`), on the same tensors.
CELLSTREAM_PRECISION=int8 CELLSTREAM_MODEL="$pkg" CELLSTREAM_BENCH_BUCKETS=256,512,1024 \
    CELLSTREAM_BENCH_CELLS=8 CELLSTREAM_BENCH_REPEAT=3 CELLSTREAM_BENCH_SKIP=unfused,embed \
    cargo bench --bench model | tee "$log/rust-forward-int8.txt"
: > "$log/sgemm.txt"
for s in 256 512 1024; do
    t1=$(grep "^RESULT forward/tract/S$s/t1 " "$log/rust-forward.txt" | field cells_per_s)
    "$py" bench-data/sgemm_peak.py --shape whole-human --s "$s" --tract-cells-per-s "$t1" |
        sed "s/^/S$s /" | tee -a "$log/sgemm.txt"
done

model_mib=$(du -m --apparent-size "$pkg/model.onnx" | cut -f1)
echo
echo "## Whole-human-shaped model ($(date -u +%Y-%m-%dT%H:%M:%SZ); $(lscpu | grep 'Model name' | sed 's/.*: *//'), nproc $(nproc))"
echo
echo "| comparison | cellstream | peer | ratio |"
echo "| --- | ---: | ---: | ---: |"
r=$(awk '{print $1 / $2}' "$log/e2e-rust.txt" | stats); read -r _ rm _ <<<"$r"
for side in ort torch; do
    [ "$e2e" = 0 ] && break
    peer="Python scGPT binning + onnxruntime"
    [ "$side" = torch ] && peer="scGPT embed_data, torch on CPU"
    p=$(awk '{print $1 / $2}' "$log/e2e-$side.txt" | stats); read -r _ pm _ <<<"$p"
    echo "| end to end, 200 T cells, $threads threads, cells/s min/median/max (vs $peer) | ${r// //} | ${p// //} | $(awk -v a="$rm" -v b="$pm" 'BEGIN {printf "%.2fx", a / b}') |"
done
for s in 256 512 1024; do
    for t in 1 2; do
        # From the median seconds: cells/s is printed to one decimal, too coarse at S=1024.
        a=$(grep "^RESULT forward/tract/S$s/t$t " "$log/rust-forward.txt" | field median_s)
        b=$(grep "^PEER forward/ort/S$s/t$t " "$log/ort-forward.txt" | field median_s)
        echo "| forward S=$s, $t thread(s), seconds per 8 cells (vs onnxruntime, same tensors) | $a | $b | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2fx", b / a}') |"
        a=$(grep "^RESULT forward/tract/S$s/t$t " "$log/rust-forward-int8.txt" | field median_s)
        echo "| forward S=$s, $t thread(s), int8 products (opt-in), seconds per 8 cells (vs onnxruntime f32) | $a | $b | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2fx", b / a}') |"
    done
    g=$(grep "^S$s ACHIEVED" "$log/sgemm.txt" | field gflops); pk=$(grep "^S$s PEAK" "$log/sgemm.txt" | field gflops)
    pc=$(grep "^S$s ACHIEVED" "$log/sgemm.txt" | field percent_of_peak)
    echo "| forward S=$s, one thread: GFLOP/s executed (vs numpy sgemm peak) | $g | $pk | $pc% |"
done
[ "$e2e" = 0 ] && exit 0
peak=$(field peak_mib < "$log/rss.txt" | sort -g | tail -1)
during=$(field peak_after_marker_mib < "$log/rss.txt" | sort -g | tail -1)
echo "| peak RSS while embedding, MiB (vs model file + 256 MiB) | $during | $((model_mib + 256)) | $(awk -v a="$during" -v b="$((model_mib + 256))" 'BEGIN {printf "%.2fx", a / b}') |"
echo "| peak RSS including the model's load, MiB (vs model file + 256 MiB) | $peak | $((model_mib + 256)) | $(awk -v a="$peak" -v b="$((model_mib + 256))" 'BEGIN {printf "%.2fx", a / b}') |"
