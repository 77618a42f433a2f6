#!/usr/bin/env bash
# Groups a target's crash artifacts by what AddressSanitizer says and where (its first frame
# in libhdf5 or in our reader), and says what a normal release build does with each input.
#   fuzz/triage.sh [TARGET]   (default h5; needs the fuzz build and target/release/cellstream,
#                              built with --features hdf5 for h5)
set -uo pipefail
cd "$(dirname "$0")/.."
t="${1:-h5}"
fuzzbin=fuzz/target/x86_64-unknown-linux-gnu/release/$t
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for a in fuzz/artifacts/"$t"/{crash,leak,oom,timeout}-*; do
    [ -e "$a" ] || continue
    kind=${a##*/}; kind=${kind%%-*}
    report=$(timeout 60 "$fuzzbin" "$a" 2>&1)
    verdict=$(grep -oE "ERROR: (AddressSanitizer|LeakSanitizer): [a-z-]+" <<<"$report" | head -1 | sed 's/ERROR: //')
    site=$(grep -E "^\s+#[0-9]+ " <<<"$report" | grep -oE "in (H5[A-Za-z_]+|read_raw|cellstream::[A-Za-z_:]+)" |
        grep -vE "H5FL_|H5MM_malloc" | head -1 | sed 's/^in //')
    # In a subshell, so that bash's "Segmentation fault" line stays out of the table.
    (target/release/cellstream __read-child --max-decompressed 16777216 "$a" "$scratch/o.csb") 2>/dev/null
    rc=$?
    outcome=$(grep -oE '"(outcome|kind)":"[a-z_]+"' "$scratch/o.csb.report.json" 2>/dev/null | tail -1)
    rm -f "$scratch"/o.csb*
    echo "$kind | ${verdict:-(no report)} | ${site:-?} | release: exit $rc ${outcome}"
done 2>/dev/null | sort | uniq -c | sort -rn
