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
