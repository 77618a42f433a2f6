//! Count batches: what every reader yields.
//!
//! A [`CountBatch`] is cells × genes of raw UMI counts in CSR form (one row per cell), with the
//! gene symbols, optional feature ids and cell barcodes. Readers differ only in where the three
//! CSR arrays live: the native `.csb` reader leaves them in the file's bytes (memory-mapped in
//! the one-shot commands, copied into one aligned buffer by the daemon), the others build them
//! on the heap.

mod bytes;
mod csb;
mod dense;
mod error;
#[cfg(feature = "hdf5")]
mod h5;
pub mod isolated;
mod mtx;

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::tokenize::rng::CellRng;

pub use csb::{
    from_bytes as csb_from_bytes, from_zst_reader as csb_from_zst_reader, write_csb, write_csb_file,
};
pub use error::{quote, BatchError, BatchErrorKind};

#[cfg(target_endian = "big")]
compile_error!(
    "cellstream reads little-endian arrays in place and supports little-endian hosts only"
);

/// How files are read, and the one limit every reader has had from the start.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Largest number of bytes a batch's compressed members (gzip, zstd) may expand to, and
    /// its text members (MTX, dense text) may hold, all members together.
    pub max_decompressed: u64,
    /// Memory-map `.csb` files (no copy). Safe only while nobody truncates the file: a
    /// truncated mapping faults (SIGBUS) on access. The daemon reads files that producers
    /// may still hold open, so it copies them instead.
    pub memory_map: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
            memory_map: true,
        }
    }
}

/// The shape a batch may have ([`read_batch_capped`]): beyond a cap, the input is refused
/// with [`BatchErrorKind::TooLarge`], naming the cap and the value, at the first excess. A
/// header's claims (an MTX size line, a `.csb` header, an HDF5 dataspace) are checked before
/// anything is allocated from them, and a stream is refused as soon as it passes a cap, not
/// after it has been read. The defaults fit a large 10x run (tens of thousands of cells of
/// 36,601 genes) on a machine of 8 GiB; the daemon takes them from `[spool]`, the commands
/// from `--max-cells` and its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most cells (barcodes) a batch may hold.
    pub max_cells: u64,
    /// Most genes (features) a batch may hold.
    pub max_genes: u64,
    /// Most stored counts (entries of the sparse matrix) a batch may hold.
    pub max_stored_counts: u64,
}

/// `[spool] max_decompressed_bytes` and `--max-decompressed-bytes` by default: 4 GiB.
pub const DEFAULT_MAX_DECOMPRESSED: u64 = 4 << 30;
/// `[spool] max_cells` by default: ten times a 10x high-throughput lane.
pub const DEFAULT_MAX_CELLS: u64 = 200_000;
/// `[spool] max_genes` by default: a barnyard (human + mouse, 68,886 features) with room.
pub const DEFAULT_MAX_GENES: u64 = 100_000;
/// `[spool] max_stored_counts` by default: 2.4 GB as CSR, about 3.9 GB as MTX text (just
/// under the decompression cap).
pub const DEFAULT_MAX_STORED_COUNTS: u64 = 300_000_000;

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_cells: DEFAULT_MAX_CELLS,
            max_genes: DEFAULT_MAX_GENES,
            max_stored_counts: DEFAULT_MAX_STORED_COUNTS,
        }
    }
}

/// What a reader works under: the [`ReadOptions`] and the [`Caps`] together.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_decompressed: u64,
    pub max_cells: u64,
    pub max_genes: u64,
    pub max_stored_counts: u64,
    pub memory_map: bool,
}

impl Limits {
    fn new(opts: &ReadOptions, caps: &Caps) -> Limits {
        Limits {
            max_decompressed: opts.max_decompressed,
            max_cells: caps.max_cells,
            max_genes: caps.max_genes,
            max_stored_counts: caps.max_stored_counts,
            memory_map: opts.memory_map,
        }
    }

    /// Checks a shape claimed by `what` (a header, a size line) against the caps, before
    /// anything is allocated from it.
    pub(crate) fn check_claims(
        &self,
        path: &Path,
        what: &str,
        cells: u64,
        genes: u64,
        stored: u64,
    ) -> Result<(), BatchError> {
        for (n, cap, unit, key) in [
            (cells, self.max_cells, "cells", "max_cells"),
            (genes, self.max_genes, "genes", "max_genes"),
            (
                stored,
                self.max_stored_counts,
                "stored counts",
                "max_stored_counts",
            ),
        ] {
            if n > cap {
                return Err(too_large(
                    path,
                    format!("{what} {n} {unit}, over the {key} cap of {cap}"),
                ));
            }
        }
        Ok(())
    }
}

/// A [`BatchErrorKind::TooLarge`] error.
pub(crate) fn too_large(path: &Path, what: String) -> BatchError {
    BatchError::new(path, BatchErrorKind::TooLarge(what))
}

/// The formats cellstream reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 10x Matrix Market directory (v2 `genes.tsv` or v3 `features.tsv`, gzipped or not).
    Mtx,
    /// Native `.csb`, memory-mapped or copied (`ReadOptions::memory_map`).
    Csb,
    /// `.csb` compressed with zstd.
    CsbZst,
    /// Dense genes × cells text matrix (first line barcodes, then `gene<TAB>counts…`).
    DenseText,
    /// 10x HDF5 (`.h5`, v2 or v3) or AnnData (`.h5ad`); feature `hdf5`.
    Hdf5,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Mtx => "mtx",
            Format::Csb => "csb",
            Format::CsbZst => "csb.zst",
            Format::DenseText => "dense-text",
            Format::Hdf5 => "hdf5",
        }
    }
}

/// One cell's stored entries: gene indices (strictly increasing) and their counts.
#[derive(Debug, Clone, Copy)]
pub struct CellCounts<'a> {
    pub genes: &'a [u32],
    pub counts: &'a [u32],
}

/// CSR arrays on the heap, as the non-mapped readers build them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CsrArrays {
    pub indptr: Vec<u64>,
    pub indices: Vec<u32>,
    pub data: Vec<u32>,
}

impl CsrArrays {
    /// Sorts each row's entries by column where they are out of order (writers may store them
    /// unsorted); a column repeated within a row is an error, 1-based in the message.
    pub(crate) fn sort_rows(&mut self) -> Result<(), String> {
        if let Some(what) = indptr_problem(&self.indptr, self.indices.len(), self.data.len()) {
            return Err(what);
        }
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for row in 0..self.indptr.len() - 1 {
            let r = self.indptr[row] as usize..self.indptr[row + 1] as usize;
            if self.indices[r.clone()].windows(2).all(|w| w[0] < w[1]) {
                continue;
            }
            pairs.clear();
            pairs.extend(
                self.indices[r.clone()]
                    .iter()
                    .copied()
                    .zip(self.data[r.clone()].iter().copied()),
            );
            pairs.sort_unstable_by_key(|p| p.0);
            if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(format!(
                    "duplicate entry for gene {} in cell {} (1-based)",
                    w[0].0 + 1,
                    row + 1
                ));
            }
            for (k, (g, v)) in pairs.iter().enumerate() {
                self.indices[r.start + k] = *g;
                self.data[r.start + k] = *v;
            }
        }
        Ok(())
    }
}

/// Where the CSR arrays live.
enum Storage {
    Owned {
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<u32>,
    },
    /// Byte ranges inside a validated `.csb` image (mapped file or decompressed buffer).
    Image {
        image: bytes::Image,
        indptr: Range<usize>,
        indices: Range<usize>,
        data: Range<usize>,
    },
}

/// Cells × genes raw counts with their names. Every reader returns this.
pub struct CountBatch {
    /// The file or directory it was read from (for error messages and batch ids).
    pub source: PathBuf,
    pub format: Format,
    /// Gene symbols, one per column; what the vocabulary is matched against.
    pub gene_names: Vec<String>,
    /// Feature ids (e.g. Ensembl) when the input has them.
    pub gene_ids: Option<Vec<String>>,
    /// Cell barcodes, one per row.
    pub barcodes: Vec<String>,
    storage: Storage,
}

impl std::fmt::Debug for CountBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountBatch")
            .field("source", &self.source)
            .field("format", &self.format)
            .field("n_cells", &self.n_cells())
            .field("n_genes", &self.n_genes())
            .field("nnz", &self.nnz())
            .finish()
    }
}

impl CountBatch {
    /// Builds a batch from heap arrays, validating them exactly as the `.csb` reader does.
    pub fn from_csr(
        source: impl Into<PathBuf>,
        format: Format,
        gene_names: Vec<String>,
        gene_ids: Option<Vec<String>>,
        barcodes: Vec<String>,
        csr: CsrArrays,
    ) -> Result<CountBatch, BatchError> {
        let source = source.into();
        let CsrArrays {
            indptr,
            indices,
            data,
        } = csr;
        validate_csr(
            &source,
            barcodes.len(),
            gene_names.len(),
            &indptr,
            &indices,
            &data,
        )?;
        if let Some(ids) = &gene_ids {
            if ids.len() != gene_names.len() {
                return Err(BatchError::invalid(
                    &source,
                    format!(
                        "{} feature ids for {} gene names",
                        ids.len(),
                        gene_names.len()
                    ),
                ));
            }
        }
        Ok(CountBatch {
            source,
            format,
            gene_names,
            gene_ids,
            barcodes,
            storage: Storage::Owned {
                indptr,
                indices,
                data,
            },
        })
    }

    /// Cells `rows` (in order) as a new batch over the same genes, arrays on the heap.
    pub fn select(&self, rows: std::ops::Range<usize>) -> CountBatch {
        self.select_rows(&rows.collect::<Vec<_>>())
    }

    /// Cells `rows` (each `< n_cells`, in the order given) as a new batch over the same
    /// genes, arrays on the heap.
    pub fn select_rows(&self, rows: &[usize]) -> CountBatch {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        indptr.push(0u64);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        for &i in rows {
            let cell = self.cell(i);
            indices.extend_from_slice(cell.genes);
            data.extend_from_slice(cell.counts);
            indptr.push(indices.len() as u64);
        }
        let barcodes = rows.iter().map(|&i| self.barcodes[i].clone()).collect();
        self.derived(barcodes, indptr, indices, data)
    }

    /// A batch of other cells over this one's genes, from arrays derived from this batch's
    /// (valid by construction).
    fn derived(
        &self,
        barcodes: Vec<String>,
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<u32>,
    ) -> CountBatch {
        CountBatch::from_csr(
            self.source.clone(),
            self.format,
            self.gene_names.clone(),
            self.gene_ids.clone(),
            barcodes,
            CsrArrays {
                indptr,
                indices,
                data,
            },
        )
        .expect("arrays derived from a valid batch form a valid batch")
    }

    /// The batch as if read at `fraction` of its depth: each count kept by a binomial draw
    /// of the cell's own generator (the run `seed` and its barcode), zeros dropped.
    pub fn thinned(&self, fraction: f64, seed: u64) -> CountBatch {
        let mut indptr = Vec::with_capacity(self.n_cells() + 1);
        indptr.push(0u64);
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        for (i, barcode) in self.barcodes.iter().enumerate() {
            let cell = self.cell(i);
            let mut rng = CellRng::for_cell(seed, barcode);
            for (&g, &c) in cell.genes.iter().zip(cell.counts) {
                let kept = rng.binomial(c, fraction);
                if kept > 0 {
                    indices.push(g);
                    data.push(kept);
                }
            }
            indptr.push(indices.len() as u64);
        }
        self.derived(self.barcodes.clone(), indptr, indices, data)
    }

    pub fn n_cells(&self) -> usize {
        self.barcodes.len()
    }

    pub fn n_genes(&self) -> usize {
        self.gene_names.len()
    }

    pub fn nnz(&self) -> usize {
        self.indices().len()
    }

    /// Row pointers, `n_cells + 1` of them.
    pub fn indptr(&self) -> &[u64] {
        match &self.storage {
            Storage::Owned { indptr, .. } => indptr,
            Storage::Image { image, indptr, .. } => {
                bytemuck::cast_slice(&image.bytes()[indptr.clone()])
            }
        }
    }

    /// Gene index of every stored entry.
    pub fn indices(&self) -> &[u32] {
        match &self.storage {
            Storage::Owned { indices, .. } => indices,
            Storage::Image { image, indices, .. } => {
                bytemuck::cast_slice(&image.bytes()[indices.clone()])
            }
        }
    }

    /// Count of every stored entry.
    pub fn data(&self) -> &[u32] {
        match &self.storage {
            Storage::Owned { data, .. } => data,
            Storage::Image { image, data, .. } => {
                bytemuck::cast_slice(&image.bytes()[data.clone()])
            }
        }
    }

    /// The stored entries of cell `i`.
    pub fn cell(&self, i: usize) -> CellCounts<'_> {
        let indptr = self.indptr();
        let range = indptr[i] as usize..indptr[i + 1] as usize;
        CellCounts {
            genes: &self.indices()[range.clone()],
            counts: &self.data()[range],
        }
    }

    /// The batch id: the input's file name without its format extensions.
    pub fn batch_id(&self) -> String {
        batch_id_of(&self.source)
    }
}

/// `run42-000017.csb.zst` → `run42-000017`; a directory keeps its name.
pub fn batch_id_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut id = name.as_str();
    for ext in [
        ".zst", ".gz", ".csb", ".h5ad", ".h5", ".txt", ".tsv", ".csv",
    ] {
        if let Some(stripped) = id.strip_suffix(ext) {
            id = stripped;
        }
    }
    id.to_string()
}

/// Reads any supported input, detecting its format from its content, under the default
/// [`Caps`].
pub fn read_batch(path: &Path, opts: &ReadOptions) -> Result<CountBatch, BatchError> {
    read_batch_capped(path, opts, &Caps::default())
}

/// [`read_batch`] under the given caps.
pub fn read_batch_capped(
    path: &Path,
    opts: &ReadOptions,
    caps: &Caps,
) -> Result<CountBatch, BatchError> {
    let opts = &Limits::new(opts, caps);
    let format = detect_format(path)?;
    let batch = match format {
        Format::Mtx => mtx::read_dir(path, opts)?,
        Format::Csb if opts.memory_map => csb::read_mapped(path, opts)?,
        Format::Csb => csb::read_copied(path, opts)?,
        Format::CsbZst => csb::read_zst(path, opts)?,
        Format::DenseText => dense::read(path, opts)?,
        Format::Hdf5 => read_hdf5(path, opts)?,
    };
    check_unique_barcodes(&batch)?;
    Ok(batch)
}

/// What a batch claims to hold, read from its headers alone (an MTX size line, a `.csb`
/// header and section table, a dense text's first line), and what reading it costs by those
/// claims: for the daemon's memory admission, before the batch is read. The readers hold the
/// input to its claims (an MTX entry beyond the size line's count is refused at once), so a
/// batch cannot take more than its claims say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub format: Format,
    pub cells: u64,
    pub genes: u64,
    pub stored: u64,
    /// Bytes the batch holds once read: its arrays and names.
    pub batch_bytes: u64,
    /// The most bytes held at once while it is read (the batch, and what the reader needs
    /// beside it: an out-of-order MTX's cell column, a dense text's transposition).
    pub read_bytes: u64,
}

/// Bytes a name (barcode, gene id or symbol) takes as a `String` in a batch: the string
/// itself, its heap block and the allocator's overhead, for names of typical length.
const NAME_BYTES: u64 = 64;
/// The duplicate-barcode check's map, per cell.
const BARCODE_CHECK_BYTES: u64 = 48;

/// The [`Claims`] of `path`, or `None` when its headers cannot be read (the reader then says
/// why) or its format has none the parent can read (HDF5, read in a child process).
pub fn claims(path: &Path) -> Option<Claims> {
    let format = detect_format(path).ok()?;
    let names = |cells: u64, genes: u64| {
        NAME_BYTES.saturating_mul(cells.saturating_add(genes.saturating_mul(2)))
    };
    let csr = |cells: u64, stored: u64| {
        stored
            .saturating_add(cells)
            .saturating_add(1)
            .saturating_mul(8)
    };
    let file_len = || std::fs::metadata(path).ok().map(|m| m.len());
    let (cells, genes, stored, batch_bytes, extra) = match format {
        Format::Mtx => {
            let (cells, genes, stored) = mtx::claims(path)?;
            // The cell of each entry, should the file not be in cell order; line buffers.
            let extra = 4 * stored + 4 * bytes::MAX_LINE as u64;
            (
                cells,
                genes,
                stored,
                csr(cells, stored) + names(cells, genes),
                extra,
            )
        }
        Format::Csb => {
            let (cells, genes, stored) = csb::file_claims(path)?;
            (
                cells,
                genes,
                stored,
                file_len()?.saturating_add(names(cells, 0)),
                0,
            )
        }
        Format::CsbZst => {
            let (cells, genes, stored, span) = csb::zst_claims(path)?;
            (
                cells,
                genes,
                stored,
                span.saturating_add(names(cells, 0)),
                0,
            )
        }
        Format::DenseText => {
            let len = file_len()?;
            let text = if bytes::read_head(path, 2).ok()? == bytes::GZIP_MAGIC {
                // A gzip member's trailer holds its text's length (mod 2^32).
                bytes::gzip_isize(path)?.max(len)
            } else {
                len
            };
            let (cells, genes, stored) = dense::claims(path, text)?;
            // The per-gene arrays beside the CSR they are transposed into; the line buffer.
            let extra = 8 * stored + 8 * genes + dense::MAX_DENSE_LINE as u64;
            (
                cells,
                genes,
                stored,
                csr(cells, stored) + names(cells, genes),
                extra,
            )
        }
        Format::Hdf5 => return None,
    };
    Some(Claims {
        format,
        cells,
        genes,
        stored,
        batch_bytes,
        read_bytes: batch_bytes
            .saturating_add(extra)
            .saturating_add(BARCODE_CHECK_BYTES.saturating_mul(cells)),
    })
}

/// Each record is keyed by (batch, barcode): two cells with one barcode would be two
/// records an analyst cannot tell apart.
fn check_unique_barcodes(batch: &CountBatch) -> Result<(), BatchError> {
    let mut seen = std::collections::HashMap::with_capacity(batch.barcodes.len());
    for (i, b) in batch.barcodes.iter().enumerate() {
        if let Some(first) = seen.insert(b.as_str(), i) {
            return Err(BatchError::invalid(
                &batch.source,
                format!(
                    "barcode {b:?} names cells {first} and {i}; each cell needs its own barcode"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(feature = "hdf5")]
fn read_hdf5(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    h5::read(path, opts)
}

#[cfg(not(feature = "hdf5"))]
fn read_hdf5(path: &Path, _opts: &Limits) -> Result<CountBatch, BatchError> {
    Err(BatchError::new(
        path,
        BatchErrorKind::UnknownFormat(
            "an HDF5 file (.h5/.h5ad), but this build has no HDF5 support: rebuild with `--features hdf5`"
                .into(),
        ),
    ))
}

const HDF5_MAGIC: &[u8] = b"\x89HDF\r\n\x1a\n";

/// Looks at the first bytes (or the directory's members) to decide the format.
pub fn detect_format(path: &Path) -> Result<Format, BatchError> {
    let meta = std::fs::metadata(path).map_err(|e| BatchError::io(path, e))?;
    if meta.is_dir() {
        return Ok(Format::Mtx);
    }
    let head = bytes::read_head(path, 16)?;
    if head.starts_with(csb::MAGIC) {
        return Ok(Format::Csb);
    }
    if head.starts_with(&bytes::ZSTD_MAGIC) {
        return Ok(Format::CsbZst);
    }
    if head.starts_with(HDF5_MAGIC) {
        return Ok(Format::Hdf5);
    }
    if head.starts_with(b"%%MatrixMarket") {
        return Err(BatchError::new(
            path,
            BatchErrorKind::UnknownFormat(
                "a Matrix Market file alone has no gene names or barcodes: pass the directory that holds matrix.mtx, features.tsv and barcodes.tsv".into(),
            ),
        ));
    }
    if head.starts_with(&bytes::GZIP_MAGIC) && bytes::gunzip_head(path, 8).starts_with(HDF5_MAGIC) {
        return Ok(Format::Hdf5);
    }
    if head.starts_with(&bytes::GZIP_MAGIC) {
        return Err(BatchError::new(
            path,
            BatchErrorKind::UnknownFormat(
                "a gzip file that is not part of a Matrix Market directory: decompress it or pass its directory".into(),
            ),
        ));
    }
    if head.is_empty() {
        return Err(BatchError::new(
            path,
            BatchErrorKind::Empty("the file is empty (0 bytes)".into()),
        ));
    }
    if head
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        return Ok(Format::DenseText);
    }
    Err(BatchError::new(
        path,
        BatchErrorKind::UnknownFormat(format!(
            "unrecognised content (first bytes {:02x?}); expected a .csb, .csb.zst, 10x .h5/.h5ad, dense text matrix or a Matrix Market directory",
            &head[..head.len().min(8)]
        )),
    ))
}

/// Whether `indptr` can slice `nnz` entries: as many counts as indices, starts at 0, never
/// decreases, ends at nnz. Shared by the `.csb` validation and the heap readers.
fn indptr_problem(indptr: &[u64], nnz: usize, n_data: usize) -> Option<String> {
    if nnz != n_data {
        return Some(format!("{nnz} gene indices but {n_data} counts"));
    }
    match indptr.first() {
        None => return Some("indptr is empty".into()),
        Some(&0) => {}
        Some(&first) => return Some(format!("indptr[0] is {first}, expected 0")),
    }
    if let Some(cell) = indptr.windows(2).position(|w| w[1] < w[0]) {
        let (a, b) = (indptr[cell], indptr[cell + 1]);
        return Some(format!("indptr not monotone at cell {cell}: {a} then {b}"));
    }
    let last = indptr[indptr.len() - 1];
    (last != nnz as u64).then(|| format!("indptr[n_cells] is {last}, expected nnz = {nnz}"))
}

/// The CSR invariants every reader guarantees (see docs/FORMAT.md, checks 5 and 6).
fn validate_csr(
    path: &Path,
    n_cells: usize,
    n_genes: usize,
    indptr: &[u64],
    indices: &[u32],
    data: &[u32],
) -> Result<(), BatchError> {
    if n_cells == 0 || n_genes == 0 {
        return Err(BatchError::new(
            path,
            BatchErrorKind::Empty(format!("{n_cells} cells × {n_genes} genes")),
        ));
    }
    if indptr.len() != n_cells + 1 {
        return Err(BatchError::invalid(
            path,
            format!(
                "indptr has {} entries, expected n_cells + 1 = {}",
                indptr.len(),
                n_cells + 1
            ),
        ));
    }
    if let Some(what) = indptr_problem(indptr, indices.len(), data.len()) {
        return Err(BatchError::invalid(path, what));
    }
    for cell in 0..n_cells {
        let genes = &indices[indptr[cell] as usize..indptr[cell + 1] as usize];
        check_cell_genes(path, cell, genes, n_genes)?;
    }
    Ok(())
}

fn check_cell_genes(
    path: &Path,
    cell: usize,
    genes: &[u32],
    n_genes: usize,
) -> Result<(), BatchError> {
    // Fast path: one branch-free pass; the slow path below only runs to name the culprit.
    let mut ok = true;
    let mut prev: i64 = -1;
    for &g in genes {
        ok &= (g as i64) > prev && (g as usize) < n_genes;
        prev = g as i64;
    }
    if ok {
        return Ok(());
    }
    let mut prev: i64 = -1;
    for (k, &g) in genes.iter().enumerate() {
        if g as usize >= n_genes {
            return Err(BatchError::invalid(
                path,
                format!(
                    "gene index {g} out of range at cell {cell}, entry {k} (n_genes = {n_genes})"
                ),
            ));
        }
        if (g as i64) <= prev {
            return Err(BatchError::invalid(
                path,
                format!("gene indices of cell {cell} not strictly increasing at entry {k} ({prev} then {g})"),
            ));
        }
        prev = g as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(
        indptr: Vec<u64>,
        indices: Vec<u32>,
        data: Vec<u32>,
    ) -> Result<CountBatch, BatchError> {
        CountBatch::from_csr(
            "t",
            Format::Mtx,
            vec!["A".into(), "B".into(), "C".into()],
            None,
            vec!["c1".into(), "c2".into()],
            CsrArrays {
                indptr,
                indices,
                data,
            },
        )
    }

    #[test]
    fn valid_csr_gives_cells() {
        let b = batch(vec![0, 2, 3], vec![0, 2, 1], vec![5, 1, 7]).unwrap();
        assert_eq!(b.cell(0).genes, &[0, 2]);
        assert_eq!(b.cell(1).counts, &[7]);
        assert_eq!(b.nnz(), 3);
    }

    #[test]
    fn thinning_keeps_a_fraction_of_each_cell_and_is_seeded() {
        let b = batch(vec![0, 2, 3], vec![0, 2, 1], vec![4000, 1, 3000]).unwrap();
        let t = b.thinned(0.25, 7);
        assert_eq!(t.n_cells(), 2);
        assert!(t.data().iter().all(|&c| c > 0), "zeros are dropped");
        let total = |b: &CountBatch, i: usize| b.cell(i).counts.iter().sum::<u32>() as f64;
        assert!((total(&t, 0) - 1000.0).abs() < 150.0, "{}", total(&t, 0));
        assert!((total(&t, 1) - 750.0).abs() < 150.0, "{}", total(&t, 1));
        assert_eq!(t.data(), b.thinned(0.25, 7).data());
        assert_ne!(t.data(), b.thinned(0.25, 8).data());
    }

    #[test]
    fn csr_violations_are_named() {
        let e = batch(vec![0, 2, 1], vec![0, 2, 1], vec![5, 1, 7]).unwrap_err();
        assert!(
            e.to_string().contains("indptr not monotone at cell 1"),
            "{e}"
        );
        let e = batch(vec![0, 2, 3], vec![0, 9, 1], vec![5, 1, 7]).unwrap_err();
        assert!(
            e.to_string()
                .contains("gene index 9 out of range at cell 0"),
            "{e}"
        );
        let e = batch(vec![0, 2, 3], vec![2, 0, 1], vec![5, 1, 7]).unwrap_err();
        assert!(e.to_string().contains("not strictly increasing"), "{e}");
        let e = batch(vec![0, 2, 4], vec![0, 2, 1], vec![5, 1, 7]).unwrap_err();
        assert!(e.to_string().contains("expected nnz = 3"), "{e}");
    }

    #[test]
    fn batch_id_strips_format_extensions() {
        assert_eq!(
            batch_id_of(Path::new("/x/run42-000017.csb.zst")),
            "run42-000017"
        );
        assert_eq!(batch_id_of(Path::new("/x/run.h5ad")), "run");
        assert_eq!(
            batch_id_of(Path::new("/x/filtered_feature_bc_matrix")),
            "filtered_feature_bc_matrix"
        );
    }
}
