//! Crash-safe file writes: a reader sees the old file or the complete new one, never a part.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `path` through a hidden temporary name beside it: fill, fsync, rename, fsync the
/// folder. On any error the temporary file is removed and `path` is left as it was.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}{ATOMIC_TMP}{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        // Name the file: "Permission denied" alone does not say where.
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}

/// What [`write_atomic`] puts between the hidden name and the process id of a temporary.
const ATOMIC_TMP: &str = ".tmp-";

/// Whether `name` is a temporary [`write_atomic`] left behind (a crash mid-write).
pub fn is_atomic_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(ATOMIC_TMP)
}

/// Makes the renames and creations inside `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The folder holding `path` ("." for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether `name` is a temporary file of [`write_atomic`] (or a producer's, by the spool
/// convention): hidden, or ending in `.tmp` / `.part`.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.ndjson");
        write_atomic(&path, |w| w.write_all(b"old\n")).unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        });
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains("out.ndjson") && err.contains("disk full"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary left behind");
    }
}
