//! The `[output] dir` files: `<batch-id>.ndjson` or `<batch-id>.parquet` (the records, by
//! `[output] format`; committed: temporary name, fsync, rename) and `<batch-id>.summary.json`
//! (the same way, best effort). A batch done again replaces its files, never appends to them.

use std::io;
use std::path::PathBuf;

use super::summary::BatchSummary;
use super::{parquet, Outgoing, ResultSink};
use crate::config::OutputFormat;
use crate::fsutil::write_atomic;

pub struct FileSink {
    dir: PathBuf,
}

impl FileSink {
    pub fn new(dir: PathBuf) -> FileSink {
        FileSink { dir }
    }
}

impl ResultSink for FileSink {
    fn name(&self) -> &'static str {
        "files"
    }

    fn records(&mut self, batch: &Outgoing) -> io::Result<()> {
        let format = batch.file_format;
        let path = (self.dir).join(format!("{}.{}", batch.batch_id, format.extension()));
        match format {
            OutputFormat::Ndjson => write_atomic(&path, |w| w.write_all(batch.records)),
            OutputFormat::Parquet => parquet::batch_file(
                batch.batch_id,
                batch.barcodes,
                batch.results,
                batch.embedding_dim,
            )
            .and_then(|table| write_atomic(&path, |w| w.write_all(&table))),
        }
    }

    fn summary(&mut self, batch: &Outgoing, _: &BatchSummary, json: &[u8]) -> io::Result<()> {
        let path = self.dir.join(format!("{}.summary.json", batch.batch_id));
        write_atomic(&path, |w| {
            w.write_all(json)?;
            w.write_all(b"\n")
        })
    }

    /// The summary file is a convenience beside the committed records (the records are the
    /// output; the summary is also on the live stream): a failure is logged, not retried.
    fn summary_required(&self) -> bool {
        false
    }
}
