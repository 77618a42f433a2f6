//! The per-batch summary record (DESIGN.md §5, `"type":"batch"`): what a dashboard shows for
//! a batch at a glance, written beside the batch's records and sent on the live stream.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::embed::{CellResult, UNASSIGNED};
use crate::reference::Reference;

#[derive(Debug, Clone, Serialize)]
pub struct BatchSummary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub batch: String,
    /// The input's file or directory name in the spool.
    pub file: String,
    pub format: &'static str,
    pub cells: usize,
    pub genes: usize,
    pub assigned: usize,
    /// Cells per reported label ("unassigned" included).
    pub labels: BTreeMap<String, usize>,
    pub median: QcMedians,
    pub mean_tokens_per_cell: f64,
    pub unassigned_fraction: f64,
    /// Share of the assigned cells per label.
    pub composition: BTreeMap<String, f64>,
    /// With a reference: its share of cells per label, the batch's distance from it (total
    /// variation: half the sum of the shares' differences) and the median novelty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceQc>,
    /// Seconds per stage, and `latency`: from the claim to the committed output.
    pub timings: StageTimings,
}

/// A batch against the reference it was mapped on.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceQc {
    pub composition: BTreeMap<String, f64>,
    pub composition_drift: f64,
    pub median_novelty: f64,
}

/// Per-cell QC medians over a batch.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QcMedians {
    pub total_counts: f64,
    pub n_genes: f64,
    pub pct_mito: f64,
    pub vocab_matched: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageTimings {
    pub read: f64,
    pub tokenize: f64,
    pub infer: f64,
    pub emit: f64,
    pub latency: f64,
}

impl BatchSummary {
    /// Counts and medians of `results` (mapped on `reference`, if any); `timings` are filled
    /// in by the caller.
    pub fn of(results: &[CellResult], reference: Option<&Reference>) -> BatchSummary {
        let mut labels = BTreeMap::new();
        for r in results {
            *labels.entry(r.label.clone()).or_insert(0) += 1;
        }
        let assigned = results.iter().filter(|r| r.assigned).count();
        let composition: BTreeMap<String, f64> = labels
            .iter()
            .filter(|(l, _)| *l != UNASSIGNED)
            .map(|(l, &n)| (l.clone(), n as f64 / assigned.max(1) as f64))
            .collect();
        let reference = reference.map(|r| {
            let theirs = &r.meta.composition;
            let drift = theirs
                .keys()
                .chain(composition.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|l| {
                    let a = composition.get(l).copied().unwrap_or(0.0);
                    (a - theirs.get(l).copied().unwrap_or(0.0)).abs()
                })
                .sum::<f64>()
                / 2.0;
            ReferenceQc {
                composition: theirs.clone(),
                composition_drift: if assigned == 0 { 0.0 } else { drift },
                median_novelty: median(results.iter().filter_map(|r| r.novelty.map(f64::from))),
            }
        });
        let tokens: u64 = results.iter().map(|r| r.n_tokens as u64).sum();
        BatchSummary {
            kind: "batch",
            batch: String::new(),
            file: String::new(),
            format: "",
            cells: results.len(),
            genes: 0,
            assigned,
            labels,
            median: QcMedians {
                total_counts: median(results.iter().map(|r| r.qc.total_counts as f64)),
                n_genes: median(results.iter().map(|r| r.qc.n_genes as f64)),
                pct_mito: median(results.iter().map(|r| r.qc.pct_mito as f64)),
                vocab_matched: median(results.iter().map(|r| r.qc.vocab_matched as f64)),
            },
            mean_tokens_per_cell: if results.is_empty() {
                0.0
            } else {
                tokens as f64 / results.len() as f64
            },
            unassigned_fraction: if results.is_empty() {
                0.0
            } else {
                (results.len() - assigned) as f64 / results.len() as f64
            },
            composition,
            reference,
            timings: StageTimings::default(),
        }
    }
}

/// The median (mean of the middle two for an even count); 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }
}
