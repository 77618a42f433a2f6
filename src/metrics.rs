//! Prometheus metrics (DESIGN.md §7): prefix `cellstream_`, counters end in `_total`,
//! latencies are histograms in seconds, labels stay low-cardinality (never a file name or
//! a barcode).

use prometheus::{
    exponential_buckets, linear_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

/// Pipeline stages timed per batch (`cellstream_stage_seconds{stage}`).
pub const STAGES: [&str; 4] = ["read", "tokenize", "infer", "emit"];

/// Declares every metric once: its field, type, name, help and labels on one line; the macro
/// writes the struct, constructs each and registers it, so that no metric can exist without
/// appearing on `/metrics`. Adding one is adding a line here (and using the field).
macro_rules! metrics {
    ($(
        $(#[$doc:meta])*
        $field:ident: $ty:ident = $name:literal, $help:literal
            $(, labels [$($label:literal),*])? $(, buckets $buckets:expr)?;
    )*) => {
        /// Every metric the daemon exports.
        pub struct Metrics {
            registry: Registry,
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Metrics {
            /// Each declared metric, constructed and registered.
            fn declared(registry: Registry) -> Metrics {
                $(
                    let labels: &[&str] = &[$($($label),*)?];
                    let $field = make::$ty($name, $help, labels, None$(.or(Some($buckets)))?);
                    registry
                        .register(Box::new($field.clone()))
                        .expect("metric names are unique");
                )*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

/// Constructors named after the types [`metrics!`] declares.
#[allow(non_snake_case)]
mod make {
    use prometheus::{
        Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
        IntGauge, IntGaugeVec, Opts,
    };

    type Buckets = Option<Vec<f64>>;

    pub fn IntCounter(name: &str, help: &str, _: &[&str], _: Buckets) -> IntCounter {
        IntCounter::new(name, help).unwrap()
    }
    pub fn IntCounterVec(name: &str, help: &str, labels: &[&str], _: Buckets) -> IntCounterVec {
        IntCounterVec::new(Opts::new(name, help), labels).unwrap()
    }
    pub fn IntGauge(name: &str, help: &str, _: &[&str], _: Buckets) -> IntGauge {
        IntGauge::new(name, help).unwrap()
    }
    pub fn IntGaugeVec(name: &str, help: &str, labels: &[&str], _: Buckets) -> IntGaugeVec {
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap()
    }
    pub fn Gauge(name: &str, help: &str, _: &[&str], _: Buckets) -> Gauge {
        Gauge::new(name, help).unwrap()
    }
    pub fn GaugeVec(name: &str, help: &str, labels: &[&str], _: Buckets) -> GaugeVec {
        GaugeVec::new(Opts::new(name, help), labels).unwrap()
    }
    pub fn Histogram(name: &str, help: &str, _: &[&str], buckets: Buckets) -> Histogram {
        let opts = HistogramOpts::new(name, help);
        Histogram::with_opts(match buckets {
            Some(b) => opts.buckets(b),
            None => opts,
        })
        .unwrap()
    }
    pub fn HistogramVec(name: &str, help: &str, labels: &[&str], buckets: Buckets) -> HistogramVec {
        let opts = HistogramOpts::new(name, help);
        let opts = match buckets {
            Some(b) => opts.buckets(b),
            None => opts,
        };
        HistogramVec::new(opts, labels).unwrap()
    }
}

metrics! {
    /// `outcome`: `ok`, `failed` (quarantined) or `retried` (output not writable yet).
    batches: IntCounterVec = "batches_total", "Batches finished, by outcome", labels ["outcome"];
    cells: IntCounter = "cells_total", "Cells embedded";
    cells_labelled: IntCounterVec = "cells_labelled_total",
        "Cells by predicted label (\"unassigned\" under the confidence threshold)", labels ["label"];
    stage_seconds: HistogramVec = "stage_seconds", "Time per batch in each pipeline stage",
        labels ["stage"], buckets exponential_buckets(0.0005, 2.0, 20).unwrap();
    batch_latency: Histogram = "batch_latency_seconds",
        "From a batch's claim to its committed output", buckets exponential_buckets(0.005, 2.0, 18).unwrap();
    /// `stage`: `incoming` (waiting in the spool), `claimed`, `emit`.
    queue_depth: IntGaugeVec = "queue_depth", "Batches waiting before each stage", labels ["stage"];
    tokens_per_cell: Histogram = "tokens_per_cell", "Model tokens per cell, <cls> included",
        buckets exponential_buckets(2.0, 2.0, 12).unwrap();
    vocab_matched: Histogram = "vocab_matched_ratio",
        "Per cell, the fraction of UMIs on genes in the model's vocabulary",
        buckets linear_buckets(0.1, 0.1, 10).unwrap();
    last_batch_median_genes: Gauge = "last_batch_median_genes", "Median genes per cell in the last batch";
    last_batch_median_pct_mito: Gauge = "last_batch_median_pct_mito",
        "Median percent mitochondrial UMIs per cell in the last batch";
    last_batch_unassigned_fraction: Gauge = "last_batch_unassigned_fraction",
        "Fraction of the last batch's cells left unassigned";
    /// Per label of the last batch, `unassigned` included (the composition a dashboard stacks).
    last_batch_label_fraction: GaugeVec = "last_batch_label_fraction",
        "Fraction of the last batch's cells per reported label", labels ["label"];
    /// With a reference (`[model] reference`), else 0.
    last_batch_median_novelty: Gauge = "last_batch_median_novelty",
        "Median novelty of the last batch's cells against the reference (its own cells sit below 1); 0 without a reference";
    /// With a reference, else 0: half the sum over labels of |batch share − reference share|,
    /// the batch's shares among its assigned cells.
    last_batch_composition_drift: Gauge = "last_batch_composition_drift",
        "Total variation distance between the last batch's label composition (assigned cells) and the reference's; 0 without a reference";
    /// `outcome`: `accepted`, `too_large`, `queue_full`, `bad_request`, `error`.
    uploads: IntCounterVec = "uploads_total", "POST /v1/batches requests, by outcome", labels ["outcome"];
    stream_clients: IntGauge = "stream_clients", "Open /v1/stream connections";
    ready: IntGauge = "ready", "1 once the model is loaded and warmed, 0 while draining";
    model_info: IntGaugeVec = "model_info", "The model package being served", labels ["name", "version"];
    build_info: IntGaugeVec = "build_info", "The cellstream build", labels ["version"];
    nats_reconnects: IntCounter = "nats_reconnects_total", "Reconnections to the NATS server after a lost connection";
    nats_redeliveries: IntCounter = "nats_redeliveries_total", "Batches delivered again by JetStream (an earlier delivery was not acknowledged)";
}

impl Metrics {
    pub fn new(model_name: &str, model_version: &str) -> Metrics {
        let registry =
            Registry::new_custom(Some("cellstream".into()), None).expect("a valid prefix");
        let m = Metrics::declared(registry);
        m.model_info
            .with_label_values(&[model_name, model_version])
            .set(1);
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
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
        for outcome in [
            "accepted",
            "too_large",
            "queue_full",
            "bad_request",
            "error",
            "draining",
        ] {
            m.uploads.with_label_values(&[outcome]);
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
            "cellstream_nats_reconnects_total 0",
            "cellstream_nats_redeliveries_total 0",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
