//! Any single file through format detection: dense text, gzip, zstd, csb, unknown content.
#![no_main]

use std::sync::OnceLock;

use cellstream::batch::{read_batch, ReadOptions};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().path().join("batch");
    std::fs::write(&path, data).unwrap();
    let opts = ReadOptions {
        max_decompressed: 16 << 20,
        memory_map: false,
    };
    let _ = read_batch(&path, &opts);
});
