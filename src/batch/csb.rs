//! The native `.csb` format (docs/FORMAT.md): read in place from a memory map or a copy of the
//! file, validated first.

use std::io::Write;
use std::ops::Range;
use std::path::Path;

use super::bytes::Image;
use super::{validate_csr, BatchError, CountBatch, Format, Limits, Storage};

pub const MAGIC: &[u8; 4] = b"CSB1";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 128;
const TRAILER_LEN: usize = 4;
const ALIGN: usize = 64;
const SECTION_NAMES: [&str; 6] = [
    "gene_names",
    "gene_ids",
    "barcodes",
    "indptr",
    "indices",
    "data",
];

/// The fixed header, decoded but not yet trusted.
struct Header {
    n_cells: u64,
    n_genes: u64,
    nnz: u64,
    sections: [(u64, u64); 6],
}

pub fn read_mapped(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let image = Image::map(path)?;
    from_image(path, image, Format::Csb, opts)
}

/// Reads the file into an aligned buffer instead of mapping it (see `ReadOptions::memory_map`).
/// A consistent header's claims are checked against the caps before the copy.
pub fn read_copied(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let file = super::bytes::open_regular(path)?;
    let size = file.metadata().map_err(|e| BatchError::io(path, e))?.len();
    let head = super::bytes::read_head(path, HEADER_LEN)?;
    if let Some(h) = consistent_header(path, &head, size) {
        check_claims(path, &h, opts)?;
    }
    let image = Image::read_capped(path, file, u64::MAX, Some(size))?;
    from_image(path, image, Format::Csb, opts)
}

pub fn read_zst(path: &Path, opts: &Limits) -> Result<CountBatch, BatchError> {
    let file = super::bytes::open_regular(path)?;
    zst_image(path, file, opts)
}

/// Parses a `.csb` image held in memory; `path` names it in errors (tests, fuzzing).
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<CountBatch, BatchError> {
    let image = Image::read_capped(path, bytes, u64::MAX, Some(bytes.len() as u64))?;
    from_image(
        path,
        image,
        Format::Csb,
        &Limits::new(&Default::default(), &Default::default()),
    )
}

/// Padding a `.csb.zst` may hold past the end of its last section (writers put the trailer
/// right after it), so that the image's size is known from its header before it is read.
const ZST_SLACK: u64 = 1 << 20;

/// Decompresses a `.csb.zst` stream (at most `opts.max_decompressed` bytes) and parses it,
/// under the default [`super::Caps`].
pub fn from_zst_reader(
    path: &Path,
    reader: impl std::io::Read,
    opts: &super::ReadOptions,
) -> Result<CountBatch, BatchError> {
    zst_image(path, reader, &Limits::new(opts, &Default::default()))
}

/// The header is decompressed first. When it is consistent, its claims are checked against
/// the caps and the image is read into a buffer of the size its section table gives (and at
/// most [`ZST_SLACK`] more); a table spanning more than the decompression cap is refused at
/// once. Anything else is decompressed up to the cap and refused by the full checks.
fn zst_image(
    path: &Path,
    reader: impl std::io::Read,
    opts: &Limits,
) -> Result<CountBatch, BatchError> {
    use std::io::Read;
    let mut decoder =
        zstd::stream::read::Decoder::new(reader).map_err(|e| BatchError::io(path, e))?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut decoder)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| {
            BatchError::corrupt(
                path,
                format!(
                    "decompression failed after {} bytes of output: {e}",
                    head.len()
                ),
            )
        })?;
    let mut cap = opts.max_decompressed;
    let mut expected = None;
    if let Some(span) = section_span(&head) {
        if span > opts.max_decompressed as u128 {
            return Err(super::too_large(
                path,
                format!(
                    "the header's sections span {span} bytes, more than the cap of {} bytes (max_decompressed_bytes)",
                    opts.max_decompressed
                ),
            ));
        }
        if let Some(h) = consistent_header(path, &head, span as u64) {
            check_claims(path, &h, opts)?;
            cap = cap.min(span as u64 + ZST_SLACK);
            expected = Some(span as u64);
        }
    }
    let bounded = cap < opts.max_decompressed;
    let image = Image::read_capped(path, std::io::Cursor::new(head).chain(decoder), cap, expected)
        .map_err(|e| match e.kind {
            super::BatchErrorKind::TooLarge(ref what)
                if bounded && what.starts_with("decompresses to more") =>
            {
                BatchError::invalid(
                    path,
                    format!(
                        "the zstd stream holds more than the {} bytes its header's sections span and {ZST_SLACK} bytes of padding",
                        cap - ZST_SLACK
                    ),
                )
            }
            _ => e,
        })?;
    if !image.bytes().starts_with(MAGIC) {
        return Err(BatchError::invalid(
            path,
            "a zstd stream that does not hold a .csb image (magic CSB1 missing at offset 0)",
        ));
    }
    from_image(path, image, Format::CsbZst, opts)
}

/// Where the last section of a `.csb` image ends, trailer included, by its header (`head`,
/// the first [`HEADER_LEN`] bytes); `None` when `head` is not a whole `.csb` header.
fn section_span(head: &[u8]) -> Option<u128> {
    if head.len() < HEADER_LEN || !head.starts_with(MAGIC) {
        return None;
    }
    let end = (0..6)
        .map(|i| {
            let (off, len) = (u64_at(head, 32 + 16 * i), u64_at(head, 40 + 16 * i));
            if len == 0 {
                0
            } else {
                off as u128 + len as u128
            }
        })
        .max()?;
    Some(end.max(HEADER_LEN as u128) + TRAILER_LEN as u128)
}

/// The header held in `head` (the first [`HEADER_LEN`] bytes of an image of `len` bytes)
/// when it passes the structural checks (magic, version, sections that fit and match its
/// counts): only then are its claims worth checking before the image is read. Otherwise the
/// full checks, after the read, say what is wrong, as they always have.
fn consistent_header(path: &Path, head: &[u8], len: u64) -> Option<Header> {
    if head.len() < HEADER_LEN || len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return None;
    }
    let mut whole = head[..HEADER_LEN].to_vec();
    whole.extend_from_slice(&[0; TRAILER_LEN]);
    let h = parse_header(path, &whole).ok()?;
    check_sections(path, usize::try_from(len).ok()?, &h).ok()?;
    Some(h)
}

/// The cells, genes and stored counts a header declares, against the caps.
fn check_claims(path: &Path, h: &Header, opts: &Limits) -> Result<(), BatchError> {
    opts.check_claims(path, "the header declares", h.n_cells, h.n_genes, h.nnz)
}

/// The claims of a `.csb` file (cells, genes, stored counts) when its header is consistent
/// with its length, for the daemon's memory admission.
pub(crate) fn file_claims(path: &Path) -> Option<(u64, u64, u64)> {
    let len = std::fs::metadata(path).ok()?.len();
    let head = super::bytes::read_head(path, HEADER_LEN).ok()?;
    let h = consistent_header(path, &head, len)?;
    Some((h.n_cells, h.n_genes, h.nnz))
}

/// The claims of a `.csb.zst` and the size of the image it holds, by its header alone (its
/// first bytes decompressed), when that header is consistent.
pub(crate) fn zst_claims(path: &Path) -> Option<(u64, u64, u64, u64)> {
    use std::io::Read;
    let file = super::bytes::open_regular(path).ok()?;
    let decoder = zstd::stream::read::Decoder::new(file).ok()?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    decoder
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .ok()?;
    let span = u64::try_from(section_span(&head)?).ok()?;
    let h = consistent_header(path, &head, span)?;
    Some((h.n_cells, h.n_genes, h.nnz, span))
}

fn from_image(
    path: &Path,
    image: Image,
    format: Format,
    opts: &Limits,
) -> Result<CountBatch, BatchError> {
    let bytes = image.bytes();
    let header = parse_header(path, bytes)?;
    check_crc(path, bytes)?;
    let ranges = check_sections(path, bytes.len(), &header)?;
    check_claims(path, &header, opts)?;
    let gene_names = parse_strings(path, bytes, &ranges[0], header.n_genes, "gene_names")?;
    let gene_ids = if ranges[1].is_empty() {
        None
    } else {
        Some(parse_strings(
            path,
            bytes,
            &ranges[1],
            header.n_genes,
            "gene_ids",
        )?)
    };
    let barcodes = parse_strings(path, bytes, &ranges[2], header.n_cells, "barcodes")?;
    validate_csr(
        path,
        header.n_cells as usize,
        header.n_genes as usize,
        bytemuck::cast_slice(&bytes[ranges[3].clone()]),
        bytemuck::cast_slice(&bytes[ranges[4].clone()]),
        bytemuck::cast_slice(&bytes[ranges[5].clone()]),
    )?;
    let [_, _, _, indptr, indices, data] = ranges;
    Ok(CountBatch {
        source: path.to_path_buf(),
        format,
        gene_names,
        gene_ids,
        barcodes,
        storage: Storage::Image {
            image,
            indptr,
            indices,
            data,
        },
    })
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn parse_header(path: &Path, b: &[u8]) -> Result<Header, BatchError> {
    if b.len() < HEADER_LEN + TRAILER_LEN {
        return Err(BatchError::corrupt(
            path,
            format!(
                "truncated: {} bytes, a .csb file has at least {} (header + checksum)",
                b.len(),
                HEADER_LEN + TRAILER_LEN
            ),
        ));
    }
    if &b[0..4] != MAGIC {
        return Err(BatchError::invalid(
            path,
            format!(
                "bad magic at offset 0: {:02x?}, expected \"CSB1\"",
                &b[0..4]
            ),
        ));
    }
    let version = u16_at(b, 4);
    if version != VERSION {
        return Err(BatchError::invalid(
            path,
            format!("unsupported version {version} at offset 4, expected {VERSION}"),
        ));
    }
    let flags = u16_at(b, 6);
    if flags != 0 {
        return Err(BatchError::invalid(
            path,
            format!("unknown flags {flags:#06x} at offset 6, expected 0"),
        ));
    }
    let mut sections = [(0u64, 0u64); 6];
    for (i, s) in sections.iter_mut().enumerate() {
        *s = (u64_at(b, 32 + 16 * i), u64_at(b, 40 + 16 * i));
    }
    Ok(Header {
        n_cells: u64_at(b, 8),
        n_genes: u64_at(b, 16),
        nnz: u64_at(b, 24),
        sections,
    })
}

fn check_crc(path: &Path, b: &[u8]) -> Result<(), BatchError> {
    let body = &b[..b.len() - TRAILER_LEN];
    let stored = u32::from_le_bytes(b[b.len() - TRAILER_LEN..].try_into().unwrap());
    let actual = crc32c::crc32c(body);
    if stored != actual {
        return Err(BatchError::corrupt(
            path,
            format!(
                "checksum mismatch: trailer at offset {} holds crc32c {stored:#010x}, the bytes before it give {actual:#010x} (truncated or damaged file)",
                b.len() - TRAILER_LEN
            ),
        ));
    }
    Ok(())
}

/// Checks 3 of docs/FORMAT.md; returns the byte range of each section.
fn check_sections(
    path: &Path,
    file_len: usize,
    h: &Header,
) -> Result<[Range<usize>; 6], BatchError> {
    // u128: a lying header must not overflow its way past the check.
    let expected_len = |i: usize| -> Option<u128> {
        match i {
            3 => Some((h.n_cells as u128 + 1) * 8),
            4 | 5 => Some(h.nnz as u128 * 4),
            _ => None,
        }
    };
    let body_end = (file_len - TRAILER_LEN) as u64;
    let mut prev_end = HEADER_LEN as u64;
    let mut ranges: [Range<usize>; 6] = Default::default();
    for (i, &(off, len)) in h.sections.iter().enumerate() {
        let name = SECTION_NAMES[i];
        let at = 32 + 16 * i;
        if let Some(want) = expected_len(i) {
            if len as u128 != want {
                return Err(BatchError::invalid(
                    path,
                    format!("section {name} (table entry at offset {at}) is {len} bytes, the header's counts imply {want}"),
                ));
            }
        }
        if len == 0 {
            ranges[i] = 0..0;
            continue;
        }
        if off % ALIGN as u64 != 0 {
            return Err(BatchError::invalid(
                path,
                format!("section {name} (table entry at offset {at}) starts at {off}, not a multiple of {ALIGN}"),
            ));
        }
        let end = off.checked_add(len).filter(|&e| e <= body_end);
        let Some(end) = end else {
            return Err(BatchError::invalid(
                path,
                format!("section {name} (table entry at offset {at}) spans {off}..{off}+{len}, past the end of the data at {body_end}"),
            ));
        };
        if off < prev_end {
            return Err(BatchError::invalid(
                path,
                format!("section {name} (table entry at offset {at}) starts at {off}, overlapping the header or the previous section ending at {prev_end}"),
            ));
        }
        prev_end = end;
        ranges[i] = off as usize..end as usize;
    }
    Ok(ranges)
}

/// Check 4: exactly `count` NUL-terminated UTF-8 strings.
fn parse_strings(
    path: &Path,
    bytes: &[u8],
    range: &Range<usize>,
    count: u64,
    name: &str,
) -> Result<Vec<String>, BatchError> {
    let section = &bytes[range.clone()];
    if count > section.len() as u64 {
        return Err(BatchError::invalid(
            path,
            format!("section {name} at offset {} holds {} bytes, too few for {count} NUL-terminated strings", range.start, section.len()),
        ));
    }
    if section.last().is_some_and(|&b| b != 0) {
        return Err(BatchError::invalid(
            path,
            format!(
                "section {name} at offset {} does not end with a NUL byte",
                range.start
            ),
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut start = 0;
    for (i, &b) in section.iter().enumerate() {
        if b != 0 {
            continue;
        }
        let s = std::str::from_utf8(&section[start..i]).map_err(|e| {
            BatchError::invalid(
                path,
                format!(
                    "section {name}: string {} at offset {} is not valid UTF-8 ({e})",
                    out.len(),
                    range.start + start
                ),
            )
        })?;
        out.push(s.to_owned());
        start = i + 1;
    }
    if out.len() as u64 != count {
        return Err(BatchError::invalid(
            path,
            format!(
                "section {name} at offset {} holds {} strings, the header says {count}",
                range.start,
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Writes `batch` as a `.csb` image to `w`.
pub fn write_csb<W: Write + ?Sized>(batch: &CountBatch, w: &mut W) -> std::io::Result<()> {
    let strings = |v: &[String]| -> Vec<u8> {
        let mut out = Vec::with_capacity(v.iter().map(|s| s.len() + 1).sum());
        for s in v {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out
    };
    let sections: [Vec<u8>; 3] = [
        strings(&batch.gene_names),
        batch.gene_ids.as_deref().map(strings).unwrap_or_default(),
        strings(&batch.barcodes),
    ];
    let arrays: [&[u8]; 3] = [
        bytemuck::cast_slice(batch.indptr()),
        bytemuck::cast_slice(batch.indices()),
        bytemuck::cast_slice(batch.data()),
    ];
    let all: Vec<&[u8]> = sections
        .iter()
        .map(|s| s.as_slice())
        .chain(arrays)
        .collect();

    let mut table = Vec::with_capacity(6);
    let mut at = HEADER_LEN;
    for s in &all {
        if s.is_empty() {
            table.push((0u64, 0u64));
            continue;
        }
        at = at.next_multiple_of(ALIGN);
        table.push((at as u64, s.len() as u64));
        at += s.len();
    }

    let mut w = Crc32cWriter { inner: w, crc: 0 };
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes());
    for n in [batch.n_cells(), batch.n_genes(), batch.nnz()] {
        header.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for (off, len) in &table {
        header.extend_from_slice(&off.to_le_bytes());
        header.extend_from_slice(&len.to_le_bytes());
    }
    w.write_all(&header)?;
    let mut pos = HEADER_LEN;
    for (s, (off, _)) in all.iter().zip(&table) {
        if s.is_empty() {
            continue;
        }
        w.write_all(&vec![0u8; *off as usize - pos])?;
        w.write_all(s)?;
        pos = *off as usize + s.len();
    }
    let crc = w.crc;
    w.inner.write_all(&crc.to_le_bytes())
}

/// Writes `batch` to `out` (`.csb`, or `.csb.zst` when the name ends in `.zst`) under a temporary
/// name, fsyncs, and renames it into place, so a reader never sees a partial file.
pub fn write_csb_file(batch: &CountBatch, out: &Path) -> std::io::Result<()> {
    let compress = out.to_string_lossy().ends_with(".zst");
    crate::fsutil::write_atomic(out, |w| {
        if compress {
            let mut enc = zstd::stream::write::Encoder::new(w, 3)?;
            write_csb(batch, &mut enc)?;
            enc.finish()?;
            Ok(())
        } else {
            write_csb(batch, w)
        }
    })
}

/// Passes bytes through while keeping their running CRC-32C.
struct Crc32cWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    crc: u32,
}

impl<W: Write + ?Sized> Write for Crc32cWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
