//! Subcommands. Library errors are typed; here they become messages and exit codes.

pub mod convert;
pub mod embed;
pub mod inspect;
pub mod tokenize;

use cellstream::batch::BatchError;
use cellstream::model::ModelError;
use cellstream::pipeline::NoGeneInVocab;
use cellstream::tokenize::VocabError;

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
    });
    if bad_input {
        2
    } else {
        1
    }
}
