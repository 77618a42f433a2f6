//! The output record (DESIGN.md §5): one JSON object per cell, one per line, input order.

use std::io::Write;

use serde::Serialize;

use crate::pipeline::CellResult;
use crate::qc::CellQc;

#[derive(Serialize)]
struct Record<'a> {
    batch: &'a str,
    cell: &'a str,
    index: usize,
    label: &'a str,
    confidence: f32,
    assigned: bool,
    embedding: Option<&'a [f32]>,
    qc: &'a CellQc,
}

/// Writes one line per cell of a batch.
pub fn write_batch(
    w: &mut impl Write,
    batch_id: &str,
    barcodes: &[String],
    results: &[CellResult],
) -> std::io::Result<()> {
    for (index, (cell, r)) in barcodes.iter().zip(results).enumerate() {
        let record = Record {
            batch: batch_id,
            cell,
            index,
            label: &r.label,
            confidence: r.confidence,
            assigned: r.assigned,
            embedding: r.embedding.as_deref(),
            qc: &r.qc,
        };
        serde_json::to_writer(&mut *w, &record)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}
