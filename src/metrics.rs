//! Prometheus metrics (DESIGN.md §7): prefix `cellstream_`, counters end in `_total`,
//! latencies are histograms in seconds, labels stay low-cardinality (never a file name or
//! a barcode).

use prometheus::{
    exponential_buckets, linear_buckets, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Pipeline stages timed per batch (`cellstream_stage_seconds{stage}`).
pub const STAGES: [&str; 4] = ["read", "tokenize", "infer", "emit"];

/// Every metric the daemon exports, registered once.
pub struct Metrics {
    registry: Registry,
    /// `outcome`: `ok`, `failed` (quarantined) or `retried` (output not writable yet).
    pub batches: IntCounterVec,
    pub cells: IntCounter,
    pub cells_labelled: IntCounterVec,
    pub stage_seconds: HistogramVec,
    pub batch_latency: Histogram,
    /// `stage`: `incoming` (waiting in the spool), `claimed`, `emit`.
    pub queue_depth: IntGaugeVec,
    pub tokens_per_cell: Histogram,
    pub vocab_matched: Histogram,
    pub last_batch_median_genes: Gauge,
    pub last_batch_median_pct_mito: Gauge,
    pub last_batch_unassigned_fraction: Gauge,
    /// `outcome`: `accepted`, `too_large`, `queue_full`, `bad_request`, `error`.
    pub uploads: IntCounterVec,
    pub stream_clients: IntGauge,
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new(model_name: &str, model_version: &str) -> Metrics {
        let registry =
            Registry::new_custom(Some("cellstream".into()), None).expect("a valid prefix");
        let m = Metrics {
            batches: IntCounterVec::new(
                Opts::new("batches_total", "Batches finished, by outcome"),
                &["outcome"],
            )
            .unwrap(),
            cells: IntCounter::new("cells_total", "Cells embedded").unwrap(),
            cells_labelled: IntCounterVec::new(
                Opts::new(
                    "cells_labelled_total",
                    "Cells by predicted label (\"unassigned\" under the confidence threshold)",
                ),
                &["label"],
            )
            .unwrap(),
            stage_seconds: HistogramVec::new(
                HistogramOpts::new("stage_seconds", "Time per batch in each pipeline stage")
                    .buckets(exponential_buckets(0.0005, 2.0, 20).unwrap()),
                &["stage"],
            )
            .unwrap(),
            batch_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "batch_latency_seconds",
                    "From a batch's claim to its committed output",
                )
                .buckets(exponential_buckets(0.005, 2.0, 18).unwrap()),
            )
            .unwrap(),
            queue_depth: IntGaugeVec::new(
                Opts::new("queue_depth", "Batches waiting before each stage"),
                &["stage"],
            )
            .unwrap(),
            tokens_per_cell: Histogram::with_opts(
                HistogramOpts::new("tokens_per_cell", "Model tokens per cell, <cls> included")
                    .buckets(exponential_buckets(2.0, 2.0, 12).unwrap()),
            )
            .unwrap(),
            vocab_matched: Histogram::with_opts(
                HistogramOpts::new(
                    "vocab_matched_ratio",
                    "Per cell, the fraction of UMIs on genes in the model's vocabulary",
                )
                .buckets(linear_buckets(0.1, 0.1, 10).unwrap()),
            )
            .unwrap(),
            last_batch_median_genes: Gauge::new(
                "last_batch_median_genes",
                "Median genes per cell in the last batch",
            )
            .unwrap(),
            last_batch_median_pct_mito: Gauge::new(
                "last_batch_median_pct_mito",
                "Median percent mitochondrial UMIs per cell in the last batch",
            )
            .unwrap(),
            last_batch_unassigned_fraction: Gauge::new(
                "last_batch_unassigned_fraction",
                "Fraction of the last batch's cells left unassigned",
            )
            .unwrap(),
            uploads: IntCounterVec::new(
                Opts::new("uploads_total", "POST /v1/batches requests, by outcome"),
                &["outcome"],
            )
            .unwrap(),
            stream_clients: IntGauge::new("stream_clients", "Open /v1/stream connections").unwrap(),
            ready: IntGauge::new(
                "ready",
                "1 once the model is loaded and warmed, 0 while draining",
            )
            .unwrap(),
            registry,
        };
        let model_info = IntGaugeVec::new(
            Opts::new("model_info", "The model package being served"),
            &["name", "version"],
        )
        .unwrap();
        model_info
            .with_label_values(&[model_name, model_version])
            .set(1);
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "The cellstream build"),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let r = &m.registry;
        let all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.batches.clone()),
            Box::new(m.cells.clone()),
            Box::new(m.cells_labelled.clone()),
            Box::new(m.stage_seconds.clone()),
            Box::new(m.batch_latency.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.tokens_per_cell.clone()),
            Box::new(m.vocab_matched.clone()),
            Box::new(m.last_batch_median_genes.clone()),
            Box::new(m.last_batch_median_pct_mito.clone()),
            Box::new(m.last_batch_unassigned_fraction.clone()),
            Box::new(m.uploads.clone()),
            Box::new(m.stream_clients.clone()),
            Box::new(m.ready.clone()),
            Box::new(model_info),
            Box::new(build_info),
        ];
        for c in all {
            r.register(c).expect("metric names are unique");
        }
        // Present from the start, so that dashboards see zeros rather than gaps.
        for outcome in ["ok", "failed", "retried"] {
            m.batches.with_label_values(&[outcome]);
        }
        for stage in STAGES {
            m.stage_seconds.with_label_values(&[stage]);
        }
        for stage in ["incoming", "claimed", "emit"] {
            m.queue_depth.with_label_values(&[stage]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design() {
        let m = Metrics::new("pbmc-compact", "1");
        m.batches.with_label_values(&["ok"]).inc();
        m.cells.inc_by(3);
        m.cells_labelled.with_label_values(&["B"]).inc();
        m.batch_latency.observe(0.2);
        let text = m.render();
        for want in [
            "cellstream_batches_total{outcome=\"ok\"} 1",
            "cellstream_cells_total 3",
            "cellstream_cells_labelled_total{label=\"B\"} 1",
            "cellstream_stage_seconds_bucket{stage=\"infer\"",
            "cellstream_batch_latency_seconds_count 1",
            "cellstream_queue_depth{stage=\"incoming\"} 0",
            "cellstream_model_info{name=\"pbmc-compact\",version=\"1\"} 1",
            "cellstream_build_info{version=",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
