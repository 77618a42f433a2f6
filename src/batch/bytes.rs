//! Getting bytes off disk: memory maps, capped decompression, first-bytes sniffing.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BatchError, BatchErrorKind};

pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The whole bytes of a `.csb` file, shared by the batch that views into them.
#[derive(Clone)]
pub struct Image(Arc<ImageBytes>);

enum ImageBytes {
    Mapped(memmap2::Mmap),
    /// Decompressed bytes, kept in `u64` words so that every 8-aligned offset is aligned in memory.
    Heap {
        words: Vec<u64>,
        len: usize,
    },
}

impl Image {
    /// Maps `file` read-only.
    ///
    /// SAFETY contract (the reason this is `unsafe` in memmap2): the mapping reflects later writes
    /// to the file, and truncation by another process would fault on access. The daemon never
    /// maps a spool file, since a producer that breaks the protocol could still truncate it:
    /// it copies spool files into memory (`ReadOptions::memory_map = false`, `read_capped`).
    /// It maps only the scratch `.csb` its own HDF5 child wrote into `$TMPDIR` (private under
    /// systemd's `PrivateTmp=`), which no one writes any more (`batch::isolated`); the one-shot
    /// commands map files named by the user, who owns them for the duration of the command.
    pub fn map(path: &Path) -> Result<Image, BatchError> {
        let file = open_regular(path)?;
        // SAFETY: see the contract above; the map is read-only and every offset is validated
        // before it is sliced.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| BatchError::io(path, e))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Image(Arc::new(ImageBytes::Mapped(map))))
    }

    /// Streams `reader` into an aligned buffer, failing once more than `cap` bytes come out.
    /// `expected` (the file's size, when known) sizes the buffer at once: growing by doubling
    /// would hold up to twice the batch in memory.
    pub fn read_capped(
        path: &Path,
        mut reader: impl Read,
        cap: u64,
        expected: Option<u64>,
    ) -> Result<Image, BatchError> {
        // One word more than expected, so that the read which finds the end needs no growth.
        let first = expected.map_or(0, |n| (n.min(cap) / 8 + 1) as usize);
        let mut words: Vec<u64> = Vec::new();
        words.try_reserve_exact(first).map_err(|_| {
            BatchError::new(
                path,
                BatchErrorKind::TooLarge(format!("{} bytes do not fit in memory", first * 8)),
            )
        })?;
        words.resize(first, 0);
        let mut len = 0usize;
        loop {
            if len == words.len() * 8 {
                // Never more than the cap (and the word that finds it passed) in memory.
                let most = usize::try_from(cap / 8 + 2).unwrap_or(usize::MAX);
                let grow = words.len().clamp(1 << 13, 1 << 24);
                words.resize((words.len() + grow).min(most).max(words.len() + 1), 0);
            }
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words[..]);
            let n = match reader.read(&mut bytes[len..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(BatchError::corrupt(
                        path,
                        format!("decompression failed after {len} bytes of output: {e}"),
                    ))
                }
            };
            len += n;
            if len as u64 > cap {
                return Err(BatchError::new(
                    path,
                    BatchErrorKind::TooLarge(format!(
                        "decompresses to more than the cap of {cap} bytes"
                    )),
                ));
            }
        }
        words.truncate(len.div_ceil(8));
        Ok(Image(Arc::new(ImageBytes::Heap { words, len })))
    }

    pub fn bytes(&self) -> &[u8] {
        match &*self.0 {
            ImageBytes::Mapped(m) => m,
            ImageBytes::Heap { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// Opens a member of a batch for reading, refusing anything but a regular file: opening a
/// FIFO would block the reader forever, and a device is never a batch. The open itself
/// does not block (O_NONBLOCK, harmless for regular files); the type is checked on the
/// opened file, so it cannot be swapped in between.
pub fn open_regular(path: &Path) -> Result<File, BatchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| BatchError::io(path, e))?;
    let meta = file.metadata().map_err(|e| BatchError::io(path, e))?;
    if meta.is_file() {
        Ok(file)
    } else if meta.is_dir() {
        Err(BatchError::invalid(path, "is a directory, expected a file"))
    } else {
        Err(BatchError::invalid(
            path,
            "is not a regular file (a FIFO, socket or device); expected a batch file",
        ))
    }
}

/// The first `n` bytes of a file (fewer when it is shorter).
pub fn read_head(path: &Path, n: usize) -> Result<Vec<u8>, BatchError> {
    let file = open_regular(path)?;
    let mut head = Vec::with_capacity(n);
    file.take(n as u64)
        .read_to_end(&mut head)
        .map_err(|e| BatchError::io(path, e))?;
    Ok(head)
}

/// What a batch's text members may still yield: `max_decompressed` bytes of text
/// (decompressed, or read as they are), counted over all of its members together.
#[derive(Debug)]
pub struct TextCap {
    cap: u64,
    used: std::cell::Cell<u64>,
}

impl TextCap {
    pub fn new(cap: u64) -> TextCap {
        TextCap {
            cap,
            used: std::cell::Cell::new(0),
        }
    }

    /// Counts `n` more bytes from `path`; too large once past the cap.
    fn take(&self, path: &Path, n: usize, gz: bool) -> Result<(), BatchError> {
        let used = self.used.get().saturating_add(n as u64);
        self.used.set(used);
        if used <= self.cap {
            return Ok(());
        }
        Err(super::too_large(
            path,
            format!(
                "{} more than the cap of {} bytes of text (max_decompressed_bytes, the batch's members together)",
                if gz { "gunzips to" } else { "holds" },
                self.cap
            ),
        ))
    }
}

/// Longest line an MTX member (`matrix.mtx`, `features.tsv`, `barcodes.tsv`) may have.
pub const MAX_LINE: usize = 1 << 20;

/// Bytes asked of the file or the decompressor at a time.
const CHUNK: usize = 256 << 10;

/// The lines of a text member, gunzipped on the fly when it starts with the gzip magic, read
/// through one bounded buffer: a line longer than the bound is refused when the buffer holds
/// that many bytes without a newline, and the text is refused once the batch's [`TextCap`]
/// is passed, so memory stays at the buffer whatever the member holds.
pub struct Lines<'a> {
    path: PathBuf,
    reader: Box<dyn Read + 'a>,
    gz: bool,
    cap: &'a TextCap,
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Where to look for the next newline: `buf[start..scan]` has none.
    scan: usize,
    eof: bool,
    max_line: usize,
    /// Lines returned so far (the 1-based number of the last one).
    line_no: u64,
    /// Offset in the text of `buf[0]`.
    base: u64,
}

impl<'a> Lines<'a> {
    /// Opens `path` (a regular file only), lines of at most `max_line` bytes.
    pub fn open(path: &Path, cap: &'a TextCap, max_line: usize) -> Result<Lines<'a>, BatchError> {
        let mut file = open_regular(path)?;
        let mut head = [0u8; 2];
        let mut n = 0;
        while n < 2 {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BatchError::io(path, e)),
            }
        }
        let gz = head[..n] == GZIP_MAGIC;
        let raw = std::io::Cursor::new(head[..n].to_vec()).chain(file);
        let reader: Box<dyn Read + 'a> = if gz {
            Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(CHUNK, raw),
            ))
        } else {
            Box::new(raw)
        };
        Ok(Lines {
            path: path.to_path_buf(),
            reader,
            gz,
            cap,
            buf: vec![0; (2 * CHUNK).min(max_line + CHUNK)],
            start: 0,
            end: 0,
            scan: 0,
            eof: false,
            max_line,
            line_no: 0,
            base: 0,
        })
    }

    /// The next line, without its `\n` (nor a `\r` before it); `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, BatchError> {
        let (a, b) = loop {
            let from = self.scan.max(self.start);
            if let Some(i) = memchr::memchr(b'\n', &self.buf[from..self.end]) {
                let at = self.start;
                self.start = from + i + 1;
                self.scan = self.start;
                break (at, from + i);
            }
            self.scan = self.end;
            if self.eof {
                if self.start == self.end {
                    return Ok(None);
                }
                let at = self.start;
                self.start = self.end;
                break (at, self.end);
            }
            self.fill()?;
        };
        self.line_no += 1;
        let line = &self.buf[a..b];
        Ok(Some(Line {
            no: self.line_no,
            offset: self.base + a as u64,
            bytes: line.strip_suffix(b"\r").unwrap_or(line),
        }))
    }

    /// Reads more text behind the unread bytes, refusing a line over the bound.
    fn fill(&mut self) -> Result<(), BatchError> {
        let partial = self.end - self.start;
        if partial > self.max_line {
            return Err(BatchError::invalid(
                &self.path,
                format!(
                    "line {}: longer than the limit of {} bytes on a line (no newline in the {partial} bytes from byte {})",
                    self.line_no + 1,
                    self.max_line,
                    self.base + self.start as u64
                ),
            ));
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.scan -= self.start;
            self.start = 0;
            self.end = partial;
        }
        if self.buf.len() - self.end < CHUNK / 4 && self.buf.len() < self.max_line + CHUNK {
            let grown = (self.buf.len() * 2).min(self.max_line + CHUNK);
            self.buf.resize(grown, 0);
        }
        let room = self.buf.len() - self.end;
        let n = loop {
            match self.reader.read(&mut self.buf[self.end..self.end + room]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if self.gz => {
                    return Err(BatchError::corrupt(
                        &self.path,
                        format!(
                            "gzip stream broken after {} bytes of output: {e}",
                            self.base + self.end as u64
                        ),
                    ))
                }
                Err(e) => return Err(BatchError::io(&self.path, e)),
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(());
        }
        self.cap.take(&self.path, n, self.gz)?;
        self.end += n;
        Ok(())
    }
}

/// One line of a text member.
pub struct Line<'b> {
    /// 1-based.
    pub no: u64,
    /// Where it starts in the (decompressed) text.
    pub offset: u64,
    pub bytes: &'b [u8],
}

impl<'b> Line<'b> {
    /// The line as UTF-8, or an error naming the byte offset (in the whole text) at fault.
    pub fn text(&self, path: &Path) -> Result<&'b str, BatchError> {
        std::str::from_utf8(self.bytes).map_err(|e| {
            BatchError::invalid(
                path,
                format!(
                    "not UTF-8 text at byte {} (line {})",
                    self.offset + e.valid_up_to() as u64,
                    self.no
                ),
            )
        })
    }

    /// Only whitespace.
    pub fn is_blank(&self) -> bool {
        self.bytes.iter().all(u8::is_ascii_whitespace)
    }
}

/// Decompresses a gzip file into `out`, at most `cap` bytes, without holding it in memory.
#[cfg(feature = "hdf5")]
pub fn gunzip_to(path: &Path, cap: u64, out: &mut impl std::io::Write) -> Result<u64, BatchError> {
    let file = open_regular(path)?;
    let mut decoder =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(CHUNK, file));
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(BatchError::corrupt(
                    path,
                    format!("gzip stream broken after {total} bytes of output: {e}"),
                ))
            }
        };
        total += n as u64;
        if total > cap {
            return Err(super::too_large(
                path,
                format!("gunzips to more than the cap of {cap} bytes (max_decompressed_bytes)"),
            ));
        }
        out.write_all(&buf[..n])
            .map_err(|e| BatchError::io(path, e))?;
    }
}

/// The length of a gzip file's content (mod 2^32) as its last member's trailer says.
pub fn gzip_isize(path: &Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = open_regular(path).ok()?;
    file.seek(SeekFrom::End(-4)).ok()?;
    let mut b = [0u8; 4];
    file.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b) as u64)
}

/// The first `n` bytes of a gzip file's content (empty when it cannot be decompressed).
pub fn gunzip_head(path: &Path, n: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(n);
    if let Ok(file) = open_regular(path) {
        let _ = flate2::read::MultiGzDecoder::new(file)
            .take(n as u64)
            .read_to_end(&mut head);
    }
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lines(path: &Path, cap: &TextCap, max_line: usize) -> Result<Vec<String>, BatchError> {
        let mut lines = Lines::open(path, cap, max_line)?;
        let mut out = Vec::new();
        while let Some(l) = lines.next_line()? {
            out.push(String::from_utf8_lossy(l.bytes).into_owned());
        }
        Ok(out)
    }

    #[test]
    fn lines_plain_and_gzipped_with_crlf_and_no_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"a\r\nbb\n\nccc";
        let plain = dir.path().join("t.txt");
        std::fs::write(&plain, text).unwrap();
        let gz = dir.path().join("t.txt.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, text).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        for p in [&plain, &gz] {
            let got = all_lines(p, &TextCap::new(1 << 20), 16).unwrap();
            assert_eq!(got, ["a", "bb", "", "ccc"], "{}", p.display());
        }
    }

    /// A line over the bound is refused once the buffer holds that many bytes without a
    /// newline, whatever follows; lines across buffer refills come out whole.
    #[test]
    fn a_long_line_is_refused_at_the_bound_and_long_files_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        let mut text = b"short\n".to_vec();
        text.extend(std::iter::repeat_n(b'7', 3 * CHUNK));
        std::fs::write(&p, &text).unwrap();
        let e = all_lines(&p, &TextCap::new(1 << 30), 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2: longer than the limit of 1000 bytes"),
            "{e}"
        );
        assert!(e.contains("from byte 6"), "{e}");
        // Many lines, some across the buffer's end, all whole.
        let lines: Vec<String> = (0..200_000).map(|i| format!("{i} {}", i * 7)).collect();
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        assert_eq!(all_lines(&p, &TextCap::new(1 << 30), 64).unwrap(), lines);
    }

    #[test]
    fn the_text_cap_counts_every_member_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, "x\n".repeat(1000)).unwrap();
        let cap = TextCap::new(3000);
        assert_eq!(all_lines(&p, &cap, 64).unwrap().len(), 1000);
        let e = all_lines(&p, &cap, 64).unwrap_err();
        assert_eq!(e.kind.name(), "too_large");
        assert!(e.to_string().contains("cap of 3000 bytes"), "{e}");
    }
}
