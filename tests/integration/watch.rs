//! What a person watching a run sees: the live page in a real browser, the Grafana
//! dashboard and Prometheus rules against a running daemon's metrics, and Parquet output
//! against the NDJSON records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::browser::{self, Browser};
use crate::common::daemon::*;
use crate::common::{self, cellstream, repo, stderr};

const TOKEN: &str = "watch-token-0123456789abcdef";

/// A reference built from pbmc68k's labelled cells (coarse types) in `dir`.
fn build_reference(dir: &Path) -> PathBuf {
    let out = dir.join("ref68k");
    let data = repo().join("bench-data/pbmc68k_reduced");
    let run = {
        let _turn = common::hdf5_or_spawn();
        cellstream(&[
            "reference",
            data.to_str().unwrap(),
            "--labels",
            data.join("labels.tsv").to_str().unwrap(),
            "--column",
            "cell_type_coarse",
            "--threads",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        out.join("layout.f32").is_file(),
        "a reference ships its map"
    );
    out
}

fn summary_of(d: &Spooled, id: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(d.out.join(format!("{id}.summary.json"))).unwrap(),
    )
    .unwrap()
}

/// Where the test keeps its screenshot: under the build's target folder.
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// What the page shows, read from its DOM.
const PAGE_STATE: &str = r#"JSON.stringify({
  rows: [...document.querySelectorAll('#batches tbody tr')].map(tr => ({
    batch: tr.dataset.batch, outcome: tr.dataset.outcome,
    cells: tr.children[2].textContent, text: tr.textContent})),
  legend: [...document.querySelectorAll('#legend li')].map(li => ({
    label: li.dataset.label, cells: li.dataset.cells, text: li.textContent})),
  bars: [...document.querySelectorAll('#composition text')].map(t => t.textContent),
  totals: document.getElementById('totals').textContent,
  map: document.getElementById('map').dataset.cells || '0',
  mapNote: document.getElementById('map-note').textContent,
  qc: document.querySelectorAll('#qc svg').length,
  alerts: [...document.querySelectorAll('#alerts li')].map(li => [li.dataset.alert, li.className]),
  live: document.getElementById('live').textContent,
  errors: document.getElementById('errors').textContent,
})"#;

#[test]
fn the_live_page_shows_the_run_in_a_browser_and_follows_it() {
    let Some(chromium) = browser::find() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromium (.ci/run installs it)"
        );
        eprintln!("skipped: no chromium on PATH (Debian: apt-get install chromium)");
        return;
    };
    let batches = [("early", 0..40), ("late.csb", 40..100)];
    let Setup { tmp, d, src, .. } = setup(&batches);
    let root = tmp.path();
    let reference = build_reference(root);
    std::fs::write(root.join("token"), TOKEN).unwrap();
    write_config(
        root,
        "",
        &format!("token_file = {:?}", root.join("token")),
        &format!("[model]\nreference = {reference:?}\n[pipeline]\nthreads = 2\n"),
    );
    let daemon = Daemon::start(root, &[]);
    let auth = [("Authorization", &*format!("Bearer {TOKEN}"))];
    wait_for(Duration::from_secs(120), "ready", || {
        request(&daemon.addr, "GET", "/readyz", &auth, None).is_ok_and(|(s, _)| s == 200)
    });

    // Token auth, as for every endpoint: the page, its assets and its data.
    for path in ["/", "/ui/page.js", "/v1/run", "/v1/cells", "/v1/events"] {
        let (status, _) = get(&daemon.addr, path).unwrap();
        assert_eq!(status, 401, "{path} without the token");
    }
    let (status, _) = get(&daemon.addr, "/?token=not-the-token-at-all").unwrap();
    assert_eq!(status, 401);
    let cookie = [("Cookie", &*format!("cellstream_token={TOKEN}"))];
    let (status, run) = request(&daemon.addr, "GET", "/v1/run", &cookie, None).unwrap();
    assert_eq!(status, 200, "the page's cookie reads");
    assert!(run.contains("\"batches\":[]"), "{run}");
    let (status, _) = request(
        &daemon.addr,
        "POST",
        "/v1/batches?name=x.csb",
        &cookie,
        Some(b"x"),
    )
    .unwrap();
    assert_eq!(status, 401, "the cookie never uploads");

    // One batch and one broken input before the page is opened...
    drop_batch(&d.incoming, &src.join("early"), "early");
    std::fs::write(d.incoming.join("broken.csb"), b"CSB1 but not really").unwrap();
    wait_for(Duration::from_secs(120), "the first batch", || {
        d.out.join("early.summary.json").exists() && d.failed.join("broken.csb").exists()
    });

    let mut b = Browser::launch(&chromium, 1300, 1000);
    // A browser cannot send a bearer header: it opens the page once with ?token=, which
    // sets the cookie and sends it to ./ (relative: a proxy's prefix is kept).
    b.open(&format!("http://{}/?token={TOKEN}", daemon.addr));
    b.wait_until(
        "document.querySelectorAll('#batches tbody tr').length === 2 && document.getElementById('live').textContent === 'live'",
        Duration::from_secs(60),
        PAGE_STATE,
    );
    assert_eq!(
        b.eval("location.search"),
        "",
        "the token left the address bar"
    );

    // ... and one while it is open: it arrives over the event stream.
    drop_batch(&d.incoming, &src.join("late.csb"), "late.csb");
    b.wait_until(
        "!!document.querySelector('#batches tr[data-batch=\"late\"]') && Number(document.getElementById('map').dataset.cells) > 40",
        Duration::from_secs(120),
        PAGE_STATE,
    );
    let state: serde_json::Value =
        serde_json::from_str(b.eval(PAGE_STATE).as_str().unwrap()).unwrap();
    b.screenshot(&artifact("live-page.png"));
    eprintln!("screenshot: {}", artifact("live-page.png").display());

    let errors = b.errors();
    assert!(
        errors.is_empty(),
        "JavaScript or browser errors: {errors:#?}"
    );
    assert_eq!(state["errors"], "", "{state:#}");

    // Each batch: its name, outcome and cell count; the quarantined one with its error kind.
    let rows = state["rows"].as_array().unwrap();
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["batch"] == id)
            .unwrap_or_else(|| panic!("no row for {id}: {state:#}"))
    };
    let mut labels = BTreeMap::<String, u64>::new();
    for (id, cells) in [("early", 40), ("late", 60)] {
        let s = summary_of(&d, id);
        let r = row(id);
        assert_eq!(r["outcome"], "ok");
        assert_eq!(r["cells"], cells.to_string());
        let median_genes = s["median"]["n_genes"].as_f64().unwrap();
        assert!(
            r["text"]
                .as_str()
                .unwrap()
                .contains(&format!("{}", median_genes.round() as u64)),
            "{r}"
        );
        for (label, n) in s["labels"].as_object().unwrap() {
            *labels.entry(label.clone()).or_default() += n.as_u64().unwrap();
        }
    }
    let broken = row("broken");
    assert_eq!(broken["outcome"], "failed");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.failed.join("broken.csb.error.json")).unwrap(),
    )
    .unwrap();
    let kind = report["kind"].as_str().unwrap();
    assert!(
        broken["text"]
            .as_str()
            .unwrap()
            .contains(&format!("quarantined: read {kind}")),
        "{broken}"
    );

    // Every label seen, with its cells over the run; every reference label beside them.
    let legend: BTreeMap<String, String> = state["legend"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["label"].as_str().unwrap().into(),
                l["cells"].as_str().unwrap().into(),
            )
        })
        .collect();
    for (label, n) in &labels {
        assert_eq!(
            legend.get(label),
            Some(&n.to_string()),
            "{label}: {state:#}"
        );
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("reference.json")).unwrap())
            .unwrap();
    let reference_labels: BTreeSet<&str> = meta["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    for label in &reference_labels {
        assert!(legend.contains_key(*label), "{label} missing: {state:#}");
    }
    let bars: Vec<&str> = state["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        bars.contains(&"early") && bars.contains(&"late") && bars.contains(&"reference"),
        "{bars:?}"
    );
    assert!(
        state["totals"].as_str().unwrap().contains("100 cells"),
        "{state:#}"
    );
    assert!(state["mapNote"]
        .as_str()
        .unwrap()
        .contains("reference's map"));
    assert_eq!(state["qc"], 3);
    // The quarantine shows as an alert, as Prometheus would fire CellstreamQuarantineRate.
    let alerts = state["alerts"].as_array().unwrap();
    assert!(
        alerts.contains(&serde_json::json!(["CellstreamQuarantineRate", "firing"])),
        "{alerts:?}"
    );
    assert!(alerts.contains(&serde_json::json!(["CellstreamNotReady", "ok"])));
}

/// Every `cellstream_*` name in a file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("cellstream_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not part of a longer word (e.g. a "cellstream_token" cookie is no metric).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_a_daemon_exports() {
    let grafana = std::fs::read_to_string(repo().join("dashboards/grafana.json")).unwrap();
    let rules_path = repo().join("dashboards/alerts.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&grafana).expect("grafana.json is JSON");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains(&"instance"), "{variables:?}");
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("instance=~\"$instance\""), "{expr}");
        }
    }

    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have promtool (.ci/run installs Debian's prometheus)"
            );
            eprintln!("promtool not found (Debian: apt-get install prometheus): rules not checked");
        }
    }

    // A daemon that processed a batch and took an upload exports every name.
    let batches = [("one", 0..30)];
    let Setup { tmp, d, src, .. } = setup(&batches);
    let root = tmp.path();
    write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    drop_batch(&d.incoming, &src.join("one"), "one");
    // Counted once its output is committed (after the summary file is written).
    wait_for(Duration::from_secs(120), "the batch", || {
        daemon.metric("cellstream_batches_total{outcome=\"ok\"}") == 1.0
    });
    let (_, exported) = get(&daemon.addr, "/metrics").unwrap();
    let exported: BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    let named: BTreeSet<String> = metric_names(&grafana)
        .union(&metric_names(&rules))
        .cloned()
        .collect();
    assert!(named.len() > 10, "{named:?}");
    let missing: Vec<&String> = named.difference(&exported).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
}

/// The NDJSON records of `text`, every float as the f32 it stands for.
fn records(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| as_f32(serde_json::from_str(l).unwrap()))
        .collect()
}

/// `v` with every non-integer number rounded to f32 (the records' floats are f32 written
/// as the shortest decimal that reads back as the same f32).
fn as_f32(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => serde_json::json!(n.as_f64().unwrap() as f32),
        Value::Array(a) => Value::Array(a.into_iter().map(as_f32).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, as_f32(v))).collect()),
        v => v,
    }
}

/// A Parquet file's rows as the NDJSON records they stand for.
fn parquet_rows(path: &Path) -> Vec<serde_json::Value> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
    use arrow_array::Array;
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.unwrap();
        let names: Vec<&str> = b
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, cellstream::sink::parquet::COLUMNS);
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (batch_c, cell, index, label) = (col("batch"), col("cell"), col("index"), col("label"));
        let (conf, assigned, novelty, emb) = (
            col("confidence"),
            col("assigned"),
            col("novelty"),
            col("embedding"),
        );
        let (umis, genes, mito, vocab) = (
            col("total_counts"),
            col("n_genes"),
            col("pct_mito"),
            col("vocab_matched"),
        );
        let emb = emb.as_fixed_size_list();
        for i in 0..b.num_rows() {
            let f32_at = |a: &dyn Array| a.as_primitive::<Float32Type>().value(i);
            let mut r = serde_json::json!({
                "batch": batch_c.as_string::<i32>().value(i),
                "cell": cell.as_string::<i32>().value(i),
                "index": index.as_primitive::<UInt32Type>().value(i),
                "label": label.as_string::<i32>().value(i),
                "confidence": f32_at(&conf),
                "assigned": assigned.as_boolean().value(i),
                "embedding": if emb.is_null(i) { serde_json::Value::Null } else {
                    serde_json::json!(emb.value(i).as_primitive::<Float32Type>().values().to_vec())
                },
                "qc": {
                    "total_counts": umis.as_primitive::<UInt64Type>().value(i),
                    "n_genes": genes.as_primitive::<UInt32Type>().value(i),
                    "pct_mito": f32_at(&mito),
                    "vocab_matched": f32_at(&vocab),
                },
            });
            if !novelty.is_null(i) {
                r["novelty"] = serde_json::json!(f32_at(&novelty));
            }
            rows.push(as_f32(r));
        }
    }
    rows
}

#[test]
fn parquet_output_holds_the_ndjson_records_from_embed_and_the_daemon() {
    let batches = [("p1", 0..35), ("p2.csb", 35..80)];
    let Setup {
        tmp,
        d,
        src,
        expected,
    } = setup(&batches);
    let root = tmp.path();
    let want: Vec<serde_json::Value> = expected.values().flat_map(|t| records(t)).collect();

    // embed --out FILE.parquet: one file, a row group per input, rows = the NDJSON records.
    let table = root.join("cells.parquet");
    let run = {
        let _turn = common::hdf5_or_spawn();
        cellstream(&[
            "embed",
            "--threads",
            "2",
            src.join("p1").to_str().unwrap(),
            src.join("p2.csb").to_str().unwrap(),
            "--out",
            table.to_str().unwrap(),
        ])
    };
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("embedded 80 cells from 2 batch(es)"),
        "the closing line stays: {}",
        stderr(&run)
    );
    let rows = parquet_rows(&table);
    let sorted = |mut v: Vec<serde_json::Value>| {
        v.sort_by_key(|r| {
            (
                r["batch"].as_str().unwrap().to_string(),
                r["index"].as_u64(),
            )
        });
        v
    };
    assert_eq!(sorted(rows), sorted(want.clone()));

    // The daemon with [output] format = "parquet": <id>.parquet per batch, atomically.
    let config = write_config(root, "", "", "[pipeline]\nthreads = 2\n");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[output]\n", "[output]\nformat = \"parquet\"\n", 1),
    )
    .unwrap();
    let daemon = Daemon::start(root, &[]);
    daemon.wait_ready();
    for (name, _) in &batches {
        drop_batch(&d.incoming, &src.join(name), name);
    }
    wait_for(Duration::from_secs(120), "both batches", || {
        d.out.join("p1.summary.json").exists() && d.out.join("p2.summary.json").exists()
    });
    assert_eq!(
        names_in(&d.out),
        [
            "p1.parquet",
            "p1.summary.json",
            "p2.parquet",
            "p2.summary.json"
        ]
    );
    for (id, text) in &expected {
        assert_eq!(
            parquet_rows(&d.out.join(format!("{id}.parquet"))),
            records(text),
            "{id}"
        );
    }
    drop(daemon);

    // pandas and polars read it in one line, where a Python with them is at hand.
    let python = std::env::var("CELLSTREAM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        "import pandas, polars\n\
         df = pandas.read_parquet({path:?})\n\
         pl = polars.read_parquet({path:?})\n\
         assert len(df) == 80 and pl.height == 80, (len(df), pl.height)\n\
         assert len(df.embedding[0]) == 128 and str(pl.schema['embedding']).startswith('Array')\n\
         print('ok', list(df.columns))",
        path = table.display().to_string()
    );
    match std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
    {
        Ok(out) if out.status.success() => {
            eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim())
        }
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("ModuleNotFoundError") => {
            eprintln!("skipped the pandas/polars check: {python} lacks them")
        }
        Ok(out) => panic!("{python}: {}", String::from_utf8_lossy(&out.stderr)),
        Err(_) => eprintln!("skipped the pandas/polars check: no {python}"),
    }
}

/// Not a check: the README's picture of the page. Point it at a running daemon
/// (`CELLSTREAM_PAGE_URL`, with `?token=` if it has one) and it writes `docs/live-page.png`
/// once the page shows at least one batch:
/// `CELLSTREAM_PAGE_URL=http://127.0.0.1:9464/ cargo test --test integration readme_screenshot -- --ignored`
#[test]
#[ignore]
fn readme_screenshot() {
    let url = std::env::var("CELLSTREAM_PAGE_URL").expect("CELLSTREAM_PAGE_URL");
    let chromium = browser::find().expect("chromium on PATH");
    let mut b = Browser::launch(&chromium, 1300, 1250);
    b.open(&url);
    b.wait_until(
        "document.querySelectorAll('#batches tbody tr').length > 0 && Number(document.getElementById('map').dataset.cells) > 0",
        Duration::from_secs(60),
        PAGE_STATE,
    );
    std::thread::sleep(Duration::from_secs(2));
    b.screenshot(&common::repo().join("docs/live-page.png"));
}
