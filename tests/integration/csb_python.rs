//! The dependency-free Python writer/reader (tools/csb.py) and the Rust side agree on .csb.

use crate::common;
use std::process::Command;

use crate::common::{fixture, read};
use cellstream::batch::{write_csb, write_csb_file};

/// tests/fixtures/python_written.csb was written by `python3 tools/csb.py write-sample`.
#[test]
fn rust_reads_what_python_wrote() {
    let b = read(&fixture("python_written.csb"));
    assert_eq!(
        b.gene_names,
        ["CD3E", "HLA-DRB1", "Ä-test", "MS4A1", "NKG7"]
    );
    assert_eq!(
        b.gene_ids.as_deref().unwrap(),
        [
            "ENSG00000198851",
            "ENSG00000196126",
            "TEST-Ä-0001",
            "ENSG00000156738",
            "ENSG00000105374"
        ]
    );
    assert_eq!(
        b.barcodes,
        [
            "AAACCTGAGAAACCAT-1",
            "AAACCTGAGAAACCGC-1",
            "AAACCTGAGAAACCTA-1"
        ]
    );
    assert_eq!(b.indptr(), &[0, 3, 3, 5]);
    assert_eq!(b.indices(), &[0, 1, 4, 2, 3]);
    assert_eq!(b.data(), &[1, 4_000_000_000, 7, 0, u32::MAX]);
    // And the Rust writer produces the very same bytes.
    let mut mine = Vec::new();
    write_csb(&b, &mut mine).unwrap();
    assert_eq!(mine, std::fs::read(fixture("python_written.csb")).unwrap());
}

/// Python reads what Rust wrote (skipped, with a note, where no python3 is installed:
/// CI never needs Python).
#[test]
fn python_reads_what_rust_wrote() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not found: skipping the live Python half of the round trip");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = read(&fixture("formats/scanpy_10x_v3/filtered_feature_bc_matrix"));
    let out = dir.path().join("v3.csb");
    write_csb_file(&src, &out).unwrap();
    let tool = common::repo().join("tools/csb.py");
    let res = Command::new("python3")
        .arg(&tool)
        .arg("dump")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    let as_u64 = |k: &str| -> Vec<u64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    assert_eq!(as_u64("indptr"), src.indptr());
    assert_eq!(
        as_u64("indices"),
        src.indices().iter().map(|&x| x as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        as_u64("data"),
        src.data().iter().map(|&x| x as u64).collect::<Vec<_>>()
    );
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(strings("gene_names"), src.gene_names);
    assert_eq!(strings("barcodes"), src.barcodes);
    assert_eq!(Some(strings("gene_ids")), src.gene_ids);
}
