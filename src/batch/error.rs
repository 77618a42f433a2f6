//! Reader errors: always the file, then what is wrong and where.

use std::path::{Path, PathBuf};

/// An input that could not be read, with the file (or directory member) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct BatchError {
    pub path: PathBuf,
    pub kind: BatchErrorKind,
}

/// What went wrong. Every message names the field, line or byte offset at fault.
#[derive(Debug, thiserror::Error)]
pub enum BatchErrorKind {
    #[error("cannot read: {0}")]
    Io(std::io::Error),
    #[error("not a readable batch: {0}")]
    UnknownFormat(String),
    /// Damaged bytes: truncation, checksum mismatch, broken compression.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// Well-formed bytes that break the format's rules (lying header, bad counts, …).
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("empty batch: {0}")]
    Empty(String),
    /// Over a configured cap (decompressed size, …).
    #[error("too large: {0}")]
    TooLarge(String),
}

impl BatchErrorKind {
    /// A short, stable name of the kind (for error reports and metrics).
    pub fn name(&self) -> &'static str {
        match self {
            BatchErrorKind::Io(_) => "io",
            BatchErrorKind::UnknownFormat(_) => "unknown_format",
            BatchErrorKind::Corrupt(_) => "corrupt",
            BatchErrorKind::Invalid(_) => "invalid",
            BatchErrorKind::Empty(_) => "empty",
            BatchErrorKind::TooLarge(_) => "too_large",
        }
    }
}

impl BatchError {
    pub fn new(path: impl AsRef<Path>, kind: BatchErrorKind) -> BatchError {
        BatchError {
            path: path.as_ref().to_path_buf(),
            kind,
        }
    }

    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> BatchError {
        BatchError::new(path, BatchErrorKind::Io(err))
    }

    pub fn invalid(path: impl AsRef<Path>, what: impl Into<String>) -> BatchError {
        BatchError::new(path, BatchErrorKind::Invalid(what.into()))
    }

    pub fn corrupt(path: impl AsRef<Path>, what: impl Into<String>) -> BatchError {
        BatchError::new(path, BatchErrorKind::Corrupt(what.into()))
    }
}

/// Bytes of the input as an error message quotes them: in full when short, else the first
/// 48 bytes (cut at a character boundary), an ellipsis and the full length, so that a
/// message (and the daemon's error report and log line) stays small whatever the input holds.
pub fn quote(bytes: &[u8]) -> String {
    const SHORT: usize = 64;
    const PREFIX: usize = 48;
    if bytes.len() <= SHORT {
        return format!("{:?}", String::from_utf8_lossy(bytes));
    }
    let text = String::from_utf8_lossy(&bytes[..PREFIX]);
    // A multi-byte character cut at the end shows as U+FFFD: drop it.
    let text = text.trim_end_matches('\u{fffd}');
    format!("{text:?}… ({} bytes)", bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_quoted_by_a_prefix_and_their_length() {
        assert_eq!(quote(b"1 1 x"), "\"1 1 x\"");
        let long = vec![b'7'; 2 << 20];
        let q = quote(&long);
        assert!(q.len() < 80, "{q}");
        assert!(q.ends_with("… (2097152 bytes)"), "{q}");
        assert!(q.starts_with(&format!("\"{}", "7".repeat(48))), "{q}");
        let mut utf8 = "é".repeat(40).into_bytes();
        utf8.push(b'x');
        assert!(!quote(&utf8).contains('\u{fffd}'), "{}", quote(&utf8));
    }
}
