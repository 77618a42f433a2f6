#!/usr/bin/env bash
# MTX reading speed and peak memory of one or more cellstream binaries, in the same run:
# `cellstream inspect DIR` (reads the whole batch, then a few figures) on each input, the
# binaries taking turns, best of RUNS; MB/s is the batch's text (decompressed members
# together) over the wall time. Inputs: bench-data/pbmc3k and the generated MTX directories
# given (e.g. `target/release/examples/resample --cells 21000 --batch-cells 21000
# --min-depth 1 --format mtx --out DIR`, as BENCHMARKS.md says).
#
#   bench-data/mtx_read.sh "BIN..." [RUNS] [DIR...]
#   e.g. bench-data/mtx_read.sh "/tmp/cellstream-before target/release/cellstream" 5 /tmp/pbmc21k
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a bins <<< "$1"
runs="${2:-5}"
shift $(( $# < 2 ? $# : 2 ))
dirs=(bench-data/pbmc3k "$@")
for d in "${dirs[@]}"; do
    bytes=$(for m in "$d"/*; do case "$m" in *.gz) zcat "$m" ;; *.tsv|*.mtx) cat "$m" ;; esac; done | wc -c)
    declare -A best=() peak=()
    for _ in $(seq "$runs"); do
        for b in "${bins[@]}"; do
            read -r secs kib < <( { /usr/bin/time -f "%e %M" "$b" inspect "$d" > /dev/null; } 2>&1 | tail -1)
            if [ -z "${best[$b]:-}" ] || (( $(echo "$secs < ${best[$b]}" | bc) )); then best[$b]=$secs; fi
            peak[$b]=$kib
        done
    done
    for b in "${bins[@]}"; do
        mbs=$(echo "scale=1; $bytes / 1000000 / ${best[$b]}" | bc)
        echo "RESULT mtx_read input=$(basename "$d") text_mb=$(( bytes / 1000000 )) bin=$b seconds=${best[$b]} mb_per_s=$mbs peak_rss_mib=$(( ${peak[$b]} / 1024 ))"
    done
    unset best peak
done
