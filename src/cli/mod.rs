//! Subcommands. Library errors are typed; here they become messages and exit codes.

pub mod convert;
pub mod embed;
pub mod inspect;
pub mod progress;
pub mod read_child;
pub mod reference;
pub mod serve;
pub mod submit;
pub mod tokenize;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use cellstream::batch::{read_batch_capped, BatchError, Caps, CountBatch, ReadOptions};
use cellstream::config::ConfigError;
use cellstream::embed::NoGeneInVocab;
use cellstream::model::ModelError;
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

/// The caps on the batches a command reads, as the daemon's `[spool]` keys of the same names:
/// a batch over one is refused (exit 2, "too large", naming the cap and the value).
#[derive(clap::Args, Debug, Clone, Copy)]
#[command(next_help_heading = "Input caps")]
pub struct InputCaps {
    /// Refuse a batch of more cells than this.
    #[arg(long, value_name = "N", default_value_t = cellstream::batch::DEFAULT_MAX_CELLS)]
    max_cells: u64,
    /// Refuse a batch of more genes (features) than this.
    #[arg(long, value_name = "N", default_value_t = cellstream::batch::DEFAULT_MAX_GENES)]
    max_genes: u64,
    /// Refuse a batch of more stored counts (non-zero entries) than this.
    #[arg(long, value_name = "N", default_value_t = cellstream::batch::DEFAULT_MAX_STORED_COUNTS)]
    max_stored_counts: u64,
    /// Refuse a batch whose compressed or text members hold more bytes than this.
    #[arg(long, value_name = "BYTES", default_value_t = cellstream::batch::DEFAULT_MAX_DECOMPRESSED)]
    max_decompressed_bytes: u64,
}

impl InputCaps {
    /// Reads `path` under these caps (`.csb` files memory-mapped).
    pub fn read(&self, path: &Path) -> Result<CountBatch, BatchError> {
        let opts = ReadOptions {
            max_decompressed: self.max_decompressed_bytes,
            memory_map: true,
        };
        let caps = Caps {
            max_cells: self.max_cells,
            max_genes: self.max_genes,
            max_stored_counts: self.max_stored_counts,
        };
        read_batch_capped(path, &opts, &caps)
    }
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
