//! What the live page (`GET /`) shows: a bounded history of finished batches, run-wide QC
//! histograms, a bounded sample of cells placed on a 2-D map, and the alert conditions of
//! `dashboards/alerts.yml` evaluated here. The emit thread records each batch (and the
//! batch thread each quarantine); the HTTP handlers read it as JSON (`/v1/run`,
//! `/v1/cells`) and follow it as Server-Sent Events (`/v1/events`).
//!
//! Memory is bounded: at most [`HISTORY`] batches, [`SAMPLE`] cells (each with its
//! embedding), and fixed-width histograms.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::embed::CellResult;
use crate::reference::layout::Pca;
use crate::reference::Reference;
use crate::sink::summary::{BatchSummary, QcMedians, StageTimings};
use crate::source::unix_seconds;

/// Batches kept in the history the page starts from.
pub const HISTORY: usize = 500;
/// Cells kept for the map: a deterministic, evenly thinned sample of every cell of the run.
pub const SAMPLE: usize = 2000;
/// Reference cells drawn under the query cells on a reference's map.
pub const REFERENCE_POINTS: usize = 3000;
/// Updates a slow `/v1/events` client may fall behind before it is told to reload.
pub const EVENT_BUFFER: usize = 64;

/// The alert conditions, the same as `dashboards/alerts.yml` (a test holds the two
/// together): `(name, threshold, what)`.
pub mod alert {
    /// No batch finished for this many minutes while batches wait.
    pub const STALLED_MINUTES: f64 = 10.0;
    /// Quarantined share of the batches finished over the last 30 minutes.
    pub const QUARANTINE_RATE: f64 = 0.1;
    pub const QUARANTINE_WINDOW_MINUTES: f64 = 30.0;
    /// The last batch's unassigned fraction.
    pub const UNASSIGNED_FRACTION: f64 = 0.5;
    /// The last batch's median percent mitochondrial UMIs.
    pub const PCT_MITO: f64 = 20.0;
    /// The last batch's median novelty (the reference's own cells sit below 1).
    pub const MEDIAN_NOVELTY: f64 = 1.0;
    /// The last batch's total variation distance from the reference's composition.
    pub const COMPOSITION_DRIFT: f64 = 0.3;
    /// 95th percentile of a batch's claim-to-commit latency over 15 minutes, in seconds.
    pub const LATENCY_P95_SECONDS: f64 = 300.0;
    /// 95th percentile of a stage's time per batch over 15 minutes, in seconds.
    pub const STAGE_P95_SECONDS: f64 = 120.0;
    pub const LATENCY_WINDOW_MINUTES: f64 = 15.0;
}

/// Histogram bins of the QC figures: `n` bins from `lo` to `hi` (of log10 of the value
/// when `log`); values outside go to the first or last bin.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bins {
    pub log: bool,
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
}

impl Bins {
    fn index(&self, v: f64) -> usize {
        let x = if self.log { v.max(1.0).log10() } else { v };
        let i = ((x - self.lo) / (self.hi - self.lo) * self.n as f64).floor();
        (i.max(0.0) as usize).min(self.n - 1)
    }
}

pub const GENES_BINS: Bins = Bins {
    log: true,
    lo: 1.0,
    hi: 4.5,
    n: 35,
};
pub const UMIS_BINS: Bins = Bins {
    log: true,
    lo: 1.0,
    hi: 5.0,
    n: 40,
};
pub const MITO_BINS: Bins = Bins {
    log: false,
    lo: 0.0,
    hi: 50.0,
    n: 50,
};

/// Cells per bin of genes, UMIs and percent mito.
#[derive(Debug, Clone, Serialize)]
pub struct QcHist {
    pub n_genes: Vec<u64>,
    pub total_counts: Vec<u64>,
    pub pct_mito: Vec<u64>,
}

impl QcHist {
    fn new() -> QcHist {
        QcHist {
            n_genes: vec![0; GENES_BINS.n],
            total_counts: vec![0; UMIS_BINS.n],
            pct_mito: vec![0; MITO_BINS.n],
        }
    }

    fn of(results: &[CellResult]) -> QcHist {
        let mut h = QcHist::new();
        for r in results {
            h.n_genes[GENES_BINS.index(f64::from(r.qc.n_genes))] += 1;
            h.total_counts[UMIS_BINS.index(r.qc.total_counts as f64)] += 1;
            h.pct_mito[MITO_BINS.index(f64::from(r.qc.pct_mito))] += 1;
        }
        h
    }

    fn add(&mut self, other: &QcHist) {
        for (a, b) in [
            (&mut self.n_genes, &other.n_genes),
            (&mut self.total_counts, &other.total_counts),
            (&mut self.pct_mito, &other.pct_mito),
        ] {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
}

/// Why a batch did not produce output.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub stage: String,
    pub kind: String,
    pub error: String,
}

/// One finished batch as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Order of finishing, from 1.
    pub seq: u64,
    pub batch: String,
    pub file: String,
    /// `ok`, `failed` (quarantined: `problem` says why) or `retried` (output not writable).
    pub outcome: &'static str,
    /// Seconds since the Unix epoch.
    pub finished_at: f64,
    pub cells: usize,
    pub assigned: usize,
    pub labels: BTreeMap<String, usize>,
    pub composition: BTreeMap<String, f64>,
    pub unassigned_fraction: f64,
    pub median: QcMedians,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median_novelty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub composition_drift: Option<f64>,
    pub timings: StageTimings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qc: Option<QcHist>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

/// Run-wide counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub batches_ok: u64,
    pub batches_failed: u64,
    pub batches_retried: u64,
    pub cells: u64,
    pub labels: BTreeMap<String, u64>,
}

/// One alert condition, evaluated now.
#[derive(Debug, Clone, Serialize)]
pub struct AlertState {
    /// As in `dashboards/alerts.yml`.
    pub name: &'static str,
    pub firing: bool,
    pub value: Option<f64>,
    pub threshold: f64,
    pub summary: &'static str,
}

/// A sampled cell.
struct Sampled {
    ordinal: u64,
    batch: Arc<str>,
    label: String,
    embedding: Vec<f32>,
    /// On the reference's map (fixed once placed), or on the run's PCA (refitted per batch).
    xy: [f32; 2],
}

struct State {
    history: VecDeque<Entry>,
    seq: u64,
    totals: Totals,
    run_qc: QcHist,
    sample: Vec<Sampled>,
    /// Keep cell `ordinal` when `ordinal % stride == 0`; doubled whenever the sample is full.
    stride: u64,
    cells_seen: u64,
    reference: Option<Arc<Reference>>,
    pca: Option<Pca>,
    last_finished: Option<Instant>,
    ready_at: Option<Instant>,
}

/// The run as the page sees it; shared by the pipeline threads and the HTTP handlers.
pub struct Watch {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<str>>,
    started_at: f64,
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new()
    }
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            state: Mutex::new(State {
                history: VecDeque::new(),
                seq: 0,
                totals: Totals::default(),
                run_qc: QcHist::new(),
                sample: Vec::new(),
                stride: 1,
                cells_seen: 0,
                reference: None,
                pca: None,
                last_finished: None,
                ready_at: None,
            }),
            events: broadcast::channel(EVENT_BUFFER).0,
            started_at: unix_seconds(),
        }
    }

    /// The reference cells are mapped on (the page shows its composition and its map).
    pub fn set_reference(&self, reference: Arc<Reference>) {
        self.state.lock().unwrap().reference = Some(reference);
    }

    /// The model is warmed: the stalled condition counts from here.
    pub fn set_ready(&self) {
        self.state.lock().unwrap().ready_at = Some(Instant::now());
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// A committed batch: its summary, its cells (for the sample and the histograms).
    pub fn batch_ok(&self, summary: &BatchSummary, results: &[CellResult]) {
        let mut s = self.state.lock().unwrap();
        let qc = QcHist::of(results);
        s.run_qc.add(&qc);
        s.totals.batches_ok += 1;
        s.totals.cells += results.len() as u64;
        for (label, n) in &summary.labels {
            *s.totals.labels.entry(label.clone()).or_insert(0) += *n as u64;
        }
        let reference = summary.reference.as_ref();
        let entry = Entry {
            seq: 0,
            batch: summary.batch.clone(),
            file: summary.file.clone(),
            outcome: "ok",
            finished_at: unix_seconds(),
            cells: summary.cells,
            assigned: summary.assigned,
            labels: summary.labels.clone(),
            composition: summary.composition.clone(),
            unassigned_fraction: summary.unassigned_fraction,
            median: summary.median,
            median_novelty: reference.map(|r| r.median_novelty),
            composition_drift: reference.map(|r| r.composition_drift),
            timings: summary.timings,
            qc: Some(qc),
            problem: None,
        };
        s.sample_cells(&summary.batch, results);
        self.finish(s, entry);
    }

    /// A quarantined batch (`failed/`) or one whose output could not be written
    /// (`retried`).
    pub fn batch_failed(&self, outcome: &'static str, batch: &str, file: &str, problem: Problem) {
        let mut s = self.state.lock().unwrap();
        match outcome {
            "retried" => s.totals.batches_retried += 1,
            _ => s.totals.batches_failed += 1,
        }
        let entry = Entry {
            seq: 0,
            batch: batch.into(),
            file: file.into(),
            outcome,
            finished_at: unix_seconds(),
            cells: 0,
            assigned: 0,
            labels: BTreeMap::new(),
            composition: BTreeMap::new(),
            unassigned_fraction: 0.0,
            median: QcMedians::default(),
            median_novelty: None,
            composition_drift: None,
            timings: StageTimings::default(),
            qc: None,
            problem: Some(problem),
        };
        self.finish(s, entry);
    }

    fn finish(&self, mut s: std::sync::MutexGuard<'_, State>, mut entry: Entry) {
        s.seq += 1;
        entry.seq = s.seq;
        if entry.outcome != "retried" {
            s.last_finished = Some(Instant::now());
        }
        if s.history.len() == HISTORY {
            s.history.pop_front();
        }
        let update = serde_json::json!({
            "entry": &entry,
            "totals": &s.totals,
            "run_qc": &s.run_qc,
        });
        s.history.push_back(entry);
        drop(s);
        let _ = self.events.send(Arc::from(update.to_string()));
    }

    /// `GET /v1/run`: the model, the reference's composition, the history, run totals and
    /// histograms; `alerts` are evaluated by the caller (they need the metrics).
    pub fn run_json(&self, model: serde_json::Value, alerts: &[AlertState]) -> String {
        let s = self.state.lock().unwrap();
        let reference = s.reference.as_ref().map(|r| {
            serde_json::json!({
                "composition": &r.meta.composition,
                "labels": &r.meta.labels,
                "cells": r.meta.cells,
                "layout": r.layout().is_some(),
            })
        });
        serde_json::json!({
            "model": model,
            "reference": reference,
            "started_at": self.started_at,
            "now": unix_seconds(),
            "batches": &s.history,
            "totals": &s.totals,
            "run_qc": &s.run_qc,
            "bins": {"n_genes": GENES_BINS, "total_counts": UMIS_BINS, "pct_mito": MITO_BINS},
            "alerts": alerts,
            "limits": {"history": HISTORY, "sample": SAMPLE},
        })
        .to_string()
    }

    /// `GET /v1/cells`: the sampled cells' coordinates and labels (columns), and with a
    /// reference map, (a sample of) the reference's own cells under them.
    pub fn cells_json(&self) -> String {
        let s = self.state.lock().unwrap();
        let on_reference = s.reference.as_ref().filter(|r| r.layout().is_some());
        let projection = match (on_reference, &s.pca) {
            (Some(_), _) => "reference",
            (None, Some(_)) => "pca",
            (None, None) => "none",
        };
        let reference_cells = on_reference.map(|r| {
            let layout = r.layout().unwrap_or_default();
            let step = layout.len().div_ceil(REFERENCE_POINTS).max(1);
            let picked: Vec<usize> = (0..layout.len()).step_by(step).collect();
            serde_json::json!({
                "x": picked.iter().map(|&i| layout[i][0]).collect::<Vec<_>>(),
                "y": picked.iter().map(|&i| layout[i][1]).collect::<Vec<_>>(),
                "label": picked.iter().map(|&i| r.label_name(r.label_of(i))).collect::<Vec<_>>(),
            })
        });
        let cells = &s.sample;
        serde_json::json!({
            "projection": projection,
            "sampled_every": s.stride,
            "reference_cells": reference_cells,
            "cells": {
                "batch": cells.iter().map(|c| &*c.batch).collect::<Vec<_>>(),
                "label": cells.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
                "x": cells.iter().map(|c| c.xy[0]).collect::<Vec<_>>(),
                "y": cells.iter().map(|c| c.xy[1]).collect::<Vec<_>>(),
            },
        })
        .to_string()
    }

    /// The alert conditions now. `queued`: batches waiting before any stage (the
    /// `cellstream_queue_depth` gauges summed); `ready`: `cellstream_ready`.
    pub fn alerts(&self, queued: i64, ready: bool) -> Vec<AlertState> {
        use alert::*;
        let s = self.state.lock().unwrap();
        let now = unix_seconds();
        let last_ok = s.history.iter().rev().find(|e| e.outcome == "ok");
        let within = |minutes: f64| {
            s.history
                .iter()
                .filter(move |e| now - e.finished_at <= minutes * 60.0)
        };
        let since_progress = s
            .last_finished
            .or(s.ready_at)
            .map(|t| t.elapsed().as_secs_f64() / 60.0);
        let (ok, failed) =
            within(QUARANTINE_WINDOW_MINUTES).fold((0, 0), |(o, f), e| match e.outcome {
                "ok" => (o + 1, f),
                "failed" => (o, f + 1),
                _ => (o, f),
            });
        let quarantine_rate = (ok + failed > 0).then(|| failed as f64 / (ok + failed) as f64);
        let p95 = |pick: &dyn Fn(&Entry) -> f64| {
            let mut v: Vec<f64> = within(LATENCY_WINDOW_MINUTES)
                .filter(|e| e.outcome == "ok")
                .map(pick)
                .collect();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| v[((v.len() as f64 * 0.95).ceil() as usize).max(1) - 1])
        };
        let latency = p95(&|e| e.timings.latency);
        let stage = [
            p95(&|e| e.timings.read),
            p95(&|e| e.timings.tokenize),
            p95(&|e| e.timings.infer),
            p95(&|e| e.timings.emit),
        ]
        .into_iter()
        .flatten()
        .max_by(f64::total_cmp);
        let over = |v: Option<f64>, t: f64| v.is_some_and(|v| v > t);
        let stalled = ready && queued > 0 && over(since_progress, STALLED_MINUTES);
        let last = |f: &dyn Fn(&Entry) -> Option<f64>| last_ok.and_then(f);
        let unassigned = last(&|e| Some(e.unassigned_fraction));
        let mito = last(&|e| Some(e.median.pct_mito));
        let novelty = last(&|e| e.median_novelty);
        let drift = last(&|e| e.composition_drift);
        vec![
            AlertState {
                name: "CellstreamStalled",
                firing: stalled,
                value: since_progress,
                threshold: STALLED_MINUTES,
                summary: "no batch finished for 10 minutes while batches wait",
            },
            AlertState {
                name: "CellstreamQuarantineRate",
                firing: over(quarantine_rate, QUARANTINE_RATE),
                value: quarantine_rate,
                threshold: QUARANTINE_RATE,
                summary: "over 10% of the batches of the last 30 minutes were quarantined",
            },
            AlertState {
                name: "CellstreamUnassignedFraction",
                firing: over(unassigned, UNASSIGNED_FRACTION),
                value: unassigned,
                threshold: UNASSIGNED_FRACTION,
                summary: "over half the last batch's cells are unassigned",
            },
            AlertState {
                name: "CellstreamHighMito",
                firing: over(mito, PCT_MITO),
                value: mito,
                threshold: PCT_MITO,
                summary: "the last batch's median % mitochondrial UMIs is over 20",
            },
            AlertState {
                name: "CellstreamNovelty",
                firing: over(novelty, MEDIAN_NOVELTY),
                value: novelty,
                threshold: MEDIAN_NOVELTY,
                summary: "the last batch's median novelty is over 1: most cells lie outside the reference",
            },
            AlertState {
                name: "CellstreamCompositionDrift",
                firing: over(drift, COMPOSITION_DRIFT),
                value: drift,
                threshold: COMPOSITION_DRIFT,
                summary: "the last batch's composition is over 0.3 (total variation) from the reference's",
            },
            AlertState {
                name: "CellstreamNotReady",
                firing: !ready,
                value: Some(f64::from(u8::from(ready))),
                threshold: 0.0,
                summary: "the daemon is not ready (loading the model, or draining)",
            },
            AlertState {
                name: "CellstreamBatchLatency",
                firing: over(latency, LATENCY_P95_SECONDS),
                value: latency,
                threshold: LATENCY_P95_SECONDS,
                summary: "95th percentile batch latency over 15 minutes is above 300 s",
            },
            AlertState {
                name: "CellstreamStageLatency",
                firing: over(stage, STAGE_P95_SECONDS),
                value: stage,
                threshold: STAGE_P95_SECONDS,
                summary: "a stage's 95th percentile time per batch over 15 minutes is above 120 s",
            },
        ]
    }
}

impl State {
    /// Adds a batch's cells to the sample (every `stride`-th cell of the run), thins it
    /// when full, and places the new cells on the map.
    fn sample_cells(&mut self, batch: &str, results: &[CellResult]) {
        let batch: Arc<str> = Arc::from(batch);
        let reference = self.reference.clone().filter(|r| r.layout().is_some());
        let mut nb = reference.as_ref().map(|r| r.neighbours());
        for r in results {
            let ordinal = self.cells_seen;
            self.cells_seen += 1;
            let Some(e) = &r.embedding else { continue };
            if !ordinal.is_multiple_of(self.stride) {
                continue;
            }
            let xy = match (&reference, nb.as_mut()) {
                (Some(reference), Some(nb)) => reference.place(e, nb).unwrap_or_default(),
                _ => [0.0, 0.0],
            };
            self.sample.push(Sampled {
                ordinal,
                batch: batch.clone(),
                label: r.label.clone(),
                embedding: e.clone(),
                xy,
            });
            while self.sample.len() > SAMPLE {
                self.stride *= 2;
                let stride = self.stride;
                self.sample.retain(|c| c.ordinal.is_multiple_of(stride));
            }
        }
        if reference.is_none() {
            self.refit_pca();
        }
    }

    /// The run's map without a reference layout: the sample on its two principal axes.
    fn refit_pca(&mut self) {
        let Some(dim) = self.sample.first().map(|c| c.embedding.len()) else {
            return;
        };
        let rows: Vec<f32> = self
            .sample
            .iter()
            .filter(|c| c.embedding.len() == dim)
            .flat_map(|c| c.embedding.iter().copied())
            .collect();
        let pca = Pca::fit(&rows, dim, self.pca.as_ref());
        for c in &mut self.sample {
            if c.embedding.len() == dim {
                c.xy = pca.project(&c.embedding);
            }
        }
        self.pca = Some(pca);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qc::CellQc;

    fn cells(n: usize, label: &str) -> Vec<CellResult> {
        (0..n)
            .map(|i| CellResult {
                label: label.into(),
                confidence: 0.9,
                assigned: true,
                embedding: Some(vec![(i % 7) as f32, (i % 3) as f32, 1.0]),
                qc: CellQc {
                    total_counts: 1000 + i as u64,
                    n_genes: 500,
                    pct_mito: 3.0,
                    vocab_matched: 0.9,
                },
                n_tokens: 10,
                novelty: None,
            })
            .collect()
    }

    fn summary(batch: &str, results: &[CellResult]) -> BatchSummary {
        let mut s = BatchSummary::of(results, None);
        s.batch = batch.into();
        s
    }

    #[test]
    fn the_sample_and_history_stay_bounded_and_the_run_adds_up() {
        let w = Watch::new();
        let mut rx = w.subscribe();
        for b in 0..(HISTORY + 10) {
            let results = cells(50, if b % 2 == 0 { "B" } else { "NK" });
            w.batch_ok(&summary(&format!("b{b}"), &results), &results);
        }
        let s = w.state.lock().unwrap();
        assert_eq!(s.history.len(), HISTORY);
        assert_eq!(s.history.back().unwrap().seq, (HISTORY + 10) as u64);
        assert!(s.sample.len() <= SAMPLE && s.sample.len() > SAMPLE / 2);
        assert_eq!(s.totals.cells, 50 * (HISTORY + 10) as u64);
        assert_eq!(s.run_qc.n_genes.iter().sum::<u64>(), s.totals.cells);
        assert!(s.pca.is_some());
        drop(s);
        // A subscriber that never read is told how many updates it missed, not sent them all.
        match rx.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                assert_eq!(n, (HISTORY + 10 - EVENT_BUFFER) as u64)
            }
            other => panic!("expected a lag, got {other:?}"),
        }
        let next: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(
            next["entry"]["batch"],
            format!("b{}", HISTORY + 10 - EVENT_BUFFER)
        );
        let run: serde_json::Value =
            serde_json::from_str(&w.run_json(serde_json::json!({}), &w.alerts(0, true))).unwrap();
        assert_eq!(run["batches"].as_array().unwrap().len(), HISTORY);
        let cells: serde_json::Value = serde_json::from_str(&w.cells_json()).unwrap();
        assert_eq!(cells["projection"], "pca");
    }

    #[test]
    fn the_page_alerts_are_the_alert_rules() {
        let rules = include_str!("../../dashboards/alerts.yml");
        let states = Watch::new().alerts(0, true);
        assert_eq!(rules.matches("- alert: ").count(), states.len());
        for a in &states {
            let start = rules
                .find(&format!("- alert: {}\n", a.name))
                .unwrap_or_else(|| panic!("{} is not in dashboards/alerts.yml", a.name));
            let rest = &rules[start + 1..];
            let rule = &rest[..rest.find("- alert: ").unwrap_or(rest.len())];
            let want = match a.name {
                "CellstreamStalled" => format!("[{}m]", alert::STALLED_MINUTES),
                "CellstreamNotReady" => "cellstream_ready == 0".into(),
                _ => format!("> {}", a.threshold),
            };
            assert!(rule.contains(&want), "{}: no {want:?} in\n{rule}", a.name);
        }
        for window in [
            alert::QUARANTINE_WINDOW_MINUTES,
            alert::LATENCY_WINDOW_MINUTES,
        ] {
            assert!(rules.contains(&format!("[{window}m]")), "{window}");
        }
    }

    #[test]
    fn alerts_follow_the_last_batch_and_quarantines() {
        let w = Watch::new();
        w.set_ready();
        let firing = |w: &Watch| -> Vec<&'static str> {
            w.alerts(0, true)
                .into_iter()
                .filter(|a| a.firing)
                .map(|a| a.name)
                .collect()
        };
        let mut results = cells(10, "unassigned");
        results.iter_mut().for_each(|r| r.assigned = false);
        w.batch_ok(&summary("a", &results), &results);
        assert_eq!(firing(&w), ["CellstreamUnassignedFraction"]);
        let results = cells(10, "B");
        w.batch_ok(&summary("b", &results), &results);
        assert!(firing(&w).is_empty());
        let problem = || Problem {
            stage: "read".into(),
            kind: "corrupt".into(),
            error: "bad".into(),
        };
        w.batch_failed("failed", "c", "c.csb", problem());
        assert_eq!(firing(&w), ["CellstreamQuarantineRate"]);
        assert!(w
            .alerts(0, false)
            .iter()
            .any(|a| a.name == "CellstreamNotReady" && a.firing));
        assert_eq!(GENES_BINS.index(0.0), 0);
        assert_eq!(MITO_BINS.index(99.0), MITO_BINS.n - 1);
    }
}
