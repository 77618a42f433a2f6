//! The spool protocol (DESIGN.md §6).
//!
//! Producers write a batch under a temporary name (hidden, or ending in `.tmp`/`.part`) and
//! `rename(2)` it into `incoming/`: a file in any readable format, or a complete 10x MTX
//! directory. The daemon claims an entry by renaming it into `processing/`, commits its
//! output, then moves it to `done/` (or deletes it). Whatever is left in `processing/` at
//! start-up was interrupted and is redone first. Unusable input goes to `failed/` beside a
//! `<name>.error.json` report. Every step is a rename inside one file system, so a crash at
//! any point leaves each batch in exactly one folder.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::config::OnDone;
use crate::fsutil::{is_temporary, sync_dir, write_atomic};

/// The four folders of a spool.
#[derive(Debug, Clone)]
pub struct Spool {
    pub incoming: PathBuf,
    pub processing: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

/// A batch this daemon owns: it sits in `processing/`.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The entry's name (file or directory), kept through every move.
    pub name: OsString,
    /// Its path in `processing/`.
    pub path: PathBuf,
    /// The batch id: the name without its format extensions.
    pub batch_id: String,
    pub claimed_at: Instant,
}

/// Why a batch went to `failed/`: what, where, and what was expected, in words.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub batch: String,
    pub file: String,
    /// The pipeline stage that refused it (`claim`, `read`, `tokenize`, `infer`).
    pub stage: &'static str,
    /// A short class of the problem (`corrupt`, `invalid`, `too_large`, …).
    pub kind: String,
    /// The full message: the file or member, the offset or field, what was expected.
    pub error: String,
    /// Seconds since the Unix epoch.
    pub failed_at: f64,
}

impl Spool {
    /// The spool under `dir`, making its folders when missing.
    pub fn open(dir: &Path) -> io::Result<Spool> {
        let spool = Spool {
            incoming: dir.join("incoming"),
            processing: dir.join("processing"),
            done: dir.join("done"),
            failed: dir.join("failed"),
        };
        for d in [
            &spool.incoming,
            &spool.processing,
            &spool.done,
            &spool.failed,
        ] {
            fs::create_dir_all(d).map_err(|e| annotate(e, d))?;
        }
        Ok(spool)
    }

    /// Batches left in `processing/` by an earlier run, by name.
    pub fn interrupted(&self) -> io::Result<Vec<Claimed>> {
        let mut names = list(&self.processing)?;
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| self.claimed(name, &self.processing))
            .collect())
    }

    /// Complete entries waiting in `incoming/`, oldest first (modification time, then name).
    pub fn waiting(&self) -> io::Result<Vec<OsString>> {
        let mut entries: Vec<(SystemTime, OsString)> = list(&self.incoming)?
            .into_iter()
            .filter_map(|name| {
                // Vanished since the listing (claimed by a second daemon, or withdrawn): skip.
                let meta = fs::symlink_metadata(self.incoming.join(&name)).ok()?;
                Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), name))
            })
            .collect();
        entries.sort();
        Ok(entries.into_iter().map(|(_, name)| name).collect())
    }

    /// Claims `incoming/<name>` by renaming it into `processing/`. `None` when it is gone.
    pub fn claim(&self, name: &OsStr) -> io::Result<Option<Claimed>> {
        let from = self.incoming.join(name);
        let to = self.processing.join(name);
        if fs::symlink_metadata(&to).is_ok() {
            // A batch of the same name is already being processed: leave this one waiting
            // rather than renaming over it.
            return Ok(None);
        }
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(annotate(e, &from)),
        }
        sync_dir(&self.processing)?;
        Ok(Some(self.claimed(name.to_owned(), &self.processing)))
    }

    /// The batch's output is committed: archive (or delete) its input.
    pub fn finish(&self, c: &Claimed, on_done: OnDone) -> io::Result<()> {
        match on_done {
            OnDone::Keep => move_replacing(&c.path, &self.done.join(&c.name))?,
            OnDone::Delete => remove_entry(&c.path)?,
        }
        sync_dir(&self.processing)
    }

    /// Quarantines a batch: the report first, then the input, so that a crash in between
    /// leaves the input in `processing/` to be tried (and reported) again. An input that
    /// vanished after its claim leaves the report alone.
    pub fn quarantine(&self, c: &Claimed, report: &ErrorReport) -> io::Result<()> {
        let mut report_name = c.name.clone();
        report_name.push(".error.json");
        let json = match clip(&report.error) {
            Cow::Borrowed(_) => serde_json::to_vec_pretty(report),
            Cow::Owned(error) => serde_json::to_vec_pretty(&ErrorReport {
                error,
                ..report.clone()
            }),
        }
        .map_err(io::Error::other)?;
        write_atomic(&self.failed.join(report_name), |w| {
            w.write_all(&json)?;
            w.write_all(b"\n")
        })?;
        if fs::symlink_metadata(&c.path).is_err() {
            // It vanished after the claim: the report is all there is to keep.
            return Ok(());
        }
        move_replacing(&c.path, &self.failed.join(&c.name))?;
        sync_dir(&self.processing)
    }

    /// Gives a claimed batch back to `incoming/` (its output could not be written: retry).
    pub fn requeue(&self, c: &Claimed) -> io::Result<()> {
        move_replacing(&c.path, &self.incoming.join(&c.name))?;
        sync_dir(&self.processing)
    }

    fn claimed(&self, name: OsString, dir: &Path) -> Claimed {
        Claimed {
            path: dir.join(&name),
            batch_id: crate::batch::batch_id_of(Path::new(&name)),
            name,
            claimed_at: Instant::now(),
        }
    }
}

/// The entries of `dir` that are not temporary names.
fn list(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| annotate(e, dir))? {
        let name = entry.map_err(|e| annotate(e, dir))?.file_name();
        if !is_temporary(&name.to_string_lossy()) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Renames `from` to `to`, first removing an older entry of that name (a batch sent again).
fn move_replacing(from: &Path, to: &Path) -> io::Result<()> {
    if fs::symlink_metadata(to).is_ok() {
        remove_entry(to)?;
    }
    fs::rename(from, to).map_err(|e| annotate(e, from))?;
    sync_dir(crate::fsutil::parent_dir(to))
}

fn remove_entry(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| annotate(e, path))?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(|e| annotate(e, path))
}

/// The most bytes of an error message a report (or a log line) carries: with the file name
/// and the other fields, and JSON's escapes at their worst, a report stays under 64 KiB.
pub const MAX_ERROR: usize = 4096;

/// `text` cut to [`MAX_ERROR`] bytes (at a character boundary), saying how long it was.
/// Readers already quote input by a short prefix; this holds whatever else a message holds.
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_ERROR {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_ERROR - 64;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… (cut: {} bytes in all)",
        &text[..end],
        text.len()
    ))
}

/// Checks a batch name given by a client (an upload): one plain path component of safe
/// characters, so that it can never point outside the spool or hide as a temporary file.
pub fn check_name(name: &str) -> Result<&str, String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 200 {
        return Err("a batch name has 1 to 200 characters".into());
    }
    if let Some(c) = name.chars().find(|&c| !ok_char(c)) {
        return Err(format!(
            "a batch name may hold only letters, digits, '.', '_' and '-', not {c:?}"
        ));
    }
    if is_temporary(name) {
        return Err(format!(
            "{name:?} would be a temporary name (hidden, or ending in .tmp or .part)"
        ));
    }
    Ok(name)
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        (dir, spool)
    }

    #[test]
    fn claim_finish_and_temporary_names() {
        let (_d, s) = spool();
        fs::write(s.incoming.join("run1-000001.csb"), b"x").unwrap();
        fs::write(s.incoming.join(".run1-000002.csb.tmp"), b"x").unwrap();
        fs::write(s.incoming.join("run1-000003.part"), b"x").unwrap();
        let waiting = s.waiting().unwrap();
        assert_eq!(waiting, vec![OsString::from("run1-000001.csb")]);
        let c = s.claim(&waiting[0]).unwrap().unwrap();
        assert_eq!(c.batch_id, "run1-000001");
        assert!(c.path.starts_with(&s.processing));
        assert!(s.claim(&waiting[0]).unwrap().is_none(), "already claimed");
        assert_eq!(s.interrupted().unwrap().len(), 1);
        s.finish(&c, OnDone::Keep).unwrap();
        assert!(s.done.join("run1-000001.csb").is_file());
        assert!(s.interrupted().unwrap().is_empty());
    }

    #[test]
    fn a_batch_sent_again_replaces_the_archived_one() {
        let (_d, s) = spool();
        for content in [&b"first"[..], b"second"] {
            fs::create_dir(s.incoming.join("mtx")).unwrap();
            fs::write(s.incoming.join("mtx/matrix.mtx"), content).unwrap();
            let c = s.claim(OsStr::new("mtx")).unwrap().unwrap();
            s.finish(&c, OnDone::Keep).unwrap();
        }
        assert_eq!(fs::read(s.done.join("mtx/matrix.mtx")).unwrap(), b"second");
        fs::write(s.incoming.join("gone.csb"), b"x").unwrap();
        let c = s.claim(OsStr::new("gone.csb")).unwrap().unwrap();
        s.finish(&c, OnDone::Delete).unwrap();
        assert!(!s.done.join("gone.csb").exists());
        assert!(!c.path.exists());
    }

    #[test]
    fn client_names_cannot_leave_the_spool() {
        for bad in [
            "",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\0b",
            ".hidden",
            "x.tmp",
            "a b",
            "é",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(201)).is_err());
        assert_eq!(
            check_name("run42-000017.csb.zst"),
            Ok("run42-000017.csb.zst")
        );
    }

    #[test]
    fn quarantine_writes_the_report_beside_the_input() {
        let (_d, s) = spool();
        fs::write(s.incoming.join("bad.csb"), b"junk").unwrap();
        let c = s.claim(OsStr::new("bad.csb")).unwrap().unwrap();
        let report = ErrorReport {
            batch: c.batch_id.clone(),
            file: "bad.csb".into(),
            stage: "read",
            kind: "unknown_format".into(),
            error: "bad.csb: not a readable batch".into(),
            failed_at: 0.0,
        };
        s.quarantine(&c, &report).unwrap();
        assert!(s.failed.join("bad.csb").is_file());
        // One removed from processing/ by someone else: the report is kept, nothing fails.
        fs::write(s.incoming.join("gone.csb"), b"junk").unwrap();
        let gone = s.claim(OsStr::new("gone.csb")).unwrap().unwrap();
        fs::remove_file(&gone.path).unwrap();
        s.quarantine(&gone, &report).unwrap();
        assert!(s.failed.join("gone.csb.error.json").is_file());
        assert!(!s.failed.join("gone.csb").exists());
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(s.failed.join("bad.csb.error.json")).unwrap())
                .unwrap();
        assert_eq!(json["stage"], "read");
        assert!(fs::read_dir(&s.processing).unwrap().next().is_none());
    }

    /// Whatever the error says, the report stays under 64 KiB, the cut said.
    #[test]
    fn a_report_stays_small_whatever_the_error() {
        let (_d, s) = spool();
        let name = "b".repeat(200);
        fs::write(s.incoming.join(&name), b"junk").unwrap();
        let c = s.claim(OsStr::new(&name)).unwrap().unwrap();
        let report = ErrorReport {
            batch: name.clone(),
            file: name.clone(),
            stage: "read",
            kind: "invalid".into(),
            // Control characters take six bytes each as JSON.
            error: "\u{1}".repeat(4 << 20),
            failed_at: 0.0,
        };
        s.quarantine(&c, &report).unwrap();
        let path = s.failed.join(format!("{name}.error.json"));
        let len = fs::metadata(&path).unwrap().len();
        assert!(len <= 64 << 10, "{len} bytes");
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert!(json["error"]
            .as_str()
            .unwrap()
            .ends_with("(cut: 4194304 bytes in all)"));
        assert_eq!(clip("short"), "short");
    }
}
