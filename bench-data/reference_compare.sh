#!/usr/bin/env bash
# Reference mapping at atlas sizes: cellstream's exact kNN (`cargo bench --bench reference`:
# cells one at a time as before, and batched as `embed`/`serve` map them) against faiss's exact
# search (`IndexFlatIP`, what scGPT's reference-mapping tutorial uses) on the same reference
# and query cells, in one run; then the search graph (`--index hnsw`) against the exact scan and
# faiss's HNSW and the `hnsw_rs` crate (`tools/ann-peer`) on the same cells. Prints markdown
# tables of ratios.
#   bench-data/reference_compare.sh     (CELLSTREAM_BENCH_REF=CELLSxDIM,... and
#                                        CELLSTREAM_BENCH_GRAPH=CELLSxDIM,... for other sizes)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bench
[ -d "$venv" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r <(grep -E '^(numpy|faiss-cpu)==' bench-data/requirements-peer.txt)

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
cargo bench --bench reference --no-run
CELLSTREAM_BENCH_REF_DUMP="$log/refs" cargo bench --bench reference | tee "$log/rust.txt"
"$venv/bin/python" bench-data/reference_peer.py "$log"/refs/* | tee "$log/peer.txt"
cargo build --release --manifest-path tools/ann-peer/Cargo.toml
for dir in "$log"/refs/graph-*; do
    if [ -d "$dir" ]; then tools/ann-peer/target/release/ann-peer "$dir"; fi
done | tee "$log/crate.txt"

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
echo
echo "## Reference mapping, cellstream vs faiss ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
echo
echo "Machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), nproc $(nproc)"
echo
echo "| reference cells | width | build (s) | one at a time, cells/s | batched, cells/s | batched / one at a time | faiss 1 thread, cells/s | batched / faiss 1 thread | faiss 2 threads, cells/s |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
{ grep '^RESULT reference/batch ' "$log/rust.txt" || true; } | while read -r line; do
    n=$(field cells <<<"$line"); d=$(field dim <<<"$line")
    key="cells=$n dim=$d "
    b=$(grep "^RESULT reference/build $key" "$log/rust.txt" | field seconds)
    one=$(grep "^RESULT reference/one-at-a-time $key" "$log/rust.txt" | field cells_per_s)
    many=$(field cells_per_s <<<"$line")
    f1=$(grep "^PEER reference/faiss $key.*threads=1 " "$log/peer.txt" | field cells_per_s || true)
    f2=$(grep "^PEER reference/faiss $key.*threads=2 " "$log/peer.txt" | field cells_per_s || true)
    r=$(awk -v a="$many" -v b="$f1" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    echo "| $n | $d | $b | $one | $many | $(field ratio <<<"$line")x | ${f1:--} | $r | ${f2:--} |"
done

echo
echo "| reference cells | width | graph build (s) | graph, cells/s | exact batched, cells/s | graph / exact | recall of the exact 10 | same label and assigned | faiss HNSW build (s) | faiss HNSW 1 thread, cells/s | graph / faiss HNSW 1 thread | faiss HNSW recall | hnsw_rs build (s) | hnsw_rs 1 thread, cells/s | graph / hnsw_rs | hnsw_rs recall |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
{ grep '^RESULT reference/graph ' "$log/rust.txt" || true; } | while read -r line; do
    n=$(field cells <<<"$line"); d=$(field dim <<<"$line")
    key="cells=$n dim=$d "
    b=$(grep "^RESULT reference/graph-build $key" "$log/rust.txt" | field seconds)
    g=$(field cells_per_s <<<"$line"); e=$(field exact_cells_per_s <<<"$line")
    rec=$(grep "^RESULT reference/graph-recall $key" "$log/rust.txt" | field recall_at_k)
    same=$(grep "^RESULT reference/graph-agreement $key" "$log/rust.txt" | field same_label_and_assigned)
    peer=$(grep "^PEER reference/faiss-hnsw $key" "$log/peer.txt" || true)
    fb=$(field build_s <<<"$peer"); f1=$(field cells_per_s_1 <<<"$peer"); fr=$(field recall_at_k <<<"$peer")
    r=$(awk -v a="$g" -v b="$f1" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    crate=$(grep "^PEER reference/hnsw_rs $key" "$log/crate.txt" || true)
    cb=$(field build_s <<<"$crate"); c1=$(field cells_per_s_1 <<<"$crate"); cr=$(field recall_at_k <<<"$crate")
    rc=$(awk -v a="$g" -v b="$c1" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    echo "| $n | $d | $b | $g | $e | $(field ratio <<<"$line")x | $rec | $same | ${fb:--} | ${f1:--} | $r | ${fr:--} | ${cb:--} | ${c1:--} | $rc | ${cr:--} |"
done
