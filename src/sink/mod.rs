//! Where results go: `ndjson` writes the per-cell records of DESIGN.md §5, `summary` the
//! per-batch record, `stream` fans committed batches out to live HTTP clients.

pub mod ndjson;
pub mod stream;
pub mod summary;
