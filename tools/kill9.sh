#!/usr/bin/env bash
# The kill -9 harness of tests/integration/serve.rs, many more times than CI's 10 rounds: SIGKILL the
# daemon at random moments while 20 batches flow, restart, repeat; then check that every
# batch's output exists once, complete, and equal to `cellstream embed` on the same input.
# Each run is 10 rounds on a fresh spool with its own seed, so that most kills land
# mid-batch.
#   tools/kill9.sh [ROUNDS] [FIRST_SEED]      (defaults: 100 rounds, seed 1)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-100}" seed="${2:-1}"
cargo test --release --test serve --no-run
runs=$(( (rounds + 9) / 10 ))
for ((i = 0; i < runs; i++)); do
    s=$((seed + i))
    echo "== run $((i + 1))/$runs, seed $s"
    CELLSTREAM_KILL_ROUNDS=10 CELLSTREAM_KILL_SEED=$s CELLSTREAM_KILL_CELLS=35 \
        cargo test -q --release --test serve kill_9 -- --nocapture 2>&1 |
        grep -E "^round|kills landed|test result|panicked|assert"
done
echo "kill9: $((runs * 10)) rounds passed"
