//! Bounded memory whatever arrives (docs/robustness.md, "Bounded memory"): the hostile
//! inputs of issue 20, made on the fly (gzip members repeated, so that gigabytes of text take
//! a few megabytes on disk and a second to make), through the running daemon with its peak
//! resident memory (VmHWM) asserted; the caps and the memory budget; a 21,104-cell MTX
//! embedded within 400 MiB; and the same caps through the library and the command line.

use crate::common;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::daemon::*;
use cellstream::batch::{read_batch_capped, write_csb, BatchError, Caps, CountBatch, ReadOptions};

/// A gzip file of `prefix` then `chunk` repeated `times`: the chunk is compressed once and its
/// member written `times` times (a reader decompresses concatenated members as one stream).
fn gz_repeated(path: &Path, prefix: &[u8], chunk: &[u8], times: usize) {
    let member = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&member(prefix)).unwrap();
    let body = member(chunk);
    for _ in 0..times {
        f.write_all(&body).unwrap();
    }
    f.flush().unwrap();
}

/// `chunk` repeated to about `bytes` bytes.
fn repeat_to(unit: &[u8], bytes: usize) -> Vec<u8> {
    unit.repeat(bytes / unit.len())
}

const HEADER: &str = "%%MatrixMarket matrix coordinate integer general\n";
const MIB: usize = 1 << 20;

/// An MTX directory from plain members, `matrix` written by `write_matrix` (plain or gz).
fn mtx_dir(dir: &Path, features: &[u8], barcodes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    if !features.is_empty() {
        std::fs::write(dir.join("features.tsv"), features).unwrap();
    }
    std::fs::write(dir.join("barcodes.tsv"), barcodes).unwrap();
    dir.to_path_buf()
}

fn small_csb() -> Vec<u8> {
    let b = common::read(&common::repo().join("bench-data/pbmc68k_reduced")).select(0..4);
    let mut v = Vec::new();
    write_csb(&b, &mut v).unwrap();
    v
}

/// The hostile inputs and a few more, each with the stage/kind and a fragment its
/// report must hold. Written into `staging`; gigabytes of text, megabytes on disk.
fn hostile(staging: &Path) -> Vec<(String, &'static str, &'static str)> {
    let mut c = Vec::new();
    // 1. A size line declaring 198,277 entries, then 3 GiB of `1 1 1` lines.
    let d = mtx_dir(
        &staging.join("mtx-3gib-of-entries"),
        b"g1\tA\ng2\tB\n",
        b"c1\n",
    );
    gz_repeated(
        &d.join("matrix.mtx.gz"),
        format!("{HEADER}2 1 198277\n").as_bytes(),
        &repeat_to(b"1 1 1\n", 64 * MIB),
        48,
    );
    c.push((
        "mtx-3gib-of-entries".into(),
        "read/invalid",
        "more entries than the 198277 the size line declares",
    ));
    // 2. The 4th line: 2 GiB of digits, no newline.
    let d = mtx_dir(&staging.join("mtx-2gib-line"), b"g1\tA\ng2\tB\n", b"c1\n");
    gz_repeated(
        &d.join("matrix.mtx.gz"),
        format!("{HEADER}%comment\n2 1 1\n").as_bytes(),
        &vec![b'7'; 64 * MIB],
        32,
    );
    c.push((
        "mtx-2gib-line".into(),
        "read/invalid",
        "line 4: longer than the limit of 1048576 bytes",
    ));
    // 3. features.tsv.gz of 55 M lines beside a 30,727-row matrix.
    let d = mtx_dir(&staging.join("features-55m-lines"), b"", b"c1\n");
    std::fs::write(d.join("matrix.mtx"), format!("{HEADER}30727 1 1\n1 1 5\n")).unwrap();
    gz_repeated(
        &d.join("features.tsv.gz"),
        b"",
        &b"ENSG00000141510\tTP53\tGene\n".repeat(1_000_000),
        55,
    );
    c.push((
        "features-55m-lines".into(),
        "read/invalid",
        "line 30728: more features (rows) than the 30727",
    ));
    // A size line claiming more cells than the cap.
    let d = mtx_dir(&staging.join("mtx-claims-300k-cells"), b"g1\tA\n", b"c1\n");
    std::fs::write(d.join("matrix.mtx"), format!("{HEADER}1 300000 1\n1 1 1\n")).unwrap();
    c.push((
        "mtx-claims-300k-cells".into(),
        "read/too_large",
        "300000 cells, over the max_cells cap of 200000",
    ));
    // A 1 MiB entry line of junk, quoted in the report: by a prefix and its length.
    let d = mtx_dir(&staging.join("mtx-junk-entry"), b"g1\tA\n", b"c1\n");
    let mut m = format!("{HEADER}1 1 1\n1 1 ").into_bytes();
    m.extend(vec![b'x'; MIB - 10]);
    m.push(b'\n');
    std::fs::write(d.join("matrix.mtx"), m).unwrap();
    c.push((
        "mtx-junk-entry".into(),
        "read/invalid",
        "bytes) is not a number",
    ));
    // A gene symbol of 500 kB.
    let mut f = b"g1\t".to_vec();
    f.extend(vec![b'G'; 500_000]);
    f.push(b'\n');
    let d = mtx_dir(&staging.join("mtx-long-gene-name"), &f, b"c1\n");
    std::fs::write(d.join("matrix.mtx"), format!("{HEADER}1 1 1\n1 1 1\n")).unwrap();
    c.push((
        "mtx-long-gene-name".into(),
        "read/invalid",
        "longer than the limit of 256 bytes on a name",
    ));
    // A .csb.zst whose section table spans a terabyte: refused from its header.
    let mut b = small_csb();
    b[32 + 16 * 4..32 + 16 * 4 + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(
        staging.join("zst-span-1tb.csb.zst"),
        zstd::encode_all(&b[..], 3).unwrap(),
    )
    .unwrap();
    c.push((
        "zst-span-1tb.csb.zst".into(),
        "read/too_large",
        "the header's sections span",
    ));
    // Dense text: a 20 MiB line; a header of 250,000 barcodes.
    let mut t = b"c1\tc2\nA\t".to_vec();
    t.extend(vec![b'1'; 20 * MIB]);
    std::fs::write(staging.join("dense-20mib-line.txt"), t).unwrap();
    c.push((
        "dense-20mib-line.txt".into(),
        "read/invalid",
        "line 2: longer than the limit of 16777216 bytes",
    ));
    let header: Vec<String> = (0..250_000).map(|i| format!("c{i}")).collect();
    std::fs::write(
        staging.join("dense-250k-cells.txt"),
        format!("{}\nA{}\n", header.join("\t"), "\t1".repeat(250_000)),
    )
    .unwrap();
    c.push((
        "dense-250k-cells.txt".into(),
        "read/too_large",
        "over the max_cells cap of 200000",
    ));
    c
}

/// The hostile inputs through a running daemon with the default caps: each refused
/// at the first excess, its report small and to the point, a good batch after each processed,
/// and the daemon's peak resident memory over the whole corpus within 256 MiB.
#[test]
fn hostile_inputs_are_refused_at_the_first_excess_within_256_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let staging = root.join("staging");
    std::fs::create_dir(&staging).unwrap();
    let corpus = hostile(&staging);
    let good = root.join("good.csb");
    std::fs::write(&good, small_csb()).unwrap();

    write_config(root, "", "", "[pipeline]\nthreads = 1\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    drop_batch(&d.incoming, &good, "good-000.csb");
    wait_for(Duration::from_secs(60), "the first good batch", || {
        d.out.join("good-000.ndjson").exists()
    });
    let before = daemon.peak_rss();
    for (k, (name, _, _)) in corpus.iter().enumerate() {
        std::fs::rename(staging.join(name), d.incoming.join(name)).unwrap();
        drop_batch(&d.incoming, &good, &format!("good-{:03}.csb", k + 1));
    }
    wait_for(Duration::from_secs(300), "every entry to settle", || {
        names_in(&d.incoming).is_empty() && names_in(&d.processing).is_empty()
    });
    for k in 0..=corpus.len() {
        let out = std::fs::read_to_string(d.out.join(format!("good-{k:03}.ndjson")));
        assert_eq!(out.unwrap_or_default().lines().count(), 4, "good-{k:03}");
    }
    for (name, kind, fragment) in &corpus {
        let path = d.failed.join(format!("{name}.error.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{name}: no error report in failed/"));
        eprintln!("{name}: {} bytes: {text}", text.len());
        assert!(
            text.len() < 4096,
            "{name}: a report of {} bytes",
            text.len()
        );
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let error = r["error"].as_str().unwrap();
        assert_eq!(
            format!(
                "{}/{}",
                r["stage"].as_str().unwrap(),
                r["kind"].as_str().unwrap()
            ),
            *kind,
            "{name}: {error}"
        );
        assert!(error.contains(name.as_str()), "{name}: {error}");
        assert!(error.contains(fragment), "{name}: {error}");
    }
    // The log's lines stay small too.
    let longest = daemon.log_text().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
    let peak = daemon.peak_rss();
    eprintln!(
        "peak RSS {} MiB before the hostile corpus, {} MiB after",
        before >> 20,
        peak >> 20
    );
    assert!(peak <= 256 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(
        peak - before < 64 << 20,
        "the corpus raised the peak by {} MiB",
        (peak - before) >> 20
    );
    assert_eq!(get(&daemon.addr, "/readyz").unwrap().0, 200);
}

/// Writes pbmc3k's cells `copies` times over as one MTX directory (barcodes suffixed `-rK`):
/// 8 copies are 21,104 cells and 17.9 M counts, the legitimate large run.
fn pbmc3k_times(copies: usize, dir: &Path) -> (usize, usize) {
    let src = common::read(&common::pbmc3k());
    std::fs::create_dir_all(dir).unwrap();
    let mut m = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(dir.join("matrix.mtx")).unwrap(),
    );
    let cells = src.n_cells() * copies;
    writeln!(
        m,
        "{HEADER}{} {} {}",
        src.n_genes(),
        cells,
        src.nnz() * copies
    )
    .unwrap();
    let mut barcodes = String::new();
    for k in 0..copies {
        for i in 0..src.n_cells() {
            let cell = src.cell(i);
            let col = k * src.n_cells() + i + 1;
            for (&g, &c) in cell.genes.iter().zip(cell.counts) {
                writeln!(m, "{} {col} {c}", g + 1).unwrap();
            }
            barcodes.push_str(&format!("{}-r{k}\n", src.barcodes[i]));
        }
    }
    m.flush().unwrap();
    let ids = src.gene_ids.clone().unwrap();
    let features: String = ids
        .iter()
        .zip(&src.gene_names)
        .map(|(id, name)| format!("{id}\t{name}\tGene Expression\n"))
        .collect();
    std::fs::write(dir.join("features.tsv"), features).unwrap();
    std::fs::write(dir.join("barcodes.tsv"), barcodes).unwrap();
    (cells, src.nnz() * copies)
}

/// A legitimate 21,104-cell, 17.9 M-count MTX through the daemon: embedded whole, at a peak
/// resident memory within 400 MiB (it was 630 MB for `embed` when the text was held).
#[test]
fn a_21k_cell_mtx_is_embedded_within_400_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, d) = (tmp.path(), dirs(tmp.path()));
    let src = root.join("pbmc21k");
    let (cells, counts) = pbmc3k_times(8, &src);
    assert_eq!(cells, 21_104);
    write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    let ready = daemon.peak_rss();
    drop_batch(&d.incoming, &src, "pbmc21k");
    wait_for(Duration::from_secs(900), "the 21k-cell batch", || {
        d.out.join("pbmc21k.summary.json").exists() || !names_in(&d.failed).is_empty()
    });
    assert_eq!(
        names_in(&d.failed),
        Vec::<String>::new(),
        "{}",
        daemon.log_text()
    );
    let out = output(&d, "pbmc21k").unwrap();
    assert_eq!(out.lines().count(), cells);
    let peak = daemon.peak_rss();
    eprintln!(
        "{cells} cells, {counts} counts: peak RSS {} MiB ({} MiB once ready)",
        peak >> 20,
        ready >> 20
    );
    assert!(peak <= 400 << 20, "peak RSS {} MiB", peak >> 20);
}

/// The memory budget refuses, before reading, a batch whose claims cannot fit (naming the
/// budget); the caps refuse a batch over them (naming the cap and the value) and take effect
/// again on SIGHUP; good batches go on.
#[test]
fn the_budget_and_the_caps_quarantine_what_cannot_fit_and_reload() {
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&[("four.csb", 0..4), ("five", 4..9)]);
    let root = tmp.path();
    // 20 M stored counts claimed (160 MB as CSR alone) by a file of 60 bytes.
    let liar = root.join("liar");
    std::fs::create_dir(&liar).unwrap();
    std::fs::write(
        liar.join("matrix.mtx"),
        format!("{HEADER}2 1 20000000\n1 1 1\n"),
    )
    .unwrap();
    std::fs::write(liar.join("features.tsv"), "g1\tA\ng2\tB\n").unwrap();
    std::fs::write(liar.join("barcodes.tsv"), "c1\n").unwrap();

    let config = |max_cells: u64| {
        write_config(
            root,
            &format!("max_cells = {max_cells}"),
            "",
            "[pipeline]\nthreads = 1\nmemory_budget = 167772160\n",
        )
    };
    config(4);
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    assert!(
        daemon
            .log_text()
            .contains("memory budget 160.0 MiB (pipeline.memory_budget)"),
        "{}",
        daemon.log_text()
    );
    drop_batch(&d.incoming, &liar, "liar");
    drop_batch(&d.incoming, &src.join("four.csb"), "four.csb");
    drop_batch(&d.incoming, &src.join("five"), "five");
    wait_for(Duration::from_secs(60), "three batches to settle", || {
        names_in(&d.incoming).is_empty()
            && names_in(&d.processing).is_empty()
            && d.out.join("four.summary.json").exists()
    });
    let report = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(d.failed.join(format!("{name}.error.json")))
            .unwrap_or_else(|_| panic!("{name}: no report"));
        eprintln!("{text}");
        serde_json::from_str(&text).unwrap()
    };
    let r = report("liar");
    assert_eq!(r["kind"], "too_large");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("memory budget of 160.0 MiB (pipeline.memory_budget)")
            && error.contains("20000000 stored counts"),
        "{error}"
    );
    let r = report("five");
    assert_eq!(r["kind"], "too_large");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("5 cells, over the max_cells cap of 4"),
        "{r}"
    );
    assert_eq!(
        output(&d, "four").as_deref(),
        Some(expected["four"].as_str())
    );

    // Raised on SIGHUP: the same batch sent again goes through.
    config(10);
    daemon.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload", || {
        daemon.log_text().contains("SIGHUP: reloaded")
    });
    drop_batch(&d.incoming, &src.join("five"), "five");
    wait_for(Duration::from_secs(60), "the batch sent again", || {
        d.out.join("five.summary.json").exists()
    });
    assert_eq!(
        output(&d, "five").as_deref(),
        Some(expected["five"].as_str())
    );
}

fn caps(cells: u64, genes: u64, stored: u64) -> Caps {
    Caps {
        max_cells: cells,
        max_genes: genes,
        max_stored_counts: stored,
    }
}

fn refused(path: &Path, opts: &ReadOptions, caps: &Caps) -> BatchError {
    match read_batch_capped(path, opts, caps) {
        Ok(b) => panic!("{} was accepted: {b:?}", path.display()),
        Err(e) => e,
    }
}

/// Every reader holds to the caps, refusing with `too_large` and the cap named, from its
/// header where it has one.
#[test]
fn every_reader_holds_to_the_caps() {
    let _turn = common::hdf5_or_spawn(); // see common::HDF5_OR_SPAWN
    let dir = tempfile::tempdir().unwrap();
    let base: CountBatch = common::read(&common::repo().join("bench-data/pbmc68k_reduced"));
    let b = base.select(0..10);
    let (cells, genes, nnz) = (b.n_cells() as u64, b.n_genes() as u64, b.nnz() as u64);
    let mtx = dir.path().join("b");
    write_mtx_dir(&b, &mtx);
    let csb = dir.path().join("b.csb");
    let zst = dir.path().join("b.csb.zst");
    cellstream::batch::write_csb_file(&b, &csb).unwrap();
    cellstream::batch::write_csb_file(&b, &zst).unwrap();
    let mapped = ReadOptions::default();
    let copied = ReadOptions {
        memory_map: false,
        ..ReadOptions::default()
    };
    for (path, opts) in [
        (&mtx, &mapped),
        (&csb, &mapped),
        (&csb, &copied),
        (&zst, &mapped),
    ] {
        let what = path.display();
        let ok = read_batch_capped(path, opts, &caps(cells, genes, nnz)).unwrap();
        assert_eq!(ok.n_cells(), b.n_cells(), "{what}");
        for (c, key, value) in [
            (caps(cells - 1, genes, nnz), "max_cells", cells),
            (caps(cells, genes - 1, nnz), "max_genes", genes),
            (caps(cells, genes, nnz - 1), "max_stored_counts", nnz),
        ] {
            let e = refused(path, opts, &c);
            assert_eq!(e.kind.name(), "too_large", "{what}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{value} ")) && msg.contains(&format!("over the {key} cap")),
                "{what}: {msg}"
            );
        }
    }
    // Dense text: refused at the first line past a cap.
    let dense = dir.path().join("d.txt");
    std::fs::write(&dense, "c1\tc2\tc3\nA\t1\t0\t2\nB\t0\t0\t1\nC\t4\t4\t4\n").unwrap();
    assert_eq!(
        read_batch_capped(&dense, &mapped, &caps(3, 3, 6))
            .unwrap()
            .nnz(),
        6
    );
    for (c, want) in [
        (
            caps(2, 3, 6),
            "line 1 names 3 cells (barcodes), over the max_cells cap of 2",
        ),
        (
            caps(3, 2, 6),
            "line 4: more than the max_genes cap of 2 genes",
        ),
        (
            caps(3, 3, 5),
            "line 4: more than the max_stored_counts cap of 5",
        ),
    ] {
        let e = refused(&dense, &mapped, &c).to_string();
        assert!(e.contains(want), "{e}");
    }
    // MTX members with more lines than the matrix has rows or columns, at the first one over.
    let d = dir.path().join("extra");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("matrix.mtx"), format!("{HEADER}2 2 1\n1 1 1\n")).unwrap();
    std::fs::write(d.join("features.tsv"), "a\tA\nb\tB\n").unwrap();
    std::fs::write(d.join("barcodes.tsv"), "c1\nc2\nc3\nc4\n").unwrap();
    let e = refused(&d, &mapped, &Caps::default()).to_string();
    assert!(
        e.contains("barcodes.tsv") && e.contains("line 3: more barcodes (columns) than the 2"),
        "{e}"
    );
    #[cfg(feature = "hdf5")]
    {
        let h5 = common::fixture("formats/scanpy_10x_v3/filtered_feature_bc_matrix.h5");
        let e = refused(&h5, &mapped, &caps(10, 1_000_000, 1 << 30));
        assert_eq!(e.kind.name(), "too_large");
        assert!(
            e.to_string().contains("over the max_cells cap of 10"),
            "{e}"
        );
    }
}

/// The commands take the same caps as flags, and say which one refused the input.
#[test]
fn the_commands_take_the_caps_as_flags() {
    let _turn = common::hdf5_or_spawn(); // see common::HDF5_OR_SPAWN
    let dir = common::repo().join("bench-data/pbmc68k_reduced");
    let out = common::cellstream(&["inspect", dir.to_str().unwrap(), "--max-cells", "100"]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("too large") && err.contains("700 cells, over the max_cells cap of 100"),
        "{err}"
    );
    let out = common::cellstream(&["inspect", dir.to_str().unwrap(), "--max-cells", "700"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let out = common::cellstream(&[
        "inspect",
        dir.to_str().unwrap(),
        "--max-decompressed-bytes",
        "1000",
    ]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cap of 1000 bytes"), "{err}");
}
