//! 10x Matrix Market directories (Cell Ranger v2 `genes.tsv`, v3 `features.tsv`, gzipped or not).
//!
//! The matrix is genes × cells, 1-based; cellstream turns it into cells × genes CSR with a
//! counting pass over the cell column (no sort unless a cell's genes arrive out of order).

use std::path::{Path, PathBuf};

use super::source::read_maybe_gz;
use super::{BatchError, BatchErrorKind, CountBatch, CsrArrays, Format, ReadOptions};

/// The three members of a 10x directory, as found on disk.
struct Members {
    matrix: PathBuf,
    features: PathBuf,
    barcodes: PathBuf,
}

fn find_member(dir: &Path, stems: &[&str]) -> Result<PathBuf, BatchError> {
    for stem in stems {
        for name in [stem.to_string(), format!("{stem}.gz")] {
            let p = dir.join(&name);
            // Any entry of that name is the member; a non-file one is refused when opened,
            // with a message that says what it is.
            if p.exists() {
                return Ok(p);
            }
        }
    }
    Err(BatchError::invalid(
        dir,
        format!(
            "a Matrix Market directory needs {} (or .gz); none found",
            stems.join(" or ")
        ),
    ))
}

fn find_members(dir: &Path) -> Result<Members, BatchError> {
    Ok(Members {
        matrix: find_member(dir, &["matrix.mtx"])?,
        features: find_member(dir, &["features.tsv", "genes.tsv"])?,
        barcodes: find_member(dir, &["barcodes.tsv"])?,
    })
}

pub fn read_dir(dir: &Path, opts: &ReadOptions) -> Result<CountBatch, BatchError> {
    let m = find_members(dir)?;
    let (gene_ids, gene_names) = read_features(&m.features, opts)?;
    let barcodes = read_barcodes(&m.barcodes, opts)?;
    let text = read_maybe_gz(&m.matrix, opts.max_decompressed)?;
    let entries = parse_matrix(&m.matrix, &text)?;
    if entries.n_rows != gene_names.len() {
        return Err(BatchError::invalid(
            &m.matrix,
            format!(
                "the matrix has {} rows (genes) but {} lists {} features",
                entries.n_rows,
                m.features.display(),
                gene_names.len()
            ),
        ));
    }
    if entries.n_cols != barcodes.len() {
        return Err(BatchError::invalid(
            &m.matrix,
            format!(
                "the matrix has {} columns (cells) but {} lists {} barcodes",
                entries.n_cols,
                m.barcodes.display(),
                barcodes.len()
            ),
        ));
    }
    let csr = entries.into_csr(&m.matrix)?;
    CountBatch::from_csr(dir, Format::Mtx, gene_names, Some(gene_ids), barcodes, csr)
}

fn lines(path: &Path, text: &[u8]) -> Result<Vec<String>, BatchError> {
    let text = std::str::from_utf8(text).map_err(|e| {
        BatchError::invalid(path, format!("not UTF-8 text at byte {}", e.valid_up_to()))
    })?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `id<TAB>symbol[<TAB>type]` per line; returns (ids, symbols).
fn read_features(
    path: &Path,
    opts: &ReadOptions,
) -> Result<(Vec<String>, Vec<String>), BatchError> {
    let text = read_maybe_gz(path, opts.max_decompressed)?;
    let mut ids = Vec::new();
    let mut names = Vec::new();
    for line in lines(path, &text)? {
        let mut cols = line.split('\t');
        let id = cols.next().unwrap_or_default().to_owned();
        let name = cols.next().map(str::to_owned).unwrap_or_else(|| id.clone());
        ids.push(id);
        names.push(name);
    }
    Ok((ids, names))
}

fn read_barcodes(path: &Path, opts: &ReadOptions) -> Result<Vec<String>, BatchError> {
    let text = read_maybe_gz(path, opts.max_decompressed)?;
    Ok(lines(path, &text)?
        .into_iter()
        .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
        .collect())
}

/// The coordinate entries of a Matrix Market file, in file order.
struct Entries {
    n_rows: usize,
    n_cols: usize,
    /// 0-based gene (row) of each entry.
    rows: Vec<u32>,
    /// 0-based cell (column) of each entry.
    cols: Vec<u32>,
    counts: Vec<u32>,
}

fn parse_matrix(path: &Path, text: &[u8]) -> Result<Entries, BatchError> {
    let mut pos = 0usize;
    let mut line_no = 0usize;
    let mut next_line = |pos: &mut usize| -> Option<(usize, &[u8])> {
        if *pos >= text.len() {
            return None;
        }
        let start = *pos;
        let end = memchr_newline(&text[start..]).map_or(text.len(), |i| start + i);
        *pos = end + 1;
        line_no += 1;
        Some((line_no, &text[start..end]))
    };

    let Some((_, header)) = next_line(&mut pos) else {
        return Err(BatchError::new(
            path,
            BatchErrorKind::Empty("the matrix file is empty".into()),
        ));
    };
    let header = String::from_utf8_lossy(header).to_ascii_lowercase();
    let words: Vec<&str> = header.split_whitespace().collect();
    if words.len() < 5 || words[0] != "%%matrixmarket" || words[1] != "matrix" {
        return Err(BatchError::invalid(
            path,
            format!("line 1: expected a '%%MatrixMarket matrix coordinate integer general' header, found {header:?}"),
        ));
    }
    if words[2] != "coordinate" || words[4] != "general" {
        return Err(BatchError::invalid(
            path,
            format!(
                "line 1: only 'coordinate … general' matrices hold counts, found '{} … {}'",
                words[2], words[4]
            ),
        ));
    }
    let real = match words[3] {
        "integer" => false,
        "real" | "double" => true,
        other => {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line 1: field type '{other}' cannot hold counts (expected integer or real)"
                ),
            ))
        }
    };

    // Size line, after comments.
    let (size_line_no, size_line) = loop {
        match next_line(&mut pos) {
            None => {
                return Err(BatchError::corrupt(
                    path,
                    "truncated: no size line after the header",
                ))
            }
            Some((_, l)) if l.starts_with(b"%") || l.iter().all(u8::is_ascii_whitespace) => {}
            Some(x) => break x,
        }
    };
    let sizes: Vec<u64> = std::str::from_utf8(size_line)
        .ok()
        .map(|s| s.split_whitespace().map(str::parse).collect::<Result<Vec<u64>, _>>())
        .and_then(Result::ok)
        .filter(|v| v.len() == 3)
        .ok_or_else(|| {
            BatchError::invalid(
                path,
                format!(
                    "line {size_line_no}: expected the size line 'rows columns entries', found {:?}",
                    String::from_utf8_lossy(size_line)
                ),
            )
        })?;
    let (n_rows, n_cols, nnz) = (sizes[0], sizes[1], sizes[2]);
    if n_rows > u32::MAX as u64 || n_cols > u32::MAX as u64 {
        return Err(BatchError::invalid(
            path,
            format!("line {size_line_no}: {n_rows} × {n_cols} exceeds 2^32 genes or cells"),
        ));
    }
    // Each entry line takes at least 6 bytes ("1 1 1\n"): a lying entry count cannot make us
    // reserve more than the text could hold.
    let reserve = (nnz as usize).min(text.len() / 6 + 1);
    let mut e = Entries {
        n_rows: n_rows as usize,
        n_cols: n_cols as usize,
        rows: Vec::with_capacity(reserve),
        cols: Vec::with_capacity(reserve),
        counts: Vec::with_capacity(reserve),
    };
    let mut seen = 0u64;
    while let Some((no, line)) = next_line(&mut pos) {
        if line.iter().all(u8::is_ascii_whitespace) || line.starts_with(b"%") {
            continue;
        }
        seen += 1;
        if seen > nnz {
            return Err(BatchError::invalid(
                path,
                format!("line {no}: more entries than the {nnz} the size line declares"),
            ));
        }
        let (row, col, count) = parse_entry(line, real).map_err(|what| {
            BatchError::invalid(
                path,
                format!("line {no}: {what} in {:?}", String::from_utf8_lossy(line)),
            )
        })?;
        if row == 0 || row > n_rows || col == 0 || col > n_cols {
            return Err(BatchError::invalid(
                path,
                format!("line {no}: entry ({row}, {col}) outside the {n_rows} × {n_cols} matrix (indices are 1-based)"),
            ));
        }
        if count == 0 {
            continue;
        }
        e.rows.push((row - 1) as u32);
        e.cols.push((col - 1) as u32);
        e.counts.push(count);
    }
    if seen < nnz {
        return Err(BatchError::corrupt(
            path,
            format!("truncated: the size line declares {nnz} entries, the file holds {seen}"),
        ));
    }
    Ok(e)
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Parses `row col value`; the value must be a non-negative integer that fits u32.
fn parse_entry(line: &[u8], real: bool) -> Result<(u64, u64, u32), String> {
    let mut fields = line
        .split(|c| c.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let mut index = |what: &str| -> Result<u64, String> {
        let f = fields.next().ok_or_else(|| format!("missing {what}"))?;
        parse_u64(f).ok_or_else(|| {
            format!(
                "{what} {:?} is not a positive integer",
                String::from_utf8_lossy(f)
            )
        })
    };
    let row = index("row")?;
    let col = index("column")?;
    let value = fields.next().ok_or("missing value")?;
    if fields.next().is_some() {
        return Err("more than three fields".into());
    }
    let count = match parse_u64(value) {
        Some(v) if v <= u32::MAX as u64 => v as u32,
        Some(v) => return Err(format!("count {v} exceeds the u32 range")),
        None => parse_real_count(value, real)?,
    };
    Ok((row, col, count))
}

fn parse_u64(f: &[u8]) -> Option<u64> {
    if f.is_empty() || f.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in f {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + d as u64;
    }
    Some(v)
}

/// Counts written as reals (`3.0`, `1e2`) are accepted when they are whole and in range.
fn parse_real_count(f: &[u8], real: bool) -> Result<u32, String> {
    let s = String::from_utf8_lossy(f);
    let v: f64 = s
        .parse()
        .map_err(|_| format!("count {s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("count {s:?} is not finite"));
    }
    if v < 0.0 {
        return Err(format!("count {s} is negative"));
    }
    if v.fract() != 0.0 {
        return Err(format!(
            "count {s} is not an integer (cellstream needs raw UMI counts{})",
            if real {
                "; the header says real, but counts must be whole"
            } else {
                ""
            }
        ));
    }
    if v > u32::MAX as f64 {
        return Err(format!("count {s} exceeds the u32 range"));
    }
    Ok(v as u32)
}

impl Entries {
    /// Counting pass over the cell column, then per-cell sort only where genes are out of order.
    fn into_csr(self, path: &Path) -> Result<CsrArrays, BatchError> {
        let nnz = self.counts.len();
        let mut indptr = vec![0u64; self.n_cols + 1];
        for &c in &self.cols {
            indptr[c as usize + 1] += 1;
        }
        for i in 0..self.n_cols {
            indptr[i + 1] += indptr[i];
        }
        let mut next: Vec<u64> = indptr[..self.n_cols].to_vec();
        let mut indices = vec![0u32; nnz];
        let mut data = vec![0u32; nnz];
        for k in 0..nnz {
            let c = self.cols[k] as usize;
            let at = next[c] as usize;
            indices[at] = self.rows[k];
            data[at] = self.counts[k];
            next[c] += 1;
        }
        let mut csr = CsrArrays {
            indptr,
            indices,
            data,
        };
        csr.sort_rows()
            .map_err(|what| BatchError::invalid(path, what))?;
        Ok(csr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Entries, BatchError> {
        parse_matrix(Path::new("m.mtx"), text.as_bytes())
    }

    #[test]
    fn entries_and_real_integers() {
        let e = parse(
            "%%MatrixMarket matrix coordinate real general\n%c\n3 2 3\n1 1 2.0\n3 1 1e1\n2 2 4\n",
        )
        .unwrap();
        assert_eq!(e.rows, vec![0, 2, 1]);
        assert_eq!(e.counts, vec![2, 10, 4]);
        let csr = e.into_csr(Path::new("m")).unwrap();
        assert_eq!(csr.indptr, vec![0, 2, 3]);
    }

    #[test]
    fn bad_counts_are_named_with_line() {
        let h = "%%MatrixMarket matrix coordinate real general\n3 2 1\n";
        let err = |body: &str| parse(&format!("{h}{body}")).err().unwrap().to_string();
        assert!(err("1 1 2.5\n").contains("line 3: count 2.5 is not an integer"));
        assert!(err("1 1 -3\n").contains("negative"));
        assert!(err("1 1 nan\n").contains("not finite"));
        assert!(err("4 1 1\n").contains("outside the 3 × 2 matrix"));
        assert!(err("1 1 5000000000\n").contains("exceeds the u32 range"));
        assert!(err("").contains("truncated: the size line declares 1 entries, the file holds 0"));
    }

    #[test]
    fn out_of_order_genes_are_sorted_and_duplicates_rejected() {
        let e = parse("%%MatrixMarket matrix coordinate integer general\n3 1 2\n3 1 5\n1 1 7\n")
            .unwrap();
        let csr = e.into_csr(Path::new("m")).unwrap();
        assert_eq!(csr.indices, vec![0, 2]);
        assert_eq!(csr.data, vec![7, 5]);
        let e = parse("%%MatrixMarket matrix coordinate integer general\n3 1 2\n3 1 5\n3 1 7\n")
            .unwrap();
        assert!(e.into_csr(Path::new("m")).is_err());
    }
}
