#!/usr/bin/env bash
# tract vs onnxruntime on the same ONNX file and the same padded tensors, 1 and 2 threads, in
# one run; plus cellstream's end-to-end `embed` on pbmc3k. Prints a markdown table of ratios.
#   bench-data/model_compare.sh          (CELLSTREAM_MODEL=DIR for another model package)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bench
[ -d "$venv" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r <(grep -E '^(numpy|onnxruntime)==' bench-data/requirements-peer.txt)

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
cargo bench --bench model --no-run
cargo bench --bench model | tee "$log/rust.txt"
"$venv/bin/python" bench-data/ort_forward_peer.py | tee "$log/peer.txt"

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
echo
echo "## Model forward, tract vs onnxruntime ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
echo
echo "Machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), nproc $(nproc)"
echo
grep '^fusion ' "$log/rust.txt" || true
echo
echo "| bucket | threads | tract cells/s | onnxruntime cells/s | tract / ort | tract's own ops and kernels (unfused) cells/s | unfused / ort |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
grep '^RESULT forward/tract/' "$log/rust.txt" | while read -r line; do
    key=$(sed 's/^RESULT forward\/tract\/\([^ ]*\).*/\1/' <<<"$line")
    peer=$(grep "^PEER forward/ort/$key " "$log/peer.txt" || true)
    t=$(field cells_per_s <<<"$line"); o=$(field cells_per_s <<<"$peer")
    ratio=$(awk -v a="$t" -v b="$o" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
    u=$(grep "^RESULT forward/unfused/$key " "$log/rust.txt" | field cells_per_s || true)
    uratio=$(awk -v a="$u" -v b="$o" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else print "-" }')
    echo "| ${key%%/*} | ${key##*/t} | $t | ${o:--} | $ratio | ${u:--} | $uratio |"
done
echo
grep '^RESULT embed/' "$log/rust.txt" | sed 's/^RESULT /end to end: /' || true   # none under CELLSTREAM_BENCH_SKIP=embed
