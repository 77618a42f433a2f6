#!/usr/bin/env bash
# Every comparison of issue 5 in one run, on the same cells and the same thread budget, with a
# table of ratios at the end. Python peers live in the throwaway venv .venv-bench (pinned:
# bench-data/requirements-peer.txt); nothing of it is needed by CI or the daemon.
#
#   bench-data/compare.sh                 (CELLS=100000 generated cells, REPEAT=3 runs per row)
#
# Rows: tokenization vs scGPT (one core); model forward tract vs onnxruntime by length bucket
# (1 and 2 threads); end to end `cellstream embed` vs the Python scGPT-tokenize + onnxruntime
# pipeline on pbmc3k and on CELLS resampled cells (2 threads); the forward pass's GFLOP/s
# against numpy's sgemm peak; `serve` vs `embed`, latency and RSS. Takes ~30 min for 100k.
set -euo pipefail
cd "$(dirname "$0")/.."
cells="${CELLS:-100000}" repeat="${REPEAT:-3}" threads=2

venv=.venv-bench
req=bench-data/requirements-peer.txt
[ -d "$venv" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --no-deps $(grep -E '^scgpt==' "$req")
"$venv/bin/pip" install -q -r <(grep -vE '^(scgpt==|#)' "$req")

out=target/compare
mkdir -p "$out"
log="$out/log"
rm -rf "$log" && mkdir -p "$log"
cargo build --release --bin cellstream --example resample
bin=target/release/cellstream
$bin convert bench-data/pbmc3k "$out/pbmc3k.csb"
gen="$out/generated-$cells"
[ -d "$gen" ] || target/release/examples/resample --cells "$cells" --out "$gen"

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
stats() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[1], v[int((NR+1)/2)], v[NR]}'; }

echo "== tokenization (one core)"
bench-data/tokenize_compare.sh | tee "$log/tokenize.txt"
echo "== model forward"
bench-data/model_compare.sh | tee "$log/model.txt"

echo "== end to end, $threads threads"
e2e() { # name, files...
    local name=$1; shift
    : > "$log/e2e-$name-rust.txt"; : > "$log/e2e-$name-peer.txt"
    for _ in $(seq "$repeat"); do
        $bin embed "$@" --threads $threads --out "$out/e2e.ndjson" 2>&1 | tail -1 |
            sed -n 's/.*embedded \([0-9]*\) cells.* in \([0-9.]*\) s.*/\1 \2/p' >> "$log/e2e-$name-rust.txt"
        "$venv/bin/python" bench-data/e2e_ort_peer.py "$@" --name "$name" --threads $threads |
            grep '^PEER' |
            sed -n 's/.* cells=\([0-9]*\) seconds=\([0-9.]*\).*/\1 \2/p' >> "$log/e2e-$name-peer.txt"
    done
}
e2e pbmc3k "$out/pbmc3k.csb"
e2e "generated-$cells" "$gen"/*.csb

echo "== sgemm peak"
t1=$(grep '| S256 | 1 |' "$log/model.txt" | awk -F'|' '{gsub(/ /, "", $4); print $4}')
"$venv/bin/python" bench-data/sgemm_peak.py --tract-cells-per-s "$t1" | tee "$log/sgemm.txt"

echo "== serve"
cargo bench --bench serve | tee "$log/serve.txt"

echo
echo "## Comparison ($(date -u +%Y-%m-%dT%H:%M:%SZ); $(lscpu | grep 'Model name' | sed 's/.*: *//'), nproc $(nproc))"
echo
echo "| comparison | cellstream | peer | ratio |"
echo "| --- | ---: | ---: | ---: |"
grep -E '^\| (tokenize/pbmc3k-seeded|scGPT) ' "$log/tokenize.txt" | paste -sd' ' |
    awk -F'|' '{printf "| tokenization pbmc3k, cells/s per core (vs scGPT binning) | %s | %s | %s |\n", $5, $11, $6}'
grep -E '^\| S[0-9]+ \|' "$log/model.txt" |
    awk -F'|' '{printf "| forward%s, %s thread(s), cells/s (vs onnxruntime) | %s | %s | %s |\n", $2, $3, $4, $5, $6}'
for name in pbmc3k "generated-$cells"; do
    r=$(awk '{print $1 / $2}' "$log/e2e-$name-rust.txt" | stats)
    p=$(awk '{print $1 / $2}' "$log/e2e-$name-peer.txt" | stats)
    read -r _ rm _ <<<"$r"; read -r _ pm _ <<<"$p"
    echo "| end to end $name, $threads threads, cells/s min/median/max (vs Python scGPT + onnxruntime) | ${r// //} | ${p// //} | $(awk -v a="$rm" -v b="$pm" 'BEGIN {printf "%.2fx", a / b}') |"
done
echo "| forward S=256, one thread: GFLOP/s (vs numpy sgemm peak) | $(field gflops < <(grep ACHIEVED "$log/sgemm.txt")) | $(field gflops < <(grep PEAK "$log/sgemm.txt")) | $(field percent_of_peak < <(grep ACHIEVED "$log/sgemm.txt"))% |"
grep -E '^RESULT serve' "$log/serve.txt" | sed 's/^RESULT /| /; s/$/ | | | |/' || true
