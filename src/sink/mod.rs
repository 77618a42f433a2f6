//! Where results go. `ndjson` writes the per-cell records of DESIGN.md §5.

pub mod ndjson;
