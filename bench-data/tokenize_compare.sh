#!/usr/bin/env bash
# cellstream tokenization vs scGPT's own Python tokenization (bench-data/scgpt_tokenize_peer.py),
# both on one core in the same run. Prints a markdown table of cells/s and the ratio to scGPT.
#   bench-data/tokenize_compare.sh             (SCGPT_FIXTURE=path.jsonl.gz also checks the peer)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bench
req=bench-data/requirements-peer.txt
[ -d "$venv" ] || python3 -m venv "$venv"
# scgpt without its dependencies (no torch/scanpy/anndata; the peer stubs them), the rest normally.
"$venv/bin/pip" install -q --no-deps $(grep -E '^scgpt==' "$req")
"$venv/bin/pip" install -q -r <(grep -vE '^(scgpt==|#)' "$req")

pin=()
command -v taskset >/dev/null && pin=(taskset -c "${BENCH_CORE:-0}")
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

cargo bench --bench tokenize --no-run                   # compile on all cores, unpinned
${pin[@]+"${pin[@]}"} cargo bench --bench tokenize | tee "$log/rust.txt"
${pin[@]+"${pin[@]}"} "$venv/bin/python" bench-data/scgpt_tokenize_peer.py \
    ${SCGPT_FIXTURE:+--check "$SCGPT_FIXTURE"} | tee "$log/peer.txt"

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }            # value of key=... on a line
peer=$(grep '^PEER scgpt_tokenize ' "$log/peer.txt")
peer_cps=$(field cells_per_s <<<"$peer")

echo
echo "## Tokenization throughput, one core ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
echo
echo "Machine: $(lscpu | grep 'Model name' | sed 's/.*: *//'), nproc $(nproc); pinned: ${pin[*]:-no}"
echo
echo "| benchmark | cells | median s | cells/s | vs scGPT |"
echo "| --- | ---: | ---: | ---: | ---: |"
{ grep '^RESULT tokenize/' "$log/rust.txt" || echo 'no RESULT lines from cargo bench' >&2; } | while read -r line; do
    name=$(sed 's/^RESULT \([^ ]*\).*/\1/' <<<"$line")
    cps=$(field cells_per_s <<<"$line")
    ratio=$(awk -v a="$cps" -v b="$peer_cps" 'BEGIN { printf "%.1fx", a / b }')
    echo "| $name | $(field cells <<<"$line") | $(field median_s <<<"$line") | $cps | $ratio |"
done
echo "| scGPT 0.2.4 Python (binning + sample/pad) | $(field cells <<<"$peer") | $(field median_s <<<"$peer") | $peer_cps | 1.0x |"
