//! Where results go: `ndjson` writes the per-cell records of DESIGN.md §5, `summary` the
//! per-batch record, `parquet` the same records as a table, `stream` fans committed batches
//! out to live HTTP clients.

pub mod ndjson;
pub mod parquet;
pub mod stream;
pub mod summary;
