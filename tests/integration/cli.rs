//! The command-line contract (DESIGN.md §8), run through the real binary.

use crate::common;
use crate::common::{cellstream, stderr};

#[test]
fn tokenize_writes_one_line_per_cell_in_the_contract_format() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tokens.jsonl");
    let input = common::pbmc3k();
    let vocab = common::vocab_path();
    let res = cellstream(&[
        "tokenize",
        input.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
        "--ties",
        "numpy",
        "--seed",
        "0",
        "--max-len",
        "100000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2638);
    // Exactly the three keys, in this order, values as JSON floats.
    assert!(
        lines[0].starts_with("{\"cell\": \"AAACATACAACCAC-1\", \"gene_ids\": [48293, 23308, "),
        "{}",
        &lines[0][..80]
    );
    assert!(
        lines[0].contains("\"values\": [-2.0, 16.0, 10.0, 37.0,"),
        "numpy mode, seed 0, as the fixture"
    );
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first.as_object().unwrap().len(), 3);
    assert_eq!(
        first["gene_ids"].as_array().unwrap().len(),
        first["values"].as_array().unwrap().len()
    );
}

#[test]
fn tokenize_default_max_len_and_stdout() {
    let input =
        common::repo().join("tests/fixtures/formats/scanpy_10x_v3/filtered_feature_bc_matrix");
    let vocab = common::vocab_path();
    let res = cellstream(&[
        "tokenize",
        input.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
        "--max-len",
        "8",
        "--out",
        "-",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let text = String::from_utf8(res.stdout).unwrap();
    assert_eq!(text.lines().count(), 1107);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ids = v["gene_ids"].as_array().unwrap();
        assert!(ids.len() <= 8 && ids[0] == 48293);
    }
}

#[test]
fn tokenize_rejects_bad_usage_with_exit_2() {
    let input = common::pbmc3k();
    let vocab = common::vocab_path();
    let base = [
        "tokenize",
        input.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
        "--out",
        "-",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        cellstream(&a)
    };
    assert_eq!(
        with(&["--ties", "numpy", "--seed", "4294967296"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(with(&["--ties", "fair"]).status.code(), Some(2));
    assert_eq!(with(&["--max-len", "1"]).status.code(), Some(2));
    let bad_vocab = cellstream(&[
        "tokenize",
        input.to_str().unwrap(),
        "--vocab",
        "/nonexistent/vocab.json",
        "--out",
        "-",
    ]);
    assert_eq!(bad_vocab.status.code(), Some(2));
    assert!(stderr(&bad_vocab).contains("/nonexistent/vocab.json"));
}

#[test]
fn inspect_reports_shape_kind_and_coverage() {
    let input = common::pbmc3k();
    let vocab = common::vocab_path();
    let res = cellstream(&[
        "inspect",
        input.to_str().unwrap(),
        "--vocab",
        vocab.to_str().unwrap(),
        "--json",
    ]);
    assert!(res.status.success(), "{}", stderr(&res));
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(v["cells"], 2638);
    assert_eq!(v["genes"], 32738);
    assert_eq!(v["nnz"], 2_242_529);
    assert_eq!(v["gene_name_kind"], "symbol");
    assert_eq!(v["vocab"]["genes_matched"], 19517);
    let covered = v["vocab"]["counts_matched_fraction"].as_f64().unwrap();
    assert!((covered - 0.96).abs() < 0.005, "{covered}");
    let text = cellstream(&[
        "inspect",
        common::repo()
            .join("tests/fixtures/formats/scanpy_10x_v3/filtered_feature_bc_matrix")
            .to_str()
            .unwrap(),
    ]);
    let out = String::from_utf8(text.stdout).unwrap();
    assert!(
        out.contains("1107 cells × 507 genes") && out.contains("feature ids: ensembl"),
        "{out}"
    );
}
