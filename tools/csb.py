#!/usr/bin/env python3
# Written for cellstream. License: MIT.
"""Dependency-free writer and reader of the `.csb` count-batch format, version 1.

The format is specified in docs/FORMAT.md; this file follows it byte for byte and lays files out
as the Rust writer does (src/batch/csb.rs): an absent section (no gene_ids) has table entry (0, 0),
and the CRC-32C trailer follows the last section directly. Python 3.8+, standard library only.

    python3 tools/csb.py write-sample OUT.csb   # small deterministic sample batch
    python3 tools/csb.py dump IN.csb            # validate, print one JSON line; exit 2 if invalid
"""
import json, os, struct, sys
from array import array

MAGIC, VERSION, HEADER_LEN, ALIGN = b"CSB1", 1, 128, 64
SECTIONS = ("gene_names", "gene_ids", "barcodes", "indptr", "indices", "data")
assert array("Q").itemsize == 8 and array("I").itemsize == 4

_TABLE = []
for _n in range(256):
    for _ in range(8):
        _n = (_n >> 1) ^ 0x82F63B78 if _n & 1 else _n >> 1
    _TABLE.append(_n)


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli, reflected 0x82F63B78); pass a previous result as `crc` to continue."""
    crc, table = crc ^ 0xFFFFFFFF, _TABLE
    for b in memoryview(data).cast("B"):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _swap(a):  # the format is little-endian
    if sys.byteorder == "big":
        a.byteswap()
    return a


def _no_zstd(path):
    if str(path).endswith(".zst"):
        raise ValueError(f"{path}: .csb.zst needs zstd, which the Python standard library does not "
                         "have; run `zstd -d` first or use `cellstream convert`")


def _strings(values, name):
    if any("\0" in s for s in values):
        raise ValueError(f"{name}: a string contains a NUL byte")
    return b"".join(s.encode("utf-8") + b"\0" for s in values)


def write_csb(path, gene_names, barcodes, indptr, indices, data, gene_ids=None):
    """Write one batch to `path` under a temporary name in the same folder, fsync, rename."""
    _no_zstd(path)
    if gene_ids is not None and len(gene_ids) != len(gene_names):
        raise ValueError(f"{len(gene_ids)} gene_ids for {len(gene_names)} gene_names")
    parts = [_strings(gene_names, "gene_names"), _strings(gene_ids or [], "gene_ids"),
             _strings(barcodes, "barcodes"), _swap(array("Q", indptr)).tobytes(),
             _swap(array("I", indices)).tobytes(), _swap(array("I", data)).tobytes()]
    table, body = [], bytearray(HEADER_LEN)
    for part in parts:
        if part:
            body += bytes(-len(body) % ALIGN)  # zero gap up to the next multiple of 64
        table += (len(body) if part else 0, len(part))
        body += part
    body[:HEADER_LEN] = struct.pack("<4sHH3Q12Q", MAGIC, VERSION, 0, len(barcodes),
                                    len(gene_names), len(indices), *table)
    body += struct.pack("<I", crc32c(bytes(body)))
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename durable where a folder can be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _parse_strings(b, off, length, count, name):
    """Check 4: exactly `count` NUL-terminated, valid UTF-8 strings."""
    where = f"check 4: section {name} at offset {off}"
    if length and b[off + length - 1] != 0:
        raise ValueError(f"{where} does not end with a NUL byte")
    raw = b[off:off + length - 1].split(b"\0") if length else []
    if len(raw) != count:
        raise ValueError(f"{where} holds {len(raw)} strings, the header says {count}")
    out, pos = [], off
    for i, s in enumerate(raw):
        try:
            out.append(s.decode("utf-8"))
        except UnicodeDecodeError as e:
            msg = f"{where}: string {i} at offset {pos} is not valid UTF-8 ({e.reason})"
            raise ValueError(msg) from None
        pos += len(s) + 1
    return out


def read_csb(path):
    """Read `path`, run checks 1-6 of docs/FORMAT.md in order (ValueError on the first failure)."""
    _no_zstd(path)
    with open(path, "rb") as f:
        b = f.read()
    if len(b) < HEADER_LEN + 4:
        raise ValueError(f"check 1: truncated: {len(b)} bytes, a .csb file has at least 132")
    magic, version, flags, n_cells, n_genes, nnz = struct.unpack_from("<4sHH3Q", b)
    for bad, msg in ((magic != MAGIC, f"bad magic {magic!r} at offset 0, expected b'CSB1'"),
                     (version != VERSION, f"unsupported version {version} at offset 4, expected 1"),
                     (flags != 0, f"unknown flags {flags:#06x} at offset 6, expected 0")):
        if bad:
            raise ValueError("check 1: " + msg)
    stored, actual = struct.unpack_from("<I", b, len(b) - 4)[0], crc32c(memoryview(b)[:-4])
    if stored != actual:
        raise ValueError(f"check 2: checksum mismatch: trailer at offset {len(b) - 4} holds "
                         f"{stored:#010x}, the bytes before it give {actual:#010x}")
    table, want = struct.unpack_from("<12Q", b, 32), {3: 8 * (n_cells + 1), 4: 4 * nnz, 5: 4 * nnz}
    prev_end, end_of_data, secs = HEADER_LEN, len(b) - 4, []
    for i, name in enumerate(SECTIONS):
        off, length = table[2 * i], table[2 * i + 1]
        where = f"check 3: section {name} (table entry at offset {32 + 16 * i})"
        if i in want and length != want[i]:
            raise ValueError(f"{where} is {length} bytes, the header's counts imply {want[i]}")
        if length and off % ALIGN:
            raise ValueError(f"{where} starts at {off}, not a multiple of {ALIGN}")
        if length and off + length > end_of_data:
            raise ValueError(f"{where} spans {off}..{off}+{length}, past the end of the data "
                             f"at {end_of_data}")
        if length and off < prev_end:
            raise ValueError(f"{where} starts at {off}, before the end of the header or the "
                             f"previous section at {prev_end}")
        prev_end = off + length if length else prev_end
        secs.append((off, length) if length else (0, 0))
    out = {"gene_names": _parse_strings(b, *secs[0], n_genes, "gene_names"),
           "gene_ids": _parse_strings(b, *secs[1], n_genes, "gene_ids") if secs[1][1] else None,
           "barcodes": _parse_strings(b, *secs[2], n_cells, "barcodes")}
    if n_cells == 0 or n_genes == 0:
        raise ValueError(f"empty batch: {n_cells} cells x {n_genes} genes")
    indptr, indices, data = (_swap(array(code, b[off:off + n])).tolist()
                             for (off, n), code in zip(secs[3:], "QII"))
    if indptr[0] != 0:
        raise ValueError(f"check 5: indptr[0] is {indptr[0]}, expected 0")
    for c in range(n_cells):
        if indptr[c + 1] < indptr[c]:
            raise ValueError(f"check 5: indptr decreases at cell {c}: {indptr[c]} then "
                             f"{indptr[c + 1]}")
    if indptr[n_cells] != nnz:
        raise ValueError(f"check 5: indptr[n_cells] is {indptr[n_cells]}, expected nnz = {nnz}")
    for c in range(n_cells):
        prev = -1
        for k in range(indptr[c], indptr[c + 1]):
            g = indices[k]
            if g >= n_genes or g <= prev:
                why = "out of range" if g >= n_genes else f"not above the previous {prev}"
                raise ValueError(f"check 6: gene index {g} at cell {c}, entry {k - indptr[c]} is "
                                 f"{why} (n_genes = {n_genes}; indices must strictly increase)")
            prev = g
    out.update(indptr=indptr, indices=indices, data=data)
    return out


SAMPLE = dict(  # 3 cells x 5 genes; cell 1 has no entries; counts 0 and u32::MAX included
    gene_names=["CD3E", "HLA-DRB1", "Ä-test", "MS4A1", "NKG7"],
    gene_ids=["ENSG00000198851", "ENSG00000196126", "TEST-Ä-0001", "ENSG00000156738",
              "ENSG00000105374"],
    barcodes=["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1", "AAACCTGAGAAACCTA-1"],
    indptr=[0, 3, 3, 5], indices=[0, 1, 4, 2, 3], data=[1, 4000000000, 7, 0, 4294967295])


def main(argv):
    if len(argv) != 3 or argv[1] not in ("write-sample", "dump"):
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    try:
        if argv[1] == "write-sample":
            write_csb(argv[2], **SAMPLE)
        else:
            print(json.dumps(read_csb(argv[2]), sort_keys=True))
    except (ValueError, OSError) as e:
        print(f"{argv[2]}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
