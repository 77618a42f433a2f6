//! Bad input gets a clear error naming the file and what is wrong, never a panic.

use crate::common;
use std::io::Write;
use std::path::{Path, PathBuf};

use cellstream::batch::{
    read_batch, write_csb, BatchError, CountBatch, CsrArrays, Format, ReadOptions,
};
use tempfile::TempDir;

fn small_batch() -> CountBatch {
    CountBatch::from_csr(
        "small",
        Format::Mtx,
        vec!["CD3E".into(), "MS4A1".into(), "NKG7".into()],
        None,
        vec!["c1".into(), "c2".into()],
        CsrArrays {
            indptr: vec![0, 2, 3],
            indices: vec![0, 2, 1],
            data: vec![5, 1, 7],
        },
    )
    .unwrap()
}

fn csb_bytes() -> Vec<u8> {
    let mut v = Vec::new();
    write_csb(&small_batch(), &mut v).unwrap();
    v
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Rewrites the CRC trailer so that only the structural check can catch the lie.
fn fix_crc(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 4;
    let crc = crc32c::crc32c(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn section_offset(b: &[u8], i: usize) -> usize {
    u64_at(b, 32 + 16 * i) as usize
}

struct Case {
    dir: TempDir,
}

impl Case {
    fn new() -> Case {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A 10x directory from plain-text members (each gzipped when its name ends in .gz).
    fn mtx_dir(&self, name: &str, matrix: &str, features: &str, barcodes: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (member, text) in [
            ("matrix.mtx", matrix),
            ("features.tsv", features),
            ("barcodes.tsv", barcodes),
        ] {
            std::fs::write(d.join(member), text).unwrap();
        }
        d
    }
}

fn err_with(path: &Path, opts: &ReadOptions) -> BatchError {
    match read_batch(path, opts) {
        Ok(b) => panic!("{} was accepted: {b:?}", path.display()),
        Err(e) => e,
    }
}

/// Reads `path`, expects an error naming the file and containing every `want` fragment.
fn expect_err(path: &Path, want: &[&str]) {
    expect_err_opts(path, &ReadOptions::default(), want);
}

fn expect_err_opts(path: &Path, opts: &ReadOptions, want: &[&str]) {
    let msg = err_with(path, opts).to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        msg.contains(name.as_ref()),
        "message does not name the file: {msg}"
    );
    for w in want {
        assert!(msg.contains(w), "expected {w:?} in: {msg}");
    }
}

#[test]
fn truncated_csb_at_many_offsets() {
    let c = Case::new();
    let full = csb_bytes();
    for cut in [
        0,
        3,
        64,
        127,
        131,
        132,
        200,
        full.len() / 2,
        full.len() - 5,
        full.len() - 1,
    ] {
        let p = c.file(&format!("cut{cut}.csb"), &full[..cut]);
        let msg = match read_batch(&p, &ReadOptions::default()) {
            Ok(_) => panic!("truncation at {cut} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("truncated")
                || msg.contains("checksum mismatch")
                || msg.contains("empty")
                || msg.contains("not a readable batch"),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn flipped_byte_fails_the_checksum() {
    let c = Case::new();
    let mut b = csb_bytes();
    let at = section_offset(&b, 5); // a count
    b[at] ^= 0x40;
    expect_err(&c.file("flip.csb", &b), &["checksum mismatch"]);
}

#[test]
fn bad_magic_and_version() {
    let c = Case::new();
    let mut b = csb_bytes();
    b[4] = 9;
    expect_err(
        &c.file("version.csb", &fix_crc(b)),
        &["unsupported version 9 at offset 4"],
    );
    let mut b = csb_bytes();
    b[6] = 1;
    expect_err(
        &c.file("flags.csb", &fix_crc(b)),
        &["unknown flags", "offset 6"],
    );
}

#[test]
fn header_offset_that_lies() {
    let c = Case::new();
    let mut b = csb_bytes();
    b[32 + 16 * 4..32 + 16 * 4 + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(
        &c.file("offset.csb", &fix_crc(b)),
        &["section indices", "past the end"],
    );
    let mut b = csb_bytes();
    let misaligned = section_offset(&b, 3) as u64 + 8;
    b[32 + 16 * 3..32 + 16 * 3 + 8].copy_from_slice(&misaligned.to_le_bytes());
    expect_err(
        &c.file("align.csb", &fix_crc(b)),
        &["section indptr", "not a multiple of 64"],
    );
    let mut b = csb_bytes();
    b[32 + 16 * 2..32 + 16 * 2 + 8].copy_from_slice(&64u64.to_le_bytes());
    expect_err(
        &c.file("overlap.csb", &fix_crc(b)),
        &["section barcodes", "overlapping"],
    );
}

#[test]
fn header_sizes_that_lie() {
    let c = Case::new();
    let mut b = csb_bytes();
    b[8..16].copy_from_slice(&3u64.to_le_bytes()); // n_cells 2 → 3
    expect_err(
        &c.file("ncells.csb", &fix_crc(b)),
        &["section indptr", "imply 32"],
    );
    let mut b = csb_bytes();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&c.file("huge.csb", &fix_crc(b)), &["section indptr"]);
    let mut b = csb_bytes();
    b[16..24].copy_from_slice(&4u64.to_le_bytes()); // n_genes 3 → 4: the names section holds 3
    expect_err(
        &c.file("ngenes.csb", &fix_crc(b)),
        &["section gene_names", "holds 3 strings, the header says 4"],
    );
}

#[test]
fn indptr_not_monotone() {
    let c = Case::new();
    let mut b = csb_bytes();
    let at = section_offset(&b, 3) + 8; // indptr[1]
    b[at..at + 8].copy_from_slice(&3u64.to_le_bytes());
    b[at + 8..at + 16].copy_from_slice(&2u64.to_le_bytes());
    expect_err(
        &c.file("indptr.csb", &fix_crc(b)),
        &["indptr not monotone at cell 1"],
    );
}

#[test]
fn gene_index_out_of_range() {
    let c = Case::new();
    let mut b = csb_bytes();
    let at = section_offset(&b, 4) + 4; // indices[1]
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    expect_err(
        &c.file("gene.csb", &fix_crc(b)),
        &["gene index 99 out of range at cell 0, entry 1"],
    );
    let d = c.mtx_dir(
        "mtx_gene",
        "%%MatrixMarket matrix coordinate integer general\n3 2 1\n4 1 5\n",
        "g1\tA\ng2\tB\ng3\tC\n",
        "c1\nc2\n",
    );
    expect_err(
        &d,
        &[
            "matrix.mtx",
            "line 3",
            "entry (4, 1) outside the 3 × 2 matrix",
        ],
    );
}

#[test]
fn invalid_utf8_name() {
    let c = Case::new();
    let mut b = csb_bytes();
    let at = section_offset(&b, 0);
    b[at] = 0xff;
    expect_err(
        &c.file("utf8.csb", &fix_crc(b)),
        &["section gene_names", "not valid UTF-8"],
    );
}

#[test]
fn empty_batches() {
    let c = Case::new();
    expect_err(&c.file("zero.csb", &[]), &["empty"]);
    let d = c.mtx_dir(
        "no_cells",
        "%%MatrixMarket matrix coordinate integer general\n1 0 0\n",
        "g\tA\n",
        "",
    );
    expect_err(&d, &["empty batch", "0 cells"]);
    // A .csb that says 0 cells × 1 gene, written by hand.
    let mut b = vec![0u8; 128];
    b[0..4].copy_from_slice(b"CSB1");
    b[4] = 1;
    b[16] = 1; // n_genes
    b[32..40].copy_from_slice(&128u64.to_le_bytes());
    b[40..48].copy_from_slice(&2u64.to_le_bytes());
    b[32 + 48..32 + 56].copy_from_slice(&192u64.to_le_bytes());
    b[32 + 56..32 + 64].copy_from_slice(&8u64.to_le_bytes());
    b.extend_from_slice(b"A\0");
    b.resize(192, 0);
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    expect_err(&c.file("nocells.csb", &fix_crc(b)), &["empty batch"]);
}

fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(bytes, 3).unwrap()
}

#[test]
fn truncated_or_foreign_zstd() {
    let c = Case::new();
    let z = zst(&csb_bytes());
    expect_err(&c.file("cut.csb.zst", &z[..z.len() / 2]), &["corrupt"]);
    expect_err(
        &c.file("foreign.csb.zst", &zst(b"hello, not a batch")),
        &["does not hold a .csb image"],
    );
}

#[test]
fn zstd_bomb_over_the_cap() {
    let c = Case::new();
    let bomb = zst(&vec![0u8; 64 << 20]); // 64 MiB of zeros in a few kB
    assert!(bomb.len() < 10_000);
    let opts = ReadOptions {
        max_decompressed: 1 << 20,
        ..ReadOptions::default()
    };
    expect_err_opts(
        &c.file("bomb.csb.zst", &bomb),
        &opts,
        &["too large", "cap of 1048576 bytes"],
    );
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn truncated_corrupt_and_bomb_gzip() {
    let c = Case::new();
    let src =
        common::repo().join("tests/fixtures/formats/scanpy_10x_v3/filtered_feature_bc_matrix");
    let copy = |name: &str, matrix: &[u8]| -> PathBuf {
        let d = c.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for m in ["features.tsv.gz", "barcodes.tsv.gz"] {
            std::fs::copy(src.join(m), d.join(m)).unwrap();
        }
        std::fs::write(d.join("matrix.mtx.gz"), matrix).unwrap();
        d
    };
    let good = std::fs::read(src.join("matrix.mtx.gz")).unwrap();
    expect_err(
        &copy("cut", &good[..good.len() / 2]),
        &["matrix.mtx.gz", "corrupt"],
    );
    let mut bad = good.clone();
    for b in &mut bad[1000..1100] {
        *b ^= 0x5a;
    }
    let msg = err_with(&copy("flip", &bad), &ReadOptions::default()).to_string();
    assert!(msg.contains("matrix.mtx.gz"), "{msg}");
    let bomb = gz(&vec![b'%'; 32 << 20]);
    let opts = ReadOptions {
        max_decompressed: 1 << 20,
        ..ReadOptions::default()
    };
    expect_err_opts(&copy("bomb", &bomb), &opts, &["matrix.mtx.gz", "too large"]);
}

#[test]
fn non_integer_and_negative_counts() {
    let c = Case::new();
    let h = "%%MatrixMarket matrix coordinate real general\n2 1 1\n";
    let d = c.mtx_dir("frac", &format!("{h}1 1 2.5\n"), "a\tA\nb\tB\n", "c1\n");
    expect_err(&d, &["matrix.mtx", "line 3: count 2.5 is not an integer"]);
    let d = c.mtx_dir("neg", &format!("{h}1 1 -3\n"), "a\tA\nb\tB\n", "c1\n");
    expect_err(&d, &["line 3: count -3 is negative"]);
    let dense = c.file("dense.txt", b"c1\tc2\nA\t1\t0.5\n");
    expect_err(&dense, &["line 2, column 3", "not a non-negative integer"]);
}

#[test]
fn mismatched_feature_and_barcode_counts() {
    let c = Case::new();
    let m = "%%MatrixMarket matrix coordinate integer general\n2 2 1\n1 1 5\n";
    let d = c.mtx_dir("bc", m, "a\tA\nb\tB\n", "c1\n");
    expect_err(&d, &["2 columns (cells)", "lists 1 barcodes"]);
    let d = c.mtx_dir("feat", m, "a\tA\n", "c1\nc2\n");
    expect_err(&d, &["2 rows (genes)", "lists 1 features"]);
    let d = c.mtx_dir(
        "dup",
        "%%MatrixMarket matrix coordinate integer general\n2 1 2\n1 1 5\n1 1 6\n",
        "a\tA\nb\tB\n",
        "c1\n",
    );
    expect_err(&d, &["duplicate entry"]);
    let d = c.mtx_dir(
        "short",
        "%%MatrixMarket matrix coordinate integer general\n2 1 3\n1 1 5\n",
        "a\tA\nb\tB\n",
        "c1\n",
    );
    expect_err(
        &d,
        &["truncated: the size line declares 3 entries, the file holds 1"],
    );
}

#[test]
fn directory_missing_a_member() {
    let c = Case::new();
    let d = c.mtx_dir(
        "missing",
        "%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 1\n",
        "a\tA\n",
        "c1\n",
    );
    std::fs::remove_file(d.join("barcodes.tsv")).unwrap();
    expect_err(&d, &["needs barcodes.tsv"]);
}

#[test]
fn unknown_content_is_named() {
    let c = Case::new();
    expect_err(
        &c.file("noise.bin", &[0u8, 1, 2, 3, 250, 251]),
        &["unrecognised content"],
    );
    expect_err(
        &c.file(
            "lone.mtx",
            b"%%MatrixMarket matrix coordinate integer general\n",
        ),
        &["pass the directory"],
    );
}

#[cfg(feature = "hdf5")]
#[test]
fn truncated_hdf5() {
    let _turn = common::hdf5_or_spawn(); // see common::HDF5_OR_SPAWN
    let c = Case::new();
    let full = std::fs::read(common::fixture(
        "formats/scanpy_10x_v3/filtered_feature_bc_matrix.h5",
    ))
    .unwrap();
    expect_err(&c.file("cut.h5", &full[..full.len() / 3]), &["invalid"]);
}

/// The binary turns bad input into exit code 2 and a message with the file, never a panic.
#[test]
fn cli_exit_code_two_with_the_file_named() {
    let _turn = common::hdf5_or_spawn(); // see common::HDF5_OR_SPAWN
    let c = Case::new();
    let mut b = csb_bytes();
    let at = section_offset(&b, 3) + 8;
    b[at..at + 8].copy_from_slice(&9u64.to_le_bytes());
    let p = c.file("bad.csb", &fix_crc(b));
    for cmd in ["inspect", "convert"] {
        let mut args = vec![cmd, p.to_str().unwrap()];
        let out_path = c.dir.path().join("o.csb");
        if cmd == "convert" {
            args.push(out_path.to_str().unwrap());
        }
        let out = common::cellstream(&args);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("bad.csb") && err.contains("indptr"),
            "{cmd}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let vocab = common::vocab_path();
    let out = common::cellstream(&[
        "tokenize",
        p.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
        "--out",
        "-",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let missing = common::cellstream(&["inspect", "/nonexistent/batch.csb"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(common::stderr(&missing).contains("/nonexistent/batch.csb"));
}

/// A normalised AnnData X (non-integer values) is refused with the dataset and the cell named.
#[cfg(feature = "hdf5")]
#[test]
fn normalised_h5ad_is_refused() {
    use hdf5::types::VarLenUnicode;
    let _turn = common::hdf5_or_spawn(); // see common::HDF5_OR_SPAWN
    let c = Case::new();
    let path = c.dir.path().join("normalised.h5ad");
    let f = hdf5::File::create(&path).unwrap();
    {
        let names =
            |v: &[&str]| -> Vec<VarLenUnicode> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let obs = f.create_group("obs").unwrap();
        obs.new_dataset_builder()
            .with_data(&names(&["c1", "c2"]))
            .create("_index")
            .unwrap();
        let var = f.create_group("var").unwrap();
        var.new_dataset_builder()
            .with_data(&names(&["CD3E", "MS4A1", "NKG7"]))
            .create("_index")
            .unwrap();
        let x = ndarray_free_matrix();
        f.new_dataset::<f32>()
            .shape([2, 3])
            .create("X")
            .unwrap()
            .write_raw(&x)
            .unwrap();
    }
    // Close strongly: HDF5 keeps the file (and its lock) open while any handle to an object in
    // it lives, and refuses to open it again until then.
    f.close().unwrap();
    expect_err(
        &path,
        &["X[1, 2]", "not an integer", "layers/counts or raw/X"],
    );
}

#[cfg(feature = "hdf5")]
fn ndarray_free_matrix() -> Vec<f32> {
    vec![1.0, 0.0, 2.0, 0.0, 3.0, 0.693]
}
