//! Where batches come from: the spool folder (`spool`) that producers and uploads fill.

pub mod spool;
