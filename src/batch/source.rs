//! Getting bytes off disk: memory maps, capped decompression, first-bytes sniffing.

use std::fs::File;
use std::io::Read;
use std::path::Path;
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
                let grow = words.len().clamp(1 << 13, 1 << 24);
                words.resize(words.len() + grow, 0);
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

/// Reads a whole text member, gunzipping it when it starts with the gzip magic, up to `cap` bytes.
pub fn read_maybe_gz(path: &Path, cap: u64) -> Result<Vec<u8>, BatchError> {
    let mut file = open_regular(path)?;
    let mut raw = Vec::new();
    (&mut file)
        .take(cap.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(|e| BatchError::io(path, e))?;
    if !raw.starts_with(&GZIP_MAGIC) {
        if raw.len() as u64 > cap {
            return Err(BatchError::new(
                path,
                BatchErrorKind::TooLarge(format!("larger than the cap of {cap} bytes")),
            ));
        }
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    let decoder = flate2::read::MultiGzDecoder::new(&raw[..]);
    decoder
        .take(cap.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| {
            BatchError::corrupt(
                path,
                format!(
                    "gzip stream broken after {} bytes of output: {e}",
                    out.len()
                ),
            )
        })?;
    if out.len() as u64 > cap {
        return Err(BatchError::new(
            path,
            BatchErrorKind::TooLarge(format!("gunzips to more than the cap of {cap} bytes")),
        ));
    }
    Ok(out)
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
