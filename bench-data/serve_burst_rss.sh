#!/usr/bin/env bash
# Peak RSS of a bare `cellstream serve` (two inference threads) when the six 500-cell pbmc3k
# batches of `cargo bench --bench serve` land in incoming/ at once: VmRSS once ready, and
# the kernel's high-water mark (VmHWM, start-up included) once all six are committed (Linux
# /proc). Extra environment (e.g.
# CELLSTREAM_TOKEN_TABLES=computed) passes through to the daemon.
#
#   cargo build --release && cargo bench --bench serve   # once: the binary and the batches
#   bench-data/serve_burst_rss.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/cellstream
batches=(target/serve-bench/pbmc3k-0{0..5}.csb)
[ -x "$bin" ] || { echo "no $bin: run cargo build --release" >&2; exit 1; }
for b in "${batches[@]}"; do
    [ -f "$b" ] || { echo "no $b: run cargo bench --bench serve once" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status() { awk -v k="$2:" '$1 == k { print int($2 / 1024) }' "/proc/$1/status"; }
for run in $(seq "${1:-3}"); do
    rm -rf "$work"/*
    printf '[spool]\ndir = "%s/spool"\nrescan_seconds = 1\n[output]\ndir = "%s/out"\n[http]\nlisten = "127.0.0.1:0"\n[pipeline]\nthreads = 2\n' \
        "$work" "$work" > "$work/config.toml"
    "$bin" serve --config "$work/config.toml" 2> "$work/log" &
    pid=$!
    until grep -q "ready" "$work/log"; do
        kill -0 "$pid" || { cat "$work/log" >&2; exit 1; }
        sleep 0.01
    done
    ready=$(status "$pid" VmRSS)
    for i in "${!batches[@]}"; do
        cp "${batches[$i]}" "$work/spool/incoming/.b$i.tmp"
        mv "$work/spool/incoming/.b$i.tmp" "$work/spool/incoming/b$i.csb"
    done
    start=$(date +%s.%N)
    while [ "$(ls "$work"/out/*.summary.json 2> /dev/null | wc -l)" -lt ${#batches[@]} ]; do
        sleep 0.005
    done
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    echo "RESULT serve_burst run=$run ready_rss_mib=$ready peak_rss_mib=$(status "$pid" VmHWM) seconds=$secs"
    kill "$pid"
    wait "$pid" 2> /dev/null || true
done
