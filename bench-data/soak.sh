#!/usr/bin/env bash
# The soak of docs/robustness.md ("Bounded memory"): the real daemon for SECONDS (default an
# hour) at about 90% of the load it can carry (measured first on this machine), fed good
# batches (.csb, .csb.zst, MTX directories, uploads), the malformed corpus of
# tests/integration/serve_corpus.rs, uploads cut off mid-body, stream clients that connect
# and drop (one too slow to keep up), and a SIGHUP reload every 4 s; its resident memory,
# open descriptors and threads are sampled every SECONDS/60 s (at least 1, at most 5).
#
# Passes when nothing is lost (every good batch's output equals `cellstream embed`'s, every
# malformed one has its report, no partial upload or output is left) and nothing drifts:
# resident memory (median over a sixth of the run) grows by at most 5% (or 2 MiB) between the
# sixth after the first (ten minutes of an hour) and the last, and the open descriptors and
# threads left after 11 s of quiet (longer than tokio keeps an idle blocking thread) are no more
# than under load at the start. The same test, a minute long, runs in `cargo test`
# (tests/integration/soak.rs).
#
#   bench-data/soak.sh [SECONDS] [REPORT_DIR]
#   (defaults: 3600 s, target/soak-<date>); prints the summary, keeps samples.csv there.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3600}"
report="${2:-target/soak-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$report"
report=$(cd "$report" && pwd)
echo "soak: $secs s; report in $report" >&2
CELLSTREAM_SOAK_SECONDS="$secs" CELLSTREAM_SOAK_REPORT="$report" \
    cargo test --release --test integration soak:: -- --nocapture --test-threads 1 2>&1 |
    grep -v '^  daemon|' | tee "$report/test.log" | grep -E '^soak|^test |panicked|assert' || true
grep -q "test result: ok" "$report/test.log"
