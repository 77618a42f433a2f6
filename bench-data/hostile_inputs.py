#!/usr/bin/env python3
"""The hostile MTX directories of issue 20, written in seconds: gigabytes of text as one gzip
member repeated (a reader decompresses concatenated members as one stream).

    bench-data/hostile_inputs.py OUT_DIR

- mtx-3gib-of-entries: a size line declaring 198,277 entries, then 3 GiB of `1 1 1` lines;
- mtx-2gib-line: the 4th line of matrix.mtx.gz is 2 GiB of digits with no newline;
- features-55m-lines: features.tsv.gz of 55 M lines beside a 30,727-row matrix.
Standard library only. tests/integration/memory.rs makes the same inputs for the daemon.
"""
import gzip, os, sys

out = sys.argv[1]
MIB = 1 << 20
HEADER = b"%%MatrixMarket matrix coordinate integer general\n"


def member(data):
    return gzip.compress(data, compresslevel=1)


def gz_repeated(path, prefix, chunk, times):
    body = member(chunk)
    with open(path, "wb") as f:
        f.write(member(prefix))
        for _ in range(times):
            f.write(body)


def mtx_dir(name, features, barcodes):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    if features:
        open(os.path.join(d, "features.tsv"), "wb").write(features)
    open(os.path.join(d, "barcodes.tsv"), "wb").write(barcodes)
    return d


d = mtx_dir("mtx-3gib-of-entries", b"g1\tA\ng2\tB\n", b"c1\n")
gz_repeated(os.path.join(d, "matrix.mtx.gz"), HEADER + b"2 1 198277\n",
            b"1 1 1\n" * (64 * MIB // 6), 48)
d = mtx_dir("mtx-2gib-line", b"g1\tA\ng2\tB\n", b"c1\n")
gz_repeated(os.path.join(d, "matrix.mtx.gz"), HEADER + b"%comment\n2 1 1\n", b"7" * (64 * MIB), 32)
d = mtx_dir("features-55m-lines", b"", b"c1\n")
open(os.path.join(d, "matrix.mtx"), "wb").write(HEADER + b"30727 1 1\n1 1 5\n")
gz_repeated(os.path.join(d, "features.tsv.gz"), b"",
            b"ENSG00000141510\tTP53\tGene\n" * 1_000_000, 55)
print(f"wrote the hostile inputs to {out}", file=sys.stderr)
