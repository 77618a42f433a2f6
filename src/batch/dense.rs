//! Dense genes × cells text matrices (Seurat's `pbmc_raw.txt`, CSV exports): the first line
//! holds the barcodes, every other line a gene name and one count per cell.

use std::path::Path;

use super::bytes::{Lines, TextCap};
use super::mtx::MAX_NAME;
use super::{quote, too_large, BatchError, CountBatch, CsrArrays, Format, Limits};

/// Longest line of a dense text matrix: one count per cell, so far longer than an MTX line.
pub const MAX_DENSE_LINE: usize = 16 << 20;

/// Reads the text as a stream: the barcodes from the first line, then each gene's counts
/// straight into per-gene arrays (no copy of the line, no string per field), refused at the
/// first cap passed; the per-gene arrays are transposed into CSR at the end. Memory: 16 bytes
/// per stored count at the transposition, and one line buffer.
pub fn read(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let cap = TextCap::new(opts.max_decompressed);
    let mut lines = Lines::open(path, &cap, MAX_DENSE_LINE)?;
    let header = loop {
        match lines.next_line()? {
            None => {
                return Err(BatchError::new(
                    path,
                    super::BatchErrorKind::Empty("no header line".into()),
                ))
            }
            Some(l) if l.bytes.trim_ascii().is_empty() => {}
            Some(l) => break l,
        }
    };
    let header = header.text(path)?;
    let sep = if header.contains('\t') {
        '\t'
    } else if header.contains(',') {
        ','
    } else {
        ' '
    };
    // Fields after dropping empty ones at the end of a line.
    let n_fields =
        |l: &str| l.split(sep).count() - l.rsplit(sep).take_while(|f| field(f).is_empty()).count();
    let n_header = n_fields(header);
    // The header may hold one corner field more than there are cells (checked at the first
    // row), so the cap is checked with that one allowed.
    if n_header as u64 > opts.max_cells + 1 {
        return Err(too_large(
            path,
            format!(
                "line 1 names {n_header} cells (barcodes), over the max_cells cap of {}",
                opts.max_cells
            ),
        ));
    }
    let mut barcodes = header
        .split(sep)
        .take(n_header)
        .map(|b| {
            let b = field(b);
            if b.len() > MAX_NAME {
                return Err(BatchError::invalid(
                    path,
                    format!("line 1: the barcode {} is longer than the limit of {MAX_NAME} bytes on a name", quote(b.as_bytes())),
                ));
            }
            Ok(b.to_owned())
        })
        .collect::<Result<Vec<String>, _>>()?;

    // Per gene (in line order): the cells with a count and the counts.
    let mut gene_names = Vec::new();
    let mut gene_ptr = vec![0u64];
    let mut cells: Vec<u32> = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    let mut corner_checked = false;
    while let Some(line) = lines.next_line()? {
        if line.bytes.trim_ascii().is_empty() {
            continue;
        }
        let no = line.no;
        let text = line.text(path)?;
        let n = n_fields(text);
        if !corner_checked {
            // A header with a leading corner cell ("" or "gene") has as many fields as a row.
            // (A header with no field at all has no corner to drop: fuzzing found `"\n"`.)
            if !barcodes.is_empty() && n == barcodes.len() {
                barcodes.remove(0);
            }
            check_cells(path, barcodes.len(), opts)?;
            corner_checked = true;
        }
        if n != barcodes.len() + 1 {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line {no}: {} counts for {} barcodes",
                    n.saturating_sub(1),
                    barcodes.len()
                ),
            ));
        }
        if gene_names.len() as u64 == opts.max_genes {
            return Err(too_large(
                path,
                format!(
                    "line {no}: more than the max_genes cap of {} genes",
                    opts.max_genes
                ),
            ));
        }
        let mut fields = text.split(sep).take(n);
        let gene = field(fields.next().unwrap_or_default());
        if gene.len() > MAX_NAME {
            return Err(BatchError::invalid(
                path,
                format!("line {no}: the gene name {} is longer than the limit of {MAX_NAME} bytes on a name", quote(gene.as_bytes())),
            ));
        }
        gene_names.push(gene.to_owned());
        for (cell, f) in fields.enumerate() {
            let v = parse_count(field(f)).map_err(|what| {
                BatchError::invalid(path, format!("line {no}, column {}: {what}", cell + 2))
            })?;
            if v > 0 {
                if counts.len() as u64 == opts.max_stored_counts {
                    return Err(too_large(
                        path,
                        format!(
                            "line {no}: more than the max_stored_counts cap of {} stored counts",
                            opts.max_stored_counts
                        ),
                    ));
                }
                cells.push(cell as u32);
                counts.push(v);
            }
        }
        gene_ptr.push(counts.len() as u64);
    }
    if !corner_checked {
        check_cells(path, barcodes.len(), opts)?;
    }
    let csr = transpose(&gene_ptr, cells, counts, barcodes.len());
    CountBatch::from_csr(path, Format::DenseText, gene_names, None, barcodes, csr)
}

/// The header's cell count against the max_cells cap.
fn check_cells(path: &Path, cells: usize, opts: &Limits) -> Result<(), BatchError> {
    if cells as u64 > opts.max_cells {
        return Err(too_large(
            path,
            format!(
                "line 1 names {cells} cells (barcodes), over the max_cells cap of {}",
                opts.max_cells
            ),
        ));
    }
    Ok(())
}

/// A field as read: surrounding spaces and quotes dropped.
fn field(s: &str) -> &str {
    s.trim().trim_matches('"')
}

/// Genes × cells (per gene: cells, counts) → cells × genes CSR, by a counting sort.
fn transpose(gene_ptr: &[u64], cells: Vec<u32>, counts: Vec<u32>, n_cells: usize) -> CsrArrays {
    let mut indptr = vec![0u64; n_cells + 1];
    for &c in &cells {
        indptr[c as usize + 1] += 1;
    }
    for i in 0..n_cells {
        indptr[i + 1] += indptr[i];
    }
    let mut next = indptr[..n_cells].to_vec();
    let mut indices = vec![0u32; counts.len()];
    let mut data = vec![0u32; counts.len()];
    for gene in 0..gene_ptr.len() - 1 {
        for k in gene_ptr[gene] as usize..gene_ptr[gene + 1] as usize {
            let c = cells[k] as usize;
            let at = next[c] as usize;
            indices[at] = gene as u32;
            data[at] = counts[k];
            next[c] += 1;
        }
    }
    CsrArrays {
        indptr,
        indices,
        data,
    }
}

/// The shape a dense text claims for the daemon's memory admission: its cells (the first
/// line's fields) and at most one stored count per two bytes of text.
pub(crate) fn claims(path: &Path, text_bytes: u64) -> Option<(u64, u64, u64)> {
    let cap = TextCap::new(MAX_DENSE_LINE as u64 + 1);
    let mut lines = Lines::open(path, &cap, MAX_DENSE_LINE).ok()?;
    let header = lines.next_line().ok()??;
    let sep = if header.bytes.contains(&b'\t') {
        b'\t'
    } else if header.bytes.contains(&b',') {
        b','
    } else {
        b' '
    };
    let cells = memchr::memchr_iter(sep, header.bytes).count() as u64 + 1;
    let stored = text_bytes / 2;
    Some((cells, (stored / cells.max(1)).max(1), stored))
}

fn parse_count(f: &str) -> Result<u32, String> {
    if let Ok(v) = f.parse::<u32>() {
        return Ok(v);
    }
    let v: f64 = Some(f)
        .filter(|f| f.len() <= 64)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| format!("count {} is not a number", quote(f.as_bytes())))?;
    if !v.is_finite() || v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
        return Err(format!(
            "count {} is not a non-negative integer within u32",
            quote(f.as_bytes())
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
        read(
            &path,
            &Limits::new(&Default::default(), &Default::default()),
        )
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
