#!/usr/bin/env bash
# Every comparison of issue 5 in one run, on the same cells and the same thread budget, with a
# table of ratios at the end. Python peers live in the throwaway venv .venv-bench (pinned:
# bench-data/requirements-peer.txt); nothing of it is needed by CI or the daemon.
#
#   bench-data/compare.sh    (WHOLE_HUMAN=0 leaves out the whole-human-shaped model's rows;
#                             CELLS=100000 generated cells, REPEAT=3 runs per row, GEN_REPEAT runs
#                             of the CELLS row: ~14 min each on 2 vCPUs, default REPEAT)
#
# Rows: tokenization vs scGPT (one core); model forward tract vs onnxruntime by length bucket
# (1 and 2 threads); end to end `cellstream embed` vs (a) the Python scGPT-tokenize + onnxruntime
# pipeline on pbmc3k and on CELLS resampled cells and (b) scGPT's embed_data path with torch on
# pbmc3k and TORCH_FILES generated batches (2 threads; torch peer venv: TORCH_VENV, default
# .venv-torch-peer from bench-data/requirements-torch-peer.txt); the forward pass's GFLOP/s
# against numpy's sgemm peak; `serve` vs `embed`, latency and RSS. Takes ~30 min for 100k.
set -euo pipefail
cd "$(dirname "$0")/.."
cells="${CELLS:-100000}" repeat="${REPEAT:-3}" gen_repeat="${GEN_REPEAT:-${REPEAT:-3}}" threads=2

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
# What an AVX2-only CPU gets: our ops' AVX2 kernels and tract's matmuls held to AVX2+FMA
# (CELLSTREAM_SIMD=avx2), against tract's own ops in the same mode and onnxruntime (AVX-512).
if grep -q avx512f /proc/cpuinfo; then
    echo "== model forward, AVX2 kernels forced"
    CELLSTREAM_SIMD=avx2 CELLSTREAM_BENCH_SKIP=embed bench-data/model_compare.sh | tee "$log/model-avx2.txt"
fi

echo "== end to end, $threads threads"
e2e() { # name, peers (ort,torch), files...: "cells seconds" per run into $log/e2e-<name>-<side>.txt
    local name=$1 peers=$2; shift 2
    local cells_secs='s/.* cells=\([0-9]*\) seconds=\([0-9.]*\).*/\1 \2/p'
    : > "$log/e2e-$name-rust.txt"
    for p in ${peers//,/ }; do : > "$log/e2e-$name-$p.txt"; done
    for _ in $(seq "$repeat"); do
        $bin embed "$@" --threads $threads --out "$out/e2e.ndjson" 2>&1 | tail -1 |
            sed -n 's/.*embedded \([0-9]*\) cells.* in \([0-9.]*\) s.*/\1 \2/p' >> "$log/e2e-$name-rust.txt"
        if [[ $peers == *ort* ]]; then
            "$venv/bin/python" bench-data/e2e_ort_peer.py "$@" --name "$name" --threads $threads |
                grep '^PEER' | sed -n "$cells_secs" >> "$log/e2e-$name-ort.txt"
        fi
        if [[ $peers == *torch* ]]; then
            "$torch_venv/bin/python" bench-data/scgpt_embed_peer.py "$@" --name "$name" --threads $threads |
                grep '^PEER' | sed -n "$cells_secs" >> "$log/e2e-$name-torch.txt"
        fi
    done
}
# Peer (b), scGPT's embed_data with torch, is ~1.5x slower than peer (a): it runs on pbmc3k and
# on the first TORCH_FILES generated batches (5,000 cells each), cellstream on the same files.
torch_venv="${TORCH_VENV:-.venv-torch-peer}" torch_files="${TORCH_FILES:-2}"
if [ ! -x "$torch_venv/bin/python" ]; then
    treq=bench-data/requirements-torch-peer.txt
    python3 -m venv "$torch_venv"
    "$torch_venv/bin/pip" install -q --no-deps $(grep -E '^scgpt==' "$treq")
    "$torch_venv/bin/pip" install -q -r <(grep -vE '^(scgpt==|#)' "$treq")
fi
e2e pbmc3k ort,torch "$out/pbmc3k.csb"
repeat=$gen_repeat e2e "generated-$cells" ort "$gen"/*.csb
mapfile -t first < <(printf '%s\n' "$gen"/*.csb | head -n "$torch_files")
e2e "generated-first-$((torch_files * 5000))" torch "${first[@]}"

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
if [ -f "$log/model-avx2.txt" ]; then
    grep -E '^\| S[0-9]+ \| 1 \|' "$log/model-avx2.txt" |
        awk -F'|' '{gsub(/ /, "", $4); gsub(/ /, "", $7); printf "| forward%s, AVX2 forced, one thread, cells/s (vs tract'"'"'s own ops, AVX2) | %s | %s | %.2fx |\n", $2, $4, $7, $4 / $7}'
    grep -E '^\| S[0-9]+ \|' "$log/model-avx2.txt" |
        awk -F'|' '{printf "| forward%s, AVX2 forced, %s thread(s), cells/s (vs onnxruntime, AVX-512) | %s | %s | %s |\n", $2, $3, $4, $5, $6}'
fi
for f in "$log"/e2e-*-ort.txt "$log"/e2e-*-torch.txt; do
    side=${f##*-}; side=${side%.txt}; name=${f#"$log/e2e-"}; name=${name%-*}
    peer="Python scGPT tokenization + onnxruntime"
    [ "$side" = torch ] && peer="scGPT embed_data path, torch on CPU"
    r=$(awk '{print $1 / $2}' "$log/e2e-$name-rust.txt" | stats)
    p=$(awk '{print $1 / $2}' "$f" | stats)
    read -r _ rm _ <<<"$r"; read -r _ pm _ <<<"$p"
    echo "| end to end $name, $threads threads, cells/s min/median/max (vs $peer) | ${r// //} | ${p// //} | $(awk -v a="$rm" -v b="$pm" 'BEGIN {printf "%.2fx", a / b}') |"
done
echo "| forward S=256, one thread: GFLOP/s (vs numpy sgemm peak) | $(field gflops < <(grep ACHIEVED "$log/sgemm.txt")) | $(field gflops < <(grep PEAK "$log/sgemm.txt")) | $(field percent_of_peak < <(grep ACHIEVED "$log/sgemm.txt"))% |"
grep -E '^RESULT serve' "$log/serve.txt" | sed 's/^RESULT /| /; s/$/ | | | |/' || true

# Issue 18's rows on a model of scGPT whole-human's shape (generated, ~176 MB, not committed);
# WHOLE_HUMAN=0 leaves them out.
if [ "${WHOLE_HUMAN:-1}" = 1 ]; then
    echo
    PYTHON="${TORCH_VENV:-.venv-train}/bin/python" bench-data/whole_human_compare.sh
fi
