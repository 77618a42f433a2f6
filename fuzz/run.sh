#!/usr/bin/env bash
# Fuzz every parser for a set time (or a number of executions) with seeds from the real
# samples in the repo. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets it pass the sanitizer flags.
#   fuzz/run.sh [SECONDS_PER_TARGET] [RUNS_PER_TARGET] [TARGET...]
#   (defaults: 600 s, 10,000,000 runs, every target)
#   FUZZ_FLAGS: more libFuzzer flags, e.g. FUZZ_FLAGS="-fork=1 -ignore_crashes=1" to keep
#   going after a crash (used for h5: libhdf5 crashes are contained by the daemon's child
#   reader, so the hour is spent looking for more of them and for crashes in our code).
# A target stops at whichever limit comes first. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}" runs="${2:-10000000}"
shift $(( $# < 2 ? $# : 2 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(csb csb_zst mtx dense config upload_name h5)
# The seeds are made with the release binary (built without RUSTC_BOOTSTRAP, which would
# invalidate the normal build's cache); only cargo fuzz gets it.
cargo build --release --bin cellstream
bin=target/release/cellstream
c=fuzz/corpus
mkdir -p $c/csb $c/csb_zst $c/mtx $c/dense $c/config $c/upload_name $c/h5
f=tests/fixtures/formats
# Seeds: the real samples, converted to each format a target reads.
i=0
for src in $f/scanpy_10x_v2/filtered_gene_bc_matrices/hg19_chr21 $f/scanpy_10x_v3/filtered_feature_bc_matrix \
           $f/seurat_testdata/cr3.0 $f/seurat_testdata/pbmc_raw.txt; do
    i=$((i + 1))
    $bin convert "$src" $c/csb/seed$i.csb >/dev/null
    $bin convert "$src" $c/csb_zst/seed$i.csb.zst >/dev/null
done
cp tests/fixtures/python_written.csb $c/csb/python_written.csb
cp $f/seurat_testdata/pbmc_raw.txt $c/dense/pbmc_raw.txt
cp $c/csb/seed1.csb $c/csb_zst/seed1.csb.zst $c/dense/
gzip -c $f/seurat_testdata/pbmc_raw.txt > $c/dense/pbmc_raw.txt.gz
# MTX: matrix \0 features \0 barcodes, as fuzz_targets/mtx.rs splits them.
d=$f/scanpy_10x_v2/filtered_gene_bc_matrices/hg19_chr21
{ cat $d/matrix.mtx; printf '\0'; cat $d/genes.tsv; printf '\0'; cat $d/barcodes.tsv; } > $c/mtx/v2
d=$f/scanpy_10x_v3/filtered_feature_bc_matrix
{ cat $d/matrix.mtx.gz; printf '\0'; zcat $d/features.tsv.gz; printf '\0'; cat $d/barcodes.tsv.gz; } > $c/mtx/v3-gz
# HDF5: the 10x v2 (two genomes), v3 and Visium .h5 samples (the 7 MB .h5ad is over -max_len).
cp $f/scanpy_10x_v2/filtered_gene_bc_matrices_h5.h5 $c/h5/v2.h5
cp $f/scanpy_10x_v2/multiple_genomes.h5 $c/h5/v2-genomes.h5
cp $f/scanpy_10x_v3/filtered_feature_bc_matrix.h5 $c/h5/v3.h5
cp $f/seurat_testdata/visium/filtered_feature_bc_matrix.h5 $c/h5/visium.h5
cp systemd/cellstream.toml $c/config/example.toml
printf '[spool]\ndir = "/s"\n[output]\ndir = "/o"\n[http]\nlisten = "127.0.0.1:9464"\n' > $c/config/minimal.toml
printf 'run42-000017.csb.zst' > $c/upload_name/good
printf '../etc/passwd' > $c/upload_name/traversal

export RUSTC_BOOTSTRAP=1
# The mtx target writes its three members to a scratch folder on every input: keep it in RAM.
[ -d /dev/shm ] && export TMPDIR=/dev/shm
# The h5 target links libhdf5 (feature hdf5, Debian: libhdf5-dev); the others are built
# without it, so that their coverage maps stay small.
cargo fuzz build -O
# Memory: an input that makes a reader allocate more than 128 MB at once, or the process
# (AddressSanitizer's quarantine included, 400-700 MB in the runs of docs/robustness.md) pass
# 1.5 GB, is a crash: the readers size nothing from a header's claims before checking them
# against the caps, and stream every text member through a bounded buffer.
for t in "${targets[@]}"; do
    echo "== $t: up to $secs s or $runs runs"
    feat=()
    [ "$t" = h5 ] && feat=(--features hdf5)
    cargo fuzz run -O ${feat[@]+"${feat[@]}"} "$t" $c/$t -- -max_total_time="$secs" -runs="$runs" \
        -max_len=262144 -rss_limit_mb=1536 -malloc_limit_mb=128 -print_final_stats=1 ${FUZZ_FLAGS:-} 2>&1 |
        grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|INFO: fuzzed for|#[0-9]+: cov)|panicked|Test unit written|CRASH" || true
done
