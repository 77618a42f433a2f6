//! Where results go: `ndjson` writes the per-cell records of DESIGN.md §5, `summary` the
//! per-batch record, `parquet` the same records as a table; the daemon hands each batch to
//! its [`ResultSink`]s: `files` (the `[output] dir` files, NDJSON or Parquet), `nats`
//! (JetStream subjects) and `stream` (fan-out to live HTTP clients).

pub mod files;
pub mod nats;
pub mod ndjson;
pub mod parquet;
pub mod stream;
pub mod summary;

use std::io;

use crate::embed::CellResult;
use summary::BatchSummary;

/// One batch's results, as every sink receives them.
pub struct Outgoing<'a> {
    pub batch_id: &'a str,
    pub barcodes: &'a [String],
    pub results: &'a [CellResult],
    /// The NDJSON cell records (DESIGN.md §5): one line per cell, input order, each ending
    /// in a newline; what `cellstream embed` writes for the batch, byte for byte.
    pub records: &'a [u8],
    /// `[output] format` when the batch was emitted (it reloads at once): the files' format.
    pub file_format: crate::config::OutputFormat,
    /// The model's embedding width (a Parquet file's list size).
    pub embedding_dim: usize,
}

/// When a sink is given a batch, relative to its source's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before: the batch is held until the sink has made it durable, and its source is
    /// acknowledged (the input archived, the message acked) only once every `Commit` sink
    /// has. A failure sends the batch back to its source to be retried.
    Commit,
    /// After, best effort: the live stream.
    Notify,
}

/// A place results go. The daemon calls [`records`](ResultSink::records) on every sink,
/// then builds the batch summary (its timings run to the records' commit) and calls
/// [`summary`](ResultSink::summary) on every sink: `Commit` sinks first, then the source is
/// acknowledged, then `Notify` sinks. A batch that is redone (after a crash, or a failure of
/// another sink) is given again whole: a sink replaces or deduplicates, never appends twice.
pub trait ResultSink: Send {
    /// Its name in logs (`files`, `nats`, `stream`).
    fn name(&self) -> &'static str;

    fn phase(&self) -> Phase {
        Phase::Commit
    }

    /// The batch's cell records. For a `Commit` sink, `Ok` means durable.
    fn records(&mut self, batch: &Outgoing) -> io::Result<()>;

    /// The batch's summary record (`json`: its serialised line, without the newline), after
    /// every sink took the records.
    fn summary(&mut self, batch: &Outgoing, summary: &BatchSummary, json: &[u8]) -> io::Result<()>;

    /// Whether a failed [`summary`](ResultSink::summary) holds the batch back (retried like a
    /// failed commit) or is only logged.
    fn summary_required(&self) -> bool {
        true
    }
}
