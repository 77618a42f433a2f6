//! Dense genes × cells text matrices (Seurat's `pbmc_raw.txt`, CSV exports): the first line
//! holds the barcodes, every other line a gene name and one count per cell.

use std::path::Path;

use super::source::read_maybe_gz;
use super::{BatchError, CountBatch, CsrArrays, Format, ReadOptions};

pub fn read(path: &Path, opts: &ReadOptions) -> Result<CountBatch, BatchError> {
    let raw = read_maybe_gz(path, opts.max_decompressed)?;
    let text = std::str::from_utf8(&raw).map_err(|e| {
        BatchError::invalid(path, format!("not UTF-8 text at byte {}", e.valid_up_to()))
    })?;
    let mut lines = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(BatchError::new(
            path,
            super::BatchErrorKind::Empty("no header line".into()),
        ));
    };
    let sep = if header.contains('\t') {
        '\t'
    } else if header.contains(',') {
        ','
    } else {
        ' '
    };
    let split = |l: &str| -> Vec<String> {
        let mut f: Vec<String> = l
            .split(sep)
            .map(|s| s.trim().trim_matches('"').to_owned())
            .collect();
        while f.last().is_some_and(|s| s.is_empty()) {
            f.pop();
        }
        f
    };
    let mut barcodes = split(header);

    // Column-major counts per gene, transposed into per-cell lists at the end.
    let mut gene_names = Vec::new();
    let mut per_cell: Vec<Vec<(u32, u32)>> = Vec::new();
    let mut corner_checked = false;
    for (no, line) in lines {
        let fields = split(line);
        if !corner_checked {
            // A header with a leading corner cell ("" or "gene") has as many fields as a row.
            // (A header with no field at all has no corner to drop: fuzzing found `"\n"`.)
            if !barcodes.is_empty() && fields.len() == barcodes.len() {
                barcodes.remove(0);
            }
            per_cell = vec![Vec::new(); barcodes.len()];
            corner_checked = true;
        }
        if fields.len() != barcodes.len() + 1 {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line {}: {} counts for {} barcodes",
                    no + 1,
                    fields.len().saturating_sub(1),
                    barcodes.len()
                ),
            ));
        }
        let gene = gene_names.len() as u32;
        gene_names.push(fields[0].clone());
        for (cell, f) in fields[1..].iter().enumerate() {
            let v = parse_count(f).map_err(|what| {
                BatchError::invalid(
                    path,
                    format!("line {}, column {}: {what}", no + 1, cell + 2),
                )
            })?;
            if v > 0 {
                per_cell[cell].push((gene, v));
            }
        }
    }
    let mut csr = CsrArrays {
        indptr: vec![0],
        ..Default::default()
    };
    for cell in &per_cell {
        for &(g, v) in cell {
            csr.indices.push(g);
            csr.data.push(v);
        }
        csr.indptr.push(csr.indices.len() as u64);
    }
    CountBatch::from_csr(path, Format::DenseText, gene_names, None, barcodes, csr)
}

fn parse_count(f: &str) -> Result<u32, String> {
    if let Ok(v) = f.parse::<u32>() {
        return Ok(v);
    }
    let v: f64 = f
        .parse()
        .map_err(|_| format!("count {f:?} is not a number"))?;
    if !v.is_finite() || v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
        return Err(format!(
            "count {f} is not a non-negative integer within u32"
        ));
    }
    Ok(v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_bytes(bytes: &[u8]) -> Result<CountBatch, BatchError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batch.txt");
        std::fs::write(&path, bytes).unwrap();
        read(&path, &ReadOptions::default())
    }

    /// Found by `fuzz/run.sh … dense` (crash-32e8d0f7…): a header that is only a quote
    /// (no barcode) and a row with no field made the corner check remove from an empty list.
    #[test]
    fn fuzz_crash_empty_header_and_empty_row_is_an_error_not_a_panic() {
        let e = read_bytes(b"\"\n\"").unwrap_err();
        assert!(
            e.to_string().contains("line 2: 0 counts for 0 barcodes"),
            "{e}"
        );
        // The same shape with separators.
        assert!(read_bytes(b"\t\n\t\n").is_err());
    }
}
