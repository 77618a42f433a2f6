//! 10x `.h5` and AnnData `.h5ad` through the HDF5 reader (feature `hdf5`): libhdf5 opens the
//! mutated file, the reader walks its groups and datasets and validates what it gets.
//! libhdf5 itself (C) is not instrumented, so coverage guides only the Rust side; what this
//! target looks for is a file that makes either side crash, hang or exhaust memory.
#![no_main]

use std::sync::OnceLock;

use cellstream::batch::{read_batch, ReadOptions};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().path().join("batch.h5");
    std::fs::write(&path, data).unwrap();
    let opts = ReadOptions {
        max_decompressed: 16 << 20,
        memory_map: false,
    };
    let _ = read_batch(&path, &opts);
});
