//! 10x Matrix Market directories (Cell Ranger v2 `genes.tsv`, v3 `features.tsv`, gzipped or not).
//!
//! The matrix is genes × cells, 1-based; cellstream turns it into cells × genes CSR with a
//! counting pass over the cell column (no sort unless a cell's genes arrive out of order).

use std::path::{Path, PathBuf};

use super::bytes::{Lines, TextCap, MAX_LINE};
use super::{quote, BatchError, BatchErrorKind, CountBatch, CsrArrays, Format, Limits};

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

/// Longest gene id, gene symbol or barcode kept (as the HDF5 reader's strings).
pub(crate) const MAX_NAME: usize = 256;

/// Reads a 10x directory as a stream: the matrix's header and size line first, so that the
/// shape it claims is checked against the caps before anything is sized from it; then the
/// features and barcodes, refused at the first line beyond the matrix's rows or columns;
/// then the entries, straight into the CSR arrays. Memory: the CSR being built (4 bytes
/// more per entry when the file is not in cell order) and one bounded line buffer.
pub fn read_dir(dir: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let m = find_members(dir)?;
    let cap = TextCap::new(opts.max_decompressed);
    let mut matrix = Lines::open(&m.matrix, &cap, MAX_LINE)?;
    let h = read_header(&m.matrix, &mut matrix)?;
    opts.check_claims(
        &m.matrix,
        &format!("line {}: the size line declares", h.size_line),
        h.n_cols,
        h.n_rows,
        h.nnz,
    )?;
    let (gene_ids, gene_names) = read_features(&m.features, &cap, h.n_rows, &m.matrix)?;
    if gene_names.len() as u64 != h.n_rows {
        return Err(BatchError::invalid(
            &m.matrix,
            format!(
                "the matrix has {} rows (genes) but {} lists {} features",
                h.n_rows,
                m.features.display(),
                gene_names.len()
            ),
        ));
    }
    let barcodes = read_barcodes(&m.barcodes, &cap, h.n_cols, &m.matrix)?;
    if barcodes.len() as u64 != h.n_cols {
        return Err(BatchError::invalid(
            &m.matrix,
            format!(
                "the matrix has {} columns (cells) but {} lists {} barcodes",
                h.n_cols,
                m.barcodes.display(),
                barcodes.len()
            ),
        ));
    }
    let csr = read_entries(&m.matrix, &mut matrix, &h)?;
    CountBatch::from_csr(dir, Format::Mtx, gene_names, Some(gene_ids), barcodes, csr)
}

/// The shape a 10x directory's matrix claims, from its header and size line alone (for the
/// daemon's memory admission); `None` when they cannot be read.
pub(crate) fn claims(dir: &Path) -> Option<(u64, u64, u64)> {
    let m = find_members(dir).ok()?;
    let cap = TextCap::new(64 << 20);
    let mut matrix = Lines::open(&m.matrix, &cap, MAX_LINE).ok()?;
    let h = read_header(&m.matrix, &mut matrix).ok()?;
    Some((h.n_cols, h.n_rows, h.nnz))
}

/// Each non-empty line's first tab-separated field, at most `most` of them (the matrix has
/// that many rows or columns: one more is refused at once).
fn read_names(
    path: &Path,
    cap: &TextCap,
    most: u64,
    what: &str,
    matrix: &Path,
    mut each: impl FnMut(&str) -> Result<(), String>,
) -> Result<u64, BatchError> {
    let mut lines = Lines::open(path, cap, MAX_LINE)?;
    let mut n = 0u64;
    while let Some(line) = lines.next_line()? {
        if line.bytes.is_empty() {
            continue;
        }
        if n == most {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line {}: more {what} than the {most} that {} declares",
                    line.no,
                    matrix.display()
                ),
            ));
        }
        let text = line.text(path)?;
        each(text).map_err(|why| BatchError::invalid(path, format!("line {}: {why}", line.no)))?;
        n += 1;
    }
    Ok(n)
}

/// A name as kept: at most [`MAX_NAME`] bytes.
fn name(field: &str, what: &str) -> Result<String, String> {
    if field.len() > MAX_NAME {
        return Err(format!(
            "the {what} {} is longer than the limit of {MAX_NAME} bytes on a name",
            quote(field.as_bytes())
        ));
    }
    Ok(field.to_owned())
}

/// `id<TAB>symbol[<TAB>type]` per line; returns (ids, symbols).
fn read_features(
    path: &Path,
    cap: &TextCap,
    rows: u64,
    matrix: &Path,
) -> Result<(Vec<String>, Vec<String>), BatchError> {
    let mut ids = Vec::with_capacity(rows as usize);
    let mut names = Vec::with_capacity(rows as usize);
    read_names(path, cap, rows, "features (rows)", matrix, |line| {
        let mut cols = line.split('\t');
        let id = cols.next().unwrap_or_default();
        let symbol = cols.next().unwrap_or(id);
        ids.push(name(id, "feature id")?);
        names.push(name(symbol, "gene symbol")?);
        Ok(())
    })?;
    Ok((ids, names))
}

fn read_barcodes(
    path: &Path,
    cap: &TextCap,
    cols: u64,
    matrix: &Path,
) -> Result<Vec<String>, BatchError> {
    let mut barcodes = Vec::with_capacity(cols as usize);
    read_names(path, cap, cols, "barcodes (columns)", matrix, |line| {
        barcodes.push(name(
            line.split('\t').next().unwrap_or_default(),
            "barcode",
        )?);
        Ok(())
    })?;
    Ok(barcodes)
}

/// What the header and the size line say.
#[derive(Debug)]
struct Header {
    n_rows: u64,
    n_cols: u64,
    nnz: u64,
    real: bool,
    size_line: u64,
}

fn read_header(path: &Path, lines: &mut Lines) -> Result<Header, BatchError> {
    let Some(first) = lines.next_line()? else {
        return Err(BatchError::new(
            path,
            BatchErrorKind::Empty("the matrix file is empty".into()),
        ));
    };
    let header = String::from_utf8_lossy(first.bytes).to_ascii_lowercase();
    let words: Vec<&str> = header.split_whitespace().take(6).collect();
    if words.len() < 5 || words[0] != "%%matrixmarket" || words[1] != "matrix" {
        return Err(BatchError::invalid(
            path,
            format!(
                "line 1: expected a '%%MatrixMarket matrix coordinate integer general' header, found {}",
                quote(header.as_bytes())
            ),
        ));
    }
    if words[2] != "coordinate" || words[4] != "general" {
        return Err(BatchError::invalid(
            path,
            format!(
                "line 1: only 'coordinate … general' matrices hold counts, found {} … {}",
                quote(words[2].as_bytes()),
                quote(words[4].as_bytes())
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
                    "line 1: field type {} cannot hold counts (expected integer or real)",
                    quote(other.as_bytes())
                ),
            ))
        }
    };

    // Size line, after comments.
    let (size_line, sizes) = loop {
        let Some(line) = lines.next_line()? else {
            return Err(BatchError::corrupt(
                path,
                "truncated: no size line after the header",
            ));
        };
        if line.bytes.starts_with(b"%") || line.is_blank() {
            continue;
        }
        let sizes: Option<Vec<u64>> = std::str::from_utf8(line.bytes)
            .ok()
            .map(|s| {
                s.split_whitespace()
                    .map(str::parse)
                    .collect::<Result<Vec<u64>, _>>()
            })
            .and_then(Result::ok)
            .filter(|v| v.len() == 3);
        let Some(sizes) = sizes else {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line {}: expected the size line 'rows columns entries', found {}",
                    line.no,
                    quote(line.bytes)
                ),
            ));
        };
        break (line.no, sizes);
    };
    let (n_rows, n_cols, nnz) = (sizes[0], sizes[1], sizes[2]);
    if n_rows > u32::MAX as u64 || n_cols > u32::MAX as u64 {
        return Err(BatchError::invalid(
            path,
            format!("line {size_line}: {n_rows} × {n_cols} exceeds 2^32 genes or cells"),
        ));
    }
    if nnz > u32::MAX as u64 {
        return Err(super::too_large(
            path,
            format!(
                "line {size_line}: {nnz} stored counts, more than the 4294967295 a batch can hold"
            ),
        ));
    }
    Ok(Header {
        n_rows,
        n_cols,
        nnz,
        real,
        size_line,
    })
}

/// The entries after the size line, into CSR: at most the declared number, each checked.
fn read_entries(path: &Path, lines: &mut Lines, h: &Header) -> Result<CsrArrays, BatchError> {
    let (n_rows, n_cols, nnz) = (h.n_rows, h.n_cols, h.nnz);
    let mut csr = CsrBuilder::new(n_cols as usize, nnz as usize);
    let mut seen = 0u64;
    while let Some(line) = lines.next_line()? {
        let fast = fast_entry(line.bytes);
        if fast.is_none() && (line.is_blank() || line.bytes.starts_with(b"%")) {
            continue;
        }
        seen += 1;
        if seen > nnz {
            return Err(BatchError::invalid(
                path,
                format!(
                    "line {}: more entries than the {nnz} the size line declares",
                    line.no
                ),
            ));
        }
        let (row, col, count) = match fast {
            Some(entry) => entry,
            None => parse_entry(line.bytes, h.real).map_err(|what| {
                BatchError::invalid(
                    path,
                    format!("line {}: {what} in {}", line.no, quote(line.bytes)),
                )
            })?,
        };
        if row == 0 || row > n_rows || col == 0 || col > n_cols {
            return Err(BatchError::invalid(
                path,
                format!("line {}: entry ({row}, {col}) outside the {n_rows} × {n_cols} matrix (indices are 1-based)", line.no),
            ));
        }
        if count == 0 {
            continue;
        }
        csr.push((row - 1) as u32, (col - 1) as u32, count);
    }
    if seen < nnz {
        return Err(BatchError::corrupt(
            path,
            format!("truncated: the size line declares {nnz} entries, the file holds {seen}"),
        ));
    }
    csr.finish().map_err(|what| BatchError::invalid(path, what))
}

/// `row col count` as Cell Ranger writes it (single spaces, an integer count); `None` for
/// anything else, which [`parse_entry`] then reads or explains.
#[inline]
fn fast_entry(line: &[u8]) -> Option<(u64, u64, u32)> {
    #[inline(always)]
    fn number(line: &[u8], at: &mut usize) -> Option<u64> {
        let start = *at;
        let mut v = 0u64;
        while let Some(&c) = line.get(*at) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = v.wrapping_mul(10).wrapping_add(d as u64);
            *at += 1;
        }
        // 19 digits always fit u64.
        (*at > start && *at - start <= 19).then_some(v)
    }
    let mut at = 0;
    let row = number(line, &mut at)?;
    (line.get(at) == Some(&b' ')).then_some(())?;
    at += 1;
    let col = number(line, &mut at)?;
    (line.get(at) == Some(&b' ')).then_some(())?;
    at += 1;
    let count = number(line, &mut at)?;
    if at != line.len() && !line[at..].iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some((row, col, u32::try_from(count).ok()?))
}

/// Parses `row col value`; the value must be a non-negative integer that fits u32.
fn parse_entry(line: &[u8], real: bool) -> Result<(u64, u64, u32), String> {
    let mut fields = line
        .split(|c| c.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let mut index = |what: &str| -> Result<u64, String> {
        let f = fields.next().ok_or_else(|| format!("missing {what}"))?;
        parse_u64(f).ok_or_else(|| format!("{what} {} is not a positive integer", quote(f)))
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
    let quoted = quote(f);
    // A number is short: anything long is not one (and is not copied to be parsed).
    let v: f64 = std::str::from_utf8(f)
        .ok()
        .filter(|s| s.len() <= 64)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("count {quoted} is not a number"))?;
    let s = String::from_utf8_lossy(f);
    if !v.is_finite() {
        return Err(format!("count {quoted} is not finite"));
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

/// Builds cells × genes CSR from genes × cells entries as they arrive. In cell order (as
/// Cell Ranger, STARsolo and scipy's `mmwrite` of a CSC matrix write them) the entries go
/// straight into place and `indptr` follows the cells; the first entry out of cell order
/// makes the builder keep each entry's cell (4 bytes more per entry) and put them in place
/// at the end by a counting sort, permuting in place.
struct CsrBuilder {
    n_cols: usize,
    /// The declared number of entries: the most there can be.
    nnz: usize,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    data: Vec<u32>,
    /// The cell of the last entry while in cell order.
    col: usize,
    /// Each entry's cell, once the file left cell order.
    cols: Option<Vec<u32>>,
}

impl CsrBuilder {
    /// The arrays grow as entries arrive, never past the declared `nnz` (no entry beyond it
    /// is accepted), so a size line that lies costs nothing until entries back it.
    fn new(n_cols: usize, nnz: usize) -> CsrBuilder {
        CsrBuilder {
            n_cols,
            nnz,
            indptr: vec![0; n_cols + 1],
            indices: Vec::new(),
            data: Vec::new(),
            col: 0,
            cols: None,
        }
    }

    /// Room for more entries: double, up to the declared count. Large arrays are mapped
    /// memory that the allocator grows in place (`mremap`), without a copy.
    #[cold]
    fn grow(&mut self) {
        let len = self.indices.len();
        let want = (len * 2).max(1 << 16).min(self.nnz).max(len + 1) - len;
        self.indices.reserve_exact(want);
        self.data.reserve_exact(want);
        if let Some(cols) = &mut self.cols {
            cols.reserve_exact(want);
        }
    }

    #[inline]
    fn push(&mut self, row: u32, col: u32, count: u32) {
        if self.indices.len() == self.indices.capacity() {
            self.grow();
        }
        let c = col as usize;
        match &mut self.cols {
            None if c >= self.col => {
                if c > self.col {
                    let at = self.indices.len() as u64;
                    self.indptr[self.col + 1..=c].fill(at);
                    self.col = c;
                }
            }
            None => {
                // Out of cell order: from now on, keep each entry's cell.
                let mut cols = Vec::with_capacity(self.indices.capacity());
                for cell in 0..=self.col {
                    let end = if cell < self.col {
                        self.indptr[cell + 1]
                    } else {
                        self.indices.len() as u64
                    };
                    let n = (end - self.indptr[cell]) as usize;
                    cols.extend(std::iter::repeat_n(cell as u32, n));
                }
                cols.push(col);
                self.cols = Some(cols);
            }
            Some(cols) => cols.push(col),
        }
        self.indices.push(row);
        self.data.push(count);
    }

    fn finish(mut self) -> Result<CsrArrays, String> {
        let nnz = self.indices.len();
        match self.cols.take() {
            None => self.indptr[self.col + 1..].fill(nnz as u64),
            Some(mut cols) => {
                // Counting sort: where each cell's entries start, then each entry's place
                // (entries of a cell keep their file order), then the permutation in place.
                self.indptr.fill(0);
                for &c in &cols {
                    self.indptr[c as usize + 1] += 1;
                }
                for i in 0..self.n_cols {
                    self.indptr[i + 1] += self.indptr[i];
                }
                let mut next: Vec<u64> = self.indptr[..self.n_cols].to_vec();
                for c in cols.iter_mut() {
                    let cell = *c as usize;
                    *c = next[cell] as u32;
                    next[cell] += 1;
                }
                drop(next);
                let dest = &mut cols;
                for k in 0..nnz {
                    loop {
                        let d = dest[k] as usize;
                        if d == k {
                            break;
                        }
                        self.indices.swap(k, d);
                        self.data.swap(k, d);
                        dest.swap(k, d);
                    }
                }
            }
        }
        let mut csr = CsrArrays {
            indptr: self.indptr,
            indices: self.indices,
            data: self.data,
        };
        csr.sort_rows()?;
        Ok(csr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a matrix held in `text` through the streaming path, as `read_dir` does.
    fn parse(text: &str) -> Result<CsrArrays, BatchError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("matrix.mtx");
        std::fs::write(&path, text).unwrap();
        let cap = TextCap::new(1 << 30);
        let mut lines = Lines::open(&path, &cap, MAX_LINE)?;
        let h = read_header(&path, &mut lines)?;
        read_entries(&path, &mut lines, &h)
    }

    #[test]
    fn entries_and_real_integers() {
        let csr = parse(
            "%%MatrixMarket matrix coordinate real general\n%c\n3 2 3\n1 1 2.0\n3 1 1e1\n2 2 4\n",
        )
        .unwrap();
        assert_eq!(csr.indptr, vec![0, 2, 3]);
        assert_eq!(csr.indices, vec![0, 2, 1]);
        assert_eq!(csr.data, vec![2, 10, 4]);
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
        let long = err(&format!("1 1 {}\n", "9".repeat(100_000)));
        assert!(
            long.contains("(100004 bytes)") && long.len() < 300,
            "{long}"
        );
    }

    #[test]
    fn out_of_order_genes_are_sorted_and_duplicates_rejected() {
        let csr = parse("%%MatrixMarket matrix coordinate integer general\n3 1 2\n3 1 5\n1 1 7\n")
            .unwrap();
        assert_eq!(csr.indices, vec![0, 2]);
        assert_eq!(csr.data, vec![7, 5]);
        let e = parse("%%MatrixMarket matrix coordinate integer general\n3 1 2\n3 1 5\n3 1 7\n");
        assert!(e.is_err());
    }

    /// Entries in gene order (a row-major writer) give the same CSR as in cell order.
    #[test]
    fn entries_out_of_cell_order_give_the_same_csr() {
        let cells: Vec<Vec<(u32, u32)>> = (0..50u32)
            .map(|c| {
                (0..40u32)
                    .filter(|g| (g * 7 + c * 3) % 5 < 2)
                    .map(|g| (g, 1 + (g + c) % 9))
                    .collect()
            })
            .collect();
        let nnz: usize = cells.iter().map(Vec::len).sum();
        let head = format!("%%MatrixMarket matrix coordinate integer general\n40 50 {nnz}\n");
        let mut by_cell = head.clone();
        let mut by_gene = head;
        for (c, genes) in cells.iter().enumerate() {
            for (g, v) in genes {
                by_cell.push_str(&format!("{} {} {v}\n", g + 1, c + 1));
            }
        }
        for g in 0..40u32 {
            for (c, genes) in cells.iter().enumerate().rev() {
                if let Some((_, v)) = genes.iter().find(|e| e.0 == g) {
                    by_gene.push_str(&format!("{} {} {v}\n", g + 1, c + 1));
                }
            }
        }
        let a = parse(&by_cell).unwrap();
        let b = parse(&by_gene).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.indices.len(), nnz);
        // A few cells late in an otherwise ordered file.
        let mut late = by_cell.lines().collect::<Vec<_>>();
        let tail = late.split_off(2 + nnz / 2);
        let mut lines = late[..2].to_vec();
        lines.extend(&tail);
        lines.extend(&late[2..]);
        assert_eq!(parse(&(lines.join("\n") + "\n")).unwrap(), a);
    }

    #[test]
    fn the_fast_path_reads_what_the_general_one_reads() {
        for line in ["1 2 3", "10 20 4294967295", "7 8 9 ", "1 1 0"] {
            let general = parse_entry(line.as_bytes(), false).unwrap();
            assert_eq!(fast_entry(line.as_bytes()), Some(general), "{line}");
        }
        for line in [
            "1  2 3",
            "1 2 3.0",
            "1\t2\t3",
            "1 2 4294967296",
            "1 2",
            "a b c",
            "1 2 3 4",
        ] {
            assert_eq!(fast_entry(line.as_bytes()), None, "{line}");
        }
    }
}
