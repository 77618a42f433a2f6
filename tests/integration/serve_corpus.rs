//! A corpus of malformed batches through the running daemon: every one is quarantined with
//! an error report that names it and says what is wrong, good batches between them are
//! processed, nothing hangs, and memory stays bounded.

use crate::common;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::common::daemon::*;
use cellstream::batch::{write_csb, CountBatch};

/// One malformed input, as a producer would drop it.
pub(crate) enum Entry {
    File(Vec<u8>),
    /// An MTX directory: member name → bytes.
    Dir(Vec<(&'static str, Vec<u8>)>),
    Symlink(&'static str),
    /// An MTX directory whose matrix is a FIFO (opening it would block a naive reader).
    FifoMatrix,
}

fn base() -> CountBatch {
    let all = common::read(&common::repo().join("bench-data/pbmc68k_reduced"));
    all.select(0..4)
}

fn csb(batch: &CountBatch) -> Vec<u8> {
    let mut v = Vec::new();
    write_csb(batch, &mut v).unwrap();
    v
}

fn fix_crc(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 4;
    let crc = crc32c::crc32c(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn put_u64(mut b: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    fix_crc(b)
}

fn section(b: &[u8], i: usize) -> usize {
    u64::from_le_bytes(b[32 + 16 * i..40 + 16 * i].try_into().unwrap()) as usize
}

fn zst(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 19).unwrap()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn mtx(header: &str, entries: &str) -> Vec<u8> {
    format!("%%MatrixMarket matrix coordinate integer general\n{header}\n{entries}").into_bytes()
}

const FEATURES: &str = "ENSG1\tCD3E\tGene Expression\nENSG2\tMS4A1\tGene Expression\n";

fn mtx_dir(matrix: Vec<u8>, features: &str, barcodes: &str) -> Entry {
    Entry::Dir(vec![
        ("matrix.mtx", matrix),
        ("features.tsv", features.as_bytes().to_vec()),
        ("barcodes.tsv", barcodes.as_bytes().to_vec()),
    ])
}

/// The corpus: name → entry. Names are the spool names (MTX directories have none).
pub(crate) fn corpus() -> Vec<(String, Entry)> {
    let b = csb(&base());
    let mut c: Vec<(String, Entry)> = Vec::new();
    for k in 1..=10 {
        let cut = b.len() * k / 11;
        c.push((format!("trunc-{k:02}.csb"), Entry::File(b[..cut].to_vec())));
    }
    let mut flip = b.clone();
    flip[b.len() / 2] ^= 0x40;
    c.push(("flip.csb".into(), Entry::File(flip)));
    let mut version = b.clone();
    version[4] = 9;
    c.push(("version.csb".into(), Entry::File(fix_crc(version))));
    c.push((
        "offset-lies.csb".into(),
        Entry::File(put_u64(b.clone(), 32 + 16 * 4, 1 << 40)),
    ));
    c.push((
        "ncells-huge.csb".into(),
        Entry::File(put_u64(b.clone(), 8, u64::MAX)),
    ));
    c.push((
        "indptr-back.csb".into(),
        Entry::File(put_u64(b.clone(), section(&b, 3) + 8, u64::MAX / 2)),
    ));
    let mut gene = b.clone();
    let at = section(&b, 4);
    gene[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    c.push(("gene-range.csb".into(), Entry::File(fix_crc(gene))));
    let mut utf8 = b.clone();
    utf8[section(&b, 0)] = 0xff;
    c.push(("names-utf8.csb".into(), Entry::File(fix_crc(utf8))));
    c.push((
        "zst-truncated.csb.zst".into(),
        Entry::File(zst(&b)[..40].to_vec()),
    ));
    c.push((
        "zst-bomb.csb.zst".into(),
        Entry::File(zst(&vec![0u8; 64 << 20])),
    ));
    c.push(("empty.csb".into(), Entry::File(Vec::new())));
    c.push((
        "binary-junk".into(),
        Entry::File(b"\x7fELF\x02\x01\x01\x00 not a batch".to_vec()),
    ));
    c.push(("zero-by-zero".into(), mtx_dir(mtx("0 0 0", ""), "", "")));
    c.push((
        "one-by-one-unknown-gene".into(),
        mtx_dir(
            mtx("1 1 1", "1 1 5\n"),
            "ENSG0\tNOT_A_GENE\tGene Expression\n",
            "AAAC-1\n",
        ),
    ));
    c.push((
        "nan-count".into(),
        mtx_dir(mtx("2 1 1", "1 1 nan\n"), FEATURES, "AAAC-1\n"),
    ));
    c.push((
        "negative-count".into(),
        mtx_dir(mtx("2 1 1", "1 1 -3\n"), FEATURES, "AAAC-1\n"),
    ));
    c.push((
        "huge-count".into(),
        mtx_dir(mtx("2 1 1", "1 1 99999999999999\n"), FEATURES, "AAAC-1\n"),
    ));
    c.push((
        "duplicate-barcodes".into(),
        mtx_dir(mtx("2 2 2", "1 1 3\n2 2 4\n"), FEATURES, "AAAC-1\nAAAC-1\n"),
    ));
    c.push((
        "barcode-count".into(),
        mtx_dir(mtx("2 3 1", "1 1 3\n"), FEATURES, "AAAC-1\n"),
    ));
    c.push((
        "features-utf8".into(),
        Entry::Dir(vec![
            ("matrix.mtx", mtx("2 1 1", "1 1 3\n")),
            (
                "features.tsv",
                b"ENSG1\tCD3\xff\tGene Expression\nENSG2\tX\tGene Expression\n".to_vec(),
            ),
            ("barcodes.tsv", b"AAAC-1\n".to_vec()),
        ]),
    ));
    c.push((
        "missing-barcodes".into(),
        Entry::Dir(vec![
            ("matrix.mtx", mtx("2 1 1", "1 1 3\n")),
            ("features.tsv", FEATURES.as_bytes().to_vec()),
        ]),
    ));
    c.push((
        "gzip-bomb".into(),
        Entry::Dir(vec![
            ("matrix.mtx.gz", gz(&vec![b'%'; 32 << 20])),
            ("features.tsv", FEATURES.as_bytes().to_vec()),
            ("barcodes.tsv", b"AAAC-1\n".to_vec()),
        ]),
    ));
    c.push((
        "gzip-corrupt".into(),
        Entry::Dir(vec![
            ("matrix.mtx.gz", gz(&mtx("2 1 1", "1 1 3\n"))[..20].to_vec()),
            ("features.tsv", FEATURES.as_bytes().to_vec()),
            ("barcodes.tsv", b"AAAC-1\n".to_vec()),
        ]),
    ));
    c.push((
        "dense-fraction.txt".into(),
        Entry::File(b"\tAAAC-1\tAAAG-1\nCD3E\t1.5\t2\nMS4A1\t0\t1\n".to_vec()),
    ));
    // Fuzzing's one crash (src/batch/dense.rs): a header with no barcode, a row with no field.
    c.push((
        "dense-fuzz-empty-header.txt".into(),
        Entry::File(b"\"\n\"".to_vec()),
    ));
    c.push(("symlink.csb".into(), Entry::Symlink("/etc/passwd")));
    c.push(("fifo-matrix".into(), Entry::FifoMatrix));
    c
}

pub(crate) fn materialise(name: &str, entry: &Entry, dir: &Path) {
    let path = dir.join(name);
    match entry {
        Entry::File(bytes) => std::fs::write(&path, bytes).unwrap(),
        Entry::Dir(members) => {
            std::fs::create_dir(&path).unwrap();
            for (m, bytes) in members {
                std::fs::write(path.join(m), bytes).unwrap();
            }
        }
        Entry::Symlink(target) => std::os::unix::fs::symlink(target, &path).unwrap(),
        Entry::FifoMatrix => {
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("features.tsv"), FEATURES).unwrap();
            std::fs::write(path.join("barcodes.tsv"), "AAAC-1\n").unwrap();
            let fifo = std::ffi::CString::new(path.join("matrix.mtx").to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        }
    }
}

#[test]
fn every_malformed_input_is_quarantined_with_a_report_and_serving_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let corpus = corpus();
    assert!(corpus.len() >= 30, "{} entries", corpus.len());
    let staging = root.join("staging");
    std::fs::create_dir(&staging).unwrap();
    for (name, entry) in &corpus {
        materialise(name, entry, &staging);
    }
    let good = root.join("good.csb");
    cellstream::batch::write_csb_file(&base(), &good).unwrap();

    // Bombs are capped at 1 MiB of decompressed bytes.
    write_config(
        root,
        "max_decompressed_bytes = 1048576",
        "",
        "[pipeline]\nthreads = 1\n",
    );
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    drop_batch(&d.incoming, &good, "good-000.csb");
    wait_for(Duration::from_secs(60), "the first good batch", || {
        d.out.join("good-000.ndjson").exists()
    });
    let rss_before = daemon.peak_rss();

    // Every malformed entry, each followed by a good batch.
    for (k, (name, _)) in corpus.iter().enumerate() {
        std::fs::rename(staging.join(name), d.incoming.join(name)).unwrap();
        drop_batch(&d.incoming, &good, &format!("good-{:03}.csb", k + 1));
    }
    wait_for(Duration::from_secs(120), "every entry to settle", || {
        names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty()
    });
    for k in 0..=corpus.len() {
        let out = d.out.join(format!("good-{k:03}.ndjson"));
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        assert_eq!(
            text.lines().count(),
            4,
            "{} after a malformed one",
            out.display()
        );
    }
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for (name, _) in &corpus {
        let report_path = d.failed.join(format!("{name}.error.json"));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&report_path)
                .unwrap_or_else(|_| panic!("{name}: no error report in failed/")),
        )
        .unwrap();
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains(name.as_str()) && error.len() > name.len() + 20,
            "{name}: the report must name the input and say what is wrong: {error}"
        );
        assert!(
            d.failed.join(name).symlink_metadata().is_ok(),
            "{name}: the input is kept beside its report"
        );
        *kinds
            .entry(format!(
                "{}/{}",
                report["stage"].as_str().unwrap(),
                report["kind"].as_str().unwrap()
            ))
            .or_default() += 1;
        eprintln!("{name}: {error}");
    }
    eprintln!("{kinds:?}");
    assert_eq!(
        daemon.metric("cellstream_batches_total{outcome=\"failed\"}"),
        corpus.len() as f64
    );
    let growth = daemon.peak_rss().saturating_sub(rss_before);
    eprintln!(
        "peak RSS {} MiB before the corpus, grew {} KiB",
        rss_before >> 20,
        growth >> 10
    );
    assert!(
        growth < 16 << 20,
        "memory grew {growth} bytes on the corpus"
    );
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
}

/// Fuzzing found `.h5` files that break libhdf5 itself (C): out-of-bounds reads and writes
/// in its global heap (a segfault), in link names and in its metadata cache
/// (tests/fixtures/fuzz/README.md). The daemon reads HDF5 in a child process, so each costs
/// only itself: quarantined (`reader_crashed` where libhdf5 segfaults), the daemon lives on,
/// and good `.h5` batches still give what `cellstream embed` gives.
#[cfg(feature = "hdf5")]
#[test]
fn files_that_crash_libhdf5_cost_only_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let src = root.join("src");
    let scratch = root.join("scratch");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&scratch).unwrap();
    let good = common::fixture("formats/scanpy_10x_v3/filtered_feature_bc_matrix.h5");
    std::fs::copy(&good, src.join("v3-good.h5")).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(src.join("cut.h5"), &bytes[..bytes.len() / 2]).unwrap();
    let expected = embed_reference(&[src.join("v3-good.h5")], root);

    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    // The child's scratch .csb files go to TMPDIR: none may be left behind.
    let daemon = Daemon::start(root, &[("TMPDIR", scratch.to_str().unwrap())]);
    daemon.wait_ready();
    // (fixture, whether libhdf5 segfaults on it in a normal build)
    let hostile = [
        ("h5-libhdf5-global-heap-crash.h5", true),
        ("h5-libhdf5-global-heap-overflow.h5", true),
        ("h5-libhdf5-link-name-overflow.h5", false),
        ("h5-libhdf5-metadata-cache-huge-alloc.h5", false),
        ("h5-huge-dataspace.h5", false),
    ];
    for (name, _) in &hostile {
        drop_batch(&d.incoming, &common::fixture(&format!("fuzz/{name}")), name);
    }
    drop_batch(&d.incoming, &src.join("v3-good.h5"), "v3-good.h5");
    drop_batch(&d.incoming, &src.join("cut.h5"), "cut.h5");
    wait_for(Duration::from_secs(120), "every batch to settle", || {
        names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty()
    });

    let report = |name: &str| -> serde_json::Value {
        let path = d.failed.join(format!("{name}.error.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{name}: no error report in failed/"));
        eprintln!("{text}");
        serde_json::from_str(&text).unwrap()
    };
    for (name, segfaults) in hostile {
        let r = report(name);
        assert_eq!(r["stage"], "read", "{name}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains(name), "{error}");
        if segfaults {
            assert_eq!(r["kind"], "reader_crashed", "{name}");
            assert!(error.contains("signal"), "{error}");
        }
    }
    // A file libhdf5 refuses cleanly keeps the reader's own message, as read in process.
    let cut = report("cut.h5");
    assert_eq!(cut["kind"], "invalid");

    assert_eq!(
        output(&d, "v3-good").as_deref(),
        Some(expected["v3-good"].as_str())
    );
    assert_eq!(
        names_in(&scratch),
        Vec::<String>::new(),
        "scratch files left"
    );
    let mut daemon = daemon;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died"
    );
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
    assert_eq!(
        daemon.metric("cellstream_batches_total{outcome=\"failed\"}"),
        (hostile.len() + 1) as f64
    );
}
