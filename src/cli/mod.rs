//! Subcommands. Library errors are typed; here they become messages and exit codes.

pub mod convert;
pub mod embed;
pub mod inspect;
pub mod progress;
pub mod read_child;
pub mod reference;
pub mod serve;
pub mod tokenize;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use cellstream::batch::BatchError;
use cellstream::config::ConfigError;
use cellstream::model::ModelError;
use cellstream::pipeline::NoGeneInVocab;
use cellstream::reference::ReferenceError;
use cellstream::tokenize::VocabError;

/// A buffered writer on `path`, or on stdout when `path` is "-".
pub fn open_output(path: &Path) -> anyhow::Result<BufWriter<Box<dyn Write>>> {
    let sink: Box<dyn Write> = if path.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(File::create(path).with_context(|| format!("creating {}", path.display()))?)
    };
    Ok(BufWriter::with_capacity(1 << 20, sink))
}

/// A usage mistake caught after argument parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// 2 for bad input or usage (the user can fix it), 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let bad_input = err.chain().any(|e| {
        e.is::<BatchError>()
            || e.is::<VocabError>()
            || e.is::<UsageError>()
            || e.is::<ModelError>()
            || e.is::<NoGeneInVocab>()
            || e.is::<ConfigError>()
            || e.is::<ReferenceError>()
    });
    if bad_input {
        2
    } else {
        1
    }
}
