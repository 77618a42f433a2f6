//! The daemon with `[model] reference`: its records are `embed --reference`'s, byte for byte;
//! its batch summaries carry the run-level QC against the reference (composition, drift,
//! median novelty), and so do its metrics.

use std::time::Duration;

use crate::common;
use crate::common::daemon::*;

#[test]
fn the_daemon_maps_on_its_reference_as_embed_does_and_reports_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let d = dirs(root);
    let base = pbmc68k();
    let src = root.join("src");
    std::fs::create_dir(&src).unwrap();
    // The reference: the first 500 cells; the batches: the other 200, in two.
    write_batch(&base.select(0..500), &src.join("ref.csb"));
    write_batch(&base.select(500..600), &src.join("q1.csb"));
    write_batch(&base.select(600..700), &src.join("q2.csb"));
    let reference = root.join("reference");
    let labels = common::repo().join("bench-data/pbmc68k_reduced/labels.tsv");
    let out = {
        let _turn = common::hdf5_or_spawn();
        common::cellstream(&[
            "reference",
            src.join("ref.csb").to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--column",
            "cell_type_coarse",
            "--out",
            reference.to_str().unwrap(),
        ])
    };
    assert!(out.status.success(), "{}", common::stderr(&out));
    let mut expected = std::collections::BTreeMap::new();
    for id in ["q1", "q2"] {
        let path = root.join(format!("{id}.ndjson"));
        let run = {
            let _turn = common::hdf5_or_spawn();
            common::cellstream(&[
                "embed",
                src.join(format!("{id}.csb")).to_str().unwrap(),
                "--reference",
                reference.to_str().unwrap(),
                "--out",
                path.to_str().unwrap(),
            ])
        };
        assert!(run.status.success(), "{}", common::stderr(&run));
        expected.insert(id, std::fs::read_to_string(path).unwrap());
    }

    let extra = format!("[model]\nreference = {:?}\n", reference.to_str().unwrap());
    write_config(root, "", "", &extra);
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    for id in ["q1", "q2"] {
        drop_batch(
            &d.incoming,
            &src.join(format!("{id}.csb")),
            &format!("{id}.csb"),
        );
    }
    // The summary is written after the records are committed.
    wait_for(
        Duration::from_secs(60),
        "both batches and summaries",
        || {
            ["q1", "q2"]
                .iter()
                .all(|id| d.out.join(format!("{id}.summary.json")).exists())
        },
    );
    for (id, want) in &expected {
        assert_eq!(
            &output(&d, id).unwrap(),
            want,
            "{id}: differs from embed --reference"
        );
        assert!(want.lines().all(|l| l.contains("\"novelty\":")));
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.out.join(format!("{id}.summary.json"))).unwrap(),
        )
        .unwrap();
        let r = &summary["reference"];
        let drift = r["composition_drift"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&drift), "{summary}");
        assert!(r["median_novelty"].as_f64().unwrap() > 0.0, "{summary}");
        assert!(
            r["composition"]["CD14 Mono"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
        let shares: f64 = summary["composition"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((shares - 1.0).abs() < 1e-9, "{summary}");
    }
    assert!(daemon.metric("cellstream_last_batch_median_novelty") > 0.0);
    let drift = daemon.metric("cellstream_last_batch_composition_drift");
    assert!((0.0..=1.0).contains(&drift));
}
